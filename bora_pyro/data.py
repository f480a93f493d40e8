"""Multi-task text corpora: tokenised documents, per-task splits and mixed-task batches.

One token convention everywhere: a document is ``tokenizer(text)["input_ids"] + [eos_token_id]``
truncated to ``max_length`` tokens; its log-likelihood is the sum over positions 1..n-1 given the
prefix, so it predicts ``n - 1`` tokens.
"""

from __future__ import annotations

import functools
import os
import random
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data_files import load_data
from .errors import DataError, DataWarning

SPLITS = ("train", "validation", "test")
LENGTH_GROUP_BATCHES = 32


@dataclass
class Shard:
    """Where a batch's rows sit in a global batch that several processes share (data-parallel SVI,
    see :mod:`bora_pyro.distributed`): every process samples the global batch's tasks.

    Attributes:
        task_ids: [global batch] long, every row's task in the global batch.
        task_sizes: [global batch] long or None, the split's documents of each of those rows' task.
        rows: [batch] long, the positions of this batch's rows in the global batch.
        num_shards: the number of processes the global batch is split across.
    """

    task_ids: torch.Tensor
    task_sizes: torch.Tensor | None
    rows: torch.Tensor
    num_shards: int

    def to(self, device: torch.device | str) -> Shard:
        sizes = None if self.task_sizes is None else self.task_sizes.to(device)
        return Shard(self.task_ids.to(device), sizes, self.rows.to(device), self.num_shards)


@dataclass
class Batch:
    """A padded batch of documents from one split.

    Attributes:
        input_ids: [batch, length] long, right-padded.
        attention_mask: [batch, length] long, 1 on real tokens.
        task_ids: [batch] long, the task index of each row.
        doc_ids: [batch] long, each row's index within its split (the ``docs`` plate's subsample).
        num_docs: number of documents in the split (the ``docs`` plate's size).
        task_sizes: [batch] long, the split's number of documents of each row's task; with it
            the model samples only the batch's tasks (``BoRA.tasks_plate``), without it all.
        shard_of: set when these rows are one process's share of a global batch (:meth:`shard`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    task_ids: torch.Tensor
    doc_ids: torch.Tensor
    num_docs: int
    task_sizes: torch.Tensor | None = None
    shard_of: Shard | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.task_ids.to(device),
            self.doc_ids.to(device),
            self.num_docs,
            None if self.task_sizes is None else self.task_sizes.to(device),
            None if self.shard_of is None else self.shard_of.to(device),
        )

    def shard(self, index: int, num_shards: int) -> Batch:
        """Rows ``index`` of ``num_shards`` contiguous, near-equal parts of this batch (an empty
        part when the batch has fewer rows than parts), knowing the whole batch's tasks."""
        if num_shards == 1:
            return self
        rows = torch.tensor_split(torch.arange(len(self.task_ids), device=self.task_ids.device), num_shards)[index]
        sizes = None if self.task_sizes is None else self.task_sizes[rows]
        return Batch(self.input_ids[rows], self.attention_mask[rows], self.task_ids[rows], self.doc_ids[rows],
                     self.num_docs, sizes, Shard(self.task_ids, self.task_sizes, rows, num_shards))

    @property
    def likelihood_scale(self) -> float:
        """The weight of these rows' log-likelihood beyond the docs plate's ``N / batch``: 1, or
        ``num_shards · batch / global batch`` for a shard, so that the processes' ELBOs average
        to the global batch's (each row weighs ``N / global batch``)."""
        if self.shard_of is None:
            return 1.0
        return self.shard_of.num_shards * len(self.task_ids) / len(self.shard_of.task_ids)

    @classmethod
    def probe(cls, token_id: int = 0, device: torch.device | str = "cpu", tasks: Sequence[int] | None = None) -> Batch:
        """One two-token document of task 0: enough to run a guide (its sites do not depend on the
        data), e.g. to create its parameters or draw from it. With ``tasks``, one such document per
        task, in a tasks plate of those tasks alone (``task_sizes`` set): the guide then draws (or
        reads from its task store) their rows only, not all D tasks'."""
        if tasks is None:
            ids = torch.full((1, 2), token_id, dtype=torch.long, device=device)
            zero = torch.zeros(1, dtype=torch.long, device=device)
            return cls(ids, torch.ones_like(ids), zero, zero, 1)
        task_ids = torch.tensor(list(tasks), dtype=torch.long, device=device)
        ids = torch.full((len(task_ids), 2), token_id, dtype=torch.long, device=device)
        return cls(ids, torch.ones_like(ids), task_ids, torch.arange(len(task_ids), device=device), len(task_ids),
                   torch.ones_like(task_ids))

    @property
    def num_predicted_tokens(self) -> int:
        return int((self.attention_mask.sum(-1) - 1).clamp(min=0).sum())


@dataclass
class DocumentSet:
    """The tokenised documents of one split: ``documents[n]`` belongs to task ``task_ids[n]``."""

    documents: list[list[int]]
    task_ids: list[int]

    def __len__(self) -> int:
        return len(self.documents)

    @functools.cached_property
    def task_sizes(self) -> Counter:
        """Documents per task id."""
        return Counter(self.task_ids)

    def relabel(self, task_map: Mapping[int, int]) -> DocumentSet:
        """The documents of the tasks in ``task_map``, their task ids mapped through it (e.g. a
        file's own task order onto a fitted run's)."""
        kept = [n for n, task in enumerate(self.task_ids) if task in task_map]
        return DocumentSet([self.documents[n] for n in kept], [task_map[self.task_ids[n]] for n in kept])

    def batches(
        self, batch_size: int, pad_token_id: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Mixed-task batches over the whole set.

        Without ``shuffle`` (evaluation), every document once, in order; the last batch may be
        smaller. With ``shuffle`` (training), an epoch: the documents in random order, then as
        many more drawn uniformly (without replacement) as fill the last batch, so that every
        batch has ``batch_size`` rows and the likelihood's ``N / batch_size`` weighs every row
        alike: each document's expected weight in a step is exactly 1. (A short last batch of r
        rows would weigh each of them N/r, and length grouping puts the longest documents there.)
        Within windows of ``LENGTH_GROUP_BATCHES`` batches the documents are grouped by length
        (like HF's ``group_by_length``), so a batch of short speeches is not padded to one long
        one; the batches then come in random order.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be ≥ 1, got {batch_size}")
        if not shuffle:
            groups = [list(range(start, min(start + batch_size, len(self)))) for start in range(0, len(self), batch_size)]
        else:
            order = torch.randperm(len(self), generator=generator).tolist()
            fill = -len(self) % batch_size
            while fill:  # the extra documents of the last batch (more than N of them when B > N)
                extra = torch.randperm(len(self), generator=generator)[:fill].tolist()
                order, fill = order + extra, fill - len(extra)
            window = batch_size * LENGTH_GROUP_BATCHES
            groups = []
            for start in range(0, len(order), window):
                by_length = sorted(order[start : start + window], key=lambda i: len(self.documents[i]))
                groups += [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
            groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        for doc_ids in groups:
            yield self.collate(doc_ids, pad_token_id)

    def collate(self, doc_ids: Sequence[int], pad_token_id: int) -> Batch:
        length = max(len(self.documents[i]) for i in doc_ids)
        input_ids = torch.full((len(doc_ids), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(doc_ids), length), dtype=torch.long)
        for row, i in enumerate(doc_ids):
            tokens = self.documents[i]
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            attention_mask[row, : len(tokens)] = 1
        return Batch(
            input_ids,
            attention_mask,
            torch.tensor([self.task_ids[i] for i in doc_ids], dtype=torch.long),
            torch.tensor(doc_ids, dtype=torch.long),
            len(self),
            torch.tensor([self.task_sizes[self.task_ids[i]] for i in doc_ids], dtype=torch.long),
        )


def padding_token(tokenizer) -> int:
    """The token that pads a batch: the tokenizer's pad token, else its EOS (masked out either way)."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def split_sizes(num_docs: int, test_size: float, validation_size: float) -> tuple[int, int, int]:
    """(train, validation, test) counts for a task of ``num_docs`` documents.

    Policy: test gets ``round(num_docs · test_size)`` and validation ``round(rest · validation_size)``,
    but training always keeps at least one document; a task with a single document is train-only.
    """
    test = min(round(num_docs * test_size), num_docs - 1)
    validation = min(round((num_docs - test) * validation_size), num_docs - test - 1)
    return num_docs - test - validation, validation, test


def shorten(names: Sequence[str], limit: int = 5) -> str:
    """At most ``limit`` names, for a one-line message: ``['a', 'b', ... (12 in all)]``."""
    shown = ", ".join(map(repr, names[:limit]))
    return f"[{shown}, ... ({len(names)} in all)]" if len(names) > limit else f"[{shown}]"


def checked_pairs(tasks_and_texts: Sequence[tuple[object, object]]) -> list[tuple[str, str]]:
    """(task, text) pairs as strings: a task may be any scalar (``3`` → ``"3"``), a missing text
    (``None``) is empty; a missing task or a text that is not a string is a :class:`DataError`."""
    pairs = []
    for row, (task, text) in enumerate(tasks_and_texts, start=1):
        if task is None or (isinstance(task, str) and not task.strip()):
            raise DataError(f"row {row} of the data has no task; give every row a task name")
        if text is not None and not isinstance(text, str):
            raise DataError(f"row {row} of the data has a {type(text).__name__} as its text, not a string; "
                            "check --text-field")
        pairs.append((str(task), text or ""))
    return pairs


def checked_columns(dataset):
    """``dataset`` (columns ``task`` and ``text``) with string columns, tasks as ``str(task)`` (as
    for pairs); a missing task, or a text that is not a string, is a :class:`DataError` naming its
    row. String columns are checked on Arrow; others (numbers, a JSON file's mixed types, which
    datasets keeps JSON-encoded) on their decoded values."""
    import datasets
    import pyarrow.compute as pc

    if dataset._indices is not None:  # a select/filter/shuffle: the rows as the user sees them
        dataset = dataset.flatten_indices()
    strings = datasets.Features({"task": datasets.Value("string"), "text": datasets.Value("string")})
    task_is_text = dataset.features["task"] == strings["task"]
    if task_is_text:
        tasks = dataset.data.column("task")
        missing = pc.fill_null(pc.or_kleene(pc.is_null(tasks), pc.equal(pc.utf8_trim_whitespace(tasks), "")), True)
        row = first_true(missing) if pc.any(missing).as_py() else None
    else:
        row = next((n for n, task in enumerate(dataset["task"]) if task is None or str(task).strip() == ""), None)
    if row is not None:
        raise DataError(f"row {row + 1} of the data has no task; give every row a task name")
    text_is_text = dataset.features["text"] in (strings["text"], datasets.Value("null"))
    if not text_is_text:
        row = next((n for n, text in enumerate(dataset["text"]) if text is not None and not isinstance(text, str)), None)
        if row is not None:
            raise DataError(f"row {row + 1} of the data has a {type(dataset[row]['text']).__name__} as its text, not a "
                            "string; check --text-field")
    if task_is_text and dataset.features["text"] == strings["text"]:
        return dataset
    return dataset.map(lambda batch: {"task": [str(task) for task in batch["task"]], "text": batch["text"]},
                       batched=True, features=strings)


def first_true(mask) -> int:
    """The index of the first true entry of a boolean Arrow array (which has one)."""
    return int(np.flatnonzero(mask.to_numpy())[0])


class TokenTable(Sequence):
    """Documents of token ids that share one flat buffer: document ``n`` is
    ``tokens[starts[n] : starts[n] + lengths[n]]``. The splits of a corpus index the same buffer
    (no copy): 4 bytes per token and 16 per document, where Python lists of ints take ~36 bytes
    per token (``benchmarks/data_memory.py``). Indexing gives a ``list[int]``, as a list of
    documents would.

    Args:
        tokens: [total tokens] int32, shared.
        starts: [documents] int64; lengths: [documents] int64.
    """

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.tokens, self.starts, self.lengths = tokens, starts, lengths

    @classmethod
    def from_offsets(cls, tokens: np.ndarray, offsets: np.ndarray) -> TokenTable:
        """Documents ``tokens[offsets[n] : offsets[n + 1]]`` (Arrow's list layout)."""
        offsets = np.asarray(offsets, dtype=np.int64)
        return cls(tokens, offsets[:-1], np.diff(offsets))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, n: int) -> list[int]:
        if not -len(self) <= n < len(self):
            raise IndexError(n)
        start = self.starts[n]
        return self.tokens[start : start + self.lengths[n]].tolist()

    def gather(self, indices: np.ndarray) -> TokenTable:
        """The documents ``indices``, in that order (the same token buffer)."""
        return TokenTable(self.tokens, self.starts[indices], self.lengths[indices])


class MultiTaskCorpus:
    """Documents of D tasks, tokenised and split per task (stratified, seeded).

    Args:
        tasks_and_texts: (task name, text) pairs, one per document, or a ``datasets.Dataset``
            with columns ``task`` and ``text`` (see :meth:`from_dataset` for other names).
        tokenizer: a Hugging Face tokenizer with an EOS token.
        max_length: documents are truncated to this many tokens (EOS included).
        test_size: fraction of each task's documents held out for test.
        validation_size: fraction of each task's remaining documents held out for validation
            (early stopping, hyperparameters); 0 disables it.
        seed: seed of the per-task shuffles; a task's split depends only on the seed, the task's
            name and its documents, not on the other tasks.
        task_names: fix the task order (e.g. a fitted run's); by default the sorted task names.
        cache_dir: where the tokenised copy of a ``datasets.Dataset`` is cached (an Arrow file
            named by the dataset's fingerprint, the tokenizer's and ``max_length``); None: datasets'
            default (beside a file-backed dataset's own Arrow files).

    The texts are tokenised with ``Dataset.map`` (batched) and the splits hold the token ids flat
    (:class:`TokenTable`), so a corpus of millions of short documents fits in memory.

    Attributes:
        task_names: the D task names; task index ``d`` is ``task_names[d]``.
        train, validation, test: :class:`DocumentSet` of each split.
    """

    def __init__(
        self,
        tasks_and_texts,
        tokenizer,
        max_length: int = 256,
        test_size: float = 0.33,
        validation_size: float = 0.0,
        seed: int = 0,
        task_names: Sequence[str] | None = None,
        cache_dir: str | Path | None = None,
    ):
        import datasets

        if not 0 <= test_size < 1 or not 0 <= validation_size < 1:
            raise DataError(f"test_size and validation_size must lie in [0, 1), got {test_size}, {validation_size}")
        if max_length < 2:
            raise DataError(f"max_length must be ≥ 2 tokens, got {max_length}")
        self.tokenizer, self.max_length = tokenizer, max_length
        if isinstance(tasks_and_texts, datasets.Dataset):
            dataset = checked_columns(tasks_and_texts)
        else:
            pairs = checked_pairs(tasks_and_texts)
            dataset = datasets.Dataset.from_dict({"task": [task for task, _ in pairs], "text": [text for _, text in pairs]},
                                                 features=datasets.Features({"task": datasets.Value("string"),
                                                                             "text": datasets.Value("string")}))
        if len(dataset) == 0:
            raise DataError("none of the 0 documents has any text: check --text-field and the file's contents")
        encoded = self.encoded(dataset, cache_dir)
        ids = encoded.data.column("ids").combine_chunks()
        documents = TokenTable.from_offsets(ids.values.to_numpy(), ids.offsets.to_numpy())
        kept = documents.lengths > 0
        num_empty = int(np.sum(encoded.data.column("empty").to_numpy()))
        self.num_dropped = len(kept) - int(kept.sum())
        if not kept.any():
            raise DataError(f"none of the {len(kept)} documents has any text (empty, or no tokens for this "
                            "tokenizer): check --text-field and the file's contents")
        if self.num_dropped:
            warnings.warn(f"dropped {self.num_dropped} of {len(kept)} documents: {num_empty} with empty text, "
                          f"{self.num_dropped - num_empty} that tokenise to no tokens", DataWarning, stacklevel=2)
        task_column = encoded.data.column("task").combine_chunks().dictionary_encode()
        names_in_data = task_column.dictionary.to_pylist()
        kept_rows = np.flatnonzero(kept)
        codes = task_column.indices.to_numpy()[kept_rows]
        present = sorted({names_in_data[code] for code in np.unique(codes)})
        self.task_names = list(task_names) if task_names is not None else present
        index = {name: d for d, name in enumerate(self.task_names)}
        unknown = sorted(set(present) - index.keys())
        if unknown:
            raise DataError(
                f"the data has tasks {shorten(unknown)} that the run was not fitted on (its {len(index)} tasks: "
                f"{shorten(self.task_names)}): remove those rows, or fit a run that includes them"
            )

        by_code = np.argsort(codes, kind="stable")  # each task's documents in the data's order
        bounds = np.searchsorted(codes[by_code], np.arange(len(names_in_data) + 1))
        rows_of = {names_in_data[code]: kept_rows[by_code[bounds[code]:bounds[code + 1]]]
                   for code in range(len(names_in_data))}
        no_test = [name for name in self.task_names
                   if len(rows_of.get(name, ())) and split_sizes(len(rows_of[name]), test_size, 0)[2] == 0]
        if test_size > 0 and no_test:
            warnings.warn(
                f"{len(no_test)} tasks ({shorten(no_test)}) get no test document at test_size={test_size}: the split "
                "keeps at least one training document per task and rounds the test share, so a task of 1 document "
                "is train-only; these tasks have no test perplexity", DataWarning, stacklevel=2)
        split_rows: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        split_tasks: dict[str, list[int]] = {split: [] for split in SPLITS}
        for name in self.task_names:
            rows = rows_of.get(name, np.zeros(0, dtype=np.int64))
            order = list(range(len(rows)))
            random.Random(f"{seed}:{name}").shuffle(order)
            n_train, n_validation, _ = split_sizes(len(rows), test_size, validation_size)
            limits = (0, n_train, n_train + n_validation, len(rows))
            for split, lo, hi in zip(SPLITS, limits, limits[1:]):
                split_rows[split].append(rows[order[lo:hi]])
                split_tasks[split] += [index[name]] * (hi - lo)
        self.train, self.validation, self.test = (
            DocumentSet(documents.gather(np.concatenate(split_rows[split] or [np.zeros(0, dtype=np.int64)])),
                        split_tasks[split])
            for split in SPLITS)

    @classmethod
    def from_file(cls, path: str | Path, tokenizer, task_field: str = "task", text_field: str = "text",
                  cache_dir: str | Path | None = None, **kwargs):
        """Read a data file (``.jsonl``, ``.json``, ``.csv`` with a header row, ``.parquet``) or a
        ``Dataset.save_to_disk`` folder with a task and a text column (:mod:`bora_pyro.data_files`);
        ``cache_dir``: where datasets keeps its Arrow copy of the file and the tokenised columns
        (default datasets' cache, ``HF_DATASETS_CACHE``; never the folder of a saved dataset)."""
        import datasets

        cache_dir = Path(cache_dir or datasets.config.HF_DATASETS_CACHE)
        return cls.from_dataset(load_data(path, cache_dir), tokenizer, task_field, text_field,
                                cache_dir=cache_dir / "bora-pyro-tokens", **kwargs)

    @classmethod
    def from_dataset(cls, dataset, tokenizer, task_field: str = "task", text_field: str = "text", **kwargs):
        """Build from a ``datasets.Dataset`` (or any mapping of column name → list)."""
        import datasets

        columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset)
        for field in (task_field, text_field):
            if field not in columns:
                raise DataError(f"the data has no column {field!r}; its columns are {shorten(list(columns))} "
                                "(set --task-field/--text-field)")
        if not isinstance(dataset, datasets.Dataset) or task_field == text_field:
            return cls(list(zip(dataset[task_field], dataset[text_field])), tokenizer, **kwargs)
        selected = dataset.select_columns([task_field, text_field])  # renamed in two steps: either may be "task"
        selected = selected.rename_columns({task_field: "_task", text_field: "_text"})
        return cls(selected.rename_columns({"_task": "task", "_text": "text"}), tokenizer, **kwargs)

    def encoded(self, dataset, cache_dir: str | Path | None = None):
        """``Dataset.map`` of the texts to token ids (``ids``: EOS appended, truncated to
        ``max_length``; empty for a document that is dropped) and whether the text is ``empty``."""
        import datasets
        from datasets.fingerprint import Hasher

        specials = self.tokenizer.num_special_tokens_to_add()  # e.g. a BOS token: not text

        def encode(batch: dict) -> dict:
            texts = [text or "" for text in batch["text"]]
            empty = [not text.strip() for text in texts]
            ids = self.token_ids(texts)
            return {"ids": [[] if drop or len(i) <= specials else self.with_eos(i) for drop, i in zip(empty, ids)],
                    "empty": empty}

        features = datasets.Features({"task": datasets.Value("string"), "ids": datasets.Sequence(datasets.Value("int32")),
                                      "empty": datasets.Value("bool")})
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # one-line warnings and errors on the CLI's stderr
        try:
            if cache_dir is None:
                return dataset.map(encode, batched=True, remove_columns=["text"], features=features)
            files = [(file["filename"], os.stat(file["filename"]).st_size, os.stat(file["filename"]).st_mtime_ns)
                     for file in dataset.cache_files]  # a saved dataset's fingerprint does not say what it holds
            fingerprint = Hasher.hash([dataset._fingerprint, files, Hasher.hash(self.tokenizer), self.max_length])
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            return dataset.map(encode, batched=True, remove_columns=["text"], features=features,
                               cache_file_name=str(Path(cache_dir) / f"tokens-{fingerprint}.arrow"),
                               new_fingerprint=fingerprint)
        finally:
            if bars:
                datasets.enable_progress_bars()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text with EOS appended, truncated to ``max_length``."""
        return [self.with_eos(ids) for ids in self.token_ids(texts)]

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The tokenizer's ids of each text (special tokens included), untruncated."""
        return self.tokenizer(list(texts), add_special_tokens=True)["input_ids"] if texts else []

    def with_eos(self, ids: list[int]) -> list[int]:
        return (ids + [self.tokenizer.eos_token_id])[: self.max_length]

    def documents(self, split: str) -> DocumentSet:
        """The documents of ``split``: "train", "validation", "test", or "all" of them."""
        if split == "all":
            sets = [getattr(self, name) for name in SPLITS]
            return DocumentSet([doc for s in sets for doc in s.documents], [t for s in sets for t in s.task_ids])
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: use one of {SPLITS + ('all',)}")
        return getattr(self, split)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def pad_token_id(self) -> int:
        return padding_token(self.tokenizer)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per task: number of documents in each split, e.g. ``{"train_docs": 40, ...}``."""
        counts = {split: Counter(getattr(self, split).task_ids) for split in SPLITS}
        short = {"train": "train_docs", "validation": "validation_docs", "test": "test_docs"}
        return {name: {short[split]: counts[split][d] for split in SPLITS} for d, name in enumerate(self.task_names)}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={len(getattr(self, split))}" for split in SPLITS)
        return f"MultiTaskCorpus(tasks={self.num_tasks}, {sizes}, max_length={self.max_length})"


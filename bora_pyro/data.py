"""Multi-task text corpora: tokenised documents, per-task splits and mixed-task batches.

One token convention everywhere: a document is ``tokenizer(text)["input_ids"] + [eos_token_id]``
truncated to ``max_length`` tokens; its log-likelihood is the sum over positions 1..n-1 given the
prefix, so it predicts ``n - 1`` tokens.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

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
    def probe(cls, token_id: int = 0, device: torch.device | str = "cpu") -> Batch:
        """One two-token document of task 0: enough to run a guide (its sites do not depend on the
        data), e.g. to create its parameters or draw from it."""
        ids = torch.full((1, 2), token_id, dtype=torch.long, device=device)
        zero = torch.zeros(1, dtype=torch.long, device=device)
        return cls(ids, torch.ones_like(ids), zero, zero, 1)

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


def read_columns(path: str | Path) -> dict[str, list]:
    """The columns (name → one value per row) of a UTF-8 ``.jsonl``/``.json`` or ``.csv`` file,
    with a one-line :class:`DataError` for a missing, empty, non-UTF-8 or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; check the --data path")
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"cannot read {path.name!r}: use a .jsonl, .json or .csv file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text: byte 0x{raw[error.start]:02x} on line {line} cannot be "
                        "decoded; re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    if not text.strip():
        raise DataError(f"data file {path} is empty; it needs one document per row")
    rows = read_csv(path, text) if kind == "csv" else read_json(path, text)
    if not rows:
        raise DataError(f"data file {path} has no rows; it needs one document per row")
    columns = list(dict.fromkeys(name for row in rows for name in row))
    return {name: [row.get(name) for row in rows] for name in columns}


def read_csv(path: Path, text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as error:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({error})") from None
    if reader.fieldnames is None or len(set(reader.fieldnames)) < len(reader.fieldnames):
        raise DataError(f"{path} needs a header row of distinct column names, got {reader.fieldnames}")
    return [{k: v for k, v in row.items() if k is not None} for row in rows]


def read_json(path: Path, text: str) -> list[dict]:
    """JSON lines, or (a file starting with ``[``) one JSON array; every row must be an object.
    ``NaN`` and ``±Infinity``, which Python's json reads but JSON does not have, are refused."""
    stripped = text.lstrip()
    lines = [(1 + text[: len(text) - len(stripped)].count("\n"), stripped)] if stripped.startswith("[") else \
        [(number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]

    def no_constant(number: int, line: str, constant: str):
        """json's ``parse_constant``: refuse ``constant``, naming the line of the first one outside a string."""
        strings_or_constants = re.finditer(r'"(?:[^"\\]|\\.)*"|(-?Infinity|NaN)', line)
        offset = next((match.start() for match in strings_or_constants if match.group(1)), 0)
        at = number + line.count("\n", 0, offset)
        raise DataError(f"{path}, line {at}: {constant} is not a JSON number (JSON has no NaN or Infinity); "
                        f"write it as null or as a string such as \"{constant}\"")

    rows = []
    for number, line in lines:
        try:
            value = json.loads(line, parse_constant=functools.partial(no_constant, number, line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number + error.lineno - 1}: not valid JSON ({error.msg}); a .jsonl file "
                            "holds one JSON object per line") from None
        for row in value if isinstance(value, list) else [value]:
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object with a task and a text field, "
                                f"got {type(row).__name__}")
            rows.append(row)
    return rows


class MultiTaskCorpus:
    """Documents of D tasks, tokenised and split per task (stratified, seeded).

    Args:
        tasks_and_texts: (task name, text) pairs, one per document.
        tokenizer: a Hugging Face tokenizer with an EOS token.
        max_length: documents are truncated to this many tokens (EOS included).
        test_size: fraction of each task's documents held out for test.
        validation_size: fraction of each task's remaining documents held out for validation
            (early stopping, hyperparameters); 0 disables it.
        seed: seed of the per-task shuffles; a task's split depends only on the seed, the task's
            name and its documents, not on the other tasks.
        task_names: fix the task order (e.g. a fitted run's); by default the sorted task names.

    Attributes:
        task_names: the D task names; task index ``d`` is ``task_names[d]``.
        train, validation, test: :class:`DocumentSet` of each split.
    """

    def __init__(
        self,
        tasks_and_texts: Sequence[tuple[str, str]],
        tokenizer,
        max_length: int = 256,
        test_size: float = 0.33,
        validation_size: float = 0.0,
        seed: int = 0,
        task_names: Sequence[str] | None = None,
    ):
        if not 0 <= test_size < 1 or not 0 <= validation_size < 1:
            raise DataError(f"test_size and validation_size must lie in [0, 1), got {test_size}, {validation_size}")
        if max_length < 2:
            raise DataError(f"max_length must be ≥ 2 tokens, got {max_length}")
        self.tokenizer, self.max_length = tokenizer, max_length
        pairs = checked_pairs(tasks_and_texts)
        non_empty = [(task, text) for task, text in pairs if text.strip()]
        specials = tokenizer.num_special_tokens_to_add()  # e.g. a BOS token: not text
        token_ids = self.token_ids([text for _, text in non_empty])
        kept = [(task, self.with_eos(ids)) for (task, _), ids in zip(non_empty, token_ids) if len(ids) > specials]
        self.num_dropped = len(pairs) - len(kept)
        if not kept:
            raise DataError(f"none of the {len(pairs)} documents has any text (empty, or no tokens for this "
                            "tokenizer): check --text-field and the file's contents")
        if self.num_dropped:
            warnings.warn(f"dropped {self.num_dropped} of {len(pairs)} documents: "
                          f"{len(pairs) - len(non_empty)} with empty text, {len(non_empty) - len(kept)} that "
                          "tokenise to no tokens", DataWarning, stacklevel=2)
        self.task_names = list(task_names) if task_names is not None else sorted({task for task, _ in kept})
        index = {name: d for d, name in enumerate(self.task_names)}
        unknown = sorted({task for task, _ in kept} - index.keys())
        if unknown:
            raise DataError(
                f"the data has tasks {shorten(unknown)} that the run was not fitted on (its {len(index)} tasks: "
                f"{shorten(self.task_names)}): remove those rows, or fit a run that includes them"
            )

        by_task: dict[str, list[list[int]]] = {name: [] for name in self.task_names}
        for task, tokens in kept:
            by_task[task].append(tokens)
        self.train, self.validation, self.test = (DocumentSet([], []) for _ in SPLITS)
        no_test = [name for name, docs in by_task.items() if docs and split_sizes(len(docs), test_size, 0)[2] == 0]
        if test_size > 0 and no_test:
            warnings.warn(
                f"{len(no_test)} tasks ({shorten(no_test)}) get no test document at test_size={test_size}: the split "
                "keeps at least one training document per task and rounds the test share, so a task of 1 document "
                "is train-only; these tasks have no test perplexity", DataWarning, stacklevel=2)
        for name, docs in by_task.items():
            order = list(range(len(docs)))
            random.Random(f"{seed}:{name}").shuffle(order)
            n_train, n_validation, _ = split_sizes(len(docs), test_size, validation_size)
            bounds = (0, n_train, n_train + n_validation, len(docs))
            for split, lo, hi in zip((self.train, self.validation, self.test), bounds, bounds[1:]):
                split.documents.extend(docs[i] for i in order[lo:hi])
                split.task_ids.extend([index[name]] * (hi - lo))

    @classmethod
    def from_file(cls, path: str | Path, tokenizer, task_field: str = "task", text_field: str = "text", **kwargs):
        """Read a UTF-8 JSON-lines (``.jsonl``; ``.json`` may also be one array of objects) or CSV
        (``.csv``, with a header row) file with a task and a text column."""
        return cls.from_dataset(read_columns(path), tokenizer, task_field, text_field, **kwargs)

    @classmethod
    def from_dataset(cls, dataset, tokenizer, task_field: str = "task", text_field: str = "text", **kwargs):
        """Build from a ``datasets.Dataset`` (or any mapping of column name → list)."""
        columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset)
        for field in (task_field, text_field):
            if field not in columns:
                raise DataError(f"the data has no column {field!r}; its columns are {shorten(list(columns))} "
                                "(set --task-field/--text-field)")
        return cls(list(zip(dataset[task_field], dataset[text_field])), tokenizer, **kwargs)

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


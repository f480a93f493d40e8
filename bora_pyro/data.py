"""Multi-task text corpora: tokenised documents, per-task splits and mixed-task batches.

One token convention everywhere: a document is ``tokenizer(text)["input_ids"] + [eos_token_id]``
truncated to ``max_length`` tokens; its log-likelihood is the sum over positions 1..n-1 given the
prefix, so it predicts ``n - 1`` tokens.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError

SPLITS = ("train", "validation", "test")
LENGTH_GROUP_BATCHES = 32


@dataclass
class Batch:
    """A padded batch of documents from one split.

    Attributes:
        input_ids: [batch, length] long, right-padded.
        attention_mask: [batch, length] long, 1 on real tokens.
        task_ids: [batch] long, the task index of each row.
        doc_ids: [batch] long, each row's index within its split (the ``docs`` plate's subsample).
        num_docs: number of documents in the split (the ``docs`` plate's size).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    task_ids: torch.Tensor
    doc_ids: torch.Tensor
    num_docs: int

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.task_ids.to(device),
            self.doc_ids.to(device),
            self.num_docs,
        )

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

    def batches(
        self, batch_size: int, pad_token_id: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Mixed-task batches over the whole set (one may be smaller).

        With ``shuffle``, documents are drawn in random order and, within windows of
        ``LENGTH_GROUP_BATCHES`` batches, grouped by length (like HF's ``group_by_length``), so a
        batch of short speeches is not padded to one long one; the batches then come in random order.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be ≥ 1, got {batch_size}")
        if not shuffle:
            groups = [list(range(start, min(start + batch_size, len(self)))) for start in range(0, len(self), batch_size)]
        else:
            order = torch.randperm(len(self), generator=generator).tolist()
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
        )


def split_sizes(num_docs: int, test_size: float, validation_size: float) -> tuple[int, int, int]:
    """(train, validation, test) counts for a task of ``num_docs`` documents.

    Policy: test gets ``round(num_docs · test_size)`` and validation ``round(rest · validation_size)``,
    but training always keeps at least one document; a task with a single document is train-only.
    """
    test = min(round(num_docs * test_size), num_docs - 1)
    validation = min(round((num_docs - test) * validation_size), num_docs - test - 1)
    return num_docs - test - validation, validation, test


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
        pairs = [(str(task), text) for task, text in tasks_and_texts if isinstance(text, str) and text.strip()]
        if not pairs:
            raise DataError("the corpus has no non-empty documents")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.task_names = list(task_names) if task_names is not None else sorted({task for task, _ in pairs})
        index = {name: d for d, name in enumerate(self.task_names)}
        unknown = sorted({task for task, _ in pairs} - index.keys())
        if unknown:
            raise DataError(f"tasks {unknown[:5]} are not among the model's {len(self.task_names)} tasks")
        self.num_dropped = len(tasks_and_texts) - len(pairs)

        documents = self.tokenize([text for _, text in pairs])
        by_task: dict[str, list[list[int]]] = {name: [] for name in self.task_names}
        for (task, _), tokens in zip(pairs, documents):
            by_task[task].append(tokens)
        self.train, self.validation, self.test = (DocumentSet([], []) for _ in SPLITS)
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
        """Read a JSON-lines (``.jsonl``/``.json``) or CSV (``.csv``) file with a task and a text column."""
        import datasets

        path = Path(path)
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} does not exist")
        formats = {".jsonl": "json", ".json": "json", ".csv": "csv"}
        if path.suffix.lower() not in formats:
            raise DataError(f"cannot read {path.name!r}: use a .jsonl, .json or .csv file")
        try:
            dataset = datasets.load_dataset(formats[path.suffix.lower()], data_files=str(path), split="train")
        except Exception as error:  # datasets raises many types for unreadable files
            raise DataError(f"cannot read {str(path)!r} as {formats[path.suffix.lower()]}: {str(error).splitlines()[0]}") from None
        return cls.from_dataset(dataset, tokenizer, task_field, text_field, **kwargs)

    @classmethod
    def from_dataset(cls, dataset, tokenizer, task_field: str = "task", text_field: str = "text", **kwargs):
        """Build from a ``datasets.Dataset`` (or any mapping of column name → list)."""
        columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset)
        for field in (task_field, text_field):
            if field not in columns:
                raise DataError(f"the data has no column {field!r}; its columns are {list(columns)} (set --task-field/--text-field)")
        return cls(list(zip(dataset[task_field], dataset[text_field])), tokenizer, **kwargs)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text with EOS appended, truncated to ``max_length``."""
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        return [(tokens + [eos])[: self.max_length] for tokens in ids]

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
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def counts(self) -> dict[str, dict[str, int]]:
        """Per task: number of documents in each split, e.g. ``{"train_docs": 40, ...}``."""
        counts = {split: Counter(getattr(self, split).task_ids) for split in SPLITS}
        short = {"train": "train_docs", "validation": "validation_docs", "test": "test_docs"}
        return {name: {short[split]: counts[split][d] for split in SPLITS} for d, name in enumerate(self.task_names)}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={len(getattr(self, split))}" for split in SPLITS)
        return f"MultiTaskCorpus(tasks={self.num_tasks}, {sizes}, max_length={self.max_length})"


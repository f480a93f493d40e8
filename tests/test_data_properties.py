"""Property-based tests of the data pipeline: arbitrary Unicode texts, task names and sizes never
crash it (a bad input is a one-line DataError, nothing else), every usable document lands in
exactly one split, and a file says the same as the pairs written into it."""

from __future__ import annotations

import csv
import json
import warnings
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, normalizers

from bora_pyro import DataError, MultiTaskCorpus
from bora_pyro.data import SPLITS, split_sizes
from conftest import WORDS, make_tokenizer

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer():
    """The test tokenizer, dropping every character but w, digits and whitespace: arbitrary text
    often tokenises to no tokens at all."""
    tokenizer = make_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace(Regex(r"[^w0-9\s]"), "")
    return tokenizer


texts = st.one_of(
    st.text(),  # arbitrary Unicode, mostly no tokens
    st.lists(st.sampled_from(WORDS + ["w99", " ", "\n", "\u2028", "é", "?"]), max_size=12).map(" ".join),
    st.none(),
)
task_names = st.text(min_size=1, max_size=6).filter(str.strip)
tasks = st.one_of(task_names, st.sampled_from(["a", "b", "c", "Ωμέγα", " a "]), st.integers(-3, 3))
documents = st.lists(st.tuples(tasks, texts), max_size=40)
fractions = st.floats(0, 0.99, allow_nan=False)


def expected_documents(pairs, tokenizer, max_length: int) -> Counter:
    """(task, tokens) of every usable document, computed independently of MultiTaskCorpus."""
    expected = Counter()
    for task, text in pairs:
        if text is None or not text.strip():
            continue
        ids = tokenizer(text)["input_ids"]
        if ids:
            expected[str(task), tuple((ids + [tokenizer.eos_token_id])[:max_length])] += 1
    return expected


def split_documents(corpus: MultiTaskCorpus, split: str) -> Counter:
    documents = corpus.documents(split)
    return Counter((corpus.task_names[t], tuple(doc)) for doc, t in zip(documents.documents, documents.task_ids))


def build(pairs, tokenizer, **kwargs) -> MultiTaskCorpus | DataError:
    """The corpus, or the DataError (one line) that refused it; any other exception fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return MultiTaskCorpus(pairs, tokenizer, **kwargs)
    except DataError as error:
        assert "\n" not in str(error)
        return error


@SETTINGS
@given(pairs=documents, test_size=fractions, validation_size=fractions, max_length=st.integers(2, 12),
       seed=st.integers(0, 3))
def test_every_usable_document_lands_in_exactly_one_split(tokenizer, pairs, test_size, validation_size, max_length,
                                                          seed):
    corpus = build(pairs, tokenizer, test_size=test_size, validation_size=validation_size, max_length=max_length,
                   seed=seed)
    expected = expected_documents(pairs, tokenizer, max_length)
    event("refused" if isinstance(corpus, DataError) else f"{min(len(corpus.task_names), 3)}+ tasks")
    if isinstance(corpus, DataError):
        assert not expected, corpus  # refused only when no document is usable
        return
    splits = {split: split_documents(corpus, split) for split in SPLITS}
    assert sum(splits.values(), Counter()) == expected  # each one exactly once, none lost or made up
    assert corpus.num_dropped == len(pairs) - sum(expected.values())
    assert corpus.task_names == sorted({task for task, _ in expected})
    for name, counts in corpus.counts().items():
        size = sum(counts.values())
        assert (counts["train_docs"], counts["validation_docs"], counts["test_docs"]) == \
            split_sizes(size, test_size, validation_size)
        assert counts["train_docs"] >= 1  # the policy: every task keeps a training document
    for split in SPLITS:
        for batch in corpus.documents(split).batches(3, corpus.pad_token_id):
            assert batch.input_ids.shape[1] <= max_length


@SETTINGS
@given(pairs=documents, blank=st.sampled_from(["", " ", "\t\n", None]), row=st.integers(0, 40))
def test_a_row_without_task_is_refused_and_named(tokenizer, pairs, blank, row):
    row = min(row, len(pairs))
    error = build(pairs[:row] + [(blank, "w1 w2")] + pairs[row:], tokenizer)
    assert isinstance(error, DataError) and f"row {row + 1} of the data has no task" in str(error)


def write_file(path, pairs, kind: str) -> None:
    if kind == "jsonl":
        path.write_text("".join(json.dumps({"task": task, "text": text}, ensure_ascii=False) + "\n"
                                for task, text in pairs), encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["task", "text"])
            writer.writerows([task, "" if text is None else text] for task, text in pairs)


@SETTINGS
@given(pairs=st.lists(st.tuples(task_names, texts), max_size=25),
       kind=st.sampled_from(["jsonl", "csv"]))
def test_a_file_reads_as_the_pairs_written_into_it(tokenizer, tmp_path, pairs, kind):
    assume("\x00" not in "".join(str(text) for pair in pairs for text in pair) or kind == "jsonl")
    path = tmp_path / f"data.{kind}"
    write_file(path, pairs, kind)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from_file = MultiTaskCorpus.from_file(path, tokenizer, test_size=0.3, validation_size=0.2)
    except DataError as error:
        assert "\n" not in str(error)
        assert isinstance(build(pairs, tokenizer, test_size=0.3, validation_size=0.2), DataError) or not pairs
        return
    direct = build(pairs, tokenizer, test_size=0.3, validation_size=0.2)
    assert not isinstance(direct, DataError)
    assert from_file.task_names == direct.task_names
    for split in SPLITS:
        assert split_documents(from_file, split) == split_documents(direct, split)

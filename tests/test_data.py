"""The data pipeline: token convention, per-task seeded splits, mixed-task batches."""

import json
from pathlib import Path

import pytest
import torch

from bora_pyro import MultiTaskCorpus, load_tokenizer
from bora_pyro.data import split_sizes
from bora_pyro.errors import DataError
from conftest import make_tokenizer, synthetic_records


@pytest.fixture
def tokenizer():
    tokenizer = make_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pairs(num_tasks=3, docs_per_task=12):
    return [(r["speaker"], r["line"]) for r in synthetic_records(num_tasks, docs_per_task)]


def test_documents_are_tokens_plus_eos_truncated(tokenizer):
    corpus = MultiTaskCorpus([("a", "w1 w2 w3"), ("a", "w4 " * 50)], tokenizer, max_length=8, test_size=0.0)
    documents = sorted(corpus.train.documents, key=len)
    assert documents[0] == tokenizer("w1 w2 w3")["input_ids"] + [tokenizer.eos_token_id]
    assert len(documents[1]) == 8


def test_split_is_per_task_seeded_and_independent_of_other_tasks(tokenizer):
    corpus = MultiTaskCorpus(pairs(), tokenizer, test_size=0.25, validation_size=0.2, seed=3)
    assert corpus.counts() == {f"task{d}": {"train_docs": 7, "validation_docs": 2, "test_docs": 3} for d in range(3)}
    again = MultiTaskCorpus(sorted(pairs(), key=lambda p: p[0], reverse=True), tokenizer, test_size=0.25, validation_size=0.2, seed=3)
    fewer = MultiTaskCorpus([p for p in pairs() if p[0] != "task2"], tokenizer, test_size=0.25, validation_size=0.2, seed=3)
    task0 = lambda c: sorted(doc for doc, t in zip(c.test.documents, c.test.task_ids) if t == 0)  # noqa: E731
    assert task0(corpus) == task0(again) == task0(fewer)
    other_seed = MultiTaskCorpus(pairs(), tokenizer, test_size=0.25, validation_size=0.2, seed=4)
    assert task0(other_seed) != task0(corpus)


def test_split_policy_keeps_a_training_document():
    assert split_sizes(1, 0.33, 0.1) == (1, 0, 0)
    assert split_sizes(2, 0.5, 0.5) == (1, 0, 1)
    assert split_sizes(100, 0.33, 0.1) == (60, 7, 33)


def test_batches_mix_tasks_and_carry_doc_ids(tokenizer):
    corpus = MultiTaskCorpus(pairs(), tokenizer, test_size=0.25)
    batches = list(corpus.train.batches(5, corpus.pad_token_id))
    assert sum(len(b.doc_ids) for b in batches) == len(corpus.train) == 27
    batch = batches[0]
    assert batch.num_docs == 27 and batch.input_ids.shape[0] == 5
    assert batch.task_ids.tolist() == [corpus.train.task_ids[i] for i in batch.doc_ids.tolist()]
    lengths = batch.attention_mask.sum(-1)
    for row, i in enumerate(batch.doc_ids.tolist()):
        assert batch.input_ids[row, : lengths[row]].tolist() == corpus.train.documents[i]
    assert batch.num_predicted_tokens == int((lengths - 1).sum())


def test_from_file_jsonl_csv_and_errors(tmp_path, gpt2_dir):
    tokenizer = load_tokenizer(gpt2_dir)  # has no pad token on disk: set to EOS
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    records = synthetic_records(2, 5)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    csv = tmp_path / "d.csv"
    csv.write_text("speaker,line\n" + "".join(f"{r['speaker']},{r['line']}\n" for r in records))
    for path in (jsonl, csv):
        corpus = MultiTaskCorpus.from_file(path, tokenizer, task_field="speaker", text_field="line")
        assert corpus.task_names == ["task0", "task1"] and len(corpus.documents("all")) == 10
    with pytest.raises(DataError, match="no column 'text'.*--task-field/--text-field"):
        MultiTaskCorpus.from_file(jsonl, tokenizer, task_field="speaker")
    with pytest.raises(DataError, match="does not exist"):
        MultiTaskCorpus.from_file(tmp_path / "nope.jsonl", tokenizer)
    with pytest.raises(DataError, match="not fitted on"):
        MultiTaskCorpus.from_file(jsonl, tokenizer, task_field="speaker", text_field="line", task_names=["task0"])


@pytest.mark.parametrize("num_docs, batch_size", [(23, 6), (5, 8)])
def test_training_batches_are_full_and_weigh_every_document_alike(tokenizer, num_docs, batch_size):
    """B ∤ N: the epoch's last batch is filled with documents drawn uniformly, so every row weighs
    N/B and each document's expected weight per step, E[(N/B)·count] / steps, is exactly 1. A short
    last batch of r rows would weigh its rows N/r, and length grouping puts the longest there."""
    texts = [" ".join(["w1"] * (1 + n)) for n in range(num_docs)]  # document n is the (n+1)-th longest
    documents = MultiTaskCorpus([("a", text) for text in texts], tokenizer, test_size=0.0).train
    generator = torch.Generator().manual_seed(0)
    epochs, steps_per_epoch = 3000, -(-num_docs // batch_size)
    weights = torch.zeros(num_docs, dtype=torch.float64)
    for _ in range(epochs):
        batches = list(documents.batches(batch_size, 0, shuffle=True, generator=generator))
        assert len(batches) == steps_per_epoch and all(len(b.doc_ids) == batch_size for b in batches)
        counts = torch.bincount(torch.cat([b.doc_ids for b in batches]), minlength=num_docs)
        assert bool((counts >= 1).all())  # every document once, then the fill
        weights += counts * num_docs / batch_size
    weights /= epochs * steps_per_epoch
    assert float(weights.sum()) == pytest.approx(num_docs)  # exact: N/B per row, B rows a step
    assert float((weights - 1).abs().max()) < 0.03  # the longest documents included (the old max was 1.19)


def split_documents(corpus) -> dict:
    return {split: (list(map(list, corpus.documents(split).documents)), list(corpus.documents(split).task_ids))
            for split in ("train", "validation", "test")}


def test_parquet_and_saved_dataset_read_like_jsonl(tmp_path, tokenizer):
    """The same rows as .jsonl, .parquet and a save_to_disk folder give the same corpus; the
    tokenised copy is cached: a second read of the file adds no Arrow file."""
    import datasets

    records = synthetic_records(3, 12)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = datasets.Dataset.from_list(records)
    dataset.to_parquet(tmp_path / "data.parquet")
    dataset.save_to_disk(tmp_path / "saved")
    read = {path: MultiTaskCorpus.from_file(tmp_path / path, tokenizer, task_field="speaker", text_field="line",
                                            validation_size=0.2, cache_dir=tmp_path / "cache")
            for path in ("data.jsonl", "data.parquet", "saved")}
    assert split_documents(read["data.parquet"]) == split_documents(read["data.jsonl"]) == split_documents(read["saved"])
    assert read["saved"].task_names == ["task0", "task1", "task2"]
    cached = sorted((tmp_path / "cache").rglob("*.arrow"))
    assert cached  # datasets' Arrow copy of the file and its tokenised columns
    MultiTaskCorpus.from_file(jsonl, tokenizer, task_field="speaker", text_field="line", validation_size=0.2,
                              cache_dir=tmp_path / "cache")
    assert sorted((tmp_path / "cache").rglob("*.arrow")) == cached
    short = MultiTaskCorpus.from_file(jsonl, tokenizer, task_field="speaker", text_field="line", validation_size=0.2,
                                      cache_dir=tmp_path / "cache", max_length=3)  # another key: tokenised again
    assert max(map(len, short.train.documents)) == 3 and len(sorted((tmp_path / "cache").rglob("*.arrow"))) > len(cached)


def test_the_cli_fits_a_parquet_file_and_a_saved_dataset_like_the_jsonl(tmp_path, gpt2_dir, capsys):
    import datasets

    from bora_pyro.cli import main

    records = synthetic_records(3, 12)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    datasets.Dataset.from_list(records).to_parquet(tmp_path / "data.parquet")
    datasets.Dataset.from_list(records).save_to_disk(tmp_path / "saved")
    reports = {}
    for data in ("data.jsonl", "data.parquet", "saved"):
        out = tmp_path / f"run-{data}"
        assert main(["fit", "--model", gpt2_dir, "--data", str(tmp_path / data), "--task-field", "speaker",
                     "--text-field", "line", "--rank", "2", "--steps", "3", "--batch-size", "4", "--max-length", "32",
                     "--out", str(out), "--quiet"]) == 0
        reports[data] = json.loads((out / "metrics.json").read_text())["test"]
    assert reports["data.parquet"] == reports["data.jsonl"] == reports["saved"]


def test_token_table_indexes_and_gathers_like_a_list():
    import numpy as np

    from bora_pyro.data import TokenTable

    documents = [[5, 6, 7], [], [8], [9, 10]]
    table = TokenTable.from_offsets(np.array([5, 6, 7, 8, 9, 10], dtype=np.int32), np.array([0, 3, 3, 4, 6]))
    assert list(table) == documents and len(table) == 4 and table[-1] == [9, 10]
    with pytest.raises(IndexError):
        table[4]
    assert list(table.gather(np.array([3, 0, 2, 1]))) == [documents[i] for i in (3, 0, 2, 1)]
    assert list(table.gather(np.array([], dtype=np.int64))) == []


def test_datasets_edge_cases_read_as_the_python_reader_did(tmp_path, tokenizer):
    """Tasks of mixed JSON types are ``str(task)``; a CSV row with extra fields keeps its first
    columns; a filtered dataset is read as filtered; two saved datasets that datasets gives the
    same fingerprint (built by from_generator) still get their own tokens."""
    import datasets

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"task": 3, "text": "w1"}\n{"task": "b", "text": "w2"}\n{"task": 1.0, "text": "w3"}\n'
                     '{"task": true, "text": "w4"}\n')
    corpus = MultiTaskCorpus.from_file(mixed, tokenizer, test_size=0.0, cache_dir=tmp_path / "cache")
    assert corpus.task_names == sorted(["3", "b", "1.0", "True"])
    extra = tmp_path / "extra.csv"
    extra.write_text("task,text\na,w1 w2,1\nb,w3,2\n")
    with pytest.warns(Warning):  # pandas says it drops the extra fields
        corpus = MultiTaskCorpus.from_file(extra, tokenizer, test_size=0.0, cache_dir=tmp_path / "cache")
    assert corpus.task_names == ["a", "b"]
    filtered = datasets.Dataset.from_dict({"task": ["a", None, "b"], "text": ["w1", "w2", "w3"]})
    corpus = MultiTaskCorpus.from_dataset(filtered.filter(lambda row: row["task"] is not None), tokenizer, test_size=0.0)
    assert corpus.task_names == ["a", "b"]

    def rows(path):
        yield from ({"task": "a", "text": text} for text in Path(path).read_text().splitlines())

    source = tmp_path / "source.txt"
    for n, text in enumerate(("w0 w1", "w2 w3 w4")):  # the same generator and arguments: the same fingerprint
        source.write_text(text + "\n")
        datasets.Dataset.from_generator(rows, gen_kwargs={"path": str(source)}, cache_dir=str(tmp_path / f"generated{n}")) \
            .save_to_disk(tmp_path / f"saved{n}")
    assert len({datasets.load_from_disk(tmp_path / f"saved{n}")._fingerprint for n in range(2)}) == 1
    read = [list(MultiTaskCorpus.from_file(tmp_path / f"saved{n}", tokenizer, test_size=0.0,
                                           cache_dir=tmp_path / "cache").train.documents) for n in range(2)]
    assert read == [[tokenizer("w0 w1")["input_ids"] + [tokenizer.eos_token_id]],
                    [tokenizer("w2 w3 w4")["input_ids"] + [tokenizer.eos_token_id]]]

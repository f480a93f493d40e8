"""Every way to get it wrong ends in a one-line message that names the problem and the fix: exit
code ≠ 0 from the CLI, a specific exception from the API, and nothing in the run directory lost.

``ERRORS`` is the one list of these messages: every test checks its error against an entry, and
README's "Errors you may see" table is generated from it (``test_readme_lists_every_error``).
"""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pyro.distributions
import pytest
import safetensors.torch
import torch
from tokenizers import Regex, normalizers
from transformers import (
    AutoTokenizer, BertConfig, BertModel, GPT2Config, PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config,
    Qwen2ForCausalLM, T5Config,
)

from bora_pyro import (
    BoRAError, CheckpointError, ConfigError, DataError, DataWarning, FitError, FitInterrupted, ModelError,
    MultiTaskCorpus, MultiTaskLM, RunConfig, WriteError, fit, load_run, load_tokenizer,
)
from bora_pyro import adapted_lm, distributed
from bora_pyro.cli import main
from bora_pyro.guides import map_guide
from bora_pyro.models import BoRA, HierarchicalNormal
from bora_pyro.run import CHECKPOINT_FILE, GUIDE_FILE, load_checkpoint, save_checkpoint
from conftest import VOCAB_SIZE, make_tokenizer, save_tiny_model, synthetic_records
from test_persistence import as_format_1

README = Path(__file__).resolve().parent.parent / "README.md"
fit_module = importlib.import_module("bora_pyro.fit")  # the module: ``bora_pyro.fit`` is also the function

#: key → (when it happens, an excerpt of the message naming the problem, an excerpt naming the fix).
ERRORS: dict[str, tuple[str, str, str]] = {
    # data
    "missing-data": ("`--data` file does not exist", "does not exist", "check the --data path"),
    "empty-data": ("empty data file", "is empty", "it needs one document per row"),
    "bad-extension": ("data file that is not .jsonl, .json, .csv, .parquet or a `save_to_disk` folder", "cannot read",
                      "use a .jsonl, .json, .csv or .parquet file, or a folder written by Dataset.save_to_disk"),
    "bad-json": ("a line that is not JSON", "not valid JSON", "holds one JSON object per line"),
    "non-finite-json": ("`NaN` or `Infinity` in a JSON data file (Python reads them, JSON has none)",
                        "JSON has no NaN or Infinity", "write it as null or as a string"),
    "not-a-dataset": ("a `--data` folder that `Dataset.save_to_disk` did not write", "cannot read the folder",
                      "--data takes a .jsonl, .json, .csv or .parquet file"),
    "dataset-dict": ("a `--data` folder of a saved `DatasetDict` (several splits)", "holds a DatasetDict",
                     "save one split"),
    "missing-column": ("no column named by `--task-field`/`--text-field`", "the data has no column",
                       "set --task-field/--text-field"),
    "not-utf8": ("bytes that are not UTF-8", "is not UTF-8 text", "re-save the file as UTF-8"),
    "no-task": ("a row without a task", "has no task", "give every row a task name"),
    "no-text": ("no document has any text", "has any text", "check --text-field"),
    "dropped": ("documents with empty text or no tokens (a warning; the rest is used)", "dropped",
                "tokenise to no tokens"),
    "train-only": ("a task too small for a test document, e.g. of 1 document (a warning)", "get no test document",
                   "a task of 1 document is train-only"),
    "unknown-task": ("`evaluate --data` with a task the run was not fitted on", "that the run was not fitted on",
                     "remove those rows, or fit a run that includes them"),
    "empty-test": ("`evaluate` of a run without test documents", "the run's test split is empty",
                   "score another file with --data FILE"),
    # model
    "missing-model": ("`--model` that does not exist", "cannot load model", "check --model"),
    "no-weights": ("a model folder without weights", "cannot load the weights", "model.save_pretrained"),
    "not-causal": ("a model that is not a causal LM (BERT, T5, ...)", "not a causal LM", "BoRA needs a decoder"),
    "no-tokenizer": ("a model folder without a tokenizer", "cannot load the tokenizer",
                     "save one with tokenizer.save_pretrained"),
    "ignored-tokenizer-json": ("a `tokenizer.json` that transformers ignores for the model type (e.g. qwen2) and "
                               "that cannot be loaded by itself", "ignores the folder's tokenizer.json",
                               "so that PreTrainedTokenizerFast(tokenizer_file=...) loads it"),
    "missing-gguf": ("a `.gguf` `--model` that does not exist", "GGUF file", "check the --model path"),
    "several-gguf": ("a `--model` folder without config.json that holds several `.gguf` files", "GGUF files",
                     "pass the one to use as --model"),
    "gguf-extra": ("a GGUF `--model` without the `gguf` package", "needs the gguf package",
                   "pip install 'bora-pyro[gguf]'"),
    "bad-gguf": ("a `.gguf` file that transformers cannot read", "cannot read the GGUF file",
                 "transformers reads GGUF files of the architectures its docs list"),
    "vocabulary": ("a tokenizer with more tokens than the model's embedding", "the tokenizer has",
                   "use the model's own tokenizer"),
    "target-modules": ("`--target-modules` absent from the model", "none of the target modules",
                       "available linear modules"),
    "rank": ("`--rank` larger than a module's dimensions", "exceeds the dimensions", "use --rank ≤"),
    "max-length": ("`--max-length` beyond the model's context", "exceeds the model's context", "use --max-length ≤"),
    # settings
    "tau": ("`--tau` ≤ 0 or nan", "tau must be a positive finite number", "use --prior independent for τ = 0"),
    "lr": ("`--lr` ≤ 0 or nan", "the learning rate must be a positive number", "e.g. --lr 1e-3"),
    "batch-size": ("`--batch-size 0`", "the batch size must be ≥ 1", "e.g. --batch-size 8"),
    "steps-and-epochs": ("both `--steps` and `--epochs`", "not allowed with argument --steps",
                         "see bora-pyro fit --help"),
    "one-length": ("`fit(...)` with both or neither of steps and epochs", "give exactly one of",
                   "--steps and --epochs"),
    "missing-flags": ("`fit` without `--model`, `--data`, `--out` or a length", "fit needs",
                      "or --resume RUN_DIR to continue a run"),
    "cuda": ("`--device cuda` without CUDA", "CUDA is not available", "use --device cpu"),
    "device": ("a device torch does not know", "unknown device", "use cpu, cuda or cuda:N"),
    "run-exists": ("`--out` that already holds a run", "already holds a run", "continue it with --resume"),
    "resume-flags": ("`--resume` with settings other than `--lr`/`--device`", "continues the run with the settings",
                     "only --lr, --lr-per-tau, --device and --quiet may change"),
    "map-learned-tau": ("MAP (`--guide map`, `map_guide`) with a learned τ (`--tau-prior`)",
                        "every task collapses onto Θ", "mean-field"),
    "torchrun-gpu": ("`--device cuda:N` under `torchrun` with several processes", "every process needs its own GPU",
                     "pass --device cuda"),
    # faults
    "nan": ("the loss or its gradient becomes nan/inf", "became nan or inf at step", "lower the learning rate"),
    "interrupted": ("Ctrl-C (SIGINT) or SIGTERM during `fit`: exit code 130", "interrupted after step",
                    "continue with bora-pyro fit --resume"),
    "write": ("disk full or read-only folder during a save", "cannot write",
              "its previous version is intact: free disk space or make the folder writable"),
    "merged-write": ("disk full or read-only folder during `export --format merged`", "cannot write the merged model",
                     "nothing of it was left there: free disk space or make the folder writable"),
    "out-dir": ("`--out` that cannot be created", "cannot create the folder", "choose a writable --out"),
    "no-checkpoint": ("`--resume` of a run stopped before its first checkpoint", "has no checkpoint yet",
                      "fit it again with --out"),
    "corrupt-file": ("a truncated or corrupt checkpoint or guide file", "the file is truncated or corrupt",
                     "restore it, or fit the run again"),
    "not-run-dir": ("a folder that is not a run directory", "is not a run directory", "pass the --out folder of a fit"),
    "bad-config": ("a corrupt `config.json`", "is not a valid run config", "fit the run again"),
    "mixed-files": ("a guide file of another run, or of an older bora-pyro", "does not match the run's config.json",
                    "restore this run's own file, or fit the run again"),
    "other-base": ("a run used with another base model", "fitted on a different base model",
                   "load it with the base model it was fitted on"),
    "newer-version": ("a run written by another major version", "was written by bora-pyro",
                      "load it with that major version"),
    "newer-format": ("a run directory of a format this bora-pyro cannot read (a newer one wrote it)",
                     "is of run-directory format", "load the run with the bora-pyro that wrote it"),
    "old-checkpoint": ("`--resume` of a mean-field or hybrid run of format 1 (scales stored as softplus⁻¹ σ)",
                       "the optimizer state of those scales cannot be converted", "or fit the run again with --out"),
    # posterior predictive
    "bad-samples": ("`predict --samples` below 1", "--samples must be ≥ 1", "e.g. --samples 32"),
    "bad-interval": ("`predict --interval` outside (0, 1)", "--interval must be between 0 and 1",
                     "e.g. --interval 0.9"),
    "generate-unknown-task": ("`generate --task` the run was not fitted on", "unknown task",
                              "or --new-task for an unseen one"),
    "empty-prompt": ("`generate --prompt ''`", "the prompt is empty", "give it some text"),
    "no-global-adapter": ("`generate --global` for a run without global factors (`--prior independent`)",
                          "has no global adapter", "use a task's adapter (--task NAME)"),
    "generation-flags": ("generation flags that transformers refuses (e.g. more return sequences than beams)",
                         "invalid generation flags", "change them as it says"),
}


# ---------------------------------------------------------------------------------------------
# helpers


def expect(message: str, key: str) -> None:
    """``message`` is one line with ``ERRORS[key]``'s excerpts of the problem and of the fix."""
    _, problem, fix = ERRORS[key]
    assert "\n" not in message.strip(), message
    assert problem in message and fix in message, (key, message)


def api_error(error_type: type[BaseException], key: str, function, *args, **kwargs) -> BaseException:
    with pytest.raises(error_type) as info:
        function(*args, **kwargs)
    expect(str(info.value), key)
    return info.value


def cli(args, capsys) -> tuple[int, str]:
    """Exit code and stderr of ``bora-pyro ARGS`` (argparse's own errors included)."""
    capsys.readouterr()
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def cli_error(args, capsys, key: str, code: int = 2) -> str:
    """Run the CLI, which must fail with ``code`` and one error line (after any one-line warnings)."""
    got, err = cli(args, capsys)
    lines = err.strip().splitlines()
    assert got == code and "Traceback" not in err, err
    assert lines and all(": warning: " in line for line in lines[:-1]), err
    expect(lines[-1], key)
    return lines[-1]


def fit_args(model_dir, data, out, steps=12, *extra) -> list[str]:
    return ["fit", "--model", str(model_dir), "--data", str(data), "--task-field", "speaker", "--text-field", "line",
            "--rank", "2", "--steps", str(steps), "--batch-size", "8", "--eval-every", "4", "--lr", "0.05",
            "--max-length", "32", "--out", str(out), "--quiet", *map(str, extra)]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes."""
    return {path.name: path.read_bytes() for path in sorted(Path(run_dir).iterdir())}


def data_warnings(record) -> list[str]:
    """The messages of the DataWarnings among recorded warnings."""
    return [str(warning.message) for warning in record if issubclass(warning.category, DataWarning)]


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def run_template(tmp_path_factory, gpt2_dir) -> Path:
    """A fitted run (12 steps, checkpoints at 4, 8, 12), fitted once per module."""
    root = tmp_path_factory.mktemp("template")
    data = write_records(root / "data.jsonl", synthetic_records())
    assert main(fit_args(gpt2_dir, data, root / "run", 12)) == 0
    return root / "run"


@pytest.fixture
def run_dir(run_template, tmp_path) -> Path:
    """A fresh copy of the fitted run."""
    return Path(shutil.copytree(run_template, tmp_path / "run"))


@pytest.fixture
def data(tmp_path) -> Path:
    return write_records(tmp_path / "data.jsonl", synthetic_records())


@pytest.fixture(scope="module")
def wordless_tokenizer_dir(tmp_path_factory, gpt2_dir) -> Path:
    """The tiny GPT-2 with a tokenizer that drops every character but w, digits and whitespace, so
    that a text like "?!" tokenises to no tokens."""
    folder = Path(shutil.copytree(gpt2_dir, tmp_path_factory.mktemp("wordless") / "model"))
    tokenizer = make_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace(Regex(r"[^w0-9\s]"), "")
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# data

BAD_FILES = {
    "empty-data": ("data.jsonl", b""),
    "bad-extension": ("data.txt", b"speaker,line\na,w1\n"),
    "bad-json": ("data.jsonl", b'{"speaker": "a", "line": "w1 w2"}\n{"speaker": "b", oops}\n'),
    "missing-column": ("data.jsonl", b'{"speaker": "a", "text": "w1 w2"}\n'),
    "not-utf8": ("data.csv", b"speaker,line\na,caf\xe9 w1\n"),
    "no-task": ("data.jsonl", b'{"line": "w1 w2"}\n{"speaker": "a", "line": "w3"}\n'),
    "no-text": ("data.csv", b'speaker,line\na,""\nb,   \n'),
    "non-finite-json": ("data.jsonl", b'{"speaker": "a", "line": "w1 NaN"}\n'
                                      b'{"speaker": "b", "line": "w2", "x": NaN}\n'),
}


@pytest.mark.parametrize("key", sorted(BAD_FILES))
def test_bad_data_files(key, tmp_path, gpt2_dir, capsys):
    name, content = BAD_FILES[key]
    path = tmp_path / name
    path.write_bytes(content)
    tokenizer = load_tokenizer(gpt2_dir)
    api_error(DataError, key, MultiTaskCorpus.from_file, path, tokenizer, task_field="speaker", text_field="line")
    out = tmp_path / "run"
    cli_error(fit_args(gpt2_dir, path, out), capsys, key)
    assert not out.exists()  # nothing written for a fit that could not start


@pytest.mark.parametrize("key", ["not-a-dataset", "dataset-dict"])
def test_bad_data_folders(key, tmp_path, gpt2_dir, capsys):
    import datasets

    path = tmp_path / "data"
    path.mkdir()
    if key == "dataset-dict":
        rows = datasets.Dataset.from_dict({"speaker": ["a", "b"], "line": ["w1", "w2"]})
        datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk(path)
    api_error(DataError, key, MultiTaskCorpus.from_file, path, load_tokenizer(gpt2_dir))
    out = tmp_path / "run"
    cli_error(fit_args(gpt2_dir, path, out), capsys, key)
    assert not out.exists()


def test_missing_data_file(tmp_path, gpt2_dir, capsys):
    missing = tmp_path / "missing.jsonl"
    api_error(DataError, "missing-data", MultiTaskCorpus.from_file, missing, load_tokenizer(gpt2_dir))
    cli_error(fit_args(gpt2_dir, missing, tmp_path / "run"), capsys, "missing-data")


def test_non_utf8_jsonl_names_the_line(tmp_path, gpt2_dir):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"task": "a", "text": "w1"}\n{"task": "a", "text": "na\xefve"}\n')
    error = api_error(DataError, "not-utf8", MultiTaskCorpus.from_file, path, load_tokenizer(gpt2_dir))
    assert "byte 0xef on line 2" in str(error)


def test_nan_and_infinity_name_their_line(tmp_path, gpt2_dir):
    path = tmp_path / "array.json"  # "Infinity" in a string is text; -Infinity on line 4 is a number JSON does not have
    path.write_text('[\n {"speaker": "a", "line": "w1 Infinity"},\n {"speaker": "b",\n'
                    '  "line": "w2", "x": -Infinity}\n]\n')
    error = api_error(DataError, "non-finite-json", MultiTaskCorpus.from_file, path, load_tokenizer(gpt2_dir),
                      task_field="speaker", text_field="line")
    assert f"{path}, line 4: -Infinity is not a JSON number" in str(error)


def test_a_utf8_bom_and_a_json_array_are_read(tmp_path, gpt2_dir):
    records = synthetic_records(2, 4)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfspeaker,line\n" + "".join(f"{r['speaker']},{r['line']}\n" for r in records).encode())
    array = tmp_path / "array.json"
    array.write_text(json.dumps(records, indent=1))
    for path in (bom, array):
        corpus = MultiTaskCorpus.from_file(path, load_tokenizer(gpt2_dir), task_field="speaker", text_field="line")
        assert len(corpus.documents("all")) == 8


def test_empty_and_zero_token_documents_are_dropped_and_counted(wordless_tokenizer_dir, tmp_path, capsys):
    records = synthetic_records(3, 12) + [{"speaker": "task0", "line": ""}, {"speaker": "task1", "line": "?! ..."},
                                          {"speaker": "task2", "line": None}]
    tokenizer = load_tokenizer(wordless_tokenizer_dir)
    with pytest.warns(DataWarning) as warned:
        corpus = MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], tokenizer)
    [message] = data_warnings(warned)
    expect(message, "dropped")
    assert "dropped 3 of 39 documents: 2 with empty text, 1 that tokenise" in message
    assert corpus.num_dropped == 3 and len(corpus.documents("all")) == 36
    api_error(DataError, "no-text", MultiTaskCorpus, [("a", "?!"), ("b", "")], tokenizer)

    data = write_records(tmp_path / "data.jsonl", records)
    code, err = cli(fit_args(wordless_tokenizer_dir, data, tmp_path / "run", 4), capsys)
    assert code == 0, err
    [warning] = [line for line in err.splitlines() if "warning:" in line and "step cap" not in line]
    expect(warning, "dropped")


def test_a_one_document_task_is_train_only_and_says_so(gpt2_dir, tmp_path, capsys):
    records = synthetic_records(3, 12) + [{"speaker": "solo", "line": "w1 w2 w3"}]
    with pytest.warns(DataWarning) as warned:
        corpus = MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir),
                                 test_size=0.25, validation_size=0.2)
    [message] = data_warnings(warned)
    expect(message, "train-only")
    assert "['solo']" in message
    assert corpus.counts()["solo"] == {"train_docs": 1, "validation_docs": 0, "test_docs": 0}

    out = tmp_path / "run"
    code, err = cli(fit_args(gpt2_dir, write_records(tmp_path / "data.jsonl", records), out, 4), capsys)
    assert code == 0, err
    [warning] = [line for line in err.splitlines() if "warning:" in line and "step cap" not in line]
    expect(warning, "train-only")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"]["solo"]["train_docs"] == 1 and "solo" not in metrics["test"]["tasks"]


def test_a_task_seen_only_at_predict_time(run_dir, gpt2_dir, tmp_path, capsys):
    records = synthetic_records(3, 4)
    records[0]["speaker"] = "newcomer"
    other = write_records(tmp_path / "other.jsonl", records)
    before = snapshot(run_dir)
    error = cli_error(["evaluate", run_dir, "--data", other], capsys, "unknown-task")
    assert "'newcomer'" in error
    assert snapshot(run_dir) == before
    pairs = [(r["speaker"], r["line"]) for r in records]
    api_error(DataError, "unknown-task", MultiTaskCorpus, pairs, load_tokenizer(gpt2_dir),
              task_names=["task0", "task1", "task2"])


def test_evaluate_without_test_documents(gpt2_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = cli(fit_args(gpt2_dir, data, out, 4, "--test-size", "0"), capsys)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["test"] is None
    cli_error(["evaluate", out], capsys, "empty-test")


# ---------------------------------------------------------------------------------------------
# model


@pytest.fixture(scope="module")
def bad_model_dirs(tmp_path_factory, gpt2_dir) -> dict[str, Path]:
    """key → a folder holding a model that cannot be used."""
    root = tmp_path_factory.mktemp("bad_models")
    bert = BertConfig(vocab_size=42, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(bert).save_pretrained(root / "bert")
    make_tokenizer().save_pretrained(root / "bert")
    T5Config(vocab_size=42, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32).save_pretrained(root / "t5")
    GPT2Config(vocab_size=42, n_embd=16, n_layer=1, n_head=2).save_pretrained(root / "no_weights")
    no_tokenizer = Path(shutil.copytree(gpt2_dir, root / "no_tokenizer"))
    for path in no_tokenizer.iterdir():
        if "token" in path.name or path.name in ("vocab.json", "merges.txt"):
            path.unlink()
    big_vocabulary = Path(shutil.copytree(gpt2_dir, root / "big_vocabulary"))
    tokenizer = make_tokenizer()
    tokenizer.add_tokens([f"extra{i}" for i in range(20)])
    tokenizer.save_pretrained(big_vocabulary)
    return {"missing-model": root / "missing", "not-causal": root / "bert", "no-weights": root / "no_weights",
            "no-tokenizer": no_tokenizer, "vocabulary": big_vocabulary, "t5": root / "t5"}


@pytest.mark.parametrize("key", ["missing-model", "not-causal", "no-weights", "t5"])
def test_unusable_models(key, bad_model_dirs, data, tmp_path, capsys):
    expected = "not-causal" if key == "t5" else key
    api_error(ModelError, expected, MultiTaskLM.from_pretrained, bad_model_dirs[key], rank=2)
    cli_error(fit_args(bad_model_dirs[key], data, tmp_path / "run"), capsys, expected)


@pytest.mark.parametrize("key", ["missing-gguf", "several-gguf", "gguf-extra", "bad-gguf"])
def test_unusable_gguf_files(key, data, tmp_path, monkeypatch, capsys):
    """Nothing is left in the conversion cache after any of them."""
    from bora_pyro import gguf

    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "models").mkdir()
    path = tmp_path / "models" / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(12))  # too short for the header
    if key == "missing-gguf":
        path.unlink()
    elif key == "several-gguf":
        (tmp_path / "models" / "other.gguf").write_bytes(b"")
        path = path.parent
    elif key == "gguf-extra":
        monkeypatch.setattr(gguf, "has_gguf_package", lambda: False)
    api_error(ModelError, key, MultiTaskLM.from_pretrained, path, rank=2)
    cli_error(fit_args(path, data, tmp_path / "run"), capsys, key)
    assert not [path for path in (tmp_path / "cache").glob("gguf/*") if path.is_dir()]  # no folder, whole or half


@pytest.mark.parametrize("key", ["no-tokenizer", "vocabulary"])
def test_unusable_tokenizers(key, bad_model_dirs, data, tmp_path, capsys):
    if key == "no-tokenizer":
        api_error(ModelError, key, load_tokenizer, bad_model_dirs[key])
    cli_error(fit_args(bad_model_dirs[key], data, tmp_path / "run"), capsys, key)


@pytest.mark.parametrize("key, flags", [
    ("target-modules", ["--target-modules", "q_proj", "v_proj"]),
    ("rank", ["--rank", "64"]),
    ("max-length", ["--max-length", "1000"]),
])
def test_adapter_settings_that_do_not_fit_the_model(key, flags, gpt2_dir, data, tmp_path, capsys):
    error = cli_error(fit_args(gpt2_dir, data, tmp_path / "run") + flags, capsys, key)
    if key == "target-modules":
        assert "c_attn" in error and "c_fc" in error  # the available ones are listed
        api_error(ConfigError, key, MultiTaskLM.from_pretrained, gpt2_dir, target_modules=["q_proj"])
    if key == "rank":
        api_error(ConfigError, key, MultiTaskLM.from_pretrained, gpt2_dir, rank=64)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    """A tiny qwen2 model with the word-level tokenizer, for which transformers 5's AutoTokenizer
    builds a Qwen2Tokenizer that ignores the folder's tokenizer.json (every text: no tokens)."""
    folder = tmp_path_factory.mktemp("qwen2") / "model"
    config = Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_a_tokenizer_json_that_auto_tokenizer_ignores_is_loaded_by_itself(qwen2_dir, data, tmp_path, capsys):
    tokenizer = load_tokenizer(qwen2_dir)
    assert tokenizer("w1 w2 w39")["input_ids"] == make_tokenizer()("w1 w2 w39")["input_ids"] == [3, 4, 41]
    assert (tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) == ("<eos>", "<unk>", "<eos>")
    code, err = cli(fit_args(qwen2_dir, data, tmp_path / "run", 4), capsys)
    assert code == 0, err


def test_a_tokenizer_that_finds_no_tokens_where_tokenizer_json_does(monkeypatch, gpt2_dir, data, tmp_path, capsys):
    """Whatever the model type: a tokenizer that ignores the folder's tokenizer.json is replaced by
    the file, or, if the file cannot be loaded by itself, that is the error."""
    empty = make_tokenizer()
    empty.backend_tokenizer.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")  # every text: no tokens
    monkeypatch.setattr(adapted_lm, "AutoTokenizer", type("Auto", (), {"from_pretrained": lambda path: empty}))
    assert load_tokenizer(gpt2_dir)("w1 w2 w39")["input_ids"] == [3, 4, 41]

    def unloadable(self, *args, **kwargs):
        raise ValueError("the file is broken")

    monkeypatch.setattr(PreTrainedTokenizerFast, "__init__", unloadable)
    error = api_error(ModelError, "ignored-tokenizer-json", load_tokenizer, gpt2_dir)
    assert "the file is broken" in str(error)
    cli_error(fit_args(gpt2_dir, data, tmp_path / "run"), capsys, "ignored-tokenizer-json")


def test_a_tokenizer_without_pad_token_pads_with_eos(gpt2_dir, data, tmp_path, capsys):
    assert AutoTokenizer.from_pretrained(gpt2_dir).pad_token is None
    tokenizer = load_tokenizer(gpt2_dir)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None
    code, err = cli(fit_args(gpt2_dir, data, tmp_path / "run", 4), capsys)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize("key, flags", [
    ("tau", ["--tau", "-1"]), ("tau", ["--tau", "nan"]), ("tau", ["--tau", "0"]),
    ("lr", ["--lr", "0"]), ("lr", ["--lr", "-0.1"]), ("lr", ["--lr", "nan"]),
    ("batch-size", ["--batch-size", "0"]),
    ("steps-and-epochs", ["--epochs", "2"]),
    ("device", ["--device", "tpu9"]),
])
def test_bad_settings_fail_before_anything_is_loaded_or_written(key, flags, gpt2_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    cli_error(fit_args(gpt2_dir, data, out) + flags, capsys, key)
    assert not out.exists()


def test_missing_flags(gpt2_dir, capsys):
    cli_error(["fit", "--model", gpt2_dir], capsys, "missing-flags")


def test_bad_settings_from_python(gpt2_dir):
    config = RunConfig(model=gpt2_dir, steps=4)
    for key, change in [("tau", {"tau": -1.0}), ("tau", {"tau": math.nan}), ("lr", {"lr": 0.0}),
                        ("batch-size", {"batch_size": 0}), ("one-length", {"epochs": 1.0}),
                        ("device", {"device": "tpu9"})]:
        api_error(ConfigError, key, RunConfig(**{**config.__dict__, **change}).validate)
    for tau in (-1.0, math.nan):
        with pytest.raises(ConfigError, match="tau must be a positive"):
            HierarchicalNormal(tau)
    corpus = MultiTaskCorpus([(r["speaker"], r["line"]) for r in synthetic_records(2, 6)], load_tokenizer(gpt2_dir))
    model = BoRA(MultiTaskLM.from_pretrained(gpt2_dir, rank=2), HierarchicalNormal(10.0), corpus.num_tasks)
    for key, kwargs in [("lr", {"steps": 2, "lr": 0.0}), ("lr", {"steps": 2, "lr": -1.0}),
                        ("batch-size", {"steps": 2, "batch_size": 0}), ("one-length", {"steps": 2, "epochs": 1.0}),
                        ("one-length", {})]:
        api_error(ConfigError, key, fit, model, map_guide(model), corpus, progress=False, **kwargs)


def test_cuda_without_cuda(monkeypatch, run_dir, gpt2_dir, data, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "new"
    cli_error(fit_args(gpt2_dir, data, out) + ["--device", "cuda"], capsys, "cuda")
    assert not out.exists()
    before = snapshot(run_dir)
    cli_error(["evaluate", run_dir, "--device", "cuda:0"], capsys, "cuda")
    cli_error(["fit", "--resume", run_dir, "--device", "cuda", "--quiet"], capsys, "cuda")
    assert snapshot(run_dir) == before
    api_error(ConfigError, "cuda", load_run, run_dir, device="cuda")
    api_error(ConfigError, "cuda", RunConfig(model=gpt2_dir, steps=1, device="cuda").validate)


def test_map_over_a_learned_tau_is_refused(gpt2_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    cli_error(fit_args(gpt2_dir, data, out, 12, "--tau-prior", "gamma:2,0.02", "--guide", "map"), capsys, "map-learned-tau")
    assert not out.exists()
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2)
    learned = HierarchicalNormal(pyro.distributions.Gamma(2.0, 0.02))
    api_error(ConfigError, "map-learned-tau", map_guide, BoRA(lm, learned, 3))


def test_a_fit_never_overwrites_a_run(run_dir, gpt2_dir, data, capsys):
    before = snapshot(run_dir)
    cli_error(fit_args(gpt2_dir, data, run_dir), capsys, "run-exists")
    error = cli_error(["fit", "--resume", run_dir, "--steps", "50", "--batch-size", "4"], capsys, "resume-flags")
    assert "not --steps, --batch-size" in error
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------------------------------
# faults: nan, SIGINT, failed writes, corrupt files


def nan_loss_at(monkeypatch, bad_step: int, gradient_only: bool = False) -> None:
    """Make the fit's loss (or only its gradient) nan at step ``bad_step``."""
    real = fit_module.Trace_ELBO.differentiable_loss
    calls = []

    def loss(self, model, guide, *args, **kwargs):
        calls.append(1)
        value = real(self, model, guide, *args, **kwargs)
        if len(calls) != bad_step:
            return value
        if gradient_only:  # d/dp sqrt(0·p) = inf·0 = nan, while sqrt(0) = 0
            return value + torch.sqrt(next(iter(guide.parameters())).sum() * 0.0)
        return value * math.nan

    monkeypatch.setattr(fit_module.Trace_ELBO, "differentiable_loss", loss)


def test_nan_loss_keeps_the_last_good_checkpoint_and_resume_with_a_lower_lr(monkeypatch, gpt2_dir, data, tmp_path,
                                                                           capsys):
    out = tmp_path / "run"
    nan_loss_at(monkeypatch, bad_step=6)
    error = cli_error(fit_args(gpt2_dir, data, out), capsys, "nan")
    assert "at step 6" in error and "checkpoint (step 4)" in error and f"--resume {out} --lr 0.005" in error
    state = load_checkpoint(out)
    assert state.step == 4 and all(value.isfinite().all() for value in state.guide.values())
    assert not (out / GUIDE_FILE).exists()
    monkeypatch.undo()
    code, err = cli(["fit", "--resume", out, "--lr", "0.005", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["lr"] == 0.005
    assert load_checkpoint(out).optimizer["param_groups"][0]["lr"] == 0.005


def test_nan_before_the_first_checkpoint(monkeypatch, gpt2_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    nan_loss_at(monkeypatch, bad_step=1)
    error = cli_error(fit_args(gpt2_dir, data, out), capsys, "nan")
    assert "no checkpoint was written yet" in error
    cli_error(["fit", "--resume", out], capsys, "no-checkpoint")
    monkeypatch.undo()
    code, err = cli(fit_args(gpt2_dir, data, out, 4), capsys)  # nothing to lose: the same --out may be reused
    assert code == 0, err


class TinyFit:
    """A 12-step MAP fit with checks at 4, 8, 12 whose checkpoints land in ``states``."""

    def __init__(self, gpt2_dir: str):
        lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
        records = synthetic_records(num_tasks=3, docs_per_task=12)
        self.corpus = MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir),
                                      test_size=0.25, validation_size=0.2)
        self.model = BoRA(lm, HierarchicalNormal(10.0), self.corpus.num_tasks)
        self.guide = map_guide(self.model)
        self.states = []

    def __call__(self, **kwargs) -> dict[str, torch.Tensor]:
        fit(self.model, self.guide, self.corpus, steps=12, batch_size=4, lr=0.05, eval_every=4, seed=3,
            progress=False, on_checkpoint=self.states.append, **kwargs)
        return self.guide.state_dict()


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nan_from_python_raises_fit_error_with_the_step(what, monkeypatch, gpt2_dir):
    tiny = TinyFit(gpt2_dir)
    if what == "loss":  # a nan log-likelihood once the first checkpoint is written: Pyro's validation rejects it
        real = MultiTaskLM.sequence_log_prob
        monkeypatch.setattr(MultiTaskLM, "sequence_log_prob",
                            lambda self, *args: real(self, *args) * (math.nan if tiny.states else 1.0))
    else:
        nan_loss_at(monkeypatch, bad_step=5, gradient_only=True)
    error = api_error(FitError, "nan", tiny)
    assert (error.step, error.checkpoint_step, error.what) == (5, 4, what)
    assert f"the {what} became nan" in str(error)
    assert [state.step for state in tiny.states] == [4]
    assert all(value.isfinite().all() for value in tiny.guide.state_dict().values())


def interrupt_at_batch(number: int, set_attribute=setattr) -> None:
    """Send this process a real SIGINT while the fit draws its ``number``-th batch."""
    real, calls = fit_module.BatchStream.__next__, []

    def next_batch(self):
        calls.append(1)
        if len(calls) == number:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    set_attribute(fit_module.BatchStream, "__next__", next_batch)


def test_sigint_from_python_checkpoints_the_step_and_resume_is_exact(monkeypatch, gpt2_dir):
    uninterrupted = TinyFit(gpt2_dir)()
    handler = signal.getsignal(signal.SIGINT)
    interrupt_at_batch(6, monkeypatch.setattr)
    interrupted = TinyFit(gpt2_dir)
    with pytest.raises(FitInterrupted) as info:
        interrupted()
    assert info.value.step == 6 and [state.step for state in interrupted.states] == [4, 6]
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    monkeypatch.undo()
    resumed = TinyFit(gpt2_dir)(resume=interrupted.states[-1])
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)


def test_sigint_checkpoints_exits_130_and_resume_is_exact(run_template, gpt2_dir, data, tmp_path, capsys):
    out = tmp_path / "interrupted"  # the same fit as run_template's, interrupted
    child = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_bad_input import interrupt_at_batch
        from bora_pyro.cli import main
        interrupt_at_batch(6)
        sys.exit(main({fit_args(gpt2_dir, data, out)!r}))
    """)
    process = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, capture_output=True, timeout=300, text=True)
    assert process.returncode == 130 and "Traceback" not in process.stderr, process.stderr[-3000:]
    message = process.stderr.strip().splitlines()[-1]
    expect(message, "interrupted")
    assert "after step 6" in message and load_checkpoint(out).step == 6
    code, err = cli(["fit", "--resume", out, "--quiet"], capsys)
    assert code == 0, err
    whole, resumed = (safetensors.torch.load_file(path / GUIDE_FILE) for path in (run_template, out))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    history = [json.loads((path / "metrics.json").read_text())["history"] for path in (run_template, out)]
    assert history[0] == history[1]


@pytest.mark.parametrize("failure", ["disk full", "read-only"])
def test_a_failed_save_keeps_the_previous_checkpoint(failure, monkeypatch, gpt2_dir, data, tmp_path, capsys):
    saves = []
    if failure == "disk full":
        real = safetensors.torch.save_file

        def save_file(tensors, path, metadata=None):
            saves.append(path)
            if len(saves) == 2:  # the second checkpoint: half written, then the disk is full
                Path(path).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(tensors, path, metadata=metadata)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    else:
        real = tempfile.mkstemp

        def mkstemp(*args, prefix="", **kwargs):
            saves.append(prefix)
            if prefix.startswith(f".{CHECKPOINT_FILE}") and len([s for s in saves if "checkpoint" in s]) == 2:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real(*args, prefix=prefix, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    out = tmp_path / "run"
    error = cli_error(fit_args(gpt2_dir, data, out), capsys, "write")
    assert str(out / CHECKPOINT_FILE) in error
    assert ("No space left on device" if failure == "disk full" else "Permission denied") in error
    assert load_checkpoint(out).step == 4
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint.safetensors", "config.json"]  # no temp file
    monkeypatch.undo()
    code, err = cli(["fit", "--resume", out, "--quiet"], capsys)
    assert code == 0, err


def test_a_failed_save_from_python(monkeypatch, run_dir):
    state = load_checkpoint(run_dir)
    before = snapshot(run_dir)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    error = api_error(WriteError, "write", save_checkpoint, run_dir, state)
    assert isinstance(error, OSError)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("failure", ["disk full", "read-only"])
def test_a_failed_merged_export_leaves_nothing(failure, monkeypatch, run_dir, tmp_path, capsys):
    real = PreTrainedModel.save_pretrained

    def save_pretrained(self, folder, *args, **kwargs):
        if failure == "read-only":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        real(self, folder, *args, **kwargs)  # the weights are written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)
    out = tmp_path / "exports" / "merged"
    error = cli_error(["export", run_dir, "--task", "task0", "--format", "merged", "--out", out], capsys,
                      "merged-write")
    assert str(out) in error and ("No space left on device" if failure == "disk full" else "Permission denied") in error
    assert list(out.parent.iterdir()) == []  # no half-written model, no temp folder


def test_an_out_dir_that_cannot_be_created(run_dir, gpt2_dir, data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cli_error(fit_args(gpt2_dir, data, blocker / "run"), capsys, "out-dir")
    cli_error(["export", run_dir, "--task", "task0", "--out", blocker / "export"], capsys, "out-dir")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not a checkpoint"])
def test_a_corrupt_checkpoint_is_refused_and_left_alone(damage, run_dir, capsys):
    path = run_dir / CHECKPOINT_FILE
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(1000))
    else:
        safetensors.torch.save_file({"x": torch.zeros(2)}, path)
    before = snapshot(run_dir)
    cli_error(["fit", "--resume", run_dir, "--quiet"], capsys, "corrupt-file")
    api_error(CheckpointError, "corrupt-file", load_checkpoint, run_dir)
    assert snapshot(run_dir) == before


def test_a_corrupt_guide_or_config(run_dir, capsys):
    guide_path, config_path = run_dir / GUIDE_FILE, run_dir / "config.json"
    guide_bytes, config_text = guide_path.read_bytes(), config_path.read_text()
    guide_path.write_bytes(guide_bytes[:-7])
    cli_error(["evaluate", run_dir], capsys, "corrupt-file")
    safetensors.torch.save_file({"x": torch.zeros(2)}, guide_path)
    cli_error(["evaluate", run_dir], capsys, "mixed-files")
    api_error(CheckpointError, "mixed-files", load_run, run_dir)
    guide_path.write_bytes(guide_bytes)
    config_path.write_text(config_text[:-20])
    cli_error(["evaluate", run_dir], capsys, "bad-config")
    cli_error(["fit", "--resume", run_dir], capsys, "bad-config")
    config = json.loads(config_text)
    config["versions"]["bora_pyro"] = "1.0.0"
    config_path.write_text(json.dumps(config))
    cli_error(["evaluate", run_dir], capsys, "newer-version")
    cli_error(["evaluate", run_dir.parent], capsys, "not-run-dir")
    api_error(CheckpointError, "not-run-dir", load_run, run_dir.parent)


def test_a_run_directory_of_a_newer_format(run_dir, capsys):
    config = json.loads((run_dir / "config.json").read_text())
    config["format_version"] = 3
    (run_dir / "config.json").write_text(json.dumps(config))
    before = snapshot(run_dir)
    error = cli_error(["evaluate", run_dir], capsys, "newer-format")
    assert "format 3" in error and "reads formats 1 to 2" in error
    cli_error(["fit", "--resume", run_dir, "--quiet"], capsys, "newer-format")
    api_error(CheckpointError, "newer-format", load_run, run_dir)
    assert snapshot(run_dir) == before


def test_resume_of_a_format_1_mean_field_checkpoint_is_refused(gpt2_dir, data, tmp_path, capsys):
    """Format 1's scales convert exactly (evaluate reads them), their Adam moments do not."""
    out = tmp_path / "run"
    assert main(fit_args(gpt2_dir, data, out, 4, "--guide", "mean-field")) == 0
    code, err = cli(["evaluate", out], capsys)
    assert code == 0, err
    assert as_format_1(out)
    before = snapshot(out)
    cli_error(["fit", "--resume", out, "--quiet"], capsys, "old-checkpoint")
    api_error(CheckpointError, "old-checkpoint", load_checkpoint, out)
    assert snapshot(out) == before
    assert cli(["evaluate", out], capsys) == (code, err)


def test_a_run_of_another_base_model_is_refused(run_dir, tmp_path, capsys):
    config = json.loads((run_dir / "config.json").read_text())
    config["model"] = str(save_tiny_model(tmp_path / "other", "gpt2", seed=1))
    (run_dir / "config.json").write_text(json.dumps(config))
    before = snapshot(run_dir)
    cli_error(["fit", "--resume", run_dir, "--quiet"], capsys, "other-base")
    cli_error(["evaluate", run_dir], capsys, "other-base")
    cli_error(["export", run_dir, "--task", "task0", "--out", tmp_path / "export"], capsys, "other-base")
    api_error(CheckpointError, "other-base", load_run, run_dir)
    assert snapshot(run_dir) == before and not (tmp_path / "export").exists()


@pytest.mark.parametrize("key, flags", [
    ("bad-samples", ["predict", "RUN", "--samples", "0"]),
    ("bad-interval", ["predict", "RUN", "--interval", "1.5"]),
    ("generate-unknown-task", ["generate", "RUN", "--task", "nobody", "--prompt", "w1"]),
    ("generation-flags", ["generate", "RUN", "--task", "task0", "--prompt", "w1", "--num-beams", "2",
                          "--num-return-sequences", "3"]),
    ("empty-prompt", ["generate", "RUN", "--task", "task0", "--prompt", ""]),
])
def test_bad_predictive_requests(key, flags, run_dir, capsys):
    before = snapshot(run_dir)
    error = cli_error([run_dir if flag == "RUN" else flag for flag in flags], capsys, key)
    assert key == "generation-flags" or "invalid generation flags" not in error
    assert snapshot(run_dir) == before


def test_generate_from_the_global_adapter_of_a_prior_without_one(gpt2_dir, data, tmp_path, capsys):
    out = tmp_path / "independent"
    assert main(fit_args(gpt2_dir, data, out, 2, "--prior", "independent")) == 0
    cli_error(["generate", out, "--global", "--prompt", "w1"], capsys, "no-global-adapter")


def test_one_gpu_for_every_process_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    api_error(ConfigError, "torchrun-gpu", distributed.init_from_env, "cuda:0")
    assert distributed.world() == (0, 1)  # refused before joining any process group


def test_every_api_error_is_a_bora_error():
    for error_type in (ConfigError, DataError, ModelError, CheckpointError, WriteError, FitError):
        assert issubclass(error_type, BoRAError)
    assert issubclass(FitInterrupted, KeyboardInterrupt)


# ---------------------------------------------------------------------------------------------
# the README table


def readme_table() -> str:
    rows = ["| When | The message says | The fix it names |", "|---|---|---|"]
    rows += [f"| {when} | `{problem}` | `{fix}` |" for when, problem, fix in ERRORS.values()]
    return "\n".join(rows)


def test_readme_lists_every_error():
    """README's table is ERRORS, and every ERRORS entry is asserted by some test of this file."""
    readme = README.read_text()
    section = readme[readme.index("## Errors you may see"):]
    assert readme_table() in section, "README's table is out of date; paste this:\n" + readme_table()
    source = Path(__file__).read_text()
    body = source[source.index("# helpers"):]
    untested = [key for key in ERRORS if not re.search(rf"[\"']{re.escape(key)}[\"']", body)]
    assert not untested, untested

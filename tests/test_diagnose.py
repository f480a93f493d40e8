"""``bora-pyro diagnose``: the scales of a mean-field fit moved and contracted, read against their
start and their prior; a MAP fit reports its ELBO and prior sds only."""

import json
import math

import pytest

from bora_pyro import load_run
from bora_pyro.cli import main
from bora_pyro.diagnostics import site_log_scales


def fit_and_diagnose(gpt2_dir, data, out, capsys, *flags) -> dict:
    assert main(["fit", "--model", gpt2_dir, "--data", data, "--task-field", "speaker", "--text-field", "line",
                 "--tau", "100", "--steps", "150", "--lr", "1e-2", "--eval-every", "50", "--rank", "2", "--max-length", "32",
                 "--out", str(out), "--quiet", *flags]) == 0
    capsys.readouterr()
    assert main(["diagnose", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert report == metrics["diagnostics"]  # fit writes what diagnose prints
    return report


@pytest.fixture(scope="module")
def mean_field_run(gpt2_dir, tmp_path_factory):
    import conftest

    root = tmp_path_factory.mktemp("diagnose")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conftest.synthetic_records()))
    return root, str(data)


def test_mean_field_scales_move_from_their_start_and_contract_below_the_prior(gpt2_dir, mean_field_run, capsys):
    root, data = mean_field_run
    report = fit_and_diagnose(gpt2_dir, data, root / "mf", capsys, "--guide", "mean-field")
    task, glob = report["sites"]["task"], report["sites"]["global"]
    assert task["scales_moved"] > 0.5
    assert 0 <= task["contraction"] < 1
    assert task["prior_sd"] == pytest.approx(100**-0.5)  # τ^{-1/2} of the offsets
    assert glob["prior_sd"] == pytest.approx(1.0)
    assert task["posterior_sd_min"] <= task["posterior_sd_mean"] <= task["posterior_sd_max"]
    # the figures are the guide's: recompute the task group's contraction from the loaded run
    run = load_run(root / "mf")
    sd = site_log_scales(run.guide)["task.lora_offset"].double().exp()
    assert task["contraction"] == pytest.approx(1 - float(sd.square().mean()) * 100, rel=1e-4)
    assert report["hyper"] == {}


def test_scales_that_never_leave_their_start_are_reported_as_such(gpt2_dir, mean_field_run, capsys):
    """The main job's old setting: log σ at a tiny lr cannot move by log 2 in 150 steps."""
    root, data = mean_field_run
    report = fit_and_diagnose(gpt2_dir, data, root / "stuck", capsys, "--guide", "mean-field", "--log-scale-lr", "1e-4")
    assert report["sites"]["task"]["scales_moved"] == 0.0


def test_map_reports_its_elbo_and_prior_but_no_scales(gpt2_dir, mean_field_run, capsys):
    root, data = mean_field_run
    report = fit_and_diagnose(gpt2_dir, data, root / "map", capsys)
    assert set(report["elbo"]) >= {"converged", "final", "slope_per_100_steps", "noise_sd"}
    assert math.isfinite(report["elbo"]["final"]) and report["elbo"]["noise_sd"] > 0
    task = report["sites"]["task"]
    assert task["posterior_sd_mean"] is None and task["contraction"] is None and task["scales_moved"] is None
    assert task["prior_sd"] == pytest.approx(0.1)


def test_a_learned_tau_reports_its_interval_and_conditions_the_task_prior_on_its_median(gpt2_dir, mean_field_run, capsys):
    root, data = mean_field_run
    report = fit_and_diagnose(gpt2_dir, data, root / "tau", capsys, "--guide", "hybrid", "--tau-prior", "lognormal:4.6,1",
                              "--non-centered")
    low, high = report["hyper"]["tau"]["ci90"]
    median = report["hyper"]["tau"]["median"]
    assert low < median < high
    assert report["sites"]["task"]["prior_sd"] == pytest.approx(median**-0.5, rel=1e-4)
    assert report["sites"]["global"]["scales_moved"] is None  # MAP Θ in the hybrid guide


def test_diagnose_refuses_a_folder_that_is_not_a_finished_run(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err

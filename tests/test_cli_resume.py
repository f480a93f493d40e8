"""``fit --resume`` takes what the user typed, not values that happen to equal a default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bora_pyro.cli import main
from bora_pyro.run import RunConfig, read_config
from conftest import synthetic_records


def fit_args(model_dir, data, out, *extra) -> list[str]:
    return ["fit", "--model", str(model_dir), "--data", str(data), "--rank", "2", "--steps", "4",
            "--batch-size", "8", "--eval-every", "2", "--lr", "0.05", "--max-length", "32", "--out", str(out),
            "--quiet", *extra]


def cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps({"task": r["speaker"], "text": r["line"]}) + "\n" for r in synthetic_records()))
    return path


def fitted(gpt2_dir, data, out, capsys, *extra) -> Path:
    code, err = cli(fit_args(gpt2_dir, data, out, *extra), capsys)
    assert code == 0, err
    return out


def test_resume_on_the_cpu_of_a_run_fitted_on_cuda(gpt2_dir, data, tmp_path, capsys):
    """``--device cpu`` equals the parser's old default: it was dropped, and the run's cuda kept."""
    run_dir = fitted(gpt2_dir, data, tmp_path / "run", capsys)
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"device": "cuda", "steps": 6}))
    code, err = cli(["fit", "--resume", run_dir, "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 6
    assert read_config(run_dir).device == "cpu"


@pytest.mark.parametrize("flag", [["--guide", "map"], ["--rank", "8"], ["--bf16"], ["--prior", "hierarchical"]])
def test_resume_refuses_a_setting_typed_at_its_default_value(gpt2_dir, data, tmp_path, capsys, flag):
    run_dir = fitted(gpt2_dir, data, tmp_path / "run", capsys, "--guide", "mean-field")
    code, err = cli(["fit", "--resume", run_dir, *flag, "--quiet"], capsys)
    assert code == 2 and f"not {flag[0]}" in err, err


@pytest.mark.parametrize("settings", [["--prior", "independent"], ["--prior", "joint"],
                                      ["--tau-prior", "lognormal:4.6,1.5", "--guide", "hybrid"]])
def test_lr_per_tau_needs_a_fixed_tau_in_a_fit_and_on_resume(gpt2_dir, data, tmp_path, capsys, settings):
    args = [a for a in fit_args(gpt2_dir, data, tmp_path / "new", *settings) if a not in ("--lr", "0.05")]
    code, err = cli(args + ["--lr-per-tau", "1e-4"], capsys)
    assert code == 2 and "--lr-per-tau scales the lr with a fixed τ" in err and "give --lr" in err, err
    run_dir = fitted(gpt2_dir, data, tmp_path / "run", capsys, *settings)
    code, err = cli(["fit", "--resume", run_dir, "--lr-per-tau", "1e-4", "--quiet"], capsys)
    assert code == 2 and "--lr-per-tau scales the lr with a fixed τ" in err, err
    assert read_config(run_dir).lr == 0.05


def test_lr_per_tau_on_resume_scales_the_runs_tau(gpt2_dir, data, tmp_path, capsys):
    run_dir = fitted(gpt2_dir, data, tmp_path / "run", capsys, "--tau", "50")
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"steps": 6}))
    code, err = cli(["fit", "--resume", run_dir, "--lr-per-tau", "1e-3", "--quiet"], capsys)
    assert code == 0, err
    assert read_config(run_dir).lr == pytest.approx(0.05)  # 1e-3 × τ = 50


def test_untyped_flags_take_the_run_configs_defaults_and_flat_stays_flat(gpt2_dir, data, tmp_path, capsys):
    defaults = RunConfig(model="")
    config = read_config(fitted(gpt2_dir, data, tmp_path / "run", capsys))
    for name in ("prior", "tau", "guide", "global_scale", "centered", "init_scale", "alpha", "test_size",
                 "validation_size", "optimizer", "weight_decay", "seed", "device", "bf16", "base_dtype"):
        assert getattr(config, name) == getattr(defaults, name), name
    flat = read_config(fitted(gpt2_dir, data, tmp_path / "flat", capsys, "--global-scale", "flat", "--non-centered"))
    assert flat.global_scale is None and flat.centered is False

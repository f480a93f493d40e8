"""Run directories: exact resume, a checkpoint that survives SIGKILL mid-save, clear load errors."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

from bora_pyro import MultiTaskCorpus, MultiTaskLM, fit, load_run, load_tokenizer, save_run
from bora_pyro.cli import main
from bora_pyro.guides import map_guide, mean_field_guide, quantiles
from bora_pyro.models import BoRA, HierarchicalNormal
from bora_pyro.run import (
    CHECKPOINT_FILE, CONFIG_FILE, GUIDE_FILE, RunConfig, build_lm, build_model, init_guide, load_checkpoint,
    save_checkpoint,
)
from conftest import save_tiny_model, synthetic_records


class Interrupted(Exception):
    pass


def fit_tiny(gpt2_dir, make_guide, tmp_path, interrupt_at=None, resume=None):
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    records = synthetic_records(num_tasks=3, docs_per_task=12)
    corpus = MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir),
                             test_size=0.25, validation_size=0.2)
    model = BoRA(lm, HierarchicalNormal(10.0), corpus.num_tasks)
    guide = make_guide(model)

    def checkpoint(state):
        save_checkpoint(tmp_path, state)
        if state.step == interrupt_at:
            raise Interrupted

    fit(model, guide, corpus, steps=12, batch_size=4, lr=0.05, eval_every=4, seed=3, progress=False,
        on_checkpoint=checkpoint, resume=resume)
    return guide.state_dict()


@pytest.mark.parametrize("make_guide", [map_guide, mean_field_guide])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(gpt2_dir, tmp_path, make_guide):
    uninterrupted = fit_tiny(gpt2_dir, make_guide, tmp_path / "a")
    with pytest.raises(Interrupted):
        fit_tiny(gpt2_dir, make_guide, tmp_path / "b", interrupt_at=8)
    state = load_checkpoint(tmp_path / "b")
    assert state.step == 8 and len(state.history) == 2
    torch.manual_seed(12345)  # whatever happened since must not matter
    resumed = fit_tiny(gpt2_dir, make_guide, tmp_path / "b", resume=state)
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name


def cli_fit_args(model_dir, data, out, steps=12):
    return ["fit", "--model", model_dir, "--data", data, "--task-field", "speaker", "--text-field", "line",
            "--rank", "2", "--steps", str(steps), "--batch-size", "8", "--eval-every", "4", "--lr", "0.05",
            "--max-length", "32", "--out", str(out), "--quiet"]


def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_resume_is_exact(gpt2_dir, synthetic_jsonl, tmp_path):
    assert main(cli_fit_args(gpt2_dir, synthetic_jsonl, tmp_path / "whole")) == 0
    killed = tmp_path / "killed"
    # the child dies by SIGKILL in the middle of writing its second checkpoint: after the temp
    # file is complete, before the rename that would publish it
    child = textwrap.dedent(f"""
        import os, signal, sys
        from bora_pyro.cli import main
        real_replace, saves = os.replace, []
        def replace(src, dst):
            if str(dst).endswith("checkpoint.safetensors"):
                saves.append(dst)
                if len(saves) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        os.replace = replace
        sys.exit(main({cli_fit_args(gpt2_dir, synthetic_jsonl, killed)!r}))
    """)
    process = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, capture_output=True, timeout=300)
    assert process.returncode == -9, process.stderr.decode()[-2000:]
    assert load_checkpoint(killed).step == 4
    assert not (killed / "guide.safetensors").exists()
    assert main(["fit", "--resume", str(killed), "--quiet"]) == 0
    whole = safetensors.torch.load_file(tmp_path / "whole" / "guide.safetensors")
    resumed = safetensors.torch.load_file(killed / "guide.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert json.loads((killed / "metrics.json").read_text())["history"] == \
        json.loads((tmp_path / "whole" / "metrics.json").read_text())["history"]


@pytest.fixture
def fitted_run(gpt2_dir, synthetic_jsonl, tmp_path):
    run_dir = tmp_path / "run"
    assert main(cli_fit_args(gpt2_dir, synthetic_jsonl, run_dir, steps=4)) == 0
    return run_dir


def evaluate_error(run_dir, capsys) -> str:
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    return error


def test_wrong_base_model_is_refused(fitted_run, tmp_path, capsys):
    config = json.loads((fitted_run / "config.json").read_text())
    config["model"] = str(save_tiny_model(tmp_path / "other", "gpt2", seed=1))
    (fitted_run / "config.json").write_text(json.dumps(config))
    assert "fitted on a different base model" in evaluate_error(fitted_run, capsys)


def test_truncated_guide_file_is_refused(fitted_run, capsys):
    path = fitted_run / "guide.safetensors"
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    assert "truncated or corrupt" in evaluate_error(fitted_run, capsys)


def test_newer_major_version_is_refused(fitted_run, capsys):
    config = json.loads((fitted_run / "config.json").read_text())
    config["versions"]["bora_pyro"] = "1.0.0"
    (fitted_run / "config.json").write_text(json.dumps(config))
    assert "written by bora-pyro 1.0.0" in evaluate_error(fitted_run, capsys)


def as_format_1(run_dir: Path) -> list[str]:
    """Rewrite a run directory as bora-pyro wrote it before format 2: no ``format_version`` in its
    config, and the mean-field scales of its guide and checkpoint as ``scales``/``task_scales`` =
    softplus⁻¹ σ = log(expm1(σ)) instead of ``log_scales``/``task_log_scales`` = log σ. Returns the
    renamed parameters of the guide."""
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    del config["format_version"]
    (run_dir / CONFIG_FILE).write_text(json.dumps(config))
    renamed = []
    for name in (GUIDE_FILE, CHECKPOINT_FILE):
        if not (run_dir / name).is_file():
            continue
        with safetensors.safe_open(str(run_dir / name), framework="pt") as file:
            tensors, metadata = {key: file.get_tensor(key) for key in file.keys()}, file.metadata()
        old = {}
        for key, value in tensors.items():
            old_key = re.sub(r"^((?:guide\.|best\.)?(?:\d+\.)?(?:task_)?)log_scales\.", r"\1scales.", key)
            old[old_key] = value if old_key == key else torch.log(torch.expm1(value.double().exp())).float()
            if old_key != key and name == GUIDE_FILE:
                renamed.append(old_key)
        safetensors.torch.save_file(old, run_dir / name, metadata=metadata)
    return renamed


@pytest.mark.parametrize("guide, extra", [("mean-field", {}), ("hybrid", {"tau_prior": "lognormal:4.6,1.5"})])
def test_a_format_1_run_directory_loads_with_the_same_posterior(gpt2_dir, tmp_path, guide, extra):
    """Format 1 kept the mean-field scales as softplus⁻¹ σ under other names: load_run converts them."""
    config = RunConfig(model=gpt2_dir, rank=2, alpha=4.0, max_length=32, task_names=["a", "b", "c"], guide=guide,
                       **extra)
    lm, tokenizer = build_lm(config)
    model, fitted = build_model(config, lm)
    init_guide(fitted, lm, tokenizer.eos_token_id)
    generator = torch.Generator().manual_seed(0)
    # scales around σ = 1, where softplus⁻¹ σ and log σ differ (at σ = 1e-3 they hardly do)
    fitted.load_state_dict({name: 0.5 * torch.randn(value.shape, generator=generator) if "log_scales." in name
                            else value + 0.3 * torch.randn(value.shape, generator=generator)
                            for name, value in fitted.state_dict().items()})
    new = save_run(tmp_path / "new", config, fitted)
    assert json.loads((new / CONFIG_FILE).read_text())["format_version"] == 2
    old = Path(shutil.copytree(new, tmp_path / "old"))
    renamed = as_format_1(old)
    assert any(".tau" in name for name in renamed) == (guide == "hybrid")
    assert any(name.startswith(("task_scales.", "1.task_scales.")) for name in renamed)

    expected, got = (quantiles(load_run(path).guide, [0.05, 0.5, 0.95]) for path in (new, old))
    assert expected.keys() == got.keys()
    for site in expected:
        torch.testing.assert_close(got[site], expected[site], rtol=1e-5, atol=1e-6)
    assert load_run(old).config.format_version == 1

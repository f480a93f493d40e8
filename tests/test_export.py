"""Export to peft and merging: the exported adapters compute what bora-pyro computes for a task."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from bora_pyro import ConfigError, export_peft, load_run, merge, save_run
from bora_pyro.cli import main
from bora_pyro.export import export_peft_all, peft_index, save_merged
from bora_pyro.packing import FactorLayout
from bora_pyro.run import RunConfig, build_lm, build_model, init_guide

peft = pytest.importorskip("peft")

TASKS = ["task0", "task1", "task2"]
INPUT_IDS = torch.tensor([[3, 5, 7, 9, 11, 13, 4, 2], [20, 21, 22, 23, 24, 25, 26, 27]])


def make_run_dir(path, model_dir: str, **config) -> str:
    """A run directory whose guide holds random factors: every A and B non-zero, every task distinct."""
    config = RunConfig(model=model_dir, rank=4, alpha=8.0, max_length=32, task_names=list(TASKS), **config)
    lm, tokenizer = build_lm(config)
    model, guide = build_model(config, lm)
    init_guide(guide, lm, tokenizer.eos_token_id)
    generator = torch.Generator().manual_seed(1)
    state = {name: value + 0.3 * torch.randn(value.shape, generator=generator)
             for name, value in guide.state_dict().items()}
    guide.load_state_dict(state)
    save_run(path, config, guide)
    return str(path)


@pytest.fixture(scope="module")
def run_dirs(tiny_model_dirs, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "gpt2": make_run_dir(root / "gpt2", tiny_model_dirs["gpt2"]),
        "llama": make_run_dir(root / "llama", tiny_model_dirs["llama"], guide="mean-field", centered=False),
        "independent": make_run_dir(root / "independent", tiny_model_dirs["gpt2"], prior="independent"),
        "glob": make_run_dir(root / "glob", tiny_model_dirs["gpt2"], target_modules=["transformer.h.1.*"]),
    }


def bora_logits(run, task: str | None) -> torch.Tensor:
    """bora-pyro's own forward pass with one task's (or the global) adapter at the guide's median."""
    values = run.guide.median()
    if task is None:
        factors = FactorLayout(run.lm.modules_spec).unpack(values["global.lora"][None])
        row_tasks = torch.zeros(len(INPUT_IDS), dtype=torch.long)
    else:
        factors = run.model.task_factors(values)
        row_tasks = torch.full((len(INPUT_IDS),), TASKS.index(task), dtype=torch.long)
    with torch.no_grad(), run.lm.adapters(factors, row_tasks):
        return run.lm(INPUT_IDS).logits


def base_logits(run) -> torch.Tensor:
    with torch.no_grad():
        return run.lm(INPUT_IDS).logits


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("task", ["task1", None])
def test_peft_and_merged_match_bora(run_dirs, tmp_path, model_type, task):
    run = load_run(run_dirs[model_type])
    expected = bora_logits(run, task)
    assert (expected - base_logits(run)).abs().max() > 1e-2  # the adapter really changes the model

    folder = export_peft(run, tmp_path / "adapter", task)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert config["fan_in_fan_out"] == (model_type == "gpt2")
    base = AutoModelForCausalLM.from_pretrained(run.config.model)
    peft_model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        got = peft_model(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    merged = merge(run, task)
    with torch.no_grad():
        got = merged(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_tasks_differ_and_all_tasks_export(run_dirs, tmp_path):
    run = load_run(run_dirs["gpt2"])
    out = export_peft_all(run, tmp_path / "all")
    index = peft_index(out)
    assert set(index["tasks"]) == set(TASKS) and index["global"] == "global"
    base = AutoModelForCausalLM.from_pretrained(run.config.model)
    peft_model = peft.PeftModel.from_pretrained(base, str(out / index["tasks"]["task0"]), adapter_name="task0")
    peft_model.load_adapter(str(out / index["tasks"]["task2"]), adapter_name="task2")
    peft_model.eval()
    for task in ("task0", "task2"):
        peft_model.set_adapter(task)
        with torch.no_grad():
            got = peft_model(input_ids=INPUT_IDS).logits
        torch.testing.assert_close(got, bora_logits(run, task), atol=1e-5, rtol=0)
    assert (bora_logits(run, "task0") - bora_logits(run, "task2")).abs().max() > 1e-2


def test_global_needs_global_factors(run_dirs, tmp_path):
    run = load_run(run_dirs["independent"])
    with pytest.raises(ConfigError, match="no global adapter"):
        export_peft(run, tmp_path / "adapter", None)
    with pytest.raises(ConfigError, match="no global adapter"):
        merge(run, None)
    export_peft(run, tmp_path / "adapter", "task0")  # a task's adapter exists
    index = peft_index(export_peft_all(run, tmp_path / "all"))
    assert index["global"] is None and len(index["tasks"]) == 3


def test_cli_export(run_dirs, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", run_dirs["gpt2"], "--task", "task2", "--format", "merged", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    run = load_run(run_dirs["gpt2"])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(out))(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(got, bora_logits(run, "task2"), atol=1e-4, rtol=0)

    capsys.readouterr()
    assert main(["export", run_dirs["gpt2"], "--task", "tsak1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "unknown task 'tsak1'" in err and "'task0'" in err and "did you mean 'task1'" in err
    assert not (tmp_path / "x").exists()

    assert main(["export", run_dirs["independent"], "--global", "--out", str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_merged_model_is_moved_into_place(run_dirs, tmp_path):
    """save_merged writes beside --out, then moves: a new folder whole, an existing one's other files kept."""
    run = load_run(run_dirs["gpt2"])
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    for out in (tmp_path / "new", existing):
        assert save_merged(run, out, "task1") == out
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(str(out))(input_ids=INPUT_IDS).logits
        torch.testing.assert_close(got, bora_logits(run, "task1"), atol=1e-4, rtol=0)
    assert (existing / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing", "new"]  # no temp folder left
    assert oct((tmp_path / "new").stat().st_mode & 0o777) == oct(0o777 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_glob_targets_export_full_names(run_dirs, tmp_path):
    """Last names would also adapt layer 0 here, so the config lists the full module names."""
    run = load_run(run_dirs["glob"])
    folder = export_peft(run, tmp_path / "adapter", "task0")
    targets = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(run.lm.layers) and all(name.startswith("transformer.h.1.") for name in targets)
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.config.model), str(folder))
    with torch.no_grad():
        got = peft_model.eval()(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(got, bora_logits(run, "task0"), atol=1e-5, rtol=0)


def test_cli_all_tasks(run_dirs, tmp_path, capsys):
    assert main(["export", run_dirs["gpt2"], "--all-tasks", "--out", str(tmp_path / "all")]) == 0
    assert sorted(peft_index(tmp_path / "all")["tasks"]) == TASKS
    capsys.readouterr()
    assert main(["export", run_dirs["gpt2"], "--all-tasks", "--format", "merged", "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.count("\n") == 1

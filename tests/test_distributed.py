"""Data-parallel SVI: 2 CPU processes (gloo, started with torchrun) against one process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch

from bora_pyro.cli import main
from bora_pyro.run import GUIDE_FILE, METRICS_FILE, load_checkpoint
from conftest import loopback_env, torchrun
from distributed_worker import BATCH_SIZE, FLAT_PRIORS, GUIDES, fit_guide

WORKER = str(Path(__file__).with_name("distributed_worker.py"))


def run_workers(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 distributed_worker.py ARGS``, at most 4 minutes."""
    return subprocess.run(torchrun(WORKER, *args), capture_output=True, text=True, timeout=240, env=loopback_env())


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max(float((first[name] - second[name]).abs().max()) for name in first)


@pytest.mark.parametrize("mode", ["api", "store", "flat"])
def test_two_processes_end_with_the_parameters_of_one(gpt2_dir, tmp_path, mode):
    # api: 7 steps of global batches of 7 (4 + 3 rows per process), validation every 3 steps split
    # across the processes; flat: MAP under flat priors on batches of 1, so process 1 never has a
    # row, no prior term and no gradient of its own (it used to crash the fit); store: api's fits with
    # the tasks in a task store (each process fetches the global batch's tasks, so all average the same leaves)
    finished = run_workers(mode, gpt2_dir, str(tmp_path))
    assert finished.returncode == 0, finished.stderr[-3000:]
    fits = {name: (name, None, BATCH_SIZE) for name in GUIDES} if mode != "flat" else \
        {name: ("map", prior, 1) for name, prior in FLAT_PRIORS.items()}
    for guide_name, settings in fits.items():
        state, history = fit_guide(gpt2_dir, *settings)
        ranks = [torch.load(tmp_path / f"{guide_name}-rank{rank}.pt") for rank in (0, 1)]
        assert max_difference(ranks[0]["state"], ranks[1]["state"]) == 0.0, guide_name  # one update, applied alike
        assert max_difference(ranks[0]["state"], state) <= 1e-5, guide_name
        assert max(float(v.abs().max()) for v in state.values()) > 0.01  # the fit moved the parameters
        assert [entry["step"] for entry in ranks[0]["history"]] == [entry["step"] for entry in history] == [3, 6, 7]
        for parallel, single in zip(ranks[0]["history"], history, strict=True):
            for key in ("elbo", "train_perplexity", "validation_perplexity"):
                assert parallel[key] == pytest.approx(single[key], rel=1e-5), (guide_name, key)


def test_fit_under_torchrun_writes_on_rank_0_stops_on_sigterm_and_resumes(gpt2_dir, synthetic_jsonl, tmp_path):
    run_dir, single_dir = tmp_path / "run", tmp_path / "single"
    args = ["--model", gpt2_dir, "--data", synthetic_jsonl, "--steps", "6", "--eval-every", "2", "--batch-size", "7",
            "--rank", "2", "--lr", "0.05", "--max-length", "32", "--task-field", "speaker", "--text-field", "line", "--quiet"]
    # process 1 gets a SIGTERM at the check of step 2: both finish step 3, rank 0 checkpoints it, both stop
    stopped = run_workers("cli", str(tmp_path), "--stop-rank", "1", "--", *args, "--out", str(run_dir))
    assert stopped.returncode != 0
    assert "interrupted after step 3" in stopped.stderr, stopped.stderr[-3000:]
    assert load_checkpoint(run_dir).step == 3
    assert not (run_dir / GUIDE_FILE).exists()

    resumed = run_workers("cli", str(tmp_path), "--", "--resume", str(run_dir), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "writes-rank0.txt").read_text().count(str(run_dir)) >= 3  # config, checkpoints, guide
    assert (tmp_path / "writes-rank1.txt").read_text() == ""

    assert main(["fit", *args, "--out", str(single_dir)]) == 0
    parallel = safetensors.torch.load_file(run_dir / GUIDE_FILE)
    # up to rounding: Adam's first steps divide by the root of a few squared gradients, so the
    # all-reduce's rounding (~1e-7) grows here at lr 0.05 (offsets, the default) to ~6e-4 (measured;
    # ~3e-5 when the head's logits were scored whole, before token_nll.py); a missing average or a
    # wrong shard is off by ~lr
    assert max_difference(parallel, safetensors.torch.load_file(single_dir / GUIDE_FILE)) <= 2e-3
    metrics = (run_dir / METRICS_FILE).read_text()
    assert '"steps": 6' in metrics and '"best_step"' in metrics

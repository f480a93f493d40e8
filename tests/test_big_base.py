"""Big bases: a bf16 base with float32 adapters, and gradient checkpointing of the base's blocks."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from bora_pyro import MultiTaskLM, evaluate
from bora_pyro.cli import main
from bora_pyro.run import CONFIG_FILE, GUIDE_FILE, load_corpus, load_run


def log_likelihood_and_grads(model_dir: str, checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """A mixed-task batch's log-likelihoods [3], the factors' gradients, and how many times the
    first adapted layer ran (forward and recomputation)."""
    lm = MultiTaskLM.from_pretrained(model_dir, rank=2, alpha=4)
    if checkpointing:
        lm.enable_gradient_checkpointing()
    generator = torch.Generator().manual_seed(0)
    factors = {spec.name: (torch.randn(3, *spec.shape_A, generator=generator).requires_grad_(),
                           torch.randn(3, *spec.shape_B, generator=generator).requires_grad_())
               for spec in lm.modules_spec}
    calls = []
    next(iter(lm.layers.values())).register_forward_hook(lambda *_: calls.append(1))
    input_ids = torch.randint(2, 40, (3, 10), generator=generator)
    with lm.adapters(factors, torch.tensor([2, 0, 1])):
        log_likelihood = lm.sequence_log_prob(input_ids, torch.ones_like(input_ids))
    log_likelihood.sum().backward()  # after the adapters' block: the recomputation must bring them back
    return log_likelihood.detach(), [factor.grad for pair in factors.values() for factor in pair], len(calls)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_gradient_checkpointing_recomputes_the_blocks_with_their_adapters(tiny_model_dirs, model_type):
    plain, plain_grads, plain_calls = log_likelihood_and_grads(tiny_model_dirs[model_type], checkpointing=False)
    checkpointed, grads, calls = log_likelihood_and_grads(tiny_model_dirs[model_type], checkpointing=True)
    assert (plain_calls, calls) == (1, 2)  # the backward pass ran the block again
    assert torch.equal(plain, checkpointed)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, grads, strict=True))


def test_fit_on_a_bf16_base_with_checkpointing_keeps_adapters_float32(gpt2_dir, synthetic_jsonl, tmp_path):
    run_dir = tmp_path / "run"
    code = main(["fit", "--model", gpt2_dir, "--data", synthetic_jsonl, "--task-field", "speaker",
                 "--text-field", "line", "--steps", "4", "--batch-size", "4", "--rank", "2", "--max-length", "32",
                 "--lr", "0.05", "--base-dtype", "bfloat16", "--gradient-checkpointing", "--quiet", "--out", str(run_dir)])
    assert code == 0
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    assert (config["base_dtype"], config["gradient_checkpointing"]) == ("bfloat16", True)
    guide = safetensors.torch.load_file(run_dir / GUIDE_FILE)
    assert {tensor.dtype for tensor in guide.values()} == {torch.float32}

    run = load_run(run_dir)  # loaded as fitted: the base in bf16
    base_weights = [p for name, p in run.lm.model.named_parameters() if "weight" in name]
    assert {p.dtype for p in base_weights} == {torch.bfloat16}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["perplexity"] < 0.5 * metrics["base_test"]["perplexity"]  # the adapters learned (≈0.3×)
    reloaded = evaluate(run.model, run.guide, load_corpus(run.config, run.tokenizer), "test")
    assert reloaded["perplexity"] == pytest.approx(metrics["test"]["perplexity"], rel=1e-6)

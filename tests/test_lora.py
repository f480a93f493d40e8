"""The LoRA math: B = 0 is the base model; a mixed batch equals each row run alone with its
task's adapter merged into a copy of the base weights."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from bora_pyro import MultiTaskLM
from bora_pyro.errors import ConfigError, ModelError

ARCHITECTURES = ["gpt2", "opt", "llama", "gpt_neox"]


def random_factors(lm: MultiTaskLM, num_tasks: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        spec.name: (
            torch.randn(num_tasks, *spec.shape_A, generator=generator) * 0.3,
            torch.randn(num_tasks, *spec.shape_B, generator=generator) * 0.3,
        )
        for spec in lm.modules_spec
    }


def merged_copy(base_model, lm: MultiTaskLM, factors: dict, task: int):
    """A copy of the base model with ``W + (alpha/r) B_t A_t`` written into its weights."""
    merged = copy.deepcopy(base_model)
    for spec in lm.modules_spec:
        lora_A, lora_B = factors[spec.name]
        delta = lm.alpha / lm.rank * lora_B[task] @ lora_A[task]  # [out, in]
        layer = merged.get_submodule(spec.name)
        with torch.no_grad():
            layer.weight += delta.T if isinstance(layer, Conv1D) else delta
    return merged


def test_defaults_adapt_attention_and_mlp_never_lm_head(tiny_model_dirs):
    lm = MultiTaskLM.from_pretrained(tiny_model_dirs["gpt2"], rank=2)
    names = [spec.name for spec in lm.modules_spec]
    assert len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    assert not any("lm_head" in name for name in names)
    assert all(not p.requires_grad for p in lm.parameters())
    assert lm.modules_spec[0].shape_A == (2, 32) and lm.modules_spec[0].shape_B == (96, 2)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_zero_B_gives_the_base_model_exactly(tiny_model_dirs, model_type):
    path = tiny_model_dirs[model_type]
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    lm = MultiTaskLM.from_pretrained(path, rank=4, alpha=8)
    factors = {name: (A, torch.zeros_like(B)) for name, (A, B) in random_factors(lm, 3).items()}
    input_ids = torch.randint(2, 40, (3, 10))
    with torch.no_grad(), lm.adapters(factors, torch.tensor([0, 2, 1])):
        adapted = lm(input_ids).logits
    with torch.no_grad():
        expected = base(input_ids).logits
    assert torch.equal(adapted, expected)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_mixed_batch_equals_each_row_with_its_merged_adapter(tiny_model_dirs, model_type):
    """Rows 0, 2 and 3 hold the same text: rows 0 and 3 (both task 2) must agree and row 2
    (task 1) must differ, so each row really uses its own task's factors; then every row equals
    its task's adapter merged into the base weights."""
    path = tiny_model_dirs[model_type]
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    lm = MultiTaskLM.from_pretrained(path, rank=4, alpha=8)
    factors = random_factors(lm, num_tasks=3)
    row_tasks = torch.tensor([2, 0, 1, 2])
    input_ids = torch.randint(2, 40, (4, 9))
    input_ids[2] = input_ids[3] = input_ids[0]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # a right-padded row
    with torch.no_grad(), lm.adapters(factors, row_tasks):
        mixed = lm(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(mixed[3], mixed[0])
    assert (mixed[2] - mixed[0]).abs().max() > 0.1  # same text, other task
    for row, task in enumerate(row_tasks.tolist()):
        length = int(attention_mask[row].sum())
        with torch.no_grad():
            alone = merged_copy(base, lm, factors, task)(input_ids[row : row + 1, :length]).logits[0]
        torch.testing.assert_close(mixed[row, :length], alone, rtol=1e-4, atol=1e-4)


def test_sequence_log_prob_masks_padding(gpt2_dir):
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2)
    ids = torch.randint(2, 40, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        full = lm.sequence_log_prob(ids, torch.ones_like(ids))
        with_padding = lm.sequence_log_prob(padded, mask)
        logits = lm(ids).logits[0, :-1]
    by_hand = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).sum()
    torch.testing.assert_close(full, with_padding)
    torch.testing.assert_close(full[0], by_hand)


def test_target_modules_by_name_and_clear_errors(gpt2_dir, tiny_model_dirs):
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, target_modules=["c_attn"])
    assert [spec.name for spec in lm.modules_spec] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with pytest.raises(ConfigError, match="available linear modules.*c_fc"):
        MultiTaskLM.from_pretrained(gpt2_dir, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="rank 64 exceeds"):
        MultiTaskLM.from_pretrained(gpt2_dir, rank=64)
    with pytest.raises(ModelError, match="neither a local folder"):
        MultiTaskLM.from_pretrained(gpt2_dir + "-missing")

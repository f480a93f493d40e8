"""Chunked next-token NLL (``bora_pyro/token_nll.py``): the same values and gradients as the plain
cross-entropy of the full logits, without keeping a [tokens, vocab] tensor for the backward pass."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from bora_pyro import MultiTaskLM
from bora_pyro.adapted_lm import load_causal_lm
from bora_pyro import token_nll
from bora_pyro.token_nll import TokenNLL, plain_output_head


@pytest.mark.parametrize("with_bias", [False, True])
def test_token_nll_matches_cross_entropy_over_several_chunks(with_bias, monkeypatch):
    monkeypatch.setattr(token_nll, "CHUNK_ELEMENTS", 7 * 50)  # chunks of 7 rows: 23 rows = 3 full + 1 ragged
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    bias = torch.randn(50, generator=generator, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, 50, (23,), generator=generator)
    upstream = torch.randn(23, generator=generator, dtype=torch.float64)

    nll = TokenNLL.apply(hidden, weight, bias, targets)
    (grad,) = torch.autograd.grad((nll * upstream).sum(), hidden)
    reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), targets,
                                                  reduction="none")
    (expected_grad,) = torch.autograd.grad((reference * upstream).sum(), hidden)
    torch.testing.assert_close(nll, reference.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)  # the logits are float32


def saved_shapes(function) -> list[torch.Size]:
    """The shape of every tensor autograd saves for the backward pass while ``function`` runs."""
    shapes = []

    def pack(tensor):
        shapes.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return shapes


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_sequence_log_prob_is_chunked_with_the_same_values_and_gradients(model_type, tiny_model_dirs, monkeypatch):
    """Against the plain path: equal log-probabilities and factor gradients on a right-padded batch,
    and no saved tensor as large as the batch's logits (the plain path saves several)."""
    monkeypatch.setattr(token_nll, "CHUNK_ELEMENTS", 5 * 42)
    lm = MultiTaskLM.from_pretrained(tiny_model_dirs[model_type], rank=2, alpha=4).double()  # float32 differs by ~1e-4
    assert lm.chunked_scoring
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 42, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[2, 2:] = 0
    factors = {spec.name: (torch.randn(1, spec.rank, spec.in_features, generator=generator).double().requires_grad_(),
                           torch.randn(1, spec.out_features, spec.rank, generator=generator).double().requires_grad_())
               for spec in lm.modules_spec}
    leaves = [tensor for pair in factors.values() for tensor in pair]

    def score(chunked: bool):
        lm.chunked_scoring = chunked
        with lm.adapters(factors, torch.zeros(3, dtype=torch.long)):
            log_prob = lm.sequence_log_prob(input_ids, attention_mask)
        return log_prob, torch.autograd.grad(log_prob.sum(), leaves)

    expected, expected_grads = score(False)
    got, grads = score(True)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)  # both paths' logits are float32
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    for chunked, holds_logits in ((True, False), (False, True)):
        lm.chunked_scoring = chunked
        with lm.adapters(factors, torch.zeros(3, dtype=torch.long)):
            shapes = saved_shapes(lambda: lm.sequence_log_prob(input_ids, attention_mask))
        largest_logits = max((shape.numel() for shape in shapes if shape[-1:] == (42,)), default=0)  # [..., vocab]
        assert (largest_logits >= 5 * 42) == holds_logits  # more than one chunk of the 16 predicted tokens


def test_a_model_that_rescales_its_logits_keeps_the_plain_path(tmp_path):
    """Gemma 2 soft-caps its logits after the head: head(hidden) is not its logits."""
    config = Gemma2Config(vocab_size=42, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    model = load_causal_lm(tmp_path)
    assert plain_output_head(model) is None
    assert model.get_output_embeddings() is not None and not isinstance(model.get_output_embeddings(),
                                                                         torch.nn.Identity)

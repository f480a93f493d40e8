"""Next-token NLL through a frozen output head without holding the [tokens, vocab] logits.

A step's likelihood needs ``log softmax(h Wᵀ + b)[target]`` for every predicted token. Computed
the plain way, the float32 logits of a batch (8 × 128 tokens × 49,152 entries for SmolLM2 =
200 MB), their log-softmax and, in the backward pass, their gradient are each alive at once: the
output layer, not the transformer, then sets the peak memory of a step. :class:`TokenNLL` takes
the final hidden states instead and works through the tokens in chunks of at most
:data:`CHUNK_ELEMENTS` logits. The head is frozen, so the only gradient it needs is the one
w.r.t. ``h``; it is formed chunk by chunk in the forward pass,
``∂NLL/∂h = (softmax(h Wᵀ + b) − onehot(target)) W``, and scaled by the incoming gradient in the
backward (what Liger's fused linear cross-entropy does), so nothing is recomputed.

:func:`plain_output_head` decides whether a model's logits are that simple: a model that
transforms them after its head (Gemma's soft-capping, Cohere's logit scale) keeps the plain path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

#: Logits per chunk (2^24 float32 = 64 MB): 341 tokens at a 49k vocabulary.
CHUNK_ELEMENTS = 1 << 24


class TokenNLL(torch.autograd.Function):
    """``nll[n] = logsumexp(h[n] Wᵀ + b) − (h[n] Wᵀ + b)[target[n]]``, chunk by chunk.

    Args:
        hidden: [N, H] final hidden states of the predicting positions (any float dtype).
        weight: [V, H] the frozen head's weight; bias: [V] or None.
        targets: [N] long, the token each position predicts.

    Returns:
        [N] float32 token NLL; differentiable w.r.t. ``hidden`` only.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        nll = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = nn.functional.linear(hidden[rows], weight, bias).float()  # [chunk, V]
            target = targets[rows, None]
            log_normaliser = logits.logsumexp(-1, keepdim=True)
            nll[rows] = (log_normaliser - logits.gather(1, target)).squeeze(1)
            if grad_hidden is not None:
                probs = logits.sub_(log_normaliser).exp_()  # in place: the chunk's only [chunk, V] buffer
                probs.scatter_add_(1, target, probs.new_full(target.shape, -1.0))
                grad_hidden[rows] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_nll[:, None].to(grad_hidden.dtype), None, None, None


@contextlib.contextmanager
def headless(model: PreTrainedModel) -> Iterator[nn.Module]:
    """Within the block the model's output embedding is the identity, so its "logits" are the
    final hidden states [batch, length, H]; yields the head."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)


@torch.no_grad()
def plain_output_head(model: PreTrainedModel) -> nn.Linear | None:
    """The model's output head if its logits are exactly ``head(final hidden state)`` (checked on
    a probe input) and the head is a frozen ``nn.Linear``; None otherwise."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.weight.requires_grad:
        return None
    probe = torch.arange(4, device=model.device)[None] % head.out_features
    training = model.training
    model.eval()
    try:
        logits = model(input_ids=probe, use_cache=False).logits.float()
        with headless(model):
            hidden = model(input_ids=probe, use_cache=False).logits
        rebuilt = head(hidden).float()
    except Exception:  # a model whose head cannot be swapped (no set_output_embeddings, ...): the plain path
        return None
    finally:
        model.train(training)
    scale = float(logits.abs().max()) + 1e-12
    return head if torch.allclose(rebuilt, logits, rtol=0, atol=1e-4 * scale) else None

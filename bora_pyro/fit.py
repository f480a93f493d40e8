"""Stochastic variational inference for a BoRA model: the training loop.

``fit`` minimises ``Trace_ELBO`` over the guide's parameters with a torch optimizer, on mixed-task
batches of the training split. With ``AutoDelta`` this is MAP (the paper); with ``AutoNormal`` it
is mean-field VI. Held-out log-likelihood on the validation split (posterior-median adapters) is
checked every ``eval_every`` steps; the best parameters are kept and, with ``patience``, training
stops once it has not improved for that many checks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from .data import Batch, MultiTaskCorpus
from .errors import ConfigError
from .evaluate import evaluate


@dataclass
class FitResult:
    """What a fit did: ``history`` holds one dict per evaluation (step, ELBO, train and validation
    perplexity); ``best_step`` is the step whose parameters the guide holds at the end."""

    steps: int
    best_step: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)


def paper_lr(tau: float, lr_at_tau_1: float = 1e-5) -> float:
    """The paper's learning rate for MAP at precision τ: ``lr ∝ τ`` (1e-5 at τ=1 … 1e-1 at τ=1e4)."""
    return lr_at_tau_1 * tau


def endless_batches(corpus: MultiTaskCorpus, batch_size: int, generator: torch.Generator) -> Iterator[tuple[int, Batch]]:
    """(epoch, batch) over reshuffled passes of the training split, forever."""
    epoch = 0
    while True:
        for batch in corpus.train.batches(batch_size, corpus.pad_token_id, shuffle=True, generator=generator):
            yield epoch, batch
        epoch += 1


def window_steps(step: int, eval_every: int) -> int:
    """Steps since the last evaluation (the running averages' window)."""
    return (step - 1) % eval_every + 1


def make_optimizer(name: str, parameters, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if not lr > 0 or not math.isfinite(lr):
        raise ConfigError(f"learning rate must be a positive number, got {lr}")
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}: use 'adam' or 'adamw'")


def fit(
    model,
    guide,
    corpus: MultiTaskCorpus,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 8,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    eval_every: int | None = None,
    patience: int | None = None,
    seed: int = 0,
    bf16: bool = False,
    progress: bool = True,
    on_eval: Callable[[int, dict], None] | None = None,
) -> FitResult:
    """Fit ``guide`` to ``model`` by SVI on ``corpus.train``.

    Args:
        steps / epochs: training length; give exactly one (epochs may be fractional).
        batch_size: documents per step, from mixed tasks.
        lr, optimizer, weight_decay: torch optimizer (``"adam"`` or ``"adamw"``) settings. For MAP
            at large τ the paper scales lr with τ: see :func:`paper_lr`.
        eval_every: steps between validation checks (default: once per epoch); needs a
            non-empty validation split, otherwise the last parameters are kept.
        patience: stop after this many checks without improvement (None: never stop early).
        seed: seeds Pyro, torch and the batch order.
        bf16: bf16 autocast of the forward pass (CUDA, or CPUs with bf16 support such as AMX);
            factors, guide parameters and the likelihood's log-softmax stay float32.
        on_eval: called with (step, history entry) after every validation check.
    """
    if (steps is None) == (epochs is None):
        raise ConfigError("give exactly one of steps and epochs")
    if batch_size < 1:
        raise ConfigError(f"batch size must be ≥ 1, got {batch_size}")
    steps_per_epoch = math.ceil(len(corpus.train) / batch_size)
    total_steps = steps if steps is not None else math.ceil(epochs * steps_per_epoch)
    if total_steps < 1:
        raise ConfigError(f"the fit must run at least one step, got steps={steps}, epochs={epochs}")
    device = model.lm.device
    eval_every = eval_every or steps_per_epoch
    validate = len(corpus.validation) > 0

    pyro.set_rng_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    batches = endless_batches(corpus, batch_size, generator)
    elbo = Trace_ELBO()
    traced_model = poutine.trace(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    _, first_batch = next(batches)
    with torch.no_grad(), autocast:
        guide(first_batch.to(device))  # creates the guide's parameters
    optim = make_optimizer(optimizer, [p for p in guide.parameters() if p.requires_grad], lr, weight_decay)

    result = FitResult(steps=0, best_step=0, stopped_early=False)
    best_nll, best_state, checks_without_gain = math.inf, None, 0
    window_log_lik, window_tokens, window_loss = 0.0, 0, 0.0
    bar = tqdm(range(1, total_steps + 1), desc="fit", disable=not progress, dynamic_ncols=True)
    batch = first_batch
    for step in bar:
        batch = batch.to(device)
        with autocast:
            loss = elbo.differentiable_loss(traced_model, guide, batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        log_likelihood = traced_model.trace.nodes["_RETURN"]["value"]  # the model returns it, [batch]
        window_log_lik += float(log_likelihood.detach().sum())
        window_tokens += batch.num_predicted_tokens
        window_loss += float(loss.detach())
        result.steps = step
        if progress and step % 10 == 0:
            bar.set_postfix(elbo=f"{-window_loss / window_steps(step, eval_every):.4g}",
                            train_ppl=f"{math.exp(-window_log_lik / max(window_tokens, 1)):.4g}", refresh=False)

        if step % eval_every == 0 or step == total_steps:
            entry = {
                "step": step,
                "epoch": step / steps_per_epoch,
                "elbo": -window_loss / window_steps(step, eval_every),
                "train_perplexity": math.exp(-window_log_lik / max(window_tokens, 1)),
            }
            window_log_lik, window_tokens, window_loss = 0.0, 0, 0.0
            if validate:
                with autocast:
                    report = evaluate(model, guide, corpus, "validation")
                entry["validation_perplexity"] = report["perplexity"]
                if report["nll"] < best_nll:
                    best_nll, checks_without_gain, result.best_step = report["nll"], 0, step
                    best_state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
                else:
                    checks_without_gain += 1
            result.history.append(entry)
            bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k not in ("step", "epoch")})
            if on_eval is not None:
                on_eval(step, entry)
            if patience is not None and checks_without_gain >= patience:
                result.stopped_early = True
                break
        _, batch = next(batches)
    bar.close()
    if best_state is not None:
        guide.load_state_dict(best_state)
    else:
        result.best_step = result.steps
    return result

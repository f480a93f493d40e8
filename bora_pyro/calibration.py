"""Calibration of next-token predictions: NLL, Brier score and expected calibration error.

Three estimators of the predictive distribution p(w_{i+1} | w_{≤i}) of every held-out token:

- ``plugin``: the LM with one set of adapters, e.g. the guide's median (the MAP of a MAP fit);
- ``draw``: the LM with one posterior draw of the adapters (the first of the S draws);
- ``bma``: the Bayesian model average over S draws, p̄ = (1/S) Σ_s p(· | θ_s), per token.

For each, over the predicted tokens of a split (per task and overall):

- ``nll``: −(1/N) Σ log p(w_true), nats per token (its exp is the perplexity);
- ``brier``: (1/N) Σ Σ_v (p_v − 1[v = w_true])² = Σ_v p_v² − 2 p(w_true) + 1 per token, over
  the whole vocabulary: 0 for a certain right answer, 2 for a certain wrong one;
- ``ece``: the expected calibration error of the top-1 prediction, Σ_b (n_b / N)·|acc_b − conf_b|,
  with confidence = max_v p_v, accuracy = 1[argmax = w_true] and ``BINS`` = 15 equal-width bins
  of confidence on [0, 1] (the binning of Guo et al. 2017, "On calibration of modern neural
  networks"); a bin holds the tokens with confidence in [b/15, (b+1)/15).

The average p̄ needs every draw's whole [tokens, vocab] distribution of a batch at once, so the
loop runs over batches of documents outside and over the draws inside: ``draws`` is called once
per batch and must yield the same S draws every time (:func:`replayable` makes such a source from
a sampler). One draw's factors and two [tokens, vocab] tensors of a batch (the draw's
probabilities and their running sum) are alive at a time, besides the LM's logits. The same pass keeps every document's log-likelihood under every
draw, [S, N] (:class:`Scores`), for PSIS-LOO (:mod:`bora_pyro.inference_data`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from . import distributed
from .allocator import reuse_large_blocks
from .data import DocumentSet
from .errors import ConfigError
from .evaluate import Factors

#: Equal-width confidence bins of the ECE and the reliability diagram.
BINS = 15
ESTIMATORS = ("plugin", "draw", "bma")
BINNING = f"{BINS} equal-width bins of top-1 confidence on [0, 1]"

DrawSource = Callable[[], Iterable[Factors]]
Draw = TypeVar("Draw")


def replayable(make_draws: Callable[[], Iterator[Draw]], device: torch.device) -> Callable[[], Iterator[Draw]]:
    """A source of draws that yields the same draws at every call: each call runs ``make_draws``
    under a fork of torch's RNG seeded alike (the seed is taken from the global RNG once, so
    ``pyro.set_rng_seed`` still decides the draws). The global RNG is left as it was after each call."""
    seed = int(torch.randint(0, 2**62, ()))
    forked = [device] if device.type == "cuda" else []

    def draws() -> Iterator[Draw]:
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(seed)
            yield from make_draws()

    return draws


class CalibrationSums:
    """Running sums of per-token scores per group (e.g. each task, then all documents), float64:
    ``nll``, ``brier``, ``tokens`` [G]; per confidence bin ``count``, ``confidence``, ``correct`` [G, BINS]."""

    def __init__(self, num_groups: int):
        self.num_groups = num_groups
        self.totals = torch.zeros(3, num_groups, dtype=torch.float64)  # nll, brier, tokens
        self.bins = torch.zeros(3, num_groups * BINS, dtype=torch.float64)  # count, confidence, correct

    def add(self, probs: torch.Tensor, log_prob_true: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor) -> None:
        """Score N tokens: ``probs`` [N, V] their predictive distributions, ``log_prob_true`` [N]
        the log-probability of the true token (exact, not log of a rounded probability), ``targets``
        [N] the true tokens, ``groups`` [K, N] the groups each token counts in."""
        confidence, top = probs.max(-1)
        prob_true = probs.gather(-1, targets[:, None]).squeeze(-1)
        brier = (probs.double().square().sum(-1) - 2 * prob_true.double() + 1).clamp(min=0)
        token_totals = torch.stack([-log_prob_true.double(), brier, torch.ones_like(brier)]).cpu()
        bin_of = (confidence.double() * BINS).long().clamp(max=BINS - 1).cpu()
        token_bins = torch.stack([torch.ones_like(brier), confidence.double(), (top == targets).double()]).cpu()
        for row in groups.cpu():
            self.totals.index_add_(1, row, token_totals)
            self.bins.index_add_(1, row * BINS + bin_of, token_bins)

    def reduce_over_ranks(self) -> None:
        """Sum the sums of every process of a data-parallel run (each scored its share of the batches)."""
        self.totals = distributed.sum_over_ranks(self.totals)
        self.bins = distributed.sum_over_ranks(self.bins)

    def summary(self, group: int) -> dict:
        """``{"nll", "brier", "ece", "tokens"}`` of one group (None for all but ``tokens`` if it has none)."""
        nll, brier, tokens = self.totals[:, group].tolist()
        if tokens == 0:
            return {"nll": None, "brier": None, "ece": None, "tokens": 0}
        count, confidence, correct = self.bins[:, group * BINS:(group + 1) * BINS]
        ece = float((correct - confidence).abs().sum()) / tokens
        return {"nll": nll / tokens, "brier": brier / tokens, "ece": ece, "tokens": int(tokens)}

    def reliability(self, group: int) -> dict:
        """The reliability diagram of one group: per non-empty bin its mean confidence, accuracy
        and token count, and the bins' lower edges."""
        count, confidence, correct = self.bins[:, group * BINS:(group + 1) * BINS]
        full = count > 0
        return {"bin_lower": [b / BINS for b in range(BINS) if full[b]],
                "confidence": (confidence[full] / count[full]).tolist(),
                "accuracy": (correct[full] / count[full]).tolist(),
                "count": [int(c) for c in count[full]]}


def predicted_tokens(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The predictions of a right-padded batch's real next tokens: log-probabilities [N, V] float32
    and targets [N], with the row [N] of each (position i predicts token i + 1)."""
    predicted = attention_mask[:, 1:].bool()
    rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(predicted)[predicted]
    return torch.log_softmax(logits[:, :-1][predicted].float(), -1), input_ids[:, 1:][predicted], rows


@dataclass
class Scores:
    """What one pass over a split's documents under S draws leaves: the calibration sums of each
    estimator, over the T tasks (groups 0..T-1) and all documents (group T), and every document's
    log-likelihood under every draw."""

    sums: dict[str, CalibrationSums]
    log_likelihood: torch.Tensor  #: [S, N] float64, log p(doc_n | θ^(s)): its predicted tokens' log-probabilities summed

    def report(self, task_names: Sequence[str]) -> dict:
        """The JSON report of :func:`calibration`."""
        overall = len(task_names)

        def estimates(group: int) -> dict:
            return {name: sums.summary(group) for name, sums in self.sums.items()}

        return {"overall": estimates(overall),
                "tasks": {name: estimates(d) for d, name in enumerate(task_names)
                          if self.sums["draw"].totals[2, d] > 0},
                "bins": BINS, "binning": BINNING,
                "reliability": {name: sums.reliability(overall) for name, sums in self.sums.items()}}


@torch.no_grad()
def score(lm, plugin: Factors | None, draws: DrawSource, documents: DocumentSet, num_tasks: int, pad_token_id: int,
          batch_size: int = 16) -> Scores:
    """One pass over ``documents``, each batch scored by the plug-in and every draw (see
    :func:`calibration` for the arguments)."""
    num_groups = num_tasks + 1  # the tasks, then all documents together
    sums = {name: CalibrationSums(num_groups) for name in ESTIMATORS if plugin is not None or name != "plugin"}
    # S from the source itself (no LM pass): every process knows it, also one left without a batch
    num_draws = sum(1 for _ in draws())
    if num_draws == 0:
        raise ConfigError("no draws of the adapters: ask for at least one sample")
    log_likelihood = torch.zeros(num_draws, len(documents), dtype=torch.float64)
    by_length = sorted(range(len(documents)), key=lambda i: len(documents.documents[i]))
    rank, num_ranks = distributed.world()
    with reuse_large_blocks(lm.device):
        for start in range(rank * batch_size, len(documents), num_ranks * batch_size):
            batch = documents.collate(by_length[start:start + batch_size], pad_token_id).to(lm.device)

            def predictions(factors: Factors | None):
                with contextlib.nullcontext() if factors is None else lm.adapters(factors, batch.task_ids):
                    logits = lm(batch.input_ids, batch.attention_mask, use_cache=False).logits
                return predicted_tokens(logits, batch.input_ids, batch.attention_mask)

            for s, factors in enumerate(draws()):
                log_probs, targets, rows = predictions(factors)
                true = log_probs.gather(-1, targets[:, None]).squeeze(-1)
                probs = log_probs.exp_()  # in place: the [tokens, vocab] log-probabilities are not needed again
                groups = torch.stack([batch.task_ids[rows], torch.full_like(rows, num_groups - 1)])
                log_likelihood[s].index_add_(0, batch.doc_ids[rows].cpu(), true.double().cpu())
                if s == 0:
                    sums["draw"].add(probs, true, targets, groups)
                    probs_sum, log_prob_true = probs, true
                else:
                    probs_sum += probs
                    log_prob_true = torch.logaddexp(log_prob_true, true)
                del factors, log_probs, probs
            sums["bma"].add(probs_sum / num_draws, log_prob_true - math.log(num_draws), targets, groups)
            del probs_sum
            if plugin is not None:
                log_probs, targets, rows = predictions(plugin)
                true = log_probs.gather(-1, targets[:, None]).squeeze(-1)
                sums["plugin"].add(log_probs.exp_(), true, targets, groups)
    for entry in sums.values():
        entry.reduce_over_ranks()
    return Scores(sums, distributed.sum_over_ranks(log_likelihood))


def calibration(
    lm,
    plugin: Factors | None,
    draws: DrawSource,
    documents: DocumentSet,
    task_names: Sequence[str],
    pad_token_id: int,
    batch_size: int = 16,
) -> dict:
    """NLL, Brier score and ECE of the plug-in, one draw and the model average, per task and overall.

    Args:
        plugin: factors [T, ...] per module (None: no plug-in estimator, e.g. a prior without Θ
            for unseen tasks).
        draws: a source of S ≥ 1 draws of the factors, [T, ...] per module, the same draws at
            every call (:func:`replayable`); document n uses row ``documents.task_ids[n]``.
        task_names: the names of the T rows.

    Returns:
        ``{"overall": EST, "tasks": {name: EST}, "bins": 15, "binning": str, "reliability":
        {estimator: {"bin_lower", "confidence", "accuracy", "count"}}}`` (the reliability diagram
        over all documents), EST = ``{"plugin"|"draw"|"bma": {"nll", "brier", "ece", "tokens"}}``.
        Tasks without documents are left out.
    """
    return score(lm, plugin, draws, documents, len(task_names), pad_token_id, batch_size).report(task_names)

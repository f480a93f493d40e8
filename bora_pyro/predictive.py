"""Posterior predictive analysis of a fitted BoRA model, one adapter draw at a time.

Every function here streams: it draws the latent sites from the guide, turns them into every
task's factors, uses them and drops them, so at most two draws are alive at once, whatever the
number of samples S (``pyro.infer.Predictive`` would hold all S at once, plus the guide's
auxiliary sites).

- :func:`posterior_factors`: S draws of every task's factors [D, ...].
- :func:`posterior_perplexities`: per-task perplexity under S draws (mean, median, credible
  interval, model average, plug-in), a task store's guide read a pass of tasks at a time.
- :func:`predictive_perplexity`: per-task perplexity under S draws (mean, median, credible
  interval), the Bayesian model average (log-mean-exp over draws per document) and the plug-in
  perplexity at the guide's median (the posterior mean for AutoNormal's Normal sites, the MAP
  for AutoDelta).
- :func:`new_task_factors`, :func:`global_factors`: adapters of unseen tasks, drawn from
  p(θ_new | Θ, τ), and the global adapter Θ.
- :func:`prior_factors`: adapters drawn from the prior alone (a prior predictive check before fitting).
- :func:`shrinkage`: ‖θ̂_d − Θ̂‖ at the guide's median and the posterior spread of each task's factors.
- :func:`predictive_calibration`, :func:`new_task_calibration`: NLL, Brier score and ECE of the
  next-token predictions of the plug-in, one draw and the model average (:mod:`bora_pyro.calibration`).

A few-shot fit of a new task is :meth:`BoRA.for_new_tasks <bora_pyro.models.BoRA.for_new_tasks>`
followed by :func:`~bora_pyro.fit`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from pyro import poutine

from .allocator import reuse_large_blocks
from .calibration import Scores, calibration, replayable, score
from .data import Batch, DocumentSet
from .errors import ConfigError
from .evaluate import Factors, document_log_probs, document_passes
from .guides import only_tasks
from .guides.laplace_tau import GridLogTau, with_tau
from .models import BoRA
from .models.priors import PACKED, factor_layout
from .task_store import guide_task_store

#: A draw of every latent site of a guide: site name → value.
SiteValues = Mapping[str, torch.Tensor]


@torch.no_grad()
def guide_draws(guide, batch: Batch, num_samples: int) -> Iterator[SiteValues]:
    """``num_samples`` joint draws of the guide's latent sites, one at a time.

    ``batch`` only lets the guide run (its sites do not depend on the data): any batch of the
    model, e.g. :meth:`Batch.probe <bora_pyro.data.Batch.probe>`. Seed with ``pyro.set_rng_seed``.
    """
    for _ in range(num_samples):
        yield {name: value.detach() for name, value in guide(batch).items()}


def posterior_factors(model, guide, batch: Batch, num_samples: int) -> Iterator[Factors]:
    """``num_samples`` posterior draws of every task's factors: module name → (lora_A [D, r, in],
    lora_B [D, out, r]), one draw at a time."""
    for values in guide_draws(guide, batch, num_samples):
        yield model.task_factors(values)


@torch.no_grad()
def prior_factors(model, num_samples: int) -> Iterator[Factors]:
    """``num_samples`` draws of every task's factors from the model's prior (Θ, τ, … included),
    one at a time: what the prior implies before any fit. Not for a flat (improper) prior: its
    masked Normal gives draws of a Normal(0, 1) that the prior does not mean."""
    for _ in range(num_samples):
        with poutine.block():
            yield model.prior(model.lm.modules_spec, model.tasks_plate())


def prior_adapters(lm, prior, num_draws: int) -> Factors:
    """``num_draws`` one-task adapters drawn from ``prior`` alone, each with its own Θ, τ, …:
    [num_draws, ...] per module (row k: draw k), for text from a prior before any fit."""
    draws = list(prior_factors(BoRA(lm, prior, num_tasks=1), num_draws))
    return {name: (torch.cat([draw[name][0] for draw in draws]), torch.cat([draw[name][1] for draw in draws]))
            for name in draws[0]}


def new_task_factors(model, values: SiteValues, num_new: int = 1) -> Factors:
    """Factors of ``num_new`` unseen tasks drawn from p(θ_new | Θ, τ), the shared sites (Θ, τ, …)
    fixed at ``values`` (e.g. one posterior draw): [num_new, ...] per module."""
    with torch.no_grad():
        return model.for_new_tasks(values, num_new).task_factors({})


def global_factors(model, values: SiteValues, num_tasks: int = 1) -> Factors:
    """The global adapter Θ as the adapter of ``num_tasks`` tasks, [num_tasks, ...] per module (a
    view: no copies), from the value of the packed ``global.lora`` site or of the
    ``global.<module>.lora_A|lora_B`` sites (e.g. ``guide.median()``).

    Raises:
        ConfigError: ``values`` hold no global factors (e.g. a fit with the ``Independent`` prior).
    """
    modules = model.lm.modules_spec
    if f"global.{PACKED}" in values:
        theta = factor_layout(modules).unpack(values[f"global.{PACKED}"][None])
    else:
        theta = global_site_factors(model, values)
    return {name: (A.expand(num_tasks, *A.shape[1:]), B.expand(num_tasks, *B.shape[1:]))
            for name, (A, B) in theta.items()}


def global_site_factors(model, values: SiteValues) -> Factors:
    """Θ from the per-module sites ``global.<module>.lora_A|lora_B``, [1, ...] per module."""
    modules = model.lm.modules_spec
    names = [(f"global.{spec.name}.lora_A", f"global.{spec.name}.lora_B") for spec in modules]
    if not all(a in values and b in values for a, b in names):
        raise ConfigError(f"the prior {model.prior!r} has no global adapter Θ (no global.lora or "
                          "global.<module>.lora_A|lora_B sites): use a task's adapter (--task NAME)")
    return {spec.name: (values[a][None], values[b][None]) for spec, (a, b) in zip(modules, names)}


def summarize(per_draw: torch.Tensor, bma: float, plugin: float | None, tokens: int, interval: float) -> dict:
    """``{"mean", "median", "ci", "bma", "plugin", "tokens"}`` from the perplexities of S draws, [S] float64."""
    tail = (1 - interval) / 2
    low, median, high = torch.quantile(per_draw, torch.tensor([tail, 0.5, 1 - tail], dtype=per_draw.dtype))
    return {"mean": float(per_draw.mean()), "median": float(median), "ci": [float(low), float(high)],
            "bma": bma, "plugin": plugin, "tokens": tokens}


@torch.no_grad()
def sample_perplexities(
    lm,
    draws: Iterator[Factors],
    documents: DocumentSet,
    task_names: Sequence[str],
    pad_token_id: int,
    plugin: Factors | None = None,
    interval: float = 0.9,
    batch_size: int = 16,
) -> dict:
    """Perplexity of ``documents`` under each draw of the factors, summarised per task and overall.

    Args:
        draws: S draws of the factors, [T, ...] per module; document n uses row
            ``documents.task_ids[n]`` of each, named ``task_names[...]``.
        plugin: one set of factors to report beside the draws (e.g. the posterior mean), or None.
        interval: mass of the central credible interval of the per-draw perplexities.

    Returns:
        ``{"perplexity": {...}, "tasks": {name: {...}}, "samples": S}`` with, per task and overall,
        ``mean`` (average over draws of each draw's perplexity), ``median``, ``ci`` = [lo, hi],
        ``bma`` (the Bayesian model average, pointwise: exp of minus the per-token mean of
        log (1/S) Σ_s p(doc | θ_s) over the documents), ``plugin`` and ``tokens``. Memory does not
        grow with S: per draw only its per-task log-likelihood sums are kept.
    """
    sums = DrawSums(documents, task_names, interval)
    with reuse_large_blocks(lm.device):  # a draw's [D, P] tensors reuse the memory of the draw before
        for draw, factors in enumerate(draws):
            sums.add(draw, *document_log_probs(lm, factors, documents, pad_token_id, batch_size))
            del factors  # before the next draw is made
    if plugin is not None:
        sums.add_plugin(document_log_probs(lm, plugin, documents, pad_token_id, batch_size)[0])
    return sums.report()


@torch.no_grad()
def posterior_perplexities(model, guide, documents: DocumentSet, task_names: Sequence[str], pad_token_id: int,
                           num_samples: int = 32, interval: float = 0.9, batch_size: int = 16) -> dict:
    """:func:`sample_perplexities` of ``num_samples`` posterior draws, with the guide's median as
    the plug-in. A guide with a task store is read :data:`~bora_pyro.task_store.TASKS_PER_PASS`
    tasks at a time: a pass draws its tasks' rows S times and scores their documents, so memory
    holds K tasks' factors, not D. Draw s of every pass takes the shared sites (Θ, τ, …) of the
    first pass's draw s, so each draw is one joint draw of all tasks (the store's guides are
    mean-field in the tasks: their rows do not depend on Θ's draw)."""
    if num_samples < 1:
        raise ConfigError(f"num_samples must be ≥ 1, got {num_samples}: ask for at least one draw")
    store = guide_task_store(guide)
    if store is None or not store.sites:
        draws = posterior_factors(model, guide, Batch.probe(device=model.lm.device), num_samples)
        return sample_perplexities(model.lm, draws, documents, task_names, pad_token_id,
                                   plugin=model.task_factors(guide.median()), interval=interval, batch_size=batch_size)
    sums = DrawSums(documents, task_names, interval)
    shared: list[SiteValues] = []  # draw s → its shared sites
    for tasks, rows, part in document_passes(documents, model.num_tasks):
        probe = Batch.probe(device=model.lm.device, tasks=tasks)
        with store.holding(), reuse_large_blocks(model.lm.device):  # the pass's rows read once for its S draws
            for draw, values in enumerate(guide_draws(guide, probe, num_samples)):
                if draw == len(shared):
                    shared.append({name: values[name] for name in model.shared_site_names if name in values})
                factors = model.task_factors(values | shared[draw], tasks)
                sums.add(draw, *document_log_probs(model.lm, factors, part, pad_token_id, batch_size), rows)
            with only_tasks(guide, tasks):
                plugin = model.task_factors(guide.median(), tasks)
        sums.add_plugin(document_log_probs(model.lm, plugin, part, pad_token_id, batch_size)[0], rows)
    return sums.report()


class DrawSums:
    """What :func:`sample_perplexities` keeps of S draws over a set of N documents, whether a draw
    scores them all at once or a part at a time: per draw its per-task log-likelihood sums, per
    document log Σ_s p(doc | θ_s), and the plug-in's log-likelihood."""

    def __init__(self, documents: DocumentSet, task_names: Sequence[str], interval: float):
        if not 0 < interval < 1:
            raise ConfigError(f"interval must be between 0 and 1, got {interval}; e.g. interval=0.9")
        task_ids = torch.as_tensor(documents.task_ids, dtype=torch.long)
        self.task_names, self.interval = task_names, interval
        self.num_groups = len(task_names) + 1  # the tasks, then all documents together
        self.groups = torch.stack([task_ids, torch.full_like(task_ids, self.num_groups - 1)])  # [2, N]
        self.per_draw: list[torch.Tensor] = []  # S × [groups] log-likelihood sums
        self.running = torch.full((len(documents),), -math.inf, dtype=torch.float64)  # log Σ_s p(doc | θ_s)
        self.tokens = torch.zeros(len(documents), dtype=torch.long)
        self.plugin: torch.Tensor | None = None

    def add(self, draw: int, log_probs: torch.Tensor, tokens: torch.Tensor, rows: list[int] | None = None) -> None:
        """Draw ``draw``'s log-likelihoods [K] and predicted tokens [K] of documents ``rows`` (all: None)."""
        rows = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        if draw == len(self.per_draw):
            self.per_draw.append(torch.zeros(self.num_groups, dtype=torch.float64))
        self.running[rows] = torch.logaddexp(self.running[rows], log_probs.double())
        self.per_draw[draw] += group_sums(log_probs.double(), self.groups[:, rows], self.num_groups)
        self.tokens[rows] = tokens

    def add_plugin(self, log_probs: torch.Tensor, rows: list[int] | None = None) -> None:
        """The plug-in's log-likelihoods [K] of documents ``rows`` (all: None)."""
        if self.plugin is None:
            self.plugin = torch.zeros(len(self.running), dtype=torch.float64)
        self.plugin[slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long)] = log_probs.double()

    def report(self) -> dict:
        """:func:`sample_perplexities`' report."""
        if not self.per_draw:
            raise ConfigError("no draws of the adapters: ask for at least one sample")
        num_samples, groups, num_groups = len(self.per_draw), self.groups, self.num_groups
        tokens = group_sums(self.tokens.double(), groups, num_groups)
        token_sums = tokens.clamp(min=1)
        sample_ppl = torch.exp(-torch.stack(self.per_draw) / token_sums)  # [S, groups]
        bma_ppl = torch.exp(-group_sums(self.running - math.log(num_samples), groups, num_groups) / token_sums)
        plugin_ppl = None if self.plugin is None else torch.exp(-group_sums(self.plugin, groups, num_groups) / token_sums)

        def entry(group: int) -> dict:
            return summarize(sample_ppl[:, group], float(bma_ppl[group]),
                             None if plugin_ppl is None else float(plugin_ppl[group]), int(tokens[group]), self.interval)

        return {"perplexity": entry(num_groups - 1),
                "tasks": {name: entry(d) for d, name in enumerate(self.task_names) if tokens[d] > 0},
                "samples": num_samples}


def group_sums(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sums of ``values`` [N] per group, for each row of ``groups`` [K, N] (indices < num_groups): [num_groups]."""
    sums = torch.zeros(num_groups, dtype=values.dtype)
    for row in groups:
        sums.index_add_(0, row, values)
    return sums


def predictive_perplexity(model, guide, corpus, split: str = "test", num_samples: int = 32,
                          interval: float = 0.9, batch_size: int = 16) -> dict:
    """Per-task and overall perplexity of a split of ``corpus`` under ``num_samples`` posterior
    draws of the adapters, their Bayesian model average, and the plug-in perplexity of the guide's
    median (see :func:`sample_perplexities` for the keys). Seed with ``pyro.set_rng_seed``."""
    return posterior_perplexities(model, guide, corpus.documents(split), corpus.task_names, corpus.pad_token_id,
                                  num_samples, interval, batch_size)


def new_task_perplexity(model, guide, documents: DocumentSet, task_names: Sequence[str], pad_token_id: int,
                        num_samples: int = 32, interval: float = 0.9, batch_size: int = 16,
                        tau_posterior: Mapping[str, GridLogTau] | None = None) -> dict:
    """Perplexity of documents of tasks the model was not fitted on, under the prior predictive:
    each draw takes Θ, τ, … from the posterior and gives every unseen task its own adapter from
    p(θ_new | Θ, τ). ``documents.task_ids`` index ``task_names``. No plug-in value.
    ``tau_posterior`` as in :func:`new_task_draws`."""
    draws = new_task_draws(model, guide, len(task_names), num_samples, tau_posterior)
    return sample_perplexities(model.lm, draws, documents, task_names, pad_token_id, interval=interval,
                               batch_size=batch_size)


def new_task_draws(model, guide, num_new: int, num_samples: int,
                   tau_posterior: Mapping[str, GridLogTau] | None = None) -> Iterator[Factors]:
    """``num_samples`` draws of ``num_new`` unseen tasks' factors: each takes Θ, τ, … from a
    posterior draw and θ_new from p(θ | Θ, τ); the τ sites of ``tau_posterior`` (a Laplace step's,
    :mod:`bora_pyro.guides.laplace_tau`) from it instead of the guide."""
    # only Θ, τ, … are used: a guide with a task store draws one task's rows, not D
    probe = Batch.probe(device=model.lm.device, tasks=None if guide_task_store(guide) is None else [0])
    for values in guide_draws(guide, probe, num_samples):
        yield new_task_factors(model, with_tau(values, tau_posterior, draw=True), num_new)


def replayable_guide_draws(model, guide, num_samples: int):
    """A source of ``num_samples`` guide draws (site name → value) that yields the same draws at
    every call (:func:`~bora_pyro.calibration.replayable`)."""
    batch = Batch.probe(device=model.lm.device)
    return replayable(lambda: guide_draws(guide, batch, num_samples), model.lm.device)


def predictive_calibration(model, guide, documents: DocumentSet, task_names: Sequence[str], pad_token_id: int,
                           num_samples: int = 32, batch_size: int = 16) -> dict:
    """Calibration of the next-token predictions of the fitted tasks' ``documents`` (task ids
    index ``task_names``, the model's tasks): the plug-in at the guide's median, one posterior draw
    and the average over ``num_samples`` draws. See :func:`~bora_pyro.calibration.calibration`."""
    values = replayable_guide_draws(model, guide, num_samples)
    return posterior_scores(model, guide, values, documents, len(task_names), pad_token_id, batch_size).report(task_names)


def posterior_scores(model, guide, values, documents: DocumentSet, num_tasks: int, pad_token_id: int,
                     batch_size: int = 16) -> Scores:
    """One pass over ``documents`` (:func:`~bora_pyro.calibration.score`) by the plug-in at the
    guide's median and the task factors of every draw of ``values``, a replayable source of guide
    draws (:func:`replayable_guide_draws`)."""
    return score(model.lm, model.task_factors(guide.median()), lambda: map(model.task_factors, values()), documents,
                 num_tasks, pad_token_id, batch_size)


def new_task_calibration(model, guide, documents: DocumentSet, task_names: Sequence[str], pad_token_id: int,
                         num_samples: int = 32, batch_size: int = 16,
                         tau_posterior: Mapping[str, GridLogTau] | None = None) -> dict:
    """Calibration for tasks the model was not fitted on, under the prior predictive (each draw:
    Θ, τ, … from the posterior, θ_new ~ p(θ | Θ, τ); ``tau_posterior`` as in :func:`new_task_draws`);
    the plug-in is the global adapter Θ at the guide's median (none for a prior without Θ)."""
    # θ_new is drawn inside the replayed source, so every batch sees the same new tasks' adapters
    draws = replayable(lambda: new_task_draws(model, guide, len(task_names), num_samples, tau_posterior),
                       model.lm.device)
    try:
        plugin = global_factors(model, guide.median(), len(task_names))
    except ConfigError:
        plugin = None
    return calibration(model.lm, plugin, draws, documents, task_names, pad_token_id, batch_size)


def flatten_factors(factors: Factors) -> torch.Tensor:
    """Every module's (lora_A, lora_B) of T tasks as one [T, P] float64 matrix."""
    return torch.cat([t.flatten(1) for pair in factors.values() for t in pair], dim=1).double()


@torch.no_grad()
def shrinkage(model, guide, task_sizes: Mapping[str, int], task_names: Sequence[str], num_samples: int = 32) -> dict:
    """Shrinkage diagnostics per task:

    - ``distance``: ‖θ̂_d − Θ̂‖ over all factors of all modules, at the guide's median (a mean of
      draws would add their Monte Carlo noise, P·σ²/S, largest for the smallest tasks), and
      ``relative_distance`` = distance / ‖Θ̂‖; both None when the prior has no global factors;
    - ``spread``: the posterior standard deviation of θ_d's entries from ``num_samples`` draws,
      root-mean-square over entries (None for fewer than 2 draws);
    - ``size``: ``task_sizes[name]`` (e.g. training documents).

    Welford's running moments keep memory at a few [D, P] tensors whatever S.
    """
    median = guide.median()
    theta_hat = flatten_factors(model.task_factors(median))  # [D, P]
    try:
        theta_global = flatten_factors(global_factors(model, median))[0]  # [P]
    except ConfigError:
        theta_global = None
    mean, m2 = torch.zeros_like(theta_hat), torch.zeros_like(theta_hat)
    for s, factors in enumerate(posterior_factors(model, guide, Batch.probe(device=model.lm.device), num_samples), 1):
        theta = flatten_factors(factors)
        delta = theta - mean
        mean += delta / s
        m2 += delta * (theta - mean)
    spread = (m2 / (num_samples - 1)).mean(1).sqrt() if num_samples > 1 else None  # [D]
    report = {}
    for d, name in enumerate(task_names):
        distance = None if theta_global is None else float((theta_hat[d] - theta_global).norm())
        report[name] = {
            "distance": distance,
            "relative_distance": None if distance is None else distance / max(float(theta_global.norm()), 1e-12),
            "spread": None if spread is None else float(spread[d]),
            "size": task_sizes.get(name),
        }
    return report

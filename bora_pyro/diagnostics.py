"""Whether a fitted guide is a fitted posterior: the ELBO's convergence, and each group of latent
entries' posterior spread against its prior's (``bora-pyro diagnose``, ``metrics.json``).

For a group G of factor entries (``global``, ``task``, a prior's own level such as ``cluster``,
or ``task.<group>`` per τ group of a :class:`~bora_pyro.models.HierarchicalNormal` with
``tau_per``), with guide scales σ_i, start scales σ_i⁰ and conditional prior sds s_i (the prior
at the guide's median: τ^{-1/2} for a task entry, at τ's posterior median when τ is learned):

    posterior_sd_mean/min/max = mean/min/max σ_i
    prior_sd                  = sqrt(mean s_i²)                (null for a flat prior)
    contraction               = 1 − mean σ_i² / prior_sd²      (1: the data pinned it; 0: prior's spread)
    scales_moved              = share of i with |log σ_i − log σ_i⁰| > log 2

A point-mass (MAP) guide has no scales: its groups report ``prior_sd`` and nulls. Hyperparameter
sites (a latent τ) get their posterior median and 90 % interval: a fit's Laplace step's when it
took one (``"method": "laplace"``, :mod:`bora_pyro.guides.laplace_tau`), else the guide's q(τ)
(``"method": "guide"``).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping, Sequence

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuideList

from .convergence import elbo_trend
from .guides import only_tasks, quantiles
from .guides.laplace_tau import GridLogTau, with_tau
from .guides.structured import ConjugateTaskNormal
from .guides.taskwise import TaskwiseNormal, rows_key, unconstrained_prior_sd
from .models.priors import (
    FACTORS, PACKED, HierarchicalNormal, factor_layout, is_factor_site, latent_sites, subsampled,
)
from .task_store import StoredRows, guide_task_store, task_passes

MOVED = math.log(2)  #: a scale "moved" when its log left its start by more than this


def normal_parts(guide) -> list[TaskwiseNormal]:
    """The mean-field parts of a guide (itself, or those of an ``AutoGuideList``)."""
    parts = list(guide) if isinstance(guide, AutoGuideList) else [guide]
    return [part for part in parts if isinstance(part, TaskwiseNormal)]


def site_log_scales(guide) -> dict[str, torch.Tensor | None]:
    """Copies of the guide's log σ per mean-field site, stacked over all tasks ([D, ...] for a task
    site): a fit's start, for ``scales_moved``. None for a site whose rows a task store holds: not
    copied, as they start where the store started them (:meth:`StoredRows.start`, read a pass at a
    time). For a :class:`~bora_pyro.guides.structured.ConjugateTaskNormal`, the log sd of its
    factor sites' conditionals (:meth:`marginals`) and its hyperparameters' log σ."""
    if isinstance(guide, ConjugateTaskNormal):
        with torch.no_grad():
            factors = {name: sd.log().clone() for name, (_, sd) in guide.marginals().items()}
        return factors | (site_log_scales(guide.hyper) if guide.hyper is not None else {})
    stored = stored_log_scales(guide)
    return {name: None for name in stored} | log_scales(guide, skip=stored)


def log_scales(guide, skip=()) -> dict[str, torch.Tensor]:
    """The guide's log σ per mean-field site but those in ``skip`` (within :func:`only_tasks`, the
    task sites' rows of those tasks)."""
    return {name: part._get_loc_and_scale(name)[1].detach().log()
            for part in normal_parts(guide) for name, _ in part.prototype_trace.iter_stochastic_nodes()
            if name not in skip}


def stored_log_scales(guide) -> dict[str, StoredRows]:
    """The mean-field sites whose log σ rows a task store holds: their :class:`StoredRows`."""
    found = {}
    for part in normal_parts(guide):
        rows = part.task_rows("task_log_scales")
        for name, _ in part.prototype_trace.iter_stochastic_nodes():
            if rows_key(name) in rows and isinstance(rows[rows_key(name)], StoredRows):
                found[name] = rows[rows_key(name)]
    return found


def entry_groups(prior, modules, name: str) -> list[tuple[str, slice]]:
    """The groups of a factor site's entries along its last dim: ``[(group, slice)]``.

    A site is one group named by its level (``global.lora`` → ``global``), except the task sites
    of a :class:`HierarchicalNormal` with one τ per group, split into ``task.<group>``."""
    level = name.split(".", 1)[0]
    per_group = isinstance(prior, HierarchicalNormal) and prior.precision.per != "all"
    if level != "task" or not per_group:
        return [(level, slice(None))]
    group_of, rest = prior.precision.group, name.split(".", 1)[1]
    if re.fullmatch(rf"{PACKED}(_offset|_decentered)?", rest):
        return [(f"task.{group_of(s.module, s.factor)}", slice(s.offset, s.offset + s.numel))
                for s in factor_layout(tuple(modules)).segments]
    module_name, factor_name = rest.rsplit(".", 1)
    module = next(m for m in modules if m.name == module_name)
    factor = next(f for f in FACTORS if factor_name.startswith(f))
    return [(f"task.{group_of(module, factor)}", slice(None))]


def conditional_prior_sds(model, values: dict[str, torch.Tensor],
                          tasks: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Every latent site's prior sd given the other sites at ``values`` (inf where flat); with
    ``tasks``, of those tasks' rows (``values`` holding theirs only, as within :func:`only_tasks`)."""
    plate = model.tasks_plate() if tasks is None else subsampled(model.tasks_plate(), tasks)
    with poutine.block():
        trace = poutine.trace(poutine.condition(model.prior, data=values)).get_trace(model.lm.modules_spec, plate)
    return {name: unconstrained_prior_sd(site["fn"], site["value"]) for name, site in trace.nodes.items()
            if name in values and site["type"] == "sample"}


def site_groups(model, guide, start_log_scales: dict[str, torch.Tensor | None],
                tau_posterior: Mapping[str, GridLogTau] | None = None) -> dict[str, dict]:
    """The ``sites`` part of :func:`diagnose`: one summary per group of factor entries, the prior
    conditioned on the guide's median (its τ: ``tau_posterior``'s median when given). A guide
    with a task store is read a pass of :data:`~bora_pyro.task_store.TASKS_PER_PASS` tasks at a
    time, the shared sites in the first."""
    store = guide_task_store(guide)
    passes = [None] if store is None or not store.sites else task_passes(model.num_tasks)
    stored = stored_log_scales(guide)
    sums: dict[str, dict[str, float]] = {}
    for tasks in passes:
        with contextlib.nullcontext() if tasks is None else store.holding(), only_tasks(guide, tasks):
            medians = with_tau({name: value.detach() for name, value in guide.median().items()}, tau_posterior, draw=False)
            scales = site_log_scales(guide) if tasks is None else log_scales(guide)  # also a ConjugateTaskNormal's
        for name, prior_sd in conditional_prior_sds(model, medians, tasks).items():
            if not is_factor_site(name) or (tasks is not None and tasks.start > 0 and name in model.shared_site_names):
                continue
            start = start_log_scales.get(name)
            if start is None and name in stored:  # a store's rows start where it started them
                start = stored[name].start(tasks)
            for group, entries in entry_groups(model.prior, model.lm.modules_spec, name):
                add_entries(sums.setdefault(group, {"count": 0, "prior_var": 0.0, "var": 0.0, "sd_min": math.inf,
                                                    "sd_max": 0.0, "moved": 0, "flat": False, "has_scales": False}),
                            prior_sd[..., entries], scales[name][..., entries] if name in scales else None,
                            start[..., entries] if name in scales else None)
    return {group: summary(total) for group, total in sums.items()}


def add_entries(total: dict, prior_sd: torch.Tensor, log_sd: torch.Tensor | None, start: torch.Tensor | None) -> None:
    """Add a site's entries of one group to the group's sums: their prior sds, and their log σ and
    its start (None for a point mass)."""
    total["count"] += prior_sd.numel()
    total["flat"] |= bool(torch.isinf(prior_sd).any())
    total["prior_var"] += float(prior_sd.double().square().sum())
    if log_sd is not None:
        sd = log_sd.double().exp()
        total["has_scales"] = True
        total["var"] += float(sd.square().sum())
        total["sd_min"] = min(total["sd_min"], float(sd.min()))
        total["sd_max"] = max(total["sd_max"], float(sd.max()))
        total["moved"] += int(((log_sd - start).abs() > MOVED).sum())


def summary(total: dict) -> dict:
    count = total["count"]
    prior_sd = None if total["flat"] else math.sqrt(total["prior_var"] / count)
    if not total["has_scales"]:
        return {"posterior_sd_mean": None, "posterior_sd_min": None, "posterior_sd_max": None,
                "prior_sd": prior_sd, "contraction": None, "scales_moved": None, "entries": count}
    posterior_var = total["var"] / count
    return {
        "posterior_sd_mean": math.sqrt(posterior_var), "posterior_sd_min": total["sd_min"],
        "posterior_sd_max": total["sd_max"], "prior_sd": prior_sd,
        "contraction": None if prior_sd is None else 1 - posterior_var / prior_sd**2,
        "scales_moved": total["moved"] / count, "entries": count,
    }


def hyperparameters(model, guide, tau_posterior: Mapping[str, GridLogTau] | None = None) -> dict[str, dict]:
    """Posterior median and 90 % interval of every hyperparameter site (a latent τ): from
    ``tau_posterior`` (a Laplace step's, :mod:`bora_pyro.guides.laplace_tau`) for its sites, else
    the guide's; ``method`` says which (``"laplace"`` or ``"guide"``)."""
    names = [name for name in latent_sites(model.prior, model.lm.modules_spec, model.tasks_plate())
             if not is_factor_site(name)]
    if not names:
        return {}
    tau_posterior = tau_posterior or {}
    store = guide_task_store(guide)
    with only_tasks(guide, None if store is None else [0]):  # a store's task rows: one task's, not all D
        values = quantiles(guide, [0.05, 0.5, 0.95])
    values |= {name: posterior.icdf(torch.tensor([0.05, 0.5, 0.95])) for name, posterior in tau_posterior.items()}
    return {name: {"median": float(values[name][1]), "ci90": [float(values[name][0]), float(values[name][2])],
                   "method": "laplace" if name in tau_posterior else "guide"} for name in names}


def diagnose(model, guide, elbos: Sequence[float], start_log_scales: dict[str, torch.Tensor | None],
             elbo_window: int, tau_posterior: Mapping[str, GridLogTau] | None = None) -> dict:
    """``{"elbo": ..., "sites": {GROUP: ...}, "hyper": {NAME: ...}}`` (see the module docstring):
    ``elbos`` are the fit's per-step ELBOs (:attr:`~bora_pyro.fit.FitResult.elbos`),
    ``start_log_scales`` the guide's log σ at its start (:func:`site_log_scales` before fitting),
    ``tau_posterior`` a Laplace step's posterior of the latent τ sites (:func:`hyperparameters`)."""
    trend = elbo_trend(elbos, elbo_window)
    elbo = trend.to_json() if trend is not None else {
        "converged": False, "final": None, "slope_per_100_steps": None, "noise_sd": None, "window": len(elbos),
        "rising": False}
    with torch.no_grad():
        return {"elbo": elbo, "sites": site_groups(model, guide, start_log_scales, tau_posterior),
                "hyper": hyperparameters(model, guide, tau_posterior)}

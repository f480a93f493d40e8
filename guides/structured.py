"""A guide whose Θ and task factors follow τ: prior conditionals times learned Gaussian evidence.

The mean-field guides fit q(τ) q(Θ) Π_d q(θ_d) with every factor independent. For a learned τ
that is overconfident: the τ-terms of the ELBO are then E_q log p(θ | Θ, τ) = (D·P/2) log τ −
(τ/2)·E_q‖θ − Θ‖², a Gamma in τ with D·P/2 degrees of freedom whatever the data say, so
sd_q(log τ) ≈ √(2/(D·P)) even where the documents hardly inform the task factors (and the
exact posterior of τ is then near its hyperprior). The same family in the non-centred
parametrisation fails the other way: where the documents pin θ_d, z_d = τ^{1/2}(θ_d − Θ) moves
with τ, which a q(z_d) independent of τ cannot follow.

:func:`conjugate_guide` keeps the hyperparameters (τ, …) mean-field and gives Θ and the task
factors the exact conditional posteriors of a model in which each task's documents are a Gaussian
pseudo-observation of its factors: a learned m_{d,j} with sd s_{d,j} per entry. With the prior
conditional of a task entry p(θ_{d,j} | Θ, τ) = Normal(μ_{d,j}, σ_{d,j}²) (for
:class:`~bora_pyro.models.HierarchicalNormal` with ``centered=True``: μ = Θ_j, σ = τ^{-1/2}):

    q(θ_{d,j} | Θ, τ) ∝ Normal(θ_{d,j}; μ_{d,j}, σ_{d,j}²) · Normal(m_{d,j}; θ_{d,j}, s_{d,j}²)
                      = Normal(μ + σ²/(σ² + s²)·(m − μ),  σ² s²/(σ² + s²)),
    q(Θ_i | τ)        ∝ Normal(Θ_i; μ₀_i, g_i²) · Π_{(d,j) → i} Normal(m_{d,j}; Θ_i, σ_{d,j}² + s_{d,j}²),

the second with θ_d integrated out, over all D tasks ((d, j) → i: entry j of task d is centred
on Θ_i). Where the documents say little (s ≫ σ), q(θ_d | Θ, τ) is the prior conditional: draws
θ_d = Θ + τ^{-1/2}·ε move with every draw of τ and Θ, E_q[log p(θ | Θ, τ) − log q(θ | Θ, τ)] no
longer depends on τ, and the documents, not the guide, set q(τ); where they say much (s ≪ σ) q is
Normal(m_d, s_d²) whatever τ, the centred parametrisation's strength. Θ's conditional carries
its dependence on τ (its spread across tasks is τ^{-1/2}), which a mean-field q(Θ) cannot. The
whole guide is q(u) · q(Θ | u) · Π_d q(θ_d | Θ, u), u = log τ (each hyperparameter on its
unconstrained scale) mean-field Normal, drawn by reparametrisation (u, Θ, then θ_d), so ∂ELBO
reaches q(u) through Θ's and the tasks' draws.

Parameters: per task entry m and log s (two numbers, as the mean-field guide: one leaf per task,
:mod:`guides.taskwise`); per hyperparameter a loc and log σ. Cost per step: the prior runs once
more in the guide, for all D tasks (Θ's conditional sums over them, so every task's leaves get a
gradient each step), and a few elementwise passes over the [D, P] pseudo-observations.

Limits, measured by ``benchmarks/sbc.py`` (results in ``benchmarks/results/sbc.json``): this
guide's intervals for τ are wider than the mean-field guides' and hold the true τ far more often,
but its ranks are not uniform: its median of τ sits above the true τ, as every guide's measured
there does, and where NUTS was run on the same replications, above NUTS's. A full-rank Gaussian
pseudo-observation per task (a dense 32 × 32 precision, in an experiment not kept) moved the ranks
little, so the diagonal stand-in is not the whole cause. Where the documents say little about an
entry the ELBO hardly depends on its (m, s), and those leave their start little: the exact
posterior of τ given the fitted evidence moves from above NUTS's to below it as s starts at
≤ 0.01, 3 or 10, with the ELBO within 0.2 nats (``benchmarks/sbc.py``'s docstring).

The combination happens in the task site's own space, so the parametrisation matters: with
``centered=True`` the Gaussian stand-in is one for the LM's evidence about θ_d itself. Offsets
(``centered=False``) would make q(θ_d − Θ) independent of Θ, and ``LocScaleReparam`` sites hold
z_d, whose prior does not depend on τ at all; both lose the point of the guide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide.guides import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.poutine.messenger import Messenger
from torch import nn

from bora_pyro.errors import ConfigError
from bora_pyro.models.normal import normal
from bora_pyro.models.priors import is_factor_site

from . import MAX_START_SCALE, START_FRACTION, LoRAInit, check_init_scale, taskwise_normal
from .taskwise import TASKS, TaskwiseMixin, is_flat, rows_key, task_rows


def normal_parameters(fn: torch.distributions.Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) of a site's Normal prior, possibly inside ``Independent`` (and expanded by
    plates), broadcast to its value shape; a flat (masked-out) Normal has scale inf."""
    base, flat = fn, is_flat(fn)
    while isinstance(base, (dist.Independent, MaskedDistribution)):
        base = base.base_dist
    if not isinstance(base, torch.distributions.Normal):
        raise ConfigError(f"conjugate_guide needs Normal factor sites (e.g. HierarchicalNormal(..., centered=True)), "
                          f"got {type(base).__name__}")
    shape = fn.batch_shape + fn.event_shape
    scale = torch.full(shape, math.inf) if flat else base.scale.expand(shape)
    return base.loc.expand(shape), scale


class NormalPriors(Messenger):
    """Records the (loc, scale) of every Normal factor site it sees and sets its value to
    ``values[name]`` when given, else to the loc: a prior run without noise."""

    def __init__(self, values: Mapping[str, torch.Tensor]):
        super().__init__()
        self.values = values
        self.priors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and is_factor_site(msg["name"]):
            self.priors[msg["name"]] = normal_parameters(msg["fn"])
            msg["value"] = self.values.get(msg["name"], self.priors[msg["name"]][0])


def global_site_of(task_site: str) -> str:
    """The global site a task site is centred on: ``task.X`` → ``global.X``."""
    return "global." + task_site.split(".", 1)[1]


class ConjugateTaskNormal(TaskwiseMixin, AutoGuide):
    """q(u) · q(Θ | u) · Π_d q(θ_d | Θ, u): mean-field over the hyperparameters u, and for Θ and
    the task factors the exact conditional posteriors of the model in which each task's documents
    are a Gaussian pseudo-observation of its factors (see the module's docstring).

    Args:
        model: a :class:`~bora_pyro.models.BoRA` model whose task sites ``task.X`` are Normal
            and centred on an entry of the global site ``global.X`` (``centered=True``).
        init_loc_fn: starts the pseudo-observations m (and the hyperparameters' locs).
        init_scale: where the pseudo-observations' sd s and the hyperparameters' σ start: None,
            a tenth of the site's prior sd at the prior's start, at most ``MAX_START_SCALE`` (as
            :func:`~bora_pyro.guides.mean_field_guide`); a float, there. A task then starts at
            q ≈ Normal(m, s²) (s ≪ σ), m at its LoRA start.
    """

    def __init__(self, model, init_loc_fn, init_scale: float | None = None):
        check_init_scale(init_scale)
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=model.tasks_plate)
        self.bora, self.init_scale, self.init_loc_fn = model, init_scale, init_loc_fn

    def _check_prototype(self, part_trace) -> None:
        """The hyperparameters' part runs the same model (a sub-guide asks its master): nothing to check."""

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        sites = dict(self.prototype_trace.iter_stochastic_nodes())
        self.task_sites = {name: site for name, site in sites.items()
                           if any(frame.name == TASKS for frame in site["cond_indep_stack"])}
        self.global_sites = {name: sites[name] for name in map(global_site_of, self.task_sites) if name in sites}
        unpaired = [name for name in self.task_sites if global_site_of(name) not in self.global_sites]
        unexplained = [name for name, site in sites.items()
                       if is_factor_site(name) and name not in self.task_sites and name not in self.global_sites]
        if unpaired or unexplained:
            raise ConfigError(f"conjugate_guide needs each task site task.X centred on a global site global.X and no "
                              f"other factor sites; {', '.join(unpaired + unexplained)} do not fit that: use "
                              "HierarchicalNormal(..., centered=True)")
        self.hyper_names = [name for name in sites if not is_factor_site(name)]
        self.hyper = (taskwise_normal(poutine.block(self.model, expose=self.hyper_names), self.init_scale,
                                      init_loc_fn=self.init_loc_fn) if self.hyper_names else None)
        self.selections = self.task_selections()
        self.task_locs, self.task_log_scales = nn.ModuleDict(), nn.ModuleDict()
        for name, site in self.task_sites.items():
            value, event_dim = site["value"].detach(), site["fn"].event_dim
            _, prior_scale = normal_parameters(site["fn"])
            start = ((START_FRACTION * prior_scale.detach()).clamp(max=MAX_START_SCALE) if self.init_scale is None
                     else torch.full_like(value, self.init_scale))
            self.task_locs[rows_key(name)] = task_rows(site, value, event_dim)
            self.task_log_scales[rows_key(name)] = task_rows(site, start.log(), event_dim)

    def run_prior(self, values: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(loc, scale) of every factor site's prior for all D tasks with the sites in ``values``
        fixed there (the others at their prior's loc), hidden from any trace."""
        capture = NormalPriors(values)
        hyper = {name: value for name, value in values.items() if name in self.hyper_names}
        with poutine.block(), poutine.condition(data=hyper), capture:
            self.bora.prior(self.bora.lm.modules_spec, self.bora.tasks_plate())  # a plate samples its subsample: inside the block
        return capture.priors

    @torch.no_grad()
    def task_selections(self) -> dict[str, torch.Tensor]:
        """Per task site, the flat index into its global site of every entry's prior loc, [D, ...]:
        found by running the prior with Θ holding its own indices (refused unless each loc is one
        entry of Θ, as for a centred hierarchical Normal)."""
        hyper = {name: site["value"] for name, site in self.prototype_trace.iter_stochastic_nodes()
                 if name in self.hyper_names}
        indices = {name: torch.arange(site["value"].numel()).reshape(site["value"].shape).to(site["value"])
                   for name, site in self.global_sites.items()}
        with torch.autocast("cpu", enabled=False):
            priors = self.run_prior(hyper | indices)
        selections = {}
        for name in self.task_sites:
            loc, size = priors[name][0], self.global_sites[global_site_of(name)]["value"].numel()
            index = loc.round().long()
            if size >= 2 ** 24 or not torch.equal(index.to(loc), loc) or index.min() < 0 or index.max() >= size:
                raise ConfigError(f"conjugate_guide needs the prior loc of {name} to be an entry of "
                                  f"{global_site_of(name)} (a centred hierarchical Normal); it is not")
            selections[name] = index
        return selections

    def pseudo_observations(self, name: str, tasks: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """m and s² of site ``name`` for ``tasks`` (None: all D), [K, ...]."""
        key = rows_key(name)
        return self.task_rows("task_locs")[key](tasks), torch.exp(2 * self.task_rows("task_log_scales")[key](tasks))

    def global_conditional(self, name: str, priors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and sd of q(Θ | u) for global site ``name``: its prior Normal(μ₀, g²) times, for
        every task entry j of every task d centred on Θ_i, the pseudo-observation's marginal
        Normal(m_{d,j}; Θ_i, σ_{d,j}² + s_{d,j}²) (θ_d integrated out), all D tasks:

            precision_i = 1/g_i² + Σ_{(d,j) → i} w_{d,j},   w = 1/(σ² + s²)
            mean_i      = (μ₀_i/g_i² + Σ_{(d,j) → i} w_{d,j} m_{d,j}) / precision_i
        """
        prior_loc, prior_scale = priors[name]
        precision, weighted = prior_scale.pow(-2).flatten(), (prior_loc * prior_scale.pow(-2)).flatten()  # 0 where flat
        for task_name, selection in self.selections.items():
            if global_site_of(task_name) != name:
                continue
            pseudo_loc, pseudo_var = self.pseudo_observations(task_name, None)
            weight = 1 / (priors[task_name][1].square() + pseudo_var)
            precision = precision.index_add(0, selection.flatten(), weight.flatten())
            weighted = weighted.index_add(0, selection.flatten(), (weight * pseudo_loc).flatten())
        return (weighted / precision).view_as(prior_loc), precision.rsqrt().view_as(prior_loc)

    def task_conditional(self, name: str, global_value: torch.Tensor, task_scale: torch.Tensor,
                         tasks: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and sd of q(θ_d | Θ, u) [K, ...]: Normal(μ, σ²) with μ the entries of Θ the task
        is centred on, times Normal(m; θ_d, s²)."""
        selection = self.selections[name] if tasks is None else self.selections[name][tasks]
        prior_loc = global_value.flatten()[selection]
        prior_var = (task_scale if tasks is None else task_scale[tasks]).square()
        pseudo_loc, pseudo_var = self.pseudo_observations(name, tasks)
        total = prior_var + pseudo_var
        return prior_loc + prior_var / total * (pseudo_loc - prior_loc), (prior_var * pseudo_var / total).sqrt()

    def _sample(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        plates = self._create_plates(*args, **kwargs)
        result = self.hyper(*args, **kwargs) if self.hyper is not None else {}
        priors = self.run_prior(result)  # all D tasks: Θ's conditional needs them
        for name, site in self.global_sites.items():
            loc, scale = self.global_conditional(name, priors)
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, normal(loc, scale, site["fn"].event_dim))
        for name, site in self.task_sites.items():
            loc, scale = self.task_conditional(name, result[global_site_of(name)], priors[name][1], self._batch_tasks)
            with plates[TASKS]:
                result[name] = pyro.sample(name, normal(loc, scale, site["fn"].event_dim))
        return result

    def marginals(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Mean and sd of every factor entry's conditional given the hyperparameters at their
        median, and (for the task factors) Θ at its conditional mean: [*site shape] each."""
        hyper = self.hyper.median() if self.hyper is not None else {}
        priors = self.run_prior(hyper)
        result = {name: self.global_conditional(name, priors) for name in self.global_sites}
        for name in self.task_sites:
            result[name] = self.task_conditional(name, result[global_site_of(name)][0], priors[name][1], None)
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The hyperparameters' medians, Θ's conditional mean given them and each task's
        conditional mean given both (the marginal medians have no closed form)."""
        hyper = self.hyper.median() if self.hyper is not None else {}
        return hyper | {name: loc for name, (loc, _) in self.marginals().items()}

    @torch.no_grad()
    def quantiles(self, quantiles: list[float], *args, **kwargs) -> dict[str, torch.Tensor]:
        """[len(quantiles), *shape] per site: the hyperparameters' marginal quantiles, the factors'
        quantiles of their conditionals (:meth:`marginals`)."""
        result = self.hyper.quantiles(quantiles) if self.hyper is not None else {}
        for name, (loc, scale) in self.marginals().items():
            probs = torch.tensor(quantiles, dtype=loc.dtype, device=loc.device).reshape((-1,) + (1,) * loc.dim())
            result[name] = dist.Normal(loc, scale).icdf(probs)
        return result


def conjugate_guide(model, init_scale: float | None = None, seed: int = 0) -> ConjugateTaskNormal:
    """For a learned τ: τ (every hyperparameter) mean-field; Θ and each task's factors their exact
    conditionals given τ when each task's documents are a learned Gaussian pseudo-observation of
    its factors (:class:`ConjugateTaskNormal`). Use it with centred task factors,
    ``HierarchicalNormal(tau_prior, centered=True)``. Pseudo-observations start like LoRA."""
    return ConjugateTaskNormal(model, LoRAInit(seed, model.lm.modules_spec), init_scale)

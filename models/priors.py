"""Priors over the LoRA factors: the place to read, change or add a prior.

The prior contract
------------------
A prior is any callable ``prior(modules, tasks) -> factors``. It receives

- ``modules``: the adapted modules, a sequence of :class:`~bora_pyro.lora.AdaptedModule` with
  ``.name``, ``.rank``, ``.shape_A`` = (r, in) and ``.shape_B`` = (out, r);
- ``tasks``: the ``pyro.plate("tasks", D)``; per-task sites go inside it, and ``tasks.device``
  is the model's device: create every tensor there, in float32. In training the plate is
  subsampled to the K tasks of the batch (``tasks.subsample_size``, their indices
  ``tasks.indices``), each weighted so the ELBO stays unbiased (see
  :class:`~bora_pyro.models.bora.TaskSubsample`): sites inside it then have batch shape [K],
  and per-task data of yours (a cluster per task, a covariate) is ``data[tasks.indices]``.

It samples its latent sites and returns ``{module name: (lora_A [K, r, in], lora_B [K, out, r])}``,
the factors each of the plate's K tasks (K = D outside training) uses in the likelihood. Site
names tell the guides what a site is:

- ``global.<module>.lora_A|lora_B``: shared factors Θ, [r, in] / [out, r];
- ``task.<module>.lora_A|lora_B``: the task factors θ_d, batch shape [K] from the plate;
- ``global.lora`` [P] and ``task.lora`` [K, P]: every module's factors packed in one vector
  (:class:`~bora_pyro.packing.FactorLayout`; the shipped priors' default: each site costs ~1 ms
  of Pyro bookkeeping per step, and GPT-2 small has 96 factors per level);
- any other site whose name ends in ``lora_A``/``lora_B``, optionally followed by ``_offset`` or
  ``_decentered``, also holds factors (e.g. offsets θ_d − Θ, or cluster centres
  ``cluster.<module>.lora_A``); guides start ``lora_A`` sites at peft's kaiming-uniform draw and
  ``lora_B``/``_offset``/``_decentered`` sites at 0, so the adapted model starts as the base
  model, and :func:`~bora_pyro.guides.hybrid_guide` gives the ``global.*`` sites a point mass;
- every other latent site is a *hyperparameter*: a precision ``tau`` / ``tau.<group>``, a degrees
  of freedom, a mixing weight. A point estimate of a precision together with the factors it
  governs is degenerate (the density grows without bound as τ → ∞ and every task collapses onto
  Θ), so :func:`~bora_pyro.guides.map_guide` refuses priors with hyperparameters; fit them with
  :func:`~bora_pyro.guides.hybrid_guide` or :func:`~bora_pyro.guides.mean_field_guide`.

A user's prior is a ~20-line function or class in their own file, with no edit to the library
(``examples/custom_prior.py`` fits one end to end). Tasks that differ in A only, with a learned τ::

    def shared_b_prior(modules, tasks):
        tau = pyro.sample("tau", dist.LogNormal(torch.tensor(4.6, device=tasks.device), 1.5))
        factors = {}
        for m in modules:
            zeros_A = torch.zeros(m.shape_A, device=tasks.device)
            zeros_B = torch.zeros(m.shape_B, device=tasks.device)
            A = pyro.sample(f"global.{m.name}.lora_A", dist.Normal(zeros_A, 1.0).to_event(2))
            B = pyro.sample(f"global.{m.name}.lora_B", dist.Normal(zeros_B, 1.0).to_event(2))
            with tasks:
                A_d = pyro.sample(f"task.{m.name}.lora_A", dist.Normal(A, tau**-0.5).to_event(2))
            factors[m.name] = (A_d, B.expand(tasks.subsample_size, *m.shape_B))
        return factors

    model = BoRA(lm, shared_b_prior, corpus.num_tasks)   # fit with hybrid_guide(model)

Shipped priors: :class:`HierarchicalNormal` (the paper's, with τ fixed or learned, per group),
:class:`HierarchicalStudentT` (heavy-tailed task deviations), :class:`Independent` (τ → 0) and
:class:`Joint` (τ → ∞); :func:`prior_from_tau` picks among them from τ alone. :class:`Precision`
is the τ part on its own, for reuse in your priors.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from itertools import product
from typing import Union

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible
from pyro.infer.reparam import LocScaleReparam
from pyro.poutine.util import site_is_subsample

from bora_pyro.errors import ConfigError
from bora_pyro.lora import AdaptedModule
from bora_pyro.models.normal import normal
from bora_pyro.packing import FactorLayout

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
FACTORS = ("lora_A", "lora_B")
#: The name of the packed factor vector: the sites ``global.lora`` [P] and ``task.lora`` [K, P].
PACKED = "lora"
TauValue = Union[float, torch.distributions.Distribution]
#: How :class:`HierarchicalNormal` parametrises the task factors when some τ is learned and
#: ``centered`` is not given, for :func:`~bora_pyro.guides.learned_tau_guide`: the one whose τ
#: interval came nearest NUTS's (``benchmarks/vi_vs_nuts.py``; not calibrated, ``benchmarks/sbc.py``).
#: 0.0: decentred, z ~ Normal(0, 1), θ_d = Θ + τ^{-1/2}·z.
LEARNED_TAU_CENTERED: bool | float = 0.0
TauGroup = Callable[[AdaptedModule, str], str]


def site_name(level: str, module: str, factor: str) -> str:
    """``"global"|"task"``, module name, ``"lora_A"|"lora_B"`` → the sample site's name."""
    return f"{level}.{module}.{factor}"


def is_factor_site(name: str) -> bool:
    """Whether a site holds LoRA factors (see the contract): ``….lora_A|lora_B[_offset|_decentered]``,
    or the packed ``….lora[_offset|_decentered]``."""
    return re.search(r"(^|\.)lora(_[AB])?(_offset|_decentered)?$", name) is not None


@functools.lru_cache(maxsize=16)
def factor_layout(modules: tuple[AdaptedModule, ...]) -> FactorLayout:
    """The packed layout of ``modules`` (built once per set of modules)."""
    return FactorLayout(modules)


def factor_shape(module: AdaptedModule, factor: str) -> tuple[int, int]:
    return module.shape_A if factor == "lora_A" else module.shape_B


def weak_or_flat(shape: tuple[int, ...], scale: float | None, device: torch.device) -> dist.Distribution:
    """``Normal(0, scale)`` over a [*shape] factor, or a flat (improper) prior when ``scale`` is None.

    The flat prior is a masked Normal: it adds 0 to the log-joint yet can still be sampled, which
    autoguide init strategies and ``Predictive`` need (``ImproperUniform`` cannot be sampled).
    """
    loc = torch.zeros(shape, device=device)
    if scale is None:
        return dist.Normal(loc, 1.0).mask(False).to_event(len(shape))
    return normal(loc, scale, len(shape))


def check_scale(name: str, value: float | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number{' or None (flat)' if allow_none else ''}, got {value!r}")


def on_device(fn: torch.distributions.Distribution, device: torch.device) -> torch.distributions.Distribution:
    """``fn`` rebuilt with its parameters on ``device`` (distributions have no ``.to``)."""
    return type(fn)(**{name: getattr(fn, name).to(device) for name in fn.arg_constraints})


def describe(value: TauValue) -> str:
    """``LogNormal(loc=4.6, scale=1.5)`` for a distribution (its own repr may omit the parameters)."""
    if not isinstance(value, torch.distributions.Distribution):
        return f"{value:g}"
    return f"{type(value).__name__}({', '.join(f'{k}={float(getattr(value, k)):g}' for k in value.arg_constraints)})"


def check_tau(value: object) -> None:
    """A τ is a positive float, ``math.inf`` (tasks share Θ) or a scalar distribution on (0, ∞)."""
    if isinstance(value, torch.distributions.Distribution):
        support = value.support
        positive = isinstance(support, (constraints.greater_than, constraints.greater_than_eq)) and float(support.lower_bound) == 0
        if not positive or value.batch_shape or value.event_shape:
            raise ConfigError(f"a hyperprior of tau must be a scalar distribution on (0, ∞) such as "
                              f"Gamma or LogNormal, got {value}")
        try:
            on_device(value, torch.device("cpu"))
        except (AttributeError, TypeError):
            raise ConfigError(f"cannot rebuild {type(value).__name__} from its arg_constraints; use Gamma or LogNormal") from None
    elif not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and not math.isnan(value)):
        raise ConfigError(f"tau must be a positive finite number, math.inf (tasks share the global factors) "
                          f"or a pyro distribution over (0, ∞), got {value!r}")


def layer_of(module_name: str) -> str:
    """The module's path up to its first numeric component: ``transformer.h.3.attn.c_attn`` →
    ``transformer.h.3`` (the module's own name when it has none)."""
    match = re.match(r"(.*?\.\d+)(?:\.|$)", module_name)
    return match.group(1) if match else module_name


TAU_GROUPS: dict[str, TauGroup] = {
    "all": lambda module, factor: "",
    "layer": lambda module, factor: layer_of(module.name),
    "module": lambda module, factor: module.name,
    "factor": lambda module, factor: factor[-1],
    "module-factor": lambda module, factor: f"{module.name}.{factor[-1]}",
}


def tau_site(group: str) -> str:
    """The site of a group's precision: ``tau`` for the one shared group ``""``, else ``tau.<group>``."""
    return f"tau.{group}" if group else "tau"


class Precision:
    """The precisions τ of the task factors: one per group of (module, factor), each fixed or latent.

    Args:
        tau: the precision of every group: a float, ``math.inf`` (the group's task factors are the
            global ones) or a hyperprior, a scalar distribution over (0, ∞) such as
            ``dist.Gamma(2.0, 0.02)`` or ``dist.LogNormal(4.6, 1.5)``; each group then has its own
            latent site ``tau.<group>`` (``tau`` when there is one group), independent draws from
            the shared hyperprior. A mapping ``{group: float | inf | distribution}`` sets each
            group's own.
        per: how (module, factor) pairs are grouped: ``"all"`` (one τ), ``"layer"`` (one per
            transformer block, e.g. ``transformer.h.3``), ``"module"`` (one per adapted module),
            ``"factor"`` (groups ``A`` and ``B``), ``"module-factor"`` (``<module>.A``, ...), or a
            function ``(module, factor) -> group name``; a group name must not end in ``lora``,
            ``lora_A`` or ``lora_B`` (that names a factor site).

    Calling it, ``precision(modules, device) -> {group: τ}``, samples the latent τ sites (scalars,
    on ``device``) and returns every group's τ: a float or a 0-dim tensor.
    """

    def __init__(self, tau: TauValue | Mapping[str, TauValue], per: str | TauGroup = "all"):
        if isinstance(per, str) and per not in TAU_GROUPS:
            raise ConfigError(f"unknown tau grouping {per!r}: choose one of {tuple(TAU_GROUPS)} or pass a function")
        if isinstance(tau, Mapping):
            if per == "all":
                raise ConfigError("a tau per group needs a grouping: pass tau_per='module', 'factor', ...")
            for value in tau.values():
                check_tau(value)
            self.tau: TauValue | dict[str, TauValue] = {
                group: value if isinstance(value, torch.distributions.Distribution) else float(value)
                for group, value in tau.items()
            }
        else:
            check_tau(tau)
            self.tau = tau if isinstance(tau, torch.distributions.Distribution) else float(tau)
        self.per = per
        self.group: TauGroup = TAU_GROUPS[per] if isinstance(per, str) else per

    @property
    def is_latent(self) -> bool:
        """Whether some group's τ is a latent site (a hyperprior, not a number)."""
        values = self.tau.values() if isinstance(self.tau, dict) else [self.tau]
        return any(isinstance(value, torch.distributions.Distribution) for value in values)

    def value(self, group: str, groups: Sequence[str]) -> TauValue:
        if not isinstance(self.tau, dict):
            return self.tau
        if group not in self.tau:
            raise ConfigError(f"tau has no value for the group {group!r}; the groups are {sorted(set(groups))}")
        return self.tau[group]

    def __call__(self, modules: Sequence[AdaptedModule], device: torch.device) -> dict[str, float | torch.Tensor]:
        groups = [self.group(module, factor) for module in modules for factor in FACTORS]
        taus: dict[str, float | torch.Tensor] = {}
        for group in dict.fromkeys(groups):
            value = self.value(group, groups)
            if isinstance(value, torch.distributions.Distribution):
                value = pyro.sample(tau_site(group), on_device(value, device))
            taus[group] = value
        return taus

    def __repr__(self) -> str:
        per = self.per if isinstance(self.per, str) else getattr(self.per, "__name__", repr(self.per))
        return f"Precision(tau={self.describe()}, per={per!r})"

    def describe(self) -> str:
        if isinstance(self.tau, dict):
            return "{" + ", ".join(f"{group!r}: {describe(value)}" for group, value in self.tau.items()) + "}"
        return describe(self.tau)


class HierarchicalNormal:
    """The paper's prior, with τ fixed or learned: for every adapted module and factor,

        Θ ~ Normal(0, global_scale)   (flat when global_scale is None)
        τ ~ hyperprior                 (when τ is a distribution; one per group, see Precision)
        θ_d ~ Normal(Θ, τ^{-1/2})     entrywise, for every task d = 1..D.

    Args:
        tau: a float (the paper), ``math.inf`` for a group whose tasks share Θ, or a hyperprior
            ``dist.Gamma(a, b)`` / ``dist.LogNormal(m, s)`` inferred by SVI (latent site ``tau``);
            a mapping sets one per group. See :class:`Precision`.
        global_scale: prior scale of Θ; ``None`` is the paper's flat ``p(Θ) ∝ 1``. The default 1.0
            is weak next to LoRA factors (entries ~1/sqrt(in)); keep it for mean-field VI, where a
            flat Θ leaves the A→cA, B→B/c direction unpinned and the posterior improper.
        centered: how the task factors are parametrised (the model is the same); None (the
            default): offsets (``False``) for a fixed τ, :data:`LEARNED_TAU_CENTERED` when τ is learned.

            - ``False`` (the default): sample offsets ``δ_d = θ_d − Θ ~ Normal(0, τ^{-1/2})`` at
              ``task.<m>.<f>_offset``; Θ then moves every task at once, so one learning rate
              serves every fixed τ, and a task keeps up with Θ in the training steps whose
              batch it is not in (``benchmarks/parametrisation.py``: it learns the shared
              part as fast as the joint model);
            - ``True``: sample θ_d itself at ``task.<m>.<f>``; Θ then moves only through the
              prior's pull, and a centred θ_d only in the steps that see it;
            - a float c in [0, 1]: ``poutine.reparam`` with ``LocScaleReparam(centered=c)``, which
              samples ``task.<m>.<f>_decentered`` ~ Normal(c·Θ, τ^{-c/2}) and sets
              θ_d = Θ + τ^{-(1-c)/2}·(z − c·Θ). ``0.0`` is fully non-centred, z ~ Normal(0, 1): τ
              then scales every task at once, the parametrisation for a learned τ.
        tau_per: the grouping of the precisions (see :class:`Precision`): ``"all"``, ``"layer"``,
            ``"module"``, ``"factor"``, ``"module-factor"`` or a function.
        packed: sample every module's factors as one vector, ``global.lora`` [P] and
            ``task.lora`` [K, P] (two sites a step instead of four per module); ``False`` gives
            one site per module and factor, ``global.<module>.lora_A`` etc. The model is the same.
            A τ of ∞ for some groups but not all needs the per-module sites, which it then uses.
    """

    def __init__(
        self,
        tau: TauValue | Mapping[str, TauValue],
        global_scale: float | None = 1.0,
        centered: bool | float | None = None,
        tau_per: str | TauGroup = "all",
        packed: bool = True,
    ):
        check_scale("global_scale", global_scale)
        if centered is not None and not isinstance(centered, bool) and not (
                isinstance(centered, (int, float)) and 0 <= centered <= 1):
            raise ConfigError(f"centered must be True, False, a number in [0, 1] or None, got {centered!r}")
        self.precision = Precision(tau, tau_per)
        if centered is None:
            centered = LEARNED_TAU_CENTERED if self.precision.is_latent else False
        self.global_scale, self.centered = global_scale, centered if isinstance(centered, bool) else float(centered)
        self.packed = packed

    @property
    def tau(self) -> TauValue | dict[str, TauValue]:
        return self.precision.tau

    def deviation(self, loc: torch.Tensor, scale: float | torch.Tensor) -> dist.Distribution:
        """The distribution of a task factor around ``loc`` with scale τ^{-1/2}, entrywise."""
        return normal(loc, scale, loc.dim())

    def __call__(self, modules: Sequence[AdaptedModule], tasks: pyro.plate) -> Factors:
        taus = self.precision(modules, tasks.device)
        tau_of = [taus[self.precision.group(module, factor)] for module in modules for factor in FACTORS]
        shared = [isinstance(tau, float) and math.isinf(tau) for tau in tau_of]
        if not self.packed or (any(shared) and not all(shared)):
            factors = [self.task_factor(f"{module.name}.{factor}", factor_shape(module, factor), tau, tasks)
                       for (module, factor), tau in zip(product(modules, FACTORS), tau_of)]
            return {module.name: (factors[2 * i], factors[2 * i + 1]) for i, module in enumerate(modules)}
        layout = factor_layout(tuple(modules))
        if all(shared):
            return layout.unpack(self.task_factor(PACKED, (layout.size,), math.inf, tasks))
        scale = layout.fill([tau**-0.5 for tau in tau_of], tasks.device)
        return layout.unpack(self.task_factor(PACKED, (layout.size,), scale, tasks, is_scale=True))

    def task_factor(self, name: str, shape: tuple[int, ...], tau: float | torch.Tensor, tasks: pyro.plate,
                    is_scale: bool = False) -> torch.Tensor:
        """Sample Θ of the factor ``name`` (``<module>.<factor>``, or ``lora`` for the packed vector)
        at ``global.<name>`` and the tasks' θ_d around it at ``task.<name>``: [K, *shape] for the K
        tasks of the plate. ``tau`` is the precision, or the scale τ^{-1/2} when ``is_scale``."""
        glob = pyro.sample(f"global.{name}", weak_or_flat(shape, self.global_scale, tasks.device))
        if isinstance(tau, float) and math.isinf(tau):
            return glob.expand(tasks.subsample_size, *shape)
        scale = tau if is_scale else tau**-0.5
        if self.centered is False:
            with tasks:
                return glob + pyro.sample(f"task.{name}_offset", self.deviation(torch.zeros_like(glob), scale))
        reparam = {} if self.centered is True else {f"task.{name}": LocScaleReparam(self.centered)}
        with poutine.reparam(config=reparam), tasks:  # reparam outside the plate: it sees the [K] batch
            return pyro.sample(f"task.{name}", self.deviation(glob, scale))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(tau={self.precision.describe()}, global_scale={self.global_scale}, centered={self.centered}"
                f"{'' if self.precision.per == 'all' else f', tau_per={self.precision.per!r}'}"
                f"{'' if self.packed else ', packed=False'})")


class HierarchicalStudentT(HierarchicalNormal):
    """Heavy-tailed task deviations: ``θ_d ~ StudentT(df, Θ, τ^{-1/2})`` entrywise, otherwise as
    :class:`HierarchicalNormal` (same arguments, sites and parametrisations).

    A few tasks may then sit far from Θ without dragging Θ or inflating the spread of the others:
    for df → ∞ this is :class:`HierarchicalNormal`; for df > 2 the variance is τ^{-1}·df/(df − 2).

    Args:
        df: degrees of freedom ν > 0 (fixed).
    """

    def __init__(
        self,
        tau: TauValue | Mapping[str, TauValue],
        df: float = 3.0,
        global_scale: float | None = 1.0,
        centered: bool | float | None = None,
        tau_per: str | TauGroup = "all",
        packed: bool = True,
    ):
        check_scale("df", df, allow_none=False)
        super().__init__(tau, global_scale, centered, tau_per, packed)
        self.df = float(df)

    def deviation(self, loc: torch.Tensor, scale: float | torch.Tensor) -> dist.Distribution:
        return dist.StudentT(self.df, loc, scale).to_event(loc.dim())

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", df={self.df:g})"


class Independent:
    """τ → 0: every task has its own factors, ``θ_d ~ Normal(0, scale)`` (flat when ``scale`` is
    None), with no coupling between tasks and no global factors. ``packed`` as in
    :class:`HierarchicalNormal`: one site ``task.lora`` [K, P], or one per module and factor."""

    def __init__(self, scale: float | None = 1.0, packed: bool = True):
        check_scale("scale", scale)
        self.scale, self.packed = scale, packed

    def __call__(self, modules: Sequence[AdaptedModule], tasks: pyro.plate) -> Factors:
        with tasks:
            return sample_factors("task", modules, self.scale, tasks.device, self.packed)

    def __repr__(self) -> str:
        return f"Independent(scale={self.scale}{'' if self.packed else ', packed=False'})"


class Joint:
    """τ → ∞: one adapter for all tasks, ``Θ ~ Normal(0, global_scale)`` (flat when None); there
    are no task sites, every task uses Θ. ``packed`` as in :class:`HierarchicalNormal`."""

    def __init__(self, global_scale: float | None = 1.0, packed: bool = True):
        check_scale("global_scale", global_scale)
        self.global_scale, self.packed = global_scale, packed

    def __call__(self, modules: Sequence[AdaptedModule], tasks: pyro.plate) -> Factors:
        factors = sample_factors("global", modules, self.global_scale, tasks.device, self.packed)
        return {name: (A.expand(tasks.subsample_size, *A.shape), B.expand(tasks.subsample_size, *B.shape))
                for name, (A, B) in factors.items()}

    def __repr__(self) -> str:
        return f"Joint(global_scale={self.global_scale}{'' if self.packed else ', packed=False'})"


def sample_factors(level: str, modules: Sequence[AdaptedModule], scale: float | None, device: torch.device,
                   packed: bool) -> Factors:
    """Every module's factors ~ Normal(0, scale) (flat when None), entrywise, at the site
    ``<level>.lora`` (``packed``) or at ``<level>.<module>.lora_A|lora_B``."""
    if packed:
        layout = factor_layout(tuple(modules))
        return layout.unpack(pyro.sample(f"{level}.{PACKED}", weak_or_flat((layout.size,), scale, device)))
    return {module.name: tuple(  # type: ignore[misc]
        pyro.sample(site_name(level, module.name, factor), weak_or_flat(factor_shape(module, factor), scale, device))
        for factor in FACTORS) for module in modules}


def prior_from_tau(tau: TauValue, global_scale: float | None = 1.0, centered: bool | float | None = None,
                   packed: bool = True):
    """τ = 0 → :class:`Independent`, τ = ∞ → :class:`Joint`, else :class:`HierarchicalNormal`
    (a distribution: τ learned under that hyperprior)."""
    if isinstance(tau, (int, float)) and tau == 0:
        return Independent(global_scale, packed)
    if isinstance(tau, (int, float)) and math.isinf(tau) and tau > 0:
        return Joint(global_scale, packed)
    return HierarchicalNormal(tau, global_scale, centered, packed=packed)


HYPERPRIORS: dict[str, type[torch.distributions.Distribution]] = {"gamma": dist.Gamma, "lognormal": dist.LogNormal}


def parse_hyperprior(spec: str) -> torch.distributions.Distribution:
    """``"gamma:SHAPE,RATE"`` → ``Gamma(SHAPE, RATE)`` (mean SHAPE/RATE); ``"lognormal:LOC,SCALE"``
    → ``LogNormal(LOC, SCALE)``, i.e. log τ ~ Normal(LOC, SCALE). The CLI's ``--tau-prior``."""
    family, _, args = spec.partition(":")
    try:
        values = [float(arg) for arg in args.split(",")]
        return HYPERPRIORS[family.strip().lower()](*values)
    except (KeyError, ValueError, TypeError):
        raise ConfigError(f"cannot read the hyperprior {spec!r}: write gamma:SHAPE,RATE or lognormal:LOC,SCALE, "
                          "e.g. lognormal:4.6,1.5") from None


def latent_sites(prior, modules: Sequence[AdaptedModule], tasks: pyro.plate) -> dict[str, dict]:
    """The latent sample sites of ``prior``, by name (trace nodes). The prior runs once at a
    feasible point, drawing no random numbers, on one task of ``tasks``: its sites are the same for
    any number of tasks, and all D would hold [D, P] values (19 GB at D = 1000 for GPT-2 small, r = 16)."""
    with poutine.block():
        trace = poutine.trace(InitMessenger(init_to_feasible)(prior)).get_trace(modules, subsampled(tasks, [0]))
    return {name: site for name, site in trace.iter_stochastic_nodes() if not site_is_subsample(site)}


def subsampled(tasks: pyro.plate, indices: Sequence[int]) -> pyro.plate:
    """The plate ``tasks`` of D tasks, subsampled to those of ``indices`` (K), on the same device:
    priors build their tensors on ``plate.device``, which a plate does not take from its subsample."""
    return pyro.plate(tasks.name, tasks.size, subsample=torch.tensor(list(indices), device=tasks.device),
                      dim=tasks.dim, device=tasks.device)


def hyperparameter_sites(prior, modules: Sequence[AdaptedModule], tasks: pyro.plate) -> list[str]:
    """The latent sites of ``prior`` that hold no factors (precisions, scales, weights): see the contract."""
    return [name for name in latent_sites(prior, modules, tasks) if not is_factor_site(name)]


def shared_sites(prior, modules: Sequence[AdaptedModule], tasks: pyro.plate) -> list[str]:
    """The latent sites of ``prior`` outside the tasks plate: what every task shares (Θ, τ, …)."""
    return [name for name, site in latent_sites(prior, modules, tasks).items()
            if all(frame.name != tasks.name for frame in site["cond_indep_stack"])]

"""Priors over the LoRA factors: the place to read, change or add a prior.

The prior contract
------------------
A prior is any callable ``prior(modules, tasks) -> factors``:

- ``modules``: the adapted modules, a sequence of :class:`~bora_pyro.lora.AdaptedModule`
  (``.name``, ``.shape_A`` = (r, in), ``.shape_B`` = (out, r), ``.rank``).
- ``tasks``: the ``pyro.plate("tasks", D)``; sites of per-task factors go inside it.
- it emits Pyro sample sites named ``global.<module>.lora_A|lora_B`` (the global factors Θ) and
  ``task.<module>.lora_A|lora_B`` (the task factors θ_d, batch shape [D]) — or whatever it needs,
  e.g. ``task.<module>.lora_A_offset`` for non-centred offsets, or latent precisions; guides
  initialise every site whose name ends in ``lora_A`` like LoRA's A, and sites ending in ``lora_B``
  or ``_offset`` at zero.
- it returns ``{module name: (lora_A [D, r, in], lora_B [D, out, r])}``, the factors each task
  uses in the likelihood.

Create tensors on ``tasks.device`` (the model's device), in float32. A user's prior is a function
of ~20 lines in their own file.

The shipped priors: :class:`HierarchicalNormal` (the paper's), :class:`Independent` (τ → 0) and
:class:`Joint` (τ → ∞); :func:`prior_from_tau` picks among them from τ alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch

from bora_pyro.errors import ConfigError
from bora_pyro.lora import AdaptedModule

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
FACTORS = ("lora_A", "lora_B")


def site_name(level: str, module: str, factor: str) -> str:
    """``"global"|"task"``, module name, ``"lora_A"|"lora_B"`` → the sample site's name."""
    return f"{level}.{module}.{factor}"


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
    return dist.Normal(loc, scale).to_event(len(shape))


def check_scale(name: str, value: float | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number{' or None (flat)' if allow_none else ''}, got {value!r}")


class HierarchicalNormal:
    """The paper's prior: ``θ_d ~ Normal(Θ, τ^{-1/2})`` for every task d, with Θ flat or weak.

    Args:
        tau: precision τ > 0 of the task factors around the global ones.
        global_scale: prior scale of Θ: ``Normal(0, global_scale)``; ``None`` is the paper's flat
            ``p(Θ) ∝ 1``. The default 1.0 is weak next to LoRA factors (entries ~1/sqrt(in)); keep
            it for mean-field VI, where a flat Θ leaves the A→cA, B→B/c direction unpinned and the
            posterior improper.
        centered: ``False`` samples offsets ``δ_d = θ_d − Θ ~ Normal(0, τ^{-1/2})`` at sites
            ``task.<m>.lora_A_offset`` instead of θ_d itself; the same model, but Θ then moves every
            task at once, so one learning rate serves every τ.
    """

    def __init__(self, tau: float, global_scale: float | None = 1.0, centered: bool = True):
        check_scale("tau", tau, allow_none=False)
        check_scale("global_scale", global_scale)
        self.tau, self.global_scale, self.centered = float(tau), global_scale, centered

    def __call__(self, modules: Sequence[AdaptedModule], tasks: pyro.plate) -> Factors:
        scale = self.tau**-0.5
        factors: Factors = {}
        for module in modules:
            pair = []
            for factor in FACTORS:
                shape = factor_shape(module, factor)
                glob = pyro.sample(site_name("global", module.name, factor), weak_or_flat(shape, self.global_scale, tasks.device))
                with tasks:
                    if self.centered:
                        value = pyro.sample(site_name("task", module.name, factor), dist.Normal(glob, scale).to_event(2))
                    else:
                        offset = dist.Normal(torch.zeros_like(glob), scale).to_event(2)
                        value = glob + pyro.sample(site_name("task", module.name, factor) + "_offset", offset)
                pair.append(value)
            factors[module.name] = (pair[0], pair[1])
        return factors

    def __repr__(self) -> str:
        return f"HierarchicalNormal(tau={self.tau:g}, global_scale={self.global_scale}, centered={self.centered})"


class Independent:
    """τ → 0: every task has its own factors, ``θ_d ~ Normal(0, scale)`` (flat when ``scale`` is
    None), with no coupling between tasks and no global factors."""

    def __init__(self, scale: float | None = 1.0):
        check_scale("scale", scale)
        self.scale = scale

    def __call__(self, modules: Sequence[AdaptedModule], tasks: pyro.plate) -> Factors:
        factors: Factors = {}
        with tasks:
            for module in modules:
                factors[module.name] = tuple(  # type: ignore[assignment]
                    pyro.sample(
                        site_name("task", module.name, factor),
                        weak_or_flat(factor_shape(module, factor), self.scale, tasks.device),
                    )
                    for factor in FACTORS
                )
        return factors

    def __repr__(self) -> str:
        return f"Independent(scale={self.scale})"


class Joint:
    """τ → ∞: one adapter for all tasks, ``Θ ~ Normal(0, global_scale)`` (flat when None); there
    are no task sites, every task uses Θ."""

    def __init__(self, global_scale: float | None = 1.0):
        check_scale("global_scale", global_scale)
        self.global_scale = global_scale

    def __call__(self, modules: Sequence[AdaptedModule], tasks: pyro.plate) -> Factors:
        factors: Factors = {}
        for module in modules:
            factors[module.name] = tuple(  # type: ignore[assignment]
                pyro.sample(
                    site_name("global", module.name, factor),
                    weak_or_flat(factor_shape(module, factor), self.global_scale, tasks.device),
                ).expand(tasks.subsample_size, *factor_shape(module, factor))
                for factor in FACTORS
            )
        return factors

    def __repr__(self) -> str:
        return f"Joint(global_scale={self.global_scale})"


def prior_from_tau(tau: float, global_scale: float | None = 1.0, centered: bool = True):
    """τ = 0 → :class:`Independent`, τ = ∞ → :class:`Joint`, else :class:`HierarchicalNormal`."""
    if isinstance(tau, (int, float)) and tau == 0:
        return Independent(global_scale)
    if isinstance(tau, (int, float)) and math.isinf(tau) and tau > 0:
        return Joint(global_scale)
    return HierarchicalNormal(tau, global_scale, centered)

"""Guides for BoRA models: the place to read, change or add a variational family.

- :func:`map_guide`: ``AutoDelta``, a point estimate of every site — the paper's MAP estimator.
- :func:`mean_field_guide`: ``AutoNormal``, a diagonal Normal over every site.
- :func:`hybrid_guide`: MAP for the global factors Θ, a diagonal Normal over everything else
  (task factors, latent τ): empirical Bayes for Θ, VI for the tasks and hyperparameters.

They are Pyro's autoguides with one change (:mod:`guides.taskwise`): each task's values are their
own leaf tensors and the guides subsample the tasks plate like the model, so a step samples and
updates only the batch's tasks.

All start like LoRA (:class:`LoRAInit`): every ``lora_A`` at peft's kaiming-uniform draw, every
``lora_B`` at 0 and every task at the global value, so the adapted model starts as the base
model. (AutoNormal's default loc 0 for both A and B is LoRA's saddle point and never learns.)
Fit them with ``Trace_ELBO``.

A learned τ needs a guide with spread over the task factors: MAP over τ together with the task
factors is degenerate, the log-density ``Σ_d log Normal(θ_d; Θ, τ^{-1/2})`` grows without bound
as τ → ∞ and every θ_d collapses onto Θ. :func:`map_guide` therefore refuses a prior with
hyperparameter sites (see the prior contract in :mod:`bora_pyro.models.priors`); use
:func:`hybrid_guide` or :func:`mean_field_guide`. No guide's own q(τ) is calibrated; the posterior
of τ to report is the Laplace step's after the fit (:mod:`bora_pyro.guides.laplace_tau`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median

from bora_pyro.errors import ConfigError
from bora_pyro.lora import AdaptedModule, kaiming_uniform_A
from bora_pyro.models.priors import LEARNED_TAU_CENTERED, PACKED, factor_layout, hyperparameter_sites, is_factor_site
from bora_pyro.task_store import TaskStore

from .taskwise import TaskwiseDelta, TaskwiseMixin, TaskwiseNormal, is_location

__all__ = ["LEARNED_TAU_CENTERED", "LoRAInit", "TaskwiseDelta", "TaskwiseNormal", "hybrid_guide", "learned_tau_guide",
           "map_guide", "mean_field_guide", "only_tasks", "param_groups", "quantiles"]


class LoRAInit:
    """An ``init_loc_fn`` that starts the factors like LoRA.

    Sites named ``<level>.<module>.lora_A`` get one kaiming-uniform draw [r, in] per module, shared
    by the global site and every task (broadcast over the tasks plate); sites ending in ``lora_B``,
    ``_offset`` or ``_decentered`` start at 0. A packed site ``<level>.lora`` [..., P] gets the
    same draws in its ``lora_A`` segments and 0 in its ``lora_B`` segments (so a packed prior
    starts where its ``packed=False`` twin does). Any other site (a hyperparameter, e.g. a latent
    τ) falls back to ``fallback``.

    Args:
        seed: seeds the kaiming-uniform draws.
        modules: the adapted modules, needed to lay out packed sites.
    """

    def __init__(self, seed: int = 0, modules: tuple[AdaptedModule, ...] = (), fallback=init_to_median):
        self.generator = torch.Generator().manual_seed(seed)
        self.modules, self.fallback = tuple(modules), fallback
        self.draws: dict[str, torch.Tensor] = {}

    def draw_A(self, module: str, shape: tuple[int, int]) -> torch.Tensor:
        if module not in self.draws:
            self.draws[module] = kaiming_uniform_A(shape, self.generator)
        return self.draws[module]

    def __call__(self, site: dict) -> torch.Tensor:
        name = site["name"]
        if not is_factor_site(name):
            return self.fallback(site)
        value = site["fn"].sample().detach()  # only for its shape, dtype and device
        if name.endswith("." + PACKED):
            segments = factor_layout(self.modules).segments
            flat = torch.cat([self.draw_A(s.module.name, s.shape).flatten() if s.factor == "lora_A"
                              else torch.zeros(s.numel) for s in segments])
            return flat.to(value).expand_as(value).clone()
        if not name.endswith("lora_A"):
            return torch.zeros_like(value)
        module = name.split(".", 1)[1].rsplit(".", 1)[0]
        return self.draw_A(module, tuple(value.shape[-2:])).to(value).expand_as(value).clone()


def map_guide(model, seed: int = 0, task_store: TaskStore | None = None) -> AutoDelta:
    """The paper's MAP estimator: a point mass at every site, started like LoRA; the tasks' values
    in ``task_store`` when given (:class:`~bora_pyro.task_store.TaskStore`).

    Refused (:class:`~bora_pyro.errors.ConfigError`) when the prior of the BoRA ``model`` has
    hyperparameter sites such as a latent τ: their MAP with the task factors is degenerate.
    """
    hyperparameters = hyperparameter_sites(model.prior, model.lm.modules_spec, model.tasks_plate())
    if hyperparameters:
        raise ConfigError(
            f"map_guide cannot fit the latent {', '.join(hyperparameters)} of {model.prior!r}: MAP over τ and the "
            "task factors is degenerate (τ → ∞, every task collapses onto Θ); use hybrid_guide or "
            "mean_field_guide (--guide hybrid|mean-field), or fix τ"
        )
    return TaskwiseDelta(model, init_loc_fn=LoRAInit(seed, model.lm.modules_spec), create_plates=model.tasks_plate,
                         task_store=task_store)


#: A mean-field σ starts at this fraction of its site's prior sd (``init_scale=None``) …
START_FRACTION = 0.1
#: … and at most at this: Θ's weak prior (sd 1) would otherwise start it at 0.1, which moves the
#: logits by ~140 % on a GPT-2-small shape (1e-2: ~35 %, 1e-3: ~3 %).
MAX_START_SCALE = 1e-2


def check_init_scale(init_scale: float | None) -> None:
    if init_scale is not None and not init_scale > 0:
        raise ConfigError(f"init_scale must be > 0 or None (a tenth of each site's prior sd), got {init_scale}")


def taskwise_normal(model, init_scale: float | None, **kwargs) -> TaskwiseNormal:
    """A :class:`TaskwiseNormal` whose σ start at ``init_scale``, or from the prior when None."""
    check_init_scale(init_scale)
    if init_scale is None:
        return TaskwiseNormal(model, init_scale=MAX_START_SCALE, prior_fraction=START_FRACTION, **kwargs)
    return TaskwiseNormal(model, init_scale=init_scale, **kwargs)


def mean_field_guide(model, init_scale: float | None = None, seed: int = 0,
                     task_store: TaskStore | None = None) -> AutoNormal:
    """A mean-field Normal over every site, started like LoRA.

    Each entry's σ starts at :data:`START_FRACTION` (a tenth) of its prior sd given the prior's
    starting point (τ^{-1/2} for a task entry; a latent τ's log at a tenth of its hyperprior's
    spread), at most :data:`MAX_START_SCALE`; ``init_scale`` (a float) starts every σ there
    instead. A latent τ starts at its hyperprior's median. ``task_store`` as in :func:`map_guide`.
    """
    return taskwise_normal(model, init_scale, init_loc_fn=LoRAInit(seed, model.lm.modules_spec),
                           create_plates=model.tasks_plate, task_store=task_store)


def learned_tau_guide(model, init_scale: float | None = None, seed: int = 0,
                      task_store: TaskStore | None = None) -> AutoNormal:
    """The default guide for a learned τ, on a prior with ``centered=LEARNED_TAU_CENTERED`` (the
    default of :class:`~bora_pyro.models.HierarchicalNormal` with a hyperprior): of the guides
    measured against NUTS (``benchmarks/vi_vs_nuts.py``) the one whose τ interval is nearest the
    exact one's width. Its own q(τ) is not calibrated: simulation-based calibration
    (``benchmarks/sbc.py``) finds its intervals too narrow and τ too high (90 % intervals hold the
    true τ 69 % of the time). Report τ's posterior from the Laplace step at its median instead
    (:func:`~bora_pyro.guides.laplace_tau.fit_tau_posterior`, what ``bora-pyro fit`` does), which
    passes.

    Decentred task factors (z ~ Normal(0, 1), θ_d = Θ + τ^{-1/2}·z) under a mean-field guide:
    the likelihood then depends on τ, and entries the documents hardly inform keep q(z) at the
    prior, so they say nothing about τ (with offsets every entry adds to q(τ)'s precision, and
    its interval shrinks to √(2/(D·P)) whatever the data say).
    """
    return mean_field_guide(model, init_scale, seed, task_store)


def is_global(msg: dict) -> bool:
    """A sample site of the global factors Θ (``global.*``)."""
    return msg["type"] == "sample" and msg["name"].startswith("global.")


def hybrid_guide(model, init_scale: float | None = None, seed: int = 0,
                 task_store: TaskStore | None = None) -> AutoGuideList:
    """MAP (``AutoDelta``) for the global factors Θ, mean-field (``AutoNormal``) for every other
    site: the task factors and any hyperparameter such as a latent τ.

    The guide to learn τ with when Θ is wanted as a point (the paper's estimate): its ELBO keeps
    the entropy of the task factors, which stops the collapse a MAP over τ would suffer. Started
    like LoRA; ``init_scale`` as in :func:`mean_field_guide`, ``task_store`` as in :func:`map_guide`.
    """
    init = LoRAInit(seed, model.lm.modules_spec)  # one instance: both parts start from the same kaiming draws
    guide = AutoGuideList(model, create_plates=model.tasks_plate)
    guide.append(TaskwiseDelta(poutine.block(model, expose_fn=is_global), init_loc_fn=init))
    # the inner InitMessenger starts the hidden Θ too, so that task sites defined relative to Θ
    # (offsets, LocScaleReparam) start at Θ's starting value
    guide.append(taskwise_normal(poutine.block(InitMessenger(init)(model), hide_fn=is_global), init_scale,
                                 init_loc_fn=init, task_store=task_store))
    return guide


def param_groups(guide, lr: float, log_scale_lr: float) -> list[dict]:
    """The guide's parameters as two torch optimizer groups: the locations of the factor sites at
    ``lr``; the rest at ``log_scale_lr``: the variational scales (stored as log σ)
    and every parameter of a hyperparameter site (a latent τ: the loc and scale of log τ).

    Adam moves a parameter by about lr per step. 1e-3 suits LoRA factors, but a log-scale
    parameter then moves by 0.25 in 250 steps: a learned τ barely leaves its start, and the
    mean-field scales stay at ``init_scale``, where they bias τ (up for centred task factors, down
    for ``LocScaleReparam``). Give those ~0.05: ``torch.optim.Adam(param_groups(guide, 1e-3, 0.05))``.
    """
    locations, log_scales = [], []
    for name, parameter in guide.named_parameters():
        (locations if is_location(name) else log_scales).append(parameter)
    return [{"params": locations, "lr": lr}, {"params": log_scales, "lr": log_scale_lr}]


@contextlib.contextmanager
def only_tasks(guide, tasks: Sequence[int] | None) -> Iterator[None]:
    """Within it, ``guide.median()`` and :func:`quantiles` give the task sites' rows of ``tasks``
    only (:meth:`TaskwiseMixin.only_tasks` on every part of an ``AutoGuideList``); pass ``tasks``
    to ``model.task_factors`` with them. ``tasks=None``: all tasks."""
    with contextlib.ExitStack() as stack:
        for part in guide if isinstance(guide, AutoGuideList) else [guide]:
            if isinstance(part, TaskwiseMixin):
                stack.enter_context(part.only_tasks(tasks))
        yield


def quantiles(guide, probs: list[float]) -> dict[str, torch.Tensor]:
    """Posterior quantiles of every latent site, [len(probs), *site shape], for any guide here:
    also an :class:`AutoGuideList` with point-mass (``AutoDelta``) parts, whose every quantile is
    the point (Pyro's own ``quantiles`` stops at those)."""
    result = {}
    for part in guide if isinstance(guide, AutoGuideList) else [guide]:
        if isinstance(part, AutoDelta):
            result.update({name: value.expand(len(probs), *value.shape) for name, value in part.median().items()})
        else:
            result.update(part.quantiles(probs))
    return result

"""``AutoNormal`` and ``AutoDelta`` whose per-task values are separate leaf tensors.

A training step of BoRA samples only the batch's tasks (the tasks plate is subsampled, see
:class:`~bora_pyro.models.bora.TaskSubsample`). Pyro's autoguides keep a site of the tasks plate
as one [D, ...] parameter and index its rows: the gradient is then a dense [D, ...] tensor that
is zero outside the batch's rows, and Adam still moves every row (its momentum) and pays for all
D. Here each task's row of such a site is its own ``nn.Parameter``: rows of tasks that are not in
the batch get no gradient (``.grad is None``), and torch's optimizers skip them, so a step costs
the same whatever D. This is "lazy" Adam: a task's moments advance only in the steps that see it.

Everything else is as in Pyro's guides: the same sites, distributions, ``median()`` and
``quantiles()`` (over all D tasks); sites outside the tasks plate keep Pyro's parameters. Two
costs are cut on the way, as the sites are big ([K, P] floats): the mean-field guide draws and
scores each task's row in one pass from its leaves (:class:`~bora_pyro.models.normal.DrawnRows`:
the log-density at the draw comes from the draw's noise), and a point mass whose log-density is
0 (every ``Delta`` of the MAP guide, and of the mean-field guide on unconstrained sites) is
masked out of the ELBO instead of being evaluated as ``log(value == value)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from operator import attrgetter

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.infer.autoguide.guides import AutoGuide
from pyro.infer.autoguide.utils import deep_setattr, helpful_support_errors
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.distributions import constraints

from bora_pyro.models.normal import DrawnRows
from bora_pyro.models.priors import is_factor_site
from bora_pyro.task_store import StoredRows, TaskStore

TASKS = "tasks"


class TaskRows(nn.Module):
    """One site's unconstrained values for D tasks, one leaf parameter per task.

    Args:
        init: [..., K, ...] values of K tasks along ``dim``; task d starts at row ``d % K``.
        dim: the tasks dim of the site's value (negative, counted from the right).
        num_tasks: D.
    """

    def __init__(self, init: torch.Tensor, dim: int, num_tasks: int):
        super().__init__()
        self.dim = dim
        self.rows = nn.ParameterList(
            [nn.Parameter(init.select(dim, d % init.shape[dim]).detach().clone()) for d in range(num_tasks)])

    def select(self, tasks: Sequence[int] | None = None) -> list[nn.Parameter]:
        """The leaves of ``tasks`` (all D when None), in that order."""
        return list(self.rows) if tasks is None else [self.rows[d] for d in tasks]

    def forward(self, tasks: Sequence[int] | None = None) -> torch.Tensor:
        """The rows of ``tasks`` (all D when None) stacked along ``dim``: [..., K, ...]."""
        return torch.stack(self.select(tasks), self.dim)


def task_rows(site: dict, init: torch.Tensor, event_dim: int, store: TaskStore | None = None,
              key: str = "", is_location: bool = True) -> TaskRows | StoredRows | None:
    """Per-task leaves started at ``init`` (the site's unconstrained value, ``event_dim`` event
    dims) for a site in the tasks plate, held by ``store`` under ``key`` when given (``is_location``:
    its optimizer group, see :meth:`TaskStore.attach`); None for a site outside the plate."""
    for frame in site["cond_indep_stack"]:
        if frame.name == TASKS:
            dim, num_tasks = frame.dim - event_dim, frame.full_size or frame.size
            if store is None:
                return TaskRows(init, dim, num_tasks)
            return store.rows(key, init, dim, num_tasks, is_location)
    return None


def is_flat(fn: torch.distributions.Distribution) -> bool:
    """Whether ``fn`` is a flat (improper) prior: a Normal masked out of the log-joint (see
    :func:`~bora_pyro.models.priors.weak_or_flat`), possibly inside ``Independent``."""
    while isinstance(fn, (dist.Independent, MaskedDistribution)):
        if isinstance(fn, MaskedDistribution) and fn._mask is False:
            return True
        fn = fn.base_dist
    return False


#: Draws of a constrained site's prior whose unconstrained spread gives its prior sd.
PRIOR_SD_DRAWS = 1000


def unconstrained_prior_sd(fn: torch.distributions.Distribution, value: torch.Tensor) -> torch.Tensor:
    """The prior standard deviation of every entry of a site, in the guide's unconstrained space:
    [*value.shape] (inf for a flat prior or an infinite variance, e.g. StudentT with df ≤ 2).

    ``fn.stddev`` for a real site; for a constrained one (a latent τ) the spread of
    ``PRIOR_SD_DRAWS`` prior draws mapped to the real line, drawn from a fixed seed so that
    building a guide does not consume the caller's random numbers."""
    if is_flat(fn):
        return torch.full_like(value, math.inf)
    transform = biject_to(fn.support)
    if is_identity(transform):
        sd = fn.stddev.detach()
    else:
        with torch.random.fork_rng(devices=[value.device] if value.device.type == "cuda" else []):
            torch.manual_seed(0)
            sd = transform.inv(fn.sample((PRIOR_SD_DRAWS,)).detach()).std(0)
    sd = torch.nan_to_num(sd, nan=math.inf)
    return sd.expand(transform.inv(value).shape).clone()


def is_identity(transform) -> bool:
    """Whether ``transform`` (a ``biject_to`` result) maps a real site onto itself."""
    while isinstance(transform, dist.transforms.IndependentTransform):
        transform = transform.base_transform
    return transform is biject_to(constraints.real)


def rows_key(name: str) -> str:
    """A site name as a module key (which cannot hold dots)."""
    return name.replace(".", "/")


def is_log_scale(parameter_name: str) -> bool:
    """Whether a guide parameter holds variational log σ (``log_scales.*``/``task_log_scales.*``,
    also inside a part ``N.`` of a guide list)."""
    return re.search(r"(^|\.)(task_)?log_scales\.", parameter_name) is not None


def unmangled(parameter_name: str) -> str:
    """A guide parameter's name with a task row's key turned back into its site's name:
    ``task_locs.task/lora.rows.3`` → ``task_locs.task.lora`` (other names unchanged)."""
    return re.sub(r"\.rows\.\d+$", "", parameter_name).replace("/", ".")


def is_location(parameter_name: str) -> bool:
    """Whether a guide parameter holds a factor site's location (``lr``'s optimizer group in
    :func:`~bora_pyro.guides.param_groups`), not a variational log σ or a hyperparameter's."""
    return is_factor_site(unmangled(parameter_name).removesuffix("_unconstrained")) and not is_log_scale(parameter_name)


class TaskwiseMixin:
    """What both guides share: the batch's task indices, read from the tasks plate while the
    guide runs (None, i.e. all tasks, outside a run: ``median()``, ``quantiles()``), and
    parameters local to the guide.

    Pyro's autoguides keep their parameters in Pyro's global param store by name, so a second
    guide of the same class in one process takes over the first one's tensors (a τ sweep's
    every fit would start where the previous one stopped, and share its tensors). These guides
    run with ``module_local_params``: every guide owns its parameters, like a torch module.

    Args:
        task_store: keep the per-task rows in this :class:`~bora_pyro.task_store.TaskStore`
            (host memory or files) instead of as leaves on the device: only the
            batch's tasks come to the device during a step. None: leaves (:class:`TaskRows`).
    """

    _running = False

    def __init__(self, model, *, task_store: TaskStore | None = None, **kwargs):
        super().__init__(model, **kwargs)
        #: Where the per-task rows live: None keeps them on the device as leaves (:class:`TaskRows`).
        self.task_store = task_store

    def _task_rows(self, attribute: str, name: str, site: dict, init: torch.Tensor, event_dim: int):
        """:func:`task_rows` of site ``name`` for the guide's ``attribute`` (``task_locs``, …), in
        the guide's task store if it has one."""
        return task_rows(site, init, event_dim, self.task_store, f"{attribute}/{rows_key(name)}",
                         is_location(f"{attribute}.{rows_key(name)}"))

    def task_rows(self, attribute: str) -> nn.ModuleDict:
        """The guide's ``nn.ModuleDict`` ``attribute`` of per-task leaves (``task_locs``, …).

        Read from ``_modules``, not as ``self.task_locs``: a PyroModule's ``__getattr__`` issues
        a param statement for every leaf of an ``nn.Module`` it returns, D per task site on each
        read; with one site per module and factor (``examples/custom_prior.py``'s clustered prior,
        25 tasks, 12 modules) that made a step 9× slower than its LM pass. The optimizer takes
        ``guide.parameters()``, so the statements carry nothing it needs."""
        return self._modules[attribute]

    _only_tasks: list[int] | None = None

    @contextmanager
    def only_tasks(self, tasks: Sequence[int] | None) -> Iterator[None]:
        """Within it, ``median()`` and ``quantiles()`` give the task sites' rows of ``tasks`` only,
        [..., K, ...] where they give [..., D, ...] (a guide with a task store reads no other);
        ``tasks=None``: all of them."""
        outer, self._only_tasks = self._only_tasks, None if tasks is None else list(tasks)
        try:
            yield
        finally:
            self._only_tasks = outer

    @property
    def _batch_tasks(self) -> list[int] | None:
        """The indices of the tasks plate's subsample while the guide runs, else those of
        :meth:`only_tasks`, else None (all)."""
        plates = getattr(self, "plates", {}) if self._running else {}
        return plates[TASKS].indices.tolist() if TASKS in plates else self._only_tasks

    def forward(self, *args, **kwargs):
        with pyro.settings.context(module_local_params=True):
            if self.prototype_trace is None:
                self._setup_prototype(*args, **kwargs)
            self._running = True
            try:
                return self._sample(*args, **kwargs)
            finally:
                self._running = False


class TaskwiseNormal(TaskwiseMixin, AutoNormal):
    """:class:`~pyro.infer.autoguide.AutoNormal` with one leaf ``loc`` and ``log_scale`` per task
    for the sites of the tasks plate (``task_locs`` / ``task_log_scales``). Same arguments, and:

    Args:
        prior_fraction: when given, every entry's σ starts at ``prior_fraction`` × its prior sd
            (:func:`unconstrained_prior_sd`, at the prior's starting point: a latent τ at its
            hyperprior's median), at most ``init_scale``; None: every σ starts at ``init_scale``.
            A fixed start ignores the prior's scale: at τ = 1e3 the task entries' prior sd is
            0.032, and a start of 1e-3 is then 30× below it, where Adam needs hundreds of steps
            at a small lr to reach the posterior's spread.

    The scales are kept as log σ (``log_scales`` / ``task_log_scales``), not as Pyro's
    softplus⁻¹ σ: log q then needs Σ log σ, a sum of the parameters, where softplus takes two
    transcendental passes over every [K, P] site (softplus, then log). For the small scales of
    LoRA factors the two hardly differ: softplus⁻¹ σ = log σ + σ/2 + O(σ²).
    """

    def __init__(self, model, *, prior_fraction: float | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.prior_fraction = prior_fraction

    def start_log_scale(self, site: dict, init_loc: torch.Tensor) -> torch.Tensor:
        """log σ at the start, [*init_loc.shape] (see ``prior_fraction``)."""
        if self.prior_fraction is None:
            return torch.full_like(init_loc, math.log(self._init_scale))
        sd = unconstrained_prior_sd(site["fn"], site["value"].detach()).to(init_loc)
        return (self.prior_fraction * sd).clamp(max=self._init_scale).log()

    def _setup_prototype(self, *args, **kwargs):
        AutoGuide._setup_prototype(self, *args, **kwargs)
        self._event_dims = {}
        self.locs, self.log_scales = PyroModule(), PyroModule()
        self.task_locs, self.task_log_scales = nn.ModuleDict(), nn.ModuleDict()
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with helpful_support_errors(site):
                init_loc = biject_to(site["fn"].support).inv(site["value"].detach()).detach()
            event_dim = site["fn"].event_dim + init_loc.dim() - site["value"].dim()
            self._event_dims[name] = event_dim
            init_log_scale = self.start_log_scale(site, init_loc)
            locs = self._task_rows("task_locs", name, site, init_loc, event_dim)
            if locs is None:
                deep_setattr(self.locs, name, PyroParam(init_loc, constraints.real, event_dim))
                deep_setattr(self.log_scales, name, PyroParam(init_log_scale, constraints.real, event_dim))
            else:
                self.task_locs[rows_key(name)] = locs
                self.task_log_scales[rows_key(name)] = self._task_rows("task_log_scales", name, site, init_log_scale,
                                                                       event_dim)

    def _rows(self, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor], int | None]:
        """The locs and log-scales of site ``name`` as rows (the batch's tasks during a run, all D
        outside one) and their dim; one unstacked row (dim None) for a site outside the tasks plate."""
        key, locs = rows_key(name), self.task_rows("task_locs")
        if key not in locs:
            return [attrgetter(name)(self.locs)], [attrgetter(name)(self.log_scales)], None
        tasks = self._batch_tasks
        return locs[key].select(tasks), self.task_rows("task_log_scales")[key].select(tasks), locs[key].dim

    def _sample(self, *args, **kwargs) -> dict:
        """AutoNormal's forward, with the fused draw and no log-density pass for identity transforms."""
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            transform = biject_to(site["fn"].support)
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                unconstrained = pyro.sample(f"{name}_unconstrained", DrawnRows(*self._rows(name), self._event_dims[name]),
                                            infer={"is_auxiliary": True})
                if is_identity(transform):
                    point = dist.Delta(unconstrained, event_dim=site["fn"].event_dim).mask(False)
                else:
                    value = transform(unconstrained)
                    log_density = 0.0 if poutine.get_mask() is False else sum_rightmost(
                        transform.inv.log_abs_det_jacobian(value, unconstrained),
                        unconstrained.dim() - value.dim() + site["fn"].event_dim)
                    point = dist.Delta(value, log_density=log_density, event_dim=site["fn"].event_dim)
                result[name] = pyro.sample(name, point)
        return result

    def _get_loc_and_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Site ``name``'s loc and σ, stacked (what Pyro's ``median()`` and ``quantiles()`` read)."""
        return DrawnRows(*self._rows(name), self._event_dims[name]).stacked().compact


class TaskwiseDelta(TaskwiseMixin, AutoDelta):
    """:class:`~pyro.infer.autoguide.AutoDelta` (MAP) with one leaf value per task for the sites
    of the tasks plate (``task_values``, unconstrained). Same arguments."""

    def _setup_prototype(self, *args, **kwargs):
        AutoGuide._setup_prototype(self, *args, **kwargs)
        self.task_values = nn.ModuleDict()
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            value, event_dim = site["value"].detach(), site["fn"].event_dim
            rows = self._task_rows("task_values", name, site, biject_to(site["fn"].support).inv(value), event_dim)
            if rows is None:
                with helpful_support_errors(site):
                    deep_setattr(self, name, PyroParam(value, site["fn"].support, event_dim))
            else:
                self.task_values[rows_key(name)] = rows

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Every site's point (AutoDelta's, read without running the guide: within
        :meth:`only_tasks` the task sites hold fewer rows than the model's tasks plate). The
        arguments only set the guide up on its first call; they choose no tasks."""
        with pyro.settings.context(module_local_params=True):
            if self.prototype_trace is None:
                self._setup_prototype(*args, **kwargs)
            return {name: self.value(name, site).detach() for name, site in self.prototype_trace.iter_stochastic_nodes()}

    def value(self, name: str, site: dict) -> torch.Tensor:
        """The point of site ``name`` (of the batch's tasks during a run)."""
        key, values = rows_key(name), self.task_rows("task_values")
        if key not in values:
            return attrgetter(name)(self)
        return biject_to(site["fn"].support)(values[key](self._batch_tasks))

    def _sample(self, *args, **kwargs) -> dict:
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                point = dist.Delta(self.value(name, site), event_dim=site["fn"].event_dim)
                result[name] = pyro.sample(name, point.mask(False))  # its log-density is 0
        return result

"""The BoRA model as a Pyro program: a prior over LoRA factors and a frozen LM's likelihood.

    θ_1..θ_D, Θ ~ prior                      (sites from the prior object, e.g. HierarchicalNormal)
    log p(docs | θ) = Σ_n Σ_i log LLM(w_{n,i+1} | w_{n,1:i}; θ_{task(n)})

The likelihood of a batch is one ``pyro.factor`` per document inside
``pyro.plate("docs", N, subsample=doc_ids)``, so Pyro scales the batch's log-likelihood by
``N / batch`` into an unbiased estimate of the whole data set's.

A training batch of B documents touches at most B of the D tasks, so the tasks plate is
subsampled to them (:class:`TaskSubsample`): a step samples, scores and updates the batch's
tasks only, so its cost grows with the batch's tasks (at most B), not with D.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import pyro
import torch
from pyro import poutine

from bora_pyro.adapted_lm import MultiTaskLM
from bora_pyro.data import Batch
from bora_pyro.errors import ConfigError
from bora_pyro.lora import AdaptedModule
from bora_pyro.models.priors import shared_sites, subsampled

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
Prior = Callable[[Sequence[AdaptedModule], pyro.plate], Factors]


class TaskSubsample(pyro.plate):
    """The tasks plate subsampled to the K tasks of a training batch, each task weighted so that
    its prior and guide terms stay an unbiased estimate of the full sums.

    A uniform ``D / K`` (what ``pyro.plate`` does) would be biased: the tasks present in a batch
    are not a uniform draw, tasks with many documents come often. Instead every task's term is
    shared among its documents and estimated by the batch like the likelihood is: for task d
    with c_d of the batch's B documents and N_d of the split's N,

        w_d = (N / B) · c_d / N_d,    E_batch[Σ_{d in batch} w_d f(θ_d)] = Σ_d f(θ_d).

    Args:
        size: D, the number of tasks.
        task_ids: [B] long, each row's task.
        task_sizes: [B] long, N_{task_ids[b]}: the split's documents of each row's task.
        num_docs: N, the split's documents.

    Attributes:
        row_tasks: [B] long, each row's position among the plate's K tasks (the factors' first dim);
            ``arange(B)`` when every row has its own task (the tasks then in the rows' order).
        weights: [K] float, w_d of the plate's tasks, in the order of ``indices``.
    """

    def __init__(self, name: str, size: int, task_ids: torch.Tensor, task_sizes: torch.Tensor, num_docs: int,
                 device: torch.device | None = None):
        tasks, self.row_tasks, counts = torch.unique(task_ids, return_inverse=True, return_counts=True)
        if len(tasks) == len(task_ids):  # every row its own task: keep the rows' order, so row b uses factor b
            tasks, self.row_tasks = task_ids, torch.arange(len(task_ids), device=task_ids.device)
        super().__init__(name, size, subsample=tasks, device=device)
        sizes = torch.zeros_like(tasks).scatter_(0, self.row_tasks, task_sizes)  # N_d of each present task
        self.weights = (num_docs / len(task_ids)) * counts.float() / sizes.float()

    def _process_message(self, msg) -> None:
        super()._process_message(msg)  # scales by D / K: replaced by the weights
        weights = self.weights.reshape((-1,) + (1,) * (-1 - self.dim))
        msg["scale"] = msg["scale"] * (self.subsample_size / self.size) * weights


class BoRA:
    """The hierarchical multi-task LoRA model.

    Args:
        lm: the frozen LM with multi-task LoRA layers.
        prior: a prior object (see ``bora_pyro.models.priors`` for the contract).
        num_tasks: D, the number of tasks.
        task_weights: [D] float, optional: each document's log-likelihood in the objective is
            multiplied by its task's weight, e.g. :func:`~bora_pyro.models.paper_prior.paper_task_weights`
            (the published code's per-task mean token NLL). The returned log-likelihoods, which
            ``fit`` reports as training perplexity, stay unweighted.

    Calling the model on a :class:`~bora_pyro.data.Batch` samples the factors from the prior and
    scores the batch's documents; it returns their log-likelihoods, [batch]. A batch that knows
    its tasks' sizes (every batch of :meth:`DocumentSet.batches <bora_pyro.data.DocumentSet.batches>`)
    samples only its own tasks (:class:`TaskSubsample`); one that does not samples all D. A
    process's shard of a global batch (data-parallel SVI, :meth:`Batch.shard
    <bora_pyro.data.Batch.shard>`) samples the global batch's tasks and weights its rows'
    likelihood by ``Batch.likelihood_scale``.
    """

    def __init__(self, lm: MultiTaskLM, prior: Prior, num_tasks: int, task_weights: torch.Tensor | None = None):
        self.lm, self.prior, self.num_tasks = lm, prior, num_tasks
        self.task_weights = None if task_weights is None else checked_weights(task_weights, num_tasks, lm.device)

    def tasks_plate(self, batch: Batch | None = None) -> pyro.plate:
        """The plate of all D tasks, or of ``batch``'s tasks (:class:`TaskSubsample`) when the
        batch has ``task_sizes``. Guides take it as ``create_plates`` so they subsample alike."""
        if batch is None or batch.task_sizes is None:
            return pyro.plate("tasks", self.num_tasks, device=self.lm.device)
        whole = batch if batch.shard_of is None else batch.shard_of  # a shard samples its global batch's tasks
        return TaskSubsample("tasks", self.num_tasks, whole.task_ids, whole.task_sizes, batch.num_docs, self.lm.device)

    def __call__(self, batch: Batch) -> torch.Tensor:
        tasks = self.tasks_plate(batch)
        factors = self.prior(self.lm.modules_spec, tasks)
        if len(batch.task_ids) == 0:  # a process's empty share of a small global batch: prior terms only
            return torch.zeros(0, device=self.lm.device)
        row_tasks = batch.task_ids
        if isinstance(tasks, TaskSubsample):
            row_tasks = tasks.row_tasks if batch.shard_of is None else tasks.row_tasks[batch.shard_of.rows]
        with self.lm.adapters(factors, row_tasks):
            log_likelihood = self.lm.sequence_log_prob(batch.input_ids, batch.attention_mask)
        with pyro.plate("docs", batch.num_docs, subsample=batch.doc_ids, device=self.lm.device), \
                poutine.scale(scale=batch.likelihood_scale):
            weights = 1.0 if self.task_weights is None else self.task_weights[batch.task_ids]
            pyro.factor("log_likelihood", log_likelihood * weights)
        return log_likelihood

    def task_factors(self, values: Mapping[str, torch.Tensor], tasks: Sequence[int] | None = None) -> Factors:
        """The factors every task uses, [D, ...] per module, given values of the prior's sites
        (e.g. a guide's ``median()``): the prior is run with its sites fixed to ``values``.
        With ``tasks``, those tasks' factors, [K, ...], from values whose task sites hold their
        rows only (a guide's ``median()`` within ``only_tasks(tasks)``)."""
        plate = self.tasks_plate() if tasks is None else subsampled(self.tasks_plate(), tasks)
        with poutine.block(), poutine.condition(data=dict(values)):
            return self.prior(self.lm.modules_spec, plate)

    @functools.cached_property
    def shared_site_names(self) -> list[str]:
        """The prior's latent sites outside the tasks plate: what every task shares (Θ, τ, …)."""
        return shared_sites(self.prior, self.lm.modules_spec, self.tasks_plate())

    def for_new_tasks(self, values: Mapping[str, torch.Tensor], num_new: int = 1,
                      task_weights: torch.Tensor | None = None) -> BoRA:
        """The model of ``num_new`` unseen tasks given the shared sites (Θ, τ, …; those outside the
        tasks plate) fixed at ``values``, e.g. a guide's ``median()`` or one posterior draw.

        Its only latent sites are the new tasks', so its prior is p(θ_new | Θ, τ) and a guide
        fitted to it (a few-shot fit of new tasks) cannot move Θ or τ: they are copies.

        ``task_weights`` are the new tasks' likelihood weights, [num_new] (None: unweighted). This
        model's own weights do not carry over: they belong to its D tasks, and the new ones are
        others (for the published objective, :func:`~bora_pyro.models.paper_prior.paper_task_weights`
        of the new tasks' corpus). The prior, and so ``task_factors``, does not depend on them.

        Raises:
            ConfigError: ``values`` lack a shared site.
        """
        missing = [name for name in self.shared_site_names if name not in values]
        if missing:
            raise ConfigError(f"values for the new tasks' model lack the shared sites {', '.join(missing)}; "
                              "pass a guide's median() or one of its draws")
        fixed = {name: values[name].detach().clone() for name in self.shared_site_names}
        return BoRA(self.lm, poutine.condition(self.prior, data=fixed), num_new, task_weights)

    def __repr__(self) -> str:
        weighted = "" if self.task_weights is None else ", task_weights=[...]"
        return f"BoRA(prior={self.prior!r}, num_tasks={self.num_tasks}, modules={len(self.lm.modules_spec)}{weighted})"


def checked_weights(task_weights: torch.Tensor, num_tasks: int, device: torch.device) -> torch.Tensor:
    """``task_weights`` as a [D] float32 tensor on ``device``; :class:`ConfigError` unless it is D
    positive finite numbers."""
    weights = torch.as_tensor(task_weights, dtype=torch.float32, device=device)
    if weights.shape != (num_tasks,):
        raise ConfigError(f"task_weights must hold one weight per task, shape ({num_tasks},), "
                          f"got {tuple(weights.shape)}")
    if not bool((torch.isfinite(weights) & (weights > 0)).all()):
        raise ConfigError(f"task_weights must be positive finite numbers, got {weights.tolist()}")
    return weights

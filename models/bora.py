"""The BoRA model as a Pyro program: a prior over LoRA factors and a frozen LM's likelihood.

    θ_1..θ_D, Θ ~ prior                      (sites from the prior object, e.g. HierarchicalNormal)
    log p(docs | θ) = Σ_n Σ_i log LLM(w_{n,i+1} | w_{n,1:i}; θ_{task(n)})

The likelihood of a batch is one ``pyro.factor`` per document inside
``pyro.plate("docs", N, subsample=doc_ids)``, so Pyro scales the batch's log-likelihood by
``N / batch`` into an unbiased estimate of the whole data set's.
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
from bora_pyro.models.priors import shared_sites

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
Prior = Callable[[Sequence[AdaptedModule], pyro.plate], Factors]


class BoRA:
    """The hierarchical multi-task LoRA model.

    Args:
        lm: the frozen LM with multi-task LoRA layers.
        prior: a prior object (see ``bora_pyro.models.priors`` for the contract).
        num_tasks: D, the number of tasks.

    Calling the model on a :class:`~bora_pyro.data.Batch` samples every factor from the prior and
    scores the batch's documents; it returns their log-likelihoods, [batch].
    """

    def __init__(self, lm: MultiTaskLM, prior: Prior, num_tasks: int):
        self.lm, self.prior, self.num_tasks = lm, prior, num_tasks

    def tasks_plate(self) -> pyro.plate:
        return pyro.plate("tasks", self.num_tasks, device=self.lm.device)

    def __call__(self, batch: Batch) -> torch.Tensor:
        factors = self.prior(self.lm.modules_spec, self.tasks_plate())
        with self.lm.adapters(factors, batch.task_ids):
            log_likelihood = self.lm.sequence_log_prob(batch.input_ids, batch.attention_mask)
        with pyro.plate("docs", batch.num_docs, subsample=batch.doc_ids, device=self.lm.device):
            pyro.factor("log_likelihood", log_likelihood)
        return log_likelihood

    def task_factors(self, values: Mapping[str, torch.Tensor]) -> Factors:
        """The factors every task uses, [D, ...] per module, given values of the prior's sites
        (e.g. a guide's ``median()``): the prior is run with its sites fixed to ``values``."""
        with poutine.block(), poutine.condition(data=dict(values)):
            return self.prior(self.lm.modules_spec, self.tasks_plate())

    @functools.cached_property
    def shared_site_names(self) -> list[str]:
        """The prior's latent sites outside the tasks plate: what every task shares (Θ, τ, …)."""
        return shared_sites(self.prior, self.lm.modules_spec, self.tasks_plate())

    def for_new_tasks(self, values: Mapping[str, torch.Tensor], num_new: int = 1) -> BoRA:
        """The model of ``num_new`` unseen tasks given the shared sites (Θ, τ, …; those outside the
        tasks plate) fixed at ``values``, e.g. a guide's ``median()`` or one posterior draw.

        Its only latent sites are the new tasks', so its prior is p(θ_new | Θ, τ) and a guide
        fitted to it (a few-shot fit of new tasks) cannot move Θ or τ: they are copies.

        Raises:
            ConfigError: ``values`` lack a shared site.
        """
        missing = [name for name in self.shared_site_names if name not in values]
        if missing:
            raise ConfigError(f"values for the new tasks' model lack the shared sites {', '.join(missing)}; "
                              "pass a guide's median() or one of its draws")
        fixed = {name: values[name].detach().clone() for name in self.shared_site_names}
        return BoRA(self.lm, poutine.condition(self.prior, data=fixed), num_new)

    def __repr__(self) -> str:
        return f"BoRA(prior={self.prior!r}, num_tasks={self.num_tasks}, modules={len(self.lm.modules_spec)})"

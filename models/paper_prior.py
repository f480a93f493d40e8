"""The published code's objective as a model: a norm penalty as a prior, per-task mean-NLL weights.

The paper writes θ_d ~ Normal(Θ, τ^{-1} I) (:class:`~bora_pyro.models.priors.HierarchicalNormal`);
its published code minimises something else (see ``BORA.md``, "How the published code did it"):

    Σ_d N_d · mean token NLL_d(θ_d)  +  τ_p · Σ_d ‖θ_d − Θ‖₂,

the norm unsquared and over the whole adapter of task d (every factor of every module), and each
task's likelihood a mean over its tokens times its number of documents N_d. Read as a MAP
objective, that is the log-joint of

    Θ ~ flat                                       (or Normal(0, global_scale))
    δ_d = θ_d − Θ ~ RadialLaplace(0, τ_p)          density ∝ exp(−τ_p ‖δ_d‖₂) over R^P
    log-likelihood of document n of task d, weighted by 1 / L̄_d,

where L̄_d is task d's mean number of predicted tokens per training document: N_d times the mean
over its N_d·L̄_d tokens is the task's summed log-likelihood divided by L̄_d. Here:

- :class:`RadialLaplace`: the penalty as a proper distribution over a P-vector;
- :class:`PaperNormPrior`: the prior, following the contract of :mod:`~bora_pyro.models.priors`;
- :func:`paper_task_weights`: the 1 / L̄_d of a corpus, for ``BoRA(..., task_weights=...)``;
- :func:`equivalent_tau`: the Gaussian precision τ that a fitted τ_p acts like, task by task.

Fit it by MAP, the seed's estimator::

    prior = PaperNormPrior(100.0)
    model = BoRA(lm, prior, corpus.num_tasks, task_weights=paper_task_weights(corpus))
    result = fit(model, map_guide(model), corpus)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints

from bora_pyro.data import MultiTaskCorpus
from bora_pyro.lora import AdaptedModule
from bora_pyro.models.priors import PACKED, Factors, check_scale, factor_layout, weak_or_flat


class RadialLaplace(TorchDistribution):
    """The density ∝ exp(−rate·‖x − loc‖₂) over R^P (event shape [P]): a Laplace in the radius.

    In polar coordinates x = loc + r·u, with u uniform on the unit sphere S^{P−1} of area
    S_P = 2π^{P/2} / Γ(P/2) and dx = r^{P−1} dr du,

        ∫ exp(−λ‖x‖) dx = S_P ∫_0^∞ r^{P−1} e^{−λr} dr = S_P Γ(P) / λ^P,

    so log p(x) = −λ‖x − loc‖ + P log λ − log Γ(P) + log Γ(P/2) − log 2 − (P/2) log π, the radius
    r ~ Gamma(P, λ) (mean P/λ) and u is independent of it. A draw is ``loc + r·u``, u a
    normalised standard Normal; it is reparametrised in ``loc`` and ``rate``.

    The gradient of ‖x − loc‖ at x = loc is taken as 0 (``torch.linalg.vector_norm``'s
    subgradient; ``sqrt(sum(x²))`` would give nan): the task offsets start at exactly 0.

    Args:
        loc: [..., P] the centre.
        rate: λ > 0, a float or a tensor of the batch shape (broadcast with ``loc.shape[:-1]``).
    """

    arg_constraints = {"loc": constraints.real_vector, "rate": constraints.positive}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, rate: float | torch.Tensor, validate_args: bool | None = None):
        rate = torch.as_tensor(rate, dtype=loc.dtype, device=loc.device)
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], rate.shape)
        self.loc, self.rate = loc.expand(batch_shape + loc.shape[-1:]), rate.expand(batch_shape)
        super().__init__(batch_shape, loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> RadialLaplace:
        new = self._get_checked_instance(RadialLaplace, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.rate = self.loc.expand(batch_shape + self.event_shape), self.rate.expand(batch_shape)
        super(RadialLaplace, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        """Per coordinate E r² / P = (P + 1) / λ² (isotropic, so E u_i² = 1/P)."""
        size = self.event_shape[0]
        return ((size + 1) / self.rate**2).unsqueeze(-1).expand(self.loc.shape)

    def log_normalizer(self) -> torch.Tensor:
        """log ∫ exp(−λ‖x‖) dx = log S_P + log Γ(P) − P log λ, batch shape."""
        size = self.event_shape[0]
        log_sphere = math.log(2) + size / 2 * math.log(math.pi) - math.lgamma(size / 2)
        return log_sphere + math.lgamma(size) - size * self.rate.log()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return -self.rate * torch.linalg.vector_norm(value - self.loc, dim=-1) - self.log_normalizer()

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        direction = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        direction = direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True)
        size = torch.full_like(self.rate, self.event_shape[0])
        radius = torch.distributions.Gamma(size, self.rate).rsample(sample_shape)
        return self.loc + radius.unsqueeze(-1) * direction


class PaperNormPrior:
    """The published code's penalty τ_p·‖θ_d − Θ‖₂ as a prior, on the whole adapter of each task:

        Θ ~ flat                          (Normal(0, global_scale) when given), at ``global.lora`` [P]
        δ_d = θ_d − Θ ~ RadialLaplace(0, τ_p), independently for every task, at
                                          ``task.lora_offset`` [K, P] in the tasks plate
        θ_d = Θ + δ_d.

    P is every module's factors packed in one vector (:class:`~bora_pyro.packing.FactorLayout`):
    the norm couples all of them, so unlike :class:`~bora_pyro.models.priors.HierarchicalNormal`
    there is no per-module layout. The offsets start at 0 in every guide, where the norm's
    gradient is taken as 0, so the fit starts at the base model like LoRA.

    Not Gaussian: a task's offset is pulled to Θ with the same force τ_p whatever its distance,
    and a task whose likelihood gradient at Θ is below τ_p·L̄_d (with the paper's weights) sits
    exactly at Θ. :func:`equivalent_tau` gives the Gaussian τ that matches a fit, task by task.
    Fit it by MAP (:func:`~bora_pyro.guides.map_guide`), with the likelihood weighted as the
    code did (``BoRA(..., task_weights=paper_task_weights(corpus))``).

    Args:
        tau_p: the penalty's weight τ_p > 0 (the published code's "τ").
        global_scale: prior scale of Θ; ``None`` (the default) is flat, as in the published code.
    """

    def __init__(self, tau_p: float, global_scale: float | None = None):
        check_scale("tau_p", tau_p, allow_none=False)
        check_scale("global_scale", global_scale)
        self.tau_p, self.global_scale = float(tau_p), global_scale

    def __call__(self, modules: Sequence[AdaptedModule], tasks: pyro.plate) -> Factors:
        layout = factor_layout(tuple(modules))
        glob = pyro.sample(f"global.{PACKED}", weak_or_flat((layout.size,), self.global_scale, tasks.device))
        with tasks:
            offset = pyro.sample(f"task.{PACKED}_offset", RadialLaplace(torch.zeros_like(glob), self.tau_p))
        return layout.unpack(glob + offset)

    def __repr__(self) -> str:
        return f"PaperNormPrior(tau_p={self.tau_p:g}, global_scale={self.global_scale})"


def paper_task_weights(corpus: MultiTaskCorpus) -> torch.Tensor:
    """[D] float32: 1 / L̄_d, L̄_d = task d's mean number of predicted tokens per training document.

    A document of n tokens predicts n − 1: ``MultiTaskLM.sequence_log_prob`` scores positions
    1..n−1. Weighting each document's log-likelihood by 1 / L̄_d turns the
    summed log-likelihood of task d into N_d times its mean per token, the published code's loss.
    A task with no training document gets 1: no training term uses it.
    """
    train = corpus.train
    predicted = torch.tensor([len(document) - 1 for document in train.documents], dtype=torch.float64)
    task_ids = torch.tensor(train.task_ids, dtype=torch.long)
    tokens = torch.zeros(corpus.num_tasks, dtype=torch.float64).index_add_(0, task_ids, predicted)
    docs = torch.zeros(corpus.num_tasks, dtype=torch.float64).index_add_(0, task_ids, torch.ones_like(predicted))
    return torch.where(docs > 0, docs / tokens, 1.0).float()


def equivalent_tau(tau_p: float, mean_tokens_per_doc: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """[D]: the Gaussian precision τ_d = τ_p·L̄_d / ‖θ_d − Θ‖ that a fit under :class:`PaperNormPrior`
    (with :func:`paper_task_weights`) acts like, task by task.

    For task d with Θ fixed, the MAP of the published objective and of the paper's model,

        Σ_n log p(doc_n | Θ + δ_d) / L̄_d − τ_p ‖δ_d‖     and     Σ_n log p(doc_n | Θ + δ_d) − τ ‖δ_d‖² / 2,

    (sums over the task's documents) are stationary where, with g_d = ∇_δ Σ_n log p(doc_n) and the
    first multiplied by L̄_d,

        g_d = τ_p L̄_d · δ_d / ‖δ_d‖     and     g_d = τ · δ_d.

    The same δ_d ≠ 0 solves both when τ = τ_p L̄_d / ‖δ_d‖. It is a reading of a fitted point, not
    a reparametrisation: it differs between tasks and with the fit (tasks far from Θ are shrunk
    as if by a smaller τ), and a task exactly at Θ (‖δ_d‖ = 0, which the norm allows) reads as
    τ = ∞. Θ's own condition differs too: with Θ flat, the gradient in Θ is the sum of the tasks'
    likelihood gradients, so Σ_d δ_d/‖δ_d‖ = 0 (Θ is the geometric median of the θ_d) under the
    published objective, Σ_d δ_d = 0 (their mean) under one Gaussian τ.

    Args:
        tau_p: the penalty's weight.
        mean_tokens_per_doc: [D] L̄_d, e.g. ``1 / paper_task_weights(corpus)``.
        distances: [D] ‖θ_d − Θ‖, e.g. ``values["task.lora_offset"].norm(dim=-1)`` of a fitted
            guide's ``median()``.
    """
    return tau_p * mean_tokens_per_doc / distances

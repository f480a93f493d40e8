"""BoRA models and priors (``bora_pyro.models``): the place to read, change or add a prior.

- :class:`BoRA`: the Pyro model — a prior over LoRA factors and a frozen LM's likelihood.
- Priors: :class:`HierarchicalNormal` (the paper's; τ fixed or learned, one or per group, centred
  or not), :class:`HierarchicalStudentT` (heavy-tailed tasks), :class:`Independent` (τ → 0),
  :class:`Joint` (τ → ∞), :func:`prior_from_tau`; :class:`Precision` is the τ part on its own.
  The prior contract, for writing your own, is in :mod:`.priors`.
- The published code's objective (:mod:`.paper_prior`): :class:`PaperNormPrior` (its norm
  penalty τ_p·‖θ_d − Θ‖ as a prior, :class:`RadialLaplace`), :func:`paper_task_weights` (its
  per-task mean-NLL weighting, for ``BoRA(..., task_weights=...)``), :func:`equivalent_tau`.
"""

from .bora import BoRA
from .paper_prior import PaperNormPrior, RadialLaplace, equivalent_tau, paper_task_weights
from .priors import (
    HierarchicalNormal,
    HierarchicalStudentT,
    Independent,
    Joint,
    Precision,
    hyperparameter_sites,
    parse_hyperprior,
    prior_from_tau,
    shared_sites,
    site_name,
)

__all__ = [
    "BoRA", "HierarchicalNormal", "HierarchicalStudentT", "Independent", "Joint", "PaperNormPrior", "Precision",
    "RadialLaplace", "equivalent_tau", "hyperparameter_sites", "paper_task_weights", "parse_hyperprior",
    "prior_from_tau", "shared_sites", "site_name",
]

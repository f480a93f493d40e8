"""BoRA models and priors (``bora_pyro.models``): the place to read, change or add a prior.

- :class:`BoRA`: the Pyro model — a prior over LoRA factors and a frozen LM's likelihood.
- Priors: :class:`HierarchicalNormal` (the paper's; τ fixed or learned, one or per group, centred
  or not), :class:`HierarchicalStudentT` (heavy-tailed tasks), :class:`Independent` (τ → 0),
  :class:`Joint` (τ → ∞), :func:`prior_from_tau`; :class:`Precision` is the τ part on its own.
  The prior contract, for writing your own, is in :mod:`.priors`.
"""

from .bora import BoRA
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
    "BoRA", "HierarchicalNormal", "HierarchicalStudentT", "Independent", "Joint", "Precision",
    "hyperparameter_sites", "parse_hyperprior", "prior_from_tau", "shared_sites", "site_name",
]

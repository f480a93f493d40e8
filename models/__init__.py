"""BoRA models and priors (``bora_pyro.models``): the place to read, change or add a prior.

- :class:`BoRA`: the Pyro model — a prior over LoRA factors and a frozen LM's likelihood.
- Priors: :class:`HierarchicalNormal` (the paper's), :class:`Independent` (τ → 0),
  :class:`Joint` (τ → ∞), :func:`prior_from_tau`; the prior contract is in :mod:`.priors`.
"""

from .bora import BoRA
from .priors import HierarchicalNormal, Independent, Joint, prior_from_tau, site_name

__all__ = ["BoRA", "HierarchicalNormal", "Independent", "Joint", "prior_from_tau", "site_name"]

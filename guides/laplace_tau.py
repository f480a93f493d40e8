"""The posterior of a learned τ by a Laplace step: p(τ | y) ∝ p(τ) · p(y | τ) on a grid of log τ.

A mean-field guide's q(τ) is not τ's posterior: it sits where the ELBO's bias puts it, narrower
than the exact posterior, and does not follow the data (``benchmarks/sbc.py``). The evidence
p(y | τ) does follow them, and with a quadratic likelihood in each task's factors it has a closed
form. So, around one point θ̂ (a mode of p(θ | y, τ): :func:`fit_tau_posterior` fits MAP at
the fitted guide's τ first) and for each task d and factor X (a
module's ``lora_A`` or ``lora_B``), with θ_d ∈ R^{J×r} its entries (``lora_B`` [out, r] as it is,
``lora_A`` [r, in] transposed to [in, r]):

    log p(y_d | θ_d) ≈ const + g_dᵀ(θ_d − θ̂_d) − ½ (θ_d − θ̂_d)ᵀ Λ_d (θ_d − θ̂_d)
    Λ_d = S ⊗ C_d          (Kronecker-factored Fisher, as K-FAC: S [J, J] shared, C_d [r, r])

    lora_B:  S = E_t[δ̂_t δ̂_tᵀ]  (δ̂_t: the gradient at the layer's output at token t of the log-
             likelihood of labels drawn from the model itself, so E[δ̂δ̂ᵀ] is the Fisher),
             C_d = s² Σ_{t ∈ d} a_t a_tᵀ,  a_t = A_d x_t,  s = alpha / r
    lora_A:  S = E_t[x_t x_tᵀ],  C_d = s² n_d B_dᵀ E_t[δ̂_t δ̂_tᵀ] B_d   (n_d: task d's tokens)

with g_d the exact gradient of task d's log-likelihood at θ̂_d. Under the prior
θ_d ~ Normal(Θ, τ^{-1} I), Θ ~ Normal(0, σ_g² I) the factors then integrate out exactly: rotated
by S's eigenvectors (the prior is isotropic), each eigen-direction j (eigenvalue λ_j) is an
independent r-dimensional problem, and with M_dj = λ_j C_d + τ I and b_dj = g_dj + λ_j C_d θ̂_dj,

    log p(y | τ) = Σ_j [ Σ_d (½ b_djᵀ M_dj⁻¹ b_dj + ½ r log τ − ½ log det M_dj)
                         − ½ r log σ_g² − ½ log det P_j + ½ h_jᵀ P_j⁻¹ h_j ] + const,
    P_j = I/σ_g² + Σ_d (τ I − τ² M_dj⁻¹),   h_j = Σ_d τ M_dj⁻¹ b_dj

(a flat Θ, ``global_scale=None``: without the σ_g terms). Factors of different groups are
independent given the quadratic likelihood, so each τ group has its own evidence; p(u | y) for
u = log τ is then normalised on the grid, linear in log density between its points
(:class:`GridLogTau`).

Cost: the MAP fit, one pass over the training documents (a forward and two backward passes per
batch), then O(D·J·r²) per grid point and factor: linear in the tasks. On the SBC model it passes simulation-
based calibration where every guide's own q(τ) fails (``benchmarks/sbc.py``).

Assumed, besides the Laplace approximation itself: the Kronecker factorisation (exact for the
Fisher of one token; across tokens it pairs E[a aᵀ] with E[δ̂δ̂ᵀ] as K-FAC does), Fisher for
Hessian, no curvature between ``lora_A`` and ``lora_B`` (LoRA's rescaling A → cA, B → B/c is a
direction the likelihood cannot see; the prior alone holds it), and for ``lora_A`` one input
covariance shared by every task.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from bora_pyro.adapted_lm import MultiTaskLM
from bora_pyro.data import Batch
from bora_pyro.errors import ConfigError
from bora_pyro.models.bora import Factors
from bora_pyro.models.priors import FACTORS, HierarchicalNormal, tau_site
from bora_pyro.task_store import guide_task_store

#: Points of the grid of log τ, and the hyperprior's tail mass left outside it at either end.
GRID_POINTS, TAIL = 161, 1e-7
#: A grid is widened where the posterior holds more than this within one grid interval of its end …
EDGE_MASS = 1e-4
#: … at most this many times.
MAX_WIDENINGS = 10
#: The final grid spans where the log density is within this of its maximum (e^-25: nothing left out).
SPAN = 25.0


@dataclass
class FactorCurvature:
    """The quadratic likelihood of one factor of one module for all D tasks, in the [J, r] layout.

    Attributes:
        shared: S [J, J], float64.
        task: C_d [D, r, r], float64.
        point: θ̂_d [D, J, r], float64: where the likelihood was expanded.
        gradient: g_d [D, J, r], float64: ∇ log p(y_d | θ_d) at θ̂_d.
    """

    shared: torch.Tensor
    task: torch.Tensor
    point: torch.Tensor
    gradient: torch.Tensor


def kronecker_curvature(lm: MultiTaskLM, factors: Factors, batches: Iterable[Batch], num_tasks: int,
                        task_weights: torch.Tensor | None = None, generator: torch.Generator | None = None
                        ) -> dict[tuple[str, str], FactorCurvature]:
    """One pass over ``batches`` (every training document once) at the task factors ``factors``
    ({module: (A [D, r, in], B [D, out, r])}): each (module, factor)'s :class:`FactorCurvature`.

    ``task_weights`` [D] scale task d's likelihood (the model's ``task_weights``); ``generator``
    draws the labels whose gradients estimate the Fisher.
    """
    device = lm.device
    sums = {name: {"output": torch.zeros(layer.out_features, layer.out_features, dtype=torch.float64, device=device),
                   "input": torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=device),
                   "task": torch.zeros(num_tasks, layer.rank, layer.rank, dtype=torch.float64, device=device),
                   "gradient_A": torch.zeros_like(factors[name][0], dtype=torch.float64),
                   "gradient_B": torch.zeros_like(factors[name][1], dtype=torch.float64)}
            for name, layer in lm.layers.items()}
    task_tokens = torch.zeros(num_tasks, dtype=torch.float64, device=device)  # n_d, weighted
    weights = torch.ones(num_tasks, device=device) if task_weights is None else task_weights.to(device)
    total_tokens = 0
    for batch in batches:
        with torch.enable_grad():  # also when called under no_grad, as after a fit
            total_tokens += _add_batch(lm, factors, batch.to(device), weights, generator, sums, task_tokens)
    if total_tokens == 0:
        raise ConfigError("the Laplace step on τ needs training documents; the batches held no tokens")
    curvature = {}
    for name, layer in lm.layers.items():
        stats, (A, B) = sums[name], factors[name]
        output, scale2 = stats["output"] / total_tokens, layer.scaling ** 2
        B64 = B.detach().double()
        curvature[name, "lora_B"] = FactorCurvature(output, scale2 * stats["task"], B64, stats["gradient_B"])
        task_A = scale2 * task_tokens[:, None, None] * (B64.transpose(1, 2) @ output @ B64)  # n_d s² B_dᵀ S B_d
        curvature[name, "lora_A"] = FactorCurvature(stats["input"] / total_tokens, task_A,
                                                    A.detach().double().transpose(1, 2), stats["gradient_A"].transpose(1, 2))
    return curvature


def _add_batch(lm: MultiTaskLM, factors: Factors, batch: Batch, weights: torch.Tensor, generator: torch.Generator | None,
              sums: dict[str, dict[str, torch.Tensor]], task_tokens: torch.Tensor) -> int:
    """Add one batch's terms to ``sums`` and ``task_tokens`` [D] (see :func:`kronecker_curvature`;
    ``weights`` [D] the tasks' likelihood weights); returns its tokens."""
    tasks, row_tasks = torch.unique(batch.task_ids, return_inverse=True)
    leaves = {name: (A.index_select(0, tasks).detach().requires_grad_(True),
                     B.index_select(0, tasks).detach().requires_grad_(True)) for name, (A, B) in factors.items()}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module → (its input, its output)
    hooks = [layer.register_forward_hook(lambda module, args, output, name=name: seen.__setitem__(name, (args[0], output)))
             for name, layer in lm.layers.items()]
    try:
        with lm.adapters(leaves, row_tasks):
            logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1)  # position i predicts token i+1
    predicted = batch.attention_mask[:, 1:].to(log_probs.dtype)
    drawn = torch.multinomial(log_probs.detach().exp().flatten(0, 1), 1, generator=generator).view(predicted.shape)
    drawn_log_likelihood = (log_probs.gather(-1, drawn[..., None]).squeeze(-1) * predicted).sum()
    row_weights = weights.index_select(0, batch.task_ids)[:, None]
    log_likelihood = (log_probs.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1) * predicted * row_weights).sum()
    names = list(seen)
    output_grads = torch.autograd.grad(drawn_log_likelihood, [seen[name][1] for name in names], retain_graph=True)
    factor_grads = torch.autograd.grad(log_likelihood, [leaf for name in names for leaf in leaves[name]])
    tokens = batch.attention_mask.reshape(-1).bool()  # [N·L]: OPT flattens its MLP input, so go by row-major order
    token_rows = torch.arange(len(batch.task_ids), device=tokens.device).repeat_interleave(batch.input_ids.shape[1])[tokens]
    token_tasks = row_tasks[token_rows]  # each token's position among the batch's tasks
    token_weights = weights.index_select(0, batch.task_ids[token_rows]).double()
    for index, name in enumerate(names):
        layer, stats = lm.layers[name], sums[name]
        # a batch's moments in float32 (4x faster here), summed over batches in float64
        inputs = seen[name][0].reshape(-1, layer.in_features)[tokens].detach().float()  # x_t [T, in]
        deltas = output_grads[index].reshape(-1, layer.out_features)[tokens].float()  # δ̂_t [T, out]
        stats["output"] += (deltas.T @ deltas).double()
        stats["input"] += (inputs.T @ inputs).double()
        A = leaves[name][0].detach().float()  # [K, r, in]: every batch task's, then each token's own (no [T, r, in] copy)
        down = (inputs @ A.flatten(0, 1).T).view(len(inputs), *A.shape[:2])[torch.arange(len(inputs), device=inputs.device), token_tasks].double()
        stats["task"].index_add_(0, tasks[token_tasks], down[:, :, None] * down[:, None, :] * token_weights[:, None, None])
        stats["gradient_A"].index_add_(0, tasks, factor_grads[2 * index].double())
        stats["gradient_B"].index_add_(0, tasks, factor_grads[2 * index + 1].double())
    task_tokens.index_add_(0, batch.task_ids[token_rows], token_weights)
    return int(tokens.sum())


@dataclass
class Spectrum:
    """A :class:`FactorCurvature` in the eigenbases the evidence is computed in, computed once for
    every grid point: S's eigenvalues λ_j [J] and each C_d's c_dk [D, r] and vectors V_d [D, r, r];
    b̃_djk = (V_dᵀ b_dj)_k [D, J, r] with b_dj = g_dj + λ_j C_d θ̂_dj, both rotated by S's vectors."""

    eigenvalues: torch.Tensor
    task_values: torch.Tensor
    task_directions: torch.Tensor
    linear: torch.Tensor

    @classmethod
    def of(cls, curvature: FactorCurvature) -> Spectrum:
        eigenvalues, directions = torch.linalg.eigh(curvature.shared)
        eigenvalues = eigenvalues.clamp(min=0)  # a Fisher is PSD, rounding may not be
        task_values, task_directions = torch.linalg.eigh(curvature.task)
        task_values = task_values.clamp(min=0)

        def rotate(values: torch.Tensor) -> torch.Tensor:  # [D, J, r] into S's (over J) and V_d's (over r) bases
            return torch.einsum("ij,dir,drk->djk", directions, values, task_directions)

        curve = eigenvalues[None, :, None] * task_values[:, None, :]  # λ_j c_dk
        return cls(eigenvalues, task_values, task_directions, rotate(curvature.gradient) + curve * rotate(curvature.point))

    def log_evidence(self, log_tau_grid: torch.Tensor, global_scale: float | None) -> torch.Tensor:
        """log p(y | τ = e^u) (module docstring), up to a constant in τ, at every u of
        ``log_tau_grid`` [G]: [G] float64. With a flat Θ (``global_scale=None``), directions j no
        token moves (λ_j = 0) are left out: there Θ_j has neither prior nor data, and its integral,
        infinite, does not depend on τ."""
        eigenvalues, linear = self.eigenvalues, self.linear
        if global_scale is None:
            seen = eigenvalues > 1e-12 * float(eigenvalues.max())
            eigenvalues, linear = eigenvalues[seen], linear[:, seen]
        num_tasks, size, rank = linear.shape
        precision_curve = eigenvalues[None, :, None] * self.task_values[:, None, :]  # λ_j c_dk: [D, J, r]
        # sums over d and V_d's index k as matmuls over n = (d, k): V_d's column k as a row [n, r]
        columns = self.task_directions.transpose(1, 2).reshape(num_tasks * rank, rank)
        outer = (columns[:, :, None] * columns[:, None, :]).reshape(num_tasks * rank, rank * rank)  # [n, r²]

        def by_pair(values: torch.Tensor) -> torch.Tensor:  # [D, J, r] → [n, J]
            return values.transpose(1, 2).reshape(num_tasks * rank, size)

        prior_precision = 0.0 if global_scale is None else global_scale ** -2
        eye = torch.eye(rank, dtype=torch.float64, device=linear.device)
        values = []
        for u in log_tau_grid.tolist():
            tau = math.exp(u)
            curve = precision_curve + tau  # eigenvalues of M_dj
            tasks_part = 0.5 * (linear ** 2 / curve).sum() + 0.5 * rank * size * num_tasks * u - 0.5 * curve.log().sum()
            shrink = tau * precision_curve / curve  # eigenvalues of τI − τ² M⁻¹, without its cancellation
            precision = prior_precision * eye + (by_pair(shrink).T @ outer).view(size, rank, rank)  # P_j [J, r, r]
            pull = by_pair(tau * linear / curve).T @ columns  # h_j = Σ_d V_d (τ b̃_dj / (λ_j c_d + τ)): [J, r]
            cholesky = torch.linalg.cholesky(precision)
            solved = torch.cholesky_solve(pull[..., None], cholesky)[..., 0]
            global_part = 0.5 * (pull * solved).sum() - torch.log(torch.diagonal(cholesky, dim1=-2, dim2=-1)).sum()
            if global_scale is not None:
                global_part = global_part - rank * size * math.log(global_scale)
            values.append(tasks_part + global_part)
        return torch.stack(values) if values else log_tau_grid.new_zeros(0)


def log_evidence(curvature: FactorCurvature, log_tau_grid: torch.Tensor, global_scale: float | None) -> torch.Tensor:
    """log p(y | τ = e^u) of one factor's quadratic likelihood (module docstring), up to a constant
    in τ, at every u of ``log_tau_grid`` [G]: [G] float64 (:meth:`Spectrum.log_evidence`)."""
    return Spectrum.of(curvature).log_evidence(log_tau_grid, global_scale)


class GridLogTau(dist.TorchDistribution):
    """A distribution of τ > 0 whose density of u = log τ is given on an even grid and linear in
    log density between its points (zero outside): a Laplace step's p(τ | y).

    Args:
        log_tau_grid: [G] increasing, evenly spaced values of u.
        log_density: [G] the log density of u there, up to a constant.
    """

    arg_constraints: dict = {}
    support = constraints.positive
    RESOLUTION = 8  #: the inverse CDF's fine points per grid interval

    def __init__(self, log_tau_grid: torch.Tensor, log_density: torch.Tensor, validate_args=None):
        if not bool(torch.isfinite(log_density.max())):
            raise ConfigError(f"the posterior of τ is not finite on its grid (max log density {float(log_density.max())}): "
                              "the fit or its curvature holds nan or inf; fit again with a lower --lr")
        self.log_tau_grid, self.log_density = log_tau_grid.double(), log_density.double() - log_density.max()
        fine = torch.linspace(float(self.log_tau_grid[0]), float(self.log_tau_grid[-1]),
                              (len(log_tau_grid) - 1) * self.RESOLUTION + 1, dtype=torch.float64, device=log_tau_grid.device)
        mass = self.log_density_of(fine).exp()
        cdf = torch.cat([mass.new_zeros(1), ((mass[1:] + mass[:-1]) / 2 * (fine[1] - fine[0])).cumsum(0)])
        self.log_normaliser = float(cdf[-1].log())
        self.fine, self.cdf = fine, cdf / cdf[-1]
        super().__init__(torch.Size(), validate_args=validate_args)

    def log_density_of(self, u: torch.Tensor) -> torch.Tensor:
        """The unnormalised log density of u = log τ, interpolated on the grid; −inf outside it."""
        grid = self.log_tau_grid
        position = ((u - grid[0]) / (grid[1] - grid[0])).clamp(0, len(grid) - 1)
        left = position.floor().long().clamp(max=len(grid) - 2)
        weight = position - left
        inside = (u >= grid[0]) & (u <= grid[-1])
        value = self.log_density[left] * (1 - weight) + self.log_density[left + 1] * weight
        return torch.where(inside, value, torch.full_like(value, -math.inf))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        log_tau = value.double().log()
        return (self.log_density_of(log_tau) - self.log_normaliser - log_tau).to(value.dtype)

    def icdf(self, probability: torch.Tensor) -> torch.Tensor:
        """τ at ``probability`` (inverse CDF, linear between the fine grid's points)."""
        probability = torch.as_tensor(probability, dtype=torch.float64, device=self.fine.device)
        upper = torch.searchsorted(self.cdf, probability.clamp(0, 1).reshape(-1)).clamp(1, len(self.fine) - 1)
        low, high = self.cdf[upper - 1], self.cdf[upper]
        weight = ((probability.reshape(-1) - low) / (high - low).clamp(min=1e-300)).clamp(0, 1)
        u = self.fine[upper - 1] + weight * (self.fine[upper] - self.fine[upper - 1])
        return u.exp().view(probability.shape).float()

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.icdf(torch.rand(sample_shape, dtype=torch.float64, device=self.fine.device))

    def edge_masses(self) -> tuple[float, float]:
        """The mass within one grid interval of the lower and of the upper end: large when the grid is too short."""
        return float(self.cdf[self.RESOLUTION]), float(1 - self.cdf[-1 - self.RESOLUTION])


def hyperprior_grid(hyperprior: torch.distributions.Distribution, points: int = GRID_POINTS,
                    tail: float = TAIL) -> torch.Tensor:
    """An even grid of log τ [points] from the hyperprior's ``tail`` to its 1 − ``tail`` quantile
    (by its icdf, or 20,000 draws widened by a tenth of their range when it has none)."""
    try:
        low, high = hyperprior.icdf(torch.tensor([tail, 1 - tail], dtype=torch.float64)).log().tolist()
    except NotImplementedError:
        draws = hyperprior.sample((20_000,)).double().log()
        spread = float(draws.max() - draws.min())
        low, high = float(draws.min()) - spread / 10, float(draws.max()) + spread / 10
    return torch.linspace(low, high, points, dtype=torch.float64)


def tau_groups(prior: HierarchicalNormal, lm: MultiTaskLM, factors: Sequence[str] = FACTORS
               ) -> dict[str, tuple[torch.distributions.Distribution, list[tuple[str, str]]]]:
    """τ site → (its hyperprior, the (module, factor) pairs it governs), for the latent τ groups of
    ``prior``; :class:`ConfigError` for a prior whose task factors are not Normal around Θ."""
    if type(prior) is not HierarchicalNormal:
        raise ConfigError(f"the Laplace step on τ needs the Normal hierarchical prior (HierarchicalNormal), not {prior!r}: "
                          "its closed-form evidence integrates Normal task factors; keep the guide's q(τ) instead")
    pairs = [(module, factor) for module in lm.modules_spec for factor in factors]
    group_names = [prior.precision.group(module, factor) for module, factor in pairs]
    groups: dict[str, tuple[torch.distributions.Distribution, list[tuple[str, str]]]] = {}
    for (module, factor), group in zip(pairs, group_names):
        value = prior.precision.value(group, group_names)
        if isinstance(value, torch.distributions.Distribution):
            groups.setdefault(tau_site(group), (value, []))[1].append((module.name, factor))
    return groups


def laplace_tau(curvature: Mapping[tuple[str, str], FactorCurvature],
                groups: Mapping[str, tuple[torch.distributions.Distribution, Sequence[tuple[str, str]]]],
                global_scale: float | None, points: int = GRID_POINTS) -> dict[str, GridLogTau]:
    """Each τ site's posterior: hyperprior × the evidence of its factors, on a grid over the
    hyperprior's range (:func:`hyperprior_grid`), widened by half that range at an end that holds
    more than ``EDGE_MASS`` of the posterior (the data can favour a τ the hyperprior thinks
    unlikely), then laid anew over where the posterior is (:func:`posterior_grid`): data from many
    documents make it far narrower than the hyperprior, and the density is linear between points.

    Raises:
        ConfigError: the posterior still reaches an end after ``MAX_WIDENINGS`` widenings (the
            evidence keeps growing towards τ → 0 or ∞: the hyperprior must decide, and cannot).
    """
    posteriors = {}
    for site, (hyperprior, pairs) in groups.items():
        spectra = [Spectrum.of(curvature[pair]) for pair in pairs]

        def log_density(grid: torch.Tensor, hyperprior=hyperprior, spectra=spectra) -> torch.Tensor:  # of u = log τ
            evidence = sum(spectrum.log_evidence(grid, global_scale) for spectrum in spectra)
            return evidence + hyperprior.log_prob(grid.exp().to(torch.get_default_dtype())).double() + grid

        grid = hyperprior_grid(hyperprior, points)
        density = log_density(grid)
        step, half = float(grid[1] - grid[0]), (points - 1) // 2
        for widenings in range(MAX_WIDENINGS + 1):
            low, high = GridLogTau(grid, density).edge_masses()
            if max(low, high) <= EDGE_MASS:
                break
            if widenings == MAX_WIDENINGS:
                raise ConfigError(f"the posterior of {site} still reaches the end of τ ∈ [{math.exp(grid[0]):.3g}, "
                                  f"{math.exp(grid[-1]):.3g}] after widening the hyperprior's range {MAX_WIDENINGS} times: "
                                  "the data keep favouring τ → 0 or ∞ and the hyperprior does not stop them; give a "
                                  "narrower one (--tau-prior)")
            below = grid[0] - step * torch.arange(half, 0, -1, dtype=torch.float64) if low > EDGE_MASS else grid[:0]
            above = grid[-1] + step * torch.arange(1, half + 1, dtype=torch.float64) if high > EDGE_MASS else grid[:0]
            grid, density = torch.cat([below, grid, above]), torch.cat([log_density(below), density, log_density(above)])
        fine = posterior_grid(grid, density, points)
        posteriors[site] = GridLogTau(fine, log_density(fine))
    return posteriors


def posterior_grid(grid: torch.Tensor, log_density: torch.Tensor, points: int) -> torch.Tensor:
    """An even grid of ``points`` over where ``log_density`` (on ``grid``) is within ``SPAN`` nats
    of its maximum, one coarse interval wider at either end (within ``grid``)."""
    inside = (log_density >= log_density.max() - SPAN).nonzero().flatten()
    first, last = max(int(inside[0]) - 1, 0), min(int(inside[-1]) + 1, len(grid) - 1)
    return torch.linspace(float(grid[first]), float(grid[last]), points, dtype=torch.float64)


def fixed_tau_prior(prior: HierarchicalNormal, taus: Mapping[str, float]) -> HierarchicalNormal:
    """``prior`` with its latent τ sites fixed at ``taus`` (site → value), on offsets: the prior of
    the MAP fit the Laplace step expands at."""
    if prior.precision.per == "all":
        return HierarchicalNormal(taus["tau"], prior.global_scale, False, packed=prior.packed)
    fixed = {site.removeprefix("tau."): value for site, value in taus.items()}
    given = dict(prior.precision.tau) if isinstance(prior.precision.tau, dict) else {}  # {}: every group latent
    return HierarchicalNormal(given | fixed, prior.global_scale, False, prior.precision.per, prior.packed)


def fit_tau_posterior(model, guide, corpus, seed: int = 0, **fit_settings) -> tuple[dict[str, GridLogTau], dict]:
    """The Laplace step after a fit: each latent τ site's posterior (:func:`laplace_tau`) for the
    :class:`~bora_pyro.models.BoRA` ``model`` fitted by ``guide`` on ``corpus``, and what it did.

    Laplace's method expands at a mode of p(θ | y, τ), and a fitted guide's median need not be one:
    a fit that validation patience stops early sits where the likelihood's gradient is still large,
    and a quadratic extrapolates that gradient far (the decentred mean-field fit of the Shakespeare
    speakers stops at step 40; the step at its median put τ at 7, at the MAP mode below at 2.8e3).
    So the step first fits MAP (:func:`~bora_pyro.guides.map_guide`) at τ fixed at the guide's
    median (``fixed_tau_prior``; ``fit_settings`` go to :func:`~bora_pyro.fit.fit`: the fit's
    own), then makes one pass over the training documents at that mode. {} without a latent τ.

    Raises:
        ConfigError: a prior other than :class:`HierarchicalNormal`, a guide whose tasks a task store
            holds (the step keeps every task's factors and gradients in memory), or a posterior that
            reaches its hyperprior's ends.
    """
    from bora_pyro.fit import fit  # here: bora_pyro.fit imports this module (through diagnostics)
    from bora_pyro.guides import map_guide
    from bora_pyro.models import BoRA

    groups = tau_groups(model.prior, model.lm)
    if not groups:
        return {}, {}
    if guide_task_store(guide) is not None:
        raise ConfigError("the Laplace step on τ holds every task's factors in memory, which a task store is there to "
                          "avoid: keep the guide's own q(τ) (--tau-posterior guide) with --task-store")
    with torch.no_grad():
        taus = {site: float(value) for site, value in guide.median().items() if site in groups}
    twin = BoRA(model.lm, fixed_tau_prior(model.prior, taus), model.num_tasks, model.task_weights)
    mode = map_guide(twin, seed=seed)
    result = fit(twin, mode, corpus, seed=seed, progress=False, **fit_settings)
    with torch.no_grad():
        factors = twin.task_factors(mode.median())
    generator = torch.Generator(device=model.lm.device).manual_seed(seed)
    batches = corpus.train.batches(fit_settings.get("batch_size", 8), corpus.pad_token_id)
    curvature = kronecker_curvature(model.lm, factors, batches, model.num_tasks, model.task_weights, generator)
    return laplace_tau(curvature, groups, model.prior.global_scale), {
        "method": "laplace", "expanded_at": {"tau": taus, "map_steps": result.steps, "map_best_step": result.best_step,
                                             "map_stopped_by": result.stopped_by}}


def tau_posterior_to_json(posteriors: Mapping[str, GridLogTau]) -> dict:
    """``{site: {"log_tau_grid": [...], "log_density": [...]}}``, what :func:`tau_posterior_from_json` reads."""
    return {site: {"log_tau_grid": posterior.log_tau_grid.tolist(), "log_density": posterior.log_density.tolist()}
            for site, posterior in posteriors.items()}


def tau_posterior_from_json(values: Mapping[str, Mapping[str, list[float]]]) -> dict[str, GridLogTau]:
    """The posteriors of :func:`tau_posterior_to_json`'s output."""
    return {site: GridLogTau(torch.tensor(value["log_tau_grid"], dtype=torch.float64),
                             torch.tensor(value["log_density"], dtype=torch.float64)) for site, value in values.items()}


def with_tau(values: Mapping[str, torch.Tensor], tau_posterior: Mapping[str, GridLogTau] | None,
             draw: bool) -> dict[str, torch.Tensor]:
    """``values`` (site → value, e.g. a guide's draw or median) with each τ site of ``tau_posterior``
    replaced by a draw from it (``draw``) or by its median."""
    values = dict(values)
    for site, posterior in (tau_posterior or {}).items():
        values[site] = (posterior.sample() if draw else posterior.icdf(torch.tensor(0.5))).to(values[site])
    return values

"""The posterior of τ on the SBC model by nested Laplace approximation, as an exact reference.

For the model of ``sbc.py`` (per replication: τ ~ LogNormal, Θ ~ Normal(0, g²) [P],
θ_d ~ Normal(Θ, τ^{-1}) [P] for d = 1..D, documents from the LM with adapter B_d = θ_d), the
latent factors x = (Θ, θ_1, …, θ_D) [n = (D + 1)·P] given τ have a log-concave-looking posterior
informed by hundreds of tokens per task. On a grid of u = log τ (Rue, Martino & Chopin 2009):

    x̂(u)  = argmax_x log p(y, x | τ)                  Newton on the exact gradient and Hessian
    log p(y | τ) ≈ log p(y, x̂ | τ) + (n/2) log 2π − ½ log det J(u),   J = −∇²_x log p(y, x̂ | τ)
    p(u | y) ∝ p(u) · p(y | τ = e^u)                    normalised on the grid, linear in between

J is dense within a task (the LM's Hessian in θ_d, by autograd) plus the prior's precision, which
couples Θ to every θ_d. Only the Gaussian approximation of p(x | y, τ) is assumed; where NUTS was
run (replications 0–3 of ``sbc.py``) the medians agree within 7 % and the 90 % intervals' ends
within 11 %.
On ``sbc.py``'s grid (the hyperprior's loc ± 5 sd, 41 points) the 3 outermost points at either end
held < 1e-5 of the posterior on replications 0–5. Cost: P backward passes of the cached LM per
Newton step (2–6 steps per grid point); all replications of a chunk at once (their tasks are
independent blocks), 20–35 s for 4 replications on one core.
"""

from __future__ import annotations

import math

import torch


def prior_precision(tau: float, tasks: int, size: int, global_scale: float) -> torch.Tensor:
    """−∇² of log p(Θ) + Σ_d log p(θ_d | Θ, τ) in x = (Θ, θ_1, …, θ_D): [n, n], float64."""
    eye = torch.eye(size, dtype=torch.float64)
    precision = torch.kron(torch.eye(tasks + 1, dtype=torch.float64), tau * eye)
    precision[:size, :size] = eye / global_scale**2 + tasks * tau * eye
    for d in range(1, tasks + 1):
        block = slice(d * size, (d + 1) * size)
        precision[:size, block] = precision[block, :size] = -tau * eye
    return precision


def likelihood_terms(log_likelihood, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each task's log-likelihood [K], its gradient [K, P] and Hessian [K, P, P] (float64) at
    ``theta`` [K, P]; ``log_likelihood`` maps [K, P] → [K] with task k depending on row k only."""
    theta = theta.detach().float().requires_grad_(True)
    values = log_likelihood(theta)
    gradient, = torch.autograd.grad(values.sum(), theta, create_graph=True)
    hessian = torch.stack([torch.autograd.grad(gradient[:, j].sum(), theta, retain_graph=True)[0]
                           for j in range(theta.shape[1])], 1)  # row j of every task's Hessian
    return values.detach().double(), gradient.detach().double(), hessian.double()


def laplace_log_evidence(log_likelihood, replications: int, tasks: int, size: int, global_scale: float,
                         log_tau_grid: torch.Tensor, max_newton: int = 30,
                         tolerance: float = 1e-4) -> tuple[torch.Tensor, dict]:
    """log p(y_r | τ = e^u) by Laplace's method for every replication r and grid point u: [R, G],
    and the Newton runs' record (``newton_steps`` per grid point, ``unconverged``: the (r, u) whose
    run hit ``max_newton``, ``not_a_maximum``: those whose J was not positive definite there,
    ``modes``: x̂(u) [R, n] per grid point).

    Newton on log p(y, x | τ) with a backtracking line search (a step that lowers it is halved,
    per replication) and, where J is not positive definite (the LM's log-likelihood need not be
    concave far from the mode), Levenberg damping J + λI. The grid is visited from its middle
    outwards, each run started at its neighbour's mode.

    Args:
        log_likelihood: [R·D, P] task factors → [R·D] each task's log-likelihood (task k is task
            k mod D of replication ⌊k / D⌋).
        size: P, the entries of one task's factors.
        log_tau_grid: [G] values of u, increasing.
        tolerance: a run stops when no entry moves more than this; the LM's float32 gradient
            keeps the steps from shrinking much below ~1e-5, and a mode off by 1e-4 (the
            posterior sds are ≥ 0.1) changes log p(y | τ) by ~1e-7.
    """
    n = (tasks + 1) * size
    evidence = torch.zeros(replications, len(log_tau_grid), dtype=torch.float64)
    record = {"newton_steps": [0] * len(log_tau_grid), "unconverged": 0, "not_a_maximum": 0,
              "modes": [None] * len(log_tau_grid)}

    def log_prior(x: torch.Tensor, prior: torch.Tensor, tau: float) -> torch.Tensor:  # [R]
        return (-0.5 * (x.unsqueeze(1) @ prior @ x.unsqueeze(-1)).view(replications)
                - 0.5 * size * math.log(2 * math.pi * global_scale**2) - 0.5 * tasks * size * math.log(2 * math.pi / tau))

    def log_joint(x: torch.Tensor, prior: torch.Tensor, tau: float) -> torch.Tensor:  # [R], no gradients
        with torch.no_grad():
            likelihood = log_likelihood(x[:, size:].reshape(-1, size).float()).double()
        return likelihood.view(replications, tasks).sum(1) + log_prior(x, prior, tau)

    last: list = [None, None]  # x and likelihood_terms there: a run's mode is where the next run starts

    def likelihood_at(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if last[0] is None or not torch.equal(last[0], x):
            last[:] = x, likelihood_terms(log_likelihood, x[:, size:].reshape(-1, size))
        return last[1]

    def terms(x: torch.Tensor, prior: torch.Tensor, tau: float):
        """log p(y, x | τ) [R], its gradient [R, n] and J = −Hessian [R, n, n]."""
        values, gradient, hessian = likelihood_at(x)
        precision = prior.expand(replications, n, n).clone()
        for d in range(tasks):
            block = slice((d + 1) * size, (d + 2) * size)
            precision[:, block, block] -= hessian.view(replications, tasks, size, size)[:, d]
        grad = -(x.unsqueeze(1) @ prior).squeeze(1)
        grad[:, size:] += gradient.view(replications, -1)
        return values.view(replications, tasks).sum(1) + log_prior(x, prior, tau), grad, precision

    def newton(x: torch.Tensor, tau: float, index: int) -> torch.Tensor:
        prior = prior_precision(tau, tasks, size, global_scale)
        for steps in range(1, max_newton + 1):
            value, grad, precision = terms(x, prior, tau)
            damping = torch.zeros(replications, 1, 1, dtype=torch.float64)
            cholesky, info = torch.linalg.cholesky_ex(precision)
            while bool((info > 0).any()):
                damping = torch.where((info > 0)[:, None, None], damping * 10 + 1e-3, damping)
                cholesky, info = torch.linalg.cholesky_ex(precision + damping * torch.eye(n, dtype=torch.float64))
            step = torch.cholesky_solve(grad.unsqueeze(-1), cholesky).squeeze(-1)
            for _ in range(30):  # halve the steps that lower log p(y, x | τ)
                worse = log_joint(x + step, prior, tau) < value - 1e-9
                if not bool(worse.any()):
                    break
                step = torch.where(worse[:, None], step / 2, step)
            x = x + step
            if step.abs().max() < tolerance:
                break
        else:
            record["unconverged"] += int((step.abs().amax(1) >= tolerance).sum())
        record["newton_steps"][index], record["modes"][index] = steps, x
        value, _, precision = terms(x, prior, tau)
        logdet, info = torch.linalg.cholesky_ex(precision)
        record["not_a_maximum"] += int((info > 0).sum())
        evidence[:, index] = value + 0.5 * n * math.log(2 * math.pi) - logdet.diagonal(dim1=1, dim2=2).log().sum(-1)
        return x

    middle = len(log_tau_grid) // 2
    x_middle = newton(torch.zeros(replications, n, dtype=torch.float64), math.exp(float(log_tau_grid[middle])), middle)
    for indices in (range(middle + 1, len(log_tau_grid)), range(middle - 1, -1, -1)):
        x = x_middle
        for index in indices:
            x = newton(x, math.exp(float(log_tau_grid[index])), index)
    return evidence, record


def grid_posterior_draws(log_density: torch.Tensor, log_tau_grid: torch.Tensor, num_draws: int,
                         generator: torch.Generator, resolution: int = 4000) -> torch.Tensor:
    """Draws of τ [num_draws, R] from the densities of u = log τ given on the grid [R, G] (log,
    unnormalised), linear in log density between grid points, by inverse CDF on a fine grid."""
    fine = torch.linspace(float(log_tau_grid[0]), float(log_tau_grid[-1]), resolution, dtype=torch.float64)
    position = (fine - log_tau_grid[0]) / (log_tau_grid[1] - log_tau_grid[0])
    left = position.floor().long().clamp(max=len(log_tau_grid) - 2)
    weight = position - left
    interpolated = log_density[:, left] * (1 - weight) + log_density[:, left + 1] * weight  # [R, resolution]
    cdf = (interpolated - interpolated.max(1, keepdim=True).values).exp().cumsum(1)
    cdf = cdf / cdf[:, -1:]
    uniforms = torch.rand(cdf.shape[0], num_draws, generator=generator, dtype=torch.float64)
    return fine[torch.searchsorted(cdf, uniforms).clamp(max=resolution - 1)].exp().T

"""The calibration benchmark's parts, and the learned-τ default guide against overconfidence.

``benchmarks/sbc.py`` ranks the true τ of simulated data sets among posterior draws of each guide;
its result (``benchmarks/results/sbc.json``) picks the default guide for a learned τ. Here: the
cached likelihood it fits with is the LM's, its replicated prior is independent copies of the
tiny prior, its uniformity test rejects what it should, and the default guide, refitted on a few
of the benchmark's replications, is not held to the mean-field floor (q(log τ) sd ≈ √(2/(D·P))
whatever the data say) and keeps the true τ inside its 90 % interval in most of them, where the
mean-field guides on offsets do not. Last, the default guide runs on the library's own prior
with subsampled tasks. The exact reference (``laplace_tau.py``): its Laplace evidence is exact
where it must be (a Gaussian likelihood), and its draws follow the density on its grid.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sbc  # noqa: E402
from laplace_tau import grid_posterior_draws, laplace_log_evidence  # noqa: E402
from tiny_hierarchy import MODULE, FixedAPrior, build_lm  # noqa: E402

from bora_pyro.data import Batch  # noqa: E402
from bora_pyro.diagnostics import diagnose, site_log_scales  # noqa: E402
from bora_pyro.guides import param_groups, quantiles  # noqa: E402
from bora_pyro.guides.structured import conjugate_guide  # noqa: E402
from bora_pyro.models import BoRA, HierarchicalNormal  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "sbc.json"
#: Replications refitted by the coverage test: the benchmark's first ones.
SEEDS = list(range(6))
#: Of them, at least this many must hold the true τ in the 90 % interval: the benchmark's default
#: (the Laplace step on the decentred mean-field fit) covered 93 of 100 (ranks 93, 66, 77, 80, 27,
#: 35 on these 6), the decentred guide's own q(τ) 69 (ranks 87, 51, 69, 63, 1, 23), the mean-field
#: guides on offsets 23–25 (1 of these 6).
MIN_COVERED = 5
#: The mean-field floor: with offsets, q(log τ) has sd √(2/(D·P)) whatever the data say, a 90 %
#: interval of width 2·1.645·√(2/(D·P)) (0.41 for D·P = 4·32); the benchmark measured 0.39–0.40.
MEAN_FIELD_WIDTH = 2 * 1.645 * math.sqrt(2 / (sbc.NUM_TASKS * 16 * 2))


def test_the_cached_likelihood_is_the_lms():
    lm = build_lm(alpha=sbc.LORA_ALPHA)
    chunk = sbc.simulate_chunk([0, 1])
    cached = sbc.CachedTinyLM(lm, chunk.batch.input_ids, chunk.batch.attention_mask)
    generator = torch.Generator().manual_seed(0)
    tasks = 2 * sbc.NUM_TASKS
    factors = {MODULE: (0.2 * torch.randn(tasks, 2, 64, generator=generator), torch.randn(tasks, 16, 2, generator=generator))}
    with torch.no_grad():
        with lm.adapters(factors, chunk.batch.task_ids):
            full = lm.sequence_log_prob(chunk.batch.input_ids, chunk.batch.attention_mask)
        with cached.adapters(factors, chunk.batch.task_ids):
            fast = cached.sequence_log_prob(chunk.batch.input_ids, chunk.batch.attention_mask)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("centered", [False, True, 0.0])
def test_the_replicated_prior_is_independent_copies_of_the_tiny_prior(centered):
    replications, lm = 3, build_lm()
    single = FixedAPrior(sbc.hyperprior(), sbc.GLOBAL_SCALE, centered=centered)
    tasks = pyro.plate("tasks", replications * sbc.NUM_TASKS)
    joint = poutine.trace(sbc.ReplicatedPrior(single, replications, sbc.NUM_TASKS)).get_trace(lm.modules_spec, tasks)
    values = {name: site["value"] for name, site in joint.iter_stochastic_nodes()}
    total = 0.0
    for r in range(replications):
        tasks_of_r = slice(r * sbc.NUM_TASKS, (r + 1) * sbc.NUM_TASKS)
        own = {name: value[tasks_of_r] if name.startswith("task.") else value[r] for name, value in values.items()}
        conditioned = poutine.condition(single, data=own)
        total += poutine.trace(conditioned).get_trace(lm.modules_spec, pyro.plate("tasks", sbc.NUM_TASKS)).log_prob_sum()
    torch.testing.assert_close(joint.log_prob_sum(), total)


def test_the_uniformity_test_rejects_skewed_ranks_and_keeps_uniform_ones():
    uniform = list(range(sbc.NUM_DRAWS + 1))
    assert sbc.chi_square_uniformity(uniform, sbc.NUM_DRAWS, sbc.BINS)[2] > 0.99
    overconfident = [0] * 30 + [sbc.NUM_DRAWS] * 30 + uniform[20:60]  # a ∪: the truth outside the draws
    counts, _, p_value = sbc.chi_square_uniformity(overconfident, sbc.NUM_DRAWS, sbc.BINS)
    assert counts[0] == counts[-1] == 30 and p_value < 1e-6


@pytest.mark.usefixtures("one_thread")
def test_the_default_guide_is_wider_than_the_mean_field_floor_and_covers_the_true_tau():
    result, = sbc.fit_chunk(sbc.BASE_GUIDE, sbc.simulate_chunk(SEEDS), seed=0, rows=[sbc.DEFAULT_GUIDE])
    width, covered = sum(result["width_90_log_tau"]) / len(SEEDS), sum(result["covered_90"])
    assert width > 2 * MEAN_FIELD_WIDTH and covered >= MIN_COVERED, (
        f"{sbc.DEFAULT_GUIDE}: mean 90 % width of log τ {width:.2f} (mean-field floor {MEAN_FIELD_WIDTH:.2f}), "
        f"the true τ in {covered} of {len(SEEDS)} intervals; ranks {result['ranks']}")


def exact_global_posterior(pseudo_loc, pseudo_var, tau: float, global_scale: float):
    """Θ_i | m by dense Gaussian conditioning, entry by entry: m_{d,i} = Θ_i + (θ_{d,i} − Θ_i) + noise,
    Cov(Θ_i, m_{d,i}) = g², Cov(m_{d,i}, m_{e,i}) = g² + [d = e]·(1/τ + s_{d,i}²). [out, r] each."""
    num_tasks = pseudo_loc.shape[0]
    m, s2 = pseudo_loc.flatten(1).double().T, pseudo_var.flatten(1).double().T  # [P, D]
    g2 = global_scale**2
    cov_mm = g2 + torch.diag_embed(1 / tau + s2)  # [P, D, D]
    cov_tm = torch.full((m.shape[0], 1, num_tasks), g2, dtype=torch.float64)
    gain = torch.linalg.solve(cov_mm, cov_tm.transpose(1, 2)).transpose(1, 2)  # [P, 1, D]
    mean = (gain @ m.unsqueeze(-1)).flatten()
    var = g2 - (gain @ cov_tm.transpose(1, 2)).flatten()
    return mean.view(pseudo_loc.shape[1:]), var.sqrt().view(pseudo_loc.shape[1:])


def test_the_conjugate_guide_is_the_exact_conditional_of_its_gaussian_evidence():
    """Fixed τ, centred: q(Θ) must be Θ's posterior given the pseudo-observations m_d (sd s_d) with
    every θ_d integrated out, and q(θ_d | Θ) the prior conditional times Normal(m_d; θ_d, s_d²)."""
    tau, global_scale, num_tasks = 4.0, 0.5, 3
    model = BoRA(build_lm(), FixedAPrior(tau, global_scale, centered=True), num_tasks)
    guide = conjugate_guide(model)
    ids = torch.zeros(num_tasks, 4, dtype=torch.long)
    guide(Batch(ids, torch.ones_like(ids), torch.arange(num_tasks), torch.arange(num_tasks), num_tasks))
    generator = torch.Generator().manual_seed(0)
    site_name = f"task.{MODULE}.lora_B"
    key = site_name.replace(".", "/")
    with torch.no_grad():
        for d in range(num_tasks):
            guide.task_locs[key].rows[d].copy_(torch.randn(16, 2, generator=generator))
            guide.task_log_scales[key].rows[d].copy_(torch.randn(16, 2, generator=generator) - 0.5)
    pseudo_loc, pseudo_var = guide.pseudo_observations(site_name, None)
    mean, sd = exact_global_posterior(pseudo_loc, pseudo_var, tau, global_scale)
    marginals = guide.marginals()
    glob_loc, glob_sd = marginals[f"global.{MODULE}.lora_B"]
    torch.testing.assert_close(glob_loc.double(), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(glob_sd.double(), sd, rtol=1e-4, atol=1e-5)
    task_loc, task_sd = marginals[site_name]
    prior_var = 1 / tau
    torch.testing.assert_close(task_loc, (glob_loc / prior_var + pseudo_loc / pseudo_var) / (1 / prior_var + 1 / pseudo_var))
    torch.testing.assert_close(task_sd, (1 / prior_var + 1 / pseudo_var).rsqrt())


@pytest.mark.usefixtures("one_thread")
def test_the_conjugate_guide_fits_the_librarys_prior_on_subsampled_tasks():
    """Packed factors (A and B, ``task.lora`` [K, P]), centred, τ learned, a batch of 2 of 3 tasks:
    the guide samples only the batch's tasks, Θ's conditional reads every task's evidence, and
    median, quantiles and ``diagnose`` report every site."""
    lm, num_tasks = build_lm(), 3
    model = BoRA(lm, HierarchicalNormal(dist.LogNormal(1.4, 0.75), centered=True), num_tasks)
    ids = torch.randint(1, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    batch = Batch(ids, torch.ones_like(ids), torch.tensor([0, 0, 2, 2]), torch.arange(4), 12,
                  task_sizes=torch.tensor([4, 4, 4, 4]))
    guide = conjugate_guide(model)
    trace = poutine.trace(guide).get_trace(batch)
    assert trace.nodes["task.lora"]["value"].shape[0] == 2
    start = site_log_scales(guide)
    optimizer = torch.optim.Adam(param_groups(guide, 0.02, 0.05))
    elbos = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = Trace_ELBO().differentiable_loss(model, guide, batch)
        loss.backward()
        optimizer.step()
        elbos.append(-float(loss.detach()))
    assert guide.task_locs["task/lora"].rows[1].grad is not None  # Θ's conditional: every task's evidence
    median, bounds = guide.median(), quantiles(guide, [0.05, 0.95])
    P = sum(spec.num_params for spec in lm.modules_spec)
    assert median["task.lora"].shape == (num_tasks, P) and bounds["task.lora"].shape == (2, num_tasks, P)
    assert median["global.lora"].shape == (P,) and bounds["global.lora"].shape == (2, P)
    low, high = bounds["tau"]
    assert 0 < low < median["tau"] < high and math.isfinite(float(high))
    report = diagnose(model, guide, elbos, start, elbo_window=3)
    assert set(report["sites"]) == {"global", "task"} and set(report["hyper"]) == {"tau"}
    assert 0 < report["sites"]["task"]["posterior_sd_mean"] < report["sites"]["task"]["prior_sd"]


def test_the_laplace_evidence_is_exact_for_a_gaussian_likelihood():
    """With y_{d,j} ~ Normal(θ_{d,j}, σ²) Laplace's method is exact: y_{·,j} ~ Normal(0, g²·11ᵀ + (1/τ + σ²)·I)."""
    replications, tasks, size, global_scale, noise = 2, 3, 4, 0.7, 0.4
    y = torch.randn(replications * tasks, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def log_likelihood(theta):
        return dist.Normal(theta, noise).log_prob(y.to(theta)).sum(-1)

    grid = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    laplace, _ = laplace_log_evidence(log_likelihood, replications, tasks, size, global_scale, grid)
    for index, u in enumerate(grid.tolist()):
        covariance = global_scale**2 * torch.ones(tasks, tasks, dtype=torch.float64) + (math.exp(-u) + noise**2) * torch.eye(tasks)
        exact = dist.MultivariateNormal(torch.zeros(tasks, dtype=torch.float64), covariance).log_prob(
            y.view(replications, tasks, size).transpose(1, 2)).sum(-1)  # [R]: entries j independent
        torch.testing.assert_close(laplace[:, index], exact, rtol=0, atol=1e-4)


def test_grid_posterior_draws_follow_the_density_on_the_grid():
    grid = torch.linspace(-6.0, 6.0, 61, dtype=torch.float64)
    log_density = torch.stack([dist.Normal(0.5, 0.8).log_prob(grid), dist.Normal(-1.0, 0.3).log_prob(grid)])
    draws = grid_posterior_draws(log_density, grid, 20000, torch.Generator().manual_seed(0)).log()  # [L, 2]
    torch.testing.assert_close(draws.mean(0), torch.tensor([0.5, -1.0], dtype=torch.float64), rtol=0, atol=0.03)
    torch.testing.assert_close(draws.std(0), torch.tensor([0.8, 0.3], dtype=torch.float64), rtol=0.05, atol=0)


def test_the_laplace_reference_agrees_with_nuts_on_a_replication(one_thread):
    """On replication 1, τ's nested-Laplace median and 90 % interval lie within 15 % of those of the
    committed NUTS run on it (``sbc.json``'s ``nuts_check``; measured: 5.4 [2.3, 13.5] against
    5.5 [2.1, 14.9])."""
    nuts = next(check for check in json.loads(RESULTS.read_text())["nuts_check"] if check["seed"] == 1)
    chunk = sbc.simulate_chunk([1])
    lm = sbc.CachedTinyLM(build_lm(alpha=sbc.LORA_ALPHA), chunk.batch.input_ids, chunk.batch.attention_mask)
    draws, record = sbc.laplace_draws(lm, chunk, seed=0)
    low, median, high = torch.quantile(draws[:, 0], torch.tensor([0.05, 0.5, 0.95])).tolist()
    assert record["unconverged"] == record["not_a_maximum"] == 0, record
    for mine, exact in zip((low, median, high), (nuts["ci90"][0], nuts["median"], nuts["ci90"][1])):
        assert abs(math.log(mine / exact)) < math.log(1.15), ((low, median, high), nuts)

"""The Laplace step on τ (``bora_pyro.guides.laplace_tau``): its closed-form evidence, the one
pass that gathers the quadratic likelihood, the grid posterior, and agreement with exact inference."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch

from bora_pyro.cli import main
from bora_pyro.data import Batch
from bora_pyro.errors import ConfigError
from bora_pyro.guides.laplace_tau import (
    FactorCurvature, GridLogTau, hyperprior_grid, kronecker_curvature, laplace_tau, log_evidence, tau_groups,
    fixed_tau_prior, tau_posterior_from_json, tau_posterior_to_json,
)
from bora_pyro.models import HierarchicalNormal, HierarchicalStudentT
from bora_pyro.predictive import new_task_draws
from bora_pyro.run import TAU_POSTERIOR_FILE, load_run

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PROBABILITIES = torch.tensor([0.05, 0.5, 0.95])
sys.path.insert(0, str(BENCHMARKS))
import conftest  # noqa: E402
import sbc  # noqa: E402
from laplace_tau import laplace_log_evidence  # noqa: E402
from tiny_hierarchy import FixedAPrior, build_lm  # noqa: E402


def random_curvature(tasks: int = 3, size: int = 4, rank: int = 2, seed: int = 0) -> FactorCurvature:
    generator = torch.Generator().manual_seed(seed)

    def psd(*shape):
        root = torch.randn(*shape, shape[-1], generator=generator, dtype=torch.float64)
        return root @ root.transpose(-1, -2)

    return FactorCurvature(psd(size), psd(tasks, rank) * 5,
                           torch.randn(tasks, size, rank, generator=generator, dtype=torch.float64) * 0.3,
                           torch.randn(tasks, size, rank, generator=generator, dtype=torch.float64))


def dense_log_evidence(curvature: FactorCurvature, tau: float, global_scale: float) -> float:
    """log ∫ exp(gᵀ(θ − θ̂) − ½ (θ − θ̂)ᵀ Λ (θ − θ̂)) p(Θ, θ | τ) dΘ dθ with every matrix written out."""
    tasks, size, rank = curvature.point.shape
    entries = size * rank
    n = (tasks + 1) * entries
    covariance = torch.zeros(n, n, dtype=torch.float64)  # of x = (Θ, θ_1, …, θ_D) under the prior
    covariance += global_scale**2 * torch.kron(torch.ones(tasks + 1, tasks + 1, dtype=torch.float64), torch.eye(entries))
    covariance[entries:, entries:] += torch.eye(tasks * entries) / tau
    curvature_matrix = torch.zeros(n, n, dtype=torch.float64)
    for d in range(tasks):
        block = slice((d + 1) * entries, (d + 2) * entries)
        curvature_matrix[block, block] = torch.kron(curvature.shared, curvature.task[d])  # [J, r] row-major
    point = torch.cat([torch.zeros(entries, dtype=torch.float64), curvature.point.flatten()])
    gradient = torch.cat([torch.zeros(entries, dtype=torch.float64), curvature.gradient.flatten()])
    # a Gaussian integral: exp(c + bᵀx − ½ xᵀΛx) against N(0, Σ)
    linear = gradient + curvature_matrix @ point
    constant = -gradient @ point - 0.5 * point @ curvature_matrix @ point
    precision = torch.linalg.inv(covariance) + curvature_matrix
    return float(constant + 0.5 * linear @ torch.linalg.solve(precision, linear)
                 - 0.5 * torch.logdet(precision) - 0.5 * torch.logdet(covariance))


@pytest.mark.parametrize("global_scale", [0.5, None])
def test_the_evidence_is_the_gaussian_integral_written_out(global_scale):
    curvature = random_curvature()
    grid = torch.tensor([-2.0, 0.0, 1.5, 4.0], dtype=torch.float64)
    fast = log_evidence(curvature, grid, global_scale)
    # a flat Θ is the limit of a wide one, up to a constant in τ
    dense = torch.tensor([dense_log_evidence(curvature, math.exp(u), global_scale or 1e4) for u in grid.tolist()],
                         dtype=torch.float64)
    torch.testing.assert_close(fast - fast[0], dense - dense[0], rtol=0, atol=1e-6 if global_scale else 1e-4)


def test_a_flat_global_prior_leaves_out_directions_no_token_moves():
    """Direction 0 of S unseen by every token (no curvature, no gradient): with Θ flat its integral
    is infinite but the same for every τ, so the evidence is the other directions' (no error from
    a singular P_j)."""
    curvature = random_curvature()
    curvature.shared[:, 0] = curvature.shared[0, :] = 0
    curvature.gradient[:, 0] = curvature.point[:, 0] = 0
    seen = FactorCurvature(curvature.shared[1:, 1:], curvature.task, curvature.point[:, 1:], curvature.gradient[:, 1:])
    grid = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    unseen = log_evidence(curvature, grid, None) - log_evidence(seen, grid, None)
    torch.testing.assert_close(unseen - unseen[0], torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-8)


def test_a_narrow_posterior_gets_a_grid_of_its_own():
    curvature = random_curvature(tasks=40, size=6)  # many tasks: τ's posterior far narrower than the hyperprior
    pair, hyperprior = ("m", "lora_B"), dist.LogNormal(1.0, 3.0)
    posterior = laplace_tau({pair: curvature}, {"tau": (hyperprior, [pair])}, 1.0)["tau"]
    fine = torch.linspace(-20.0, 20.0, 20001, dtype=torch.float64)
    exact = GridLogTau(fine, log_evidence(curvature, fine, 1.0) + hyperprior.log_prob(fine.exp().float()).double() + fine)
    low, high = exact.icdf(torch.tensor([0.05, 0.95])).double().log().tolist()
    assert high - low < 30 * 6.0 / 160  # narrower than 30 intervals of the hyperprior's grid …
    # … yet exact: the hyperprior's grid alone is 0.6 % off here (linear in log density between points)
    torch.testing.assert_close(posterior.icdf(PROBABILITIES), exact.icdf(PROBABILITIES), rtol=0.002, atol=0)


def test_the_grid_posterior_is_a_normalised_density_with_matching_quantiles():
    grid = torch.linspace(-4.0, 6.0, 201, dtype=torch.float64)
    posterior = GridLogTau(grid, dist.Normal(1.0, 0.5).log_prob(grid) + 7.0)  # unnormalised on purpose
    tau = torch.linspace(1e-3, 400.0, 400_001, dtype=torch.float64)
    assert float(torch.trapezoid(posterior.log_prob(tau).exp(), tau)) == pytest.approx(1.0, abs=2e-3)
    low, median, high = posterior.icdf(torch.tensor([0.05, 0.5, 0.95])).double().log().tolist()
    assert [low, median, high] == pytest.approx([1 - 1.645 * 0.5, 1.0, 1 + 1.645 * 0.5], abs=5e-3)
    draws = posterior.sample((20_000,)).double().log()
    assert float(draws.mean()) == pytest.approx(1.0, abs=0.02) and float(draws.std()) == pytest.approx(0.5, rel=0.03)
    assert posterior.log_prob(torch.tensor(math.exp(7.0))).item() == -math.inf  # outside the grid


def tiny_batch(lm, tasks: int = 3, docs: int = 4, length: int = 10, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, lm.model.config.vocab_size, (tasks * docs, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a shorter document: its padding adds nothing
    task_ids = torch.arange(tasks).repeat_interleave(docs)
    return Batch(ids, mask, task_ids, torch.arange(len(ids)), len(ids))


def test_the_pass_gathers_each_tasks_exact_gradient_and_input_moments():
    lm = build_lm(alpha=4.0, rank=2)
    (name, layer), = lm.layers.items()
    batch = tiny_batch(lm)
    generator = torch.Generator().manual_seed(1)
    A = torch.randn(3, *lm.modules_spec[0].shape_A, generator=generator) * 0.3
    B = torch.randn(3, *lm.modules_spec[0].shape_B, generator=generator) * 0.3
    weights = torch.tensor([1.0, 2.0, 0.5])
    # two batches of the same documents give the sums of one; the first holds tasks 1 and 2 only
    halves = [Batch(batch.input_ids[rows], batch.attention_mask[rows], batch.task_ids[rows], batch.doc_ids[rows], 12)
              for rows in (torch.arange(4, 12), torch.arange(0, 4))]
    curvature = kronecker_curvature(lm, {name: (A, B)}, halves, 3, task_weights=weights, generator=generator)

    leaves = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    with lm.adapters({name: leaves}, batch.task_ids):
        log_likelihood = lm.sequence_log_prob(batch.input_ids, batch.attention_mask)
    gradient_A, gradient_B = torch.autograd.grad((log_likelihood * weights[batch.task_ids]).sum(), leaves)
    torch.testing.assert_close(curvature[name, "lora_B"].gradient, gradient_B.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(curvature[name, "lora_A"].gradient, gradient_A.double().transpose(1, 2), rtol=1e-4, atol=1e-5)

    inputs: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    with torch.no_grad(), lm.adapters({name: (A, B)}, batch.task_ids):
        lm.sequence_log_prob(batch.input_ids, batch.attention_mask)
    hook.remove()
    x = inputs[0].double()[batch.attention_mask.bool()]  # [T, in], the real tokens'
    token_tasks = batch.task_ids[:, None].expand_as(batch.attention_mask)[batch.attention_mask.bool()]
    torch.testing.assert_close(curvature[name, "lora_A"].shared, x.T @ x / len(x), rtol=1e-5, atol=1e-6)  # float32 sums
    output = curvature[name, "lora_B"].shared
    for task in range(3):
        down = x[token_tasks == task] @ A[task].double().T  # a_t [T_d, r]
        torch.testing.assert_close(curvature[name, "lora_B"].task[task], layer.scaling**2 * weights[task] * down.T @ down,
                                   rtol=1e-5, atol=1e-6)
        tokens = weights[task] * (token_tasks == task).sum()  # n_d, weighted
        expected_A = layer.scaling**2 * tokens * B[task].double().T @ output @ B[task].double()
        torch.testing.assert_close(curvature[name, "lora_A"].task[task], expected_A, rtol=1e-5, atol=1e-9)


def test_the_output_moment_is_the_fisher_of_the_models_own_labels(one_thread):
    """For the last block's MLP output, the Fisher at the layer's output is exactly
    J_tᵀ (diag p_t − p_t p_tᵀ) J_t per token (J_t: the logits' Jacobian there); 300 passes' average
    of the drawn labels' moment E[δ̂ δ̂ᵀ] comes within 10 % of it."""
    lm = build_lm(alpha=4.0, rank=2)
    (name, layer), = lm.layers.items()
    batch = tiny_batch(lm, tasks=2, docs=3)
    factors = {name: (torch.zeros(2, *lm.modules_spec[0].shape_A), torch.zeros(2, *lm.modules_spec[0].shape_B))}
    generator = torch.Generator().manual_seed(0)
    estimate = sum(kronecker_curvature(lm, factors, [batch], 2, generator=generator)[name, "lora_B"].shared
                   for _ in range(300)) / 300

    hidden: list[torch.Tensor] = []
    blocks = lm.model.transformer.h
    hook = blocks[-1].register_forward_hook(lambda module, args, output: hidden.append(output[0] if isinstance(output, tuple) else output))
    with torch.no_grad():
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    hook.remove()
    predicting = torch.nn.functional.pad(batch.attention_mask[:, 1:], (0, 1)).bool()  # positions with a next token
    head = lambda h: lm.model.lm_head(lm.model.transformer.ln_f(h))  # noqa: E731
    states = hidden[0][predicting]
    jacobians = torch.func.vmap(torch.func.jacrev(head))(states).double()  # [T, V, out]
    p = torch.softmax(head(states), -1).double()
    fisher = jacobians.transpose(1, 2) @ (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) @ jacobians
    exact = fisher.sum(0) / batch.attention_mask.sum()  # per token, over all real tokens as the pass counts them
    assert float((estimate - exact).norm() / exact.norm()) < 0.1


def test_tau_groups_follow_the_priors_grouping_and_refuse_other_priors():
    lm = build_lm(rank=2)
    module = lm.modules_spec[0].name
    hyperprior = dist.LogNormal(1.0, 1.0)
    groups = tau_groups(HierarchicalNormal({"A": hyperprior, "B": 50.0}, tau_per="factor"), lm)
    assert list(groups) == ["tau.A"] and groups["tau.A"][1] == [(module, "lora_A")]  # a fixed τ has no posterior
    assert list(tau_groups(HierarchicalNormal(hyperprior), lm)) == ["tau"]
    with pytest.raises(ConfigError, match="HierarchicalNormal"):
        tau_groups(HierarchicalStudentT(hyperprior), lm)


def test_the_mode_is_fitted_at_the_guides_tau_on_offsets_group_by_group():
    hyperprior = dist.LogNormal(1.0, 1.0)
    one = fixed_tau_prior(HierarchicalNormal(hyperprior, global_scale=0.5, centered=0.0), {"tau": 30.0})
    assert (one.tau, one.global_scale, one.centered) == (30.0, 0.5, False)
    grouped = fixed_tau_prior(HierarchicalNormal({"A": hyperprior, "B": 50.0}, tau_per="factor"), {"tau.A": 7.0})
    assert grouped.tau == {"A": 7.0, "B": 50.0} and grouped.precision.per == "factor"
    every = fixed_tau_prior(HierarchicalNormal(hyperprior, tau_per="module"), {"tau.m1": 2.0, "tau.m2": 3.0})
    assert every.tau == {"m1": 2.0, "m2": 3.0}


def test_the_grid_widens_to_where_the_data_put_tau_and_gives_up_when_they_push_it_away():
    curvature = random_curvature(tasks=6)
    pair = ("m", "lora_B")
    wide = torch.linspace(-20.0, 20.0, 2001, dtype=torch.float64)
    hyperprior = dist.LogNormal(0.0, 0.5)  # these data favour τ far below its range (±5.2 sd)
    exact = GridLogTau(wide, log_evidence(curvature, wide, 1.0) + hyperprior.log_prob(wide.exp().float()).double() + wide)
    posterior = laplace_tau({pair: curvature}, {"tau": (hyperprior, [pair])}, 1.0)["tau"]
    assert float(posterior.log_tau_grid[0]) < float(hyperprior_grid(hyperprior)[0])  # widened downwards …
    torch.testing.assert_close(posterior.icdf(PROBABILITIES), exact.icdf(PROBABILITIES), rtol=0.02, atol=0)  # … far enough

    curvature = random_curvature(tasks=50, size=20)
    identical = FactorCurvature(curvature.shared * 1e6, curvature.task,
                                curvature.point[:1].expand_as(curvature.point).clone(),
                                torch.zeros_like(curvature.gradient))  # every task the same, well measured: τ → ∞
    with pytest.raises(ConfigError, match="--tau-prior"):
        laplace_tau({pair: identical}, {"tau": (dist.LogNormal(0.0, 0.3), [pair])}, 1.0)


def test_the_laplace_step_agrees_with_nested_laplace_on_an_sbc_replication(one_thread):
    """On replication 1 of ``benchmarks/sbc.py``, expanded at the mode for τ at its hyperprior's
    median, the Laplace step's median and 90 % interval of τ lie within 10 % of the exact
    reference's (nested Laplace with each task's dense Hessian, re-solved at every τ)."""
    chunk = sbc.simulate_chunk([1])
    lm = build_lm(alpha=sbc.LORA_ALPHA)
    module = lm.modules_spec[0]
    lora_A = FixedAPrior(sbc.hyperprior(), sbc.GLOBAL_SCALE).lora_A(module, 0, lm.device)
    tasks, size = sbc.NUM_TASKS, math.prod(module.shape_B)

    cached = sbc.CachedTinyLM(build_lm(alpha=sbc.LORA_ALPHA), chunk.batch.input_ids, chunk.batch.attention_mask)

    def log_likelihood(theta):  # [D, P] → [D], as sbc.laplace_draws
        factors = {module.name: (lora_A.expand(tasks, *lora_A.shape), theta.view(tasks, *module.shape_B))}
        with cached.adapters(factors, chunk.batch.task_ids):
            per_document = cached.sequence_log_prob(cached.input_ids, chunk.batch.attention_mask)
        return per_document.new_zeros(tasks).index_add(0, chunk.batch.task_ids, per_document)

    reference, newton = laplace_log_evidence(log_likelihood, 1, tasks, size, sbc.GLOBAL_SCALE, sbc.LAPLACE_GRID)
    assert newton["unconverged"] == newton["not_a_maximum"] == 0, newton
    reference = GridLogTau(sbc.LAPLACE_GRID, reference[0] + dist.Normal(sbc.TAU_LOC, sbc.TAU_SCALE).log_prob(sbc.LAPLACE_GRID))
    middle = len(sbc.LAPLACE_GRID) // 2
    assert float(sbc.LAPLACE_GRID[middle]) == pytest.approx(sbc.TAU_LOC)
    point = newton["modes"][middle][0, size:]  # the mode of (Θ, θ) at τ = e^loc: where the step expands
    factors = {module.name: (lora_A.expand(tasks, *lora_A.shape), point.view(tasks, *module.shape_B).float())}
    curvature = kronecker_curvature(lm, factors, [chunk.batch], tasks, generator=torch.Generator().manual_seed(0))
    step = laplace_tau(curvature, {"tau": (sbc.hyperprior(), [(module.name, "lora_B")])}, sbc.GLOBAL_SCALE)["tau"]
    torch.testing.assert_close(step.icdf(PROBABILITIES), reference.icdf(PROBABILITIES), rtol=0.1, atol=0)
    nuts = json.loads((BENCHMARKS / "results" / "sbc.json").read_text())["nuts_check"][1]
    assert nuts["seed"] == 1 and step.icdf(torch.tensor(0.5)).item() == pytest.approx(nuts["median"], rel=0.15)



@pytest.fixture(scope="module")
def learned_tau_run(gpt2_dir, tmp_path_factory):
    """A fit with τ learned under the CLI's defaults (decentred mean-field, then the Laplace step)."""
    return conftest.fit_synthetic_run(tmp_path_factory.mktemp("laplace") / "run", gpt2_dir, "--tau-prior", "lognormal:2,1.5",
                                      "--steps", "60", "--eval-every", "20")


def test_a_learned_tau_fit_ends_with_the_laplace_step_and_diagnose_reports_it(learned_tau_run, capsys):
    posterior = tau_posterior_from_json(json.loads((learned_tau_run / TAU_POSTERIOR_FILE).read_text()))["tau"]
    metrics = json.loads((learned_tau_run / "metrics.json").read_text())
    hyper = metrics["diagnostics"]["hyper"]["tau"]
    low, median, high = posterior.icdf(PROBABILITIES).tolist()
    assert hyper["method"] == "laplace" and metrics["tau_posterior"]["method"] == "laplace"
    expanded = metrics["tau_posterior"]["expanded_at"]  # the MAP fit at the guide's τ, where the step expands
    assert expanded["map_steps"] > 0 and expanded["tau"]["tau"] == pytest.approx(float(load_run(learned_tau_run).guide.median()["tau"]))
    assert hyper["median"] == pytest.approx(median) and hyper["ci90"] == pytest.approx([low, high])
    capsys.readouterr()
    assert main(["diagnose", str(learned_tau_run)]) == 0
    assert json.loads(capsys.readouterr().out)["hyper"] == metrics["diagnostics"]["hyper"]
    guide_median = float(load_run(learned_tau_run).guide.median()["tau"])  # the fit's own q(τ) is not what is reported
    assert abs(math.log(guide_median / median)) > 1e-3


def narrow_tau_posterior(tau: float) -> dict[str, GridLogTau]:
    """A posterior of the site ``tau``, flat on log τ within ±1 % of ``tau``."""
    grid = torch.linspace(math.log(tau) - 0.01, math.log(tau) + 0.01, 11, dtype=torch.float64)
    return {"tau": GridLogTau(grid, torch.zeros(11))}


def test_new_tasks_draw_their_tau_from_the_laplace_step(learned_tau_run):
    """Unseen tasks' adapters spread around Θ by τ^{-1/2} of the Laplace step's τ, not the guide's:
    across draws, a posterior at τ ≈ 1e-2 spreads them (sd 10) far more than one at τ ≈ 1e8 (Θ's
    own posterior sd)."""
    run = load_run(learned_tau_run)

    def spread(tau: float) -> float:
        draws = list(new_task_draws(run.model, run.guide, 1, 8, narrow_tau_posterior(tau)))
        flat = torch.stack([torch.cat([factors[name][1].flatten() for name in factors]) for factors in draws])
        return float(flat.std(0).mean())  # over draws, entry by entry

    assert spread(1e-2) > 20 * spread(1e8)


def run_at_tau(run_dir: Path, out: Path, tau: float) -> Path:
    """A copy of ``run_dir`` whose ``tau_posterior.json`` is :func:`narrow_tau_posterior` at ``tau``."""
    shutil.copytree(run_dir, out)
    (out / TAU_POSTERIOR_FILE).write_text(json.dumps(tau_posterior_to_json(narrow_tau_posterior(tau))))
    return out


def test_predict_scores_unseen_tasks_under_the_runs_laplace_tau(learned_tau_run, tmp_path, capsys):
    """``bora-pyro predict --data`` with a task the run never saw draws its τ from the run's
    ``tau_posterior.json``: at τ ≈ 1e-2 the unseen task's perplexity spreads over draws far more
    than at τ ≈ 1e8 (where only Θ's posterior is left)."""
    records = [dict(record, speaker="newcomer") for record in conftest.synthetic_records(num_tasks=4, docs_per_task=4, seed=2)
               if record["speaker"] == "task3"]
    data = tmp_path / "newcomer.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))

    def unseen_interval(tau: float) -> list[float]:
        run_dir = run_at_tau(learned_tau_run, tmp_path / f"tau{tau:g}", tau)
        capsys.readouterr()
        assert main(["predict", str(run_dir), "--data", str(data), "--samples", "8", "--no-calibration"]) == 0
        return json.loads(capsys.readouterr().out)["unseen"]["tasks"]["newcomer"]["ci"]

    (loose_low, loose_high), (tight_low, tight_high) = unseen_interval(1e-2), unseen_interval(1e8)
    assert math.log(loose_high / loose_low) > 2 * math.log(tight_high / tight_low)  # 3.1× when measured


def test_generate_new_task_draws_its_adapter_at_the_runs_laplace_tau(learned_tau_run, tmp_path, capsys):
    """``generate --new-task`` draws θ_new ~ Normal(Θ, τ^{-1/2}) at the Laplace step's τ: at τ ≈ 1e8
    it writes what Θ writes, at τ ≈ 1e-2 (sd 10 per entry) something else."""

    def text(run_dir: Path, which: str) -> str:
        capsys.readouterr()
        assert main(["generate", str(run_dir), which, "--prompt", "w1 w2", "--max-new-tokens", "12", "--json"]) == 0
        return capsys.readouterr().out

    tight, loose = (run_at_tau(learned_tau_run, tmp_path / name, tau) for name, tau in (("tight", 1e8), ("loose", 1e-2)))
    assert text(tight, "--new-task") == text(tight, "--global") != text(loose, "--new-task")


def test_tau_posterior_guide_keeps_the_guides_interval_and_a_task_store_needs_it(gpt2_dir, tmp_path, capsys):
    run_dir = conftest.fit_synthetic_run(tmp_path / "guide", gpt2_dir, "--tau-prior", "lognormal:2,1.5",
                                         "--tau-posterior", "guide")
    assert not (run_dir / TAU_POSTERIOR_FILE).exists()
    assert json.loads((run_dir / "metrics.json").read_text())["diagnostics"]["hyper"]["tau"]["method"] == "guide"
    data = tmp_path / "guide.jsonl"
    assert main(["fit", "--model", gpt2_dir, "--data", str(data), "--task-field", "speaker", "--text-field", "line",
                 "--steps", "2", "--tau-prior", "lognormal:2,1.5", "--task-store", "host", "--out", str(tmp_path / "store"),
                 "--quiet"]) == 2
    assert "add --tau-posterior guide" in capsys.readouterr().err


def test_a_failed_laplace_step_keeps_the_fitted_run_and_says_why(gpt2_dir, tmp_path, monkeypatch, capsys):
    import bora_pyro.cli

    def fail(*args, **kwargs):
        raise ConfigError("the posterior of tau still reaches the end")

    monkeypatch.setattr(bora_pyro.cli, "fit_tau_posterior", fail)
    run_dir = conftest.fit_synthetic_run(tmp_path / "run", gpt2_dir, "--tau-prior", "lognormal:2,1.5")
    assert "warning: the Laplace step on τ failed (the posterior of tau still reaches the end)" in capsys.readouterr().err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["tau_posterior"] == {"method": "guide", "laplace_error": "the posterior of tau still reaches the end"}
    assert metrics["diagnostics"]["hyper"]["tau"]["method"] == "guide" and not (run_dir / TAU_POSTERIOR_FILE).exists()
    assert load_run(run_dir).tau_posterior is None


def test_a_run_saved_before_the_laplace_step_keeps_its_guides_tau():
    from bora_pyro.run import RunConfig

    old = RunConfig.from_json({"model": "m", "tau_prior": "lognormal:4.6,1", "task_store": "disk", "format_version": 2})
    assert old.tau_posterior == "guide" and not old.laplace_tau
    old.validate_model()  # resumable with its task store, as when it was written
    assert RunConfig(model="m", tau_prior="lognormal:4.6,1").laplace_tau

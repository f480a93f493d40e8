"""The library's guides against exact inference (NUTS) on a BoRA model small enough for it.

    python benchmarks/vi_vs_nuts.py --json benchmarks/results/vi_vs_nuts.json   # 4.2–6.2 min (1 thread, 2-core machine)
    python benchmarks/vi_vs_nuts.py --json /tmp/vi_vs_nuts.json --quick         # 2.9 min

The model is ``benchmarks/tiny_hierarchy.py``'s: a random one-layer GPT-2, rank-2 LoRA at its MLP
output with A fixed, D = 4 tasks whose B factors θ_d ~ Normal(Θ, τ^{-1/2}) (161 latent numbers),
τ ~ LogNormal(1.4, 0.75), and documents simulated from it. Then:

1. NUTS on the full posterior p(τ, Θ, θ_1..D | docs), with the task factors fully non-centred
   (``LocScaleReparam(0)``: θ_d = Θ + τ^{-1/2}·z_d, z_d ~ Normal(0, 1), the funnel-free
   geometry): ``chains`` chains one after another, each from its own random start, and split
   R-hat and ESS (``pyro.ops.stats``) over every latent entry, τ included.
2. Each guide fitted to the same posterior by full-batch SVI until its ELBO is flat
   (``tiny_hierarchy.fit_guide``):

   - ``map``: :func:`~bora_pyro.guides.map_guide`, with τ fixed at the NUTS posterior median
     (MAP refuses a latent τ: a point estimate of τ together with the task factors is degenerate,
     τ → ∞; the fixed τ is the best case for it, the exact posterior's own). With τ fixed every
     parametrisation of the task factors is a linear map of the others, so the MAP is the same in all;
   - ``mean_field``: :func:`~bora_pyro.guides.mean_field_guide` on the offsets δ_d = θ_d − Θ
     (``centered=False``, the library's parametrisation for a learned τ), τ learned;
   - ``hybrid``: :func:`~bora_pyro.guides.hybrid_guide` (Θ a point, the offsets and τ mean-field),
     τ learned; its θ_d = Θ + δ_d lack Θ's uncertainty by construction;
   - ``mean_field_decentered``: the mean-field guide on NUTS's own parametrisation z_d (``centered=0.0``);
   - ``laplace_step``: the same fit, then τ's posterior by the library's Laplace step
     (:mod:`bora_pyro.guides.laplace_tau`; the default posterior of a learned τ: a MAP fit at τ
     fixed at the guide's median, expanded at its mode). Its task factors are the guide's; only τ
     differs from ``mean_field_decentered``.

3. The comparison, on what every parametrisation shares: τ (median and 90 % interval: the
   guide's :func:`~bora_pyro.guides.quantiles`, the draws' for NUTS) and the task factors θ_d
   [D, 16, 2] (128 entries), from ``guide_draws`` draws of the guide pushed through the prior
   (``BoRA.task_factors``) against the NUTS draws:

       task_sd_ratio    = mean over entries of sd_guide(θ) / sd_NUTS(θ)    (1: right width; < 1: overconfident)
       task_mean_abs_z  = mean over entries of |mean_guide(θ) − mean_NUTS(θ)| / sd_NUTS(θ)

   For MAP the draws are its point: ``task_sd_ratio`` = 0 and τ's interval is [τ, τ].

The JSON::

    {"nuts": {"tau": {"median", "ci90"}, "rhat_max", "draws", "ess_min", "sites": {SITE: {"rhat_max", "ess_min"}},
              "seconds"},
     "guides": {NAME: {"tau": {"median", "ci90"}, "task_sd_ratio", "task_mean_abs_z", "seconds", "fit": {...}}},
     "true": {"tau"}, "settings": {...}, "machine": {...}, "seconds": total}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoDelta
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_hierarchy import MODULE, FixedAPrior, build_lm, fit_guide, mode_at_guide_tau, simulate  # noqa: E402

from bora_pyro import MultiTaskLM  # noqa: E402
from bora_pyro.data import Batch  # noqa: E402
from bora_pyro.guides import hybrid_guide, map_guide, mean_field_guide, quantiles  # noqa: E402
from bora_pyro.guides.laplace_tau import kronecker_curvature, laplace_tau  # noqa: E402
from bora_pyro.models import BoRA  # noqa: E402
from bora_pyro.precision import machine_description  # noqa: E402

PROBS = [0.05, 0.5, 0.95]
#: The guides compared, in the order they are fitted (see the module's docstring).
GUIDES = ("map", "mean_field", "hybrid", "mean_field_decentered", "laplace_step")


@dataclass(frozen=True)
class Settings:
    """The model, the data, NUTS's budget and the guides' fits."""

    num_tasks: int = 4
    docs_per_task: int = 20
    doc_length: int = 24
    rank: int = 2
    alpha: float = 16.0
    tau_loc: float = 1.4  # log τ ~ Normal(tau_loc, tau_scale): τ's prior median e^1.4 ≈ 4, task sd ≈ 0.5
    tau_scale: float = 0.75
    global_scale: float = 1.0
    chains: int = 2
    warmup: int = 200
    draws_per_chain: int = 300
    max_tree_depth: int = 8
    guide_steps: int = 6000
    fit_window: int = 200  # tiny_hierarchy.fit_guide's flatness window and learning-rate halvings
    fit_decays: int = 4
    lr: float = 0.02
    log_scale_lr: float = 0.05
    guide_draws: int = 1000
    seed: int = 0

    def prior(self, centered: bool | float, tau: float | None = None) -> FixedAPrior:
        """The model's prior in a parametrisation; τ latent, or fixed at ``tau``."""
        hyperprior = dist.LogNormal(self.tau_loc, self.tau_scale)
        return FixedAPrior(hyperprior if tau is None else tau, self.global_scale, centered, seed=self.seed)


QUICK = Settings(docs_per_task=12, warmup=80, draws_per_chain=80, max_tree_depth=5, guide_steps=2000, fit_window=100,
                 fit_decays=3, guide_draws=300)


@dataclass
class NutsResult:
    """Draws of every latent site by chain, [chains, draws, *site shape], and the time taken."""

    samples: dict[str, torch.Tensor]
    seconds: float

    def pooled(self) -> dict[str, torch.Tensor]:
        """Every site's draws of all chains, [chains · draws, *site shape]."""
        return {name: value.flatten(0, 1) for name, value in self.samples.items()}

    def diagnostics(self) -> dict[str, dict[str, float]]:
        """Per site: the largest split R-hat and the smallest ESS over its entries."""
        return {name: {"rhat_max": float(split_gelman_rubin(value, chain_dim=0, sample_dim=1).max()),
                       "ess_min": float(effective_sample_size(value, chain_dim=0, sample_dim=1).min())}
                for name, value in self.samples.items()}


def run_nuts(model: BoRA, batch: Batch, settings: Settings) -> NutsResult:
    """``settings.chains`` NUTS chains on ``model``'s posterior given ``batch``, one after
    another, each from a uniform random start in (−2, 2) on the unconstrained scale (Pyro's
    default; over-dispersed against the posterior, as R-hat assumes), diagonal mass matrix and
    step size adapted in the warmup."""
    start = time.perf_counter()
    chains = []
    for chain in range(settings.chains):
        pyro.set_rng_seed(settings.seed + 1000 * (chain + 1))
        kernel = NUTS(model, target_accept_prob=0.8, max_tree_depth=settings.max_tree_depth)
        mcmc = MCMC(kernel, num_samples=settings.draws_per_chain, warmup_steps=settings.warmup, disable_progbar=True)
        mcmc.run(batch)
        chains.append(mcmc.get_samples())
    samples = {name: torch.stack([chain[name] for chain in chains]) for name in chains[0]}
    return NutsResult(samples, time.perf_counter() - start)


def task_factors_of(model: BoRA, draws: list[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """The task B factors θ_d of each draw of the latent sites (any parametrisation):
    [len(draws), D, out, r] for the one adapted module."""
    with torch.no_grad():
        return torch.stack([model.task_factors(values)[MODULE][1] for values in draws])


def guide_draws(guide, batch: Batch, num_draws: int) -> list[dict[str, torch.Tensor]]:
    """``num_draws`` joint draws of the latent sites from the guide; one, its point, from a
    point-mass guide (``AutoDelta``)."""
    with torch.no_grad():
        return [guide(batch) for _ in range(1 if isinstance(guide, AutoDelta) else num_draws)]


def compare_task_factors(guide_B: torch.Tensor, nuts_B: torch.Tensor) -> dict[str, float]:
    """``task_sd_ratio`` and ``task_mean_abs_z`` (see the module's docstring) of draws
    [n_guide, D, out, r] against NUTS's [n_nuts, D, out, r]; one guide draw (a point) has sd 0."""
    nuts_sd = nuts_B.std(0)
    return {"task_sd_ratio": float((guide_B.std(0) / nuts_sd).mean()) if len(guide_B) > 1 else 0.0,
            "task_mean_abs_z": float(((guide_B.mean(0) - nuts_B.mean(0)).abs() / nuts_sd).mean())}


def tau_summary(low: float, median: float, high: float) -> dict:
    """τ's median and 90 % interval, as the JSON has them."""
    return {"median": median, "ci90": [low, high]}


def fit_and_compare(name: str, model: BoRA, guide, batch: Batch, nuts_B: torch.Tensor, settings: Settings,
                    fixed_tau: float | None = None) -> dict:
    """Fit ``guide`` to ``model``'s posterior and compare it with NUTS's task factors ``nuts_B``;
    τ from the guide's quantiles, or ``fixed_tau`` where the model fixes it."""
    pyro.set_rng_seed(settings.seed)
    trace = fit_guide(model, guide, batch, settings.guide_steps, settings.lr, settings.log_scale_lr,
                      window=settings.fit_window, max_decays=settings.fit_decays)
    draws = guide_draws(guide, batch, settings.guide_draws)
    if fixed_tau is not None:
        low = median = high = fixed_tau
    elif name == "laplace_step":
        low, median, high = laplace_step_quantiles(model, guide, batch, settings)
    else:
        low, median, high = (float(q) for q in quantiles(guide, PROBS)["tau"])
    result = {"tau": tau_summary(low, median, high),
              **compare_task_factors(task_factors_of(model, draws), nuts_B),
              "seconds": round(trace.seconds, 2), "fit": trace.summary(settings.fit_window)}
    print(f"{name:>22}: τ {median:.3g} [{low:.3g}, {high:.3g}]  sd ratio {result['task_sd_ratio']:.3f}  "
          f"|z| {result['task_mean_abs_z']:.3f}  {trace.steps} steps, converged {trace.converged}, "
          f"{trace.seconds:.0f} s", flush=True)
    return result


def guide_setup(name: str, settings: Settings, tau_median: float) -> tuple[FixedAPrior, Callable, float | None]:
    """The prior, the guide factory and the fixed τ (None: τ learned) of the guide ``name`` of
    :data:`GUIDES`; ``tau_median`` is NUTS's, where MAP fixes τ."""
    return {
        "map": (settings.prior(False, tau=tau_median), map_guide, tau_median),
        "mean_field": (settings.prior(False), mean_field_guide, None),
        "hybrid": (settings.prior(False), hybrid_guide, None),
        "mean_field_decentered": (settings.prior(0.0), mean_field_guide, None),
        "laplace_step": (settings.prior(0.0), mean_field_guide, None),
    }[name]


def laplace_step_quantiles(model: BoRA, guide, batch: Batch, settings: Settings) -> tuple[float, float, float]:
    """τ's quantiles from the library's Laplace step (:mod:`bora_pyro.guides.laplace_tau`) after
    the fitted ``guide``: at the MAP mode for τ fixed at the guide's median, as
    :func:`~bora_pyro.guides.laplace_tau.fit_tau_posterior` (the task factors compared are the guide's)."""
    factors = mode_at_guide_tau(model, guide, batch, settings.seed, steps=settings.guide_steps, lr=settings.lr,
                                log_scale_lr=settings.log_scale_lr, window=settings.fit_window,
                                max_decays=settings.fit_decays)
    curvature = kronecker_curvature(model.lm, factors, [batch], settings.num_tasks,
                                    generator=torch.Generator().manual_seed(settings.seed))
    hyperprior = dist.LogNormal(settings.tau_loc, settings.tau_scale)
    posterior = laplace_tau(curvature, {"tau": (hyperprior, [(MODULE, "lora_B")])}, settings.global_scale)["tau"]
    low, median, high = posterior.icdf(torch.tensor(PROBS)).tolist()
    return low, median, high


@dataclass
class Reference:
    """The exact side: the LM, the simulated documents, the true τ, the NUTS run and its task
    factors θ_d, [chains · draws, D, out, r]."""

    lm: MultiTaskLM
    batch: Batch
    true_tau: float
    nuts: NutsResult
    task_factors: torch.Tensor

    def tau_quantiles(self) -> tuple[float, float, float]:
        """τ's 5 %, 50 % and 95 % posterior quantiles, from the pooled draws."""
        low, median, high = self.nuts.pooled()["tau"].quantile(torch.tensor(PROBS)).tolist()
        return low, median, high

    def summary(self) -> dict:
        """JSON-ready: τ, the largest R-hat, the draws, the smallest ESS, per-site diagnostics, time."""
        diagnostics = self.nuts.diagnostics()
        return {"tau": tau_summary(*self.tau_quantiles()),
                "rhat_max": max(site["rhat_max"] for site in diagnostics.values()),
                "draws": len(self.task_factors),
                "ess_min": min(site["ess_min"] for site in diagnostics.values()),
                "sites": diagnostics, "seconds": round(self.nuts.seconds, 2)}


def exact_reference(settings: Settings) -> Reference:
    """Simulate the data from the model (τ, Θ, θ_d drawn from the prior) and run NUTS on it."""
    lm = build_lm(settings.seed, settings.rank, settings.alpha)
    prior = settings.prior(0.0)
    true_values, batch = simulate(lm, prior, settings.num_tasks, settings.docs_per_task, settings.doc_length,
                                  settings.seed)
    model = BoRA(lm, prior, settings.num_tasks)
    nuts = run_nuts(model, batch, settings)
    pooled = nuts.pooled()
    draws = [{name: value[i] for name, value in pooled.items()} for i in range(len(pooled["tau"]))]
    return Reference(lm, batch, float(true_values["tau"]), nuts, task_factors_of(model, draws))


def compare_guide(name: str, reference: Reference, settings: Settings) -> dict:
    """Fit the guide ``name`` of :data:`GUIDES` to the reference's data and compare."""
    prior, make_guide, fixed_tau = guide_setup(name, settings, reference.tau_quantiles()[1])
    model = BoRA(reference.lm, prior, settings.num_tasks)
    return fit_and_compare(name, model, make_guide(model), reference.batch, reference.task_factors, settings, fixed_tau)


def run(settings: Settings) -> dict:
    """The whole comparison; the JSON-ready result (see the module's docstring)."""
    start = time.perf_counter()
    reference = exact_reference(settings)
    nuts = reference.summary()
    low, high = nuts["tau"]["ci90"]
    print(f"{'nuts':>22}: τ {nuts['tau']['median']:.3g} [{low:.3g}, {high:.3g}]  R-hat max {nuts['rhat_max']:.3f}  "
          f"ESS min {nuts['ess_min']:.0f}  {nuts['seconds']:.0f} s (true τ {reference.true_tau:.3g})", flush=True)
    guides = {name: compare_guide(name, reference, settings) for name in GUIDES}
    return {"nuts": nuts, "guides": guides, "true": {"tau": reference.true_tau}, "settings": asdict(settings),
            "machine": machine_description("cpu"), "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="fewer documents, draws and steps (a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = replace(QUICK if args.quick else Settings(), seed=args.seed)
    result = run(settings)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['seconds']:.0f} s; wrote {args.json}")


if __name__ == "__main__":
    main()

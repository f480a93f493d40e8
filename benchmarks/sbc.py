"""Simulation-based calibration (Talts et al. 2018) of the learned τ, guide by guide.

For replication r = 1..R, on the tiny model of :mod:`tiny_hierarchy` (D tasks, B_d ∈ R^{16×2}):

    τ_r ~ LogNormal(TAU_LOC, TAU_SCALE),  Θ_r ~ Normal(0, 1),  θ_{r,d} ~ Normal(Θ_r, τ_r^{-1/2})
    y_r ~ the adapted LM (``tiny_hierarchy.simulate``: documents of every task)
    q_r = the guide fitted to y_r (full-batch SVI to a flat ELBO, ``tiny_hierarchy.fit_guide``)
    rank_r = #{l ≤ L : τ_{r,l} < τ_r},   τ_{r,1..L} ~ q_r(τ) independent draws,   rank_r ∈ {0..L}.

If q_r(τ) were the exact posterior p(τ | y_r), (τ_r, τ_{r,1..L}) would be exchangeable given y_r
and rank_r ~ Uniform{0..L}: a ∪-shaped histogram means intervals too narrow (overconfident), a
∩-shaped one too wide, a slope a biased τ. Uniformity test: the L + 1 ranks in ``BINS`` equal
bins of (L + 1)/``BINS`` ranks, Pearson's χ² = Σ_b (n_b − R/BINS)² / (R/BINS) against χ²(BINS − 1);
a guide passes at p ≥ ``ALPHA``.

The model: :mod:`tiny_hierarchy`'s one-layer GPT-2 (vocabulary 16, width 16) with rank-2 LoRA at
its MLP output, A fixed, D = 4 tasks of 40 documents of 16 tokens, Θ ~ Normal(0, 0.25), LoRA
alpha 1. Not tiny_hierarchy's alpha 16 and Θ scale 1: there the adapter's output is ~5× the
residual stream (rms 4.0 against 0.7), the final LayerNorm erases its magnitude, and no Gaussian
guide tried came near the exact posterior (a full-rank Normal over all 161 numbers: τ's median
2.6 where NUTS's was 1.7). At alpha 1 the adapter perturbs the residual stream (rms ≤ 0.26), as
LoRA's does. Fits: Adam at lr 0.03 (factor locations) and 0.05 (log-scales, τ), halved at each
flat window of 100 steps, stopped at the fourth flat window (``tiny_hierarchy.fit_guide``).

The likelihood is :class:`CachedTinyLM`: the same numbers as the LM's forward pass (tested),
without recomputing what the adapter cannot change.

Vectorised replications: the R replications of a chunk are fitted as one Pyro program
(:class:`ReplicatedPrior`: R independent copies of the tiny prior, R·D tasks). Its ELBO is the
sum of the R replications' ELBOs over disjoint parameters, and Adam is elementwise, so each
replication's parameters follow the updates of its own fit; only the stopping rule (a flat summed
ELBO, the tolerance R times one fit's) is shared. One step then costs one LM pass over R·D·N
documents instead of R passes, which is what makes R ≥ 100 per guide fit in the time.

Run: ``python benchmarks/sbc.py --json benchmarks/results/sbc.json --png benchmarks/results/sbc.png
--nuts 4`` (27 min for the four guides on 2 cores of an AMD EPYC, 2 workers, and 1 min more for the
Laplace step's MAP fits;
``--nuts 4``: NUTS on the first 4 replications too, ~2 min each; ``--guides NAME ... --update``:
rerun those, keep the file's other rows). ``laplace_kfac`` is the library's default posterior of
a learned τ: the fit of ``mean_field_noncentred`` (shared with that row: one fit gives both),
then the Laplace step of :mod:`bora_pyro.guides.laplace_tau`: a MAP fit with τ fixed at the
guide's median, and at its mode a K-FAC quadratic likelihood in each task's factors, from each
replication's own documents, integrated in closed form over the task factors and Θ on a grid of
log τ (the MAP fit ~40 s, the step 2 s for 50 replications).
``--guides laplace_grid --update`` adds the exact reference of ``laplace_tau.py`` (not a guide:
τ's posterior by nested Laplace on a grid of log τ; one Newton run per grid point with the LM's
dense Hessian in each task's factors, so it does not scale past a few hundred latent numbers per
task; 24 min for the 100 replications on one core, while another job used both cores).

Measured (100 replications, 99 draws; p of the χ² test, coverage of the true τ by the 90 %
interval, its mean width in log τ, mean log(median / true τ)):

    hybrid_offsets          p = 0        cover 0.25  width 0.39  bias +0.06   ∪: too narrow
    mean_field_offsets      p = 0        cover 0.23  width 0.40  bias +0.06   ∪: too narrow
    mean_field_noncentred   p = 1.4e-12  cover 0.69  width 1.35  bias +0.31   τ too large (the guide's own q(τ))
    conjugate_centred       p = 1.6e-8   cover 0.77  width 1.61  bias +0.31   τ too large
    laplace_kfac            p = 0.58     cover 0.93  width 1.80  bias +0.06   passes (the default)
    laplace_grid            p = 0.62     cover 0.93  width 1.79  bias +0.03   passes (the exact reference)

The reference passes, so the simulation, the model and the ranks are right. No guide's own q(τ)
passes. The guides on offsets sit at the mean-field floor (width 2·1.645·√(2/(D·P)) = 0.41)
whatever the data say. The other two leave it but hardly follow the data: their ranks grow with
the true τ (correlation 0.85; mean rank 5–8 of 99 for the fifth of replications with the smallest
τ, 75–78 for the largest), i.e. q(τ) sits near the same place whatever τ made the data, narrower
than the exact posterior and above it. The Laplace step on the decentred mean-field fit passes,
with the reference's width: its evidence p(y | τ) is computed, not left to the ELBO. On
replications 0–3 NUTS ranks the true τ at 87, 61, 73, 73 of 99, the reference at 92, 59, 73, 78,
the Laplace step at 93, 66, 77, 80 and the decentred mean-field guide's own q(τ) at 87, 51, 69, 63.

What the Laplace step needs, found on these replications before it went into the library (a
prototype, not kept): expanded at the mode of (Θ, θ) for τ at the hyperprior's median, with each
task's dense Hessian it passes (p = 0.49), with the per-token Gauss-Newton matrix too (0.74), and
Kronecker-factored (0.72), also with the Fisher from one drawn label per token (0.85); expanded
at the mode for τ at e^{loc ± 1.5} it still passes (0.44–0.85). With the Hessian's diagonal
alone it fails outright (every rank 0, τ at the grid's top): the final LayerNorm makes directions
of the adapter's output that the likelihood cannot see, and a diagonal counts every entry as
measured.

Tried and not kept (replications 0–3 against NUTS, or 20 replications): learned per-entry
centredness (``LocScaleReparam(None)``, centredness ends at 0.08–0.22) moves q(τ) little
(medians 6.7, 6.5, 4.6, 5.2 against NUTS's 5.3, 5.5, 3.7, 4.7); the exact posterior of τ given
:func:`~bora_pyro.guides.structured.conjugate_guide`'s fitted Gaussian evidence swings from
above to below NUTS's with where the evidence's sds start (medians 9.0 / 6.0 / 3.6 on
replication 1 for s starting at the default ≤ 0.01, at 3, at 10), while the ELBO differs by 0.2 nats: the
documents say little about most entries, and what the ELBO leaves unlearned there decides τ;
low-rank and full-rank Gaussian evidence changed little.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.reparam import LocScaleReparam

sys.path.insert(0, str(Path(__file__).resolve().parent))
from laplace_tau import grid_posterior_draws, laplace_log_evidence  # noqa: E402
from tiny_hierarchy import FixedAPrior, build_lm, fit_guide, mode_at_guide_tau, simulate  # noqa: E402

from bora_pyro import MultiTaskLM  # noqa: E402
from bora_pyro.data import Batch  # noqa: E402
from bora_pyro.guides import hybrid_guide, mean_field_guide  # noqa: E402
from bora_pyro.guides.laplace_tau import kronecker_curvature, laplace_tau  # noqa: E402
from bora_pyro.guides.structured import conjugate_guide  # noqa: E402
from bora_pyro.lora import AdaptedModule  # noqa: E402
from bora_pyro.models import BoRA  # noqa: E402
from bora_pyro.models.priors import site_name  # noqa: E402
from bora_pyro.precision import machine_description  # noqa: E402

TAU_LOC, TAU_SCALE = 1.4, 0.75  #: log τ ~ Normal(1.4, 0.75): τ's 90 % prior interval [1.2, 14]
GLOBAL_SCALE = 0.25
NUM_TASKS, DOCS_PER_TASK, DOC_LENGTH = 4, 40, 16
LORA_ALPHA = 1.0
NUM_DRAWS = 99  #: L: posterior draws of τ per replication, ranks 0..L
BINS = 10  #: the χ² test's bins of (L + 1) / BINS = 10 ranks each
ALPHA = 0.01  #: a guide passes the uniformity test at p ≥ ALPHA
LR, LOG_SCALE_LR, MAX_STEPS = 0.03, 0.05, 4000


def hyperprior() -> dist.LogNormal:
    return dist.LogNormal(TAU_LOC, TAU_SCALE)


class ReplicatedPrior:
    """R independent copies of ``FixedAPrior(hyperprior, global_scale, centered)`` in one program.

    In the plate ``replications`` of size R: τ [R] (site ``tau``) and Θ [R, out, r] (site
    ``global.<m>.lora_B``); task k of the model's tasks plate (R·D tasks) is task k mod D of
    replication ⌊k / D⌋, θ_k ~ Normal(Θ_{⌊k/D⌋}, τ_{⌊k/D⌋}^{-1/2}), in the parametrisation
    ``centered`` of :class:`FixedAPrior` (same sites, with batch shape [R·D]). The fixed A is the
    single prior's, so each replication's density is exactly ``FixedAPrior``'s.
    """

    def __init__(self, single: FixedAPrior, replications: int, tasks_per_replication: int):
        self.single, self.replications, self.tasks_per_replication = single, replications, tasks_per_replication

    def __call__(self, modules: Sequence[AdaptedModule], tasks: pyro.plate) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        device, centered = tasks.device, self.single.centered
        with pyro.plate("replications", self.replications, device=device):
            tau = self.single.precision(modules, device)[""]  # [R]
            globs = [pyro.sample(site_name("global", module.name, "lora_B"),
                                 dist.Normal(torch.zeros(module.shape_B, device=device),
                                             self.single.global_scale).to_event(2))
                     for module in modules]  # [R, out, r] each
        replication = torch.div(tasks.indices, self.tasks_per_replication, rounding_mode="floor")  # [K]
        scale = tau[replication].rsqrt()[:, None, None]  # [K, 1, 1]
        factors = {}
        for index, (module, glob) in enumerate(zip(modules, globs)):
            A = self.single.lora_A(module, index, device)
            loc = glob[replication]  # [K, out, r]
            name = site_name("task", module.name, "lora_B")
            if centered is False:
                with tasks:
                    B = loc + pyro.sample(f"{name}_offset", dist.Normal(torch.zeros_like(loc), scale).to_event(2))
            else:
                reparam = {} if centered is True else {name: LocScaleReparam(float(centered))}
                with poutine.reparam(config=reparam), tasks:
                    B = pyro.sample(name, dist.Normal(loc, scale).to_event(2))
            factors[module.name] = (A.expand(tasks.subsample_size, *A.shape), B)
        return factors

    def __repr__(self) -> str:
        return f"ReplicatedPrior({self.single!r}, replications={self.replications})"


class CachedTinyLM:
    """The tiny LM's likelihood of one fixed set of documents, with all that the adapter cannot
    change computed once; it stands in for the :class:`~bora_pyro.MultiTaskLM` inside
    :class:`~bora_pyro.models.BoRA` (``modules_spec``, ``device``, ``adapters()``,
    ``sequence_log_prob()``), so the model and the guides are the library's.

    The adapted module is the MLP output projection of the LM's last block (GPT-2), whose output
    reaches the logits through ``ln_f`` and ``lm_head`` only. For document n, token i, with x the
    projection's input [in] and h the block's output without adapter [out] (both fixed given the
    documents, computed once), task d's adapter gives

        logits_{n,i} = lm_head(ln_f(h_{n,i} + scaling · B_d A_d x_{n,i})),

    exactly what the full forward pass computes (``tests/test_sbc.py`` checks it), at a fraction of
    its cost: a step skips the embeddings, attention and the MLP's first half.

    Args:
        lm: the tiny LM with one adapted module, the last block's ``mlp.c_proj``.
        input_ids, attention_mask: [N, L] the documents (right-padded, as ``sequence_log_prob``).
    """

    def __init__(self, lm: MultiTaskLM, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        (name, layer), = lm.layers.items()
        blocks = lm.model.transformer.h
        if name != f"transformer.h.{len(blocks) - 1}.mlp.c_proj":
            raise ValueError(f"the cached likelihood needs the last block's mlp.c_proj adapted, not {name}")
        captured: dict[str, torch.Tensor] = {}
        hooks = [layer.register_forward_hook(lambda module, args, output: captured.update(inputs=args[0])),
                 blocks[-1].register_forward_hook(lambda module, args, output: captured.update(
                     hidden=output[0] if isinstance(output, tuple) else output))]
        try:
            with torch.no_grad(), lm.adapters_set({name: (None, None, None)}):
                lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        self.name, self.scaling = name, layer.scaling
        self.inputs, self.hidden = captured["inputs"], captured["hidden"]  # [N, L, in], [N, L, out]
        self.final_norm, self.head = lm.model.transformer.ln_f, lm.model.lm_head
        self.input_ids = input_ids
        self.targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)  # position i predicts token i+1
        self.predicted = torch.nn.functional.pad(attention_mask[:, 1:], (0, 1)).float()
        self.modules_spec, self.device = lm.modules_spec, lm.device
        self.factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @contextlib.contextmanager
    def adapters(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], row_tasks: torch.Tensor) -> Iterator[None]:
        """Within the block, row b uses task ``row_tasks[b]`` of ``factors`` (A [T, r, in], B [T, out, r])."""
        self.factors = (*factors[self.name], row_tasks)
        try:
            yield
        finally:
            self.factors = None

    def sequence_log_prob(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[N] each document's Σ_i log p(w_{i+1} | w_{≤i}) under the adapters set, as
        :meth:`MultiTaskLM.sequence_log_prob <bora_pyro.MultiTaskLM.sequence_log_prob>`; only
        for the documents given at construction."""
        if input_ids is not self.input_ids:
            raise ValueError("CachedTinyLM scores only the documents it was built for")
        A, B, row_tasks = self.factors
        A, B = A.index_select(0, row_tasks), B.index_select(0, row_tasks)  # [N, r, in], [N, out, r]
        hidden = torch.baddbmm(self.hidden, self.inputs @ A.transpose(1, 2), B.transpose(1, 2), alpha=self.scaling)
        logits = self.head(self.final_norm(hidden)).float()
        token_nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), self.targets.flatten(), reduction="none")
        return -(token_nll.view_as(self.predicted) * self.predicted).sum(-1)


@dataclass
class Chunk:
    """R simulated replications: their true τ [R] and all their documents as one full batch
    (replication r's task d is the model's task r·D + d)."""

    seeds: list[int]
    true_tau: torch.Tensor
    batch: Batch


def simulate_chunk(seeds: Sequence[int]) -> Chunk:
    """One replication per seed: τ, Θ, θ_d from the prior and documents from the tiny LM."""
    lm = build_lm(alpha=LORA_ALPHA)
    prior = FixedAPrior(hyperprior(), GLOBAL_SCALE, centered=False)
    taus, batches = [], []
    for seed in seeds:
        truth, batch = simulate(lm, prior, NUM_TASKS, DOCS_PER_TASK, DOC_LENGTH, seed)
        taus.append(truth["tau"])
        batches.append(batch)
    ids = torch.cat([batch.input_ids for batch in batches])
    task_ids = torch.cat([batch.task_ids + r * NUM_TASKS for r, batch in enumerate(batches)])
    return Chunk(list(seeds), torch.stack(taus), Batch(ids, torch.ones_like(ids), task_ids, torch.arange(len(ids)), len(ids)))


#: name → (the task factors' parametrisation, guide constructor): the guides compared.
GUIDES: dict[str, tuple[bool | float, Callable]] = {
    "hybrid_offsets": (False, hybrid_guide),
    "mean_field_offsets": (False, mean_field_guide),
    "mean_field_noncentred": (0.0, mean_field_guide),
    "conjugate_centred": (True, conjugate_guide),
}
#: Not a guide: τ's posterior by nested Laplace (``laplace_tau.py``), the exact reference that
#: shows what a calibrated posterior looks like on these replications.
REFERENCE = "laplace_grid"
#: Its grid of log τ: the hyperprior's loc ± 5 sd (the posterior lies well inside), 41 points.
LAPLACE_GRID = torch.linspace(TAU_LOC - 5 * TAU_SCALE, TAU_LOC + 5 * TAU_SCALE, 41, dtype=torch.float64)
#: The library's default for a learned τ: the default guide's fit (mean-field on decentred task
#: factors), then τ's posterior by the Laplace step of :mod:`bora_pyro.guides.laplace_tau` at the
#: MAP mode for τ fixed at the guide's median, each replication's from its own documents.
LAPLACE_STEP = "laplace_kfac"
#: What ``--guides`` may name: the guides, the Laplace step, and the reference (run only when named).
METHODS = [*GUIDES, LAPLACE_STEP, REFERENCE]
#: The guide the library fits for a learned τ (``HierarchicalNormal(centered=LEARNED_TAU_CENTERED)``
#: under ``learned_tau_guide``): mean-field on decentred task factors. Its own q(τ) fails (see the
#: module docstring) …
BASE_GUIDE = "mean_field_noncentred"
#: … and the library's default for a learned τ's posterior is the Laplace step at its median.
DEFAULT_GUIDE = LAPLACE_STEP


def fit_chunk(fit_name: str, chunk: Chunk, seed: int, rows: Sequence[str] = ()) -> list[dict]:
    """Fit ``fit_name`` (a guide, or the reference) to every replication of ``chunk`` (one
    program) and rank the true τ among ``NUM_DRAWS`` draws per replication of each method of
    ``rows`` (default ``[fit_name]``): the guide's q(τ), and for :data:`BASE_GUIDE` also
    :data:`LAPLACE_STEP`, the Laplace step after the same fit (at the MAP mode for its τ)."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    rows = list(rows) or [fit_name]
    replications = len(chunk.seeds)
    lm = CachedTinyLM(build_lm(alpha=LORA_ALPHA), chunk.batch.input_ids, chunk.batch.attention_mask)
    if fit_name == REFERENCE:
        draws, fit = laplace_draws(lm, chunk, seed)
        return [rank_row(REFERENCE, chunk, draws, fit, time.perf_counter() - start)]
    centered, make_guide = GUIDES[fit_name]
    prior = ReplicatedPrior(FixedAPrior(hyperprior(), GLOBAL_SCALE, centered=centered), replications, NUM_TASKS)
    model = BoRA(lm, prior, replications * NUM_TASKS)
    guide = make_guide(model)
    fit = fit_guide(model, guide, chunk.batch, MAX_STEPS, LR, LOG_SCALE_LR, tolerance=0.05 * replications).summary(100)
    results = []
    with torch.no_grad():
        if fit_name in rows:
            draws = torch.stack([guide(chunk.batch)["tau"] for _ in range(NUM_DRAWS)])  # [L, R]
            results.append(rank_row(fit_name, chunk, draws, fit, time.perf_counter() - start))
    if LAPLACE_STEP in rows:
        draws, step = laplace_step_draws(task_B_at_mode(model, guide, chunk), chunk, seed)
        results.append(rank_row(LAPLACE_STEP, chunk, draws, fit | {"laplace_step": step}, time.perf_counter() - start))
    return results


def task_B_at_mode(model: BoRA, guide, chunk: Chunk) -> torch.Tensor:
    """The task factors B [R·D, out, r] at :func:`~tiny_hierarchy.mode_at_guide_tau`, fitted like the guides."""
    factors = mode_at_guide_tau(model, guide, chunk.batch, 0, steps=MAX_STEPS, lr=LR, log_scale_lr=LOG_SCALE_LR,
                                tolerance=0.05 * len(chunk.seeds))
    return factors[model.lm.name][1]


def rank_row(name: str, chunk: Chunk, draws: torch.Tensor, fit: dict, seconds: float) -> dict:
    """The ranks of the true τ of ``chunk``'s replications among ``draws`` [L, R] of method ``name``,
    and the 90 % intervals' coverage and width."""
    log_draws = draws.log()
    low, high = torch.quantile(log_draws, torch.tensor([0.05, 0.95]), dim=0)
    true_log_tau = chunk.true_tau.log()
    return {
        "guide": name,
        "seeds": chunk.seeds,
        "ranks": (draws < chunk.true_tau).sum(0).tolist(),
        "true_tau": chunk.true_tau.tolist(),
        "posterior_median_tau": draws.median(0).values.tolist(),
        "width_90_log_tau": (high - low).tolist(),
        "covered_90": ((low <= true_log_tau) & (true_log_tau <= high)).tolist(),
        "fit": fit,
        "seconds": round(seconds, 1),
    }


def laplace_draws(lm: CachedTinyLM, chunk: Chunk, seed: int) -> tuple[torch.Tensor, dict]:
    """``NUM_DRAWS`` draws [L, R] of τ from its nested-Laplace posterior (``laplace_tau.py``) on
    ``LAPLACE_GRID``, for every replication of ``chunk``, and what the computation was."""
    start = time.perf_counter()
    module = lm.modules_spec[0]
    lora_A = FixedAPrior(hyperprior(), GLOBAL_SCALE).lora_A(module, 0, lm.device)
    num_tasks = len(chunk.seeds) * NUM_TASKS

    def log_likelihood(theta: torch.Tensor) -> torch.Tensor:  # [K, P] → [K]
        factors = {lm.name: (lora_A.expand(num_tasks, *lora_A.shape), theta.view(num_tasks, *module.shape_B))}
        with lm.adapters(factors, chunk.batch.task_ids):
            per_document = lm.sequence_log_prob(lm.input_ids, chunk.batch.attention_mask)
        return per_document.new_zeros(num_tasks).index_add(0, chunk.batch.task_ids, per_document)

    evidence, newton = laplace_log_evidence(log_likelihood, len(chunk.seeds), NUM_TASKS, math.prod(module.shape_B),
                                    GLOBAL_SCALE, LAPLACE_GRID)
    log_density = evidence + dist.Normal(TAU_LOC, TAU_SCALE).log_prob(LAPLACE_GRID)  # the hyperprior of u = log τ
    draws = grid_posterior_draws(log_density, LAPLACE_GRID, NUM_DRAWS, torch.Generator().manual_seed(seed))
    return draws.float(), {"grid_points": len(LAPLACE_GRID), "log_tau_range": [float(LAPLACE_GRID[0]), float(LAPLACE_GRID[-1])],
                           "newton_steps_max": max(newton["newton_steps"]), "unconverged": newton["unconverged"],
                           "not_a_maximum": newton["not_a_maximum"],
                           "seconds": round(time.perf_counter() - start, 1)}


def laplace_step_draws(task_B: torch.Tensor, chunk: Chunk, seed: int) -> tuple[torch.Tensor, dict]:
    """``NUM_DRAWS`` draws [L, R] of τ from the Laplace step (:func:`~bora_pyro.guides.laplace_tau.laplace_tau`)
    of each replication of ``chunk``, from its own documents, expanded at its tasks' ``task_B``
    rows ([R·D, out, r]: :func:`task_B_at_mode`), and the steps' grid and cost."""
    start = time.perf_counter()
    lm = build_lm(alpha=LORA_ALPHA)
    module = lm.modules_spec[0]
    lora_A = FixedAPrior(hyperprior(), GLOBAL_SCALE).lora_A(module, 0, lm.device)
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for replication in range(len(chunk.seeds)):
        tasks = slice(replication * NUM_TASKS, (replication + 1) * NUM_TASKS)
        rows = (chunk.batch.task_ids >= tasks.start) & (chunk.batch.task_ids < tasks.stop)
        ids = chunk.batch.input_ids[rows]
        batch = Batch(ids, torch.ones_like(ids), chunk.batch.task_ids[rows] - tasks.start, torch.arange(len(ids)), len(ids))
        factors = {module.name: (lora_A.expand(NUM_TASKS, *lora_A.shape), task_B[tasks])}
        curvature = kronecker_curvature(lm, factors, [batch], NUM_TASKS, generator=generator)
        posterior = laplace_tau(curvature, {"tau": (hyperprior(), [(module.name, "lora_B")])}, GLOBAL_SCALE)["tau"]
        draws.append(posterior.icdf(torch.rand(NUM_DRAWS, generator=generator, dtype=torch.float64)))
    return torch.stack(draws, 1), {"grid_points": len(posterior.log_tau_grid), "seconds": round(time.perf_counter() - start, 1)}


def nuts_check(seed: int) -> dict:
    """NUTS (``vi_vs_nuts.run_nuts``: 2 chains, 200 warmup + 250 draws each) on replication
    ``seed`` alone, its task factors decentred: the exact posterior's median and 90 % interval of
    τ, and the rank of the true τ among ``NUM_DRAWS`` of its draws (evenly thinned), to hold
    against each guide's rank on the same replication."""
    from vi_vs_nuts import Settings, run_nuts

    torch.set_num_threads(1)
    chunk = simulate_chunk([seed])
    lm = CachedTinyLM(build_lm(alpha=LORA_ALPHA), chunk.batch.input_ids, chunk.batch.attention_mask)
    model = BoRA(lm, FixedAPrior(hyperprior(), GLOBAL_SCALE, centered=0.0), NUM_TASKS)
    result = run_nuts(model, chunk.batch, Settings(chains=2, warmup=200, draws_per_chain=250, max_tree_depth=7, seed=seed))
    tau = result.pooled()["tau"]
    thinned = tau[torch.linspace(0, len(tau) - 1, NUM_DRAWS).round().long()]
    low, median, high = torch.quantile(tau, torch.tensor([0.05, 0.5, 0.95])).tolist()
    return {"seed": seed, "true_tau": float(chunk.true_tau[0]), "median": median, "ci90": [low, high],
            "rank": int((thinned < chunk.true_tau[0]).sum()), "rhat_max": result.diagnostics()["tau"]["rhat_max"],
            "seconds": round(result.seconds, 1)}


def chi_square_uniformity(ranks: Sequence[int], num_draws: int, bins: int) -> tuple[list[int], float, float]:
    """Counts of ``ranks`` ∈ {0..num_draws} in ``bins`` equal bins, Pearson's χ² statistic of
    uniformity and its p-value (df = bins − 1, from ``torch.distributions.Chi2``; 0.0 below float
    precision)."""
    if (num_draws + 1) % bins:
        raise ValueError(f"{num_draws + 1} ranks do not split into {bins} equal bins")
    counts = torch.bincount(torch.tensor(ranks) * bins // (num_draws + 1), minlength=bins).double()
    expected = len(ranks) / bins
    statistic = float(((counts - expected) ** 2 / expected).sum())
    p_value = 1.0 - float(torch.distributions.Chi2(torch.tensor(float(bins - 1), dtype=torch.float64)).cdf(
        torch.tensor(statistic, dtype=torch.float64)))
    return counts.long().tolist(), statistic, p_value


def parametrisation(name: str) -> str:
    """The parametrisation of ``name``'s task factors in words."""
    if name == REFERENCE:
        return "nested Laplace on a grid of log τ (no guide)"
    if name == LAPLACE_STEP:
        return f"the Laplace step on τ (K-FAC quadratic likelihood) at {BASE_GUIDE}'s median"
    return parametrisation_of(GUIDES[name][0])


def parametrisation_of(centered: bool | float) -> str:
    """The task factors' parametrisation in words (``centered`` as :class:`FixedAPrior` takes it)."""
    if isinstance(centered, bool):
        return "centred" if centered else "offsets"
    return f"LocScaleReparam({centered:g})"


def summarise(results: list[dict], replications: int) -> dict:
    """Per guide: ranks in seed order, the χ² test, the 90 % intervals' coverage and width, the fits."""
    summary = {}
    for name in dict.fromkeys(result["guide"] for result in results):
        chunks = sorted((result for result in results if result["guide"] == name), key=lambda result: result["seeds"][0])
        column = {key: [value for chunk in chunks for value in chunk[key]]
                  for key in ("ranks", "true_tau", "posterior_median_tau", "width_90_log_tau", "covered_90")}
        counts, statistic, p_value = chi_square_uniformity(column["ranks"], NUM_DRAWS, BINS)
        summary[name] = {
            "ranks": column["ranks"],
            "num_draws": NUM_DRAWS,
            "p_value": p_value,
            "chi_square": statistic,
            "passes": p_value >= ALPHA,
            "bin_counts": counts,
            "coverage_90": sum(column["covered_90"]) / replications,
            "mean_width_90_log_tau": sum(column["width_90_log_tau"]) / replications,
            "mean_log_ratio_median_to_true": sum(math.log(m / t) for m, t in zip(column["posterior_median_tau"], column["true_tau"]))
            / replications,
            "parametrisation": parametrisation(name),
            "fits": [chunk["fit"] for chunk in chunks],
        }
    return summary


def plot(summary: dict, replications: int, path: str) -> None:
    """One rank histogram per guide (``BINS`` bins), with the expected count and the central 99 %
    band of a bin's count under uniformity (Binomial(R, 1/BINS))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    expected = replications / BINS
    band = torch.distributions.Binomial(replications, torch.tensor(1 / BINS))
    support = torch.arange(replications + 1, dtype=torch.float64)
    cdf = band.log_prob(support).exp().cumsum(0)
    low, high = int((cdf < 0.005).sum()), int((cdf < 0.995).sum())
    figure, axes = plt.subplots(1, len(summary), figsize=(3.2 * len(summary), 3.0), sharey=True, squeeze=False)
    for axis, (name, row) in zip(axes[0], summary.items()):
        axis.axhspan(low, high, color="0.85", label="99 % band")
        axis.axhline(expected, color="0.4", lw=1)
        axis.bar(range(BINS), row["bin_counts"], width=0.9, color="tab:blue" if row["passes"] else "tab:red")
        axis.set_title(f"{name}\np = {row['p_value']:.2g}, cover {row['coverage_90']:.0%}", fontsize=8)
        axis.set_xticks(range(BINS), [f"{b * (NUM_DRAWS + 1) // BINS}" for b in range(BINS)], fontsize=6)
        axis.set_xlabel(f"rank of true τ among {NUM_DRAWS} draws (bin start)", fontsize=7)
    axes[0][0].set_ylabel(f"replications (of {replications})", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--png", help="write the rank histograms here")
    parser.add_argument("--replications", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=50, help="replications fitted as one program")
    parser.add_argument("--workers", type=int, default=2, help="processes (one thread each)")
    parser.add_argument("--guides", nargs="+", default=[*GUIDES, LAPLACE_STEP], choices=METHODS)
    parser.add_argument("--nuts", type=int, default=0, help="also run NUTS on the first N replications")
    parser.add_argument("--update", action="store_true",
                        help="keep the other guides' rows (and NUTS's, without --nuts) of the --json file")
    args = parser.parse_args(argv)
    if args.update and args.json and Path(args.json).exists():  # before the fits, not after them
        kept = json.loads(Path(args.json).read_text())["replications"]
        if kept != args.replications:
            raise SystemExit(f"--update: {args.json} holds {kept} replications, this run {args.replications}; "
                             "rerun every guide instead")
    start = time.perf_counter()
    seeds = [list(range(first, min(first + args.chunk, args.replications)))
             for first in range(0, args.replications, args.chunk)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers) as pool:
        chunks = pool.map(simulate_chunk, seeds)
        print(f"{time.perf_counter() - start:5.0f} s  {args.replications} replications simulated", flush=True)
        fits: dict[str, list[str]] = {}  # what is fitted → the rows it gives (the Laplace step: its base guide's fit)
        for name in args.guides:
            fits.setdefault(BASE_GUIDE if name == LAPLACE_STEP else name, []).append(name)
        jobs = [(name, chunk, index, rows) for name, rows in fits.items() for index, chunk in enumerate(chunks)]
        results = []
        for chunk_results in pool.imap_unordered(fit_job, jobs):
            results += chunk_results
            for result in chunk_results:
                print(f"{time.perf_counter() - start:5.0f} s  {result['guide']}: replications {result['seeds'][0]}–"
                      f"{result['seeds'][-1]} done ({result['fit'].get('steps', 'no')} steps, {result['seconds']:.0f} s)",
                      flush=True)
        nuts = pool.map(nuts_check, range(args.nuts))
    summary = summarise(results, args.replications)
    ran = {"guides": list(args.guides), "nuts": bool(nuts), "seconds": round(time.perf_counter() - start, 1),
           "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    runs = [ran]
    if args.update and args.json and Path(args.json).exists():
        previous = json.loads(Path(args.json).read_text())
        summary = {name: row for name, row in previous["guides"].items() if name not in summary} | summary
        nuts = nuts or previous.get("nuts_check", [])
        runs = previous.get("runs", [{"guides": list(previous["guides"]), "seconds": previous["seconds"]}]) + runs
    summary = {name: summary[name] for name in METHODS if name in summary}
    for check in nuts:
        check["guide_ranks"] = {name: row["ranks"][check["seed"]] for name, row in summary.items()}
    report = {
        "replications": args.replications,
        "default_guide": DEFAULT_GUIDE,
        "guides": summary,
        "uniformity_test": f"Pearson χ² over {BINS} equal bins of the ranks 0..{NUM_DRAWS} "
                           f"({(NUM_DRAWS + 1) // BINS} ranks a bin), df = {BINS - 1}, p from "
                           f"torch.distributions.Chi2; a guide passes at p ≥ {ALPHA}",
        "passing": [name for name, row in summary.items() if row["passes"]],
        "nuts_check": nuts,
        "runs": runs,
        "settings": {"tasks": NUM_TASKS, "docs_per_task": DOCS_PER_TASK, "doc_length": DOC_LENGTH,
                     "lora_alpha": LORA_ALPHA, "rank": 2, "tau_prior": f"LogNormal({TAU_LOC}, {TAU_SCALE})",
                     "global_scale": GLOBAL_SCALE, "lr": LR, "log_scale_lr": LOG_SCALE_LR, "max_steps": MAX_STEPS,
                     "chunk": args.chunk, "workers": args.workers},
        "machine": {**machine_description(), "platform": platform.platform()},
        "seconds": sum(run["seconds"] for run in runs),
    }
    for name, row in summary.items():
        print(f"{name:24s} p = {row['p_value']:.3g} ({'passes' if row['passes'] else 'fails'}), 90 % coverage "
              f"{row['coverage_90']:.2f}, width of log τ {row['mean_width_90_log_tau']:.2f}, bins {row['bin_counts']}")
    for check in nuts:
        print(f"NUTS on replication {check['seed']}: true τ {check['true_tau']:.3g}, median {check['median']:.3g}, "
              f"rank {check['rank']} (R-hat {check['rhat_max']:.3f}); the guides' ranks {check['guide_ranks']}")
    print(f"{report['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.png:
        plot(summary, args.replications, args.png)
    return report


def fit_job(job: tuple[str, Chunk, int, list[str]]) -> list[dict]:
    """``fit_chunk`` of one (fit, chunk, chunk index, rows) job: the fit's seed is the chunk index."""
    name, chunk, index, rows = job
    return fit_chunk(name, chunk, seed=index, rows=rows)


if __name__ == "__main__":
    main()

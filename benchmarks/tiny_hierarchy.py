"""A BoRA model small enough for exact inference (NUTS), and data simulated from it.

The model: a random one-layer GPT-2 (vocabulary 16, width 16) adapted at its MLP output
projection ``transformer.h.0.mlp.c_proj`` (64 → 16) with rank ``r``, so that one task's
adapter is B_d ∈ R^{16×r} on top of a fixed A ∈ R^{r×64} (see :class:`FixedAPrior`):

    Θ ~ Normal(0, global_scale)                 [16, r]   site global.<m>.lora_B
    τ ~ LogNormal(tau_loc, tau_scale)           scalar    site tau
    θ_d ~ Normal(Θ, τ^{-1/2}),  d = 1..D        [D, 16, r]
    doc n of task d: w_{n,1} = 0 (BOS), w_{n,i+1} ~ LM(· | w_{n,1:i}; A, θ_d)

With D = 4 and r = 2 that is 4·32 + 32 + 1 = 161 latent numbers. :func:`simulate` draws
(τ, Θ, θ_d) from the prior and the documents from the adapted LM (ancestral sampling), so the
model is exactly the data's generating process; :func:`fit_guide` is a full-batch SVI loop that
stops when the ELBO is flat. Used by ``benchmarks/vi_vs_nuts.py`` (guides against NUTS) and the
simulation-based calibration benchmark.

API (stable): ``build_lm(seed)``, ``FixedAPrior``, ``simulate(lm, prior, num_tasks,
docs_per_task, doc_length, seed)``, ``fit_guide(model, guide, batch, steps, lr, log_scale_lr)``,
``FitTrace``, ``mode_at_guide_tau(model, guide, batch, seed, **fit)``, ``MODULE``, ``BOS``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.reparam import LocScaleReparam
from transformers import GPT2Config, GPT2LMHeadModel

from bora_pyro import MultiTaskLM
from bora_pyro.data import Batch
from bora_pyro.fit import optimizer_groups
from bora_pyro.guides import LoRAInit, TaskwiseDelta
from bora_pyro.lora import AdaptedModule, kaiming_uniform_A
from bora_pyro.models.priors import Precision, TauValue, check_scale, site_name

#: The adapted module: the MLP's output projection, which writes straight into the residual
#: stream that the (tied) output embedding reads, so the logits depend strongly on its adapter.
MODULE = "transformer.h.0.mlp.c_proj"
#: Every document's first token (the LM's BOS = EOS token).
BOS = 0
VOCAB_SIZE = 16


def build_lm(seed: int = 0, rank: int = 2, alpha: float = 16.0) -> MultiTaskLM:
    """A random one-layer GPT-2 (vocabulary 16, 32 positions, width 16, 2 heads), frozen, in
    eval mode, with rank-``rank`` LoRA at :data:`MODULE` scaled by ``alpha / rank``.

    ``initializer_range=0.2`` (not GPT-2's 0.02): with tiny tied embeddings of sd 0.02 the logits
    stay within ~±0.6 and no adapter could make the predictions peaked.
    """
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=BOS, eos_token_id=BOS, initializer_range=0.2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return MultiTaskLM(model.eval(), rank=rank, alpha=alpha, target_modules=[MODULE])


class FixedAPrior:
    """BoRA's hierarchical Normal prior over ``lora_B`` only; ``lora_A`` is a fixed constant.

    For every adapted module m (shapes from :class:`~bora_pyro.lora.AdaptedModule`):

        A = kaiming-uniform draw from ``seed``         [r, in], not a sample site
        Θ ~ Normal(0, global_scale)                    [out, r], site ``global.<m>.lora_B``
        τ ~ tau (a hyperprior: latent site ``tau``; a float: fixed)
        θ_d ~ Normal(Θ, τ^{-1/2}) entrywise            [K, out, r], d in the tasks plate

    Why A is fixed: with both factors latent the likelihood depends on them through B·A only, so
    (A, B) → (−A, −B) (and, per rank component, any sign flip) maps a posterior draw to another
    of equal density. The posterior then has 2^r symmetric modes; NUTS chains settle in
    different ones, their between-chain variance is that of the modes, and R-hat is meaningless
    (and any one chain's mean is not the posterior mean, which is 0 by symmetry). With A fixed the
    likelihood is linear in B inside the layer and no symmetry is left: the posterior has one
    mode, NUTS's chains agree (R-hat ≈ 1) and exact inference is a reference.

    Sites follow the prior contract (:mod:`bora_pyro.models.priors`), so the library's guides
    handle them: ``lora_B`` sites start at 0, ``tau`` is a hyperparameter.

    Args:
        tau: the precision of the task factors: a hyperprior over (0, ∞) such as
            ``dist.LogNormal(1.4, 0.75)`` (latent site ``tau``) or a float (fixed; what
            :func:`~bora_pyro.guides.map_guide` needs).
        global_scale: prior sd of Θ.
        centered: the parametrisation of the task factors (the model is the same):
            ``True`` samples θ_d at ``task.<m>.lora_B``; ``False`` samples the offsets
            δ_d = θ_d − Θ ~ Normal(0, τ^{-1/2}) at ``task.<m>.lora_B_offset``; a float c in [0, 1]
            applies ``LocScaleReparam(c)`` at ``task.<m>.lora_B_decentered`` (0.0: z ~ Normal(0, 1),
            θ_d = Θ + τ^{-1/2}·z, no funnel between τ and the tasks).
        seed: seeds the fixed A of each module (module k of the list gets ``seed + k``).
    """

    def __init__(self, tau: TauValue, global_scale: float = 1.0, centered: bool | float = False, seed: int = 0):
        check_scale("global_scale", global_scale, allow_none=False)
        self.precision = Precision(tau)
        self.global_scale, self.centered, self.seed = global_scale, centered, seed

    def lora_A(self, module: AdaptedModule, index: int, device: torch.device) -> torch.Tensor:
        """The fixed A [r, in] of the ``index``-th module: peft's kaiming-uniform draw, U(±1/sqrt(in))."""
        return kaiming_uniform_A(module.shape_A, torch.Generator().manual_seed(self.seed + index)).to(device)

    def __call__(self, modules: Sequence[AdaptedModule], tasks: pyro.plate) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        tau = self.precision(modules, tasks.device)[""]
        factors = {}
        for index, module in enumerate(modules):
            A = self.lora_A(module, index, tasks.device)
            zeros = torch.zeros(module.shape_B, device=tasks.device)
            glob = pyro.sample(site_name("global", module.name, "lora_B"), dist.Normal(zeros, self.global_scale).to_event(2))
            name = site_name("task", module.name, "lora_B")
            if self.centered is False:
                with tasks:
                    B = glob + pyro.sample(f"{name}_offset", dist.Normal(torch.zeros_like(glob), tau**-0.5).to_event(2))
            else:
                reparam = {} if self.centered is True else {name: LocScaleReparam(float(self.centered))}
                with poutine.reparam(config=reparam), tasks:  # reparam outside the plate: it sees the [K] batch
                    B = pyro.sample(name, dist.Normal(glob, tau**-0.5).to_event(2))
            factors[module.name] = (A.expand(tasks.subsample_size, *A.shape), B)
        return factors

    def __repr__(self) -> str:
        return (f"FixedAPrior(tau={self.precision.describe()}, global_scale={self.global_scale}, "
                f"centered={self.centered}, seed={self.seed})")


@torch.no_grad()
def sample_documents(lm: MultiTaskLM, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], row_tasks: torch.Tensor,
                     doc_length: int, generator: torch.Generator) -> torch.Tensor:
    """Ancestral sampling: row b starts at :data:`BOS` and continues, token by token, from the LM
    with task ``row_tasks[b]``'s factors; [len(row_tasks), doc_length] long."""
    ids = torch.full((len(row_tasks), 1), BOS, dtype=torch.long, device=lm.device)
    with lm.adapters(factors, row_tasks):
        for _ in range(doc_length - 1):
            logits = lm(ids, use_cache=False).logits[:, -1].float()  # [N, vocab]
            ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=generator)], dim=1)
    return ids


def simulate(lm: MultiTaskLM, prior, num_tasks: int, docs_per_task: int, doc_length: int,
             seed: int) -> tuple[dict[str, torch.Tensor], Batch]:
    """Draw the latent sites from ``prior`` and documents from the adapted LM.

    Returns:
        ``true_values``: every latent site of the prior by name (``tau``, ``global.<m>.lora_B``,
        the task site(s)), plus ``task_factors.<m>`` = θ_d [D, out, r], the task B factors;
        ``batch``: all D·docs_per_task documents ([N, doc_length], task d's rows consecutive) as
        one :class:`~bora_pyro.data.Batch` without ``task_sizes``, so that ``BoRA`` scores them
        under the full plate of D tasks: the exact (full-batch) likelihood.
    """
    with torch.random.fork_rng():  # Pyro draws from torch's global generator: seeded here, restored after
        torch.manual_seed(seed)
        trace = poutine.trace(prior).get_trace(lm.modules_spec, pyro.plate("tasks", num_tasks, device=lm.device))
    factors = trace.nodes["_RETURN"]["value"]
    true_values = {name: site["value"].detach() for name, site in trace.iter_stochastic_nodes()}
    true_values |= {f"task_factors.{name}": B.detach() for name, (_, B) in factors.items()}
    task_ids = torch.arange(num_tasks, device=lm.device).repeat_interleave(docs_per_task)
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    input_ids = sample_documents(lm, {name: (A.detach(), B.detach()) for name, (A, B) in factors.items()},
                                 task_ids, doc_length, generator)
    batch = Batch(input_ids, torch.ones_like(input_ids), task_ids, torch.arange(len(task_ids), device=lm.device),
                  len(task_ids))
    return true_values, batch


@dataclass
class FitTrace:
    """What :func:`fit_guide` did: the loss (−ELBO, nats) of every step, the steps run, whether it
    stopped on a flat ELBO (else at the step cap), the learning-rate decays and the time taken."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    converged: bool = False
    decays: int = 0
    seconds: float = 0.0

    def summary(self, window: int) -> dict:
        """JSON-ready: steps, converged, decays, seconds and the mean loss over the last ``window`` steps."""
        last = self.losses[-window:]
        return {"steps": self.steps, "converged": self.converged, "lr_decays": self.decays,
                "seconds": round(self.seconds, 2), "final_loss": sum(last) / max(len(last), 1)}


def fit_guide(model, guide, batch: Batch, steps: int, lr: float, log_scale_lr: float, window: int = 200,
              tolerance: float = 0.05, max_decays: int = 4, num_particles: int = 1) -> FitTrace:
    """Full-batch SVI: Adam on ``Trace_ELBO`` (the library's optimizer groups: factor locations at
    ``lr``, log-scales and τ's parameters at ``log_scale_lr``) until the ELBO is flat.

    Flat: the mean loss over the last ``window`` steps is not below the previous window's by more
    than ``max(tolerance, 2·standard error of the difference)`` nats. Each time it is flat, every
    learning rate is halved (Adam's iterates at a fixed lr jitter around the optimum by about lr:
    halving shrinks the jitter); the fit stops converged at the flat window after ``max_decays``
    halvings, or at ``steps`` (then ``converged`` is False).
    """
    start = time.perf_counter()
    elbo = Trace_ELBO(num_particles=num_particles)
    guide(batch)  # creates the guide's parameters
    optimizer = torch.optim.Adam(optimizer_groups(guide, lr, log_scale_lr, 0.0))
    trace, previous = FitTrace(), None
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = elbo.differentiable_loss(model, guide, batch)
        loss.backward()
        optimizer.step()
        trace.losses.append(loss.item())
        if step % window:
            continue
        current = torch.tensor(trace.losses[-window:], dtype=torch.float64)
        if previous is not None:
            drop = float(previous.mean() - current.mean())
            noise = 2 * math.sqrt(float(previous.var() + current.var()) / window)
            if drop <= max(tolerance, noise):
                if trace.decays == max_decays:
                    trace.converged = True
                    break
                trace.decays += 1
                for group in optimizer.param_groups:
                    group["lr"] /= 2
        previous = current
    trace.steps, trace.seconds = len(trace.losses), time.perf_counter() - start
    return trace


def mode_at_guide_tau(model, guide, batch: Batch, seed: int, **fit) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The task factors {module: (A, B)} at the MAP with τ fixed at the fitted ``guide``'s median:
    the mode :func:`~bora_pyro.guides.laplace_tau.fit_tau_posterior` expands at (Laplace's method
    needs a mode; an early-stopped guide's means are not one). That function takes the library's
    priors only; this one any ``model`` whose τ site is ``tau``. ``fit``: :func:`fit_guide`'s
    settings (``steps``, ``lr``, ``log_scale_lr``, …)."""
    with torch.no_grad():
        taus = {"tau": guide.median()["tau"].detach()}
    fixed = poutine.condition(model, data=taus)
    mode = TaskwiseDelta(fixed, init_loc_fn=LoRAInit(seed, model.lm.modules_spec), create_plates=model.tasks_plate)
    fit_guide(fixed, mode, batch, **fit)
    with torch.no_grad():
        return model.task_factors(mode.median() | taus)

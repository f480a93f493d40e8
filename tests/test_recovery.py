"""Recovery of a learned τ on data simulated from the model itself.

Θ and the task adapters are drawn with a known τ* on a tiny random GPT-2, text is generated per
task from its adapter, and the model is refitted with τ latent under a broad hyperprior: the
posterior median of τ must lie within a factor of 3 of τ*, for two τ* 100× apart.

Identifiability. The likelihood sees a task only through ``B_d A_d``: (A, B) → (cA, B/c) rescales
the spread of the factors, hence τ, without changing the data. So the simulated adapters differ
in B only, around a global B: ``HierarchicalNormal({"A": inf, "B": hyperprior}, tau_per="factor")``
(A shared, one learned τ for B), and the shared A is known (the model is conditioned on it). The
adapted module is the last MLP projection, whose output reaches the logits through one LayerNorm;
Θ and the adapters are kept small next to the residual stream so that the LayerNorm does not
erase their scale, and large enough that 1,150 tokens per task inform each entry of B_d.

Fitting: the recommended setting for a learned τ — ``LocScaleReparam(centered=0)`` task factors,
:func:`hybrid_guide` (MAP Θ, mean-field tasks and τ) with an ``init_scale`` near the posterior
spread of the task factors (the default 1e-3 leaves the variational scales too small to converge
in 300 steps, and τ then drifts), and τ's own learning rate through :func:`param_groups`.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from bora_pyro import MultiTaskLM
from bora_pyro.data import Batch
from bora_pyro.guides import hybrid_guide, param_groups
from bora_pyro.models import BoRA, HierarchicalNormal

TASKS, DOCS, LENGTH, RANK, ALPHA = 4, 200, 24, 2, 4.0
HYPERPRIOR = dist.LogNormal(math.log(30.0), 2.0)  # the same for both τ*: 95 % of its mass in [0.6, 1500]
STEPS, LR, TAU_LR, INIT_SCALE = 300, 0.05, 0.1, 0.03


def simulate(lm, prior, known: dict, tau: float, seed: int) -> torch.Tensor:
    """Draw the prior's sites given τ and the known values, then ``DOCS`` documents per task from
    the adapted LM: [TASKS·DOCS, LENGTH] token ids (the first token uniform, not scored)."""
    pyro.set_rng_seed(seed)
    model = BoRA(lm, prior, TASKS)
    factors = poutine.condition(prior, known | {"tau.B": torch.tensor(tau)})(lm.modules_spec, model.tasks_plate())
    task_ids = torch.arange(TASKS).repeat_interleave(DOCS)
    ids = torch.randint(2, lm.model.config.vocab_size, (len(task_ids), 1))
    with torch.no_grad(), lm.adapters(factors, task_ids):
        for _ in range(LENGTH - 1):
            logits = lm(ids).logits[:, -1]
            ids = torch.cat([ids, torch.distributions.Categorical(logits=logits).sample()[:, None]], 1)
    return ids


@pytest.mark.parametrize("tau_true", [3.0, 300.0])
def test_learned_tau_recovers_the_true_precision(gpt2_dir, one_thread, tau_true):
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=RANK, alpha=ALPHA, target_modules=["transformer.h.1.mlp.c_proj"])
    spec = lm.modules_spec[0]
    prior = HierarchicalNormal({"A": math.inf, "B": HYPERPRIOR}, tau_per="factor", global_scale=0.1, centered=0.0)
    torch.manual_seed(1)
    known = {f"global.{spec.name}.lora_A": 0.1 * torch.randn(spec.shape_A)}  # the shared A, known
    ids = simulate(lm, prior, known, tau_true, seed=1)
    batch = Batch(ids, torch.ones_like(ids), torch.arange(TASKS).repeat_interleave(DOCS), torch.arange(len(ids)),
                  len(ids))

    # MAP for Θ_B, mean-field for the tasks' z and τ; one full batch per step, lr decaying 50×
    model = BoRA(lm, poutine.condition(prior, known), TASKS)
    guide = hybrid_guide(model, init_scale=INIT_SCALE)
    guide(batch)
    optimizer = torch.optim.Adam(param_groups(guide, LR, TAU_LR))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.02 ** (step / STEPS))
    for _ in range(STEPS):
        loss = Trace_ELBO().differentiable_loss(model, guide, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    low, median, high = (float(q) for q in guide[1].quantiles([0.05, 0.5, 0.95])["tau.B"])
    print(f"τ* = {tau_true:g}: posterior median {median:.3g}, 90 % interval [{low:.3g}, {high:.3g}]")
    assert tau_true / 3 < median < 3 * tau_true

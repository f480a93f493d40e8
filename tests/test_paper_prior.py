"""The published code's objective: RadialLaplace's density and draws, PaperNormPrior's contract and
MAP fit, the per-task likelihood weights, and the τ that a τ_p acts like."""

import math

import pyro
import pytest
import torch
from pyro import poutine

from bora_pyro import MultiTaskCorpus, MultiTaskLM, load_tokenizer
from bora_pyro.errors import ConfigError
from bora_pyro.guides import map_guide
from bora_pyro.models import (
    BoRA, PaperNormPrior, RadialLaplace, equivalent_tau, hyperparameter_sites, paper_task_weights, shared_sites,
)
from bora_pyro.packing import FactorLayout
from conftest import synthetic_records


@pytest.fixture
def setup(gpt2_dir):
    """A tiny GPT-2 with two adapted modules, 3 tasks of 3 training documents, a batch of one
    document per task (so every task's TaskSubsample weight is (9/3)·1/3 = 1)."""
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4, target_modules=["c_attn"])
    records = synthetic_records(num_tasks=3, docs_per_task=6)
    corpus = MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir), test_size=0.5)
    return lm, corpus, corpus.train.collate([0, 4, 7], corpus.pad_token_id)


@pytest.mark.parametrize("size", [1, 2])
def test_density_integrates_to_one(size):
    """∫ exp(log_prob) over a grid around an off-origin loc: 1 for P = 1 and 2."""
    rate, step, half_width = 1.7, 0.05 if size == 2 else 1e-3, 16.0  # Riemann sums within ~2e-5 of 1
    loc = torch.tensor([0.3, -0.2], dtype=torch.float64)[:size]
    axis = torch.arange(-half_width, half_width + step / 2, step, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[axis] * size, indexing="ij"), -1).reshape(-1, size)
    density = RadialLaplace(loc, rate).log_prob(grid).exp()
    assert float(density.sum() * step**size) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("size, sphere, gamma", [(3, 4 * math.pi, 2.0), (4, 2 * math.pi**2, 6.0)])
def test_density_at_its_centre_by_hand(size, sphere, gamma):
    """p(loc) = λ^P / (S_P Γ(P)), the sphere's area S_3 = 4π, S_4 = 2π² written out: here Γ(P) ≠ 1,
    which P = 1, 2 cannot tell."""
    rate = 2.5
    loc = torch.randn(size, dtype=torch.float64)
    expected = size * math.log(rate) - math.log(sphere * gamma)
    assert float(RadialLaplace(loc, rate).log_prob(loc)) == pytest.approx(expected, rel=1e-12)


def test_draws_have_gamma_radius_uniform_direction_and_the_stated_moments():
    size, rate = 5, torch.tensor([0.5, 2.0, 10.0])
    loc = torch.randn(3, size)
    distribution = RadialLaplace(loc, rate)
    draws = distribution.sample((40000,))
    assert draws.shape == (40000, 3, size)
    radius = torch.linalg.vector_norm(draws - loc, dim=-1)
    torch.testing.assert_close(radius.mean(0), size / rate, rtol=0.01, atol=0)  # Gamma(P, λ): mean P/λ
    torch.testing.assert_close(radius.var(0), size / rate**2, rtol=0.05, atol=0)  # variance P/λ²
    direction = (draws - loc) / radius.unsqueeze(-1)
    assert float(direction.mean(0).abs().max()) < 0.02
    torch.testing.assert_close(draws.var(0), distribution.variance, rtol=0.05, atol=0)
    torch.testing.assert_close(draws.mean(0), distribution.mean, rtol=0, atol=0.05 / rate.min().item())


def test_batch_shapes_and_the_gradient_at_the_centre():
    """A [K] batch by the plate's expand; at x = loc the norm's gradient is 0, not nan; draws are
    reparametrised in loc."""
    loc = torch.zeros(6)
    distribution = RadialLaplace(loc, 3.0).expand([4])
    assert distribution.batch_shape == (4,) and distribution.event_shape == (6,)
    value = torch.zeros(4, 6, requires_grad=True)
    log_prob = distribution.log_prob(value)
    assert log_prob.shape == (4,)
    log_prob.sum().backward()
    assert torch.equal(value.grad, torch.zeros(4, 6))
    loc = torch.ones(6, requires_grad=True)
    RadialLaplace(loc, 3.0).rsample((2,)).sum().backward()
    assert torch.equal(loc.grad, torch.full((6,), 2.0))


def test_prior_follows_the_contract(setup):
    """Sites ``global.lora`` [P] and ``task.lora_offset`` [K, P] in the tasks plate, no
    hyperparameters, θ_d = Θ + δ_d, and a log-joint share of −τ_p Σ_d ‖δ_d‖ − D log Z."""
    lm, corpus, batch = setup
    prior, modules, tau_p = PaperNormPrior(30.0), lm.modules_spec, 30.0
    model = BoRA(lm, prior, corpus.num_tasks)
    size = FactorLayout(modules).size
    trace = poutine.trace(model).get_trace(batch)
    assert trace.nodes["global.lora"]["value"].shape == (size,)
    offsets = trace.nodes["task.lora_offset"]
    assert offsets["value"].shape == (3, size) and [f.name for f in offsets["cond_indep_stack"]] == ["tasks"]
    assert hyperparameter_sites(prior, modules, model.tasks_plate()) == []
    assert shared_sites(prior, modules, model.tasks_plate()) == ["global.lora"]

    values = {"global.lora": 0.1 * torch.randn(size), "task.lora_offset": 0.01 * torch.randn(3, size)}
    factors = model.task_factors(values)
    expected = FactorLayout(modules).unpack(values["global.lora"] + values["task.lora_offset"])
    for name, (A, B) in factors.items():
        torch.testing.assert_close(A, expected[name][0])
        torch.testing.assert_close(B, expected[name][1])

    log_z = math.log(2) + size / 2 * math.log(math.pi) - math.lgamma(size / 2) + math.lgamma(size) - size * math.log(tau_p)
    distances = torch.linalg.vector_norm(values["task.lora_offset"].double(), dim=-1)
    trace = poutine.trace(poutine.condition(model, values)).get_trace(batch)
    prior_share = trace.log_prob_sum(lambda name, site: name != "log_likelihood")
    assert float(prior_share) == pytest.approx(float(-tau_p * distances.sum()) - 3 * log_z, rel=1e-6)


def test_map_fit_starts_at_the_base_model_and_stays_finite(setup):
    """Offsets start at exactly 0 (the norm's kink): the first gradients are finite, and the
    likelihood moves the offsets off 0."""
    lm, corpus, batch = setup
    model = BoRA(lm, PaperNormPrior(10.0), corpus.num_tasks, task_weights=paper_task_weights(corpus))
    guide = map_guide(model)
    guide(batch)
    assert not guide.median()["task.lora_offset"].any()
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-2)
    for _ in range(5):
        loss = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, batch)
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in guide.parameters() if p.grad is not None)
        optimizer.step()
    assert torch.isfinite(loss)
    offsets = guide.median()["task.lora_offset"]
    assert torch.isfinite(offsets).all() and (offsets.norm(dim=-1) > 0).all()


def test_task_weights_multiply_each_documents_term_only(setup):
    """The factor's log-density is each document's log-likelihood × its task's weight; the
    returned log-likelihoods (fit's training perplexity) are the unweighted ones."""
    lm, corpus, batch = setup
    weights = torch.tensor([0.5, 2.0, 3.0])
    size = FactorLayout(lm.modules_spec).size
    values = {"global.lora": 0.1 * torch.randn(size), "task.lora_offset": 0.01 * torch.randn(3, size)}
    plain, weighted = (poutine.trace(poutine.condition(BoRA(lm, PaperNormPrior(30.0), 3, task_weights=w), values))
                       .get_trace(batch) for w in (None, weights))
    plain.compute_log_prob()
    weighted.compute_log_prob()
    assert batch.task_ids.tolist() == [0, 1, 2]
    torch.testing.assert_close(weighted.nodes["log_likelihood"]["log_prob"],
                               plain.nodes["log_likelihood"]["log_prob"] * weights)
    torch.testing.assert_close(weighted.nodes["_RETURN"]["value"], plain.nodes["_RETURN"]["value"])


def test_new_tasks_take_their_own_weights(setup):
    lm, corpus, _ = setup
    model = BoRA(lm, PaperNormPrior(30.0), 3, task_weights=torch.tensor([0.5, 2.0, 3.0]))
    values = {"global.lora": torch.zeros(FactorLayout(lm.modules_spec).size)}
    assert model.for_new_tasks(values, 2).task_weights is None
    assert model.for_new_tasks(values, 2, torch.tensor([0.1, 0.2])).task_weights.tolist() == pytest.approx([0.1, 0.2])
    with pytest.raises(ConfigError, match=r"shape \(2,\)"):
        model.for_new_tasks(values, 2, torch.tensor([0.1, 0.2, 0.3]))


def test_paper_task_weights_are_one_over_mean_predicted_tokens(gpt2_dir):
    """Tasks with documents of 3 and 5 words, 7 words, and 1, 2, 3 words: each document predicts
    its words (n tokens with EOS, n − 1 predicted), so 1/L̄ = 1/4, 1/7, 1/2, also as the batches count."""
    texts = {"a": ["w1 w2 w3", "w1 w2 w3 w4 w5"], "b": ["w1 w2 w3 w4 w5 w6 w7"], "c": ["w1", "w1 w2", "w1 w2 w3"]}
    corpus = MultiTaskCorpus([(task, text) for task, docs in texts.items() for text in docs],
                             load_tokenizer(gpt2_dir), test_size=0.0)
    weights = paper_task_weights(corpus)
    torch.testing.assert_close(weights, torch.tensor([1 / 4, 1 / 7, 1 / 2]))
    for task, weight in enumerate(weights):
        rows = [n for n, d in enumerate(corpus.train.task_ids) if d == task]
        mean_predicted = corpus.train.collate(rows, corpus.pad_token_id).num_predicted_tokens / len(rows)
        assert float(weight) == pytest.approx(1 / mean_predicted)


def test_equivalent_tau_by_hand_and_at_a_stationary_point():
    torch.testing.assert_close(equivalent_tau(100.0, torch.tensor([10.0, 50.0, 20.0]), torch.tensor([2.0, 0.5, 0.0])),
                               torch.tensor([500.0, 10000.0, math.inf]))
    # a task whose log-likelihood is −(A/2)‖δ − m‖²: the published objective's MAP δ*, found by
    # gradient ascent, is the Gaussian MAP A·m / (A + τ) at the equivalent τ
    A, m, tau_p, mean_tokens = 2.0, torch.tensor([3.0, -4.0, 1.0], dtype=torch.float64), 0.5, 4.0
    delta = m.clone().requires_grad_()
    optimizer = torch.optim.SGD([delta], lr=0.5)
    for _ in range(200):
        objective = -A / 2 * (delta - m).square().sum() / mean_tokens - tau_p * delta.norm()
        optimizer.zero_grad()
        (-objective).backward()
        optimizer.step()
    tau = equivalent_tau(tau_p, torch.tensor([mean_tokens], dtype=torch.float64), delta.detach().norm().reshape(1))
    torch.testing.assert_close(A * m / (A + tau), delta.detach(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("bad, match", [
    (lambda: PaperNormPrior(0.0), "tau_p must be a positive finite number"),
    (lambda: PaperNormPrior(-1.0), "tau_p must be"),
    (lambda: PaperNormPrior(math.nan), "tau_p must be"),
    (lambda: PaperNormPrior(math.inf), "tau_p must be"),
    (lambda: PaperNormPrior("100"), "tau_p must be"),
    (lambda: PaperNormPrior(1.0, global_scale=0.0), "global_scale must be"),
])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        bad()


def test_bad_task_weights_are_refused_and_repr(setup):
    lm, _, _ = setup
    with pytest.raises(ConfigError, match=r"one weight per task, shape \(3,\), got \(2,\)"):
        BoRA(lm, PaperNormPrior(1.0), 3, task_weights=torch.ones(2))
    with pytest.raises(ConfigError, match="positive finite"):
        BoRA(lm, PaperNormPrior(1.0), 3, task_weights=torch.tensor([1.0, 0.0, 1.0]))
    assert repr(PaperNormPrior(100.0, global_scale=0.5)) == "PaperNormPrior(tau_p=100, global_scale=0.5)"
    assert repr(BoRA(lm, PaperNormPrior(100.0), 3, task_weights=torch.ones(3))) == (
        "BoRA(prior=PaperNormPrior(tau_p=100, global_scale=None), num_tasks=3, modules=2, task_weights=[...])")

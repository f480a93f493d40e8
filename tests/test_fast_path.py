"""The fast path (packed sites, the tasks plate subsampled to the batch's tasks with weights,
per-task leaf parameters) computes the same ELBO as a straightforward computation of its terms."""

import math

import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch.distributions import Normal

from bora_pyro import MultiTaskCorpus, MultiTaskLM, fit, load_tokenizer
from bora_pyro.guides import map_guide, mean_field_guide
from bora_pyro.models import BoRA, HierarchicalNormal
from bora_pyro.models.bora import TaskSubsample
from bora_pyro.packing import FactorLayout
from conftest import per_module_values, synthetic_records

TAU, GLOBAL_SCALE = 30.0, 0.5


@pytest.fixture
def setup(gpt2_dir):
    """A tiny GPT-2 and 4 tasks of 9, 5, 3 and 7 training documents."""
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4, target_modules=["c_attn", "c_fc"])
    records = [r for task, size in enumerate([9, 5, 3, 7])
               for r in synthetic_records(num_tasks=4, docs_per_task=9, words_per_doc=6)[9 * task: 9 * task + size]]
    corpus = MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir),
                             test_size=0.0, validation_size=0.0)
    return lm, corpus


def perturbed_guide(model, make_guide, batch):
    """A guide whose every parameter is moved off its start (so each term has a gradient)."""
    guide = make_guide(model)
    guide(batch)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in guide.named_parameters():
            parameter += (0.02 if "scales" in name else 0.3) * torch.randn(parameter.shape, generator=generator)
    return guide


def weights(corpus, batch) -> dict[int, float]:
    """w_d = (N / B) · c_d / N_d, written out."""
    train = corpus.train.task_ids
    rows = batch.task_ids.tolist()
    return {d: len(train) / len(rows) * rows.count(d) / train.count(d) for d in sorted(set(rows))}


def log_likelihood(lm, batch, theta: dict[int, torch.Tensor]) -> torch.Tensor:
    tasks = sorted(theta)
    factors = FactorLayout(lm.modules_spec).unpack(torch.stack([theta[d] for d in tasks]))
    with lm.adapters(factors, torch.tensor([tasks.index(t) for t in batch.task_ids.tolist()])):
        return lm.sequence_log_prob(batch.input_ids, batch.attention_mask).sum()


def test_task_weights_are_documents_over_task_size():
    task_ids = torch.tensor([2, 0, 2, 2])
    plate = TaskSubsample("tasks", 5, task_ids, task_sizes=torch.tensor([6, 4, 6, 6]), num_docs=20)
    assert plate.indices.tolist() == [0, 2] and plate.row_tasks.tolist() == [1, 0, 1, 1]
    torch.testing.assert_close(plate.weights, torch.tensor([20 / 4 * 1 / 4, 20 / 4 * 3 / 6]))


def test_map_loss_and_gradients_match_the_written_out_terms(setup):
    lm, corpus = setup
    model = BoRA(lm, HierarchicalNormal(TAU, global_scale=GLOBAL_SCALE, centered=True), corpus.num_tasks)
    batch = corpus.train.collate([0, 2, 9, 12], corpus.pad_token_id)  # tasks 0, 0, 1, 1: tasks 2 and 3 absent
    guide = perturbed_guide(model, map_guide, batch)
    loss = Trace_ELBO().differentiable_loss(model, guide, batch)
    loss.backward()

    glob = guide.get_parameter("global.lora_unconstrained").detach().clone().requires_grad_()
    rows = guide.task_values["task/lora"].rows
    theta = {d: rows[d].detach().clone().requires_grad_() for d in weights(corpus, batch)}
    reference = -(len(corpus.train) / len(batch.doc_ids) * log_likelihood(lm, batch, theta)
                  + sum(w * Normal(glob, TAU**-0.5).log_prob(theta[d]).sum() for d, w in weights(corpus, batch).items())
                  + Normal(0.0, GLOBAL_SCALE).log_prob(glob).sum())
    reference.backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(guide.get_parameter("global.lora_unconstrained").grad, glob.grad)
    for d in range(4):
        assert (rows[d].grad is None) == (d not in theta)  # absent tasks get no gradient at all
        if d in theta:
            torch.testing.assert_close(rows[d].grad, theta[d].grad)


def test_mean_field_loss_and_gradients_match_the_written_out_terms(setup):
    lm, corpus = setup
    model = BoRA(lm, HierarchicalNormal(TAU, global_scale=GLOBAL_SCALE, centered=True), corpus.num_tasks)
    batch = corpus.train.collate([1, 10, 15, 20], corpus.pad_token_id)  # tasks 0, 1, 2, 3 (sizes 9, 5, 3, 7)
    guide = perturbed_guide(model, mean_field_guide, batch)
    guide_trace = poutine.trace(guide).get_trace(batch)
    loss = Trace_ELBO().differentiable_loss(model, poutine.replay(guide, guide_trace), batch)
    loss.backward()

    def leaf(parameter):
        return parameter.detach().clone().requires_grad_()

    glob_loc_parameter = guide.get_parameter("locs.global.lora_unconstrained")
    glob_loc, glob_log_scale = leaf(glob_loc_parameter), leaf(guide.get_parameter("log_scales.global.lora_unconstrained"))
    task_locs, task_log_scales = guide.task_locs["task/lora"].rows, guide.task_log_scales["task/lora"].rows
    w = weights(corpus, batch)
    locs, log_scales = {d: leaf(task_locs[d]) for d in w}, {d: leaf(task_log_scales[d]) for d in w}
    # the guide's own noise ε = (value − loc) / σ, so the reference draws the same θ
    glob_eps = (guide_trace.nodes["global.lora"]["value"] - glob_loc) / glob_log_scale.exp()
    task_eps = (guide_trace.nodes["task.lora"]["value"] - torch.stack([locs[d] for d in w])) \
        / torch.stack([log_scales[d] for d in w]).exp()
    glob = glob_loc + glob_log_scale.exp() * glob_eps.detach()
    theta = {d: locs[d] + log_scales[d].exp() * task_eps[i].detach() for i, d in enumerate(w)}
    reference = -(len(corpus.train) / len(batch.doc_ids) * log_likelihood(lm, batch, theta)
                  + sum(w[d] * (Normal(glob, TAU**-0.5).log_prob(theta[d])
                                - Normal(locs[d], log_scales[d].exp()).log_prob(theta[d])).sum() for d in w)
                  + (Normal(0.0, GLOBAL_SCALE).log_prob(glob) - Normal(glob_loc, glob_log_scale.exp()).log_prob(glob)).sum())
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(glob_loc_parameter.grad, glob_loc.grad, rtol=1e-4, atol=1e-3)
    for d in w:
        torch.testing.assert_close(task_locs[d].grad, locs[d].grad, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(task_log_scales[d].grad, log_scales[d].grad, rtol=1e-4, atol=1e-3)


def test_an_epoch_of_fast_steps_is_the_full_gradient_of_the_per_module_model(setup):
    """Σ_batches (B_b / N) · ∇(fast loss of batch b) = ∇(−log joint of all documents and all tasks),
    the latter computed by the per-module model on the full tasks plate: unbiased, and the same model."""
    lm, corpus = setup
    fast = BoRA(lm, HierarchicalNormal(TAU, global_scale=GLOBAL_SCALE, centered=True), corpus.num_tasks)
    batches = list(corpus.train.batches(6, corpus.pad_token_id, shuffle=True, generator=torch.Generator().manual_seed(0)))
    guide = perturbed_guide(fast, map_guide, batches[0])
    for batch in batches:
        (len(batch.doc_ids) / len(corpus.train) * Trace_ELBO().differentiable_loss(fast, guide, batch)).backward()

    layout = FactorLayout(lm.modules_spec)
    rows = guide.task_values["task/lora"].rows
    packed = {"global.lora": guide.get_parameter("global.lora_unconstrained").detach(),
              "task.lora": torch.stack(list(rows)).detach()}
    per_module = {name: value.clone().requires_grad_()
                  for name, value in per_module_values(packed, lm.modules_spec).items() if name not in packed}
    reference = BoRA(lm, HierarchicalNormal(TAU, global_scale=GLOBAL_SCALE, centered=True, packed=False), corpus.num_tasks)
    everything = corpus.train.collate(range(len(corpus.train)), corpus.pad_token_id)
    everything.task_sizes = None  # the full tasks plate, every task every time
    trace = poutine.trace(poutine.condition(reference, per_module)).get_trace(everything)
    (-trace.log_prob_sum()).backward()

    def packed_gradient(level: str) -> torch.Tensor:
        return layout.pack({spec.name: (per_module[f"{level}.{spec.name}.lora_A"].grad,
                                        per_module[f"{level}.{spec.name}.lora_B"].grad) for spec in lm.modules_spec})

    torch.testing.assert_close(guide.get_parameter("global.lora_unconstrained").grad, packed_gradient("global"),
                               rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(torch.stack([row.grad for row in rows]), packed_gradient("task"), rtol=1e-4, atol=1e-3)


def test_a_fit_step_updates_only_the_batch_tasks(setup):
    lm, corpus = setup
    model = BoRA(lm, HierarchicalNormal(TAU, centered=True), corpus.num_tasks)
    guide = mean_field_guide(model)
    fit(model, guide, corpus, steps=1, batch_size=2, lr=0.1, progress=False, seed=4)
    start = mean_field_guide(BoRA(lm, HierarchicalNormal(TAU, centered=True), corpus.num_tasks))
    start(corpus.train.collate([0], corpus.pad_token_id))
    moved = [not torch.equal(guide.task_locs["task/lora"].rows[d], start.task_locs["task/lora"].rows[d])
             for d in range(corpus.num_tasks)]
    glob = "locs.global.lora_unconstrained"
    assert 1 <= sum(moved) <= 2 and not torch.equal(guide.get_parameter(glob), start.get_parameter(glob)), moved


def test_guides_own_their_parameters(setup):
    """Two guides in one process do not share tensors (Pyro's global param store would)."""
    lm, corpus = setup
    batch = corpus.train.collate([0], corpus.pad_token_id)
    first = map_guide(BoRA(lm, HierarchicalNormal(TAU, centered=True), corpus.num_tasks))
    first(batch)
    with torch.no_grad():
        first.get_parameter("global.lora_unconstrained").fill_(math.pi)
    second = map_guide(BoRA(lm, HierarchicalNormal(TAU, centered=True), corpus.num_tasks))
    second(batch)
    assert not torch.equal(second.median()["global.lora"], first.median()["global.lora"])
    assert {id(p) for p in first.parameters()}.isdisjoint(id(p) for p in second.parameters())


@pytest.mark.parametrize("make_guide", [map_guide, mean_field_guide])
def test_a_guide_run_issues_no_statement_per_task_leaf(setup, make_guide):
    """Reading the per-task leaves costs nothing per task: a PyroModule attribute read of an
    ``nn.ModuleDict`` issues one param statement per leaf, D per task site on every read."""
    lm, corpus = setup
    model = BoRA(lm, HierarchicalNormal(TAU, centered=True), corpus.num_tasks)
    guide = make_guide(model)
    batch = corpus.train.collate([0, 1], corpus.pad_token_id)
    guide(batch)
    trace = poutine.trace(guide).get_trace(batch)
    params = [name for name, site in trace.nodes.items() if site["type"] == "param"]
    assert params and not [name for name in params if ".rows." in name], params

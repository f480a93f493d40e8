"""The Pyro model: its log-joint equals the hand-written formula; priors emit the right sites."""

import pytest
import torch
from pyro import poutine
from torch.distributions import Normal

from bora_pyro import MultiTaskCorpus, MultiTaskLM, load_tokenizer
from bora_pyro.guides import map_guide, mean_field_guide
from bora_pyro.models import BoRA, HierarchicalNormal, Independent, Joint, prior_from_tau
from bora_pyro.errors import ConfigError
from conftest import per_module_values, synthetic_records


@pytest.fixture
def setup(gpt2_dir):
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4, target_modules=["c_attn", "c_fc"])
    records = synthetic_records(num_tasks=3, docs_per_task=6)
    corpus = MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir), test_size=0.5)
    batch = corpus.train.collate([0, 4, 7], corpus.pad_token_id)
    return lm, corpus, batch


def random_site_values(lm, num_tasks, prior):
    """Values for every latent site of ``prior``, drawn from the prior itself."""
    model = BoRA(lm, prior, num_tasks)
    trace = poutine.trace(prior).get_trace(lm.modules_spec, model.tasks_plate())
    return {name: site["value"] + 0.1 * torch.randn_like(site["value"])
            for name, site in trace.iter_stochastic_nodes() if name != "tasks"}


@pytest.mark.parametrize("global_scale", [None, 0.5])
def test_log_joint_equals_formula(setup, global_scale):
    lm, corpus, batch = setup
    tau, num_tasks = 7.0, corpus.num_tasks
    prior = HierarchicalNormal(tau, global_scale=global_scale, centered=True)
    model = BoRA(lm, prior, num_tasks)
    values = random_site_values(lm, num_tasks, HierarchicalNormal(tau, global_scale=1.0, centered=True))
    log_joint = poutine.trace(poutine.condition(model, values)).get_trace(batch).log_prob_sum()

    values = per_module_values(values, lm.modules_spec)
    expected = torch.tensor(0.0)
    factors = {}
    for spec in lm.modules_spec:
        pair = []
        for factor in ("lora_A", "lora_B"):
            glob, task = values[f"global.{spec.name}.{factor}"], values[f"task.{spec.name}.{factor}"]
            expected += Normal(glob, tau**-0.5).log_prob(task).sum()
            if global_scale is not None:
                expected += Normal(0.0, global_scale).log_prob(glob).sum()
            pair.append(task)
        factors[spec.name] = tuple(pair)
    with torch.no_grad(), lm.adapters(factors, batch.task_ids):
        logits = lm(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    token_log_probs = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    log_likelihood = (token_log_probs * batch.attention_mask[:, 1:]).sum()
    expected += len(corpus.train) / len(batch.doc_ids) * log_likelihood
    torch.testing.assert_close(log_joint.detach(), expected, rtol=1e-5, atol=1e-3)


def test_priors_emit_their_sites(setup):
    lm, corpus, batch = setup
    def site_names(prior):
        trace = poutine.trace(BoRA(lm, prior, 3)).get_trace(batch)
        return {name for name, _ in trace.iter_stochastic_nodes()} - {"docs", "tasks"}  # plate subsample sites

    assert site_names(HierarchicalNormal(5.0)) == {"global.lora", "task.lora_offset"}  # offsets: the default
    assert site_names(HierarchicalNormal(5.0, centered=True)) == {"global.lora", "task.lora"}
    assert site_names(Independent()) == {"task.lora"} and site_names(Joint()) == {"global.lora"}
    module = lm.modules_spec[0].name
    per_module = site_names(HierarchicalNormal(5.0, centered=True, packed=False))
    assert {f"global.{module}.lora_A", f"task.{module}.lora_A", f"task.{module}.lora_B"} <= per_module
    assert len(per_module) == 4 * len(lm.modules_spec)
    offsets = site_names(HierarchicalNormal(5.0, centered=False, packed=False))
    assert f"task.{module}.lora_A_offset" in offsets and f"task.{module}.lora_A" not in offsets
    assert all(name.startswith("task.") for name in site_names(Independent(packed=False)))
    joint = site_names(Joint(packed=False))
    assert all(name.startswith("global.") for name in joint) and len(joint) == 2 * len(lm.modules_spec)


def test_task_sites_have_the_batch_tasks_as_batch_shape(setup):
    """[K, P] for the K tasks of the batch (all 3 here, 2 in a batch of tasks 0 and 2)."""
    lm, corpus, batch = setup
    size = lm.num_adapter_params
    for doc_ids, num_tasks in [([0, 4, 7], 3), ([0, 1, 7], 2)]:
        trace = poutine.trace(BoRA(lm, HierarchicalNormal(5.0), 3)).get_trace(corpus.train.collate(doc_ids, 0))
        site = trace.nodes["task.lora_offset"]
        assert site["value"].shape == (num_tasks, size)
        assert site["fn"].batch_shape == (num_tasks,) and site["fn"].event_shape == (size,)
        assert trace.nodes["global.lora"]["value"].shape == (size,)
    trace = poutine.trace(BoRA(lm, HierarchicalNormal(5.0, centered=True, packed=False), 3)).get_trace(batch)
    spec = lm.modules_spec[0]
    site = trace.nodes[f"task.{spec.name}.lora_A"]
    assert site["value"].shape == (3, *spec.shape_A)
    assert site["fn"].batch_shape == (3,) and site["fn"].event_shape == spec.shape_A
    assert trace.nodes[f"global.{spec.name}.lora_B"]["value"].shape == spec.shape_B


@pytest.mark.parametrize("make_guide", [map_guide, mean_field_guide])
def test_guides_start_like_lora_with_tasks_at_the_global_value(setup, make_guide):
    lm, corpus, batch = setup
    model = BoRA(lm, HierarchicalNormal(5.0, centered=True), 3)
    guide = make_guide(model)
    guide(batch)
    values = per_module_values(guide.median(), lm.modules_spec)
    spec = lm.modules_spec[0]
    glob_A = values[f"global.{spec.name}.lora_A"]
    assert glob_A.abs().max() <= spec.in_features**-0.5 and glob_A.std() > 0
    assert torch.equal(values[f"task.{spec.name}.lora_A"], glob_A.expand(3, *spec.shape_A))
    assert not values[f"task.{spec.name}.lora_B"].any() and not values[f"global.{spec.name}.lora_B"].any()


def test_prior_from_tau_and_bad_tau():
    assert isinstance(prior_from_tau(0), Independent)
    assert isinstance(prior_from_tau(float("inf")), Joint)
    assert isinstance(prior_from_tau(3.0), HierarchicalNormal)
    for bad in (-1.0, float("nan"), 0.0):
        with pytest.raises(ConfigError, match="tau must be a positive finite number"):
            HierarchicalNormal(bad)

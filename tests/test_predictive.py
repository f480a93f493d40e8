"""Posterior predictive analysis: streamed draws, credible intervals, BMA, unseen and few-shot tasks,
shrinkage, text generation (bora_pyro.predictive, bora_pyro.generation)."""

import math

import pyro
import pytest
import torch

from bora_pyro import MultiTaskCorpus, MultiTaskLM, evaluate, fit, load_tokenizer
from bora_pyro.data import Batch
from bora_pyro.errors import ConfigError
from bora_pyro.evaluate import document_log_probs
from bora_pyro.generation import generate
from bora_pyro.guides import map_guide, mean_field_guide
from bora_pyro.models import BoRA, HierarchicalNormal, Independent, Joint
from bora_pyro.predictive import (
    global_factors,
    new_task_factors,
    new_task_perplexity,
    posterior_factors,
    predictive_perplexity,
    sample_perplexities,
    shrinkage,
)
from conftest import synthetic_records


@pytest.fixture
def corpus(gpt2_dir):
    records = synthetic_records(num_tasks=3, docs_per_task=20)
    return MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir), max_length=32,
                           test_size=0.3, validation_size=0.0)


@pytest.fixture
def fitted(gpt2_dir, corpus):
    """A mean-field fit of the tiny GPT-2 on three synthetic tasks, briefly (the factors move off 0)."""
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(tau=10.0), corpus.num_tasks)
    guide = mean_field_guide(model)
    fit(model, guide, corpus, steps=12, batch_size=8, lr=0.05, progress=False)
    return model, guide


def set_scales(guide, scale: float) -> None:
    """Every variational standard deviation of a mean-field guide to ``scale`` (kept as log σ)."""
    with torch.no_grad():
        for name, parameter in guide.named_parameters():
            if name.startswith(("log_scales.", "task_log_scales.")):
                parameter.fill_(math.log(scale))


def test_credible_intervals_shrink_with_the_guide_scale(fitted, corpus):
    model, guide = fitted
    widths = []
    for scale in (0.3, 0.03, 0.003):
        set_scales(guide, scale)
        pyro.set_rng_seed(0)
        report = predictive_perplexity(model, guide, corpus, "test", num_samples=8)
        widths.append(report["perplexity"]["ci"][1] - report["perplexity"]["ci"][0])
        for entry in [report["perplexity"], *report["tasks"].values()]:
            low, high = entry["ci"]
            assert low <= entry["median"] <= high and entry["bma"] <= entry["mean"] + 1e-9  # Jensen
    assert widths[0] > 3 * widths[1] > 9 * widths[2] > 0, widths


def test_bma_equals_the_plugin_when_the_guide_has_no_spread(fitted, corpus):
    model, guide = fitted
    set_scales(guide, 1e-7)
    report = predictive_perplexity(model, guide, corpus, "test", num_samples=4)
    for entry in [report["perplexity"], *report["tasks"].values()]:
        assert entry["bma"] == pytest.approx(entry["plugin"], rel=1e-5)
        assert entry["mean"] == pytest.approx(entry["plugin"], rel=1e-5)
    assert report["samples"] == 4 and set(report["tasks"]) == set(corpus.task_names)
    assert report["perplexity"]["plugin"] == pytest.approx(evaluate(model, guide, corpus, "test")["perplexity"])


def test_sample_perplexities_matches_the_formulas(fitted, corpus):
    """Two fixed draws: mean of the draws' perplexities, and the BMA's per-document log-mean-exp."""
    model, guide = fitted
    pyro.set_rng_seed(1)
    draws = list(posterior_factors(model, guide, Batch.probe(), 2))
    documents = corpus.documents("test")
    report = sample_perplexities(model.lm, iter(draws), documents, corpus.task_names, corpus.pad_token_id)
    log_probs = [document_log_probs(model.lm, draw, documents, corpus.pad_token_id)[0].double() for draw in draws]
    tokens = document_log_probs(model.lm, draws[0], documents, corpus.pad_token_id)[1]
    task_ids = torch.tensor(documents.task_ids)
    for d, name in enumerate(corpus.task_names):
        mask = task_ids == d
        per_draw = [math.exp(-float(lp[mask].sum()) / int(tokens[mask].sum())) for lp in log_probs]
        bma_log_probs = torch.logsumexp(torch.stack(log_probs), 0) - math.log(2)
        assert report["tasks"][name]["mean"] == pytest.approx(sum(per_draw) / 2, rel=1e-9)
        assert report["tasks"][name]["median"] == pytest.approx(sum(per_draw) / 2, rel=1e-9)
        assert report["tasks"][name]["bma"] == pytest.approx(
            math.exp(-float(bma_log_probs[mask].sum()) / int(tokens[mask].sum())), rel=1e-9)
        assert report["tasks"][name]["plugin"] is None and report["tasks"][name]["tokens"] == int(tokens[mask].sum())


def test_new_tasks_come_from_the_prior_around_the_global_adapter(gpt2_dir, corpus):
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    values = map_guide(BoRA(lm, HierarchicalNormal(tau=1.0), 3))(Batch.probe())
    values = {name: value.detach() + 0.1 * torch.randn_like(value) for name, value in values.items()}  # Θ off init
    close = new_task_factors(BoRA(lm, HierarchicalNormal(tau=1e8), 3), values, num_new=4)
    spread = new_task_factors(BoRA(lm, HierarchicalNormal(tau=1.0), 3), values, num_new=4)
    theta = global_factors(BoRA(lm, HierarchicalNormal(tau=1.0), 3), values)
    for name, (A, B) in close.items():
        assert A.shape == (4, *theta[name][0].shape[1:]) and B.shape == (4, *theta[name][1].shape[1:])
        assert torch.allclose(A, theta[name][0].expand_as(A), atol=1e-3)
        assert float((spread[name][0] - theta[name][0]).std()) == pytest.approx(1.0, rel=0.2)  # τ = 1: unit spread
    independent = BoRA(lm, Independent(1.0), 3)
    assert independent.for_new_tasks(values, 2).num_tasks == 2
    with pytest.raises(ConfigError, match="no global adapter"):
        global_factors(independent, map_guide(independent)(Batch.probe()))


def test_prior_predictive_of_unseen_tasks(fitted, corpus):
    model, guide = fitted
    unseen = MultiTaskCorpus([(r["speaker"], r["line"]) for r in synthetic_records(num_tasks=2, docs_per_task=5,
                                                                                   seed=3)],
                             corpus.tokenizer, max_length=32, test_size=0.0, validation_size=0.0)
    report = new_task_perplexity(model, guide, unseen.documents("all"), unseen.task_names, unseen.pad_token_id,
                                 num_samples=6)
    assert set(report["tasks"]) == set(unseen.task_names) and report["samples"] == 6
    assert report["perplexity"]["plugin"] is None
    low, high = report["perplexity"]["ci"]
    assert 1 < low < high and report["perplexity"]["bma"] <= report["perplexity"]["mean"]


def test_few_shot_fit_touches_only_the_new_tasks(fitted, corpus):
    model, guide = fitted
    before = {name: value.clone() for name, value in guide.state_dict().items()}
    values = guide.median()
    shared = {name: values[name].clone() for name in model.shared_site_names}
    assert {name.split(".")[0] for name in shared} == {"global"}
    new_corpus = MultiTaskCorpus([(r["speaker"], r["line"]) for r in synthetic_records(num_tasks=2, seed=5)],
                                 corpus.tokenizer, max_length=32, test_size=0.5, validation_size=0.0)
    new_model = model.for_new_tasks(values, new_corpus.num_tasks)
    new_guide = map_guide(new_model)
    new_guide(Batch.probe())  # creates its parameters: the new tasks start like LoRA, at the base model
    start = evaluate(new_model, new_guide, new_corpus, "test")["perplexity"]
    fit(new_model, new_guide, new_corpus, steps=10, batch_size=8, lr=0.05, progress=False)
    assert evaluate(new_model, new_guide, new_corpus, "test")["perplexity"] < start
    fitted_sites = set(new_guide.median())
    assert fitted_sites and all(name.startswith("task.") for name in fitted_sites), fitted_sites
    # Θ is data of the new model, bit for bit the old posterior median, and the old guide is untouched
    trace = pyro.poutine.trace(new_model).get_trace(new_corpus.train.collate([0, 1], new_corpus.pad_token_id))
    for name, value in shared.items():
        assert trace.nodes[name]["is_observed"] and torch.equal(trace.nodes[name]["value"], value)
    assert all(torch.equal(before[name], value) for name, value in guide.state_dict().items())
    with pytest.raises(ConfigError, match="lack the shared sites"):
        model.for_new_tasks({}, 1)


def test_shrinkage_distances_and_spreads(gpt2_dir, corpus):
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    sizes = {name: counts["train_docs"] for name, counts in corpus.counts().items()}
    for prior, make_guide in [(Joint(), map_guide), (HierarchicalNormal(tau=10.0), mean_field_guide),
                              (Independent(1.0), mean_field_guide)]:
        model = BoRA(lm, prior, corpus.num_tasks)
        guide = make_guide(model)
        fit(model, guide, corpus, steps=8, batch_size=8, lr=0.05, progress=False)
        report = shrinkage(model, guide, sizes, corpus.task_names, num_samples=5)
        assert set(report) == set(corpus.task_names)
        for name, entry in report.items():
            assert entry["size"] == sizes[name]
            if isinstance(prior, Joint):  # a point mass, every task at Θ
                assert entry["spread"] == 0 and entry["distance"] == 0 and entry["relative_distance"] == 0
            elif isinstance(prior, Independent):  # no Θ to shrink towards
                assert entry["spread"] > 0 and entry["distance"] is None
            else:
                assert entry["spread"] > 0 and entry["distance"] > 0


def test_shrinkage_matches_a_direct_computation(fitted, corpus):
    model, guide = fitted
    pyro.set_rng_seed(3)
    report = shrinkage(model, guide, {}, corpus.task_names, num_samples=6)
    pyro.set_rng_seed(3)
    draws = torch.stack([torch.cat([t.flatten(1) for pair in f.values() for t in pair], 1).double()
                         for f in posterior_factors(model, guide, Batch.probe(), 6)])  # [S, D, P]
    median = guide.median()
    theta = torch.cat([t.flatten(1) for pair in model.task_factors(median).values() for t in pair], 1)
    glob = torch.cat([t.flatten() for pair in global_factors(model, median).values() for t in pair])
    for d, name in enumerate(corpus.task_names):
        assert report[name]["spread"] == pytest.approx(float(draws[:, d].var(0).mean().sqrt()), rel=1e-9)
        assert report[name]["distance"] == pytest.approx(float((theta[d] - glob).norm()), rel=1e-6)
        assert report[name]["size"] is None


def two_task_factors(lm) -> dict:
    """Task 0: no update (the base model); task 1: a large random update of every module."""
    generator = torch.Generator().manual_seed(0)
    factors = {}
    for spec in lm.modules_spec:
        A = torch.randn(2, *spec.shape_A, generator=generator)
        B = 3 * torch.randn(2, *spec.shape_B, generator=generator)
        B[0] = 0
        factors[spec.name] = (A, B)
    return factors


DECODING = {
    "greedy": {},
    "sampling-top-1": {"do_sample": True, "top_k": 1, "num_return_sequences": 3},  # deterministic
    "sampling": {"do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 0.8, "num_return_sequences": 3},
    "beam": {"num_beams": 3},
    "beam-3-returned": {"num_beams": 4, "num_return_sequences": 3},
}


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", DECODING)
def test_generation_decodes_each_prompt_with_its_own_task(tiny_model_dirs, model_type, mode):
    """A batch of prompts of different tasks, expanded by beams or return sequences, gives each
    prompt the text it gets alone; the tasks' texts differ; the KV cache changes nothing."""
    lm = MultiTaskLM.from_pretrained(tiny_model_dirs[model_type], rank=2, alpha=4)
    tokenizer = load_tokenizer(tiny_model_dirs[model_type])
    factors = two_task_factors(lm)
    kwargs = DECODING[mode] | {"max_new_tokens": 8, "min_new_tokens": 8}
    prompts, tasks = ["w1 w2 w3", "w1 w2 w3", "w4 w5"], [0, 1, 1]  # the last one left-padded in a batch

    def run(prompts, tasks, **extra):
        torch.manual_seed(0)
        return generate(lm, tokenizer, factors, prompts, tasks, **kwargs, **extra)

    together = run(prompts, tasks)
    per_prompt = kwargs.get("num_return_sequences", 1)
    assert [len(texts) for texts in together] == [per_prompt] * 3
    assert together[0] != together[1]  # same prompt, different adapters
    if mode != "sampling":  # deterministic decoding: batching, expansion and caching change nothing
        assert [run([p], [t])[0] for p, t in zip(prompts, tasks)] == together
        assert run(prompts, tasks, use_cache=False) == together
    assert all(text.startswith(prompt) for prompt, texts in zip(prompts, together) for text in texts)

"""Posterior predictive analysis: streamed draws, credible intervals, BMA, unseen and few-shot tasks,
shrinkage, text generation (bora_pyro.predictive, bora_pyro.generation)."""

import math
import statistics

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
from bora_pyro.packing import FactorLayout
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

TAU = 10.0  #: the fitted fixture's prior precision


@pytest.fixture
def corpus(gpt2_dir):
    records = synthetic_records(num_tasks=3, docs_per_task=20)
    return MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir), max_length=32,
                           test_size=0.3, validation_size=0.0)


@pytest.fixture
def fitted(gpt2_dir, corpus):
    """A mean-field fit of the tiny GPT-2 on three synthetic tasks, briefly (the factors move off 0)."""
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(tau=TAU), corpus.num_tasks)
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
    """The interval narrows with the posterior's spread (its formula: test_sample_perplexities_matches_the_formulas)."""
    model, guide = fitted
    widths = []
    for scale in (0.3, 0.03, 0.003):
        set_scales(guide, scale)
        pyro.set_rng_seed(0)
        low, high = predictive_perplexity(model, guide, corpus, "test", num_samples=8)["perplexity"]["ci"]
        widths.append(high - low)
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


def expected_summaries(log_probs: list[torch.Tensor], tokens: torch.Tensor, task_ids: list[int],
                       task_names: list[str]) -> dict:
    """Per task and ``"all"``: the mean, median and 90 % interval (linear interpolation) of the
    draws' perplexities and the BMA (per-document log-mean-exp over the draws), from each draw's
    per-document log-likelihoods [N], written out."""
    task_ids = torch.tensor(task_ids)
    bma_log_probs = torch.logsumexp(torch.stack(log_probs), 0) - math.log(len(log_probs))
    groups = {name: task_ids == d for d, name in enumerate(task_names)} | {"all": torch.ones_like(task_ids, dtype=bool)}
    expected = {}
    for name, mask in groups.items():
        count = int(tokens[mask].sum())
        per_draw = [math.exp(-float(lp[mask].sum()) / count) for lp in log_probs]
        cuts = statistics.quantiles(per_draw, n=20, method="inclusive")  # the 5 %, ..., 95 % points
        expected[name] = {"mean": statistics.fmean(per_draw), "median": statistics.median(per_draw),
                          "ci": [cuts[0], cuts[-1]], "bma": math.exp(-float(bma_log_probs[mask].sum()) / count),
                          "tokens": count}
    return expected


def numbers(entry: dict) -> dict:
    """A summary's numbers, its interval as two keys (``pytest.approx`` compares flat mappings of numbers)."""
    return {key: entry[key] for key in ("mean", "median", "bma", "tokens")} | dict(zip(("low", "high"), entry["ci"]))


def assert_summaries_match(report: dict, expected: dict) -> None:
    """``report`` (no plug-in) holds the ``expected`` summaries, overall and for exactly the expected tasks."""
    for name, entry in [("all", report["perplexity"]), *report["tasks"].items()]:
        assert numbers(entry) == pytest.approx(numbers(expected[name]), rel=1e-9) and entry["plugin"] is None, name
    assert set(report["tasks"]) == set(expected) - {"all"}


def test_sample_perplexities_matches_the_formulas(fitted, corpus):
    """Five fixed draws: mean, median and 90 % interval of the draws' perplexities, and the BMA's
    per-document log-mean-exp."""
    model, guide = fitted
    pyro.set_rng_seed(1)
    draws = list(posterior_factors(model, guide, Batch.probe(), 5))
    documents = corpus.documents("test")
    report = sample_perplexities(model.lm, iter(draws), documents, corpus.task_names, corpus.pad_token_id)
    log_probs = [document_log_probs(model.lm, draw, documents, corpus.pad_token_id)[0].double() for draw in draws]
    tokens = document_log_probs(model.lm, draws[0], documents, corpus.pad_token_id)[1]
    assert_summaries_match(report, expected_summaries(log_probs, tokens, documents.task_ids, corpus.task_names))


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


def test_prior_predictive_of_unseen_tasks_matches_adapters_drawn_by_hand(fitted, corpus):
    """Each of the 6 draws: Θ from the guide, then θ_new = Θ + τ^{-1/2}·ε for each unseen task,
    drawn here by hand from the same seed and scored document by document: the report's figures
    are those of these adapters."""
    model, guide = fitted
    unseen = MultiTaskCorpus([(r["speaker"], r["line"]) for r in synthetic_records(num_tasks=2, docs_per_task=5,
                                                                                   seed=3)],
                             corpus.tokenizer, max_length=32, test_size=0.0, validation_size=0.0)
    documents = unseen.documents("all")
    assert model.shared_site_names == ["global.lora"]  # looked up once, before seeding: the look-up draws numbers
    pyro.set_rng_seed(2)
    report = new_task_perplexity(model, guide, documents, unseen.task_names, unseen.pad_token_id, num_samples=6)
    assert report["samples"] == 6

    layout = FactorLayout(model.lm.modules_spec)
    pyro.set_rng_seed(2)  # the same random numbers
    log_probs = []
    for _ in range(6):
        with torch.no_grad():
            theta = guide(Batch.probe())["global.lora"]
            new_tasks = theta + TAU**-0.5 * torch.randn(unseen.num_tasks, layout.size)
        log_probs.append(document_log_probs(model.lm, layout.unpack(new_tasks), documents,
                                            unseen.pad_token_id)[0].double())
    tokens = document_log_probs(model.lm, None, documents, unseen.pad_token_id)[1]
    assert_summaries_match(report, expected_summaries(log_probs, tokens, documents.task_ids, unseen.task_names))


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
    prompt the text it gets with its task for every row of the batch, and (decoding deterministically)
    the text it gets alone; the tasks' texts differ; the KV cache changes nothing."""
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
    assert run(prompts, tasks, use_cache=False) == together
    # every row, however expanded, writes with its prompt's task: as in the same batch with that task for all
    assert [run(prompts, [task] * len(prompts))[i] for i, task in enumerate(tasks)] == together
    if mode != "sampling":  # sampling's random numbers depend on the batch's rows; else: as the prompt alone
        assert [run([p], [t])[0] for p, t in zip(prompts, tasks)] == together
    assert all(text.startswith(prompt) for prompt, texts in zip(prompts, together) for text in texts)

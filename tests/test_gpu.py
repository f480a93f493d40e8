"""Checks that need a CUDA GPU: skipped without one, unless ``BORA_PYRO_REQUIRE_GPU=1`` (what
``benchmarks/gpu_check.sh`` sets), which makes a missing GPU an error instead of a skip."""

import os

import pytest
import torch

from bora_pyro import MultiTaskCorpus, MultiTaskLM, TaskStore, evaluate, evaluate_base, fit, load_tokenizer
from bora_pyro.guides import map_guide, mean_field_guide
from bora_pyro.models import BoRA, HierarchicalNormal
from conftest import synthetic_records

if not torch.cuda.is_available():
    if os.environ.get("BORA_PYRO_REQUIRE_GPU") == "1":
        raise RuntimeError("BORA_PYRO_REQUIRE_GPU=1 but torch sees no CUDA GPU: run this on a GPU machine, "
                           "with a CUDA build of torch")
    pytestmark = pytest.mark.skip(reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def corpus(gpt2_dir):
    records = synthetic_records(num_tasks=4, docs_per_task=20)
    return MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir),
                           test_size=0.25, validation_size=0.15)


def fitted(gpt2_dir, corpus, device, make_guide=map_guide, task_store=None, bf16=False):
    torch.manual_seed(0)
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4).to(device)
    model = BoRA(lm, HierarchicalNormal(30.0), corpus.num_tasks)
    guide = make_guide(model, task_store=task_store)
    fit(model, guide, corpus, steps=24, batch_size=4, lr=0.05, eval_every=8, progress=False, seed=2, bf16=bf16)
    return model, guide


def parameters(guide) -> dict[str, torch.Tensor]:
    return {name: value.detach().float().cpu() for name, value in guide.state_dict().items()}


@pytest.mark.parametrize("make_guide", [map_guide, mean_field_guide])
def test_a_fit_on_the_gpu_ends_where_the_cpu_fit_does(gpt2_dir, corpus, make_guide):
    _, on_cpu = fitted(gpt2_dir, corpus, "cpu", make_guide)
    _, on_gpu = fitted(gpt2_dir, corpus, "cuda", make_guide)
    expected, got = parameters(on_cpu), parameters(on_gpu)
    assert expected.keys() == got.keys()
    assert max(float((got[name] - expected[name]).abs().max()) for name in expected) < 1e-3


@pytest.mark.parametrize("make_guide", [map_guide, mean_field_guide])
def test_the_pinned_task_store_on_the_gpu_ends_where_the_in_memory_fit_does(gpt2_dir, corpus, make_guide):
    """Within 1e-5, not bit for bit: the batch's per-document sums (``index_add``) are not
    deterministic on CUDA."""
    _, in_memory = fitted(gpt2_dir, corpus, "cuda", make_guide)
    store = TaskStore()
    _, stored = fitted(gpt2_dir, corpus, "cuda", make_guide, store)
    rows = next(iter(store.sites.values())).values
    assert rows.data.is_pinned()
    expected, got = parameters(in_memory), parameters(stored)
    assert max(float((got[name] - expected[name]).abs().max()) for name in expected) < 1e-5


def test_a_bf16_fit_on_the_gpu_beats_the_base(gpt2_dir, corpus):
    model, guide = fitted(gpt2_dir, corpus, "cuda", bf16=True)
    assert evaluate(model, guide, corpus)["perplexity"] < 0.9 * evaluate_base(model.lm, corpus)["perplexity"]

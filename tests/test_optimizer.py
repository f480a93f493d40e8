"""The optimizer's groups: weight decay reaches the factors' locations, never scales or τ."""

import pyro.distributions as dist
import pytest
import torch

from bora_pyro import MultiTaskCorpus, MultiTaskLM, fit, load_tokenizer
from bora_pyro.guides import hybrid_guide, mean_field_guide
from bora_pyro.models import BoRA, HierarchicalNormal
from conftest import synthetic_records


@pytest.fixture(scope="module")
def corpus(gpt2_dir):
    records = synthetic_records(num_tasks=3, docs_per_task=12)
    return MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir), test_size=0.0)


def fitted_state(gpt2_dir, corpus, make_guide, prior, weight_decay: float, log_scale_lr=None) -> dict:
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    guide = make_guide(BoRA(lm, prior, corpus.num_tasks))
    fit(BoRA(lm, prior, corpus.num_tasks), guide, corpus, steps=1, batch_size=6, lr=0.05, optimizer="adamw",
        weight_decay=weight_decay, log_scale_lr=log_scale_lr, seed=1, progress=False)
    return {name: value.detach().clone() for name, value in guide.state_dict().items()}


@pytest.mark.parametrize("make_guide, prior, log_scale_lr", [
    (mean_field_guide, HierarchicalNormal(10.0), None),
    (hybrid_guide, HierarchicalNormal(dist.LogNormal(2.0, 1.0), centered=False), 0.05),
])
def test_weight_decay_leaves_scales_and_tau_alone(gpt2_dir, corpus, make_guide, prior, log_scale_lr):
    """One AdamW step at weight decay 5 against 0 (the same gradients: they are taken before the
    step): the locations differ, the log σ and log τ parameters are bit for bit the same (decay
    would pull them toward 0: σ and τ toward 1)."""
    plain = fitted_state(gpt2_dir, corpus, make_guide, prior, 0.0, log_scale_lr)
    decayed = fitted_state(gpt2_dir, corpus, make_guide, prior, 5.0, log_scale_lr)
    not_decayed = [name for name in plain if "log_scales" in name or "tau" in name]
    assert not_decayed and all(torch.equal(plain[name], decayed[name]) for name in not_decayed), not_decayed
    locations = [name for name in plain if name not in not_decayed]  # Θ's lora_A starts away from 0
    assert locations and any(not torch.equal(plain[name], decayed[name]) for name in locations)

"""The task store: per-task guide rows and Adam moments off the device, the same fit bit for bit."""

import pytest
import torch

from bora_pyro import MultiTaskCorpus, MultiTaskLM, TaskStore, fit, load_tokenizer
from bora_pyro.errors import ConfigError
from bora_pyro.guides import hybrid_guide, map_guide, mean_field_guide
from bora_pyro.models import BoRA, HierarchicalNormal
from conftest import synthetic_records

NUM_TASKS = 5


@pytest.fixture(scope="module")
def corpus(gpt2_dir):
    records = synthetic_records(num_tasks=NUM_TASKS, docs_per_task=16)
    return MultiTaskCorpus([(r["speaker"], r["line"]) for r in records], load_tokenizer(gpt2_dir),
                           test_size=0.2, validation_size=0.2)


def fitted(gpt2_dir, corpus, make_guide, task_store=None, **settings):
    """A fit of 36 steps with validation every 6 (patience 2), so that the best check's rows are
    restored at the end and tasks come back to steps with moments to continue from."""
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(30.0), corpus.num_tasks)
    guide = make_guide(model, task_store=task_store)
    result = fit(model, guide, corpus, steps=36, batch_size=3, lr=0.4, eval_every=6, patience=2, progress=False,
                 seed=1, **settings)
    return guide, result


def guide_values(guide) -> dict[str, torch.Tensor]:
    """Every site's median, and for a Normal part its σ: [D, ...] for task sites."""
    parts = list(guide) if isinstance(guide, torch.nn.ModuleList) else [guide]
    values = {}
    for number, part in enumerate(parts):
        values |= {f"{number}.{name}": value for name, value in part.median().items()}
        if hasattr(part, "_get_loc_and_scale"):
            values |= {f"{number}.{name}.scale": part._get_loc_and_scale(name)[1]
                       for name, _ in part.prototype_trace.iter_stochastic_nodes()}
    return values


@pytest.mark.parametrize("make_guide, settings, restores_best", [
    (map_guide, {}, True),
    (map_guide, {"weight_decay": 0.1, "optimizer": "adamw"}, False),
    (mean_field_guide, {}, True),
    (hybrid_guide, {"log_scale_lr": None}, True),
])
@pytest.mark.parametrize("on_disk", [False, True])
def test_a_fit_with_the_store_ends_bit_for_bit_where_one_without_it_does(gpt2_dir, corpus, tmp_path, make_guide,
                                                                         settings, restores_best, on_disk):
    """MAP, AdamW with decay, mean-field and hybrid (one optimizer group), in host memory and on
    disk; ``restores_best``: validation stopped the fit past its best check, whose rows come back."""
    reference, reference_result = fitted(gpt2_dir, corpus, make_guide, **settings)
    store = TaskStore(tmp_path / "store" if on_disk else None)
    stored, stored_result = fitted(gpt2_dir, corpus, make_guide, store, **settings)
    assert stored_result.history == reference_result.history
    assert stored_result.best_step == reference_result.best_step
    assert (stored_result.best_step < stored_result.steps) == restores_best
    expected, got = guide_values(reference), guide_values(stored)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert store.sites and all(rows.steps.max() > 1 for rows in store.sites.values())
    if on_disk:
        assert sorted(p.suffix for p in (tmp_path / "store").iterdir()) == [".npy"] * len(list((tmp_path / "store").iterdir()))


def test_the_guide_on_the_device_does_not_grow_with_the_tasks(gpt2_dir, corpus):
    """With a store, the guide's own parameters (what sits on the device between steps) are the
    shared sites only: the same for 3 and 300 tasks."""
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    sizes = {}
    for num_tasks in (3, 300):
        model = BoRA(lm, HierarchicalNormal(30.0), num_tasks)
        guide = mean_field_guide(model, task_store=TaskStore())
        with torch.no_grad():
            guide(corpus.train.collate([0], corpus.pad_token_id))
        sizes[num_tasks] = sum(p.numel() for p in guide.parameters())
        assert {rows.values.shape[0] for rows in guide.task_store.sites.values()} == {num_tasks}
    assert sizes[3] == sizes[300] > 0


def test_checkpoints_with_a_store_are_refused_for_now(gpt2_dir, corpus):
    lm = MultiTaskLM.from_pretrained(gpt2_dir, rank=2, alpha=4)
    model = BoRA(lm, HierarchicalNormal(30.0), corpus.num_tasks)
    with pytest.raises(ConfigError, match="task store cannot checkpoint"):
        fit(model, map_guide(model, task_store=TaskStore()), corpus, steps=2, on_checkpoint=lambda state: None,
            progress=False)

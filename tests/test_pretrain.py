"""The from-scratch base LM: cache folder, atomic writes, loading with the Auto* classes, learning."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from bora_pyro import pretrain
from bora_pyro.pretrain import BaseModelConfig, fingerprint, is_complete, load_info, pretrain_base, resolved

NAMES = ["Romeo", "Juliet", "Hamlet", "Ophelia", "Lear", "Cordelia", "Puck", "Oberon"]
VERBS = ["loves", "doth fear", "hath seen", "shall find", "would kiss", "must leave"]
THINGS = ["the moon", "a rose", "the king", "my lord", "thy sword", "the night", "sweet music"]


def synthetic_texts(n: int = 300, seed: int = 0) -> list[str]:
    """Short, structured 'speeches' (a tiny grammar), so a tiny LM can learn something."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        lines = [f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(THINGS)}." for _ in range(rng.randint(1, 3))]
        texts.append("\n".join(lines))
    return texts


TEXTS = synthetic_texts()
QUICK = resolved(BaseModelConfig.quick())  # bf16 decided for this CPU, as pretrain_base keys its cache


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("base_cache")
    return cache, pretrain_base(TEXTS, cache, QUICK, progress=False)


def test_folder_loads_like_a_hub_model(built):
    cache, path = built
    assert path.parent == cache and path.name == fingerprint(TEXTS, QUICK) and is_complete(path)
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")] == []
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.eos_token == pretrain.EOS_TOKEN
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None
    assert model.config.vocab_size == len(tokenizer) <= QUICK.vocab_size
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.n_layer == QUICK.n_layer and model.config.n_embd == QUICK.n_embd
    for text in [TEXTS[0], "  Unseen words: Ünïcödé — ok?\n\tTabs & 'quotes'  ", "a"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.eos_token_id not in ids  # the library appends eos itself
        assert tokenizer.decode(ids) == text
    assert "<|endoftext|>" not in tokenizer.decode(tokenizer(TEXTS[1])["input_ids"])


def test_training_lowers_held_out_perplexity(built):
    _, path = built
    info = load_info(path)
    assert info["config"] == dataclasses.asdict(QUICK)
    assert info["n_texts"]["val"] == round(len(TEXTS) * QUICK.val_fraction)
    assert info["n_tokens"]["train"] > 0 and info["train_seconds"] > 0
    assert info["val_ppl"] < info["init_val_ppl"] / 5
    assert info["val_ppl"] < info["uniform_ppl"] / 10
    assert math.isfinite(info["final_train_loss"]) and info["final_train_loss"] < math.log(info["uniform_ppl"])
    # The saved weights are the trained ones: recompute the held-out perplexity from the folder.
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    _, val_texts = pretrain.split_texts(TEXTS, QUICK.val_fraction, QUICK.seed)
    val_ids = pretrain.encode_documents(tokenizer, val_texts)
    assert val_ids.tolist()[: len(tokenizer(val_texts[0])["input_ids"]) + 1] == (
        tokenizer(val_texts[0])["input_ids"] + [tokenizer.eos_token_id])
    assert math.exp(pretrain.evaluate(model, val_ids, QUICK.block_size)) == pytest.approx(info["val_ppl"], rel=1e-4)


def test_second_call_reuses_the_folder(built, monkeypatch):
    cache, path = built
    mtime = (path / "pretrain.json").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained a cached base model")

    monkeypatch.setattr(pretrain, "train_lm", no_training)
    assert pretrain_base(list(TEXTS), cache, BaseModelConfig.quick(), progress=False) == path
    assert (path / "pretrain.json").stat().st_mtime_ns == mtime


def test_changed_config_or_texts_give_other_folders(built):
    cache, path = built
    assert fingerprint(TEXTS, dataclasses.replace(QUICK, seed=1)) != path.name
    assert fingerprint(TEXTS[:-1], QUICK) != path.name
    assert fingerprint(TEXTS[:-1] + [TEXTS[-1] + "!"], QUICK) != path.name
    assert fingerprint(["ab", "c"], QUICK) != fingerprint(["a", "bc"], QUICK)
    other = pretrain_base(TEXTS, cache, dataclasses.replace(QUICK, steps=5), progress=False)
    assert other != path and other.parent == cache and is_complete(other) and is_complete(path)


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    config = dataclasses.replace(QUICK, steps=5)
    final = tmp_path / fingerprint(TEXTS, config)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "train_lm", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pretrain_base(TEXTS, tmp_path, config, progress=False)
    assert not final.exists() and list(tmp_path.iterdir()) == []

    # Debris of a killed process (no cleanup ran): a temp folder, and a half-written final folder.
    leftover = tmp_path / f".tmp-{final.name}-killed"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    final.mkdir()
    (final / "config.json").write_text(json.dumps({"half": "written"}))
    assert not is_complete(final) and not is_complete(leftover)

    calls = []
    real_train_lm = pretrain.train_lm
    monkeypatch.setattr(pretrain, "train_lm", lambda *a, **k: calls.append(1) or real_train_lm(*a, **k))
    assert pretrain_base(TEXTS, tmp_path, config, progress=False) == final
    assert calls == [1] and is_complete(final) and load_info(final)["config"]["steps"] == 5
    AutoModelForCausalLM.from_pretrained(final)


def test_split_is_deterministic_and_disjoint():
    train, val = pretrain.split_texts(TEXTS, 0.05, seed=0)
    assert (train, val) == pretrain.split_texts(TEXTS, 0.05, seed=0)
    assert len(val) == 15 and len(train) + len(val) == len(TEXTS)
    assert sorted(train + val) == sorted(TEXTS)
    assert pretrain.split_texts(TEXTS, 0.05, seed=1)[1] != val


def test_lr_schedule():
    config = BaseModelConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [pretrain.lr_at(step, config) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] >= 1e-4

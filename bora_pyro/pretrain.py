"""Pretrain a small "base" causal LM from scratch, because there is no hub to download one from.

A byte-level BPE tokenizer and a small GPT-2 are trained on a list of texts and saved with
``save_pretrained`` into ``cache_dir/<fingerprint>/``; the fingerprint hashes the texts and the
config, so a later run with the same inputs reuses the folder, and a changed corpus or config
builds a new one. From there on the base is loaded exactly like a hub model::

    path = pretrain_base(texts, "runs/cache", BaseModelConfig())
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

Documents are ``tokenizer(text)["input_ids"] + [eos_token_id]`` (the tokenizer adds no special
tokens itself), so the LM is trained on the texts joined by ``<|endoftext|>``, packed into blocks.

A folder is written atomically: everything goes into ``cache_dir/.tmp-<fingerprint>-*`` and is
renamed into place only once ``pretrain.json`` (written last) is there. A folder counts as
complete only if all of :data:`REQUIRED_FILES` exist in it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .precision import bf16_is_fast, machine_description

EOS_TOKEN = "<|endoftext|>"
FORMAT_VERSION = 1  # bump when the training recipe changes, so old caches are not reused
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "pretrain.json")


@dataclass(frozen=True)
class BaseModelConfig:
    """Tokenizer, GPT-2 shape and training recipe of the base LM (all part of the cache key).

    The defaults pretrain in about 12 minutes on 2 CPU cores with AVX512_BF16 (bf16 autocast);
    a float32 step is 1.7x slower there (``benchmarks/precision_speed.py``); a step is one batch
    of ``batch_size x block_size`` tokens.
    """

    vocab_size: int = 4096  # BPE vocabulary incl. the 256 byte tokens and <|endoftext|>
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_positions: int = 256  # max context of the saved model (>= block_size)
    steps: int = 800  # optimizer steps
    batch_size: int = 16  # sequences per step
    block_size: int = 128  # tokens per training sequence
    lr: float = 1e-3  # peak AdamW lr; linear warmup, then cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # applied to matrices only (not biases, LayerNorms)
    dropout: float = 0.0  # GPT-2 resid/embd/attn dropout; >0 makes CPU steps ~3x slower (kept in config)
    grad_clip: float = 1.0
    val_fraction: float = 0.05  # share of the texts held out (seeded, deterministic) for perplexity
    bf16: bool | None = None  # bf16 autocast of training steps; None: where it is fast (precision.bf16_is_fast)
    eval_every: int = 200  # held-out perplexity every this many steps (0: only before/after)
    seed: int = 0

    @classmethod
    def quick(cls) -> "BaseModelConfig":
        """A tiny preset that trains in a few seconds (tests, ``--quick`` runs)."""
        return cls(vocab_size=512, n_layer=2, n_head=2, n_embd=64, n_positions=64, steps=80,
                   batch_size=16, block_size=32, lr=3e-3, warmup_steps=10, dropout=0.0, eval_every=0)


def fingerprint(texts: Sequence[str], config: BaseModelConfig) -> str:
    """16 hex digits of a SHA-256 over the recipe version, the config and every text (in order)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "config": asdict(config)}, sort_keys=True).encode())
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def is_complete(folder: str | Path) -> bool:
    """True if ``folder`` holds a finished pretraining (all of REQUIRED_FILES)."""
    folder = Path(folder)
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def split_texts(texts: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic held-out split: a seeded random ``val_fraction`` of the texts (order kept)."""
    n = len(texts)
    n_val = min(max(round(n * val_fraction), 1), n - 1) if n >= 2 and val_fraction > 0 else 0
    val_idx = set(random.Random(seed).sample(range(n), n_val))
    train = [t for i, t in enumerate(texts) if i not in val_idx]
    val = [t for i, t in enumerate(texts) if i in val_idx]
    return train, val


def train_tokenizer(texts: Sequence[str], vocab_size: int, model_max_length: int):
    """Byte-level BPE (GPT-2 style, no prefix space) with ``<|endoftext|>`` as eos = bos = unk = pad.

    Returns a ``transformers.PreTrainedTokenizerFast`` that adds no special tokens when encoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=EOS_TOKEN, model_max_length=model_max_length)


def encode_documents(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """All texts as one token stream, each followed by eos: LongTensor of shape (n_tokens,)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, config: BaseModelConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, cosine to min_lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, block_size: int, batch_size: int = 32, bf16: bool = False) -> float:
    """Mean next-token NLL (nats) over ``ids`` (shape (n,)), in non-overlapping windows of
    ``block_size`` predicted tokens (every token but the first is predicted exactly once)."""
    was_training = model.training
    model.eval()
    n_full = (len(ids) - 1) // block_size
    windows = list(ids[:n_full * block_size + 1].unfold(0, block_size + 1, block_size).split(batch_size)) if n_full else []
    if len(ids) - 1 > n_full * block_size:
        windows.append(ids[n_full * block_size:][None])  # the last, shorter window
    total, count = 0.0, 0
    for batch in windows:  # (b, t + 1)
        with _autocast(bf16):
            logits = model(input_ids=batch[:, :-1]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def build_model(config: BaseModelConfig, vocab_size: int, eos_id: int):
    """A freshly initialised ``GPT2LMHeadModel`` (tied embeddings) of the configured shape."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt_config = GPT2Config(vocab_size=vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
                            n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=config.dropout,
                            embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return GPT2LMHeadModel(gpt_config)


def train_lm(model, train_ids: torch.Tensor, val_ids: torch.Tensor, config: BaseModelConfig,
             progress: bool = True) -> dict:
    """Train ``model`` in place on random ``(batch_size, block_size)`` windows of ``train_ids``
    (shape (n,)); returns stats incl. ``history`` = [{step, minutes, train_loss, val_ppl}]."""
    config = resolved(config)
    if len(train_ids) <= config.block_size + 1:
        raise ValueError(f"only {len(train_ids)} training tokens; need more than block_size + 1")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(config.seed)
    offsets = torch.arange(config.block_size + 1)
    history, losses = [], []
    start = time.perf_counter()

    def log(step: int) -> None:
        val_loss = evaluate(model, val_ids, config.block_size, bf16=config.bf16) if len(val_ids) > 1 else float("nan")
        recent = sum(losses[-50:]) / len(losses[-50:]) if losses else float("nan")
        history.append({"step": step, "minutes": (time.perf_counter() - start) / 60,
                        "train_loss": recent, "val_ppl": math.exp(val_loss)})

    model.train()
    bar = tqdm(range(config.steps), desc="pretrain base", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if config.eval_every and step > 0 and step % config.eval_every == 0:
            log(step)
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val_ppl=f"{history[-1]['val_ppl']:.1f}")
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        starts = torch.randint(len(train_ids) - config.block_size - 1, (config.batch_size,), generator=gen)
        batch = train_ids[starts[:, None] + offsets]  # (batch_size, block_size + 1)
        with _autocast(config.bf16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}", lr=f"{lr_at(step, config):.2e}")
    bar.close()
    train_seconds = time.perf_counter() - start
    log(config.steps)
    model.eval()
    return {"history": history, "train_seconds": train_seconds,
            "final_train_loss": sum(losses[-50:]) / len(losses[-50:])}


def resolved(config: BaseModelConfig) -> BaseModelConfig:
    """``config`` with ``bf16=None`` decided for this CPU: bf16 where it is fast, float32 elsewhere
    (the choice is part of the cache key: the two train different weights)."""
    return config if config.bf16 is not None else dataclasses.replace(config, bf16=bf16_is_fast("cpu"))


def pretrain_base(texts: Sequence[str], cache_dir: str | Path, config: BaseModelConfig,
                  progress: bool = True) -> Path:
    """Return ``cache_dir/<fingerprint(texts, config)>``, training and saving the base LM first
    unless a complete folder is already there.

    The folder holds a ``GPT2LMHeadModel`` and its tokenizer (``save_pretrained``; load both
    with the ``Auto*`` classes) and ``pretrain.json``: the config, token counts, the final
    train loss, held-out perplexity before/after training, timing and the per-eval history.
    """
    texts = list(texts)
    cache_dir = Path(cache_dir)
    config = resolved(config)
    name = fingerprint(texts, config)
    final = cache_dir / name
    if is_complete(final):
        return final
    if config.block_size > config.n_positions:
        raise ValueError("block_size must be <= n_positions")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache_dir))
    try:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # seeds training without touching the caller's RNG
            torch.manual_seed(config.seed)
            train_texts, val_texts = split_texts(texts, config.val_fraction, config.seed)
            tokenizer = train_tokenizer(train_texts, config.vocab_size, config.n_positions)
            train_ids = encode_documents(tokenizer, train_texts)
            val_ids = encode_documents(tokenizer, val_texts)
            model = build_model(config, len(tokenizer), tokenizer.eos_token_id)
            init_val_loss = evaluate(model, val_ids, config.block_size) if len(val_ids) > 1 else float("nan")
            stats = train_lm(model, train_ids, val_ids, config, progress)
            val_loss = evaluate(model, val_ids, config.block_size) if len(val_ids) > 1 else float("nan")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tokens_seen = config.steps * config.batch_size * config.block_size
        info = {
            "format_version": FORMAT_VERSION, "fingerprint": name, "config": asdict(config),
            "n_params": sum(p.numel() for p in model.parameters()),
            "n_texts": {"train": len(train_texts), "val": len(val_texts)},
            "n_tokens": {"train": len(train_ids), "val": len(val_ids), "seen": tokens_seen},
            "epochs": tokens_seen / len(train_ids),
            "chars_per_token": sum(map(len, train_texts)) / max(1, len(train_ids) - len(train_texts)),
            "final_train_loss": stats["final_train_loss"],
            "init_val_ppl": math.exp(init_val_loss), "val_loss": val_loss, "val_ppl": math.exp(val_loss),
            "uniform_ppl": len(tokenizer),
            "train_seconds": stats["train_seconds"], "total_seconds": time.perf_counter() - t0,
            "machine": machine_description("cpu"),
            "history": stats["history"],
            "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                         "tokenizers": _version("tokenizers")},
        }
        (tmp / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")  # last: marks completeness
        if final.exists() and not is_complete(final):
            shutil.rmtree(final)  # debris from a non-atomic writer; never a finished folder
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_complete(final):  # a concurrent run finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def load_info(folder: str | Path) -> dict:
    """The ``pretrain.json`` of a pretrained folder."""
    return json.loads((Path(folder) / "pretrain.json").read_text())


__all__ = ["BaseModelConfig", "pretrain_base", "fingerprint", "is_complete", "split_texts", "train_tokenizer",
           "encode_documents", "evaluate", "build_model", "train_lm", "lr_at", "load_info", "EOS_TOKEN"]

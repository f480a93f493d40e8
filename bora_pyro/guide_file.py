"""A guide with a task store saved to and loaded from one safetensors file, a task's row at a time.

``guide.state_dict()`` of a guide whose rows live in a :class:`~bora_pyro.task_store.TaskStore`
holds every task's rows (``<prefix>rows.<d>``, as a guide without a store names them), and
``safetensors.torch.save_file`` needs them all in memory at once: 26 GB at D = 1,000 for
GPT-2-small's shape at r = 16 (MAP). Here the file is written in the safetensors format (an
8-byte header length, a JSON header of every tensor's dtype, shape and byte range, then the
bytes) from the header, which the rows' shapes give, and then one tensor at a time; and read
back one row at a time into the store. Any safetensors reader reads the file, and a guide
without a store loads it as it loads any run's.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import safetensors
import torch

from .errors import CheckpointError
from .task_store import StoredRows, guide_task_store, rows_left_out, shared_state_dict

#: torch dtype → the safetensors name of it.
DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def stored_row_keys(guide) -> dict[str, tuple[StoredRows, int]]:
    """Every task row of the guide's task store by its state-dict key: ``key → (rows, task)``."""
    return {f"{prefix}.rows.{d}": (module, d) for prefix, module in guide.named_modules()
            if isinstance(module, StoredRows) for d in range(module.num_tasks)}


def save_guide(guide, path: str | Path) -> None:
    """Write ``guide.state_dict()`` to the safetensors file ``path``, its task store's rows one at
    a time (not atomic: write to a temp file and rename it, as :func:`~bora_pyro.run.atomic_write`)."""
    rows = stored_row_keys(guide)
    shared = {key: tensor.detach().cpu().contiguous() for key, tensor in shared_state_dict(guide).items()}
    entries = [(key, tuple(tensor.shape), tensor.dtype, lambda tensor=tensor: tensor) for key, tensor in shared.items()]
    entries += [(key, stored.values.shape[1:], torch.float32, lambda stored=stored, d=d: stored.values[d])
                for key, (stored, d) in rows.items()]
    write_tensors(path, entries)


def write_tensors(path: str | Path, entries: list[tuple[str, tuple[int, ...], torch.dtype, Callable]]) -> None:
    """A safetensors file of ``entries`` ``(name, shape, dtype, get)``: ``get()`` gives the tensor
    when its bytes are written, so that one tensor at a time is in memory."""
    header, offset = {}, 0
    for name, shape, dtype, _ in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        for name, shape, dtype, get in entries:
            tensor = get().detach().to("cpu").contiguous()
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name} is {tuple(tensor.shape)} {tensor.dtype}, not {tuple(shape)} {dtype}")
            file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def load_guide(guide, path: Path, load_shared: Callable[[dict], None]) -> None:
    """Load the guide file ``path`` into ``guide``, whose rows a task store holds: the shared
    part by ``load_shared(state)`` (the guide's ``load_state_dict``, here without the rows), then
    the rows one at a time.

    Raises:
        CheckpointError: a task's row is missing from the file or has another shape.
    """
    rows = stored_row_keys(guide)
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as file:
        keys = set(file.keys())
        with rows_left_out(guide):
            load_shared({key: file.get_tensor(key) for key in keys if key not in rows})
        for key, (stored, d) in rows.items():
            if key not in keys:
                raise CheckpointError(f"{path} holds no {key}: the run directory is incomplete or mixes "
                                      "files of different runs")
            value = file.get_tensor(key)
            if tuple(value.shape) != stored.values.shape[1:]:
                raise CheckpointError(f"{path}: {key} is {tuple(value.shape)}, the run's guide has "
                                      f"{stored.values.shape[1:]}: the run directory mixes files of different runs")
            stored.values[d] = value
    guide_task_store(guide).settle()

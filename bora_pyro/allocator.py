"""Reuse of large CPU memory blocks between steps (glibc's mallopt), for :func:`bora_pyro.fit.fit`
and the posterior draws of :mod:`bora_pyro.predictive`."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import torch

#: glibc's mallopt parameters (malloc.h) and their defaults.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
MALLOC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}
_depth: list[torch.device] = []  # the blocks now open (they nest)


@contextlib.contextmanager
def reuse_large_blocks(device: torch.device) -> Iterator[None]:
    """Within the block, on a CPU with glibc, freed memory is kept for reuse instead of being
    handed back to the system.

    glibc maps every block over 32 MB afresh and unmaps it when freed, so each of a training
    step's [K, P] temporaries (76 MB for 8 tasks of GPT-2 small), and each of a posterior draw's
    [D, P] ones, pays ~20k page faults every time: ~6 % of a step, measured. Served from the heap
    instead, they reuse the memory of the step before; the process keeps its peak memory until
    the block ends. Elsewhere (GPU, other C libraries) this does nothing.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt if device.type == "cpu" else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        yield
        return
    if not _depth:
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    _depth.append(device)
    try:
        yield
    finally:
        _depth.pop()
        if not _depth:  # the outermost block restores glibc's defaults
            for parameter, value in MALLOC_DEFAULTS.items():
                mallopt(parameter, value)

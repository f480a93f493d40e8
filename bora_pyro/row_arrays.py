"""Arrays of D float32 rows that a task store reads and writes a row at a time.

:class:`HostRows` is a [D, *row] tensor in host memory (pinned for a GPU, so that a row's copy to
it can overlap compute). :class:`FileRows` keeps the rows in a file, row d at byte ``d × row
bytes``, read and written with ``pread``/``pwrite``: the process holds only the rows it is
using, where a memory map would keep every row it ever touched resident (and counted in its RSS)
until the kernel needs the memory. A new file is sparse: rows of zeros never written cost no disk.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import WriteError


class HostRows:
    """[D, *row] float32 zeros in host memory; ``pin``: page-locked (for copies to a GPU)."""

    def __init__(self, shape: tuple[int, ...], pin: bool = False):
        self.data = torch.zeros(shape, pin_memory=pin)
        self.shape, self.pinned = tuple(shape), pin

    def __getitem__(self, task: int) -> torch.Tensor:
        """Row ``task``: a view (do not keep it past the next write)."""
        return self.data[task]

    def __setitem__(self, task: int, value: torch.Tensor) -> None:
        self.data[task] = value

    def get(self, task: int, device: torch.device) -> torch.Tensor:
        """A copy of row ``task`` on ``device`` (asynchronous from pinned memory to a GPU)."""
        return self.data[task].to(device, copy=True, non_blocking=device.type == "cuda")

    def will_need(self, task: int) -> None:
        """Nothing to prepare: the row is in memory."""


class FileRows:
    """[D, *row] float32 rows in the file ``path`` (created empty, i.e. zeros)."""

    pinned = False  # a GPU's copies from it go through pageable memory

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.shape, self.path = tuple(shape), Path(path)
        self.row_shape = self.shape[1:]
        self.row_bytes = 4 * math.prod(self.row_shape)
        self.fd = None
        with self.io_errors("create"):
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self.fd, self.row_bytes * self.shape[0])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = close

    @contextlib.contextmanager
    def io_errors(self, what: str) -> Iterator[None]:
        """An ``OSError`` (a full disk, a file removed under the fit) as one :class:`WriteError` line."""
        try:
            yield
        except OSError as error:
            raise WriteError(f"cannot {what} the task store's file {self.path} ({error.strerror or error}); "
                             f"the store needs {self.row_bytes * self.shape[0] / 2**30:.2f} GB there: free disk "
                             "space or give the store another folder") from None

    def __getitem__(self, task: int) -> torch.Tensor:
        """Row ``task``, read from the file into a new tensor."""
        row = torch.empty(self.row_shape)
        view = memoryview(row.numpy()).cast("B")
        with self.io_errors("read"):
            if os.preadv(self.fd, [view], self.offset(task)) != self.row_bytes:
                raise OSError(0, f"shorter than its {self.shape[0]} rows: was it truncated?")
        return row

    def will_need(self, task: int) -> None:
        """Ask the kernel to start reading row ``task`` into its page cache (where it can): the
        read that follows then copies from memory instead of waiting for the disk. Only a hint:
        where it fails, the read waits."""
        if hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, self.offset(task), self.row_bytes, os.POSIX_FADV_WILLNEED)

    def __setitem__(self, task: int, value: torch.Tensor) -> None:
        row = value.detach().to("cpu", torch.float32).contiguous()
        if row.shape != self.row_shape:
            raise ValueError(f"a row of {self.path} is {self.row_shape}, not {tuple(row.shape)}")
        view = memoryview(row.numpy()).cast("B")
        written, offset = 0, self.offset(task)
        with self.io_errors("write"):
            while written < self.row_bytes:  # pwrite may write less than asked (signals, big rows)
                written += os.pwrite(self.fd, view[written:], offset + written)

    def get(self, task: int, device: torch.device) -> torch.Tensor:
        """Row ``task`` on ``device`` (read once: no second copy on the CPU)."""
        return self[task].to(device)

    def offset(self, task: int) -> int:
        if not 0 <= task < self.shape[0]:
            raise IndexError(f"row {task} of {self.shape[0]}")
        return task * self.row_bytes

"""Arrays of D float32 rows that a task store reads and writes a row at a time.

:class:`HostRows` is a [D, *row] tensor in host memory (pinned for a GPU, so that a row's copy to
it can overlap compute). :class:`FileRows` keeps the rows in a file, read and written a row at a
time with ``preadv``/``pwritev`` (``O_DIRECT`` where the file system allows it) on IO threads:
the process holds only the rows it is using, where a memory map would keep every row it ever
touched resident (and counted in its RSS) until the kernel needs the memory. A new file is
sparse: rows of zeros never written cost no disk.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import math
import os
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
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

    def put(self, task: int, row: torch.Tensor) -> None:
        """Row ``task`` = ``row`` (see :meth:`FileRows.put`)."""
        self.data[task] = row

    def wait_written(self, task: int) -> None:
        """Nothing to wait for: a write is a copy."""

    def get(self, task: int, device: torch.device) -> torch.Tensor:
        """A copy of row ``task`` on ``device`` (asynchronous from pinned memory to a GPU)."""
        return self.data[task].to(device, copy=True, non_blocking=device.type == "cuda")

    def will_need(self, task: int) -> None:
        """Nothing to prepare: the row is in memory."""

    def settle(self) -> None:
        """Nothing in flight: every write is in place already."""


#: ``O_DIRECT``'s alignment of a transfer's buffer address, file offset and length (4096 also
#: serves devices with 512-byte logical blocks).
BLOCK = 4096

#: Threads that wait on the files' transfers: two keep the disk busier than one (0.86 against
#: 0.48 GB/s read here), and a thread waiting on a DMA takes no time from the step's threads.
IO_THREADS = 2

#: The most bytes of rows written behind (copied, not yet on disk) across a process's files: a
#: write waits for the oldest beyond it. One step's write-back fits (450 MB for 8 tasks of
#: GPT-2-small's shape at r = 16, mean-field); filling a store row by row stays within it.
WRITE_BEHIND_BYTES = 512 * 2**20


def aligned_empty(nbytes: int) -> torch.Tensor:
    """[nbytes] uint8 at a :data:`BLOCK`-aligned address, from torch's allocator: freed rows are
    reused by the next ones, where a fresh ``mmap`` is zero-filled page by page (6.7 ms per 9.4 MB
    row here)."""
    raw = torch.empty(nbytes + BLOCK, dtype=torch.uint8)
    start = -raw.data_ptr() % BLOCK
    return raw[start:start + nbytes]


class WriteBehind:
    """A process's writes of rows copied but not yet on disk (all files), oldest first."""

    def __init__(self):
        self.writes: collections.deque[tuple[Future, int]] = collections.deque()
        self.nbytes = 0

    def add(self, write: Future, nbytes: int) -> None:
        """Count ``write`` of ``nbytes``; wait for the oldest writes until the rest fit
        :data:`WRITE_BEHIND_BYTES`."""
        self.writes.append((write, nbytes))
        self.nbytes += nbytes
        while self.writes and (self.nbytes > WRITE_BEHIND_BYTES or self.writes[0][0].done()):
            oldest, size = self.writes.popleft()
            futures.wait([oldest])
            self.nbytes -= size


def io_threads() -> ThreadPoolExecutor:
    """This process's IO threads (a forked process makes its own)."""
    return _process_io(os.getpid())[0]


def write_behind() -> WriteBehind:
    """This process's writes behind (a forked process counts its own)."""
    return _process_io(os.getpid())[1]


@functools.cache
def _process_io(pid: int) -> tuple[ThreadPoolExecutor, WriteBehind]:
    return ThreadPoolExecutor(IO_THREADS, thread_name_prefix="bora-pyro-rows"), WriteBehind()


def open_direct(path: Path) -> tuple[int, bool]:
    """A new empty ``path`` opened for ``O_DIRECT`` transfers where the file system allows them
    (not tmpfs), else for transfers through the page cache; and which of the two."""
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


class FileRows:
    """[D, *row] float32 rows in the file ``path`` (created empty, i.e. zeros).

    Row d lies at byte ``d × stride``, the stride being the row's bytes rounded up to whole
    :data:`BLOCK` s, so that every row can be read and written with ``O_DIRECT``: the disk's DMA
    fills the row's own buffer, bypassing the page cache (which a store larger than host memory
    only churns). Measured on this project's 2-core VM, 9.4 MB rows: 0.9–2 GB/s read and 2.9 GB/s
    written direct against 0.19 and 0.71 GB/s through the page cache. Where the file system
    refuses ``O_DIRECT`` (tmpfs) the same calls go through the page cache.

    The transfers run on :data:`IO_THREADS` threads that only wait on the disk: :meth:`will_need`
    starts reading a row the next step will take; a write returns at once, from a copy of the row
    (``rows[d] = value``) or from the row's own memory (:meth:`put`, for a row this array read). A
    row is always read after the last write to it; a failed write raises at the next write, at
    :meth:`settle` or at a read of that row.
    """

    pinned = False  # a GPU's copies from it go through pageable memory

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.shape, self.path = tuple(shape), Path(path)
        self.row_shape = self.shape[1:]
        self.row_bytes = 4 * math.prod(self.row_shape)
        self.stride = -(-self.row_bytes // BLOCK) * BLOCK
        self.reads: dict[int, Future] = {}  # rows being read ahead (will_need), not yet taken
        self.stale_reads: list[Future] = []  # reads ahead that a write made stale, maybe still running
        self.writes: dict[int, Future] = {}  # each row's last write, until seen done
        self.aliased: set[int] = set()  # rows whose last write reads the caller's tensor (put)
        self.pid, self.fd = os.getpid(), None
        with self.io_errors("create"):
            self.fd, self.direct = open_direct(self.path)
            os.ftruncate(self.fd, self.stride * self.shape[0])

    def close(self) -> None:
        """Close the file once every transfer has ended (a failed write's error is lost: see :meth:`settle`)."""
        if self.fd is not None:
            if os.getpid() == self.pid:  # a forked process has none of its parent's transfers running
                futures.wait([*self.reads.values(), *self.stale_reads, *self.writes.values()])
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
                             f"the store needs {self.stride * self.shape[0] / 2**30:.2f} GB there: free disk "
                             "space or give the store another folder") from None

    def __getitem__(self, task: int) -> torch.Tensor:
        """Row ``task`` in a new tensor [*row]: the one read ahead, else read now."""
        self.check(task)
        read = self.reads.pop(task, None) or self.submit_read(task)
        with self.io_errors("read"):
            return read.result()

    def will_need(self, task: int) -> None:
        """Start reading row ``task`` (the next read of it takes this copy)."""
        self.check(task)
        if task not in self.reads:
            self.reads[task] = self.submit_read(task)

    def __setitem__(self, task: int, value: torch.Tensor) -> None:
        self.check(task)
        if tuple(value.shape) != self.row_shape:
            raise ValueError(f"a row of {self.path} is {self.row_shape}, not {tuple(value.shape)}")
        block = aligned_empty(self.stride)
        block[:self.row_bytes].view(torch.float32).view(self.row_shape).copy_(value.detach())
        block[self.row_bytes:].zero_()
        self.submit_write(task, block)

    def put(self, task: int, row: torch.Tensor) -> None:
        """Row ``task`` = ``row`` [*row], handed over: written from its own memory when it is a
        row this array read (a step's values and moments), so the caller must not change it
        before :meth:`wait_written`; other tensors are copied as by ``rows[task] = row``."""
        block = self.own_block(row)
        if block is None:
            self[task] = row
        else:
            self.check(task)
            self.submit_write(task, block)
            self.aliased.add(task)

    def wait_written(self, task: int) -> None:
        """Wait until row ``task``'s last write has ended if it reads the tensor given to
        :meth:`put` (a copied row's write does not; its error is raised later)."""
        if task in self.aliased and task in self.writes:
            futures.wait([self.writes[task]])

    def own_block(self, row: torch.Tensor) -> torch.Tensor | None:
        """The aligned block of ``stride`` bytes that ``row`` starts, if it looks like one of this
        array's rows as read: float32, contiguous, on the CPU, at a :data:`BLOCK` boundary of a
        storage of exactly :func:`aligned_empty`'s size (not a view into some larger tensor)."""
        row = row.detach()
        start = row.storage_offset() * row.element_size()
        if (row.device.type != "cpu" or row.dtype != torch.float32 or not row.is_contiguous()
                or tuple(row.shape) != self.row_shape or row.data_ptr() % BLOCK
                or row.untyped_storage().nbytes() != self.stride + BLOCK):
            return None
        return torch.empty(0, dtype=torch.uint8).set_(row.untyped_storage(), start, (self.stride,))

    def submit_write(self, task: int, block: torch.Tensor) -> None:
        """Write ``block`` as row ``task`` on the IO threads, after the row's last write."""
        self.raise_failed_writes()
        stale = self.reads.pop(task, None)  # read before this write
        if stale is not None and not stale.cancel():
            self.stale_reads.append(stale)  # running: the file stays open until it ends
        self.stale_reads = [read for read in self.stale_reads if not read.done()]
        self.aliased.discard(task)
        self.writes[task] = io_threads().submit(self.write, task, block, self.writes.get(task))
        write_behind().add(self.writes[task], self.stride)

    def submit_read(self, task: int) -> Future:
        # the buffer is allocated here, not on an IO thread: freed rows then go back to the
        # heap that the next ones come from (glibc gives each thread an arena of its own)
        return io_threads().submit(self.read, task, aligned_empty(self.stride), self.writes.get(task))

    def get(self, task: int, device: torch.device) -> torch.Tensor:
        """Row ``task`` on ``device`` (read once: no second copy on the CPU)."""
        return self[task].to(device)

    def settle(self) -> None:
        """Every write on disk (as far as the OS knows; a failed one raises here), nothing read ahead."""
        for read in self.reads.values():
            read.cancel()
        futures.wait([*self.reads.values(), *self.stale_reads, *self.writes.values()])
        self.reads, self.stale_reads = {}, []
        self.raise_failed_writes()

    def raise_failed_writes(self) -> None:
        """Forget the writes that have ended; raise the first that failed."""
        ended = [task for task, write in self.writes.items() if write.done()]
        failed = [self.writes[task] for task in ended if self.writes[task].exception() is not None]
        for task in ended:
            del self.writes[task]
        if failed:
            with self.io_errors("write"):
                raise failed[0].exception()

    # On the IO threads:

    def read(self, task: int, block: torch.Tensor, after: Future | None) -> torch.Tensor:
        if after is not None and after.exception() is not None:  # waits for it: a row is read after its write
            raise after.exception()  # not the row as it was before the write
        self.transfer(os.preadv, block, task)
        return block[:self.row_bytes].view(torch.float32).view(self.row_shape)

    def write(self, task: int, block: torch.Tensor, after: Future | None) -> None:
        if after is not None:
            futures.wait([after])  # its error is its own to raise
        self.transfer(os.pwritev, block, task)

    def transfer(self, call: Callable, block: torch.Tensor, task: int) -> None:
        """``preadv``/``pwritev`` of the whole stride: either may move less than asked (a signal)."""
        view, done = memoryview(block.numpy()), 0
        while done < self.stride:
            moved = call(self.fd, [view[done:]], task * self.stride + done)
            if moved <= 0:
                raise OSError(0, f"shorter than its {self.shape[0]} rows: was it truncated?")
            done += moved

    def check(self, task: int) -> None:
        if not 0 <= task < self.shape[0]:
            raise IndexError(f"row {task} of {self.shape[0]}")

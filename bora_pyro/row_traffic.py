"""The task store's copies to and from the device, and how they overlap the steps.

A fit with a :class:`~bora_pyro.task_store.TaskStore` moves, per step, the batch's rows and
Adam moments to the device and the stepped ones back (425 MB per step for 7–8 tasks of
GPT-2-small's shape at r = 16, MAP). What can overlap the step is the waiting, not the copying:

- rows in files: :meth:`RowTraffic.prefetch` has the files' IO threads read the next step's rows
  while the step computes (:meth:`~bora_pyro.row_arrays.FileRows.will_need`), so the next fetch
  takes rows already in memory; the IO threads write the stepped rows back from their own memory
  during the next step (:meth:`~bora_pyro.row_arrays.FileRows.put`);
- pinned host memory and a GPU: the next step's rows are copied on a stream of their own, beside
  the step's kernels (so the device holds two batches' rows for a while);
- host memory and a CPU: nothing to wait for; a copy is a ``memcpy``.

A worker thread *copying* beside the step was tried and dropped: on a CPU its copies compete
with the step's own threads, and the step lost more than the copies cost (+25–35 % on the
in-memory step against +3–8 % for the same copies done in line; host memory, D = 100,
GPT-2-small's shape, r = 16, 2 cores). The files' IO threads only wait: the disk's DMA moves the
bytes (``O_DIRECT``) to and from the rows' own memory.

A task that the last step wrote back is not read again: the next step takes its tensors
(:attr:`RowTraffic.written`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .task_store import StoredRows

#: A row's arrays in the store besides its values: Adam's (and AdamW's) per-parameter state.
MOMENTS = ("exp_avg", "exp_avg_sq")

#: A row of one array: (site key, array name, task).
RowKey = tuple[str, str, int]


class RowTraffic:
    """Reads and writes of task rows between a store's arrays and ``device``.

    Attributes:
        written: the last step's written rows, ``(key, array, task) → tensor`` on the device: the
            newest values of those rows until the next step takes them or lets them go.
        read_ahead: rows being copied to a GPU for the next step (:meth:`prefetch`).
        prepared: the rows :meth:`prefetch` asked for last.
        bytes_moved: bytes read from the store's arrays to the device and written back so far.
        cold_reads: rows a step read without their having been prepared (nor written by the step
            before): in a fit, the first step's only.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.written: dict[RowKey, torch.Tensor] = {}
        self.read_ahead: dict[RowKey, torch.Tensor] = {}
        self.prepared: set[RowKey] = set()
        self.bytes_moved = self.cold_reads = 0

    def prefetch(self, sites: dict[str, StoredRows], tasks: list[int], skip: set[int]) -> None:
        """Start bringing the rows of ``tasks`` closer to the device (not those in ``skip``: the
        running step's, which it writes back), with their moments for tasks that have some."""
        self.read_ahead = {}
        wanted = [(rows, array, task) for rows in sites.values() for task in tasks if task not in skip
                  for array in ("values", *(MOMENTS if rows.steps[task] > 0 else ()))]
        self.prepared = {(rows.key, array, task) for rows, array, task in wanted}
        copied = []  # pinned rows for a GPU's copy stream; the others' arrays read them ahead themselves
        for rows, array, task in wanted:
            if self.copy_stream is not None and rows.array(array).pinned:
                copied.append((rows, array, task))
            else:
                rows.array(array).will_need(task)
        if not copied:
            return
        # the new rows' memory may still be read by kernels of the step before, queued on the step's stream
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for rows, array, task in copied:
                self.read_ahead[rows.key, array, task] = rows.array(array).get(task, self.device)

    def take(self, rows: StoredRows, array: str, task: int) -> torch.Tensor:
        """Row ``task`` of ``rows``' ``array`` on the device, [*row]: the last step's tensor if it
        wrote it, else the one read ahead, else read now."""
        row_key = (rows.key, array, task)
        if row_key in self.written:
            rows.array(array).wait_written(task)  # its write-back may still read what the step will change
            return self.written.pop(row_key)
        row = self.read_ahead.pop(row_key, None)
        if row is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        else:
            self.cold_reads += row_key not in self.prepared
            row = rows.array(array).get(task, self.device)
        self.bytes_moved += row.nbytes
        return row

    def write(self, rows: StoredRows, task: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write row ``task`` of each of ``rows``' arrays (``array → tensor``, [*row] each); until
        the next step takes them, they are also :attr:`written`."""
        for array in tensors:  # a copy read ahead before this write is stale now
            self.read_ahead.pop((rows.key, array, task), None)
        with torch.no_grad():
            for array, tensor in tensors.items():
                rows.array(array).put(task, tensor)
        self.written |= {(rows.key, array, task): tensor for array, tensor in tensors.items()}
        self.bytes_moved += sum(tensor.nbytes for tensor in tensors.values())

    def forget_written(self) -> None:
        """The step has taken what it wanted of the last step's rows: let the rest go."""
        self.written = {}

    def settle(self) -> None:
        """Nothing read ahead or held: the arrays alone hold the rows (before anything outside a
        step changes them)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # no copy may still read a row about to change
        self.read_ahead, self.written, self.prepared = {}, {}, set()

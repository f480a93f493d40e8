"""A task store: per-task guide values and their optimizer state kept off the device.

A step of BoRA touches the B tasks of its batch out of D. The taskwise guides
(:mod:`bora_pyro.guides.taskwise`) keep one leaf per task and site on the device, with Adam's
moments beside it: memory grows with D (~57 MB per task for mean-field at GPT-2-small's shape,
r = 16). Given a :class:`TaskStore`, a guide keeps each task site in :class:`StoredRows` instead:

- ``values`` [D, *row] and Adam's ``exp_avg`` and ``exp_avg_sq`` [D, *row] in host memory (pinned
  when the device is a GPU) or, with ``folder``, in files there for more tasks than host memory
  holds (:mod:`bora_pyro.row_arrays`: read and written a row at a time, sparse until written),
  and each task's Adam step count ``steps`` [D] in host memory;
- while the guide runs with gradients on, a task's row (and its moments) is copied to the device
  as a leaf the first time the batch asks for it (:meth:`StoredRows.select`; a fit asks first,
  with :meth:`TaskStore.fetch`, for the whole global batch);
- :meth:`TaskStore.attach` hands the batch's leaves and their saved moments to the optimizer
  before its step; :meth:`TaskStore.detach` writes the updated values and moments back and frees
  the leaves.

The copies go through :class:`~bora_pyro.row_traffic.RowTraffic`; :meth:`TaskStore.prefetch`
(which :func:`bora_pyro.fit` calls with the next batch's tasks) lets the next step's reads
overlap the running one, and a task stepped twice in a row stays on the device between them.

The optimizer updates these leaves with the same kernel and state as the in-memory leaves, so a
fit with a store ends with the same parameters, bit for bit on the CPU, as one without. Sites
outside the tasks plate (Θ, τ) stay ordinary parameters on the device.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .errors import ConfigError
from .row_arrays import FileRows, HostRows
from .row_traffic import MOMENTS, RowTraffic


#: Tasks whose rows one pass over a guide with a task store holds on the device (``evaluate``,
#: ``diagnose``, ``export_peft_all``, ``posterior_perplexities``): the store is read a pass at a
#: time, never all D rows at once.
TASKS_PER_PASS = 64


def task_passes(num_tasks: int) -> list[range]:
    """The tasks 0..D-1 in passes of :data:`TASKS_PER_PASS`."""
    return [range(start, min(start + TASKS_PER_PASS, num_tasks)) for start in range(0, num_tasks, TASKS_PER_PASS)]


class StoredRows(nn.Module):
    """One site's unconstrained values for D tasks, held by a :class:`TaskStore` (a drop-in for
    :class:`~bora_pyro.guides.taskwise.TaskRows`).

    Args:
        store: the store that holds the arrays.
        key: the store's name for them (the guide's attribute and the site, e.g. ``task_locs/task/lora``).
        init: [..., K, ...] values of K tasks along ``dim``; task d starts at row ``d % K``.
        dim: the tasks dim of the site's value (negative, counted from the right).
        num_tasks: D.
        is_location: a factor site's location (optimizer group 0), not a log σ or a hyperparameter.
    """

    def __init__(self, store: TaskStore, key: str, init: torch.Tensor, dim: int, num_tasks: int, is_location: bool):
        super().__init__()
        self.store, self.key, self.dim, self.is_location = store, key, dim, is_location
        self.device = init.device  # the guide's: where the leaves live
        rows = init.detach().movedim(dim, 0).to("cpu", torch.float32)  # [K, *row]
        if bool((rows == rows[:1]).all()):  # every task starts alike (LoRA's init, a prior's sd): keep one row
            rows = rows[:1]
        self.start_rows = rows.clone()  # task d started at row d % K
        shape = (num_tasks, *rows.shape[1:])
        self.values = store.allocate(key, "values", shape, self.device)
        for d in range(num_tasks):
            self.values[d] = rows[d % rows.shape[0]]
        self.allocated_moments: dict[str, HostRows | FileRows] = {}  # made at first use: see moments
        self.steps = torch.zeros(num_tasks)
        self.leaves: dict[int, nn.Parameter] = {}  # the tasks of the running step, on the device
        self.leaf_moments: dict[int, dict[str, torch.Tensor]] = {}  # theirs, for tasks stepped before

    def array(self, name: str) -> HostRows | FileRows:
        """``values`` or one of the :data:`MOMENTS`."""
        return self.values if name == "values" else self.moments[name]

    @property
    def num_tasks(self) -> int:
        return self.values.shape[0]

    @property
    def moments(self) -> dict[str, HostRows | FileRows]:
        """Adam's ``exp_avg`` and ``exp_avg_sq`` [D, *row], allocated at first use (a store that
        only reads a fitted run needs none)."""
        if not self.allocated_moments:
            self.allocated_moments = {name: self.store.allocate(self.key, name, self.values.shape, self.device)
                                      for name in MOMENTS}
        return self.allocated_moments

    def select(self, tasks: list[int] | None = None) -> list[torch.Tensor]:
        """The rows of ``tasks`` (all D when None), in that order, on the guide's device: for given
        tasks while gradients are on, leaves that the next optimizer step updates; else copies
        (read once per :meth:`TaskStore.holding` block)."""
        if tasks is None or not torch.is_grad_enabled():  # outside a step (median(), diagnostics, draws)
            wanted = range(self.num_tasks) if tasks is None else tasks
            held = {} if self.store.held is None else self.store.held
            for d in wanted:
                if (self.key, d) not in held:
                    held[self.key, d] = self.values.get(d, self.device)
            return [held[self.key, d] for d in wanted]
        traffic = self.store.traffic
        for d in tasks:
            if d not in self.leaves:
                self.leaves[d] = nn.Parameter(traffic.take(self, "values", d))
                if self.steps[d] > 0:
                    self.leaf_moments[d] = {name: traffic.take(self, name, d) for name in MOMENTS}
        return [self.leaves[d] for d in tasks]

    def start(self, tasks: Sequence[int]) -> torch.Tensor:
        """The rows ``tasks`` started at (before any fit), stacked along ``dim`` on the guide's
        device: [..., K, ...], without reading the store."""
        rows = torch.stack([self.start_rows[d % len(self.start_rows)] for d in tasks])
        return rows.movedim(0, self.dim).to(self.device)

    def forward(self, tasks: list[int] | None = None) -> torch.Tensor:
        """The rows of ``tasks`` (all D when None) stacked along ``dim``: [..., K, ...]."""
        return torch.stack(self.select(tasks), self.dim)

    # In a state dict the rows are named as :class:`TaskRows`'s leaves (``<prefix>rows.<d>``), so
    # that a guide saved with a store loads into one without (and back), unless the store leaves
    # them out (:func:`shared_state_dict`: what a fit snapshots and checkpoints itself).

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.store.rows_in_state_dict:
            destination.update({f"{prefix}rows.{d}": self.values[d] for d in range(self.num_tasks)})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if not self.store.rows_in_state_dict:
            return
        self.store.settle()
        with torch.no_grad():
            for d in range(self.num_tasks):
                key = f"{prefix}rows.{d}"
                if key not in state_dict:
                    missing_keys.append(key)
                elif tuple(state_dict[key].shape) != self.values.shape[1:]:
                    error_msgs.append(f"size mismatch for {key}: {tuple(state_dict[key].shape)} in the state dict, "
                                      f"{self.values.shape[1:]} here")
                else:
                    self.values[d] = state_dict[key]

    def extra_repr(self) -> str:
        return f"key={self.key!r}, rows={tuple(self.values.shape)}"


class TaskStore:
    """Where :class:`StoredRows` keep their arrays, and their traffic with the optimizer.

    Args:
        folder: keep the arrays in files here (created; one ``<key>.<array>.f32`` per site and
            array, working files that a fit's checkpoints do not need); None: host memory, pinned
            when the guide is on a GPU.

    Pass it to a guide (``map_guide(model, task_store=TaskStore())``); :func:`bora_pyro.fit`
    moves the batch's tasks through it at every step.
    """

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.sites: dict[str, StoredRows] = {}
        self.snapshot_values: dict[str, HostRows | FileRows] = {}  # per site: the values of the best check
        self.has_snapshot = False
        self.changed: set[int] = set()  # tasks stepped since the last snapshot
        self.unsaved: set[int] = set()  # tasks stepped or snapshotted since the last checkpoint
        self.shard_steps: torch.Tensor | None = None  # [D] the checkpoint step of each task's shard; -1: none
        self.rows_in_state_dict = True
        self.held: dict[tuple[str, int], torch.Tensor] | None = None  # rows kept by holding()
        self.traffic = RowTraffic(torch.device("cpu"))  # made again with the first site, on its device
        self.paths: set[Path] = set()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        """Forget the optimizer's state, the snapshot and the checkpoints of an earlier fit (the
        rows keep their values): a new fit starts its optimizer afresh."""
        self.settle()
        for rows in self.sites.values():
            rows.steps.zero_()  # a task without steps gets no moments: the optimizer starts them at 0
        self.has_snapshot, self.changed, self.unsaved, self.shard_steps = False, set(), set(), None

    def close(self) -> None:
        """Close the store's files (with ``folder``; their folder is then the caller's to remove),
        also when a write failed (raised here)."""
        try:
            self.settle()
        finally:
            for array in self.arrays():
                if isinstance(array, FileRows):
                    array.close()

    def arrays(self) -> list[HostRows | FileRows]:
        """Every array of the store: each site's values and moments (those made), and the snapshot's."""
        return [array for rows in self.sites.values()
                for array in (rows.values, *rows.allocated_moments.values())] + list(self.snapshot_values.values())

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Within it, a row read outside a step (a draw, a median) is read once and kept until the
        block ends: S draws of a pass of tasks read its rows once, not S times. Nothing may write
        the rows within it (no step)."""
        outer, self.held = self.held, {}
        try:
            yield
        finally:
            self.held = outer

    def settle(self) -> None:
        """Nothing read ahead, held on the device or being written: the arrays alone hold the rows
        (before anything outside a step reads or changes them; a failed write raises here)."""
        self.traffic.settle()
        for array in self.arrays():
            array.settle()

    def rows(self, key: str, init: torch.Tensor, dim: int, num_tasks: int, is_location: bool) -> StoredRows:
        """New :class:`StoredRows` for a site (see there for the arguments)."""
        if key in self.sites:
            raise ConfigError(f"the task store already holds {key!r}: give every guide a store of its own")
        self.sites[key] = StoredRows(self, key, init, dim, num_tasks, is_location)
        if len(self.sites) == 1:
            self.traffic = RowTraffic(self.sites[key].device)
        return self.sites[key]

    @property
    def bytes_moved(self) -> int:
        """Bytes of rows and moments moved between the store and the device by steps, both ways."""
        return self.traffic.bytes_moved

    def allocate(self, key: str, array: str, shape: tuple[int, ...], device: torch.device) -> HostRows | FileRows:
        """Zero float32 rows of ``shape`` off the device, for a guide on ``device``: a sparse file
        in ``folder``, or host memory (pinned for a GPU: copies to it can overlap compute)."""
        if self.folder is None:
            return HostRows(shape, pin=device.type == "cuda")
        path = self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.{array}.f32"
        if path in self.paths:  # two sites whose names differ only in characters a file name cannot hold
            raise ConfigError(f"two arrays of the task store would share the file {path}: rename a site")
        self.paths.add(path)
        return FileRows(path, shape)

    def fetch(self, tasks: list[int]) -> None:
        """Bring the rows of ``tasks`` of every site to the device as leaves, in this order (before
        a step, the global batch's tasks: every process of a data-parallel fit then holds the same
        leaves, whichever share of the batch it scores)."""
        with torch.enable_grad():
            for rows in self.sites.values():
                rows.select(tasks)
        self.traffic.forget_written()

    def prefetch(self, tasks: list[int]) -> None:
        """Start reading the rows of the next step's ``tasks`` (after :meth:`fetch`, before the
        running step; the running step's own tasks the next one takes from its write-back)."""
        running = {d for rows in self.sites.values() for d in rows.leaves}
        self.traffic.prefetch(self.sites, tasks, skip=running)

    def leaves(self) -> list[nn.Parameter]:
        """The leaves of the running step (every site, every task the guide asked for)."""
        return [leaf for rows in self.sites.values() for leaf in rows.leaves.values()]

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Add the leaves that have a gradient to ``optimizer``, with their saved moments.

        The group is that of :func:`bora_pyro.fit.optimizer_groups`: the only one, or the first
        (factor locations) / second (log σ, hyperparameters) of two. A task never stepped gets no
        state: the optimizer starts it as it would an in-memory leaf."""
        groups = optimizer.param_groups
        for rows in self.sites.values():
            group = groups[0 if len(groups) == 1 or rows.is_location else 1]
            for d, leaf in rows.leaves.items():
                if leaf.grad is None:
                    continue
                group["params"].append(leaf)
                if d in rows.leaf_moments:
                    optimizer.state[leaf] = {"step": rows.steps[d].to(leaf.device, copy=True)} | rows.leaf_moments[d]

    def detach(self, optimizer: torch.optim.Optimizer) -> None:
        """Write the stepped leaves and their moments back, take them out of ``optimizer``, free them."""
        held = {id(leaf) for leaf in self.leaves()}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in held]
        # out of the optimizer first: a write that fails (a full disk) leaves it consistent
        stepped = [(rows, d, leaf, optimizer.state.pop(leaf)) for rows in self.sites.values()
                   for d, leaf in rows.leaves.items() if leaf in optimizer.state]  # no state: no gradient, not stepped
        for rows, d, leaf, state in stepped:
            self.traffic.write(rows, d, {"values": leaf.detach()} | {name: state[name] for name in MOMENTS})
            rows.steps[d] = state["step"]
            self.changed.add(d)
            self.unsaved.add(d)
        self.discard()

    def discard(self) -> None:
        """Drop the running step's leaves without writing them back (a step that failed)."""
        for rows in self.sites.values():
            rows.leaves.clear()
            rows.leaf_moments.clear()

    def snapshot(self) -> None:
        """Remember the current values (the fit's best so far): copies only the tasks stepped
        since the last snapshot (all of them the first time)."""
        if not self.has_snapshot:
            self.take_first_snapshot()
            # a shard written before it holds no snapshot; a task never stepped has its start as one
            self.unsaved |= {d for d, step in enumerate(self.current_shard_steps().tolist()) if step >= 0}
        else:
            for key, rows in self.sites.items():
                for d in self.changed:
                    self.snapshot_values[key][d] = rows.values[d]
        self.unsaved |= self.changed
        self.changed.clear()

    def take_first_snapshot(self) -> None:
        """Every site's values now, into its snapshot array (allocated the first time)."""
        for key, rows in self.sites.items():
            if key not in self.snapshot_values:
                self.snapshot_values[key] = self.allocate(key, "snapshot", rows.values.shape, rows.device)
            for d in range(rows.num_tasks):
                self.snapshot_values[key][d] = rows.values[d]
        self.has_snapshot = True

    def restore_snapshot(self) -> None:
        """Put back the values of the last :meth:`snapshot` (their moments stay: the fit is over)."""
        if not self.has_snapshot:
            return
        self.settle()
        for key, rows in self.sites.items():
            for d in self.changed:
                rows.values[d] = self.snapshot_values[key][d]
        self.changed.clear()

    # Checkpoints: one safetensors shard per task, ``<task>.<step>.safetensors``, holding every
    # site's row, moments, step count and snapshot. A checkpoint writes the shards of the tasks
    # changed since the last one; the checkpoint file names each task's current shard
    # (``shard_steps``) and is written after them, so a crash between the two leaves the previous
    # checkpoint whole (its shards are removed only once the new file is in place).

    def write_shards(self, folder: Path, step: int) -> dict[str, torch.Tensor]:
        """Write the shards of the tasks changed since the last committed checkpoint; what the
        checkpoint file then holds of the store: ``tasks.shard_steps`` [D] int64, each task's shard
        (-1: never written, still at its start), and ``tasks.changed`` [D] bool, the tasks stepped
        since the last snapshot."""
        from .run import atomic_write, make_dir

        make_dir(folder)
        shard_steps = self.current_shard_steps().clone()
        for d in sorted(self.unsaved):
            tensors = {}
            for key, rows in self.sites.items():
                tensors |= {f"{key}.values": rows.values[d], f"{key}.steps": rows.steps[d:d + 1]}
                tensors |= {f"{key}.{name}": rows.moments[name][d] for name in MOMENTS}
                if self.has_snapshot:
                    tensors[f"{key}.snapshot"] = self.snapshot_values[key][d]
            tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
            atomic_write(folder / shard_name(d, step), lambda temp: safetensors.torch.save_file(tensors, temp))
            shard_steps[d] = step
        changed = torch.zeros(self.num_tasks, dtype=torch.bool)
        changed[sorted(self.changed)] = True
        return {"tasks.shard_steps": shard_steps, "tasks.changed": changed}

    def commit(self, folder: Path, shard_steps: torch.Tensor) -> None:
        """The checkpoint naming ``shard_steps`` is written: forget the saved changes and remove
        the shards it no longer names."""
        self.shard_steps, self.unsaved = shard_steps.clone(), set()
        current = {shard_name(d, int(step)) for d, step in enumerate(shard_steps.tolist()) if step >= 0}
        for path in folder.glob("*.safetensors"):
            if path.name not in current:
                path.unlink(missing_ok=True)

    def read_shards(self, folder: Path, shard_steps: torch.Tensor, changed: torch.Tensor, has_snapshot: bool) -> None:
        """Load the checkpoint naming ``shard_steps`` (and ``changed``, see :meth:`write_shards`)
        into a store built like the saved one (a task without a shard stays at its start)."""
        from .run import read_tensors

        self.start()
        if has_snapshot:
            self.take_first_snapshot()
        with torch.no_grad():
            for d, step in enumerate(shard_steps.tolist()):
                if step < 0:
                    continue
                tensors, _ = read_tensors(folder / shard_name(d, step))
                for key, rows in self.sites.items():
                    rows.values[d] = tensors[f"{key}.values"]
                    rows.steps[d] = tensors[f"{key}.steps"][0]
                    for name in MOMENTS:
                        rows.moments[name][d] = tensors[f"{key}.{name}"]
                    if has_snapshot:
                        self.snapshot_values[key][d] = tensors[f"{key}.snapshot"]
        self.shard_steps, self.changed = shard_steps.clone(), set(changed.nonzero().flatten().tolist())

    def current_shard_steps(self) -> torch.Tensor:
        """[D] the step of each task's shard in the last committed checkpoint (-1: none)."""
        return self.shard_steps if self.shard_steps is not None else torch.full((self.num_tasks,), -1)

    @property
    def num_tasks(self) -> int:
        return next(iter(self.sites.values())).num_tasks if self.sites else 0  # a prior without task sites


def shard_name(task: int, step: int) -> str:
    return f"{task}.{step}.safetensors"


@contextlib.contextmanager
def rows_left_out(guide) -> Iterator[None]:
    """Within it, the guide's state dict (saved or loaded) leaves out the rows of its task store."""
    store = guide_task_store(guide)
    if store is None:
        yield
        return
    store.rows_in_state_dict = False
    try:
        yield
    finally:
        store.rows_in_state_dict = True


def shared_state_dict(guide) -> dict[str, torch.Tensor]:
    """``guide.state_dict()`` without its task store's rows (all of it for a guide without one)."""
    with rows_left_out(guide):
        return guide.state_dict()


def load_shared_state_dict(guide, state: dict[str, torch.Tensor]) -> None:
    """``guide.load_state_dict(state)`` of a :func:`shared_state_dict`."""
    with rows_left_out(guide):
        guide.load_state_dict(state)


def guide_task_store(guide) -> TaskStore | None:
    """The :class:`TaskStore` of ``guide`` or of its parts (an ``AutoGuideList``), or None."""
    parts = list(guide) if isinstance(guide, nn.ModuleList) else [guide]
    found = (getattr(part, "task_store", None) for part in parts)
    stores = list({id(store): store for store in found if store is not None}.values())
    if len(stores) > 1:
        raise ConfigError("the parts of this guide hold their tasks in different task stores: give them one")
    return stores[0] if stores else None

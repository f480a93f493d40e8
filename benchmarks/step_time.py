"""Time and peak memory of one training step: BoRA against plain LoRA, for D = 1, 25, 100 tasks.

    python benchmarks/step_time.py                     # GPT-2-small shape, ≈ 10–11 min on 2 CPU cores
    python benchmarks/step_time.py --quick             # a small shape, ≈ 1 min (--shape quick)
    python benchmarks/step_time.py --shape smollm2     # SmolLM2-135M's shape (Llama, GQA, 49k vocabulary)
    python benchmarks/step_time.py --json steps.json   # also the table as JSON (each row with its settings),
                                                       # and steps.summary.json: D ratios, floats, predictive

Variants, each in a fresh subprocess (peak RSS only grows within a process), on the same base
model (from a config, random, frozen), batches of 8 rows from mixed tasks, fp32. Shapes: ``full``
(GPT-2 small: 12 layers × 768, vocabulary 8192, rank 16 on c_attn/c_proj/c_fc), ``quick``, and
``smollm2`` (SmolLM2-135M: a Llama of 30 layers × 576, 9 heads and 3 key/value heads, vocabulary
49,152, tied embeddings, rank 8 on all 7 projections of each layer = 210 modules), where the
[8, 128, 49152] logits (200 MB in float32) make the output layer the step's largest tensor: peft
scores through them, bora-pyro by chunks (``bora_pyro/token_nll.py``). Variants:

- ``peft``: one peft LoRA adapter, cross-entropy, AdamW (torch's fused kernel, as bora-pyro's
  Adam): the plain LoRA step everything is compared to (``ratio_to_peft``);
- ``paper-loop``: the paper's code style, peft with D + 1 adapters (Θ and one per task), one
  forward per task present in the batch with ``set_adapter``, the prior ``τ/2 ‖θ_d − Θ‖²`` of
  those tasks, AdamW over all adapters;
- ``map`` / ``mean-field``: bora-pyro's own step (:class:`bora_pyro.fit.SVIStep`: ``Trace_ELBO``
  of :class:`~bora_pyro.models.BoRA` with ``HierarchicalNormal(100)``, ``map_guide`` /
  ``mean_field_guide``, Adam as ``fit`` makes it, inside ``fit``'s ``reuse_large_blocks``).

Every multi-task variant (paper-loop, map, mean-field) first runs ⌈D / 8⌉ steps whose batches
cover every task, so that every task has its optimizer state: the steady state is measured
(otherwise at D = 100 most tasks of the timed batches would be new, and their Adam state's
creation would be timed too). The machine's speed drifts by 20 % over minutes, so times are
measured side by side: each variant runs in one process with a peft model, their steps
interleaved on the same random mixed-task batches (2 warm-up rounds, then the timed ones);
``median_ms`` is the variant's median step time and ``ratio_to_peft`` its ratio to the median
of the peft steps beside it. The peft row's ``median_ms`` is the median over those processes.
Peak RSS is the variant's own: read in its process after the covering steps and 2 more, before
the peft model it is timed beside is built (peft's own in a process of its own).

Task-store variants (``map-store``, ``mean-field-store``, :class:`bora_pyro.TaskStore` in files on
disk, ``--store-tasks`` D = 1, 100, 1000, 10000): every task is first given Adam moments on disk
and a step count (the steady state, without ⌈D / 8⌉ covering steps); each is timed beside peft
and beside the in-memory step at D = 1 of the same rank (``ratio_to_in_memory_D1``), with its
peak RSS before those two are built, all tasks' state (``state_mb``: rows and two moments) and the
bytes moved per step. The rank is the shape's, halved until the state fits ``--store-disk-gb``.

Also printed: the floats per adapter parameter of mean-field at the largest D (peak RSS over
peft's, per adapter parameter of all tasks), and the predictive throughput: S posterior draws of
every task's factors scored on a test set against S plain forward passes with fixed factors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # architecture, layers, width, heads, vocab, rank, adapted modules, tokens per row, timed steps
    "full": dict(model="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=8192, rank=16, targets=GPT2_TARGETS,
                 length=128, steps=6),
    "quick": dict(model="gpt2", n_layer=2, n_embd=128, n_head=4, vocab_size=1024, rank=8, targets=GPT2_TARGETS,
                  length=32, steps=10),
    "smollm2": dict(model="llama", n_layer=30, n_embd=576, n_head=9, n_kv_head=3, intermediate=1536,
                    vocab_size=49152, rank=8, targets=LLAMA_TARGETS, length=128, steps=4),
}
BATCH, WARMUP, TAU, DOCS_PER_TASK = 8, 2, 100.0, 100
#: Steps a task-store variant takes in a row per timed round: the second reads its rows ahead,
#: during the first, as in a fit (the first reads them cold: the figure errs on the slow side).
STORE_BLOCK = 2
STORE_TASKS, STORE_DISK_GB = [1, 100, 1000, 10000], 60.0
#: What a task-store row of ``--json`` has beyond the others' keys.
STORE_KEYS = ("rank", "ratio_to_in_memory_D1", "state_mb", "bytes_moved_per_step")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def base_model(shape: dict):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if shape["model"] == "llama":
        config = LlamaConfig(num_hidden_layers=shape["n_layer"], hidden_size=shape["n_embd"],
                             num_attention_heads=shape["n_head"], num_key_value_heads=shape["n_kv_head"],
                             intermediate_size=shape["intermediate"], vocab_size=shape["vocab_size"],
                             max_position_embeddings=shape["length"], tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
                            vocab_size=shape["vocab_size"], n_positions=shape["length"], resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
    return model.to(shape["device"], getattr(torch, shape["base_dtype"])).eval().requires_grad_(False)


def random_batch(shape: dict, num_tasks: int, generator, task_ids=None):
    """A Batch of 8 random rows; tasks uniform over D unless given."""
    import torch

    from bora_pyro.data import Batch

    ids = torch.randint(0, shape["vocab_size"], (BATCH, shape["length"]), generator=generator)
    if task_ids is None:
        task_ids = torch.randint(0, num_tasks, (BATCH,), generator=generator)
    doc_ids = task_ids * DOCS_PER_TASK + torch.arange(BATCH)  # distinct documents of those tasks
    return Batch(ids, torch.ones_like(ids), task_ids, doc_ids, DOCS_PER_TASK * num_tasks,
                 torch.full((BATCH,), DOCS_PER_TASK)).to(shape["device"])


def covering_batches(variant: str, shape: dict, num_tasks: int):
    """⌈D / 8⌉ batches whose rows go through every task once, run by a multi-task variant before
    it is measured so that every task has its optimizer state (none for peft)."""
    import torch

    if variant == "peft":
        return []
    generator = torch.Generator().manual_seed(2)
    tasks = torch.arange(math.ceil(num_tasks / BATCH) * BATCH) % num_tasks
    return [random_batch(shape, num_tasks, generator, tasks[i: i + BATCH]) for i in range(0, len(tasks), BATCH)]


def peft_model(shape: dict, adapter_name: str = "default"):
    """The base model with one peft LoRA adapter ``adapter_name``, and its LoraConfig (to add more)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=shape["rank"], lora_alpha=2 * shape["rank"], target_modules=shape["targets"],
                        fan_in_fan_out=shape["model"] == "gpt2")  # GPT-2's Conv1D stores weights transposed
    return get_peft_model(base_model(shape), config, adapter_name=adapter_name), config


def peft_step(shape: dict, num_tasks: int):
    """One peft LoRA adapter (``num_tasks`` is ignored): forward, cross-entropy, AdamW."""
    import torch

    model, _ = peft_model(shape)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step(batch):
        loss = model(input_ids=batch.input_ids, labels=batch.input_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def paper_loop_step(shape: dict, num_tasks: int):
    """peft with adapters ``global`` and ``task<d>``; one forward per task of the batch."""
    import torch

    model, config = peft_model(shape, "global")
    for d in range(num_tasks):
        model.add_adapter(f"task{d}", config)
    adapters = {name: [p for n, p in model.named_parameters() if f".{name}." in n]
                for name in ["global"] + [f"task{d}" for d in range(num_tasks)]}
    optimizer = torch.optim.AdamW([p for params in adapters.values() for p in params], lr=1e-4, fused=True)

    def step(batch):
        loss = 0.0
        for d in batch.task_ids.unique().tolist():
            model.base_model.set_adapter(f"task{d}")
            for params in adapters.values():  # set_adapter turns requires_grad off on every other adapter
                for p in params:
                    p.requires_grad_(True)
            rows = batch.task_ids == d
            loss = loss + model(input_ids=batch.input_ids[rows], labels=batch.input_ids[rows]).loss * int(rows.sum())
            loss = loss + TAU / 2 * sum(((p - g) ** 2).sum() for p, g in zip(adapters[f"task{d}"], adapters["global"]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bora_step(shape: dict, num_tasks: int, guide_kind: str, task_store=None):
    """bora-pyro's step; with ``task_store``, as ``fit`` takes it: the batch's tasks fetched first."""
    import torch

    from bora_pyro import MultiTaskLM
    from bora_pyro.fit import SVIStep, make_optimizer
    from bora_pyro.guides import map_guide, mean_field_guide
    from bora_pyro.models import BoRA, HierarchicalNormal

    lm = MultiTaskLM(base_model(shape), rank=shape["rank"], alpha=2 * shape["rank"], target_modules=shape["targets"])
    model = BoRA(lm, HierarchicalNormal(TAU), num_tasks)
    guide = (map_guide if guide_kind == "map" else mean_field_guide)(model, task_store=task_store)
    with torch.no_grad():
        guide(random_batch(shape, num_tasks, torch.Generator().manual_seed(1), torch.zeros(BATCH, dtype=torch.long)))
    svi_step = SVIStep(model, guide, make_optimizer("adam", [{"params": list(guide.parameters())}], 1e-4),
                       task_store=task_store)
    return svi_step if task_store is None else StoreSteps(svi_step, task_store)


class StoreSteps:
    """Steps with a task store, as ``fit`` takes them: the batch's tasks fetched, the next batch's
    read ahead."""

    def __init__(self, svi_step, task_store):
        self.svi_step, self.task_store = svi_step, task_store

    def block(self, batches: list, next_batch=None) -> None:
        """Steps on ``batches`` in a row; the last reads ``next_batch``'s rows ahead (the next
        block's first batch, which a fit would step next)."""
        for batch, after in zip(batches, [*batches[1:], next_batch]):
            self.task_store.fetch(batch.task_ids.unique().tolist())
            if after is not None:
                self.task_store.prefetch(after.task_ids.unique().tolist())
            self.svi_step(batch)


def run_block(step, batches: list, next_batch=None) -> None:
    """``step`` on each of ``batches``; a :class:`StoreSteps` takes them as one block (reading
    ``next_batch`` ahead)."""
    if isinstance(step, StoreSteps):
        step.block(batches, next_batch)
    else:
        for batch in batches:
            step(batch)


MAKE_STEP = {"peft": peft_step, "paper-loop": paper_loop_step,
             "map": lambda shape, d: bora_step(shape, d, "map"),
             "mean-field": lambda shape, d: bora_step(shape, d, "mean-field")}


def allocator(variant: str):
    """What ``fit`` runs bora-pyro's steps in (the others run as they would in their own loops)."""
    import torch

    from bora_pyro.allocator import reuse_large_blocks

    bora_pyro_step = variant.startswith(("map", "mean-field"))
    return reuse_large_blocks(torch.device("cpu")) if bora_pyro_step else contextlib.nullcontext()


def peak_memory(shape: dict) -> dict:
    """The process's peak RSS, and on a GPU the peak of torch's allocations there."""
    import torch

    memory = {"peak_rss_mb": peak_rss_mb()}
    if shape["device"].startswith("cuda"):
        memory["peak_gpu_mb"] = torch.cuda.max_memory_allocated(shape["device"]) / 2**20
    return memory


def synchronize(shape: dict) -> None:
    """Wait for the GPU's queued work (a step's time is its work's, not its launch's)."""
    import torch

    if shape["device"].startswith("cuda"):
        torch.cuda.synchronize(shape["device"])


def steady_step(variant: str, num_tasks: int, shape: dict):
    """The step of ``variant`` after its covering steps and 2 more (Adam's state of a task is
    created the first time the task is in a batch: at D = 100 most tasks of the timed batches
    would be new), and the peak RSS of the process then."""
    import torch

    step = MAKE_STEP[variant](shape, num_tasks)
    generator = torch.Generator().manual_seed(3)
    with allocator(variant):
        warmup = [random_batch(shape, num_tasks, generator) for _ in range(WARMUP)]
        for batch in covering_batches(variant, shape, num_tasks) + warmup:
            step(batch)
    synchronize(shape)
    return step, peak_memory(shape)


def measure_memory(variant: str, num_tasks: int, shape: dict) -> dict:
    """Peak RSS of ``variant`` alone in its steady state."""
    return steady_step(variant, num_tasks, shape)[1]


def measure_time(variant: str, num_tasks: int, shape: dict) -> dict:
    """Peak RSS of ``variant`` alone in its steady state, then the median step times of
    ``variant`` and of peft, their steps interleaved in one process (the machine's drift then
    hits both alike), on the same random batches."""
    step, memory = steady_step(variant, num_tasks, shape)
    times = interleaved_times({"peft": peft_step(shape, 1), variant: step}, num_tasks, shape)
    return memory | {"median_ms": times[variant], "peft_ms": times["peft"]}


def interleaved_times(steps: dict, num_tasks: int, shape: dict, one_task: tuple[str, ...] = (),
                      block: int = 1) -> dict[str, float]:
    """The median step time (ms) of each of ``steps``, their steps interleaved (their order turned
    round by round) on the same random batches of D tasks, ``block`` steps in a row per round
    (timed together); the steps named in ``one_task`` take them as batches of one task (a model
    of D = 1)."""
    import torch

    generator = torch.Generator().manual_seed(3)
    rounds = [[random_batch(shape, num_tasks, generator) for _ in range(block)] for _ in range(WARMUP + shape["steps"])]
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round, (batches, next_batches) in enumerate(zip(rounds, [*rounds[1:], [None]])):
        for name in (list(steps) if round % 2 else list(steps)[::-1]):
            rows = [one_task_batch(batch) for batch in batches] if name in one_task else batches
            with allocator(name):
                synchronize(shape)
                started = time.perf_counter()
                run_block(steps[name], rows, next_batches[0])
                synchronize(shape)
                elapsed = 1000 * (time.perf_counter() - started) / block
            if round >= WARMUP:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def one_task_batch(batch):
    """``batch``'s rows as documents of task 0 of a model of one task."""
    import torch

    from bora_pyro.data import Batch

    zeros = torch.zeros_like(batch.task_ids)
    return Batch(batch.input_ids, batch.attention_mask, zeros, torch.arange(len(zeros), device=zeros.device),
                 DOCS_PER_TASK, torch.full_like(zeros, DOCS_PER_TASK))


def store_rank(shape: dict, num_tasks: int, guide_kind: str, disk_gb: float, rank_one_params: int) -> int:
    """The shape's rank, halved until the state of all D tasks fits ``disk_gb``: each task's rows
    and Adam's two moments, 3 floats per adapter parameter for MAP, 6 for mean-field (loc, log σ)."""
    rank, floats = shape["rank"], 3 if guide_kind == "map" else 6
    while rank > 1 and num_tasks * floats * 4 * rank_one_params * rank > disk_gb * 2**30:
        rank //= 2
    return rank


def prefill(store) -> None:
    """Give every task of ``store`` Adam moments (written to disk) and a step count: the steady
    state of a fit that has seen every task, without the ⌈D / 8⌉ covering steps (1,250 at D = 10,000)."""
    import torch

    from bora_pyro.task_store import MOMENTS

    for rows in store.sites.values():
        filler = torch.full(rows.values.shape[1:], 1e-6)
        for d in range(rows.num_tasks):
            for name in MOMENTS:
                rows.moments[name][d] = filler
        rows.steps.fill_(1.0)


def measure_store(guide_kind: str, num_tasks: int, rank: int, shape: dict, folder: str) -> dict:
    """A step with the task store (on disk in ``folder``, or pinned host memory with
    ``--store-backend host``; every task with its moments), timed beside peft and beside the
    in-memory step at D = 1, all three at ``rank`` and :data:`STORE_BLOCK` steps in a row per
    round (so that the store reads rows ahead as in a fit: every step, a block's first too, takes
    the rows read ahead during the store's step before it); the store step's peak memory (before
    the other two are built) and bytes moved per step."""
    import torch

    from bora_pyro import TaskStore

    shape = shape | {"rank": rank}
    store = TaskStore(folder if shape["store_backend"] == "disk" else None)
    step = bora_step(shape, num_tasks, guide_kind, store)
    prefill(store)
    generator = torch.Generator().manual_seed(3)
    with allocator(guide_kind):
        run_block(step, [random_batch(shape, num_tasks, generator) for _ in range(WARMUP * STORE_BLOCK)])
    synchronize(shape)
    memory = peak_memory(shape)
    variant = f"{guide_kind}-store"
    moved = store.bytes_moved
    in_memory = f"{guide_kind}-D1"
    times = interleaved_times({"peft": peft_step(shape, 1), variant: step, in_memory: bora_step(shape, 1, guide_kind)},
                              num_tasks, shape, one_task=(in_memory,), block=STORE_BLOCK)
    steps = (WARMUP + shape["steps"]) * STORE_BLOCK
    state = sum(rows.num_tasks * (1 + 2) * 4 * math.prod(rows.values.shape[1:]) for rows in store.sites.values())
    return memory | {"median_ms": times[variant], "peft_ms": times["peft"], "in_memory_D1_ms": times[in_memory],
                     "rank": rank, "state_mb": state / 2**20,
                     "bytes_moved_per_step": (store.bytes_moved - moved) / steps}


def measure_predictive(shape: dict, num_tasks: int, samples: int) -> dict:
    """Seconds for S posterior draws scored on a test set, and for S plain passes with fixed factors."""
    import pyro
    import torch

    from bora_pyro import MultiTaskLM
    from bora_pyro.data import Batch, DocumentSet
    from bora_pyro.evaluate import document_log_probs
    from bora_pyro.guides import mean_field_guide
    from bora_pyro.models import BoRA, HierarchicalNormal
    from bora_pyro.predictive import posterior_factors, sample_perplexities

    lm = MultiTaskLM(base_model(shape), rank=shape["rank"], alpha=2 * shape["rank"], target_modules=shape["targets"])
    model = BoRA(lm, HierarchicalNormal(TAU), num_tasks)
    guide = mean_field_guide(model, init_scale=0.01)
    with torch.no_grad():
        guide(Batch.probe(device=lm.device))
    generator = torch.Generator().manual_seed(4)
    documents = DocumentSet([torch.randint(1, shape["vocab_size"], (shape["length"],), generator=generator).tolist()
                             for _ in range(4 * num_tasks)], [d % num_tasks for d in range(4 * num_tasks)])
    fixed = model.task_factors(guide.median())
    started = time.perf_counter()
    for _ in range(samples):
        document_log_probs(lm, fixed, documents, pad_token_id=0)
    plain = time.perf_counter() - started
    pyro.set_rng_seed(0)
    started = time.perf_counter()
    sample_perplexities(lm, posterior_factors(model, guide, Batch.probe(device=lm.device), samples), documents,
                        [str(d) for d in range(num_tasks)], pad_token_id=0)
    return {"samples": samples, "plain_s": plain, "draws_s": time.perf_counter() - started}


def child(args, *extra: str) -> dict:
    """Run ``--child *extra`` in a fresh process and return its JSON."""
    command = [sys.executable, __file__, "--shape", args.shape, "--device", args.device, "--base-dtype",
               args.base_dtype, "--store-backend", args.store_backend, "--child", *extra]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def d_ratio(rows: list[dict], variant: str) -> float:
    """A variant's ratio to peft at the largest D over its ratio at the smallest."""
    by_d = {row["D"]: row for row in rows if row["variant"] == variant}
    return by_d[max(by_d)]["ratio_to_peft"] / by_d[min(by_d)]["ratio_to_peft"]


def store_rows(args, shape: dict, adapter_params: int) -> list[dict]:
    """The task-store variants at ``--store-tasks``, each in a process of its own with its store in
    a folder removed after it; ``adapter_params``: per task at the shape's rank."""
    rank_one = adapter_params // shape["rank"]  # r·(in + out) per module
    rows = []
    for guide_kind in ("map", "mean-field"):
        for num_tasks in args.store_tasks:
            rank = store_rank(shape, num_tasks, guide_kind, args.store_disk_gb, rank_one)
            folder = tempfile.mkdtemp(prefix="bora-store-", dir=args.store_dir)
            try:
                row = {"variant": f"{guide_kind}-store", "D": num_tasks}
                row |= child(args, "store", guide_kind, str(num_tasks), str(rank), folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            row["ratio_to_peft"] = row["median_ms"] / row.pop("peft_ms")
            row["ratio_to_in_memory_D1"] = row["median_ms"] / row.pop("in_memory_D1_ms")
            print(f"{row['variant']:<17} D={num_tasks:<6} r={rank:<3} {row['median_ms']:>7.0f} ms "
                  f"{row['ratio_to_peft']:.2f}× peft {row['ratio_to_in_memory_D1']:.2f}× in-memory D=1, "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB, state {row['state_mb']:.0f} MB, "
                  f"{row['bytes_moved_per_step'] / 2**20:.1f} MB moved per step", flush=True)
            rows.append(row)
    return rows


def summary_path(json_path: str) -> str:
    """Where ``--json FILE`` puts the figures beside the step table: ``FILE``'s stem + ``.summary.json``."""
    return json_path.removesuffix(".json") + ".summary.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="full", help="the base model's shape (see above)")
    parser.add_argument("--quick", action="store_true", help="--shape quick: 2 layers × 128, ≈ 1 min")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 25, 100], help="the values of D")
    parser.add_argument("--samples", type=int, default=4, help="S of the predictive throughput check")
    parser.add_argument("--store-tasks", type=int, nargs="*", default=STORE_TASKS,
                        help="the values of D of the task-store variants (none: skip them)")
    parser.add_argument("--store-dir", help="where the task stores' files go (default: a temp folder; removed after)")
    parser.add_argument("--store-disk-gb", type=float, default=STORE_DISK_GB,
                        help="the most disk one store may fill: the rank is halved until its state fits")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--base-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the frozen base's weights (adapters, guide and peft's LoRA weights stay float32)")
    parser.add_argument("--store-backend", choices=("disk", "host"),
                        help="where the task-store variants keep the tasks (default disk on a CPU, pinned host "
                             "memory on a GPU)")
    parser.add_argument("--json", metavar="FILE", help="write the step table as JSON to FILE")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    started = time.perf_counter()
    args.shape = "quick" if args.quick else args.shape
    args.store_backend = args.store_backend or ("disk" if args.device == "cpu" else "host")
    shape = SHAPES[args.shape] | {"device": args.device, "base_dtype": args.base_dtype,
                                  "store_backend": args.store_backend}
    if args.child:
        kind, *values = args.child
        measure = {"predictive": lambda: measure_predictive(shape, int(values[0]), args.samples),
                   "memory": lambda: measure_memory(values[0], int(values[1]), shape),
                   "time": lambda: measure_time(values[0], int(values[1]), shape),
                   "store": lambda: measure_store(values[0], int(values[1]), int(values[2]), shape, values[3])}[kind]
        print(json.dumps(measure()))
        return

    rows = [{"variant": variant, "D": d} for variant in ("paper-loop", "map", "mean-field") for d in args.tasks]
    for row in rows:
        row.update(child(args, "time", row["variant"], str(row["D"])))
        row["ratio_to_peft"] = row["median_ms"] / row.pop("peft_ms")
    peft = {"variant": "peft", "D": 1, "median_ms": statistics.median(row["median_ms"] / row["ratio_to_peft"]
                                                                      for row in rows), "ratio_to_peft": 1.0}
    peft.update(child(args, "memory", "peft", "1"))
    rows.insert(0, peft)
    from bora_pyro import MultiTaskLM

    adapter_params = MultiTaskLM(base_model(shape), rank=shape["rank"],
                                 target_modules=shape["targets"]).num_adapter_params
    rows += store_rows(args, shape, adapter_params)
    print(f"{'variant':<11} {'D':>4} {'step ms':>9} {'× peft':>7} {'peak RSS MB':>12}")
    for row in rows:
        print(f"{row['variant']:<11} {row['D']:>4} {row['median_ms']:>9.0f} {row['ratio_to_peft']:>7.2f} "
              f"{row['peak_rss_mb']:>12.0f}")
    for variant in ("map", "mean-field"):
        print(f"{variant}: step at D={max(args.tasks)} / D={min(args.tasks)}: {d_ratio(rows, variant):.3f} "
              "(of their ratios to peft)")
    largest = max(args.tasks)
    mean_field = next(row for row in rows if row["variant"] == "mean-field" and row["D"] == largest)
    floats = (mean_field["peak_rss_mb"] - peft["peak_rss_mb"]) * 2**20 / 4 / (largest * adapter_params)
    print(f"mean-field at D={largest}: peak RSS − peft's = {floats:.2f} floats per adapter parameter "
          f"({adapter_params:,} per task)")
    predictive = child(args, "predictive", str(min(25, largest)))
    print(f"predictive, S={predictive['samples']} draws: {predictive['draws_s']:.2f} s vs {predictive['plain_s']:.2f} s "
          f"for S plain passes: throughput {predictive['plain_s'] / predictive['draws_s']:.3f}× of S plain passes")
    if args.json:
        from bora_pyro.precision import machine_description

        settings = {"shape": args.shape, **shape, "batch": BATCH, "warmup_rounds": WARMUP,
                    "tau": TAU, "target_modules": shape["targets"], "precision": args.base_dtype, "device": args.device,
                    "machine": machine_description(args.device)}
        with open(args.json, "w") as file:  # the rows' keys as they have always been, plus their settings
            json.dump([{key: row[key] for key in ("variant", "D", "median_ms", "ratio_to_peft", "peak_rss_mb")}
                       | settings | {key: row[key] for key in (*STORE_KEYS, "peak_gpu_mb") if key in row}
                       for row in rows],
                      file, indent=1)
        summary = {"d_ratio": {variant: d_ratio(rows, variant) for variant in ("map", "mean-field")},
                   "floats_per_adapter_parameter": floats, "adapter_params_per_task": adapter_params,
                   "predictive": predictive | {"throughput": predictive["plain_s"] / predictive["draws_s"]},
                   "minutes": round((time.perf_counter() - started) / 60, 1), **settings}
        with open(summary_path(args.json), "w") as file:
            json.dump(summary, file, indent=1)


if __name__ == "__main__":
    main()

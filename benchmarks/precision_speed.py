"""bf16 autocast against float32 on this machine's CPU, side by side: is ``bf16_is_fast`` right here?

    python benchmarks/precision_speed.py --json benchmarks/results/precision_speed.json   # ≈ 3 min on 2 cores

Two steps at the main job's shapes (``examples/shakespeare_speakers.py``), each timed in float32
and under ``torch.autocast("cpu", bfloat16)``, their steps interleaved in one process (the
machine's speed drifts over minutes), medians of ``--rounds`` rounds after one warm-up round:

- ``pretrain``: a training step of the base model (GPT-2 6×384, vocab 4096, 16 × 128 tokens,
  AdamW), as ``bora_pyro.pretrain.train_lm`` takes it;
- ``fit``: a MAP step of BoRA (rank 8 on ``c_attn c_proj c_fc``, 25 tasks, 16 × 128 tokens from
  mixed tasks, ``HierarchicalNormal(1e3)`` non-centred), as ``fit`` takes it.

Where the CPU has no bf16 instructions, torch emulates bf16 and ``float32_over_bf16`` falls far
below 1 (~0.05 measured on an AVX2-only CPU); where it has them, above 1. The JSON also records
``bf16_is_fast``: what the examples and the pretraining choose here by default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bora_pyro import MultiTaskLM
from bora_pyro.data import Batch
from bora_pyro.fit import SVIStep, make_optimizer
from bora_pyro.guides import map_guide
from bora_pyro.models import BoRA, HierarchicalNormal
from bora_pyro.precision import bf16_is_fast, machine_description
from bora_pyro.pretrain import BaseModelConfig, build_model

ROWS, LENGTH, TASKS = 16, 128, 25


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def pretrain_step(bf16: bool):
    """One AdamW step of the freshly built base model on random tokens."""
    config = BaseModelConfig()
    model = build_model(config, config.vocab_size, 0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(1, config.vocab_size, (ROWS, LENGTH + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with autocast(bf16):
            logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def fit_step(bf16: bool):
    """One SVI step of MAP BoRA on a batch of 16 documents of random tasks."""
    config = BaseModelConfig()
    lm = MultiTaskLM(build_model(config, config.vocab_size, 0).eval(), rank=8, alpha=16)
    model = BoRA(lm, HierarchicalNormal(1e3, centered=False), TASKS)
    guide = map_guide(model)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, config.vocab_size, (ROWS, LENGTH), generator=generator)
    task_ids = torch.randint(0, TASKS, (ROWS,), generator=generator)
    batch = Batch(ids, torch.ones_like(ids), task_ids, torch.arange(ROWS), 80 * TASKS,
                  torch.full((ROWS,), 80, dtype=torch.long))
    with torch.no_grad():
        guide(batch)
    svi_step = SVIStep(model, guide, make_optimizer("adam", [{"params": list(guide.parameters())}], 1e-4), autocast(bf16))
    return lambda: svi_step(batch)


def timed(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each: one step of each precision)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures and the machine as JSON to FILE")
    args = parser.parse_args()
    results = {}
    for name, make in (("pretrain", pretrain_step), ("fit", fit_step)):
        steps = {"float32": make(False), "bf16": make(True)}
        times = {precision: [] for precision in steps}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for precision, step in steps.items():
                seconds = timed(step)
                if round_:
                    times[precision].append(seconds)
        medians = {precision: statistics.median(values) for precision, values in times.items()}
        results[name] = {"float32_s": medians["float32"], "bf16_s": medians["bf16"],
                         "float32_over_bf16": medians["bf16"] / medians["float32"]}
        print(f"{name:<9} float32 {medians['float32']:.3f} s  bf16 autocast {medians['bf16']:.3f} s  "
              f"float32 is {medians['bf16'] / medians['float32']:.2f}x as fast", flush=True)
    summary = {"steps": results, "bf16_is_fast": bf16_is_fast("cpu"), "rounds": args.rounds,
               "shape": {"rows": ROWS, "length": LENGTH, "tasks": TASKS, "base": "GPT-2 6x384, vocab 4096", "rank": 8},
               "machine": machine_description("cpu")}
    print(f"bf16_is_fast here: {summary['bf16_is_fast']} ({summary['machine']['cpu_bf16_features'] or 'no bf16 instructions'})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()

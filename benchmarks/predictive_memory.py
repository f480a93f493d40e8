"""Peak memory of posterior predictive perplexity as the number of samples S grows.

    python benchmarks/predictive_memory.py            # S = 4 and 64, ≈ 2 min on 2 CPU cores
    python benchmarks/predictive_memory.py --json benchmarks/results/predictive_memory.json

Each measurement runs in a fresh subprocess (peak RSS only grows within a process): build a GPT-2
shaped model with D = 25 tasks of rank-16 adapters (≈ 25 MB per posterior draw of every task's
factors) and a mean-field guide, note the RSS, then score a small test set under S posterior
draws and report the peak RSS growth over that baseline. Side by side:

- ``streamed``: :func:`bora_pyro.predictive.sample_perplexities` over
  :func:`~bora_pyro.predictive.posterior_factors` with the plug-in, i.e. what
  ``predictive_perplexity`` and ``bora-pyro predict`` run, one draw at a time;
- ``Predictive``: ``pyro.infer.Predictive(model, guide=guide, num_samples=S)`` drawing the same
  sites at once (what one would write without the streaming helpers), sampling only.

Target: the streamed peak RSS at S = 64 within 10 % of S = 4 (printed as a ratio, with the
growth over the baseline in draws, which shows what the ratio's baseline hides).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

TASKS, DOCS_PER_TASK, LENGTH = 25, 4, 32


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def measure(method: str, samples: int) -> dict:
    import pyro
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from bora_pyro import MultiTaskLM
    from bora_pyro.data import Batch, DocumentSet
    from bora_pyro.guides import mean_field_guide
    from bora_pyro.models import BoRA, HierarchicalNormal
    from bora_pyro.predictive import posterior_factors, sample_perplexities

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=256, n_layer=4, n_head=4)
    lm = MultiTaskLM(GPT2LMHeadModel(config), rank=16, alpha=32)
    model = BoRA(lm, HierarchicalNormal(tau=100.0), TASKS)
    guide = mean_field_guide(model, init_scale=0.01)
    documents = DocumentSet([torch.randint(1, 512, (LENGTH,)).tolist() for _ in range(TASKS * DOCS_PER_TASK)],
                            [d for d in range(TASKS) for _ in range(DOCS_PER_TASK)])
    batch = Batch.probe()
    with torch.no_grad():
        guide(batch)
    draw_mb = 4 * TASKS * lm.num_adapter_params / 2**20
    baseline = peak_rss_mb()
    pyro.set_rng_seed(0)
    if method == "streamed":
        sample_perplexities(lm, posterior_factors(model, guide, batch, samples), documents, [str(d) for d in range(TASKS)],
                            pad_token_id=0, plugin=model.task_factors(guide.median()))
    else:
        with torch.no_grad():
            pyro.infer.Predictive(model, guide=guide, num_samples=samples)(batch)
    return {"method": method, "samples": samples, "baseline_mb": baseline, "growth_mb": peak_rss_mb() - baseline,
            "draw_mb": draw_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, nargs=2, default=[4, 64])
    parser.add_argument("--json", metavar="FILE", help="also write the measurements and settings as JSON to FILE")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "S"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return
    results = {}
    for method in ("streamed", "Predictive"):
        for samples in args.samples:
            out = subprocess.run([sys.executable, __file__, "--child", method, str(samples)], check=True,
                                 capture_output=True, text=True).stdout
            results[method, samples] = json.loads(out.strip().splitlines()[-1])
    small, large = args.samples
    draw_mb = results["streamed", small]["draw_mb"]
    print(f"one draw of every task's factors: {draw_mb:.1f} MB ({TASKS} tasks)")
    print(f"{'method':<10}  {'S':>3}  {'baseline MB':>11}  {'growth MB':>9}  {'growth in draws':>15}")
    for method in ("streamed", "Predictive"):
        for samples in args.samples:
            r = results[method, samples]
            print(f"{method:<10}  {samples:>3}  {r['baseline_mb']:>11.1f}  {r['growth_mb']:>9.1f}  "
                  f"{r['growth_mb'] / draw_mb:>15.2f}")
        peak = {s: results[method, s]["baseline_mb"] + results[method, s]["growth_mb"] for s in args.samples}
        print(f"{method:<10}  peak RSS at S={large} / S={small}: {peak[large] / peak[small]:.3f}")
    if args.json:
        from bora_pyro.precision import machine_description

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "settings": {"tasks": TASKS, "docs_per_task": DOCS_PER_TASK, "length": LENGTH, "rank": 16,
                         "gpt2": {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 512}, "threads": 1},
            "machine": machine_description("cpu"),
            "runs": list(results.values()),
            "peak_ratio": {method: (results[method, large]["baseline_mb"] + results[method, large]["growth_mb"])
                           / (results[method, small]["baseline_mb"] + results[method, small]["growth_mb"])
                           for method in ("streamed", "Predictive")},
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()

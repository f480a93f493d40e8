"""Many tasks, most of them small: every speaker with ≥ 10 speeches in the plays of the main job's
25 speakers (161 speakers, 40 of them with fewer than 20 speeches), one task each.

    python examples/many_speakers.py            # ≈ 40 min on 2 CPU cores, 12 of them the base's pretraining (cached after)
    python examples/many_speakers.py --quick    # ≈ 2 min: tiny base, 2 plays, few steps

1. The main job's split of the plays (``examples/shakespeare_speakers.py``): its 14 task plays
   give the tasks (:func:`~bora_pyro.corpora.shakespeare.every_speaker`), its base plays, which
   none of these speakers speaks in, the base model (the same one, from the same cache).
2. MAP fits at τ = 0 (an adapter per speaker), τ = ∞ (one adapter for all) and the hierarchical
   prior at τ = 1e3 (the main job's best on validation), each until validation patience stops
   it, the per-task rows in a task store (``--task-store``; ``none``: on the device).
3. Test perplexity per speaker, and per size group (speakers by number of speeches): what
   pooling gives the small tasks, and what it costs the large ones.
4. ``results.json`` and ``results.md`` in ``--out``, with the run's minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from bora_pyro import MultiTaskCorpus, MultiTaskLM, TaskStore, evaluate, evaluate_base, fit, load_tokenizer
from bora_pyro.corpora.shakespeare import every_speaker, load_plays, select_speakers
from bora_pyro.errors import BoRAError
from bora_pyro.guides import map_guide
from bora_pyro.models import BoRA, prior_from_tau
from bora_pyro.precision import bf16_is_fast, machine_description
from bora_pyro.pretrain import BaseModelConfig, load_info, pretrain_base

#: Speakers grouped by their number of speeches (all splits): lower bounds.
SIZE_GROUPS = (10, 20, 50, 100)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny base, the speakers of 2 plays, few steps (≈2 min)")
    parser.add_argument("--out", default=None, help="results folder (default examples/results-many[-quick])")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "bora-pyro" / "base-models"))
    parser.add_argument("--min-speeches", type=int, default=10, help="a speaker's fewest speeches to be a task")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.0, 1e3, math.inf],
                        help="τ of the MAP fits (0 = independent, inf = joint)")
    parser.add_argument("--task-store", choices=("none", "host", "disk"), default="host",
                        help="where the per-task rows live during the fits (disk: a temporary folder)")
    parser.add_argument("--steps", type=int, default=None, help="step cap (default 3000; quick 24)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between validation checks (default 80)")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--max-length", type=int, default=None, help="default 128 (quick: 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast for the fits (default: where the device runs it fast)")
    args = parser.parse_args(argv)
    defaults = {"steps": 24, "eval_every": 4, "max_length": 32} if args.quick else {
        "steps": 3000, "eval_every": 80, "max_length": 128}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = Path(args.out or ("examples/results-many-quick" if args.quick else "examples/results-many"))
    if args.bf16 is None:
        args.bf16 = bf16_is_fast(torch.device(args.device))
    return args


def size_group(speeches: int) -> str:
    """The label of the size group of a speaker with ``speeches`` speeches: ``"10–19"``, …, ``"≥ 100"``."""
    lower = max(bound for bound in SIZE_GROUPS if bound <= speeches)
    upper = next((bound for bound in SIZE_GROUPS if bound > lower), None)
    return f"≥ {lower}" if upper is None else f"{lower}–{upper - 1}"


def group_perplexities(report: dict, groups: dict[str, str]) -> dict[str, float]:
    """Perplexity of each size group's test tokens together (token-weighted), from an
    :func:`~bora_pyro.evaluate` report and ``groups`` (task → group)."""
    nll, tokens = {}, {}
    for task, entry in report["tasks"].items():
        group = groups[task]
        nll[group] = nll.get(group, 0.0) + math.log(entry["perplexity"]) * entry["tokens"]
        tokens[group] = tokens.get(group, 0) + entry["tokens"]
    return {group: math.exp(nll[group] / tokens[group]) for group in nll}


def run_fit(lm, corpus, tau: float, args, groups: dict[str, str]) -> dict:
    """MAP at τ until validation patience stops it (or the cap); test perplexity per task and group."""
    model = BoRA(lm, prior_from_tau(tau, centered=False), corpus.num_tasks)
    with tempfile.TemporaryDirectory(prefix="bora-store-") as folder:
        store = None if args.task_store == "none" else TaskStore(folder if args.task_store == "disk" else None)
        guide = map_guide(model, seed=args.seed, task_store=store)
        started = time.time()
        result = fit(model, guide, corpus, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     eval_every=args.eval_every, patience=args.patience, seed=args.seed, bf16=args.bf16,
                     progress=False)
        seconds = time.time() - started
        test = evaluate(model, guide, corpus, "test")
        if store is not None:
            store.close()
    record = {
        "tau": "inf" if math.isinf(tau) else tau, "perplexity": test["perplexity"],
        "validation_perplexity": min(entry["validation_perplexity"] for entry in result.history),
        "groups": group_perplexities(test, groups),
        "tasks": {name: entry["perplexity"] for name, entry in test["tasks"].items()},
        "steps": result.steps, "best_step": result.best_step, "stopped_by": result.stopped_by,
        "still_improving": result.still_improving, "fit_seconds": round(seconds, 1),
    }
    print(f"τ={tau:g}: test ppl {record['perplexity']:.2f}, val ppl {record['validation_perplexity']:.2f}, best step "
          f"{result.best_step}/{result.steps} (stopped by {result.stopped_by}), {seconds:.0f} s", flush=True)
    return record


def wins(runs: dict, tasks: list[str], better: str, worse: str) -> int:
    """How many of ``tasks`` have a lower test perplexity under fit ``better`` than under ``worse``."""
    return sum(runs[better]["tasks"][task] < runs[worse]["tasks"][task] for task in tasks)


def report_markdown(results: dict) -> str:
    """``results.md``: perplexity per size group and fit, wins of the hierarchical fit per group."""
    runs = {str(run["tau"]): run for run in results["runs"]}
    labels = {"0.0": "τ = 0 (own adapter)", "inf": "τ = ∞ (one adapter)"}
    group_names = list(results["group_sizes"])
    lines = [f"# {results['num_tasks']} speakers: test perplexity by speaker size", "",
             "| fit | all | " + " | ".join(f"{g} speeches ({results['group_sizes'][g]})" for g in group_names) + " |",
             "|---|---|" + "---|" * len(group_names),
             f"| base model | {results['base_model']['perplexity']:.2f} | "
             + " | ".join(f"{results['base_model']['groups'][g]:.2f}" for g in group_names) + " |"]
    for key, run in runs.items():
        lines.append(f"| {labels.get(key, f'τ = {float(key):g}')} | {run['perplexity']:.2f} | "
                     + " | ".join(f"{run['groups'][g]:.2f}" for g in group_names) + " |")
    hierarchical = [key for key in runs if key not in labels]
    for key in hierarchical:
        lines += ["", f"Speakers on which τ = {float(key):g} beats both τ = 0 and τ = ∞ (test perplexity):", "",
                  "| group | beats τ = 0 | beats τ = ∞ | beats both |", "|---|---|---|---|"]
        for group in group_names:
            tasks = [task for task, g in results["task_groups"].items() if g == group]
            both = sum(all(runs[key]["tasks"][t] < runs[other]["tasks"][t] for other in labels if other in runs)
                       for t in tasks)
            lines.append(f"| {group} | {wins(runs, tasks, key, '0.0') if '0.0' in runs else '–'} | "
                         f"{wins(runs, tasks, key, 'inf') if 'inf' in runs else '–'} | {both} of {len(tasks)} |")
    lines += ["", "| fit | steps | best step | stopped by | fit seconds |", "|---|---|---|---|---|"]
    lines += [f"| {labels.get(key, f'τ = {float(key):g}')} | {run['steps']} | {run['best_step']} | {run['stopped_by']} "
              f"| {run['fit_seconds']:.0f} |" for key, run in runs.items()]
    lines += ["", f"Run time {results['minutes']} min (base pretraining {results['base_minutes']} min) on "
              f"{results['machine'].get('processor', 'this machine')}; `{results['command']}`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    plays = load_plays()
    split = select_speakers(plays)  # the main job's: its base plays hold none of its task plays' speakers
    task_plays = split.task_plays[:2] if args.quick else split.task_plays
    records = every_speaker(plays, task_plays, min_docs=args.min_speeches)
    config = BaseModelConfig.quick() if args.quick else BaseModelConfig()
    base_started = time.time()
    base_dir = pretrain_base(split.base_texts, args.cache_dir, config, progress=not args.quick)
    base_minutes = round((time.time() - base_started) / 60, 1)
    print(f"base model {base_dir} (held-out ppl on base plays {load_info(base_dir)['val_ppl']:.1f})", flush=True)
    lm = MultiTaskLM.from_pretrained(base_dir, rank=args.rank, alpha=args.alpha).to(args.device)
    corpus = MultiTaskCorpus([(record["task"], record["text"]) for record in records], load_tokenizer(base_dir),
                             max_length=min(args.max_length, lm.max_positions or args.max_length),
                             test_size=0.33, validation_size=0.15, seed=0)
    counts = corpus.counts()
    groups = {task: size_group(sum(c.values())) for task, c in counts.items()}
    group_sizes = {group: sum(g == group for g in groups.values()) for group in map(size_group, SIZE_GROUPS)
                   if group in groups.values()}
    print(f"{corpus} from {len(task_plays)} plays; speakers per size group: {group_sizes}", flush=True)
    base_test = evaluate_base(lm, corpus, "test")
    runs = [run_fit(lm, corpus, tau, args, groups) for tau in args.taus]
    results = {
        "num_tasks": corpus.num_tasks, "plays": task_plays, "group_sizes": group_sizes, "task_groups": groups,
        "counts": counts,
        "base_model": {"perplexity": base_test["perplexity"], "groups": group_perplexities(base_test, groups),
                       "tasks": {name: entry["perplexity"] for name, entry in base_test["tasks"].items()}},
        "runs": runs,
        "settings": vars(args) | {"out": str(args.out), "taus": ["inf" if math.isinf(t) else t for t in args.taus]},
        "machine": machine_description(args.device),
        "minutes": round((time.time() - started) / 60, 1), "base_minutes": base_minutes,
        "command": "python examples/many_speakers.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(report_markdown(results))
    print(report_markdown(results))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BoRAError as error:
        sys.exit(f"error: {error}")

"""Posterior predictive analysis of BoRA on the Shakespeare speakers.

    python examples/posterior_predictive.py            # ≈ 10 min on 2 CPU cores (base model cached)
    python examples/posterior_predictive.py --quick    # ≈ 1 min: tiny base, few steps and samples

1. The speakers, split and base model of ``shakespeare_speakers.py`` (pretrained once, cached).
2. A run directory fitted through the CLI (``bora-pyro fit``): τ learned (hybrid guide: MAP Θ,
   mean-field task offsets and τ), so every speaker's adapter has a posterior spread.
3. Per speaker: test perplexity under S posterior draws (mean, 90 % interval), their Bayesian
   model average, and the plug-in at the guide's median (``bora-pyro predict RUN_DIR`` prints the same).
4. One generated line per speaker, from its posterior-mean adapter.
5. Unseen speakers (from the task plays, never fitted): base model vs the global adapter Θ vs the
   prior predictive (each draw: Θ, τ from the posterior, θ_new ~ p(θ | Θ, τ)) vs a few-shot fit
   of θ_new on ``--shots`` speeches each, Θ and τ held fixed.
6. Shrinkage: ‖θ̂_d − Θ̂‖ at the guide's median and the posterior spread of θ_d against speaker size.
Writes ``predictive.json``, ``predictive.md`` and ``shrinkage.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import matplotlib
import pyro
import torch

from bora_pyro import MultiTaskCorpus, distributed, evaluate, evaluate_base, fit, load_run
from bora_pyro.cli import main as cli
from bora_pyro.corpora.shakespeare import load_plays, select_speakers, unseen_speakers
from bora_pyro.generation import generate
from bora_pyro.guides import map_guide, quantiles
from bora_pyro.precision import bf16_is_fast, machine_description
from bora_pyro.predictive import global_factors, new_task_perplexity, predictive_perplexity, shrinkage
from bora_pyro.evaluate import evaluate_factors
from bora_pyro.pretrain import BaseModelConfig, pretrain_base
from bora_pyro.run import load_corpus

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROMPT = "My lord,"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny base, few steps and samples (≈1 min)")
    parser.add_argument("--out", default=None, help="default examples/results-predictive (-quick with --quick)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "bora-pyro" / "base-models"))
    parser.add_argument("--samples", type=int, default=None, help="posterior draws (default 24, quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="SVI steps of the fit (default 500, quick 24)")
    parser.add_argument("--shots", type=int, default=10, help="speeches per unseen speaker for the few-shot fit")
    parser.add_argument("--unseen", type=int, default=8, help="number of unseen speakers")
    parser.add_argument("--refit", action="store_true", help="fit again even if --out holds a fitted run")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast of the fits (default: where the CPU computes bf16 fast; float32 elsewhere)")
    args = parser.parse_args(argv)
    args.samples = args.samples or (4 if args.quick else 24)
    args.steps = args.steps or (24 if args.quick else 500)
    args.out = Path(args.out or ("examples/results-predictive-quick" if args.quick else "examples/results-predictive"))
    args.bf16 = bf16_is_fast("cpu") if args.bf16 is None else args.bf16
    return args


def fit_run(base_dir: Path, records: list[dict], max_length: int, args) -> Path:
    """Write the speeches as JSONL and fit them with ``bora-pyro fit`` into ``out/run``."""
    run_dir, data = args.out / "run", args.out / "speakers.jsonl"
    if (run_dir / "guide.safetensors").exists() and not args.refit:
        print(f"reusing the fitted run in {run_dir} (--refit to fit again)", flush=True)
        return run_dir
    if distributed.is_main():
        data.write_text("".join(json.dumps(record) + "\n" for record in records))
        if run_dir.exists():
            for path in run_dir.iterdir():
                path.unlink()
    distributed.barrier()  # the others wait until rank 0 has written the data
    flags = ["fit", "--model", str(base_dir), "--data", str(data), "--prior", "hierarchical",
             "--tau-prior", "lognormal:6.9,2", "--non-centered", "--guide", "hybrid", "--lr", "1e-3",
             "--log-scale-lr", "0.05", "--steps", str(args.steps), "--batch-size", "16", "--max-length", str(max_length),
             "--rank", "8", "--alpha", "16", "--test-size", "0.33", "--validation-size", "0.15",
             "--eval-every", str(max(args.steps // 12, 1)), "--patience", "3", "--out", str(run_dir),
             "--quiet"] + (["--bf16"] if args.bf16 else [])
    print("bora-pyro " + " ".join(flags), flush=True)
    if cli(flags) != 0:
        raise SystemExit("the fit failed")
    return run_dir


def unseen_comparison(run, records: list[dict], args) -> dict:
    """Perplexity of unseen speakers' held-out speeches: base, Θ, prior predictive, few-shot."""
    by_speaker: dict[str, list[str]] = {}
    for record in records:
        by_speaker.setdefault(record["task"], []).append(record["text"])
    size = min(map(len, by_speaker.values()))  # as many speeches from each: exactly --shots to train on
    rng = random.Random(0)
    pairs = [(speaker, text) for speaker, texts in sorted(by_speaker.items()) for text in rng.sample(texts, size)]
    corpus = MultiTaskCorpus(pairs, run.tokenizer, max_length=run.config.max_length, test_size=1 - args.shots / size,
                             validation_size=0.0, seed=0)
    base = evaluate_base(run.lm, corpus, "test")["perplexity"]
    theta = {name: (A.expand(corpus.num_tasks, *A.shape[1:]), B.expand(corpus.num_tasks, *B.shape[1:]))
             for name, (A, B) in global_factors(run.model, run.guide.median()).items()}
    global_ppl = evaluate_factors(run.lm, theta, corpus, "test")["perplexity"]
    pyro.set_rng_seed(0)
    prior = new_task_perplexity(run.model, run.guide, corpus.documents("test"), corpus.task_names,
                                corpus.pad_token_id, args.samples)
    few_shot_model = run.model.for_new_tasks(run.guide.median(), corpus.num_tasks)
    few_shot_guide = map_guide(few_shot_model)
    fit(few_shot_model, few_shot_guide, corpus, steps=max(args.steps // 5, 1), batch_size=16, lr=1e-3, bf16=args.bf16,
        progress=False)
    few_shot = evaluate(few_shot_model, few_shot_guide, corpus, "test")["perplexity"]
    return {"speakers": {name: c["test_docs"] for name, c in corpus.counts().items()},
            "shots": {name: c["train_docs"] for name, c in corpus.counts().items()},
            "base_model": base, "global_adapter": global_ppl, "prior_predictive": prior["perplexity"],
            "prior_predictive_tasks": prior["tasks"], "few_shot": few_shot}


def plot_shrinkage(report: dict, path: Path) -> None:
    sizes = [entry["size"] for entry in report.values()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.scatter(sizes, [entry["distance"] for entry in report.values()])
    left.set(xscale="log", xlabel="training speeches", ylabel="‖θ̂_d − Θ̂‖ (guide's median)",
             title="distance to the global adapter")
    right.scatter(sizes, [entry["spread"] for entry in report.values()])
    right.set(xscale="log", xlabel="training speeches", ylabel="posterior sd of θ_d (rms over entries)",
              title="posterior spread")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def shots_text(shots: dict[str, int]) -> str:
    low, high = min(shots.values()), max(shots.values())
    return f"{low}" if low == high else f"{low}–{high}"


def write_markdown(results: dict, path: Path) -> None:
    overall = results["perplexity"]
    lines = ["# Posterior predictive analysis: Shakespeare speakers", "",
             f"- Command: `{results['command']}`", f"- Run time: {results['minutes']} min",
             f"- τ posterior median {results['tau']['median']:.4g}, 90 % interval "
             f"[{results['tau']['ci'][0]:.4g}, {results['tau']['ci'][1]:.4g}]", "",
             f"## Test perplexity under {results['samples']} posterior draws", "",
             "| speaker | train speeches | mean | 90 % interval | BMA | plug-in (guide's median) |",
             "|---|---|---|---|---|---|"]
    rows = [("**all**", "", overall)] + [(name, results["shrinkage"][name]["size"], entry)
                                         for name, entry in sorted(results["tasks"].items(),
                                                                   key=lambda item: results["shrinkage"][item[0]]["size"])]
    for name, size, entry in rows:
        lines.append(f"| {name} | {size} | {entry['mean']:.2f} | {entry['ci'][0]:.2f}–{entry['ci'][1]:.2f} "
                     f"| {entry['bma']:.2f} | {entry['plugin']:.2f} |")
    unseen = results["unseen"]
    lines += ["", f"## Unseen speakers ({len(unseen['speakers'])}, held-out speeches)", "",
              "| adapter | perplexity |", "|---|---|",
              f"| base model, no adapter | {unseen['base_model']:.2f} |",
              f"| global adapter Θ (guide's median) | {unseen['global_adapter']:.2f} |",
              f"| prior predictive, BMA over {results['samples']} draws of θ_new ~ Normal(Θ, 1/τ) "
              f"| {unseen['prior_predictive']['bma']:.2f} |",
              f"| prior predictive, mean of draws (90 % interval) | {unseen['prior_predictive']['mean']:.2f} "
              f"({unseen['prior_predictive']['ci'][0]:.2f}–{unseen['prior_predictive']['ci'][1]:.2f}) |",
              f"| few-shot θ_new (MAP on {shots_text(unseen['shots'])} speeches each; Θ, τ fixed) "
              f"| {unseen['few_shot']:.2f} |",
              "", f"## One line per speaker (posterior-mean adapter, prompt “{PROMPT}”)", ""]
    lines += [f"- **{name}**: {text[len(PROMPT):].strip()!r}" for name, text in results["generated"].items()]
    lines += ["", "![shrinkage](shrinkage.png)", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    torch.set_float32_matmul_precision("high")
    distributed.init_from_env("cpu")  # under torchrun: data-parallel fits and evaluations
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # one process reports
    plays = load_plays()
    speakers = select_speakers(plays)
    config = BaseModelConfig.quick() if args.quick else BaseModelConfig()
    with distributed.main_first():  # one process pretrains, the others load its cache
        base_dir = pretrain_base(speakers.base_texts, args.cache_dir, config, progress=not args.quick)
        args.out.mkdir(parents=True, exist_ok=True)
    run_dir = fit_run(base_dir, speakers.tasks, min(128, config.n_positions), args)
    run = load_run(run_dir)
    corpus = load_corpus(run.config, run.tokenizer)  # the run's data, split as in its fit
    low, median, high = (float(q) for q in quantiles(run.guide, [0.05, 0.5, 0.95])["tau"])
    print(f"τ posterior median {median:.4g}, 90 % interval [{low:.4g}, {high:.4g}]", flush=True)

    pyro.set_rng_seed(0)
    report = predictive_perplexity(run.model, run.guide, corpus, "test", num_samples=args.samples)
    overall = report["perplexity"]
    print(f"test perplexity: mean of {args.samples} draws {overall['mean']:.2f} [{overall['ci'][0]:.2f}, "
          f"{overall['ci'][1]:.2f}], BMA {overall['bma']:.2f}, plug-in {overall['plugin']:.2f}", flush=True)
    sizes = {name: counts["train_docs"] for name, counts in corpus.counts().items()}
    shrink = shrinkage(run.model, run.guide, sizes, corpus.task_names, num_samples=args.samples)
    factors = run.model.task_factors(run.guide.median())
    torch.manual_seed(0)
    texts = generate(run.lm, run.tokenizer, factors, [PROMPT] * corpus.num_tasks, list(range(corpus.num_tasks)),
                     max_new_tokens=24, do_sample=True, top_p=0.9, temperature=0.8)
    generated = {name: options[0] for name, options in zip(corpus.task_names, texts)}
    unseen = unseen_comparison(run, unseen_speakers(plays, speakers, n_speakers=args.unseen), args)
    print(f"unseen speakers: base {unseen['base_model']:.2f}, Θ {unseen['global_adapter']:.2f}, prior predictive "
          f"BMA {unseen['prior_predictive']['bma']:.2f}, few-shot {unseen['few_shot']:.2f}", flush=True)

    results = {
        "perplexity": overall, "tasks": report["tasks"], "samples": args.samples,
        "tau": {"median": median, "ci": [low, high]}, "shrinkage": shrink, "generated": generated, "unseen": unseen,
        "fit": {key: value for key, value in vars(run.config).items()
                if key not in ("task_names", "versions", "base_fingerprint")} | {"base_model": str(base_dir)},
        "machine": machine_description("cpu"),
        "minutes": round((time.time() - started) / 60, 1),
        "command": "python examples/posterior_predictive.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if distributed.is_main():
        (args.out / "predictive.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_shrinkage(shrink, args.out / "shrinkage.png")
        write_markdown(results, args.out / "predictive.md")
    print(f"done in {results['minutes']} min; results in {args.out}", flush=True)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Posterior predictive analysis of BoRA on the Shakespeare speakers.

    python examples/posterior_predictive.py            # ≈ 45 min on 2 CPU cores (base model cached)
    python examples/posterior_predictive.py --quick    # ≈ 2 min: tiny base, few steps and samples

1. The speakers, split and base model of ``shakespeare_speakers.py`` (pretrained once, cached).
2. Run directories fitted through the CLI (``bora-pyro fit``) on one split: the main run learns τ
   (hybrid guide: MAP Θ, mean-field task offsets and τ), so every speaker's adapter has a
   posterior spread; for comparison mean-field runs at τ = 0, τ = 1e3 (the main job's best) and
   τ = ∞, and the MAP at τ = 1e3 (the paper's estimator).
3. Per speaker: test perplexity under S posterior draws (mean, 90 % interval), their Bayesian
   model average, and the plug-in at the guide's median (``bora-pyro predict RUN_DIR`` prints the same).
4. Calibration of the next-token predictions (NLL, Brier, ECE; plug-in, one draw, model average)
   of every run, with a reliability diagram; the same for unseen speakers.
5. Posterior predictive checks of the main run (``bora-pyro ppc``): replicated vs held-out speeches.
6. PSIS-LOO of the mean-field and learned-τ runs with ArviZ (``bora_pyro.to_arviz``): ``az.compare``
   and the Pareto k̂ of every held-out speech.
7. One generated line per speaker, from its posterior-mean adapter, and lines from adapters drawn
   from the prior alone (``bora-pyro generate --prior-sample``).
8. Unseen speakers (from the task plays, never fitted): base model vs the global adapter Θ vs the
   prior predictive (each draw: Θ, τ from the posterior, θ_new ~ p(θ | Θ, τ)) vs a few-shot fit
   of θ_new on ``--shots`` speeches each, Θ and τ held fixed.
9. Shrinkage: ‖θ̂_d − Θ̂‖ at the guide's median and the posterior spread of θ_d against speaker size.
Writes ``predictive.json``, ``predictive.md``, ``shrinkage.png``, ``reliability.png``,
``ppc.json`` and ``ppc.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

import arviz as az
import pyro
import torch

from bora_pyro import MultiTaskCorpus, distributed, evaluate, evaluate_base, fit, load_run
from bora_pyro.cli import main as cli
from bora_pyro.corpora.shakespeare import load_plays, select_speakers, unseen_speakers
from bora_pyro.evaluate import evaluate_factors
from bora_pyro.generation import generate
from bora_pyro.guides import map_guide, quantiles
from bora_pyro.inference_data import posterior_analysis
from bora_pyro.plots import plot_ppc, plot_reliability, pyplot
from bora_pyro.ppc import STATISTICS, posterior_predictive_check, task_texts
from bora_pyro.precision import bf16_is_fast, machine_description
from bora_pyro.predictive import (
    global_factors, new_task_calibration, new_task_perplexity, predictive_perplexity, prior_adapters, shrinkage,
)
from bora_pyro.pretrain import BaseModelConfig, pretrain_base
from bora_pyro.run import load_corpus, make_prior

PROMPT = "My lord,"
MAIN = "learned τ (hybrid)"
#: name → (folder in --out, the flags of its prior and guide); every run shares the data, split and optimiser
RUNS = {
    MAIN: ("run", ["--prior", "hierarchical", "--tau-prior", "lognormal:6.9,2", "--non-centered", "--guide", "hybrid"]),
    "τ = 0 (mean-field)": ("run-tau-0", ["--prior", "independent", "--guide", "mean-field"]),
    "τ = 1e3 (mean-field)": ("run-tau-1e3", ["--prior", "hierarchical", "--tau", "1000", "--guide", "mean-field"]),
    "τ = ∞ (mean-field)": ("run-tau-inf", ["--prior", "joint", "--guide", "mean-field"]),
    "τ = 1e3 (MAP)": ("run-tau-1e3-map", ["--prior", "hierarchical", "--tau", "1000", "--guide", "map"]),
}
#: a MAP run's draws are all one point: no posterior for PSIS-LOO to weigh, one draw for calibration
MAP_RUNS = ("τ = 1e3 (MAP)",)
ESTIMATOR_NAMES = {"plugin": "plug-in (guide's median)", "draw": "one posterior draw", "bma": "model average"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny base, few steps and samples (≈1 min)")
    parser.add_argument("--out", default=None, help="default examples/results-predictive (-quick with --quick)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "bora-pyro" / "base-models"))
    parser.add_argument("--samples", type=int, default=None,
                        help="posterior draws for perplexity, calibration and PSIS-LOO (default 24, quick 4)")
    parser.add_argument("--ppc-samples", type=int, default=None,
                        help="replicated sets of the posterior predictive check (default 20, quick 4)")
    parser.add_argument("--steps", type=int, default=None,
                        help="cap on the SVI steps of each fit, which stops by validation patience first (default 3000, quick 24)")
    parser.add_argument("--shots", type=int, default=10, help="speeches per unseen speaker for the few-shot fit")
    parser.add_argument("--unseen", type=int, default=8, help="number of unseen speakers")
    parser.add_argument("--refit", action="store_true", help="fit again even if --out holds a fitted run")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast of the fits (default: where the CPU computes bf16 fast; float32 elsewhere)")
    args = parser.parse_args(argv)
    args.samples = args.samples or (4 if args.quick else 24)
    args.ppc_samples = args.ppc_samples or (4 if args.quick else 20)
    args.steps = args.steps or (24 if args.quick else 3000)
    args.out = Path(args.out or ("examples/results-predictive-quick" if args.quick else "examples/results-predictive"))
    args.bf16 = bf16_is_fast("cpu") if args.bf16 is None else args.bf16
    return args


def fit_runs(base_dir: Path, records: list[dict], max_length: int, args) -> dict[str, Path]:
    """Write the speeches as JSONL and fit every run of ``RUNS`` with ``bora-pyro fit`` (a run
    already fitted in ``--out`` is reused unless ``--refit``)."""
    data = args.out / "speakers.jsonl"
    if distributed.is_main():
        data.write_text("".join(json.dumps(record) + "\n" for record in records))
    distributed.barrier()  # the others wait until rank 0 has written the data
    common = ["fit", "--model", str(base_dir), "--data", str(data), "--lr", "1e-3", "--log-scale-lr", "0.05",
              "--steps", str(args.steps), "--batch-size", "16", "--max-length", str(max_length), "--rank", "8",
              "--alpha", "16", "--test-size", "0.33", "--validation-size", "0.15",
              "--eval-every", "2" if args.quick else "40", "--patience", "3", "--quiet"] + (["--bf16"] if args.bf16 else [])
    run_dirs = {}
    for name, (folder, flags) in RUNS.items():
        run_dir = run_dirs[name] = args.out / folder
        if (run_dir / "guide.safetensors").exists() and not args.refit:
            print(f"reusing the fitted run in {run_dir} (--refit to fit again)", flush=True)
            continue
        if distributed.is_main() and run_dir.exists():
            for path in run_dir.iterdir():
                path.unlink()
        distributed.barrier()
        command = common + flags + ["--out", str(run_dir)]
        print("bora-pyro " + " ".join(command), flush=True)
        if cli(command) != 0:
            raise SystemExit(f"the fit of {name} failed")
    return run_dirs


def fit_record(run_dir: Path) -> dict:
    """How a run's fit ended, from its ``metrics.json``."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {key: metrics[key] for key in ("steps", "best_step", "stopped_by", "still_improving")}


def compare_runs(run_dirs: dict[str, Path], main_run, corpus, args) -> tuple[dict, dict]:
    """Every run's calibration on the test split, and the ``InferenceData`` of the runs with a
    posterior (one pass over the test split per run: :func:`~bora_pyro.inference_data.posterior_analysis`)."""
    calibration, inference = {}, {}
    for name, run_dir in run_dirs.items():
        run = main_run if name == MAIN else load_run(run_dir)
        pyro.set_rng_seed(0)
        calibration[name], data = posterior_analysis(run, corpus, "test", 1 if name in MAP_RUNS else args.samples)
        if name not in MAP_RUNS:
            inference[name] = data
        print(f"{name}: test NLL of the model average {calibration[name]['overall']['bma']['nll']:.4f}, "
              f"ECE {calibration[name]['overall']['bma']['ece']:.4f}", flush=True)
    return calibration, inference


def loo_comparison(inference: dict) -> dict:
    """``az.compare`` by PSIS-LOO, and per run the Pareto k̂ of its held-out speeches."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns when k̂ is high: reported below instead
        table = az.compare(inference, ic="loo")
        loos = {name: az.loo(data, pointwise=True) for name, data in inference.items()}
    columns = ("rank", "elpd_loo", "p_loo", "elpd_diff", "weight", "se", "dse")
    compare = {name: {column: float(table.loc[name, column]) for column in columns}
               | {"warning": bool(table.loc[name, "warning"])} for name in table.index}
    k_hat = {}
    for name, loo in loos.items():
        k = torch.as_tensor(loo.pareto_k.values)
        k_hat[name] = {"good_k": float(loo.good_k), "median": float(k.median()), "max": float(k.max()),
                       "share_above_good_k": float((k > loo.good_k).double().mean()),
                       "share_above_0.7": float((k > 0.7).double().mean()),
                       "share_above_1": float((k > 1).double().mean()), "documents": len(k)}
    return {"compare": compare, "pareto_k": k_hat}


def ppc_summary(report: dict) -> dict:
    """Per statistic: the tasks' median p-value, the share of tasks with p < 0.05 or p > 0.95,
    and the observed and replicated values averaged over tasks."""
    summary = {}
    for statistic in STATISTICS:
        entries = [task[statistic] for task in report["tasks"].values() if task[statistic]["p_value"] is not None]
        p_values = torch.tensor([entry["p_value"] for entry in entries])
        summary[statistic] = {
            "median_p": float(p_values.median()), "share_extreme": float(((p_values < 0.05) | (p_values > 0.95)).double().mean()),
            "observed_mean": sum(entry["observed"] for entry in entries) / len(entries),
            "replicated_mean": sum(entry["replicated_mean"] for entry in entries) / len(entries), "tasks": len(entries)}
    return summary


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
    theta = global_factors(run.model, run.guide.median(), corpus.num_tasks)
    global_ppl = evaluate_factors(run.lm, theta, corpus, "test")["perplexity"]
    pyro.set_rng_seed(0)
    prior = new_task_perplexity(run.model, run.guide, corpus.documents("test"), corpus.task_names,
                                corpus.pad_token_id, args.samples)
    pyro.set_rng_seed(0)
    calibration = new_task_calibration(run.model, run.guide, corpus.documents("test"), corpus.task_names,
                                       corpus.pad_token_id, args.samples)
    few_shot_model = run.model.for_new_tasks(run.guide.median(), corpus.num_tasks)
    few_shot_guide = map_guide(few_shot_model)
    # no validation split of 10 speeches: the fit stops when its ELBO is flat, or at the cap
    few_shot_fit = fit(few_shot_model, few_shot_guide, corpus, steps=4 if args.quick else 600, batch_size=16, lr=1e-3,
                       bf16=args.bf16, progress=False)
    few_shot = evaluate(few_shot_model, few_shot_guide, corpus, "test")["perplexity"]
    return {"speakers": {name: c["test_docs"] for name, c in corpus.counts().items()},
            "shots": {name: c["train_docs"] for name, c in corpus.counts().items()},
            "base_model": base, "global_adapter": global_ppl, "prior_predictive": prior["perplexity"],
            "prior_predictive_tasks": prior["tasks"], "few_shot": few_shot, "calibration": calibration,
            "few_shot_fit": {"steps": few_shot_fit.steps, "stopped_by": few_shot_fit.stopped_by}}


def plot_shrinkage(report: dict, path: Path) -> None:
    plt = pyplot()
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
              f"| {unseen['few_shot']:.2f} |", ""]
    lines += calibration_lines(results)
    lines += loo_lines(results["loo"], results["samples"])
    lines += ppc_lines(results["ppc"])
    lines += ["", f"## One line per speaker (posterior-mean adapter, prompt “{PROMPT}”)", ""]
    lines += [f"- **{name}**: {text[len(PROMPT):].strip()!r}" for name, text in results["generated"].items()]
    lines += ["", f"## Lines from adapters drawn from the main run's prior alone (`bora-pyro generate RUN_DIR "
              f"--prior-sample {len(results['prior_sample'])}`)", ""]
    lines += [f"- draw {k}: {text[len(PROMPT):].strip()!r}" for k, text in enumerate(results["prior_sample"])]
    lines += ["", "![shrinkage](shrinkage.png)", ""]
    path.write_text("\n".join(lines))


def calibration_rows(report: dict, label: str, estimators=("plugin", "draw", "bma")) -> list[str]:
    rows = []
    for estimator in estimators:
        if estimator in report["overall"]:
            entry = report["overall"][estimator]
            rows.append(f"| {label} | {ESTIMATOR_NAMES[estimator]} | {entry['nll']:.4f} | {entry['brier']:.4f} "
                        f"| {entry['ece']:.4f} |")
    return rows


def calibration_lines(results: dict) -> list[str]:
    header = ["| run | estimator | NLL (nats/token) | Brier | ECE |", "|---|---|---|---|---|"]
    lines = ["## Calibration of next-token predictions (test speeches of the 25 speakers)", "",
             f"{results['calibration_tokens']} predicted tokens; Brier over the whole vocabulary (0–2); ECE of the "
             f"top-1 token, {results['calibration_binning']}; model average over {results['samples']} draws.", ""]
    lines += header
    for name, report in results["runs"].items():
        lines += calibration_rows(report["calibration"], name, ("plugin",) if name in MAP_RUNS else ("plugin", "draw", "bma"))
    lines += ["", "![reliability](reliability.png)", "",
              f"### Unseen speakers ({len(results['unseen']['speakers'])}): Θ as plug-in, prior-predictive draws", ""]
    lines += header + calibration_rows(results["unseen"]["calibration"], MAIN)
    return lines


def loo_lines(loo: dict, samples: int) -> list[str]:
    lines = ["", f"## PSIS-LOO over held-out speeches ({samples} posterior draws per run, `az.compare`)", "",
             "| run | rank | elpd_loo | p_loo | elpd_diff | dse | weight | k̂ median | k̂ max | share k̂ > 0.7 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in sorted(loo["compare"].items(), key=lambda item: item[1]["rank"]):
        k = loo["pareto_k"][name]
        lines.append(f"| {name} | {row['rank']:.0f} | {row['elpd_loo']:.1f} | {row['p_loo']:.1f} | {row['elpd_diff']:.1f} "
                     f"| {row['dse']:.1f} | {row['weight']:.2f} | {k['median']:.2f} | {k['max']:.2f} "
                     f"| {100 * k['share_above_0.7']:.0f} % |")
    return lines


def ppc_lines(ppc: dict) -> list[str]:
    summary = ppc["summary"]
    lines = ["", f"## Posterior predictive checks of the main run ({ppc['samples']} replicated sets, "
                 f"{ppc['docs_per_task']} speeches per speaker; [ppc.json](ppc.json))", "",
             f"Replicates: {ppc['replicates']}.", "",
             "| statistic | held-out (mean over speakers) | replicated | median p | share of speakers with p < 0.05 or > 0.95 |",
             "|---|---|---|---|---|"]
    for statistic, entry in summary.items():
        lines.append(f"| {statistic} | {entry['observed_mean']:.3f} | {entry['replicated_mean']:.3f} "
                     f"| {entry['median_p']:.2f} | {100 * entry['share_extreme']:.0f} % of {entry['tasks']} |")
    return lines + ["", "![ppc](ppc.png)"]


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
    run_dirs = fit_runs(base_dir, speakers.tasks, min(128, config.n_positions), args)
    run = load_run(run_dirs[MAIN])
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
    pyro.set_rng_seed(0)
    prior_factors = prior_adapters(run.lm, make_prior(run.config), 3)
    prior_sample = [options[0] for options in generate(run.lm, run.tokenizer, prior_factors, [PROMPT] * 3, [0, 1, 2],
                                                       max_new_tokens=24, do_sample=True, top_p=0.9, temperature=0.8)]
    calibration, inference = compare_runs(run_dirs, run, corpus, args)
    loo = loo_comparison(inference)
    pyro.set_rng_seed(0)
    ppc = posterior_predictive_check(run.model, run.guide, run.tokenizer, corpus.documents("test"),
                                     task_texts(corpus, run.tokenizer), corpus.task_names, run.config.max_length,
                                     args.ppc_samples, docs_per_task=2 if args.quick else 8)
    unseen = unseen_comparison(run, unseen_speakers(plays, speakers, n_speakers=args.unseen), args)
    print(f"unseen speakers: base {unseen['base_model']:.2f}, Θ {unseen['global_adapter']:.2f}, prior predictive "
          f"BMA {unseen['prior_predictive']['bma']:.2f}, few-shot {unseen['few_shot']:.2f}", flush=True)

    results = {
        "perplexity": overall, "tasks": report["tasks"], "samples": args.samples,
        "tau": {"median": median, "ci": [low, high]}, "shrinkage": shrink, "generated": generated, "unseen": unseen,
        "calibration": calibration[MAIN], "calibration_tokens": calibration[MAIN]["overall"]["bma"]["tokens"],
        "calibration_binning": calibration[MAIN]["binning"],
        "runs": {name: {"folder": RUNS[name][0], "flags": RUNS[name][1], "fit": fit_record(run_dirs[name]),
                        "calibration": calibration[name]} for name in RUNS},
        "loo": loo, "ppc": {key: value for key, value in ppc.items() if key != "tasks"} | {"summary": ppc_summary(ppc)},
        "prior_sample": prior_sample,
        "fit": {key: value for key, value in vars(run.config).items()
                if key not in ("task_names", "versions", "base_fingerprint")} | {"base_model": str(base_dir)},
        "machine": machine_description("cpu"),
        "minutes": round((time.time() - started) / 60, 1),
        "command": "python examples/posterior_predictive.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if distributed.is_main():
        (args.out / "predictive.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_shrinkage(shrink, args.out / "shrinkage.png")
        curves = {f"learned τ: {ESTIMATOR_NAMES[name]}": curve for name, curve in calibration[MAIN]["reliability"].items()}
        curves |= {"MAP, τ = 1e3": calibration[MAP_RUNS[0]]["reliability"]["plugin"]}
        plot_reliability(curves, args.out / "reliability.png", title="test speeches: next-token top-1 predictions")
        (args.out / "ppc.json").write_text(json.dumps(ppc, indent=2) + "\n")
        plot_ppc(ppc, args.out / "ppc.png")
        write_markdown(results, args.out / "predictive.md")
    print(f"done in {results['minutes']} min; results in {args.out}", flush=True)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

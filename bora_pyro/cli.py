"""Command line: ``bora-pyro fit|evaluate|export|predict|ppc|generate|diagnose`` (also ``python -m bora_pyro``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import datasets
import torch
import transformers

from . import distributed
from .cli_model import add_model_arguments, config_from_flags
from .cli_predict import (
    SEPARATOR, add_generate_arguments, add_ppc_arguments, add_predict_arguments, add_task_store_argument, loaded_run,
    run_generate, run_ppc, run_predict,
)
from .errors import BoRAError, CheckpointError, ConfigError, DataError, FitError, FitInterrupted
from .evaluate import evaluate, evaluate_base
from .export import check_request, export_peft, export_peft_all, save_merged
from .diagnostics import diagnose
from .fit import fit
from .guides.laplace_tau import fit_tau_posterior
from .run import (
    BASE_DTYPES, CHECKPOINT_FILE, CONFIG_FILE, GUIDE_FILE, GUIDES, METRICS_FILE, TASK_STORES, TAU_POSTERIORS, RunConfig,
    build_lm, build_model, check_base_model, fit_task_store, load_checkpoint, load_corpus, read_config,
    save_checkpoint, save_config, save_run, save_tau_posterior,
)

#: Flags that ``fit --resume`` accepts; every other setting comes from the run's config.json.
RESUME_FLAGS = ("resume", "lr", "lr_per_tau", "device", "quiet")
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``bora-pyro fit: error: ...``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fit``. None of them has a default here: a flag the user did not type stays
    None, so ``--resume`` can tell what was typed (even a value equal to the default) from what
    was not, and :func:`config_from_args` fills the rest from :class:`RunConfig`'s defaults."""
    defaults = RunConfig(model="")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    add_model_arguments(parser)
    parser.add_argument("--data", help="a .jsonl/.json/.csv file, one document per row")
    parser.add_argument("--task-field", help=f"column naming each row's task (default {defaults.task_field!r})")
    parser.add_argument("--text-field", help=f"column holding each row's text (default {defaults.text_field!r})")
    parser.add_argument("--guide", choices=GUIDES,
                        help="map = the paper's estimator (the default for a fixed τ; with --tau-prior: mean-field)")
    parser.add_argument("--tau-posterior", choices=TAU_POSTERIORS,
                        help="with --tau-prior: laplace (the default) ends the fit with the Laplace step on τ, whose "
                             "intervals pass simulation-based calibration (benchmarks/sbc.py); guide keeps the "
                             "guide's own q(τ), which is too narrow")
    parser.add_argument("--init-scale", type=float,
                        help="initial standard deviation of every mean-field scale (default: a tenth of each "
                             "site's prior sd, at most 0.01)")
    parser.add_argument("--max-length", type=int, help=f"tokens per document, EOS included (default {defaults.max_length})")
    parser.add_argument("--test-size", type=float, help=f"fraction of each task's docs for test (default {defaults.test_size:g})")
    parser.add_argument("--validation-size", type=float,
                        help=f"fraction of each task's training docs for early stopping (default {defaults.validation_size:g})")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int)
    length.add_argument("--epochs", type=float)
    parser.add_argument("--batch-size", type=int, help=f"documents per step (default {defaults.batch_size})")
    lr = parser.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=float, help=f"learning rate (default {defaults.lr:g})")
    lr.add_argument("--lr-per-tau", type=float,
                    help="the paper's recipe lr = this × τ (fixed τ only); with Adam the step size does not depend "
                         "on the gradient's scale, so this only reproduces the paper")
    parser.add_argument("--log-scale-lr", type=float,
                        help="learning rate of the variational scales (log σ) and of a latent τ "
                             f"(default {defaults.log_scale_lr:g}); never weight-decayed")
    parser.add_argument("--optimizer", choices=("adam", "adamw"), help=f"default {defaults.optimizer}")
    parser.add_argument("--weight-decay", type=float,
                        help="AdamW's decoupled decay of the factors' locations toward 0 (never of scales or τ); "
                             "a task's factors decay only in the steps that see it (default 0)")
    parser.add_argument("--eval-every", type=int, help="steps between validation checks (default: an epoch)")
    parser.add_argument("--patience", type=int,
                        help=f"stop after this many validation checks without improvement (default {defaults.patience})")
    parser.add_argument("--elbo-window", type=int,
                        help="stop when the ELBO of this many last steps is flat within its noise (default: two "
                             "validation intervals, at least 100); --steps/--epochs is then a cap")
    parser.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    parser.add_argument("--device", help=f"cpu, cuda or cuda:N (default {defaults.device})")
    parser.add_argument("--bf16", action="store_const", const=True,
                        help="bf16 autocast of the forward pass (CUDA, or a CPU with AMX/AVX512_BF16; "
                             "~20x slower on other CPUs)")
    parser.add_argument("--base-dtype", choices=tuple(BASE_DTYPES),
                        help="dtype of the frozen base model's weights (auto, the default: as saved; bfloat16 halves "
                             "a float32 base's memory); adapters and guide stay float32")
    parser.add_argument("--gradient-checkpointing", action="store_const", const=True,
                        help="recompute each block's activations in the backward pass instead of keeping them")
    parser.add_argument("--task-store", choices=TASK_STORES,
                        help="keep every task's rows and optimizer state off the device during the fit, in host "
                             "memory or in files in RUN_DIR/task-store/ (many tasks; the same fit, bit for bit)")
    parser.add_argument("--out", help="run directory to write (checkpointed at every validation check)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


#: Typed ``fit`` settings (:func:`typed_fit_flags`) that are not :class:`RunConfig` fields.
NOT_CONFIG = ("lr_per_tau", "out")


def typed_fit_flags(args: argparse.Namespace) -> dict:
    """The ``fit`` settings the user typed (every one whose value is not None)."""
    return {name: value for name, value in vars(args).items()
            if value is not None and name not in ("command", "quiet", "resume")}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    missing = [flag for flag, value in (("--model", args.model), ("--data", args.data), ("--out", args.out))
               if value is None]
    if args.steps is None and args.epochs is None:
        missing.append("--steps or --epochs")
    if missing:
        raise ConfigError(f"fit needs {', '.join(missing)} (or --resume RUN_DIR to continue a run)")
    config = config_from_flags({name: value for name, value in typed_fit_flags(args).items() if name not in NOT_CONFIG})
    config.lr = chosen_lr(args, config)
    return config


def chosen_lr(args: argparse.Namespace, config: RunConfig) -> float:
    """The learning rate of ``--lr``, ``--lr-per-tau`` × the config's fixed τ, or the config's."""
    if args.lr_per_tau is None:
        return args.lr if args.lr is not None else config.lr
    if config.prior != "hierarchical" or config.tau_prior is not None:
        what = "learns τ (--tau-prior)" if config.tau_prior is not None else f"has no τ (--prior {config.prior})"
        raise ConfigError(f"--lr-per-tau scales the lr with a fixed τ, but the run {what}; give --lr instead")
    return args.lr_per_tau * config.tau


def resumed_config(args: argparse.Namespace) -> RunConfig:
    """The config of the run to resume, with the few settings ``--resume`` may change."""
    refused = [f"--{name.replace('_', '-')}" for name in typed_fit_flags(args) if name not in RESUME_FLAGS]
    if refused:
        raise ConfigError(f"--resume continues the run with the settings in its {CONFIG_FILE}; only --lr, "
                          f"--lr-per-tau, --device and --quiet may change, not {', '.join(refused)}")
    config = read_config(args.resume)
    if not (Path(args.resume) / CHECKPOINT_FILE).is_file():
        raise ConfigError(f"{args.resume} has no checkpoint yet (the fit stopped before its first one): "
                          f"fit it again with --out {args.resume}")
    config.lr = chosen_lr(args, config)
    if args.device is not None:
        config.device = args.device
    return config


def check_new_run_dir(run_dir: str) -> None:
    """Refuse to overwrite a run directory that holds a checkpoint or a fitted guide."""
    found = [name for name in (CHECKPOINT_FILE, GUIDE_FILE) if (Path(run_dir) / name).exists()]
    if found:
        raise ConfigError(f"{run_dir} already holds a run ({found[0]}); continue it with --resume {run_dir} "
                          "or choose another --out")


def fit_error(error: FitError, run_dir: str, lr: float) -> FitError:
    """``error`` restated for the command line: where the last good checkpoint is, what to run next."""
    lower = f"{lr / 10:g}"
    if error.checkpoint_step is None:
        advice = f"no checkpoint was written yet: lower the learning rate and fit again (e.g. --lr {lower})"
    else:
        advice = (f"the last good checkpoint (step {error.checkpoint_step}) is in {run_dir}: lower the learning "
                  f"rate and resume with bora-pyro fit --resume {run_dir} --lr {lower}")
    return FitError(f"the {error.what} became nan or inf at step {error.step}; {advice}",
                    error.step, error.checkpoint_step, error.what)


def run_fit(args: argparse.Namespace) -> dict:
    if args.resume:
        run_dir, config = args.resume, resumed_config(args)
    else:
        config = config_from_args(args)
        run_dir = args.out
        check_new_run_dir(run_dir)
    config.validate()
    device = distributed.init_from_env(config.device)  # under torchrun: join the others (cuda → cuda:LOCAL_RANK)
    main_process = distributed.is_main()  # the one that writes the run directory
    resume = load_checkpoint(run_dir, device=device) if args.resume else None
    lm, tokenizer = build_lm(config, device)
    check_base_model(config, lm)
    corpus = load_corpus(config, tokenizer)
    config.task_names = corpus.task_names
    if main_process:
        save_config(run_dir, config)
    task_store = fit_task_store(config, run_dir)
    model, guide = build_model(config, lm, task_store)
    fit_settings = dict(steps=config.steps, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                        log_scale_lr=config.log_scale_lr, optimizer=config.optimizer, weight_decay=config.weight_decay,
                        eval_every=config.eval_every, patience=config.patience, elbo_window=config.elbo_window,
                        bf16=config.bf16)
    try:
        result = fit(model, guide, corpus, seed=config.seed, progress=not args.quiet, **fit_settings,
                     on_checkpoint=lambda state: save_checkpoint(run_dir, state), resume=resume)
    except FitError as error:
        raise fit_error(error, run_dir, config.lr) from None
    tested = len(corpus.test) > 0  # else test_size=0 or every task too small: nothing to report
    metrics = {
        "steps": result.steps, "best_step": result.best_step, "stopped_early": result.stopped_early,
        "stopped_by": result.stopped_by, "still_improving": result.still_improving,
        "diagnostics": diagnose(model, guide, result.elbos, result.start_log_scales, result.elbo_window),
        "elbo_window": result.elbo_window, "elbos": result.elbos, "history": result.history, "tasks": corpus.counts(),
        "test": evaluate(model, guide, corpus, "test") if tested else None,
        "base_test": evaluate_base(lm, corpus, "test") if tested else None,
    }
    if main_process:  # the fitted run first: a Laplace step that fails below loses nothing
        save_run(run_dir, config, guide, metrics)
    if config.laplace_tau:
        laplace_step(model, guide, corpus, config, fit_settings, result, metrics, run_dir if main_process else None)
    if task_store is not None and task_store.folder is not None:  # working files: the run holds every task now
        task_store.close()
        shutil.rmtree(task_store.folder, ignore_errors=True)
    return {"run_dir": str(run_dir), "test_perplexity": metrics["test"]["perplexity"] if tested else None,
            "base_test_perplexity": metrics["base_test"]["perplexity"] if tested else None, "steps": result.steps}


def laplace_step(model, guide, corpus, config: RunConfig, fit_settings: dict, result, metrics: dict,
                 run_dir: str | None) -> None:
    """τ's posterior by the Laplace step (:func:`~bora_pyro.guides.laplace_tau.fit_tau_posterior`:
    a MAP fit at the guide's τ, then one pass), written into ``run_dir`` (None: a process that does
    not write; under torchrun every process runs the step, whose MAP fit is data-parallel). A step
    that fails says why in one warning line and in ``metrics.json`` and leaves the guide's q(τ)."""
    started = time.perf_counter()
    try:
        tau_posterior, laplace = fit_tau_posterior(model, guide, corpus, seed=config.seed, **fit_settings)
    except (BoRAError, torch.linalg.LinAlgError) as error:
        warnings.warn(f"the Laplace step on τ failed ({one_line(error)}); the run keeps the guide's own q(τ), which "
                      "is too narrow", RuntimeWarning, stacklevel=2)
        metrics["tau_posterior"] = {"method": "guide", "laplace_error": one_line(error)}
        tau_posterior = None
    else:
        metrics["tau_posterior"] = laplace | {"seconds": round(time.perf_counter() - started, 1)}
        metrics["diagnostics"] = diagnose(model, guide, result.elbos, result.start_log_scales, result.elbo_window,
                                          tau_posterior)
    if run_dir is not None:
        save_tau_posterior(run_dir, tau_posterior, metrics)


def run_diagnose(args: argparse.Namespace) -> dict:
    """``diagnose``'s JSON for a run directory: the ELBO part from its ``metrics.json``, the rest
    from its guide (see :mod:`bora_pyro.diagnostics`)."""
    metrics_path = Path(args.run_dir) / METRICS_FILE
    read_config(args.run_dir)  # a clear error for a folder that is not a run directory
    if not metrics_path.is_file() or "elbos" not in (metrics := json.loads(metrics_path.read_text())):
        raise CheckpointError(f"{metrics_path} is missing or holds no per-step ELBOs (the fit has not finished, or an "
                              "older bora-pyro wrote it): finish or resume the fit, or fit the run again")
    with loaded_run(args, keep_start=True) as run:
        return diagnose(run.model, run.guide, metrics["elbos"], run.start_log_scales, metrics["elbo_window"],
                        run.tau_posterior)


def run_evaluate(args: argparse.Namespace) -> dict:
    with loaded_run(args) as run:
        corpus = load_corpus(run.config, run.tokenizer, args.data)
        # another file is scored whole; the run's own data on its test split
        split = "test" if args.data is None else "all"
        if not corpus.documents(split):
            raise DataError("the run's test split is empty (test_size 0, or every task too small for a test "
                            "document); score another file with --data FILE")
        report = evaluate(run.model, run.guide, corpus, split, batch_size=args.batch_size)
    return {
        "perplexity": report["perplexity"],
        "tokens": report["tokens"],
        "tasks": {name: {"perplexity": task["perplexity"], "tokens": task["tokens"]}
                  for name, task in report["tasks"].items()},
    }


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="the task whose adapter to export")
    which.add_argument("--global", dest="global_adapter", action="store_true", help="the global adapter Θ")
    which.add_argument("--all-tasks", action="store_true",
                       help="every task's adapter (and the global one), --format peft only")
    parser.add_argument("--format", choices=("peft", "merged"), default="peft",
                        help="peft: a LoRA adapter folder; merged: the base model with the adapter merged in")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--device", default="cpu", help="device to load the run on")
    add_task_store_argument(parser)


def run_export(args: argparse.Namespace) -> dict:
    if args.all_tasks and args.format != "peft":
        raise ConfigError("--all-tasks writes peft adapters only; use --format peft")
    task = None if args.global_adapter or args.all_tasks else args.task
    if not args.all_tasks:
        check_request(read_config(args.run_dir), task)  # fail before loading the model
    with loaded_run(args) as run:
        if args.all_tasks:
            out = export_peft_all(run, args.out)
        elif args.format == "peft":
            out = export_peft(run, args.out, task)
        else:
            out = save_merged(run, args.out, task)
    return {"out": str(out), "format": args.format, "task": "all" if args.all_tasks else task}


def one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Within the block, every warning is printed as one line ``bora-pyro <command>: warning: ...``."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"bora-pyro {command}: warning: {one_line(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; errors are one line on stderr with exit code 2 (130 after Ctrl-C)."""
    parser = OneLineParser(prog="bora-pyro", description="Bayesian hierarchical LoRA for multi-task LMs")
    commands = parser.add_subparsers(dest="command", required=True)
    add_fit_arguments(commands.add_parser("fit", help="fit a BoRA model by SVI and write a run directory"))
    evaluate_parser = commands.add_parser("evaluate", help="per-task test perplexity of a fitted run, as JSON")
    evaluate_parser.add_argument("run_dir")
    evaluate_parser.add_argument("--data", help="score every document of this file instead of the run's test split")
    evaluate_parser.add_argument("--batch-size", type=int, default=16)
    evaluate_parser.add_argument("--device", default=None)
    add_task_store_argument(evaluate_parser)
    add_export_arguments(commands.add_parser("export", help="write a task's adapter as a peft adapter or a merged model"))
    add_predict_arguments(commands.add_parser(
        "predict", help="per-task perplexity under posterior draws of the adapters: credible intervals, BMA, as JSON"))
    add_ppc_arguments(commands.add_parser(
        "ppc", help="posterior predictive checks: replicated vs held-out documents per task, p-values, as JSON"))
    add_generate_arguments(commands.add_parser("generate", help="text from a task's adapter, or from the prior"))
    diagnose_parser = commands.add_parser(
        "diagnose", help="whether a fit converged and its posterior moved from its start and prior, as JSON")
    diagnose_parser.add_argument("run_dir")
    diagnose_parser.add_argument("--device", default=None)
    add_task_store_argument(diagnose_parser)
    args = parser.parse_args(argv)
    # the CLI prints JSON on stdout and one line per error on stderr: no loading progress bars
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    caller_group = distributed.world()[1] > 1  # a process group the caller joined stays joined
    try:
        with one_line_warnings(args.command):
            output = {"fit": run_fit, "evaluate": run_evaluate, "export": run_export, "predict": run_predict,
                      "generate": run_generate, "diagnose": run_diagnose, "ppc": run_ppc}[args.command](args)
    except BoRAError as error:
        print(f"bora-pyro {args.command}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except FitInterrupted as interrupt:
        run_dir = args.resume or args.out
        print(f"bora-pyro fit: interrupted after step {interrupt.step}, which is checkpointed in {run_dir}; "
              f"continue with bora-pyro fit --resume {run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"bora-pyro {args.command}: interrupted; no file was left half-written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        prints = distributed.is_main()  # under torchrun: one process prints the result
        if not caller_group:
            distributed.shutdown()
    if not prints:
        return 0
    if args.command == "generate" and not args.json:
        print(SEPARATOR.join(output))
    else:
        print(json.dumps(output, indent=2))
    return 0

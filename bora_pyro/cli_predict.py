"""Command line of posterior predictive analysis: ``bora-pyro predict``, ``ppc`` and ``generate``."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyro

from .cli_model import add_model_arguments, config_from_flags, model_flag_names
from .data import Batch, MultiTaskCorpus
from .errors import BoRAError, ConfigError, DataError, WriteError
from .export import task_index
from .generation import generate
from .guides.laplace_tau import with_tau
from .predictive import (
    global_factors, guide_draws, new_task_calibration, new_task_factors, new_task_perplexity, posterior_perplexities,
    predictive_calibration, prior_adapters, shrinkage,
)
from .plots import plot_ppc
from .ppc import posterior_predictive_check, task_texts
from .run import (
    TASK_STORE_FOLDER, TASK_STORES, Run, RunConfig, build_lm, load_corpus, load_run, make_dir, make_prior, read_config,
    write_json,
)
from .task_store import TASKS_PER_PASS, TaskStore


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--samples", type=int, default=32, help="posterior draws of the adapters (default 32)")
    parser.add_argument("--data", help="score every document of this file instead of the run's test split; "
                                        "tasks the run was not fitted on are scored under the prior predictive, "
                                        "in \"unseen\"")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.9, help="mass of the credible intervals (default 0.9)")
    parser.add_argument("--shrinkage", action="store_true",
                        help="also report ‖θ_d − Θ‖ and the posterior spread of each task's factors")
    parser.add_argument("--calibration", action=argparse.BooleanOptionalAction, default=True,
                        help="NLL, Brier score and ECE (15 equal-width bins) of the next-token predictions of the "
                             "plug-in, one draw and the model average (default on; --no-calibration skips "
                             "its S + 1 passes over the documents)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    add_task_store_argument(parser)


def add_task_store_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task-store", choices=TASK_STORES,
                        help=f"load the run's task rows into a task store, read a pass of {TASKS_PER_PASS} tasks at a "
                             "time (a run of more tasks than memory holds): in host memory, or in files in a "
                             "temporary folder of RUN_DIR, removed after")


@contextlib.contextmanager
def loaded_run(args: argparse.Namespace, keep_start: bool = False) -> Iterator[Run]:
    """The run in ``args.run_dir`` on ``args.device``, with ``--task-store`` its task rows in a store."""
    if args.task_store is None:
        yield load_run(args.run_dir, device=args.device, keep_start=keep_start)
        return
    read_config(args.run_dir)  # a clear error for a folder that is not a run directory
    folder = None
    if args.task_store == "disk":
        try:
            folder = tempfile.mkdtemp(prefix=f"{TASK_STORE_FOLDER}-", dir=args.run_dir)
        except OSError as error:
            raise WriteError(f"cannot make the task store's folder in {args.run_dir} ({error.strerror or error}): "
                             "make the run directory writable, or use --task-store host") from None
    store = TaskStore(folder)
    try:
        yield load_run(args.run_dir, device=args.device, keep_start=keep_start, task_store=store)
    finally:
        try:
            store.close()
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


def check_sampling(samples: int, interval: float) -> None:
    if samples < 1:
        raise ConfigError(f"--samples must be ≥ 1, got {samples}; e.g. --samples 32")
    if not 0 < interval < 1:
        raise ConfigError(f"--interval must be between 0 and 1, got {interval}; e.g. --interval 0.9 for 5–95 %")


def run_predict(args: argparse.Namespace) -> dict:
    check_sampling(args.samples, args.interval)
    if args.task_store is not None and (args.shrinkage or args.calibration):
        raise ConfigError("--shrinkage and --calibration draw every task at once, which --task-store is for avoiding: "
                          "add --no-calibration and leave out --shrinkage, or load the run without --task-store")
    with loaded_run(args) as run:
        return predict(run, args)


def predict(run: Run, args: argparse.Namespace) -> dict:
    """``predict``'s JSON for a loaded run."""
    run_tasks = run.config.task_names
    if args.data is None:
        corpus = load_corpus(run.config, run.tokenizer)
        seen, unseen_names = corpus.documents("test"), []
        if not seen:
            raise DataError("the run's test split is empty (test_size 0, or every task too small for a test "
                            "document); score another file with --data FILE")
    else:  # the file's own task order, then split into the run's tasks and unseen ones
        corpus = MultiTaskCorpus.from_file(args.data, run.tokenizer, task_field=run.config.task_field,
                                           text_field=run.config.text_field, max_length=run.config.max_length,
                                           test_size=0.0, validation_size=0.0)
        file_tasks = corpus.task_names
        everything = corpus.documents("all")
        seen = everything.relabel({j: run_tasks.index(name) for j, name in enumerate(file_tasks) if name in run_tasks})
        unseen_names = [name for name in file_tasks if name not in run_tasks]
        unseen = everything.relabel({file_tasks.index(name): k for k, name in enumerate(unseen_names)})
    pyro.set_rng_seed(args.seed)
    output: dict = {"perplexity": None, "tasks": {}, "samples": args.samples, "interval": args.interval}
    if seen:
        report = posterior_perplexities(run.model, run.guide, seen, run_tasks, corpus.pad_token_id, args.samples,
                                        args.interval, args.batch_size)
        output |= {"perplexity": report["perplexity"], "tasks": report["tasks"]}
    if unseen_names:
        report = new_task_perplexity(run.model, run.guide, unseen, unseen_names, corpus.pad_token_id,
                                     num_samples=args.samples, interval=args.interval, batch_size=args.batch_size,
                                     tau_posterior=run.tau_posterior)
        output["unseen"] = {"perplexity": report["perplexity"], "tasks": report["tasks"]}
    if args.calibration:  # after the perplexities, so that --no-calibration leaves their draws as they were
        if seen:
            output["calibration"] = predictive_calibration(run.model, run.guide, seen, run_tasks, corpus.pad_token_id,
                                                           args.samples, args.batch_size)
        if unseen_names:
            output["unseen"]["calibration"] = new_task_calibration(
                run.model, run.guide, unseen, unseen_names, corpus.pad_token_id, args.samples, args.batch_size,
                run.tau_posterior)
    if args.shrinkage:
        sizes = (corpus if args.data is None else load_corpus(run.config, run.tokenizer)).counts()
        output["shrinkage"] = shrinkage(run.model, run.guide, {n: c["train_docs"] for n, c in sizes.items()},
                                        run_tasks, args.samples)
    return output


def add_ppc_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--samples", type=int, default=20,
                        help="posterior draws, one replicated set of documents each (default 20)")
    parser.add_argument("--docs-per-task", type=int, default=8, help="held-out documents per task (default 8)")
    parser.add_argument("--prompt-tokens", type=int, default=2,
                        help="each replicate continues this many first tokens of a held-out document (default 2)")
    parser.add_argument("--out", help="also write DIR/ppc.json and DIR/ppc.png (needs matplotlib)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)


def run_ppc(args: argparse.Namespace) -> dict:
    run = load_run(args.run_dir, device=args.device)
    corpus = load_corpus(run.config, run.tokenizer)
    held_out = corpus.documents("test")
    if not held_out:
        raise DataError("the run's test split is empty (test_size 0, or every task too small for a test document): "
                        "a posterior predictive check compares replicates with held-out documents")
    pyro.set_rng_seed(args.seed)
    report = posterior_predictive_check(
        run.model, run.guide, run.tokenizer, held_out, task_texts(corpus, run.tokenizer), corpus.task_names,
        run.config.max_length, args.samples, args.docs_per_task, args.prompt_tokens, args.batch_size)
    if args.out is not None:
        out = make_dir(Path(args.out))
        write_json(out / "ppc.json", report)
        plot_ppc(report, out / "ppc.png")
    return report


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", help="a fitted run (with --prior-sample: its prior; or give --model "
                                                  "and the prior's flags instead)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="the task whose adapter writes")
    which.add_argument("--global", dest="global_adapter", action="store_true", help="the global adapter Θ")
    which.add_argument("--new-task", action="store_true",
                       help="an unseen task's adapter, always drawn from p(θ | Θ, τ) (--mean/--sample pick Θ, τ)")
    which.add_argument("--prior-sample", type=int, nargs="?", const=1, metavar="K",
                       help="K adapters (default 1) drawn from the prior alone, each with its own Θ, τ: what a prior "
                            "implies, before fitting; the prior of RUN_DIR, or of --model and the flags below")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    draw = parser.add_mutually_exclusive_group()
    draw.add_argument("--mean", dest="sample", action="store_false",
                      help="adapters at the posterior mean (MAP for a MAP fit); the default")
    draw.add_argument("--sample", dest="sample", action="store_true", help="adapters of one posterior draw")
    parser.set_defaults(sample=False)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--do-sample", action="store_true", default=None,
                        help="sample tokens (else greedy or beam search)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--num-return-sequences", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int, default=0, help="seeds the posterior draw and token sampling")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true", help="print the texts as a JSON list")
    add_model_arguments(parser.add_argument_group("the model of --prior-sample without a RUN_DIR (as for fit)"))


GENERATION_FLAGS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams",
                    "num_return_sequences", "repetition_penalty")


def adapter_for(run: Run, args: argparse.Namespace):
    """The one-task factors ``generate`` writes with: a task's, Θ, or a new task's, at the
    posterior mean or one posterior draw."""
    values = (next(guide_draws(run.guide, Batch.probe(device=run.lm.device), 1)) if args.sample
              else run.guide.median())
    if args.global_adapter:
        return global_factors(run.model, values)
    if args.new_task:  # τ from the fit's Laplace step when it took one
        return new_task_factors(run.model, with_tau(values, run.tau_posterior, draw=args.sample), 1)
    d = task_index(run.config, args.task)
    return {name: (A[d:d + 1], B[d:d + 1]) for name, (A, B) in run.model.task_factors(values).items()}


#: ``generate``'s flags of the model of ``--prior-sample`` without a run (:func:`~bora_pyro.cli_model.add_model_arguments`).
MODEL_FLAGS = model_flag_names()

#: Printed between texts when ``generate`` returns several.
SEPARATOR = "\n" + "-" * 40 + "\n"


def prior_sample_config(args: argparse.Namespace) -> RunConfig:
    """The model whose prior ``--prior-sample`` draws from: RUN_DIR's, or one made of ``--model``
    and the prior's flags (RunConfig's defaults for the rest)."""
    typed = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None}
    if args.run_dir is not None:
        config = read_config(args.run_dir)
    elif "model" not in typed:
        raise ConfigError("--prior-sample needs a RUN_DIR or --model BASE (and the prior's flags, e.g. "
                          "--prior hierarchical --tau 100)")
    else:
        config = config_from_flags(typed)
    if config.global_scale is None:
        raise ConfigError("a flat prior (--global-scale flat) is improper and has no draws to show; "
                          "give it a scale, e.g. --global-scale 1")
    config.device = args.device or config.device
    config.validate_model()  # refuses bad prior flags or device before the base loads
    return config


def check_model_flags(args: argparse.Namespace) -> None:
    """The model flags describe the model of ``--prior-sample`` without a run: refused elsewhere."""
    typed = [f"--{name.replace('_', '-')}" for name in MODEL_FLAGS if getattr(args, name) is not None]
    if typed and (args.prior_sample is None or args.run_dir is not None):
        raise ConfigError(f"{', '.join(typed)}: these flags describe the model of --prior-sample without a RUN_DIR; "
                          "a run's model is in its RUN_DIR: drop them")
    if args.run_dir is None and args.prior_sample is None:
        raise ConfigError("generate needs a RUN_DIR (or --prior-sample with --model BASE)")


def run_prior_sample(args: argparse.Namespace, flags: dict) -> list[str]:
    """Texts of ``--prior-sample K`` adapters, each of one task drawn from the prior with its own Θ, τ."""
    if args.prior_sample < 1:
        raise ConfigError(f"--prior-sample takes a number of draws ≥ 1, got {args.prior_sample}")
    config = prior_sample_config(args)
    lm, tokenizer = build_lm(config, check_length=False)
    pyro.set_rng_seed(args.seed)
    factors = prior_adapters(lm, make_prior(config), args.prior_sample)
    texts = generate_texts(lm, tokenizer, factors, [args.prompt] * args.prior_sample, range(args.prior_sample), flags)
    return [text for options in texts for text in options]


def generate_texts(lm, tokenizer, factors, prompts, prompt_tasks, flags: dict) -> list[list[str]]:
    try:
        return generate(lm, tokenizer, factors, prompts, list(prompt_tasks), **flags)
    except BoRAError:
        raise
    except ValueError as error:  # transformers' own check of the generation flags
        raise ConfigError(f"invalid generation flags ({' '.join(str(error).split())}); change them as it says "
                          "(see bora-pyro generate --help)") from None


def run_generate(args: argparse.Namespace) -> list[str]:
    check_model_flags(args)
    flags = {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name) is not None}
    if args.prior_sample is not None:
        return run_prior_sample(args, flags)
    if args.task is not None:  # before anything loads
        try:
            task_index(read_config(args.run_dir), args.task)
        except ConfigError as error:
            raise ConfigError(f"{error}; or --new-task for an unseen one") from None
    run = load_run(args.run_dir, device=args.device)
    pyro.set_rng_seed(args.seed)
    return generate_texts(run.lm, run.tokenizer, adapter_for(run, args), [args.prompt], [0], flags)[0]

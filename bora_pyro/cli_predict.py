"""Command line of posterior predictive analysis: ``bora-pyro predict`` and ``bora-pyro generate``."""

from __future__ import annotations

import argparse

import pyro

from .data import Batch, MultiTaskCorpus
from .errors import BoRAError, ConfigError, DataError
from .export import task_index
from .generation import generate
from .predictive import (
    global_factors, guide_draws, new_task_factors, new_task_perplexity, posterior_factors, sample_perplexities,
    shrinkage,
)
from .run import Run, load_corpus, load_run, read_config


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
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)


def check_sampling(samples: int, interval: float) -> None:
    if samples < 1:
        raise ConfigError(f"--samples must be ≥ 1, got {samples}; e.g. --samples 32")
    if not 0 < interval < 1:
        raise ConfigError(f"--interval must be between 0 and 1, got {interval}; e.g. --interval 0.9 for 5–95 %")


def run_predict(args: argparse.Namespace) -> dict:
    check_sampling(args.samples, args.interval)
    run = load_run(args.run_dir, device=args.device)
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
        report = sample_perplexities(
            run.lm, posterior_factors(run.model, run.guide, Batch.probe(device=run.lm.device), args.samples), seen,
            run_tasks, corpus.pad_token_id, plugin=run.model.task_factors(run.guide.median()),
            interval=args.interval, batch_size=args.batch_size)
        output |= {"perplexity": report["perplexity"], "tasks": report["tasks"]}
    if unseen_names:
        report = new_task_perplexity(run.model, run.guide, unseen, unseen_names, corpus.pad_token_id,
                                     num_samples=args.samples, interval=args.interval, batch_size=args.batch_size)
        output["unseen"] = {"perplexity": report["perplexity"], "tasks": report["tasks"]}
    if args.shrinkage:
        sizes = (corpus if args.data is None else load_corpus(run.config, run.tokenizer)).counts()
        output["shrinkage"] = shrinkage(run.model, run.guide, {n: c["train_docs"] for n, c in sizes.items()},
                                        run_tasks, args.samples)
    return output


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="the task whose adapter writes")
    which.add_argument("--global", dest="global_adapter", action="store_true", help="the global adapter Θ")
    which.add_argument("--new-task", action="store_true",
                       help="an unseen task's adapter, always drawn from p(θ | Θ, τ) (--mean/--sample pick Θ, τ)")
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


GENERATION_FLAGS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams",
                    "num_return_sequences", "repetition_penalty")


def adapter_for(run: Run, args: argparse.Namespace):
    """The one-task factors ``generate`` writes with: a task's, Θ, or a new task's, at the
    posterior mean or one posterior draw."""
    values = (next(guide_draws(run.guide, Batch.probe(device=run.lm.device), 1)) if args.sample
              else run.guide.median())
    if args.global_adapter:
        return global_factors(run.model, values)
    if args.new_task:
        return new_task_factors(run.model, values, 1)
    d = task_index(run.config, args.task)
    return {name: (A[d:d + 1], B[d:d + 1]) for name, (A, B) in run.model.task_factors(values).items()}


#: Printed between texts when ``generate`` returns several.
SEPARATOR = "\n" + "-" * 40 + "\n"


def run_generate(args: argparse.Namespace) -> list[str]:
    if args.task is not None:  # before anything loads
        try:
            task_index(read_config(args.run_dir), args.task)
        except ConfigError as error:
            raise ConfigError(f"{error}; or --new-task for an unseen one") from None
    run = load_run(args.run_dir, device=args.device)
    pyro.set_rng_seed(args.seed)
    factors = adapter_for(run, args)
    flags = {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name) is not None}
    try:
        return generate(run.lm, run.tokenizer, factors, [args.prompt], [0], **flags)[0]
    except BoRAError:
        raise
    except ValueError as error:  # transformers' own check of the generation flags
        raise ConfigError(f"invalid generation flags ({' '.join(str(error).split())}); change them as it says "
                          "(see bora-pyro generate --help)") from None

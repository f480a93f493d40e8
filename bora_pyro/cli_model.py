"""The flags that define a model (base, prior, adapters), shared by ``fit`` and ``generate --prior-sample``."""

from __future__ import annotations

import argparse

from .gguf import gguf_file
from .run import PRIORS, RunConfig

FLAT = "flat"


def scale_or_flat(text: str) -> float | str:
    """``--global-scale``: a number, or ``FLAT`` (``global_scale=None`` in the config)."""
    return FLAT if text.lower() in ("flat", "none") else float(text)


def config_from_flags(flags: dict) -> RunConfig:
    """A config of the typed flags (RunConfig's defaults for the rest), ``--global-scale flat`` as None
    and a folder holding one GGUF file as that file (the run records the file it was fitted on)."""
    config = RunConfig(**flags)
    if config.model:
        config.model = str(gguf_file(config.model) or config.model)
    if config.global_scale == FLAT:
        config.global_scale = None
    return config


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, the prior's flags and the adapters' (rank, alpha, target modules); none has a
    default here (see :func:`bora_pyro.cli.add_fit_arguments`)."""
    defaults = RunConfig(model="")
    parser.add_argument("--model", help="hub name or local folder of a causal LM, or a GGUF file (or a folder holding one)")
    parser.add_argument("--prior", choices=PRIORS, help=f"default {defaults.prior}")
    parser.add_argument("--tau", type=float,
                        help=f"precision τ of tasks around the global adapter (default {defaults.tau:g})")
    parser.add_argument("--global-scale", type=scale_or_flat,
                        help="prior scale of the global factors (or of the task factors for --prior "
                             "independent); 'flat' for the paper's improper prior (MAP only); "
                             f"default {defaults.global_scale:g}")
    parser.add_argument("--tau-prior", metavar="SPEC",
                        help="learn τ under this hyperprior instead of fixing it: gamma:SHAPE,RATE or "
                             "lognormal:LOC,SCALE (of log τ), e.g. lognormal:4.6,1.5; without --guide and a centring flag, the "
                             "learned-τ default: mean-field on decentred task factors, then τ's posterior by the "
                             "Laplace step (see fit --tau-posterior)")
    parser.add_argument("--tau-per", choices=("all", "layer", "module", "factor", "module-factor"),
                        help="one τ for all adapted modules (the default), or one per layer, module, "
                             "factor (A vs B) or module and factor")
    centring = parser.add_mutually_exclusive_group()
    centring.add_argument("--non-centered", dest="centered", action="store_const", const=False,
                          help="sample task offsets θ_d − Θ (the default for a fixed τ): Θ moves every task at once, "
                               "and one lr serves every τ")
    centring.add_argument("--centered", dest="centered", action="store_const", const=True,
                          help="sample θ_d itself: Θ then moves only through the prior's pull, and learns the "
                               "shared part slowly")
    centring.add_argument("--decentered", dest="centered", action="store_const", const=0.0,
                          help="sample z ~ Normal(0, 1), θ_d = Θ + τ^(-1/2)·z (LocScaleReparam; the default for a "
                               "learned τ)")
    parser.add_argument("--rank", type=int, help=f"LoRA rank r (default {defaults.rank})")
    parser.add_argument("--alpha", type=float, help=f"LoRA alpha: the update is (alpha/r)·B A (default {defaults.alpha:g})")
    parser.add_argument("--target-modules", nargs="+",
                        help="module names (last component) or globs; default: per architecture")


def model_flag_names() -> tuple[str, ...]:
    """The settings (``dest`` names) of :func:`add_model_arguments`' flags."""
    parser = argparse.ArgumentParser(add_help=False)
    add_model_arguments(parser)
    return tuple(vars(parser.parse_args([])))

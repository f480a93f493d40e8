"""Exceptions with a one-line message that names the problem and the fix."""


class BoRAError(Exception):
    """Base class of every error bora-pyro raises on bad input."""


class ConfigError(BoRAError, ValueError):
    """An invalid setting (rank, τ, learning rate, target modules, ...)."""


class ModelError(BoRAError, ValueError):
    """A base model or tokenizer that cannot be loaded or used."""


class DataError(BoRAError, ValueError):
    """A data file or data set that cannot be used."""


class CheckpointError(BoRAError, ValueError):
    """A run directory that cannot be read or does not match the model."""


class WriteError(BoRAError, OSError):
    """A file that could not be written (disk full, read-only folder); its previous version is intact."""


class FitError(BoRAError, ArithmeticError):
    """The loss or its gradient stopped being finite during a fit.

    Attributes:
        step: the step at which it happened (the parameters before it are the last good ones).
        checkpoint_step: the step of the last checkpoint passed to ``on_checkpoint`` (None: none yet).
        what: ``"loss"`` or ``"gradient"``, whichever stopped being finite.
    """

    def __init__(self, message: str, step: int, checkpoint_step: int | None = None, what: str = "loss"):
        super().__init__(message)
        self.step, self.checkpoint_step, self.what = step, checkpoint_step, what


class FitInterrupted(KeyboardInterrupt):
    """A fit stopped by SIGINT (Ctrl-C) or SIGTERM after finishing a step and saving a checkpoint of it.

    Attributes:
        step: the last completed step; ``fit(..., resume=...)`` continues after it.
    """

    def __init__(self, step: int):
        super().__init__(f"interrupted after step {step}")
        self.step = step


class DataWarning(UserWarning):
    """Data that is used, but not all of it or not as one might expect (dropped or train-only documents)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), to quote it in a one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class ConvergenceWarning(UserWarning):
    """A fit stopped at its step cap while its ELBO or validation perplexity was still improving."""

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

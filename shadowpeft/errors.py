"""Exceptions raised by the PyTorch library. Each subclasses a builtin so callers can catch broadly."""

from __future__ import annotations


class ShadowConfigError(ValueError):
    """A ShadowConfig value is invalid, or does not fit the base model it is applied to."""


class UnsupportedArchitectureError(ShadowConfigError):
    """The base (or explicit shadow) model's architecture has no registered ArchSpec."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or was trained for a different base model."""


class AssetError(FileNotFoundError):
    """A model asset (built-in base model, packaged weights, cache directory) is missing or unusable.

    Raised with a message that names the missing piece and the command or option that fixes it.
    """


class BaselineError(ValueError):
    """A LoRA/DoRA baseline request is invalid.

    For example an architecture without known attention projections, a rank or parameter budget below 1,
    or a task that does not fit the base model (a classifier wrapped for causal LM, or the reverse).
    """


class DataError(ValueError):
    """A training or evaluation data set is missing, malformed, or cannot be encoded.

    Raised with a message that says what is wrong, where (``path:line`` for files), and how to fix
    it (the schema to follow, or the command that installs or fetches a built-in corpus).
    """

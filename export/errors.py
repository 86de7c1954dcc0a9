"""Exceptions raised by ``shadowpeft.export``.

Each subclasses a builtin (through :class:`ExportError`, a ``RuntimeError``) so that callers who
do not know this package can still catch them; the CLI maps them to a one-line message.
"""

from __future__ import annotations

__all__ = ["ExportError", "ParityError", "QuantizationError"]


class ExportError(RuntimeError):
    """Base class of every error that ``shadowpeft.export`` raises on purpose."""


class ParityError(ExportError):
    """Exported graphs disagree with the PyTorch model they were traced from; the message lists every chain."""


class QuantizationError(ExportError):
    """A graph cannot be quantized: bad options, an unreadable source, or onnxruntime's quantizer failed."""

"""The console scripts that need an extra: each starts its CLI, or names the extra to install.

``pip install shadowpeft`` installs the device runtime alone (``shadow-run``, ``shadowpeft.runtime``:
numpy, onnxruntime, tokenizers, ...). ``shadowpeft``, ``shadow-export``, ``shadow-serve`` and
``shadow-triton`` need libraries that come with extras (``pip install 'shadowpeft[export]'``).
Started without them, a command prints one line naming the missing library and the extra that
installs it, and exits with status 1, instead of an ``ImportError`` traceback.

This module imports only the standard library and click at the top, so that it loads where
only the runtime is installed; each command's own module is imported when the command starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import click

from shadowpeft.runtime.cli_errors import DEBUG_ENV

__all__ = ["COMMANDS", "EXTRAS", "shadow_export", "shadow_serve", "shadow_triton", "shadowpeft"]

#: Extra (pyproject.toml's ``[project.optional-dependencies]``) -> the top-level modules it installs
#: that our code imports; a test keeps it in step with pyproject.toml. ``google`` is protobuf's.
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "transformers", "safetensors", "peft", "accelerate", "gguf", "tqdm"),
    "export": ("torch", "transformers", "safetensors", "onnx", "onnxscript", "gguf"),
    "serve": ("starlette", "uvicorn", "psutil"),
    "triton": ("tritonclient", "google"),
    "grpc": ("grpc", "tritonclient", "google"),
    "genai": ("onnxruntime_genai",),
}
EXTRAS["all"] = tuple(dict.fromkeys(m for modules in EXTRAS.values() for m in modules)) + ("matplotlib",)


@dataclass(frozen=True)
class Command:
    """A console script: its click command, and the extras that can supply what it imports.

    Attributes:
        name: The script's name, as the user typed it.
        target: ``module:attribute`` of the click command.
        extras: Install specs, smallest first (``"export,triton"`` installs both): a missing module
            is reported with the first spec that installs it.
    """

    name: str
    target: str
    extras: tuple[str, ...]

    def extra_for(self, module: str) -> str | None:
        """The install spec that supplies the top-level ``module``, or ``None`` if no extra of ours does."""
        for spec in self.extras:
            if any(module in EXTRAS[extra] for extra in spec.split(",")):
                return spec
        return None

    def load(self) -> Callable[[], object]:
        module_name, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attribute)


COMMANDS = {
    command.name: command
    for command in (
        # `shadowpeft demo` (the main job) trains, exports, serves and plots: everything.
        Command("shadowpeft", "shadowpeft.cli:main", ("train", "all")),
        Command("shadow-export", "shadowpeft.export.cli:main", ("export",)),
        Command("shadow-serve", "shadowpeft.runtime.serve_cli:main", ("serve",)),
        Command("shadow-triton", "shadowpeft.export.triton_cli:main", ("export,triton",)),
    )
}


def missing_extra_message(command: Command, error: ModuleNotFoundError) -> str | None:
    """The one-line message for ``error`` raised while ``command`` ran, or ``None`` to re-raise it.

    Only a library that one of the command's extras installs, and that is not installed at all,
    gets the message; anything else (a missing submodule of an installed library, a module of
    ours) is a bug and keeps its traceback.
    """
    module = (error.name or "").split(".")[0]
    spec = command.extra_for(module) if module else None
    if spec is None or _installed(module):
        return None
    extras = " and ".join(spec.split(","))
    return (
        f"{command.name} needs the Python package {module!r}, which is not installed. Install the {extras} "
        f"extra{'s' if ',' in spec else ''}: pip install 'shadowpeft[{spec}]' (from a clone: pip install '.[{spec}]')."
    )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder refused it, or a half-imported module without a spec
        return False


def start(name: str) -> None:
    """Runs the console script ``name``; a missing extra becomes ``Error: <message>`` and exit status 1.

    ``SHADOWPEFT_DEBUG=1`` re-raises the ``ModuleNotFoundError`` so its traceback shows.
    """
    command = COMMANDS[name]
    try:
        command.load()()
    except ModuleNotFoundError as err:
        message = missing_extra_message(command, err)
        if message is None or os.environ.get(DEBUG_ENV) == "1":
            raise
        click.echo(f"Error: {message}", err=True)
        sys.exit(1)


def shadowpeft() -> None:
    """``shadowpeft``: training, evaluation and the main job (the ``train`` extra; the demo: ``all``)."""
    start("shadowpeft")


def shadow_export() -> None:
    """``shadow-export``: checkpoint to ONNX export (the ``export`` extra)."""
    start("shadow-export")


def shadow_serve() -> None:
    """``shadow-serve``: the cloud backbone over KServe v2 (the ``serve`` extra)."""
    start("shadow-serve")


def shadow_triton() -> None:
    """``shadow-triton``: a Triton model repository for an export (the ``export`` and ``triton`` extras)."""
    start("shadow-triton")

"""The one decorator every command line uses to show library errors as a clean message.

Torch-free (click and the standard library only), so ``shadow-run`` and ``shadow-serve`` can use it
on a device, and ``shadow-export``, ``shadow-triton`` and ``shadowpeft`` import it from here.

A command lists the errors it expects from the libraries it calls; each becomes
``click.ClickException`` (``Error: <message>``, exit 1) or, for errors about an option's value,
``click.BadParameter`` (exit 2), with no traceback. ``SHADOWPEFT_DEBUG=1`` re-raises the original
error so its traceback shows. Anything not listed propagates unchanged: it is a bug, not bad input.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

__all__ = ["DEBUG_ENV", "cli_errors"]

#: Set to ``1`` to re-raise library errors with their traceback instead of printing one message.
DEBUG_ENV = "SHADOWPEFT_DEBUG"

F = TypeVar("F", bound=Callable[..., Any])
#: An exception class, or ``"module:ClassName"`` for one whose module is slow to import (e.g. loads
#: torch): it is looked up only when an error is raised, and only if that module has been imported.
ErrorSpec = type[BaseException] | str


def cli_errors(*errors: ErrorSpec, bad_parameter: tuple[ErrorSpec, ...] = ()) -> Callable[[F], F]:
    """Turns the listed library errors raised by a click command into clean CLI errors.

    Args:
        *errors: Errors shown as ``Error: <message>`` with exit status 1 (``click.ClickException``).
        bad_parameter: Errors about an option's value, shown as click's ``Invalid value`` with exit
            status 2 (``click.BadParameter``). Checked before ``errors``.

    Returns:
        A decorator for a click command function (put it below ``@click.command``/``@click.option``).

    Example:
        >>> @click.command()
        ... @cli_errors(ManifestError, OSError)
        ... def main() -> None: ...
    """

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except Exception as err:
                if _matches(err, bad_parameter):
                    clean: click.ClickException = click.BadParameter(str(err))
                elif _matches(err, errors):
                    clean = click.ClickException(str(err))
                else:
                    raise
                if os.environ.get(DEBUG_ENV) == "1":
                    raise
                raise clean from err

        return wrapper  # type: ignore[return-value]

    return decorate


def _matches(err: BaseException, specs: tuple[ErrorSpec, ...]) -> bool:
    return any(isinstance(err, cls) for cls in _resolve(specs))


def _resolve(specs: tuple[ErrorSpec, ...]) -> tuple[type[BaseException], ...]:
    classes: list[type[BaseException]] = []
    for spec in specs:
        if not isinstance(spec, str):
            classes.append(spec)
            continue
        module_name, _, name = spec.partition(":")
        module = sys.modules.get(module_name)  # not imported: nothing can have raised its errors
        if module is not None:
            classes.append(getattr(module, name))
    return tuple(classes)

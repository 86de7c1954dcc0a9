"""The one CLI error decorator: listed errors become clean messages, ``SHADOWPEFT_DEBUG=1`` re-raises."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from shadowpeft.runtime.cli_errors import DEBUG_ENV, cli_errors


class _LibraryError(ValueError):
    pass


def _command(error: BaseException) -> click.Command:
    @click.command()
    @cli_errors(_LibraryError, OSError, "tests.runtime.test_cli_errors:_Lazy", bad_parameter=(KeyError,))
    def main() -> None:
        raise error

    return main


class _Lazy(RuntimeError):
    pass


@pytest.mark.parametrize(
    ("error", "exit_code", "first_line"),
    [
        (_LibraryError("manifest.json is missing; re-export."), 1, "Error: manifest.json is missing; re-export."),
        (FileNotFoundError("no such file: x"), 1, "Error: no such file: x"),
        (_Lazy("named by string"), 1, "Error: named by string"),
        (KeyError("bad key"), 2, "Error: Invalid value: 'bad key'"),
    ],
)
def test_listed_errors_become_one_clean_message(monkeypatch, error, exit_code, first_line):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    result = CliRunner().invoke(_command(error), [])
    assert result.exit_code == exit_code, result.output
    assert result.output.splitlines()[-1] == first_line
    assert "Traceback" not in result.output


def test_debug_env_reraises_the_original_error(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    result = CliRunner().invoke(_command(_LibraryError("boom")), [])
    assert isinstance(result.exception, _LibraryError)


def test_unlisted_errors_propagate_unchanged(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    result = CliRunner().invoke(_command(TypeError("a bug")), [])
    assert isinstance(result.exception, TypeError)


def test_an_error_named_by_string_in_an_unimported_module_is_not_caught(monkeypatch):
    @click.command()
    @cli_errors("shadowpeft_not_a_module:Missing")
    def main() -> None:
        raise RuntimeError("not listed")

    result = CliRunner().invoke(main, [])
    assert isinstance(result.exception, RuntimeError)

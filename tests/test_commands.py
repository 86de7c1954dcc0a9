"""Console scripts started without their extra print one line naming it (``shadowpeft.commands``).

Each check runs the script in a fresh interpreter whose ``sys.meta_path`` starts with a finder that
refuses the given libraries, as in a venv where only the runtime is installed. (The real thing,
a venv with the runtime alone, is ``tests/test_install.py``.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from shadowpeft.commands import COMMANDS, missing_extra_message
from tests.data.make_tiny_export import TINY_EXPORT

BLOCKER = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class _Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
            return None

    sys.meta_path.insert(0, _Blocker())
    """
)


def _start(script: str, args: list[str], *, blocked: set[str], env: dict[str, str] | None = None):
    code = f"BLOCKED = {sorted(blocked)!r}\n{BLOCKER}\n" + textwrap.dedent(
        f"""
        sys.argv = [{script!r}, *{args!r}]
        from shadowpeft.commands import start
        start({script!r})
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False, env=env
    )


@pytest.mark.parametrize(
    ("script", "args", "blocked", "extra"),
    [
        ("shadow-export", ["--help"], {"torch", "transformers", "onnx", "onnxscript"}, "export"),
        # `shadow-serve --help` needs no starlette either; serving does.
        ("shadow-serve", [str(TINY_EXPORT)], {"starlette", "uvicorn"}, "serve"),
        ("shadow-triton", ["--help"], {"onnx", "transformers", "tritonclient"}, "export,triton"),
        # `shadowpeft --help` loads no torch; a command that runs does.
        ("shadowpeft", ["decode-demo"], {"torch", "transformers", "peft"}, "train"),
    ],
)
def test_a_command_without_its_extra_names_the_extra_in_one_line(script, args, blocked, extra) -> None:
    result = _start(script, args, blocked=blocked)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: {script} needs the Python package '")
    assert f"pip install 'shadowpeft[{extra}]'" in line
    assert f"pip install '.[{extra}]'" in line


def test_the_shadowpeft_help_needs_no_extra() -> None:
    result = _start("shadowpeft", ["--help"], blocked={"torch", "transformers", "peft", "onnx"})
    assert result.returncode == 0, result.stderr
    assert "Usage: shadowpeft" in result.stdout


def test_debug_shows_the_import_traceback() -> None:
    import os

    env = {**os.environ, "SHADOWPEFT_DEBUG": "1"}
    result = _start("shadow-serve", [str(TINY_EXPORT)], blocked={"starlette", "uvicorn"}, env=env)
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "ModuleNotFoundError" in result.stderr


def test_the_demo_libraries_point_to_all() -> None:
    command = COMMANDS["shadowpeft"]
    assert command.extra_for("torch") == "train"
    assert command.extra_for("matplotlib") == "all"
    assert command.extra_for("starlette") == "all"
    assert command.extra_for("numpy") is None  # a runtime dependency: always installed
    assert COMMANDS["shadow-triton"].extra_for("google") == "export,triton"


@pytest.mark.parametrize(
    "error",
    [
        ModuleNotFoundError("No module named 'torch.not_a_module'", name="torch.not_a_module"),  # torch is here
        ModuleNotFoundError("No module named 'shadowpeft.nope'", name="shadowpeft.nope"),  # ours: a bug
        ModuleNotFoundError("No module named 'left_pad'", name="left_pad"),  # no extra of ours installs it
        ModuleNotFoundError("no name"),
    ],
)
def test_other_import_errors_keep_their_traceback(error) -> None:
    assert missing_extra_message(COMMANDS["shadow-export"], error) is None

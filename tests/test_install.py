"""The device install: the wheel in a fresh venv with the runtime alone runs ``shadow-run``, with no torch.

``test_the_runtime_alone_installs_and_runs`` builds the wheel from a copy of the source, creates a
venv without system site packages, installs the wheel with its dependencies from PyPI (no cache
outside the test's temporary folder), checks that torch and the other training and export
libraries are absent, and compares ``shadow-run``'s tokens on the committed tiny export with this
environment's. Marked ``install`` (deselect with ``-m 'not install'``); skipped when PyPI cannot be
reached. About a minute, most of it pip downloading numpy and onnxruntime.

``test_shadow_run_needs_only_the_runtime_dependencies`` is its fast offline half: the same run in
an interpreter that refuses every library the runtime-only install lacks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.data.make_tiny_export import TINY_EXPORT
from tests.test_layering import ROOT
from tests.test_pyproject import NOT_ON_DEVICE

PYPI = "https://pypi.org/simple/onnxruntime/"
PROMPT = "the color is red"
NEW_TOKENS = 8
#: What the wheel is built from (pyproject.toml's package-dir and readme).
SOURCES = ("pyproject.toml", "README.md", "shadowpeft", "export", "runtime", "devices")
#: Libraries a runtime-only venv lacks: the training, export, serving and Triton extras' (but tqdm and
#: protobuf, which tokenizers and onnxruntime bring along).
ABSENT = sorted(NOT_ON_DEVICE | {"starlette", "uvicorn", "tritonclient", "gguf", "matplotlib"})


def _shadow_run_args() -> list[str]:
    return [str(TINY_EXPORT), "-p", PROMPT, "--no-chat", "--json", "--max-new-tokens", str(NEW_TOKENS)]


def _summary(stdout: str) -> dict:
    (summary,) = [record for record in map(json.loads, stdout.splitlines()) if record.get("summary")]
    return summary


def _tokens_here() -> list[int]:
    from click.testing import CliRunner

    from shadowpeft.runtime.run_cli import main

    result = CliRunner().invoke(main, _shadow_run_args())
    assert result.exit_code == 0, result.output
    return _summary(result.stdout)["token_ids"]


def _pypi_unreachable() -> str | None:
    try:
        with urllib.request.urlopen(PYPI, timeout=10) as response:  # noqa: S310 (a fixed https URL)
            response.read(1)
    except OSError as err:
        return f"PyPI is unreachable ({PYPI}: {err}); the install test needs it to fetch the runtime's dependencies"
    return None


def _clean_env(tmp: Path) -> dict[str, str]:
    """This environment without its venv or Python paths, with pip's cache in ``tmp``."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    return {**env, "PIP_CACHE_DIR": str(tmp / "pip-cache"), "PIP_NO_INPUT": "1", "OMP_NUM_THREADS": "1"}


def _run(args: list[str | Path], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, check=False, **kwargs)


def _build_wheel(tmp: Path, env: dict[str, str]) -> Path:
    # From a copy, so that setuptools' build/ and egg-info land in tmp, not in the checkout.
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    build = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", source],
        env,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp / "dist").glob("shadowpeft-*.whl")
    # Every module of the source is in the wheel (pyproject.toml's package list misses none).
    names = set(zipfile.ZipFile(wheel).namelist())
    folders = {"shadowpeft": "shadowpeft", "export": "shadowpeft/export", "runtime": "shadowpeft/runtime"}
    modules = {f"{folders[p.parts[0]]}/{Path(*p.parts[1:]).as_posix()}" for p in _modules(source)}
    assert sorted(modules - names) == []
    return wheel


def _modules(source: Path) -> list[Path]:
    return [
        p.relative_to(source)
        for folder in ("shadowpeft", "export", "runtime")
        for p in (source / folder).rglob("*.py")
    ]


def test_shadow_run_needs_only_the_runtime_dependencies() -> None:
    code = textwrap.dedent(
        f"""
        import importlib.abc
        import sys

        class _Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname, path, target=None):
                if fullname.split(".")[0] in {ABSENT!r}:
                    raise ModuleNotFoundError(f"{{fullname}} is not in the runtime-only install", name=fullname)
                return None

        sys.meta_path.insert(0, _Blocker())
        sys.argv = ["shadow-run", *{_shadow_run_args()!r}]
        from shadowpeft.runtime.run_cli import main
        main()
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert _summary(result.stdout)["token_ids"] == _tokens_here()


@pytest.mark.install
def test_the_runtime_alone_installs_and_runs(tmp_path: Path) -> None:
    reason = _pypi_unreachable()
    if reason:
        pytest.skip(reason)
    env = _clean_env(tmp_path)
    wheel = _build_wheel(tmp_path, env)
    venv = tmp_path / "venv"
    created = _run([sys.executable, "-m", "venv", venv], env, timeout=300)
    assert created.returncode == 0, created.stderr
    bin_dir = venv / "bin"
    env = {**env, "VIRTUAL_ENV": str(venv), "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}

    started = time.monotonic()
    install = _run([bin_dir / "python", "-m", "pip", "install", "-q", wheel], env, timeout=600)
    assert install.returncode == 0, install.stderr
    print(f"runtime-only install: {time.monotonic() - started:.0f} s")  # shown with pytest -s

    absent = _run(
        [bin_dir / "python", "-c", f"import importlib.util as u; print([m for m in {ABSENT!r} if u.find_spec(m)])"],
        env,
    )
    assert absent.returncode == 0, absent.stderr
    assert absent.stdout.strip() == "[]"
    for module in ("torch", "transformers"):
        failed = _run([bin_dir / "python", "-c", f"import {module}"], env)
        assert failed.returncode == 1 and "ModuleNotFoundError" in failed.stderr, failed.stderr

    run = _run([bin_dir / "shadow-run", *_shadow_run_args()], env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert _summary(run.stdout)["token_ids"] == _tokens_here()

    # The other commands say which extra to install, in one line.
    for script, extra in (("shadow-export", "export"), ("shadow-serve", "serve")):
        args = ["--help"] if script == "shadow-export" else [str(TINY_EXPORT)]
        result = _run([bin_dir / script, *args], env, timeout=120)
        assert result.returncode == 1, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"Error: {script} needs the Python package") and f"shadowpeft[{extra}]" in line

"""Virtual environments that tests build from PyPI once and reuse: other stacks reading our files.

A library that pins a different transformers (Optimum: < 4.58) cannot share the suite's environment, so
its test runs a small script in a venv of its own. The venv lives in a cache keyed by its pins and this
Python, and is reused while its marker matches::

    ~/.cache/shadowpeft/test-venvs/           $SHADOWPEFT_TEST_VENVS overrides
      optimum-<sha256 of pins + python>/      published with one rename (shadowpeft.runtime.atomic)
        bin/python ...
        shadowpeft-test-venv.json             the pins it was built with; written last
      .optimum-....lock                       one builder at a time (pytest-xdist workers wait)

torch is always pinned in the same pip command as the rest: left to pip, a bare ``torch`` requirement
resolves to the multi-GB CUDA build. Before installing, ``pip install --dry-run --report`` shows what
pip would fetch, and a CUDA wheel stops the build with an error instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from shadowpeft.runtime import atomic

MARKER = "shadowpeft-test-venv.json"
ROOT_ENV = "SHADOWPEFT_TEST_VENVS"
#: What may never come in through a dependency: the CUDA runtime wheels of torch's CUDA build.
_CUDA_PREFIX = "nvidia-"
_PYPI_PROBE = "https://pypi.org/simple/pip/"


def venv_root() -> Path:
    """``$SHADOWPEFT_TEST_VENVS``, else ``~/.cache/shadowpeft/test-venvs``."""
    env = os.environ.get(ROOT_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shadowpeft" / "test-venvs"


def venv_python(name: str, pins: Sequence[str], *, timeout_s: float = 1500) -> Path:
    """The Python of a venv with exactly ``pins`` installed, built on first use; skips the test without PyPI.

    Args:
        name: A short name for the cache folder, e.g. ``"optimum"``.
        pins: pip requirements, each ``==``-pinned; a torch pin among them keeps pip off the CUDA build.
        timeout_s: Most seconds the install may take.

    Returns:
        ``<venv>/bin/python``.
    """
    record = {"pins": sorted(pins), "python": sys.version.split()[0]}
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    final = venv_root() / f"{name}-{key}"
    if _matches(final, record):
        return final / "bin" / "python"
    _skip_without_pypi()
    with _lock(final):
        if _matches(final, record):  # another worker built it while this one waited
            return final / "bin" / "python"
        with atomic.staging_directory(final) as staging:
            subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True, timeout=300)
            python = staging / "bin" / "python"
            _check_resolution(python, pins, staging / "resolution.json")
            pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins]
            subprocess.run(pip, check=True, timeout=timeout_s, stdout=subprocess.DEVNULL)
            atomic.write_atomic(staging / MARKER, json.dumps(record, indent=2) + "\n")
            atomic.publish_directory(staging, final)
    return final / "bin" / "python"


def _matches(folder: Path, record: dict) -> bool:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")) == record
    except (OSError, ValueError):
        return False


def _skip_without_pypi() -> None:
    try:
        urllib.request.urlopen(_PYPI_PROBE, timeout=10).close()
    except (urllib.error.URLError, OSError) as err:
        pytest.skip(f"PyPI is unreachable ({err}); this test builds a virtual environment from it on first run")


def _check_resolution(python: Path, pins: Sequence[str], report: Path) -> None:
    """Skips the test when pip would download CUDA wheels (no CPU build of the pinned torch to be found)."""
    dry = [str(python), "-m", "pip", "install", "-q", "--dry-run", "--report", str(report), *pins]
    subprocess.run(dry, check=True, timeout=600, stdout=subprocess.DEVNULL)
    chosen = sorted(item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"])
    cuda = [name for name in chosen if name.startswith(_CUDA_PREFIX)]
    if cuda:
        pytest.skip(
            f"pip would resolve {list(pins)} to torch's CUDA build ({', '.join(cuda)}: gigabytes); make a CPU "
            "wheel of the pinned torch available to pip (e.g. with --find-links) to run this test"
        )


@contextlib.contextmanager
def _lock(final: Path) -> Iterator[None]:
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.with_name(f".{final.name}.lock"), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

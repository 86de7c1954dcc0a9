"""What every benchmark script repeats: machine info, atomic JSON records, resuming, the CLI runner.

Each benchmark is a thin script over public functions of ``shadowpeft`` and of this module; run
one from the repository root as ``python -m benchmarks.<name>`` (see benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import io
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from shadowpeft.runtime.atomic import write_atomic

__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "cpu_model",
    "load_for_resume",
    "machine_info",
    "now",
    "physical_cores",
    "run_cli",
    "run_module",
    "save_figure",
    "save_json",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def now() -> str:
    """UTC time, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------- machine


def physical_cores() -> int:
    """Count physical cores available to this process (/proc/cpuinfo pairs, capped by the affinity mask)."""
    pairs: set[tuple[str, str]] = set()
    physical = core = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "physical id":
                physical = value
            elif key == "core id":
                core = value
                pairs.add((physical, core))
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(len(pairs) or available, available))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere, else ``unknown``)."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return model


def machine_info(threads: int) -> dict[str, Any]:
    """Describe the machine and software versions for a benchmark's JSON record.

    Args:
        threads: The torch threads the benchmark runs with (recorded as ``torch_threads``).
    """
    import torch
    import transformers

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": version("peft"),
        "shadow-peft": version("shadow-peft"),
        "shadowpeft": version("shadowpeft"),
    }


# --------------------------------------------------------------------------------------------- records


def save_json(path: Path, record: Any, *, indent: int | None = 2) -> Path:
    """Write ``record`` as JSON atomically (temp file + rename): an interrupted run never leaves a truncated file.

    Creates the parent directory if missing. Returns ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(record, indent=indent) + "\n")


def save_figure(fig: Any, path: Path, *, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically (rendered in memory, then one rename). Returns ``path``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    return write_atomic(path, buffer.getvalue())


def load_for_resume(json_path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded run to continue, or None when there is none.

    Args:
        json_path: The benchmark's JSON record.
        settings: The settings of this run, as JSON values; the record's ``settings`` must equal them.

    Raises:
        click.UsageError: The record was made with other settings (they are listed).
    """
    if not json_path.is_file():
        return None
    record = json.loads(json_path.read_text(encoding="utf-8"))
    recorded = record.get("settings", {})
    if recorded != settings:
        differing = sorted(k for k in settings.keys() | recorded.keys() if recorded.get(k) != settings.get(k))
        raise click.UsageError(
            f"--resume: {json_path} was recorded with other settings (differing: {', '.join(differing)}). "
            "Rerun with the same options, or drop --resume (or pick another --out) to start over."
        )
    return record


# ------------------------------------------------------------------------------------------------- CLI


def run_cli(cli: click.Command, argv: list[str] | None, *, module: str, interrupted: str | None = None) -> int:
    """Run a benchmark's click command and return its exit code instead of exiting.

    The command gets the command line that reproduces the run (``python -m <module> ...``) as
    ``ctx.obj``, to record in its results.

    Args:
        cli: The benchmark's click command.
        argv: Arguments (``sys.argv[1:]`` when None).
        module: The benchmark's module, e.g. ``benchmarks.speed``.
        interrupted: Printed on Ctrl-C (then exit status 130); without it ``click.Abort`` propagates.
    """
    args = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", module, *args])
    try:
        return int(cli.main(args=args, standalone_mode=False, obj=command) or 0)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        if interrupted is None:
            raise
        click.echo(interrupted, err=True)
        return 130


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module> ARGS`` in a fresh interpreter from the repository root; output captured.

    Benchmarks measure some rows in a process of their own (its peak memory, no torch imported).
    The exit status is the caller's to check.
    """
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env, check=False)

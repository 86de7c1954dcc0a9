"""The import rules between the rooms (STYLE.md section 1), checked on the source, not at run time.

* ``shadowpeft.runtime`` imports nothing of ours outside itself, and never torch or transformers.
* The method core (``shadowpeft`` without ``demo/`` and the ``shadowpeft`` CLI) imports neither
  ``shadowpeft.export`` nor ``shadowpeft.runtime`` nor ``shadowpeft.demo``, with one exception:
  ``shadowpeft.runtime.atomic``, the one copy of atomic publishing, which imports only the standard
  library (checked below), so that it is written once.
* ``shadowpeft.export`` may import the core and the runtime, never the demo.
* Only ``shadowpeft/demo/`` (with the CLI that starts it) crosses all three, and
  ``shadowpeft.commands``, which starts the command lines that need an extra (it imports the
  runtime's ``cli_errors``; the other rooms' CLIs by name, when the command starts).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package name it installs as (pyproject.toml's package-dir)
PACKAGES = {"shadowpeft": "shadowpeft", "export": "shadowpeft.export", "runtime": "shadowpeft.runtime"}
CROSSING = ("shadowpeft.demo", "shadowpeft.cli", "shadowpeft.commands")
SHARED_WITH_CORE = ("shadowpeft.runtime.atomic",)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path) -> set[str]:
    """Every absolute module a file imports, at any depth (function-level imports count too)."""
    names: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def sources() -> list[tuple[str, Path]]:
    return sorted((module_name(path), path) for folder in PACKAGES for path in (ROOT / folder).rglob("*.py"))


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(module: str, names: set[str]) -> list[str]:
    ours = {n for n in names if _within(n, "shadowpeft")}
    if _within(module, "shadowpeft.runtime"):
        bad = {n for n in ours if not _within(n, "shadowpeft.runtime") and n != "shadowpeft"}
        bad |= {n for n in names if n.split(".")[0] in ("torch", "transformers", "peft")}
        return sorted(bad)
    if _within(module, "shadowpeft.export"):
        return sorted(n for n in ours if _within(n, "shadowpeft.demo"))
    if any(_within(module, c) for c in CROSSING):
        return []
    layered = ("shadowpeft.export", "shadowpeft.runtime", "shadowpeft.demo")
    return sorted(
        n for n in ours if any(_within(n, p) for p in layered) and not any(_within(n, s) for s in SHARED_WITH_CORE)
    )


@pytest.mark.parametrize(("module", "path"), sources(), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_follow_the_layering(module, path):
    assert violations(module, imported(path)) == []


def test_the_checker_sees_a_crossing():
    # The rule itself must be able to fail: a core module importing the runtime, the runtime importing torch.
    assert violations("shadowpeft.train.jobs", {"shadowpeft.runtime.manifest"}) == ["shadowpeft.runtime.manifest"]
    assert violations("shadowpeft.train.jobs", {"shadowpeft.runtime"}) == ["shadowpeft.runtime"]
    assert violations("shadowpeft.train.jobs", {"shadowpeft.runtime.atomic"}) == []  # the one shared module
    assert violations("shadowpeft.runtime.server", {"torch", "shadowpeft.config"}) == ["shadowpeft.config", "torch"]
    assert violations("shadowpeft.demo.mainjob", {"shadowpeft.export.pipeline"}) == []
    assert violations("shadowpeft.export.cli", {"shadowpeft.demo.mainjob"}) == ["shadowpeft.demo.mainjob"]


@pytest.mark.parametrize("module", SHARED_WITH_CORE)
def test_what_the_core_may_import_from_the_runtime_uses_only_the_standard_library(module):
    import sys

    path = ROOT / "runtime" / (module.removeprefix("shadowpeft.runtime.").replace(".", "/") + ".py")
    top = {name.split(".")[0] for name in imported(path)} - {"__future__"}
    assert top and top <= set(sys.stdlib_module_names), top - set(sys.stdlib_module_names)

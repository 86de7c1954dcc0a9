"""pyproject.toml: the runtime's dependencies alone, the extras, the package list and requirements.txt agree.

Static checks on the metadata and the source (fast, no network); ``tests/test_install.py`` installs
the wheel in a fresh venv and runs it.
"""

from __future__ import annotations

import functools
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from shadowpeft.commands import EXTRAS
from tests.test_layering import ROOT, imported, sources

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: The heavy libraries the runtime-only install must not pull in.
NOT_ON_DEVICE = {"torch", "transformers", "peft", "accelerate", "onnx", "onnxscript", "safetensors"}
#: The runtime modules that import the serve extra's libraries (starlette, uvicorn, psutil): shadow-serve's.
SERVE_MODULES = {
    "shadowpeft.runtime.admission",
    "shadowpeft.runtime.backbone_service",
    "shadowpeft.runtime.connections",
    "shadowpeft.runtime.grpc_server",
    "shadowpeft.runtime.memory",
    "shadowpeft.runtime.server",
}
#: The runtime modules that import the grpc extra's libraries (grpcio, tritonclient's KServe v2 messages):
#: shadow-serve --grpc-port, and the device's grpc:// client, which imports them only when asked for grpc://.
GRPC_MODULES = {"shadowpeft.runtime.grpc_server", "shadowpeft.runtime.grpc_tensors", "shadowpeft.runtime.wire_grpc"}


def _name(requirement: str) -> str:
    """``"tritonclient[http]==2.73.0"`` -> ``"tritonclient"`` (normalised as PyPI does)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0]).lower()


def _extra(name: str) -> list[str]:
    """The extra's requirements, with ``shadowpeft[...]`` (another extra of ours) expanded."""
    out: list[str] = []
    for requirement in PROJECT["project"]["optional-dependencies"][name]:
        if _name(requirement) == "shadowpeft":
            for inner in re.search(r"\[(.*)\]", requirement).group(1).split(","):
                out.extend(_extra(inner.strip()))
        else:
            out.append(requirement)
    return out


@functools.cache
def _distributions(module: str) -> frozenset[str]:
    """The distributions that install the top-level ``module`` here (numpy -> {numpy})."""
    return frozenset(_name(dist) for dist in _packages().get(module, ()))


@functools.cache
def _packages() -> dict[str, list[str]]:
    return packages_distributions()  # reads every installed distribution's file list: once


def test_the_runtime_dependencies_have_no_torch_and_no_onnx() -> None:
    names = {_name(r) for r in PROJECT["project"]["dependencies"]}
    assert names == {"numpy", "onnxruntime", "tokenizers", "jinja2", "click", "httpx"}
    assert not names & NOT_ON_DEVICE


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_the_commands_table_of_extras_matches_pyproject(extra: str) -> None:
    # shadowpeft.commands.EXTRAS names the modules whose absence means "install this extra".
    dists = {_name(r) for r in _extra(extra)}
    modules = set(EXTRAS[extra])
    fix = f"keep shadowpeft.commands.EXTRAS[{extra!r}] (import names) in step with pyproject.toml's {extra} extra"
    assert {m for m in modules if not _distributions(m) & dists} == set(), f"no requirement installs these: {fix}"
    assert {d for d in dists if not any(d in _distributions(m) for m in modules)} == set(), f"not named: {fix}"


def test_the_runtime_imports_only_its_dependencies() -> None:
    # Every third-party module a runtime file imports comes from the runtime-only install, or for
    # shadow-serve's files from the serve extra: pip install . is enough for shadow-run and the API.
    base = {_name(r) for r in PROJECT["project"]["dependencies"]}
    serve = {_name(r) for r in _extra("serve")}
    grpc = {_name(r) for r in _extra("grpc")}
    problems = {}
    for module, path in sources():
        if not module.startswith("shadowpeft.runtime"):
            continue
        allowed = base | (serve if module in SERVE_MODULES else set()) | (grpc if module in GRPC_MODULES else set())
        third_party = {n.split(".")[0] for n in imported(path)} - set(sys.stdlib_module_names) - {"shadowpeft"}
        bad = sorted(m for m in third_party if not _distributions(m) & allowed)
        if bad:
            problems[module] = bad
    assert problems == {}, "add the library to pyproject.toml's dependencies, or the module to SERVE_MODULES"


def test_the_serve_modules_are_the_ones_that_import_starlette_or_uvicorn() -> None:
    serving = {
        module
        for module, path in sources()
        if module.startswith("shadowpeft.runtime") and {n.split(".")[0] for n in imported(path)} & set(EXTRAS["serve"])
    }
    assert serving == SERVE_MODULES, "shadow-serve's modules changed: update SERVE_MODULES"


def test_requirements_txt_pins_everything_pyproject_pins() -> None:
    # The README's set-up (pip install -r requirements.txt, then -e . --no-deps) installs everything.
    pinned = {_pin(line.split("#")[0].strip()) for line in (ROOT / "requirements.txt").read_text().splitlines()}
    pinned.discard(None)
    pins = {(name, version): extras for name, extras, version in pinned}
    wanted = [_pin(r) for r in (*PROJECT["project"]["dependencies"], *_extra("all"))]
    # the same version, and at least the extras pyproject asks for (tritonclient[grpc,http] covers both)
    missing = [(n, e, v) for n, e, v in wanted if (n, v) not in pins or not e <= pins[(n, v)]]
    assert missing == []


def _pin(requirement: str) -> tuple[str, frozenset[str], str] | None:
    """``"tritonclient[grpc,http]==2.73.0"`` -> ``("tritonclient", {"grpc", "http"}, "2.73.0")``."""
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[([^\]]*)\])?==(\S+)", requirement)
    if match is None:
        return None
    extras = frozenset(e.strip() for e in (match.group(2) or "").split(",") if e.strip())
    return _name(match.group(1)), extras, match.group(3)


def test_the_package_list_covers_every_package_folder() -> None:
    setuptools = PROJECT["tool"]["setuptools"]
    folders = {name: Path(folder) for name, folder in setuptools["package-dir"].items()}
    folders.setdefault("shadowpeft", Path("shadowpeft"))
    expected = set(folders)  # the mapped folders (devices/ holds data only), and every folder with an __init__.py
    for name, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            expected.add(".".join([name, *init.parent.relative_to(ROOT / folder).parts]))
    assert sorted(expected - set(setuptools["packages"])) == []

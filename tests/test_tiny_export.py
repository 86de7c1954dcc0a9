"""The committed ``tests/data/tiny-export/`` opens, and is what ``tests/data/make_tiny_export.py`` writes.

If the second check fails after a change to the export format, regenerate the folder with
``python -m tests.data.make_tiny_export`` and commit it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.data.make_tiny_export import TINY_EXPORT, make_tiny_export

#: Measured on the machine that wrote the export (floating-point differences between torch and
#: onnxruntime); they may differ in the last digits on another CPU.
MEASURED = "validation"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _manifest(data: bytes) -> dict:
    manifest = json.loads(data)
    manifest.pop(MEASURED)
    return manifest


def test_the_tiny_export_opens_with_every_sha256_checked() -> None:
    from shadowpeft.runtime.export_dir import open_export

    export = open_export(TINY_EXPORT)
    assert set(export.manifest.graphs) == {"device/shadow"}
    assert export.manifest.base_model == "toy-base"  # no machine's path
    assert sum(len(data) for data in _files(TINY_EXPORT).values()) < 1_000_000


def test_the_tiny_export_is_what_the_script_writes(tmp_path: Path) -> None:
    committed, rebuilt = _files(TINY_EXPORT), _files(make_tiny_export(tmp_path / "export"))
    stale = "tests/data/tiny-export is stale: run python -m tests.data.make_tiny_export and commit it"
    assert sorted(committed) == sorted(rebuilt), stale
    assert _manifest(committed.pop("manifest.json")) == _manifest(rebuilt.pop("manifest.json")), stale
    assert [name for name in committed if committed[name] != rebuilt[name]] == [], stale

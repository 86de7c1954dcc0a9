"""A regular (non-editable) wheel installs only ``shadowpeft.*``: no generic top-level ``export`` or ``runtime``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_has_only_namespaced_packages(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("shadowpeft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"shadowpeft"}
    for expected in (
        "shadowpeft/runtime/contract/graph_io.py",
        "shadowpeft/runtime/manifest.py",
        "shadowpeft/devices/arm64-phone.toml",
        "shadowpeft/arch/llama.py",
        "shadowpeft/export/quantize/formats.py",
    ):
        assert expected in names

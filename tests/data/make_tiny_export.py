"""Writes ``tests/data/tiny-export/``: a detached (device-only) fp32 export of the toy model, about 300 KB.

The export the packaging test runs ``shadow-run`` on in a venv with the runtime alone (no torch to
build one there). Deterministic: the toy base (``tests.toy``) and the perturbed shadow are seeded,
and the base is referenced as ``toy-base`` (a path relative to a temporary working directory), so
the manifest names no machine's paths. Regenerate after a change to the export format::

    python -m tests.data.make_tiny_export

``tests/test_tiny_export.py`` checks that the committed folder is what this script writes.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from pathlib import Path

TINY_EXPORT = Path(__file__).resolve().parent / "tiny-export"
#: The base's reference in the checkpoint and the manifest (relative to the build's working directory).
BASE_REF = "toy-base"


def make_tiny_export(out: Path) -> Path:
    """Builds the toy base, a perturbed shadow checkpoint and its detached export at ``out`` (must not exist)."""
    from transformers import AutoModelForCausalLM

    from shadowpeft import get_shadow_model
    from shadowpeft.checkpoint.store import save_shadow
    from shadowpeft.export.pipeline import ExportOptions, export_checkpoint
    from tests.conftest import perturb
    from tests.toy import save_toy_base

    out = out.resolve()
    with tempfile.TemporaryDirectory() as work, contextlib.chdir(work):
        base = save_toy_base(Path(BASE_REF))
        model = perturb(get_shadow_model(AutoModelForCausalLM.from_pretrained(base)))
        save_shadow(model, Path("ckpt"), base_ref=BASE_REF)
        export_checkpoint(Path("ckpt"), out, ExportOptions(selections=("detached",)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TINY_EXPORT, help="Folder to (re)write [tests/data/tiny-export].")
    out = parser.parse_args().out
    with tempfile.TemporaryDirectory(dir=out.parent) as staging:
        built = make_tiny_export(Path(staging) / "export")
        shutil.rmtree(out, ignore_errors=True)
        built.rename(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""A toy export shared by the runtime and server tests (built once per test process)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class ToyExport:
    """The toy base, its checkpoint and an fp32 export with every graph (split + coupled)."""

    base: Path
    checkpoint: Path
    export: Path


@pytest.fixture(scope="session")
def toy_export(tmp_path_factory) -> ToyExport:
    from transformers import AutoModelForCausalLM

    from shadowpeft import get_shadow_model
    from shadowpeft.checkpoint.store import save_shadow
    from shadowpeft.export.pipeline import ExportOptions, export_checkpoint
    from tests.conftest import perturb
    from tests.toy import save_toy_base

    root = tmp_path_factory.mktemp("toy-export")
    base = save_toy_base(root / "base")
    model = perturb(get_shadow_model(AutoModelForCausalLM.from_pretrained(base)))
    save_shadow(model, root / "ckpt", base_ref=str(base))
    export_checkpoint(root / "ckpt", root / "export", ExportOptions(selections=("split", "coupled")))
    return ToyExport(base, root / "ckpt", root / "export")

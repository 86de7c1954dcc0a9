"""Checkpoint files: JSON and safetensors read with actionable errors (atomic publish: ``shadowpeft.runtime.atomic``).

Weights are only ever read with safetensors (never pickle). A checkpoint directory is written into
a hidden temporary sibling and renamed into place, so an interrupted save never leaves a directory
that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from shadowpeft.errors import CheckpointError

CONFIG_NAME = "shadow_config.json"


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: {str(path.parent)!r} is not a ShadowPEFT checkpoint (it needs {CONFIG_NAME}); "
            "pass the directory that save_shadow wrote."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt: re-save it.") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}; re-save the checkpoint.")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete: re-save or re-download it.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: re-save or "
            "re-download the checkpoint."
        ) from err


def write_json(path: Path, data: dict[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    with path.open("rb+") as f:
        os.fsync(f.fileno())  # on disk before the rename publishes it


def check_target(target: Path, *, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory; choose another checkpoint path.")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(
            f"{target} already exists and is not empty; pass overwrite=True to replace it or choose another directory."
        )
    if not (target / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{target} is not a ShadowPEFT checkpoint (no {CONFIG_NAME}); refusing to replace it even with "
            "overwrite=True. Choose another directory."
        )

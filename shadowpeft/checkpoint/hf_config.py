"""A model ``config.json`` that transformers 4.x and 5.x read alike.

transformers 5 writes the RoPE settings only as ``rope_parameters`` (``{"rope_type": ..., "rope_theta":
...}``); transformers 4.57 does not know that key and falls back to its default base of 10,000, so an
older stack (Optimum, which pins transformers < 4.58) would silently build a different model from our
files. :func:`portable_config` adds the legacy top-level keys 4.x reads (``rope_theta``, ``rope_scaling``,
``partial_rotary_factor``); transformers 5 still reads ``rope_parameters`` and ignores them.

Used for the converted SmolLM2 folder (:mod:`shadowpeft.checkpoint.assets`) and the ``config.json``
an export writes for Optimum (``shadowpeft.export.optimum_config``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shadowpeft.runtime.atomic import write_atomic

__all__ = ["portable_config", "write_portable_config"]

CONFIG_NAME = "config.json"
#: Keys of ``rope_parameters`` that transformers 4.x reads at the top level of the config instead.
_TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")


def portable_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a config's JSON form) with the legacy RoPE keys added where it has only ``rope_parameters``.

    ``rope_theta`` (and ``partial_rotary_factor``) are copied to the top level; the other parameters
    become ``rope_scaling`` (``None`` for the ``default`` RoPE type, which 4.x expresses by no scaling).
    Keys already present are kept, and a config without ``rope_parameters`` is returned unchanged.
    Nested configs (``text_config`` of a multimodal model) get the same treatment.

    Args:
        data: The parsed ``config.json``.

    Returns:
        A new dict.
    """
    out = {
        key: portable_config(value) if key.endswith("_config") and isinstance(value, Mapping) else value
        for key, value in data.items()
    }
    params = data.get("rope_parameters")
    if not isinstance(params, Mapping) or "rope_theta" not in params:
        return out
    for key in _TOP_LEVEL_ROPE_KEYS:
        if key in params:
            out.setdefault(key, params[key])
    scaling = {key: value for key, value in params.items() if key not in _TOP_LEVEL_ROPE_KEYS}
    if scaling.get("rope_type", "default") == "default":
        out.setdefault("rope_scaling", None)
    else:
        out.setdefault("rope_scaling", {**scaling, "type": scaling["rope_type"]})  # 4.x reads either name
    return out


def write_portable_config(directory: str | Path) -> Path:
    """Rewrites ``directory/config.json`` (as ``save_pretrained`` left it) with :func:`portable_config`.

    Args:
        directory: A Hugging Face model directory.

    Returns:
        The path of the config file.
    """
    path = Path(directory) / CONFIG_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    return write_atomic(path, json.dumps(portable_config(data), indent=2, sort_keys=True) + "\n")

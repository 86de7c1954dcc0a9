"""Qwen2: Llama-style, with biases on the q, k and v projections (the config has no switch for them)."""

from __future__ import annotations

from shadowpeft.arch.base import ArchSpec

QWEN2 = ArchSpec(model_types=("qwen2",), qkv_bias=True)

SPECS = (QWEN2,)

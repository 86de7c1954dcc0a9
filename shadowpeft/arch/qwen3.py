"""Qwen3: Llama-style, with RMSNorms of ``head_dim`` on q and k inside attention."""

from __future__ import annotations

from shadowpeft.arch.base import ArchSpec

QWEN3 = ArchSpec(model_types=("qwen3",), qk_norm=True)

SPECS = (QWEN3,)

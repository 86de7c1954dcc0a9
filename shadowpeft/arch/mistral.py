"""Mistral: Llama-style, and every layer uses a sliding window when the config sets one."""

from __future__ import annotations

from shadowpeft.arch.base import ArchSpec

MISTRAL = ArchSpec(model_types=("mistral",), sliding_from_window=True)

SPECS = (MISTRAL,)

"""Gemma: Llama-style; its scaled embedding and norm offsets live inside its own HF modules."""

from __future__ import annotations

from shadowpeft.arch.base import ArchSpec

GEMMA = ArchSpec(model_types=("gemma",))

SPECS = (GEMMA,)

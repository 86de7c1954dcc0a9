"""Llama-style stacks (``model.layers``, rotary, pre-norm): Llama, Mistral, Qwen2, Qwen3, Gemma.

They differ only in data the ArchSpec reads from the config (layer types, sliding windows) and
inside their own layer modules, so one spec with two flags serves them all.
"""

from __future__ import annotations

from shadowpeft.arch.base import ArchSpec

LLAMA = ArchSpec(model_types=("llama", "qwen2", "qwen3", "gemma"))
MISTRAL = ArchSpec(model_types=("mistral",), sliding_from_window=True)

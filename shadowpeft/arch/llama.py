"""Llama: the reference Llama-style stack (``model.layers``, rotary, pre-norm, q/k/v/o projections).

Every default of :class:`~shadowpeft.arch.base.ArchSpec` describes this family, so its spec is empty.
A Llama-like family that differs only in data its config carries needs no more than this file.
"""

from __future__ import annotations

from shadowpeft.arch.base import ArchSpec

LLAMA = ArchSpec(model_types=("llama",))

SPECS = (LLAMA,)

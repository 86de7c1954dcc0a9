"""One ShadowPEFT step around one base decoder layer: ``(h, s) -> (h, s)``.

    h ──► [inject: h + a·((h-s)W_down)W_up] ──► BaseLayer_l ──► h'
    s ─────────┘                                                 │
    s ──────────────► [update: s + σ(G(LN h'))·(T(LN h') - s)] ◄─┘ ──► s'

Layer 0 runs unchanged; the update after the last layer is skipped because nothing reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from shadowpeft.arch import ArchSpec, LayerContext
from shadowpeft.modules import ShadowInjection, ShadowUpdate


@dataclass(frozen=True)
class BlockParts:
    """The modules one step uses: the base layer and, where scheduled, the adapter index."""

    layer: nn.Module
    spec: ArchSpec
    injection: ShadowInjection
    update: ShadowUpdate
    inject_index: int | None  # j = l - 1 for l >= 1, else None
    update_index: int | None  # j = l - 1 for 1 <= l <= L - 2, else None


def shadow_block(
    layer_idx: int, h: Tensor, s: Tensor, *, parts: BlockParts, ctx: LayerContext, cache: Any | None
) -> tuple[Tensor, Tensor]:
    """h, s: (B, T, d). Inject before the base layer, update after it (the method notes, section 3, step 4).

    Writes nothing to any module; only ``cache`` mutates (inside the HF attention).
    """
    if parts.inject_index is not None:
        h = parts.injection(h, s, parts.inject_index)
    h = parts.spec.call_layer(parts.layer, h, ctx, layer_idx, cache)
    if parts.update_index is not None:
        s = parts.update(h, s, parts.update_index)
    return h, s


def schedule(num_layers: int) -> list[tuple[int | None, int | None]]:
    """``(inject_index, update_index)`` per base layer for an ``num_layers``-layer base."""
    out: list[tuple[int | None, int | None]] = []
    for layer in range(num_layers):
        inject = layer - 1 if layer >= 1 else None
        update = layer - 1 if 1 <= layer <= num_layers - 2 else None
        out.append((inject, update))
    return out

"""Which graphs an export writes, and everything needed to trace each one.

``--detached`` -> ``device/shadow``; ``--split`` -> ``device/shadow``, ``device/head``,
``cloud/backbone``; ``--coupled`` -> ``coupled``. Selections combine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shadowpeft.export.graphs import (
    CloudBackboneGraph,
    CoupledGraph,
    DetachedShadowGraph,
    HeadGraph,
    example_past,
    kv_layout,
)
from shadowpeft.heads import ShadowForCausalLM
from shadowpeft.runtime.contract import (
    CLOUD_BACKBONE,
    COUPLED,
    DEVICE_HEAD,
    DEVICE_SHADOW,
    GRAPH_KEYS,
    GRAPH_ROLES,
    GraphIO,
    GraphRole,
    cloud_backbone_io,
    coupled_io,
    detached_shadow_io,
    head_io,
)

__all__ = [
    "SELECTIONS",
    "GraphJob",
    "graph_jobs",
    "keys_for",
]

#: Graph keys written by each CLI selection.
SELECTIONS: dict[str, tuple[str, ...]] = {
    "detached": (DEVICE_SHADOW,),
    "split": (DEVICE_SHADOW, DEVICE_HEAD, CLOUD_BACKBONE),
    "coupled": (COUPLED,),
}
# Tracing example: every dynamic axis >= 2 and distinct, so the tracer neither specialises an axis
# nor mistakes two different axes for one. Validation then runs other shapes (and an empty cache).
_BATCH, _NEW, _PAST = 2, 3, 5


@dataclass(frozen=True)
class GraphJob:
    """One graph to export: its manifest key and role, file, wrapper, tracing example and I/O."""

    key: str
    role: GraphRole
    file: str
    wrapper: nn.Module
    example: tuple[Tensor, ...]
    io: GraphIO

    @property
    def on_device(self) -> bool:
        """Whether the graph runs on the device (and is quantized for it)."""
        return self.key != CLOUD_BACKBONE


def keys_for(selections: Iterable[str]) -> tuple[str, ...]:
    """Graph keys for CLI selections, in a fixed order, without repeats.

    Raises:
        ValueError: For an unknown selection.
    """
    wanted: set[str] = set()
    for selection in selections:
        if selection not in SELECTIONS:
            raise ValueError(f"Unknown graph selection {selection!r}; choose from {', '.join(SELECTIONS)}.")
        wanted.update(SELECTIONS[selection])
    return tuple(key for key in GRAPH_KEYS if key in wanted)


def graph_jobs(model: ShadowForCausalLM, keys: Iterable[str]) -> list[GraphJob]:
    """Build the wrapper, tracing example and declared I/O of every requested graph."""
    keys = tuple(keys)
    shadow, base = kv_layout(model.shadow_model), kv_layout(model.base_backbone)
    d = model.hidden_size
    vocab = model.spec.output_head(model.base).weight.shape[0]
    dtype = model.dtype
    name = str(dtype).removeprefix("torch.")
    ids, mask, positions = _token_example(vocab)
    past_shadow = example_past(shadow, _BATCH, _PAST, dtype)
    past_base = example_past(base, _BATCH, _PAST, dtype)
    s0 = torch.randn(_BATCH, _NEW, d, dtype=dtype)
    builders = {
        DEVICE_SHADOW: lambda: (
            DetachedShadowGraph(model),
            (ids, mask, positions, *past_shadow),
            detached_shadow_io(**shadow._asdict(), hidden=d, vocab=vocab, dtype=name),
        ),
        DEVICE_HEAD: lambda: (HeadGraph(model), (s0,), head_io(hidden=d, vocab=vocab, dtype=name)),
        CLOUD_BACKBONE: lambda: (
            CloudBackboneGraph(model),
            (ids, s0, mask, positions, *past_base),
            cloud_backbone_io(**base._asdict(), hidden=d, dtype=name),
        ),
        COUPLED: lambda: (
            CoupledGraph(model),
            (ids, mask, positions, *past_shadow, *past_base),
            coupled_io(shadow=shadow, base=base, hidden=d, vocab=vocab, dtype=name),
        ),
    }
    jobs = []
    for key in keys:
        wrapper, example, graph_io = builders[key]()
        jobs.append(GraphJob(key, GRAPH_ROLES[key], f"{key}.onnx", wrapper.eval(), example, graph_io))
    return jobs


def _token_example(vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (_BATCH, _NEW), generator=generator)
    mask = torch.ones(_BATCH, _PAST + _NEW, dtype=torch.long)
    positions = torch.arange(_PAST, _PAST + _NEW).expand(_BATCH, -1).contiguous()
    return ids, mask, positions

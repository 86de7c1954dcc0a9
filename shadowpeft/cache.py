"""ShadowCache: the base KV cache and the shadow backbone's KV cache, advanced together.

Both caches are ordinary HF ``DynamicCache`` objects: base layers write to ``base``, shadow
layers to ``shadow``. Attention is the only op that mixes positions, so caching both is exact.
In detached mode the base never runs and ``base`` stays empty; the sequence length therefore
comes from ``shadow``, which runs in every mode.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache


class ShadowCache(Cache):
    """A HF ``Cache`` that ``generate()`` can carry, wrapping one cache per stack."""

    def __init__(self, base: DynamicCache, shadow: DynamicCache) -> None:
        super().__init__(layers=[])
        self.base = base
        self.shadow = shadow

    @classmethod
    def for_configs(cls, base_config: Any, shadow_config: Any) -> ShadowCache:
        return cls(DynamicCache(config=base_config), DynamicCache(config=shadow_config))

    def _both(self) -> tuple[DynamicCache, DynamicCache]:
        return self.base, self.shadow

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.shadow.get_seq_length()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.shadow.get_max_length()

    def reset(self) -> None:
        for c in self._both():
            c.reset()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        for c in self._both():
            c.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        for c in self._both():
            c.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for c in self._both():
            c.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: Tensor) -> None:
        for c in self._both():
            c.batch_select_indices(indices)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return self.shadow.batch_size

    def __len__(self) -> int:
        return len(self.base) + len(self.shadow)

    def __repr__(self) -> str:
        return f"ShadowCache(length={self.get_seq_length()}, base={self.base!r}, shadow={self.shadow!r})"

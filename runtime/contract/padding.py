"""The left-padding rule every batched graph call follows, for numpy arrays and lists (torch-free).

A batch of sequences of different lengths is right-aligned: padding goes on the left, where the
attention mask is 0, so every row's next token is in the last column::

    ids   [[0, 0, 5, 6],     mask [[0, 0, 1, 1],     positions [[1, 1, 0, 1],
           [7, 8, 9, 3]]           [1, 1, 1, 1]]                [0, 1, 2, 3]]

Real tokens count positions from 0; padding positions are 1 (any valid index would do: they are
masked out). ``shadowpeft.train.encoding`` pads training batches with the same rule in torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["left_pad", "positions_for"]


def left_pad(rows: Sequence[Sequence[int]], *, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligns token rows into one batch.

    Args:
        rows: Token ids per sequence (lists or 1-D arrays), of any lengths.
        pad_id: Id written into padding slots (masked out, so its value does not change the result).

    Returns:
        ``input_ids`` and ``attention_mask``, both (B, max length) int64.
    """
    width = max((len(row) for row in rows), default=0)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for index, row in enumerate(rows):
        if len(row):
            ids[index, width - len(row) :] = row
            mask[index, width - len(row) :] = 1
    return ids, mask


def positions_for(mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Position ids of the last ``new_tokens`` columns of ``mask`` (B, P+T): real tokens from 0, padding 1."""
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1
    return positions[:, -new_tokens:].astype(np.int64)

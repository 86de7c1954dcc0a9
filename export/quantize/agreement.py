"""Judging a quantized graph: top-1 agreement and KL divergence against its reference, never allclose."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["Agreement", "agreement"]


@dataclass(frozen=True)
class Agreement:
    """How closely a candidate's logits follow a reference's, over valid positions.

    Attributes:
        top1: Fraction of positions whose argmax tokens are equal.
        mean_kl: Mean KL(reference || candidate) in nats.
        positions: Number of positions compared.
    """

    top1: float
    mean_kl: float
    positions: int


def agreement(
    reference: Callable[[Mapping[str, np.ndarray]], np.ndarray],
    candidate: Callable[[Mapping[str, np.ndarray]], np.ndarray],
    feeds: Iterable[tuple[Mapping[str, np.ndarray], np.ndarray | None]],
) -> Agreement:
    """Top-1 agreement and mean KL(reference || candidate) of two logit functions.

    Both are computed in float64 from log-softmax, so large logits neither overflow nor lose the KL.

    Args:
        reference: Maps a feed to logits of shape (..., V), e.g. (B, T, V); the fp32 graph.
        candidate: The same for the graph under test; must return the same shape.
        feeds: ``(feed, valid)`` pairs. ``valid`` is a boolean (or 0/1) mask of the logits' leading
            shape, e.g. (B, T), that selects the positions to compare (padding is False), or ``None``
            for all positions.

    Returns:
        The agreement over every valid position of every feed.

    Raises:
        ValueError: If the logit or mask shapes differ, a logit is NaN or +inf, or no position is valid.
    """
    matches, kl_sum, positions = 0, 0.0, 0
    for index, (feed, valid) in enumerate(feeds):
        p = np.asarray(reference(feed), dtype=np.float64)  # (B, T, V)
        q = np.asarray(candidate(feed), dtype=np.float64)  # (B, T, V)
        mask = np.ones(p.shape[:-1], dtype=bool) if valid is None else np.asarray(valid).astype(bool)  # (B, T)
        if p.ndim < 2 or p.shape != q.shape or mask.shape != p.shape[:-1]:
            raise ValueError(
                f"feeds[{index}]: reference logits {p.shape}, candidate logits {q.shape} and valid mask "
                f"{mask.shape} must be (..., V), (..., V) and (...) with equal leading shapes."
            )
        for side, logits in (("reference", p), ("candidate", q)):
            if np.isnan(logits).any() or np.isposinf(logits).any():
                raise ValueError(f"feeds[{index}]: the {side} returned NaN or +inf logits; the graph is broken.")
        p, q = p[mask], q[mask]  # (N, V)
        log_p, log_q = _log_softmax(p), _log_softmax(q)
        matches += int(np.count_nonzero(p.argmax(axis=-1) == q.argmax(axis=-1)))
        # 0 * log(0 / q) = 0: a token the reference rules out (-inf logit) adds nothing.
        terms = np.where(log_p > -np.inf, np.exp(log_p) * (log_p - log_q), 0.0)
        kl_sum += float(terms.sum())
        positions += len(p)
    if positions == 0:
        raise ValueError("No valid positions to compare: every mask is all False, or feeds is empty.")
    return Agreement(top1=matches / positions, mean_kl=kl_sum / positions, positions=positions)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)  # <= 0, so exp cannot overflow
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

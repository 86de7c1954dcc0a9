"""The one KV-cache holder, and the one call that runs a graph step with past -> present feedback.

Every graph with a KV cache takes ``past_key_values.*`` (B, h, P, dh) and returns ``present.*``
(B, h, P+T, dh), which become the next step's past::

    feeds + past (P) --session.run--> outputs, present (P+T) --renamed--> past of the next step

:class:`KVCache` holds the past of one graph, keyed by its input names as the graph declares them
(:func:`~shadowpeft.runtime.contract.present_name_for` gives each one's output). The device shadow,
the backbone server and the export-time checks all step their graphs through :meth:`KVCache.run`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from shadowpeft.runtime.contract import ATTENTION_MASK, TensorSpec, is_past_name, present_name_for

__all__ = ["KVCache", "kv_bytes_per_token", "kv_inputs"]

_NUMPY = {"float32": np.float32, "float16": np.float16}
_PAST_AXIS = 2  # (B, h, P, dh)


class _Declared(Protocol):  # a GraphSpec from the manifest, or a GraphIO from the contract
    inputs: tuple[TensorSpec, ...]


class _Session(Protocol):  # an onnxruntime.InferenceSession
    def run(self, output_names: Sequence[str], input_feed: Mapping[str, Any]) -> list[np.ndarray]: ...


def kv_inputs(graph: _Declared) -> tuple[TensorSpec, ...]:
    """The graph's KV-cache inputs, in graph order (shadow-prefixed ones included)."""
    return tuple(spec for spec in graph.inputs if is_past_name(spec.name))


def kv_bytes_per_token(graph: _Declared) -> int:
    """Bytes the KV cache of ``graph`` holds per token of one sequence: the sum over its KV inputs of
    heads x head_dim x dtype size (layers x 2 x kv_heads x head_dim x 4 for an fp32 base cache).

    Raises:
        ValueError: For a KV input without fixed heads and head_dim or of another dtype (as :meth:`KVCache.empty`).
    """
    return sum(value.itemsize * value.shape[1] * value.shape[3] for value in KVCache.empty(graph, 1).past.values())


class KVCache:
    """The past KV tensors of one graph for a batch: ``past_key_values.*`` -> (B, h, P, dh).

    Args:
        past: The tensors by input name; every one holds the same number of positions P.
    """

    def __init__(self, past: Mapping[str, np.ndarray]) -> None:
        self.past: dict[str, np.ndarray] = dict(past)

    @classmethod
    def empty(cls, graph: _Declared, batch: int) -> KVCache:
        """A cache holding no positions (P = 0) for every KV input of ``graph``, in its declared dtype.

        Raises:
            ValueError: For a KV input that is not a float32/float16 (B, h, P, dh) tensor with fixed h, dh.
        """
        past = {}
        for spec in kv_inputs(graph):
            fixed = len(spec.shape) == 4 and isinstance(spec.shape[1], int) and isinstance(spec.shape[3], int)
            if not fixed or spec.dtype not in _NUMPY:
                raise ValueError(
                    f"KV input {spec.name!r} is {spec.dtype} {list(spec.shape)}; expected float32 or float16 "
                    "(batch, heads, past, head_dim) with fixed heads and head_dim. Re-export."
                )
            past[spec.name] = np.zeros((batch, spec.shape[1], 0, spec.shape[3]), dtype=_NUMPY[spec.dtype])
        return cls(past)

    @property
    def length(self) -> int:
        """P, the positions the cache holds (0 for a graph without KV inputs)."""
        return next((value.shape[_PAST_AXIS] for value in self.past.values()), 0)

    def run(
        self, session: _Session, output_names: Sequence[str], feeds: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], KVCache]:
        """Runs one step of the graph with this past; leaves ``self`` unchanged.

        Args:
            session: The graph's onnxruntime session.
            output_names: Outputs to compute; must include the ``present.*`` output of every KV input.
            feeds: Every other input (ids, mask, positions, states).

        Returns:
            The outputs by name, and the cache of the next step (the ``present.*`` outputs, P+T positions).
        """
        names = list(output_names)
        inputs = {**feeds, **self.past}
        if self._rows_one_at_a_time(feeds):
            rows = [
                session.run(names, {name: value[row : row + 1] for name, value in inputs.items()})
                for row in range(self.batch)
            ]
            outputs = [np.concatenate(parts, axis=0) for parts in zip(*rows, strict=True)]
        else:
            outputs = session.run(names, inputs)
        values = dict(zip(names, outputs, strict=True))
        return values, KVCache({name: values[present_name_for(name)] for name in self.past})

    @property
    def batch(self) -> int:
        """B, the sequences the cache holds (0 for a graph without KV inputs)."""
        return next((value.shape[0] for value in self.past.values()), 0)

    def _rows_one_at_a_time(self, feeds: Mapping[str, np.ndarray]) -> bool:
        """Whether this is a multi-token step of several sequences on a non-empty cache.

        onnxruntime's GroupQueryAttention (fused graphs, ``shadow-export --ops fused``) refuses that
        shape; rows are independent (every graph input and output is batch-first), so running them
        one at a time gives the same outputs for either kind of graph.
        """
        mask = feeds.get(ATTENTION_MASK)
        new = mask.shape[1] - self.length if mask is not None else 0
        return self.batch > 1 and self.length > 0 and new > 1

    def step(
        self, session: _Session, output_names: Sequence[str], feeds: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """:meth:`run`, then keeps the new past (only once the graph succeeded); returns the outputs."""
        values, following = self.run(session, output_names, feeds)
        self.past = following.past
        return values

    def trim(self, n: int) -> None:
        """Drops the last ``n`` positions (e.g. draft tokens a verifier rejected).

        Raises:
            ValueError: For ``n`` < 0 or more positions than the cache holds.
        """
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self.length:
            raise ValueError(f"trim(n) takes 0 <= n <= {self.length} (the positions held); got {n!r}.")
        keep = self.length - n
        self.past = {name: np.ascontiguousarray(value[:, :, :keep]) for name, value in self.past.items()}

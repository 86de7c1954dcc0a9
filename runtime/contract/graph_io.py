"""Graph keys, graph input/output names, dtypes and symbolic dimensions: the only place they are built.

Names follow the ONNX conventions of Hugging Face Optimum (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key|value`` -> ``present.{i}.key|value``, KV layout
``[batch, kv_heads, seq, head_dim]``) plus ours (``shadow_states`` for ``s0``). The exporter
declares graphs with these :class:`~shadowpeft.runtime.contract.specs.TensorSpec` tuples and writes
them into the manifest; the runtime reads names back from the manifest, or takes them from here
(never from its own literals). An export has up to four graphs, by key::

    device/shadow  (role detached-shadow)   device/head  (role head)
    cloud/backbone (role cloud-backbone)    coupled      (role coupled)

Per decode step (T new tokens, P cached, T + P = total)::

    device/shadow:   input_ids (B,T) + mask (B,P+T) + position_ids (B,T) + shadow KV (B,h,P,dh)
                       -> logits (B,T,V), shadow_states (B,T,d), present shadow KV (B,h,P+T,dh)
    cloud/backbone:  input_ids (B,T) + shadow_states (B,T,d) + mask + position_ids + base KV
                       -> hidden_states (B,T,d) (final-normed) [+ logits (B,T,V)], present base KV
    device/head:     hidden_states (B,T,d) -> logits (B,T,V)
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

from shadowpeft.runtime.contract.specs import GraphRole, TensorSpec

__all__ = [
    "ATTENTION_MASK",
    "BATCH",
    "CLOUD_BACKBONE",
    "COUPLED",
    "DEVICE_HEAD",
    "DEVICE_SHADOW",
    "GRAPH_KEYS",
    "GRAPH_ROLES",
    "HIDDEN_STATES",
    "INPUT_IDS",
    "LOGITS",
    "ORT_KEY_PREFIX",
    "PAST_SEQUENCE",
    "POSITION_IDS",
    "SEQUENCE",
    "SHADOW_STATES",
    "TOTAL_SEQUENCE",
    "GraphIO",
    "StackLayout",
    "KV_KINDS",
    "KVKind",
    "SHADOW_KV_PREFIX",
    "cloud_backbone_io",
    "coupled_io",
    "detached_shadow_io",
    "head_io",
    "is_past_name",
    "ort_copy_key",
    "past_key_name",
    "present_key_name",
    "present_name_for",
]

# Graph keys (manifest ``graphs`` keys; the graph file is ``{key}.onnx``) and the role of each.
DEVICE_SHADOW = "device/shadow"
DEVICE_HEAD = "device/head"
CLOUD_BACKBONE = "cloud/backbone"
COUPLED = "coupled"
#: Every graph key, in the order an export writes them.
GRAPH_KEYS: tuple[str, ...] = (DEVICE_SHADOW, DEVICE_HEAD, CLOUD_BACKBONE, COUPLED)
GRAPH_ROLES: dict[str, GraphRole] = {
    DEVICE_SHADOW: "detached-shadow",
    DEVICE_HEAD: "head",
    CLOUD_BACKBONE: "cloud-backbone",
    COUPLED: "coupled",
}

#: Manifest key of a graph's ``.ort`` copy (written for ``ort_format = true`` device profiles): ``ort/device/shadow``
#: for ``device/shadow``. Same inputs, outputs and weights as the graph it copies; the runtime loads it instead.
ORT_KEY_PREFIX = "ort/"


def ort_copy_key(key: str) -> str:
    """The manifest key of graph ``key``'s ``.ort`` copy."""
    return ORT_KEY_PREFIX + key


# Symbolic dimensions.
BATCH = "batch_size"
SEQUENCE = "sequence_length"  # new tokens this call (T)
PAST_SEQUENCE = "past_sequence_length"  # tokens already in the KV cache (P)
TOTAL_SEQUENCE = "total_sequence_length"  # P + T

# Tensor names.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
HIDDEN_STATES = "hidden_states"
SHADOW_STATES = "shadow_states"
#: Prefix of the shadow stack's KV names in a graph that also holds the base stack's (``coupled``).
SHADOW_KV_PREFIX = "shadow_"

KVKind = Literal["key", "value"]
KV_KINDS: tuple[str, ...] = ("key", "value")
_PAST, _PRESENT = "past_key_values", "present"
_KV_NAME = re.compile(
    rf"(?P<prefix>(?:{SHADOW_KV_PREFIX})?)(?P<io>{_PAST}|{_PRESENT})\.(?P<layer>\d+)\.(?P<kind>key|value)"
)
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


class GraphIO(NamedTuple):
    """Inputs and outputs of one graph, in order (unpacks as ``inputs, outputs = ...``)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def past_key_name(layer: int, kind: KVKind, *, prefix: str = "") -> str:
    """Name of a KV-cache input, e.g. ``past_key_values.0.key``.

    Args:
        layer: Layer index within the graph's own stack (shadow layers or base layers), from 0.
        kind: ``"key"`` or ``"value"``.
        prefix: :data:`SHADOW_KV_PREFIX` for the shadow stack in a graph that has both stacks.

    Raises:
        ValueError: For a negative layer or an unknown kind.
    """
    _check_kv(layer, kind)
    return f"{prefix}{_PAST}.{layer}.{kind}"


def present_key_name(layer: int, kind: KVKind, *, prefix: str = "") -> str:
    """Name of a KV-cache output, e.g. ``present.0.key``; it feeds :func:`past_key_name` next step.

    Args:
        layer: Layer index within the graph's own stack, from 0.
        kind: ``"key"`` or ``"value"``.
        prefix: :data:`SHADOW_KV_PREFIX` for the shadow stack in a graph that has both stacks.

    Raises:
        ValueError: For a negative layer or an unknown kind.
    """
    _check_kv(layer, kind)
    return f"{prefix}{_PRESENT}.{layer}.{kind}"


def is_past_name(name: str) -> bool:
    """Whether ``name`` is a KV-cache input (:func:`past_key_name`, with or without the shadow prefix)."""
    match = _KV_NAME.fullmatch(name)
    return match is not None and match["io"] == _PAST


def present_name_for(past_name: str) -> str:
    """The output that carries the KV input ``past_name`` to the next step, e.g. ``present.0.key``.

    Raises:
        ValueError: If ``past_name`` is not a KV-cache input name.
    """
    match = _KV_NAME.fullmatch(past_name)
    if match is None or match["io"] != _PAST:
        raise ValueError(f"{past_name!r} is not a KV-cache input name such as {past_key_name(0, 'key')!r}.")
    return present_key_name(int(match["layer"]), match["kind"], prefix=match["prefix"])


def detached_shadow_io(
    *, num_layers: int, kv_heads: int, head_dim: int, hidden: int, vocab: int, dtype: str = "float32"
) -> GraphIO:
    """I/O of the detached shadow graph (``role="detached-shadow"``): the model that runs alone.

    Args:
        num_layers: Shadow decoder layers (one KV pair each).
        kv_heads: KV heads of a shadow layer.
        head_dim: Head size of a shadow layer.
        hidden: Width ``d`` of ``shadow_states`` (the base model's hidden size).
        vocab: Vocabulary size of the shadow head's ``logits``.
        dtype: Float type of KV caches, ``logits`` and ``shadow_states``.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.*`` ->
        ``logits``, ``shadow_states``, ``present.*``.

    Raises:
        ValueError: For a size < 1 or a non-float dtype.
    """
    _check_sizes(num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden, vocab=vocab)
    _check_dtype(dtype)
    inputs = (*_token_inputs(), *_kv_specs(num_layers, kv_heads, head_dim, dtype, present=False))
    outputs = (
        TensorSpec(LOGITS, dtype, (BATCH, SEQUENCE, vocab)),
        TensorSpec(SHADOW_STATES, dtype, (BATCH, SEQUENCE, hidden)),
        *_kv_specs(num_layers, kv_heads, head_dim, dtype, present=True),
    )
    return GraphIO(inputs, outputs)


def head_io(*, hidden: int, vocab: int, dtype: str = "float32") -> GraphIO:
    """I/O of the base head graph (``role="head"``): final-normed hidden states -> logits.

    Coupled mode runs it on the device so that the cloud returns ``d`` numbers per token, not ``V``.

    Args:
        hidden: Hidden size ``d`` of the base model.
        vocab: Vocabulary size.
        dtype: Float type of both tensors.

    Raises:
        ValueError: For a size < 1 or a non-float dtype.
    """
    _check_sizes(hidden=hidden, vocab=vocab)
    _check_dtype(dtype)
    return GraphIO(
        (TensorSpec(HIDDEN_STATES, dtype, (BATCH, SEQUENCE, hidden)),),
        (TensorSpec(LOGITS, dtype, (BATCH, SEQUENCE, vocab)),),
    )


def cloud_backbone_io(
    *,
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    hidden: int,
    vocab: int | None = None,
    dtype: str = "float32",
) -> GraphIO:
    """I/O of the cloud backbone graph (``role="cloud-backbone"``): base layers with injection/update.

    Args:
        num_layers: Base decoder layers (one KV pair each).
        kv_heads: KV heads of a base layer.
        head_dim: Head size of a base layer.
        hidden: Hidden size ``d`` of the base model (width of ``shadow_states`` and ``hidden_states``).
        vocab: If given, the graph also returns the base head's ``logits`` of this size.
        dtype: Float type of ``shadow_states``, KV caches and outputs.

    Returns:
        ``input_ids``, ``shadow_states``, ``attention_mask``, ``position_ids``, ``past_key_values.*``
        -> ``hidden_states`` (final-normed), [``logits``], ``present.*``.

    Raises:
        ValueError: For a size < 1 or a non-float dtype.
    """
    sizes = {"num_layers": num_layers, "kv_heads": kv_heads, "head_dim": head_dim, "hidden": hidden}
    _check_sizes(**sizes, **({} if vocab is None else {"vocab": vocab}))
    _check_dtype(dtype)
    input_ids, attention_mask, position_ids = _token_inputs()
    inputs = (
        input_ids,
        TensorSpec(SHADOW_STATES, dtype, (BATCH, SEQUENCE, hidden)),
        attention_mask,
        position_ids,
        *_kv_specs(num_layers, kv_heads, head_dim, dtype, present=False),
    )
    logits = () if vocab is None else (TensorSpec(LOGITS, dtype, (BATCH, SEQUENCE, vocab)),)
    outputs = (
        TensorSpec(HIDDEN_STATES, dtype, (BATCH, SEQUENCE, hidden)),
        *logits,
        *_kv_specs(num_layers, kv_heads, head_dim, dtype, present=True),
    )
    return GraphIO(inputs, outputs)


class StackLayout(NamedTuple):
    """KV layout of one decoder stack: layers, KV heads per layer, head size."""

    num_layers: int
    kv_heads: int
    head_dim: int


def declared_stack_layout(inputs: tuple[TensorSpec, ...]) -> StackLayout | None:
    """The KV layout a graph declares through its ``past_key_values.*`` inputs: layers counted from 0 while
    present, KV heads and head size from the first (``None`` without one of shape (batch, kv_heads, past,
    head_dim) with fixed kv_heads and head_dim)."""
    by_name = {spec.name: spec for spec in inputs}
    layers = 0
    while past_key_name(layers, "key") in by_name:
        layers += 1
    first = by_name.get(past_key_name(0, "key"))
    if first is None or len(first.shape) != 4 or not all(isinstance(n, int) for n in first.shape[1::2]):
        return None
    return StackLayout(layers, first.shape[1], first.shape[3])


def coupled_io(*, shadow: StackLayout, base: StackLayout, hidden: int, vocab: int, dtype: str = "float32") -> GraphIO:
    """I/O of the single-machine graph (``role="coupled"``): shadow and base with injection and update.

    Shadow KV tensors carry :data:`SHADOW_KV_PREFIX` and come before the base's.

    Args:
        shadow: Layout of the shadow stack.
        base: Layout of the base stack.
        hidden: Hidden size ``d`` of the base model.
        vocab: Vocabulary size.
        dtype: Float type of KV caches, states and logits.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids``, ``shadow_past_key_values.*``,
        ``past_key_values.*`` -> ``logits`` (base head), ``shadow_states``, ``shadow_present.*``,
        ``present.*``.

    Raises:
        ValueError: For a size < 1 or a non-float dtype.
    """
    _check_sizes(hidden=hidden, vocab=vocab, **{f"shadow_{k}": v for k, v in shadow._asdict().items()})
    _check_sizes(**base._asdict())
    _check_dtype(dtype)
    inputs = (
        *_token_inputs(),
        *_kv_specs(*shadow, dtype, present=False, prefix=SHADOW_KV_PREFIX),
        *_kv_specs(*base, dtype, present=False),
    )
    outputs = (
        TensorSpec(LOGITS, dtype, (BATCH, SEQUENCE, vocab)),
        TensorSpec(SHADOW_STATES, dtype, (BATCH, SEQUENCE, hidden)),
        *_kv_specs(*shadow, dtype, present=True, prefix=SHADOW_KV_PREFIX),
        *_kv_specs(*base, dtype, present=True),
    )
    return GraphIO(inputs, outputs)


def _token_inputs() -> tuple[TensorSpec, TensorSpec, TensorSpec]:
    return (
        TensorSpec(INPUT_IDS, "int64", (BATCH, SEQUENCE)),
        TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL_SEQUENCE)),
        TensorSpec(POSITION_IDS, "int64", (BATCH, SEQUENCE)),
    )


def _kv_specs(
    num_layers: int, kv_heads: int, head_dim: int, dtype: str, *, present: bool, prefix: str = ""
) -> tuple[TensorSpec, ...]:
    """KV tensors in layer order, key before value: (B, kv_heads, P or P+T, head_dim)."""
    name = present_key_name if present else past_key_name
    length = TOTAL_SEQUENCE if present else PAST_SEQUENCE
    return tuple(
        TensorSpec(name(layer, kind, prefix=prefix), dtype, (BATCH, kv_heads, length, head_dim))
        for layer in range(num_layers)
        for kind in KV_KINDS
    )


def _check_kv(layer: int, kind: str) -> None:
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise ValueError(f"layer must be an integer >= 0; got {layer!r}.")
    if kind not in KV_KINDS:
        raise ValueError(f"kind must be 'key' or 'value'; got {kind!r}.")


def _check_sizes(**sizes: int) -> None:
    bad = [
        f"{name}={value!r}"
        for name, value in sizes.items()
        if not isinstance(value, int) or isinstance(value, bool) or value < 1
    ]
    if bad:
        raise ValueError(f"Graph sizes must be integers >= 1; got {', '.join(bad)}. Read them from the model config.")


def _check_dtype(dtype: str) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"dtype must be a float type ({', '.join(_FLOAT_DTYPES)}); got {dtype!r}. It sets the type of "
            "KV caches, states and logits; ids, masks and positions are always int64."
        )

"""Base-model fingerprint: which frozen backbone an adapter was trained on (the design notes, "Artifacts").

A ShadowPEFT adapter only makes sense on the exact base it was trained beside, so a checkpoint
records three hashes of that base and :func:`shadowpeft.checkpoint.store.load_shadow` recomputes them:

* ``config_sha256``: the architecture-defining config keys only (:data:`ARCHITECTURE_KEYS`), as
  canonical JSON. Bookkeeping keys (``dtype``, ``_name_or_path``, ``architectures``,
  ``transformers_version``, ``use_cache``...) are left out, so a model reloaded from disk, or
  loaded in another dtype, hashes the same.
* ``embedding_sha256``: the input token table, cast to bfloat16 first, so fp32 and bf16 loads of
  the same weights agree.
* ``head_sha256``: the LM head (its ArchSpec's ``output_head``), cast the same way; ``None`` for a
  model without one (sequence classification, whose ``score`` head is trained with the adapter
  and saved in the checkpoint, so it is no part of the base's identity).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shadowpeft.arch import REGISTRY, ArchSpec, spec_for
from shadowpeft.errors import CheckpointError

# Keys of a HF config that change the weights' shapes or the forward's math, as HF names them. A
# family that spells some differently (GPT-2's ``n_*``) lists its own in its ArchSpec's
# ``architecture_keys``; only the keys a config has are used.
COMMON_ARCHITECTURE_KEYS: tuple[str, ...] = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "hidden_activation",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "partial_rotary_factor",
    "tie_word_embeddings",
    "sliding_window",
    "layer_types",
    "attention_bias",
    "mlp_bias",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
)

# Every key any registered family hashes: the common keys, then each family's own.
ARCHITECTURE_KEYS: tuple[str, ...] = tuple(
    dict.fromkeys(COMMON_ARCHITECTURE_KEYS + tuple(k for spec in REGISTRY.values() for k in spec.architecture_keys))
)

# Human names of the fingerprint's parts, as used in error messages.
PART_NAMES = {
    "config_sha256": "architecture config",
    "embedding_sha256": "embedding weights",
    "head_sha256": "output head weights",
}

_CHUNK_ELEMENTS = 1 << 24  # hash big tables in slices: no full bf16 copy of a 1 GB embedding


@dataclass(frozen=True)
class BaseFingerprint:
    """Hashes identifying a frozen base model.

    Attributes:
        config_sha256: sha256 of the canonical JSON of :func:`architecture_config`.
        embedding_sha256: sha256 of the input embedding weights in bfloat16.
        head_sha256: sha256 of the LM head weights in bfloat16, or ``None`` when the model has no
            LM head (sequence classification).
    """

    config_sha256: str
    embedding_sha256: str
    head_sha256: str | None

    def to_dict(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in PART_NAMES}

    @classmethod
    def from_dict(cls, data: Any) -> BaseFingerprint:
        """Build from the dict written by :meth:`to_dict`.

        Raises:
            CheckpointError: a missing or unknown key, or a value that is not a hex string.
        """
        if not isinstance(data, dict) or set(data) != set(PART_NAMES):
            raise CheckpointError(f"base fingerprint must be a mapping with keys {sorted(PART_NAMES)}, got {data!r}.")
        for name, value in data.items():
            allowed_none = name == "head_sha256"
            if not (isinstance(value, str) or (allowed_none and value is None)):
                raise CheckpointError(f"base fingerprint {name}={value!r}: must be a sha256 hex string.")
        return cls(**data)


def architecture_config(config: Any) -> dict[str, Any]:
    """The architecture-defining subset of a HF config (:data:`ARCHITECTURE_KEYS`), JSON-ready.

    Args:
        config: A ``transformers`` ``PretrainedConfig``.
    """
    data = config.to_dict()
    return {key: _jsonable(data[key]) for key in ARCHITECTURE_KEYS if key in data}


def config_sha256(config: Any) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of :func:`architecture_config`."""
    canonical = json.dumps(architecture_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def tensor_sha256(tensor: Tensor) -> str:
    """sha256 of a tensor's shape and its values cast to bfloat16 (dtype- and device-independent).

    Raises:
        CheckpointError: the tensor has no data (meta device).
    """
    if tensor.is_meta:
        raise CheckpointError(
            "Cannot fingerprint a model whose weights are on the meta device; load its weights first."
        )
    digest = hashlib.sha256(json.dumps(list(tensor.shape)).encode("utf-8"))
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
        chunk = flat[start : start + _CHUNK_ELEMENTS].to(torch.bfloat16).cpu().contiguous()
        digest.update(chunk.view(torch.int16).numpy().data)
    return digest.hexdigest()


def fingerprint(base_model: nn.Module) -> BaseFingerprint:
    """Fingerprint a HF model (``XForCausalLM`` / ``XForSequenceClassification``).

    Args:
        base_model: The plain base model (not a ShadowModel wrapper: pass ``wrapper.base``).

    Returns:
        The :class:`BaseFingerprint` of its config, input embeddings and LM head.
    """
    embedding = base_model.get_input_embeddings().weight
    embedding_hash = tensor_sha256(embedding)
    head_module = spec_for(base_model.config).output_head(base_model)
    head_hash = None
    if head_module is not None:
        head = head_module.weight
        tied = head.data_ptr() == embedding.data_ptr() and head.shape == embedding.shape
        head_hash = embedding_hash if tied else tensor_sha256(head)
    return BaseFingerprint(config_sha256(base_model.config), embedding_hash, head_hash)


def compare(expected: BaseFingerprint, actual: BaseFingerprint) -> list[str]:
    """Human names of the fingerprint parts that differ (empty when the bases match).

    Args:
        expected: The fingerprint stored with a checkpoint.
        actual: The fingerprint of the model at hand.
    """
    return [label for name, label in PART_NAMES.items() if getattr(expected, name) != getattr(actual, name)]


def base_differences(expected: BaseFingerprint, expected_arch: dict[str, Any], base_model: nn.Module) -> list[str]:
    """What differs between ``base_model`` and a recorded base, each part named (empty if none).

    Args:
        expected: The recorded fingerprint.
        expected_arch: The recorded :func:`architecture_config`, to name the differing config keys.
        base_model: The model at hand.
    """
    details = []
    for part in compare(expected, fingerprint(base_model)):
        if part == PART_NAMES["config_sha256"]:
            diffs = config_differences(expected_arch, architecture_config(base_model.config))
            part = f"{part} ({'; '.join(diffs)})" if diffs else part
        details.append(part)
    return details


def config_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """``key: expected -> actual`` for each architecture key that differs between two configs."""
    out = []
    for key in sorted(set(expected) | set(actual)):
        if expected.get(key) != actual.get(key):
            out.append(f"{key}: {expected.get(key, '<unset>')!r} -> {actual.get(key, '<unset>')!r}")
    return out


def describe(arch: dict[str, Any]) -> str:
    """A short summary of an :func:`architecture_config` dict: ``llama, hidden 576, 30 layers, vocab 49152``."""
    # The family names its keys (GPT-2: n_embd, n_layer); an unregistered one is read with HF's names.
    names = REGISTRY.get(arch.get("model_type")) or ArchSpec(model_types=())
    hidden = arch.get(names.config_name("hidden_size"))
    layers = arch.get(names.config_name("num_hidden_layers"))
    parts = [str(arch.get("model_type", "unknown model_type"))]
    if hidden is not None:
        parts.append(f"hidden {hidden}")
    if layers is not None:
        parts.append(f"{layers} layers")
    if arch.get("vocab_size") is not None:
        parts.append(f"vocab {arch['vocab_size']}")
    return ", ".join(parts)


def _jsonable(value: Any) -> Any:
    """Tuples as lists, string keys, integral floats as ints (``10000.0`` == ``10000``): canonical JSON."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value

"""``device/genai_config.json``: the detached shadow as an onnxruntime-genai model.

onnxruntime-genai (PyPI ``onnxruntime-genai``, with C, C#, Java and Objective-C bindings) opens a folder
holding a ``genai_config.json`` that describes one decoder graph, and the tokenizer files beside it. The
export writes that folder around the detached shadow graph, so ``onnxruntime_genai.Model("<export>/device")``
generates with it::

    export/device/
      shadow.onnx               model.decoder.filename (the detached shadow, any weight format)
      genai_config.json         written here, from the manifest's GraphSpec of device/shadow
      tokenizer.json ...        copies of export/tokenizer/*: onnxruntime-genai reads them beside the config
                                (written once for it and Optimum by shadowpeft.export.device_tokenizer)

Every input and output name in the config comes from the graph's declared I/O (the names are Optimum's,
which are also onnxruntime-genai's defaults), so the config cannot drift from the graph. Three choices
follow from the graph itself:

* ``search.past_present_share_buffer`` is false: the graph concatenates past and new keys/values into
  ``present.*``. With a shared buffer onnxruntime-genai binds a context-length ``present`` buffer and the
  Concat's output shape does not fit it.
* ``model.type`` is ``decoder``, onnxruntime-genai's generic decoder-only model, whatever the base
  family: the config describes this graph's layout, not the family's stock one (``gpt2`` would select
  another KV layout).
* The EOS, BOS and pad ids are the tokenizer's, as ``shadow-run`` reads them, so both stop on the same token.

The config is returned with its sha256 for the manifest's ``interop_files``.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from transformers import PreTrainedTokenizerBase

from shadowpeft.arch import spec_for
from shadowpeft.export.errors import ExportError
from shadowpeft.heads import ShadowForCausalLM
from shadowpeft.runtime.atomic import write_atomic
from shadowpeft.runtime.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    GraphSpec,
    StackLayout,
    declared_stack_layout,
    past_key_name,
    present_key_name,
)
from shadowpeft.runtime.devices import DeviceProfile
from shadowpeft.runtime.manifest_files import file_sha256

__all__ = ["GENAI_CONFIG_NAME", "GENAI_MODEL_TYPE", "SpecialTokens", "genai_config", "write_genai_folder"]

GENAI_CONFIG_NAME = "genai_config.json"
#: onnxruntime-genai's generic decoder-only model type (see the module docstring).
GENAI_MODEL_TYPE = "decoder"
#: Context length written when neither the base config nor the device profile states one.
_DEFAULT_CONTEXT = 2048
_LAYER_SLOT = 987654321  # a layer index no graph has; replaced by %d to turn a KV name into a pattern


class SpecialTokens(NamedTuple):
    """Token ids onnxruntime-genai needs: the ones ``shadow-run`` stops on (``eos``, possibly none), BOS, pad."""

    eos: tuple[int, ...]
    bos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
        """EOS as the runtime reads it (the tokenizer's eos token); pad falls back to EOS then 0, BOS to pad."""
        eos = tokenizer.eos_token_id
        pad = next((token for token in (tokenizer.pad_token_id, eos) if token is not None), 0)
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad
        return cls(() if eos is None else (int(eos),), int(bos), int(pad))


def genai_config(
    spec: GraphSpec,
    *,
    attention_heads: int,
    hidden_size: int,
    context_length: int,
    vocab_size: int,
    tokens: SpecialTokens,
) -> dict[str, Any]:
    """The ``genai_config.json`` of the detached shadow graph ``spec`` (greedy search by default).

    Args:
        spec: The manifest's ``device/shadow`` graph: its file name and its KV inputs give the decoder's
            file, layers, KV heads and head size.
        attention_heads: Query heads of a shadow layer.
        hidden_size: Width of the shadow stack.
        context_length: Longest sequence (prompt + new tokens); also the default ``search.max_length``.
        vocab_size: Width of the graph's ``logits``.
        tokens: EOS, BOS and pad ids.

    Raises:
        ExportError: The graph's KV inputs or outputs do not follow one ``...{layer}...`` naming pattern.
    """
    layout = _stack_layout(spec)
    eos: int | list[int] = tokens.eos[0] if len(tokens.eos) == 1 else list(tokens.eos)
    return {
        "model": {
            "type": GENAI_MODEL_TYPE,
            "bos_token_id": tokens.bos,
            "eos_token_id": eos,
            "pad_token_id": tokens.pad,
            "vocab_size": vocab_size,
            "context_length": context_length,
            "decoder": {
                "filename": PurePosixPath(spec.file).name,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": layout.head_dim,
                "hidden_size": hidden_size,
                "num_attention_heads": attention_heads,
                "num_key_value_heads": layout.kv_heads,
                "num_hidden_layers": layout.num_layers,
                "inputs": {
                    "input_ids": INPUT_IDS,
                    "attention_mask": ATTENTION_MASK,
                    "position_ids": POSITION_IDS,
                    "past_key_names": _pattern(spec, past_key_name, "key", layout, inputs=True),
                    "past_value_names": _pattern(spec, past_key_name, "value", layout, inputs=True),
                },
                "outputs": {
                    "logits": LOGITS,
                    "present_key_names": _pattern(spec, present_key_name, "key", layout, inputs=False),
                    "present_value_names": _pattern(spec, present_key_name, "value", layout, inputs=False),
                },
            },
        },
        "search": {
            "do_sample": False,
            "max_length": context_length,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_folder(
    root: Path,
    spec: GraphSpec | None,
    model: ShadowForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    *,
    profile: DeviceProfile | None = None,
) -> dict[str, str] | None:
    """Writes ``genai_config.json`` beside the detached shadow graph of the export ``root``.

    The tokenizer files onnxruntime-genai also reads there are written by
    :func:`~shadowpeft.export.device_tokenizer.copy_tokenizer_files`.

    Args:
        root: The export directory (its graphs and ``tokenizer/`` already written).
        spec: The manifest's ``device/shadow`` graph, or ``None`` when the export has none (nothing is written).
        model: The exported model (shadow stack sizes, base context length).
        tokenizer: Its tokenizer (special token ids).
        profile: Device profile; its ``max_context`` caps the context length.

    Returns:
        sha256 of the file written, by its path relative to ``root`` (for the manifest's ``interop_files``),
        or ``None`` when ``spec`` is ``None``.
    """
    if spec is None:
        return None
    shadow = model.shadow_model.config
    config = genai_config(
        spec,
        attention_heads=spec_for(shadow).attention_dims(shadow).heads,
        hidden_size=shadow.hidden_size,
        context_length=_context_length(model, profile),
        vocab_size=model.base.get_output_embeddings().weight.shape[0],
        tokens=SpecialTokens.from_tokenizer(tokenizer),
    )
    target = PurePosixPath(spec.file).parent / GENAI_CONFIG_NAME
    write_atomic(root / target, json.dumps(config, indent=2) + "\n")
    return {target.as_posix(): file_sha256(root / target)}


def _context_length(model: ShadowForCausalLM, profile: DeviceProfile | None) -> int:
    """The base's position limit (``max_position_embeddings``), capped by the profile's ``max_context``."""
    positions = getattr(model.base_backbone.config, "max_position_embeddings", None)
    limits = [n for n in (positions, profile.max_context if profile is not None else None) if n]
    return min(limits) if limits else _DEFAULT_CONTEXT


def _stack_layout(spec: GraphSpec) -> StackLayout:
    """Layers, KV heads and head size of the graph, read from its ``past_key_values.*`` inputs."""
    layout = declared_stack_layout(spec.inputs)
    if layout is None:
        raise ExportError(
            f"{spec.file} has no KV input {past_key_name(0, 'key')!r} of shape (batch, kv_heads, past, head_dim) "
            "with fixed kv_heads and head_dim, so onnxruntime-genai cannot be configured for it. Report this."
        )
    return layout


def _pattern(spec: GraphSpec, name_of, kind: str, layout: StackLayout, *, inputs: bool) -> str:
    """onnxruntime-genai's ``%d`` pattern of a KV name family, checked against every layer of the graph."""
    pattern = name_of(_LAYER_SLOT, kind).replace(str(_LAYER_SLOT), "%d")
    names = set(spec.input_names if inputs else spec.output_names)
    missing = [pattern % layer for layer in range(layout.num_layers) if pattern % layer not in names]
    if missing:
        raise ExportError(
            f"{spec.file} lacks the KV {'inputs' if inputs else 'outputs'} {', '.join(missing)} that the "
            f"onnxruntime-genai pattern {pattern!r} names. Report this."
        )
    return pattern

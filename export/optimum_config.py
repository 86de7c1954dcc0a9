"""The device folder as a Hugging Face Optimum model: ``ORTModelForCausalLM`` loads the detached shadow.

Optimum (PyPI ``optimum-onnx``, which pins transformers < 4.58) opens a folder holding a ``config.json``
and an ONNX decoder with Optimum's I/O names, which are ours (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key|value`` -> ``logits``, ``present.{i}.key|value``). The
export writes what it needs beside the detached shadow graph::

    export/device/
      shadow.onnx               the detached shadow (any weight format); named with file_name="shadow.onnx"
      config.json               the detached model: the shadow stack's config, with the graph's KV layers,
                                the base vocabulary and the tokenizer's special ids; transformers 4.x and 5.x
                                read it alike (shadowpeft.checkpoint.hf_config)
      generation_config.json    bos/eos/pad ids, greedy by default
      tokenizer_config.json     the tokenizer as transformers 4.57 reads it, and tokenizer.json ...: written
                                once for Optimum and onnxruntime-genai (shadowpeft.export.device_tokenizer)

and loads with::

    model = ORTModelForCausalLM.from_pretrained("<export>/device", file_name="shadow.onnx")
    tokenizer = AutoTokenizer.from_pretrained("<export>/device")

``file_name`` is needed: a split export's device folder also holds ``head.onnx``, and without it Optimum
picks a graph by its own naming rules. Naming the graph ``model.onnx`` instead would rename a file every
manifest, runtime and client already knows, for one ``from_pretrained`` argument.

Optimum sizes the empty KV of the first step as ``hidden_size // num_attention_heads`` for most model
types (``head_dim`` only for gemma and a few others), so a stack whose head size differs from that ratio
(Qwen3's larger models) does not load; the config keeps the true sizes rather than ones bent to fit.

The configs written are returned with their sha256 for the manifest's ``interop_files``.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from transformers import PreTrainedTokenizerBase

from shadowpeft.checkpoint.hf_config import portable_config
from shadowpeft.export.errors import ExportError
from shadowpeft.heads import ShadowForCausalLM
from shadowpeft.runtime.atomic import write_atomic
from shadowpeft.runtime.contract import GraphSpec, StackLayout, declared_stack_layout, past_key_name
from shadowpeft.runtime.manifest_files import file_sha256

__all__ = [
    "GENERATION_CONFIG_NAME",
    "MODEL_CONFIG_NAME",
    "model_config",
    "write_optimum_folder",
]

MODEL_CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"


def model_config(
    shadow_config: dict[str, Any], spec: GraphSpec, *, vocab_size: int, special: dict[str, int | None]
) -> dict[str, Any]:
    """The ``config.json`` of the detached shadow graph ``spec``.

    Args:
        shadow_config: The shadow stack's config as ``save_pretrained`` writes it (``to_diff_dict()``): model
            type, widths, heads, RoPE.
        spec: The manifest's ``device/shadow`` graph; its KV inputs give the layer count, KV heads and
            head size Optimum feeds it.
        vocab_size: Width of the graph's ``logits`` (the base vocabulary; the shadow stack has no embedding).
        special: ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` (``None`` where the tokenizer has none).

    Raises:
        ExportError: The graph has no KV input of shape (batch, kv_heads, past, head_dim).
    """
    layout = _stack_layout(spec)
    config = {
        **shadow_config,
        "num_hidden_layers": layout.num_layers,
        "num_key_value_heads": layout.kv_heads,
        "head_dim": layout.head_dim,
        "vocab_size": vocab_size,
        "use_cache": True,
        **special,
    }
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version"):  # where it came from, who wrote it
        config.pop(key, None)
    return portable_config(config)


def write_optimum_folder(
    root: Path,
    spec: GraphSpec | None,
    model: ShadowForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, str] | None:
    """Writes Optimum's configs beside the detached shadow graph of the export ``root``.

    The tokenizer files Optimum also reads there are written by
    :func:`~shadowpeft.export.device_tokenizer.copy_tokenizer_files`.

    Args:
        root: The export directory (its graphs and ``tokenizer/`` already written).
        spec: The manifest's ``device/shadow`` graph, or ``None`` when the export has none (nothing is written).
        model: The exported model (the shadow stack's config, the base vocabulary).
        tokenizer: Its tokenizer (special token ids).

    Returns:
        sha256 of every file written, by its path relative to ``root`` (for the manifest's ``interop_files``),
        or ``None`` when ``spec`` is ``None``.
    """
    if spec is None:
        return None
    folder = PurePosixPath(spec.file).parent
    special = _special_ids(tokenizer)
    vocab_size = model.base.get_output_embeddings().weight.shape[0]
    config = model_config(model.shadow_model.config.to_diff_dict(), spec, vocab_size=vocab_size, special=special)
    generation = {**special, "do_sample": False}
    written = []
    for name, data in ((MODEL_CONFIG_NAME, config), (GENERATION_CONFIG_NAME, generation)):
        write_atomic(root / folder / name, json.dumps(data, indent=2, sort_keys=True) + "\n")
        written.append(folder / name)
    return {path.as_posix(): file_sha256(root / path) for path in sorted(written)}


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """EOS as ``shadow-run`` stops on it (the tokenizer's eos token); pad falls back to EOS, as generation does."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": pad}


def _stack_layout(spec: GraphSpec) -> StackLayout:
    """Layers, KV heads and head size of the graph, read from its ``past_key_values.*`` inputs."""
    layout = declared_stack_layout(spec.inputs)
    if layout is None:
        raise ExportError(
            f"{spec.file} has no KV input {past_key_name(0, 'key')!r} of shape (batch, kv_heads, past, head_dim) "
            "with fixed kv_heads and head_dim, so Optimum's config.json cannot describe it. Report this."
        )
    return layout

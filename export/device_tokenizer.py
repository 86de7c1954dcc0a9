"""The tokenizer files beside the detached shadow graph, written once for onnxruntime-genai and Optimum.

Both interop folders are one folder, the detached shadow graph's (``device/``): onnxruntime-genai
(:mod:`shadowpeft.export.genai_config`) and Optimum (:mod:`shadowpeft.export.optimum_config`) each read
the tokenizer from beside their config. :func:`copy_tokenizer_files` writes it there once, before either
config::

    export/device/
      tokenizer.json ...        copies of export/tokenizer/* (the runtime keeps reading those)
      tokenizer_config.json     the tokenizer as transformers 4.57 reads it for Optimum (PreTrainedTokenizerFast,
                                left padding, input_ids + attention_mask only); onnxruntime-genai reads the same file

The files written are returned with their sha256 for the manifest's ``interop_files``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from shadowpeft.runtime.atomic import write_atomic
from shadowpeft.runtime.contract import ATTENTION_MASK, INPUT_IDS, GraphSpec
from shadowpeft.runtime.manifest_files import file_sha256

__all__ = ["TOKENIZER_CONFIG_NAME", "copy_tokenizer_files", "tokenizer_config"]

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
#: A tokenizer class every transformers version reads from ``tokenizer.json`` alone (5.x writes
#: ``TokenizersBackend``, which 4.57 does not know).
_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def tokenizer_config(data: dict[str, Any]) -> dict[str, Any]:
    """The export's ``tokenizer_config.json`` as transformers 4.57 (and 5.x) reads it for Optimum.

    The class becomes ``PreTrainedTokenizerFast``; ``model_input_names`` are the graph's (4.57's default
    adds ``token_type_ids``, which generation would then feed the graph); padding is on the left, as
    batched decoding with a KV cache needs.
    """
    return {
        **data,
        "tokenizer_class": _TOKENIZER_CLASS,
        "model_input_names": [INPUT_IDS, ATTENTION_MASK],
        "padding_side": "left",
    }


def copy_tokenizer_files(root: Path, spec: GraphSpec, tokenizer_files: Iterable[str]) -> dict[str, str]:
    """Copies the export's tokenizer files beside the detached shadow graph ``spec`` of the export ``root``.

    Args:
        root: The export directory (its graphs and ``tokenizer/`` already written).
        spec: The manifest's ``device/shadow`` graph; the copies go into its folder.
        tokenizer_files: The export's tokenizer files, relative to ``root``; ``tokenizer_config.json`` is
            rewritten by :func:`tokenizer_config`, the others copied byte for byte.

    Returns:
        The sha256 of each copy by its path relative to ``root``, sorted (for the manifest's ``interop_files``).
    """
    folder = PurePosixPath(spec.file).parent
    copies = []
    for relative in tokenizer_files:
        source, target = root / relative, folder / PurePosixPath(relative).name
        if target.name == TOKENIZER_CONFIG_NAME:
            data = tokenizer_config(json.loads(source.read_text(encoding="utf-8")))
            write_atomic(root / target, json.dumps(data, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(source, root / target)
        copies.append(target)
    return {path.as_posix(): file_sha256(root / path) for path in sorted(copies)}

"""The detached shadow as the draft model of onnxruntime-genai's own speculative decoding.

onnxruntime-genai (0.18) runs draft-model speculative decoding when ``genai_config.json`` carries a
``model.draft`` decoder beside ``model.decoder``: the draft proposes ``speculative.max_draft_tokens``
tokens, the target verifies them in one forward and keeps the longest prefix it agrees with, so greedy
output is the target's own. The detached shadow is a draft of that kind for its base model: same
vocabulary and tokenizer, a fraction of the layers. :func:`write_speculative_folder` composes one folder
from an onnxruntime-genai model folder of the base (the *target*, e.g. written by
``python -m onnxruntime_genai.models.builder``) and an export's ``device/`` folder (the *draft*)::

    out/
      genai_config.json     the target's config + model.draft (the shadow's decoder block) + speculative
      model.onnx ...        the target's other files: graph, weights, tokenizer (hard links where the file
                            system allows, else copies)
      draft/shadow.onnx     the draft graph (and its external data)

onnxruntime-genai refuses config paths with ``..``, so both models live under ``out``. Its search options
are shared by both models, and the shadow graph concatenates its KV cache, so
``search.past_present_share_buffer`` is set to false (the target's GroupQueryAttention runs either way).
Both models get the target's session options: onnxruntime-genai requires the same execution providers.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from shadowpeft.export.errors import ExportError
from shadowpeft.export.genai_config import GENAI_CONFIG_NAME
from shadowpeft.runtime import atomic
from shadowpeft.runtime.contract import DEVICE_SHADOW, GraphSpec
from shadowpeft.runtime.manifest import Manifest
from shadowpeft.runtime.manifest_files import verify_files

__all__ = ["DEFAULT_DRAFT_TOKENS", "speculative_config", "write_speculative_folder"]

#: onnxruntime-genai's own default for ``speculative.max_draft_tokens``.
DEFAULT_DRAFT_TOKENS = 4
_DRAFT = "draft"


def speculative_config(target: dict[str, Any], draft: dict[str, Any], *, max_draft_tokens: int) -> dict[str, Any]:
    """The composite ``genai_config.json``: ``target``'s, with ``draft``'s decoder as ``model.draft``.

    The draft's file name gets the ``draft/`` prefix and the target's session options, and
    ``search.past_present_share_buffer`` becomes false.

    Raises:
        ExportError: The two configs have different vocabulary sizes, or ``max_draft_tokens`` is not in 1..16.
    """
    if not 1 <= max_draft_tokens <= 16:
        raise ExportError(f"max_draft_tokens must be in 1..16 (onnxruntime-genai's range); got {max_draft_tokens}.")
    sizes = (target["model"].get("vocab_size"), draft["model"].get("vocab_size"))
    if sizes[0] != sizes[1]:
        raise ExportError(
            f"The target model's vocabulary ({sizes[0]}) differs from the shadow's ({sizes[1]}): a draft must share "
            "its target's tokenizer. Build the target from the base model this export was trained on."
        )
    config = copy.deepcopy(target)
    decoder = config["model"]["decoder"]
    draft_decoder = copy.deepcopy(draft["model"]["decoder"])
    draft_decoder["filename"] = f"{_DRAFT}/{draft_decoder['filename']}"
    if "session_options" in decoder:
        draft_decoder["session_options"] = copy.deepcopy(decoder["session_options"])
    config["model"]["draft"] = draft_decoder
    config.setdefault("search", {})["past_present_share_buffer"] = False
    config["speculative"] = {**config.get("speculative", {}), "max_draft_tokens": max_draft_tokens}
    return config


def write_speculative_folder(
    target_dir: Path, export_dir: Path, out: Path, *, max_draft_tokens: int = DEFAULT_DRAFT_TOKENS
) -> Path:
    """Writes ``out``: an onnxruntime-genai folder whose target is ``target_dir`` and whose draft is the shadow.

    Args:
        target_dir: An onnxruntime-genai model folder of the plain base (``genai_config.json``, its graph files,
            its tokenizer files).
        export_dir: A shadowpeft export with a detached shadow (``device/genai_config.json``).
        out: The folder to write; must not exist. Published in one rename.
        max_draft_tokens: Tokens the shadow drafts per verify forward (``speculative.max_draft_tokens``).

    Returns:
        ``out``, ready for ``onnxruntime_genai.Model(str(out))``.

    Raises:
        ExportError: ``out`` exists, either folder lacks its ``genai_config.json``, or the vocabularies differ.
        ManifestError: The export's files do not match its manifest.
    """
    if out.exists():
        raise ExportError(f"{str(out)!r} already exists; choose a new folder for the speculative model.")
    manifest = verify_files(export_dir)
    spec = _shadow(manifest, export_dir)
    device = export_dir / PurePosixPath(spec.file).parent
    target, draft = _read_config(target_dir, "target model folder"), _read_config(device, "export's device folder")
    config = speculative_config(target, draft, max_draft_tokens=max_draft_tokens)
    if (target_dir / _DRAFT).exists():
        raise ExportError(f"The target model folder {str(target_dir)!r} has an entry {_DRAFT!r}; move it away.")
    with atomic.staging_directory(out) as staging:
        for path in target_dir.iterdir():
            if path.is_file() and path.name != GENAI_CONFIG_NAME:
                _link_or_copy(path, staging / path.name)
        for relative in (spec.file, *spec.external_data):
            _link_or_copy(export_dir / relative, staging / _DRAFT / PurePosixPath(relative).name)
        atomic.write_atomic(staging / GENAI_CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        atomic.publish_directory(staging, out)
    return out


def _shadow(manifest: Manifest, export_dir: Path) -> GraphSpec:
    if DEVICE_SHADOW not in manifest.graphs or not manifest.interop_files:
        raise ExportError(
            f"The export {str(export_dir)!r} has no detached shadow with an onnxruntime-genai config; re-export it "
            "with shadow-export --detached (or --split)."
        )
    return manifest.graphs[DEVICE_SHADOW]


def _read_config(folder: Path, what: str) -> dict[str, Any]:
    path = folder / GENAI_CONFIG_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(
            f"No {GENAI_CONFIG_NAME} in the {what} {str(folder)!r}. For the target, build the base with "
            "python -m onnxruntime_genai.models.builder; for the draft, re-export with shadow-export."
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"Cannot read {str(path)!r}: {err}.") from err


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (graphs can be gigabytes), or a copy where the file system has none (another device)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)

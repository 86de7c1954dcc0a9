"""The load stage of an export: a checkpoint directory -> the causal-LM model and its tokenizer.

The base model is found from the checkpoint's own reference (``shadow_config.json``), or from
``--base``; :func:`shadowpeft.checkpoint.store.load_shadow` then checks the base fingerprint, so a
checkpoint never attaches silently to a different base. :func:`read_escalation` reads the escalation
threshold saved beside the checkpoint, which the manifest carries to the runtime.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from shadowpeft.checkpoint.fingerprint import fingerprint
from shadowpeft.checkpoint.store import CONFIG_NAME, load_shadow
from shadowpeft.errors import CheckpointError
from shadowpeft.heads import ShadowForCausalLM
from shadowpeft.runtime.manifest import Escalation
from shadowpeft.train.jobs import load_base
from shadowpeft.train.selective import ESCALATION_NAME, EscalationRecord

__all__ = ["LoadedCheckpoint", "load_checkpoint", "read_escalation"]


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint ready to export: the model (eval mode, fp32), tokenizer and base identity."""

    model: ShadowForCausalLM
    tokenizer: PreTrainedTokenizerBase
    base_model: str
    base_fingerprint: str


def load_checkpoint(checkpoint: Path, *, base: str | None = None) -> LoadedCheckpoint:
    """Loads ``checkpoint`` (this project's format or the published ``shadow-peft`` one) onto its base.

    Args:
        checkpoint: A checkpoint directory (``shadow_config.json`` + safetensors weights).
        base: Base model to use instead of the one the checkpoint names (a local HF directory or
            the built-in name); required for published checkpoints, which name none.

    Raises:
        CheckpointError: A missing or corrupt checkpoint, no base to load, a base that does not
            match the checkpoint's fingerprint, or a checkpoint that is not a causal LM.
        AssetError: The base cannot be found or loaded.
    """
    header = _read_header(checkpoint)
    task = header.get("task", "causal-lm")
    if task != "causal-lm":
        raise CheckpointError(
            f"{checkpoint} holds a {task} adapter; shadow-export exports causal language models (token in, "
            "logits out). Train with generation or language-modelling data to get an exportable checkpoint."
        )
    base_ref = base or (header.get("base") or {}).get("name_or_path")
    if not base_ref:
        raise CheckpointError(
            f"{checkpoint} does not name its base model (checkpoints written by the published shadow-peft "
            "package never do); pass --base with the model it was trained on."
        )
    base_model, tokenizer = load_base(base_ref, kind="generation")
    model = load_shadow(base_model, checkpoint, shadow_model=_explicit_shadow(header))
    if not isinstance(model, ShadowForCausalLM):  # defensive: the header said causal-lm
        raise CheckpointError(f"{checkpoint} did not load as a causal LM; re-save it with shadowpeft.")
    digest = hashlib.sha256(json.dumps(fingerprint(model.base).to_dict(), sort_keys=True).encode()).hexdigest()
    return LoadedCheckpoint(model.eval(), tokenizer, str(base_ref), digest)


def read_escalation(checkpoint: Path) -> Escalation | None:
    """The checkpoint's escalation threshold (``escalation.json``) as the manifest records it; None without one.

    Raises:
        CheckpointError: ``escalation.json`` exists but is not valid JSON or not a valid record.
    """
    try:
        record = EscalationRecord.read(checkpoint)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err} shadow-export copies {ESCALATION_NAME} into the export's manifest: rewrite it with "
            f"`shadowpeft eval --checkpoint {checkpoint} --selective`, or delete it to export without a threshold."
        ) from err
    return None if record is None else Escalation.from_dict(record.to_dict())


def _read_header(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / CONFIG_NAME
    if not checkpoint.is_dir():
        raise CheckpointError(
            f"Checkpoint directory {str(checkpoint)!r} does not exist or is not a directory. Pass the directory "
            "that `shadowpeft train` (or shadow-peft's save_pretrained) wrote."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{checkpoint} has no {CONFIG_NAME}; it is not a ShadowPEFT checkpoint. Pass the directory that "
            "`shadowpeft train` wrote."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable or not JSON ({err}); the checkpoint is damaged.") from err
    except RecursionError:
        raise CheckpointError(
            f"{path} nests its JSON too deeply to read; it is not a file shadowpeft wrote. The checkpoint is damaged: "
            "re-save it."
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object; the checkpoint is damaged.")
    problems = _header_problems(data)
    if problems:
        raise CheckpointError(
            f"{path} is not a valid checkpoint header ({'; '.join(problems)}); the checkpoint is damaged or was "
            "edited by hand: re-save it with shadowpeft."
        )
    return data


def _header_problems(data: dict[str, Any]) -> list[str]:
    """What is wrong with the keys the load stage reads before load_shadow checks the rest (types only)."""
    problems = []
    if not isinstance(data.get("task", "causal-lm"), str):
        problems.append(f"task must be a string, got {data['task']!r}")
    base = data.get("base")
    if base is not None and not isinstance(base, dict):
        problems.append(f"base must be an object, got {base!r}")
    elif base is not None and not isinstance(base.get("name_or_path", ""), str | None):
        problems.append(f"base.name_or_path must be a string or null, got {base['name_or_path']!r}")
    explicit = data.get("explicit_shadow")
    config = explicit.get("config") if isinstance(explicit, dict) else None
    if explicit is not None and not (isinstance(config, dict) and isinstance(config.get("model_type"), str)):
        problems.append(
            "explicit_shadow must be null or an object whose 'config' is an object with a string 'model_type'"
        )
    return problems


def _explicit_shadow(header: dict[str, Any]) -> Any:
    """For an explicit-shadow checkpoint, a model of the recorded architecture (weights come from the checkpoint)."""
    explicit = header.get("explicit_shadow")
    if not isinstance(explicit, dict):
        return None
    config = dict(explicit["config"])  # shapes checked by _header_problems
    model_type = config.pop("model_type")
    try:
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()
    except (ValueError, TypeError, KeyError, StrictDataclassError) as err:
        raise CheckpointError(
            f"The checkpoint's explicit_shadow config (model_type {model_type!r}) does not build a model: {err}. "
            "The checkpoint is damaged or was written by another transformers version: re-save it."
        ) from err

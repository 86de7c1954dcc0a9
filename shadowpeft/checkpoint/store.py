"""Save and load ShadowPEFT checkpoints (the design notes, "Artifacts"). safetensors only, never pickle.

    checkpoint/
      shadow_config.json          format, task, ShadowConfig, explicit shadow, base name + fingerprint
      shadow_model.safetensors    adapter: shadow_model.* shadow_hidden_projection.* shadow_injection_model.*
                                  shadow_update_model.* (the published shadow-peft 0.1.1 key layout)
      shadow_modules.safetensors  trained heads, if any: shadow_lm_head.*, classifier_head.* shadow_classifier_head.*

:func:`load_shadow` also reads published checkpoints (flat ``shadow_config.json`` with no
``format`` key, ``shadow_adapter.safetensors``); they carry no fingerprint, so only shapes are
checked. Saves write a hidden temp directory beside the target and rename it into place.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from torch import Size, Tensor, nn

from shadowpeft import __version__
from shadowpeft.arch import spec_for
from shadowpeft.checkpoint.files import (
    CONFIG_NAME,
    check_target,
    read_json,
    read_safetensors,
    write_json,
    write_safetensors,
)
from shadowpeft.checkpoint.fingerprint import (
    BaseFingerprint,
    architecture_config,
    base_differences,
    config_differences,
    config_sha256,
    describe,
    fingerprint,
)
from shadowpeft.config import ShadowConfig
from shadowpeft.errors import CheckpointError, ShadowConfigError, UnsupportedArchitectureError
from shadowpeft.heads import ShadowForCausalLM, ShadowForSequenceClassification, get_shadow_model
from shadowpeft.losses import mark_only_shadow_trainable
from shadowpeft.model import ShadowModel
from shadowpeft.runtime.atomic import publish_directory, staging_directory

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "shadow_model.safetensors"
MODULES_NAME = "shadow_modules.safetensors"
PUBLISHED_WEIGHTS_NAME = "shadow_adapter.safetensors"
PUBLISHED_PICKLE_NAME = "shadow_adapter.pt"
FORMAT = "shadowpeft"
FORMAT_VERSION = 1

Task = Literal["causal-lm", "sequence-classification"]
TASKS: tuple[str, ...] = ("causal-lm", "sequence-classification")

ADAPTER_PREFIXES = ("shadow_model", "shadow_hidden_projection", "shadow_injection_model", "shadow_update_model")
_HEADER_TYPES: dict[str, Any] = dict(format=str, format_version=int, shadowpeft_version=str, task=str, shadow=dict)
_HEADER_TYPES.update(explicit_shadow=(dict, type(None)), base=dict)
# Every key the published package's ShadowConfig (0.1.1) writes.
_PUBLISHED_KEYS = tuple(
    "num_shadow_layers injection_hidden_size gate_hidden_size alpha dropout shadow_intermediate_size "
    "shadow_num_attention_heads shadow_num_key_value_heads shadow_head_dim modules_to_save".split()
)
_MAX_LISTED = 8  # keys named per kind of mismatch before "... and N more"


# ----- records ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseRef:
    """The base an adapter was trained on: how to reload it, its architecture keys and fingerprint."""

    name_or_path: str
    architecture: dict[str, Any]
    fingerprint: BaseFingerprint


@dataclass(frozen=True)
class ExplicitShadowRef:
    """An explicit shadow model: enough to rebuild its backbone config and to recognise it again.

    Attributes:
        name_or_path: Hub name or local path it was loaded from (may be empty).
        architecture: Its architecture-defining config keys.
        config: Its full HF config (``config.to_dict()``), to rebuild it with ``AutoConfig.for_model``.
        config_sha256: :func:`config_sha256` of that config.
    """

    name_or_path: str
    architecture: dict[str, Any]
    config: dict[str, Any]
    config_sha256: str


@dataclass(frozen=True)
class CheckpointHeader:
    """Contents of ``shadow_config.json`` in this project's format."""

    task: Task
    shadow: ShadowConfig
    base: BaseRef
    explicit_shadow: ExplicitShadowRef | None
    format_version: int = FORMAT_VERSION
    shadowpeft_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        explicit = self.explicit_shadow
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "shadowpeft_version": self.shadowpeft_version,
            "task": self.task,
            "shadow": self.shadow.to_dict(),
            "explicit_shadow": None if explicit is None else dict(vars(explicit)),
            "base": {
                "name_or_path": self.base.name_or_path,
                "architecture": self.base.architecture,
                "fingerprint": self.base.fingerprint.to_dict(),
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> CheckpointHeader:
        """Parse and validate a header read from ``source``.

        Raises:
            CheckpointError: an unknown format or newer format_version, an unknown or missing key,
                or a value of the wrong type.
        """
        _check_format(data, source)
        _fields(data, _HEADER_TYPES, "the checkpoint header", source)
        if data["task"] not in TASKS:
            raise CheckpointError(f"{source}: task={data['task']!r}; allowed: {', '.join(TASKS)}.")
        try:
            shadow = ShadowConfig.from_dict(data["shadow"])
        except ShadowConfigError as err:
            raise CheckpointError(f"{source}: invalid 'shadow' config: {err}") from err
        base = _fields(data["base"], {"name_or_path": str, "architecture": dict, "fingerprint": dict}, "base", source)
        base_ref = BaseRef(**{**base, "fingerprint": _fingerprint(base["fingerprint"], source)})
        explicit_ref = None
        if data["explicit_shadow"] is not None:
            types = {"name_or_path": str, "architecture": dict, "config": dict, "config_sha256": str}
            explicit_ref = ExplicitShadowRef(**_fields(data["explicit_shadow"], types, "explicit_shadow", source))
        return cls(data["task"], shadow, base_ref, explicit_ref, data["format_version"], data["shadowpeft_version"])


# ----- save ------------------------------------------------------------------------------------------
def save_shadow(
    model: ShadowModel, directory: str | Path, *, base_ref: str | None = None, overwrite: bool = False
) -> Path:
    """Write ``model``'s adapter, trained heads and base fingerprint to ``directory``, atomically.

    Args:
        model: A :class:`ShadowForCausalLM` or :class:`ShadowForSequenceClassification`.
        directory: Target directory; created, or replaced when ``overwrite``.
        base_ref: How users should reload the base (hub name or path); defaults to the base
            config's ``_name_or_path``.
        overwrite: Replace an existing non-empty checkpoint directory (atomically: the old
            contents stay intact if the save fails).

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: ``directory`` exists and is not empty (without ``overwrite``), is a file,
            or is not a checkpoint directory (with ``overwrite``).
    """
    if not isinstance(model, ShadowForCausalLM | ShadowForSequenceClassification):
        raise TypeError(
            f"save_shadow needs a ShadowForCausalLM or ShadowForSequenceClassification, got {type(model)}."
        )
    target = Path(directory)
    check_target(target, overwrite=overwrite)
    header = checkpoint_header(model, base_ref=base_ref)
    adapter = model.adapter_state_dict()
    heads = head_state_dict(model)
    with staging_directory(target) as tmp:
        write_json(tmp / CONFIG_NAME, header.to_dict())
        write_safetensors(tmp / WEIGHTS_NAME, adapter)
        if heads:
            write_safetensors(tmp / MODULES_NAME, heads)
        publish_directory(tmp, target)
    logger.info(
        "Saved ShadowPEFT checkpoint (%d adapter tensors, %d head tensors) to %s", len(adapter), len(heads), target
    )
    return target


def checkpoint_header(model: ShadowModel, *, base_ref: str | None = None) -> CheckpointHeader:
    """The :class:`CheckpointHeader` describing ``model`` (its config, explicit shadow and base)."""
    base = model.base
    explicit = None
    if model.explicit:
        shadow_config = model.shadow_model.config
        explicit = ExplicitShadowRef(
            name_or_path=str(getattr(shadow_config, "_name_or_path", "") or ""),
            architecture=architecture_config(shadow_config),
            config=json.loads(shadow_config.to_json_string(use_diff=False)),
            config_sha256=config_sha256(shadow_config),
        )
    name = base_ref if base_ref is not None else str(getattr(base.config, "_name_or_path", "") or "")
    return CheckpointHeader(
        task=task_of(model),
        shadow=model.shadow_config,
        base=BaseRef(name, architecture_config(base.config), fingerprint(base)),
        explicit_shadow=explicit,
    )


def task_of(model: nn.Module) -> Task:
    """``sequence-classification`` or ``causal-lm`` for a ShadowModel, or for a base as get_shadow_model picks."""
    base = model.base if isinstance(model, ShadowModel) else model
    return "sequence-classification" if isinstance(getattr(base, "score", None), nn.Module) else "causal-lm"


def head_modules(model: ShadowModel) -> dict[str, nn.Module]:
    """The trained heads saved beside the adapter, by checkpoint prefix (empty for an aliased LM head)."""
    if isinstance(model, ShadowForSequenceClassification):
        return {"classifier_head": model.classifier_head, "shadow_classifier_head": model.shadow_classifier_head}
    head = getattr(model, "shadow_lm_head", None)
    return {} if head is None else {"shadow_lm_head": head}


def head_state_dict(model: ShadowModel) -> dict[str, Tensor]:
    """Trained head weights keyed ``{prefix}.{param}``, as CPU copies."""
    return {
        f"{prefix}.{key}": value.detach().to("cpu").contiguous().clone()
        for prefix, module in head_modules(model).items()
        for key, value in module.state_dict().items()
    }


# ----- load ------------------------------------------------------------------------------------------
def load_shadow(
    base: nn.Module, directory: str | Path, *, shadow_model: nn.Module | None = None, is_trainable: bool = False
) -> ShadowModel:
    """Wrap ``base`` with the adapter saved in ``directory`` (this project's or the published format).

    For this project's format the base fingerprint is recomputed and must match. Published
    ``shadow-peft`` checkpoints have none; their layer count, hidden size and keys are checked.

    Args:
        base: A fresh HF ``XForCausalLM`` / ``XForSequenceClassification`` (it is frozen in place).
        directory: A checkpoint directory.
        shadow_model: For a checkpoint trained with an *explicit* shadow model, the same model
            (architecture) again, e.g. ``AutoModelForCausalLM.from_pretrained(name)``; its weights
            are overwritten in place by the checkpoint's. Leave ``None`` for an implicit shadow.
        is_trainable: Return in train mode with the shadow modules (and classifier heads)
            trainable, as at construction; otherwise eval mode with every parameter frozen.

    Returns:
        A :class:`ShadowForCausalLM` or :class:`ShadowForSequenceClassification`.

    Raises:
        CheckpointError: missing or corrupt files, an unknown format version, a base that differs
            from the one the adapter was trained on, or a missing/mismatching explicit shadow.
    """
    if isinstance(base, ShadowModel):
        raise CheckpointError("load_shadow needs the plain base model, not a ShadowModel; pass `model.base`.")
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(
            f"Checkpoint directory {str(path)!r} does not exist or is not a directory; pass the directory "
            "that save_shadow (or shadow-peft's save_pretrained) wrote."
        )
    raw = read_json(path / CONFIG_NAME)
    loader = _load_ours if "format" in raw else _load_published
    model = loader(base, path, raw, shadow_model)
    _set_mode(model, is_trainable=is_trainable)
    logger.info("Loaded ShadowPEFT checkpoint from %s", path)
    return model


def _load_ours(base: nn.Module, path: Path, raw: dict[str, Any], shadow_model: nn.Module | None) -> ShadowModel:
    header = CheckpointHeader.from_dict(raw, path / CONFIG_NAME)
    base_task = task_of(base)
    if header.task != base_task:
        raise CheckpointError(
            f"{path} holds a {header.task} adapter but the base you passed is a {base_task} model; "
            f"load base {header.base.name_or_path!r} with the matching AutoModelFor* class."
        )
    _check_fingerprint(header.base, base, path)
    _check_explicit(header.explicit_shadow, shadow_model, path)
    model = _build(base, header.shadow, shadow_model, path)
    load_weights_into(model, path)
    return model


def load_weights_into(model: ShadowModel, directory: str | Path) -> None:
    """Copy the adapter and head weights saved in ``directory`` into an existing, matching ``model``.

    Used to resume training; shapes and keys must match exactly (no fingerprint check: the caller
    built ``model`` from the same run).
    """
    path = Path(directory)
    weights = path / WEIGHTS_NAME
    state = read_safetensors(weights)
    _raise_problems(
        _key_problems(_shapes(_adapter_modules(model)), state), weights, "adapter weights do not match the model"
    )
    model.load_adapter_state_dict(state)
    modules = path / MODULES_NAME
    expected_heads = _shapes(head_modules(model))
    if expected_heads or modules.exists():
        heads = read_safetensors(modules)
        _raise_problems(_key_problems(expected_heads, heads), modules, "head weights do not match the model")
        _load_heads(model, heads)


def load_pretrained_shadow_into(model: ShadowModel, directory: str | Path) -> None:
    """Initialise ``model``'s shadow backbone (and projection) from a checkpoint, e.g. one written by
    ``shadowpeft pretrain-shadow``; injection, update and heads keep their fresh initialisation.

    Raises:
        CheckpointError: the checkpoint's shadow backbone does not fit ``model``'s (name the shapes).
    """
    path = Path(directory)
    weights = path / WEIGHTS_NAME
    state = read_safetensors(weights)
    prefixes = ("shadow_model", "shadow_hidden_projection")
    subset = {k: v for k, v in state.items() if k.startswith(tuple(p + "." for p in prefixes))}
    expected = _shapes({p: getattr(model, p) for p in prefixes})
    _raise_problems(_key_problems(expected, subset), weights, "the pretrained shadow does not fit this model's shadow")
    for prefix in prefixes:
        sub = {k[len(prefix) + 1 :]: v for k, v in subset.items() if k.startswith(prefix + ".")}
        getattr(model, prefix).load_state_dict(sub, strict=True)


def _load_published(base: nn.Module, path: Path, raw: dict[str, Any], shadow_model: nn.Module | None) -> ShadowModel:
    weights = path / PUBLISHED_WEIGHTS_NAME
    if not weights.is_file() and (path / PUBLISHED_PICKLE_NAME).is_file():
        raise CheckpointError(
            f"{path} holds only {PUBLISHED_PICKLE_NAME}, a pickle file; shadowpeft never unpickles (it can run "
            "code). Re-save it with shadow-peft's save_pretrained, which writes shadow_adapter.safetensors."
        )
    config = _published_config(raw, path / CONFIG_NAME)
    state = read_safetensors(weights)
    modules = path / MODULES_NAME
    heads = read_safetensors(modules) if modules.exists() else {}
    if any(key.startswith("shadow_lm_head.") for key in heads):
        config = replace(config, train_shadow_head=True)
    embed = f"shadow_model.{spec_for(shadow_model.config).embed_attr}." if shadow_model is not None else None
    if embed and not any(key.startswith(embed) for key in state):  # prepare_shadow_model(remove_embed_tokens=True)
        config = replace(config, share_embeddings=True)
    model = _build(base, config, shadow_model, path)
    state = _drop_unused_shadow_embedding(model, state, weights)
    problems = _published_shape_problems(model, state) or _key_problems(_shapes(_adapter_modules(model)), state)
    _raise_problems(problems, weights, "this published checkpoint does not fit the base model you passed")
    model.load_adapter_state_dict(state)
    expected = _shapes(head_modules(model))
    present = {key.split(".", 1)[0] for key in heads}
    # The published package saves only the heads it trained: each one present must be complete.
    expected = {key: shape for key, shape in expected.items() if key.split(".", 1)[0] in present}
    _raise_problems(_key_problems(expected, heads), modules, "head weights do not match the model")
    _load_heads(model, heads)
    return model


def _published_config(raw: dict[str, Any], source: Path) -> ShadowConfig:
    """Map a published flat config; refuse keys this reader does not know and a trained base LM head."""
    unknown = sorted(set(raw) - set(_PUBLISHED_KEYS))
    if unknown:
        raise CheckpointError(
            f"{source} has no 'format' key, so it is read as a shadow-peft 0.1.1 config, but it has unknown "
            f"key(s) {unknown}; known: {list(_PUBLISHED_KEYS)}. It is not a ShadowPEFT checkpoint, or comes from "
            "a newer shadow-peft: re-save it with shadow-peft 0.1.1 or shadowpeft's save_shadow."
        )
    modules_to_save = raw.get("modules_to_save") or []
    if not isinstance(modules_to_save, list):
        raise CheckpointError(f"{source}: modules_to_save={modules_to_save!r} must be a list of module names.")
    if "lm_head" in modules_to_save:
        raise CheckpointError(
            f"{source}: modules_to_save includes 'lm_head' (the base LM head was trained); shadowpeft keeps the "
            "base frozen and cannot load it. Retrain without lm_head in modules_to_save."
        )
    try:
        return ShadowConfig.from_published(raw)
    except ShadowConfigError as err:
        raise CheckpointError(f"{source}: invalid shadow-peft config: {err}") from err


def _drop_unused_shadow_embedding(model: ShadowModel, state: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """Drop the published implicit shadow's token table where it kept one (GPT-2 ``wte``).

    The published package removes only attributes named ``embed_tokens`` and feeds the shadow the
    base embeddings, so a GPT-2 shadow saves a ``wte`` that its forward never reads.
    """
    if model.explicit:
        return state
    unused = [key for key in state if key.startswith(f"shadow_model.{model.shadow_spec.embed_attr}.")]
    if unused:
        logger.info("%s: ignoring %s (the implicit shadow reads the base embeddings; never used)", source, unused)
    return {key: value for key, value in state.items() if key not in unused}


def _published_shape_problems(model: ShadowModel, state: dict[str, Tensor]) -> list[str]:
    """Layer count and hidden size of a published adapter versus the base, before any key listing."""
    downs = state.get("shadow_injection_model.injection_downs")
    if downs is None:
        return ["no 'shadow_injection_model.injection_downs' tensor: this is not a ShadowPEFT adapter file"]
    if downs.dim() != 3:
        return [f"shadow_injection_model.injection_downs has shape {list(downs.shape)}; expected [L-1, d, r]"]
    n, d = downs.shape[0], downs.shape[1]
    problems = []
    if n != model.num_layers - 1:
        problems.append(
            f"the adapter injects into {n} layers (a {n + 1}-layer base); the base you passed has {model.num_layers}"
        )
    if d != model.hidden_size:
        problems.append(f"the adapter has hidden size {d}; the base you passed has {model.hidden_size}")
    return problems


# ----- checks ----------------------------------------------------------------------------------------
def _check_format(data: dict[str, Any], source: Path) -> None:
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{source}: format={data.get('format')!r}; this reader knows {FORMAT!r}.")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{source}: format_version={version!r} must be an integer >= 1; the file is corrupt.")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has format_version {version}; this shadowpeft ({__version__}) reads up to {FORMAT_VERSION}. "
            "Upgrade shadowpeft to load it."
        )


def _check_fingerprint(ref: BaseRef, base: nn.Module, path: Path) -> None:
    """Raise naming every part of ``base`` that differs from the base the adapter was trained on."""
    details = base_differences(ref.fingerprint, ref.architecture, base)
    if details:
        raise CheckpointError(
            f"{path}: this adapter was trained on base {ref.name_or_path!r} ({describe(ref.architecture)}); "
            f"the model you passed ({describe(architecture_config(base.config))}) differs in: {', '.join(details)}. "
            "Load the base it names or retrain."
        )


def _check_explicit(ref: ExplicitShadowRef | None, shadow_model: nn.Module | None, path: Path) -> None:
    if ref is None and shadow_model is not None:
        raise CheckpointError(f"{path} holds an implicit shadow (built from the base); drop shadow_model= to load it.")
    if ref is None:
        return
    if shadow_model is None:
        raise CheckpointError(
            f"{path} was trained with an explicit shadow model ({describe(ref.architecture)}, from "
            f"{ref.name_or_path!r}); pass it again: load_shadow(base, {str(path)!r}, shadow_model=...). "
            "Its weights are replaced by the checkpoint's."
        )
    if config_sha256(shadow_model.config) != ref.config_sha256:
        diffs = config_differences(ref.architecture, architecture_config(shadow_model.config))
        raise CheckpointError(
            f"{path}: the shadow_model you passed does not have the architecture the adapter was trained with "
            f"({describe(ref.architecture)}); it differs in: {'; '.join(diffs) or 'architecture config'}. "
            f"Pass the model {ref.name_or_path!r} names."
        )


def _build(base: nn.Module, config: ShadowConfig, shadow_model: nn.Module | None, path: Path) -> ShadowModel:
    try:
        return get_shadow_model(base, config, shadow_model)
    except UnsupportedArchitectureError:
        raise
    except ShadowConfigError as err:
        raise CheckpointError(f"{path}: the checkpoint's shadow config does not fit the base model: {err}") from err


def _adapter_modules(model: ShadowModel) -> dict[str, nn.Module]:
    return {prefix: getattr(model, prefix) for prefix in ADAPTER_PREFIXES}


def _shapes(modules: dict[str, nn.Module]) -> dict[str, Size]:
    """``{prefix}.{key}`` -> shape for every state-dict entry of ``modules``."""
    return {f"{p}.{k}": v.shape for p, module in modules.items() for k, v in module.state_dict().items()}


def _key_problems(expected: dict[str, Size], state: dict[str, Tensor]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches, each kind listed once."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{key} {list(state[key].shape)} (model: {list(expected[key])})"
        for key in sorted(set(expected) & set(state))
        if state[key].shape != expected[key]
    ]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = ", ".join(keys[:_MAX_LISTED]) + (
                f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
            )
            problems.append(f"{label}: {shown}")
    return problems


def _raise_problems(problems: list[str], source: Path, title: str) -> None:
    if problems:
        raise CheckpointError(
            f"{source}: {title}:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nCheck that you passed the base (and shadow_model) the checkpoint was trained with."
        )


def _load_heads(model: ShadowModel, state: dict[str, Tensor]) -> None:
    for prefix, module in head_modules(model).items():
        sub = {key[len(prefix) + 1 :]: value for key, value in state.items() if key.startswith(prefix + ".")}
        if sub:
            module.load_state_dict(sub, strict=True)


def _set_mode(model: ShadowModel, *, is_trainable: bool) -> None:
    if not is_trainable:
        model.eval()
        model.requires_grad_(False)
        return
    model.train()
    extra = ("base.score.",) if isinstance(model, ShadowForSequenceClassification) else ()
    mark_only_shadow_trainable(model, extra=extra)


def _fields(value: Any, types: dict[str, Any], name: str, source: Path) -> dict[str, Any]:
    """Check that ``value`` is an object with exactly the keys of ``types``, each of its type."""
    if not isinstance(value, dict) or set(value) != set(types):
        keys = sorted(value) if isinstance(value, dict) else value
        raise CheckpointError(f"{source}: {name} has keys {keys!r}; expected {sorted(types)}. Re-save the checkpoint.")
    for key, kind in types.items():
        if not isinstance(value[key], kind):
            raise CheckpointError(
                f"{source}: {name}: {key}={value[key]!r} has the wrong type; re-save the checkpoint."
            )
    return value


def _fingerprint(value: Any, source: Path) -> BaseFingerprint:
    try:
        return BaseFingerprint.from_dict(value)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err} Re-save the checkpoint.") from err

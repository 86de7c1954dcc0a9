"""The three training jobs behind the CLI: ``train``, ``pretrain-shadow`` and ``eval``.

Each job owns its output directory: it trains in ``<out>.partial/`` (resumable checkpoints), and
only a finished run is renamed to ``<out>``, so an interrupted job never leaves a directory that
looks complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from shadowpeft.checkpoint.assets import resolve_base
from shadowpeft.checkpoint.store import CONFIG_NAME, load_pretrained_shadow_into, load_shadow, save_shadow
from shadowpeft.config import ShadowConfig
from shadowpeft.errors import AssetError, CheckpointError, ShadowConfigError
from shadowpeft.heads import get_shadow_model
from shadowpeft.model import ShadowModel
from shadowpeft.params import expected_parameter_counts
from shadowpeft.runtime.atomic import publish_directory
from shadowpeft.train.datasets import TaskData, load_task_data
from shadowpeft.train.evaluation import EvalResult, evaluate
from shadowpeft.train.recipes import RECIPES, Levers, apply_levers
from shadowpeft.train.selective import EscalationRecord, SelectiveRow
from shadowpeft.train.trainer import (
    TrainSettings,
    TrainSummary,
    adapter_to_float32,
    detached_training,
    escalation_scores,
    latest_checkpoint,
    run_training,
)

logger = logging.getLogger(__name__)

RUN_NAME = "training.json"
METHODS = ("shadow", "lora", "dora", "detached-alone")


@dataclass(frozen=True)
class RunRecord:
    """``training.json``: what a checkpoint was trained on, so ``eval`` can rebuild the task model."""

    kind: str
    labels: tuple[str, ...]
    data: str
    base: str
    max_length: int
    detached_only: bool
    settings: dict[str, Any]
    summary: dict[str, Any]
    method: str = "shadow"  # records from before --method are ShadowPEFT runs
    recipe: dict[str, Any] = field(default_factory=lambda: {"name": "paper", "levers": Levers().to_dict()})
    lora_rank: int | None = None

    @classmethod
    def read(cls, directory: Path) -> RunRecord | None:
        path = directory / RUN_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data["labels"] = tuple(data["labels"])
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise CheckpointError(f"{path} is unreadable ({err}); re-run training or delete the file.") from err


def load_base(name_or_path: str, *, kind: str, labels: tuple[str, ...] = (), bf16: bool = False):
    """Load the frozen base (causal LM, or sequence classifier for classification) and its tokenizer.

    Raises:
        AssetError: the base cannot be found or loaded, with the reason and the fix.
    """
    path = resolve_base(name_or_path)
    dtype = torch.bfloat16 if bf16 else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if kind == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                dtype=dtype,
                local_files_only=True,
            )
            model.config.pad_token_id = tokenizer.pad_token_id
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    # transformers passes on what its readers raise: safetensors' and huggingface_hub's own errors for a corrupt
    # weights file or a config value of the wrong type, RuntimeError for weights whose shapes contradict config.json.
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError, StrictDataclassError) as err:
        raise AssetError(
            f"Could not load base model {name_or_path!r} from {path}: {err}. Pass a Hugging Face model directory "
            "(config.json + weights + tokenizer) or the built-in name smollm2-135m-instruct."
        ) from err
    return model, tokenizer


def check_config_fits(base: str, config: ShadowConfig) -> None:
    """Check ``config`` against the base's ``config.json`` alone (cheap), as the model would on construction.

    An unreadable config is left for :func:`load_base` to report with its own message.
    """
    try:
        base_config = AutoConfig.from_pretrained(resolve_base(base), local_files_only=True)
    except (OSError, ValueError, AssetError):
        return
    config.check_against(base_config, implicit=True)


def check_output(out: Path, *, overwrite: bool, resume: bool) -> Path:
    """Check ``out`` before any work and return the work directory ``<out>.partial`` (not created yet).

    Raises:
        CheckpointError: ``out`` holds a checkpoint or other files (and no ``overwrite``), or a
            previous run was interrupted and neither ``resume`` nor ``overwrite`` says what to do.
    """
    work = out.with_name(out.name + ".partial")
    if not is_main_process():  # rank 0 checks and owns the directories; it may already have created `work`
        return work
    if out.is_file():
        raise CheckpointError(f"Output path {out} is a file; --out must name a directory.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        what = "a checkpoint" if (out / CONFIG_NAME).exists() else "files"
        raise CheckpointError(
            f"Output directory {out} already holds {what}; pass --overwrite to replace it or choose another --out."
        )
    if work.exists() and not resume and not overwrite:
        raise CheckpointError(
            f"{work} holds an interrupted run; pass --resume to continue it or --overwrite to start over."
        )
    if resume and not work.exists():
        raise CheckpointError(f"Nothing to resume: {work} does not exist. Drop --resume to start a new run.")
    return work


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0 of one (``accelerate launch`` / ``torchrun`` set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def work_directory(work: Path, *, resume: bool) -> Iterator[Path]:
    """Create ``work`` (fresh unless resuming); remove it again if the job fails before any checkpoint.

    Only the main process touches the directory; other ranks of a distributed run just train.
    """
    if not is_main_process():
        yield work
        return
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except BaseException:
        if work.exists() and latest_checkpoint(work) is None:
            shutil.rmtree(work)
        raise


def publish(model: nn.Module, work: Path, out: Path, record: RunRecord) -> None:
    """Save the finished adapter and its run record, then move it to ``out`` in one rename."""
    final = work / "final"
    if isinstance(model, ShadowModel):
        save_shadow(model, final, base_ref=record.base, overwrite=True)
    else:  # a peft LoRA/DoRA baseline: peft's own adapter format
        model.save_pretrained(str(final))
    (final / RUN_NAME).write_text(json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8")
    escalation = record.summary.get("escalation")
    if escalation:
        EscalationRecord.from_dict(escalation).save(final)
    out.parent.mkdir(parents=True, exist_ok=True)
    publish_directory(final, out)
    shutil.rmtree(work)


def check_method(
    method: str, *, lora_rank: int | None, init_shadow: Path | None = None, refine_steps: int = 0
) -> None:
    """Refuse a method name or a combination of options that does not fit the method.

    Raises:
        ShadowConfigError: naming the option to drop.
    """
    if method not in METHODS:
        raise ShadowConfigError(f"Unknown method {method!r}. Known: {', '.join(METHODS)}.")
    shadow = method in ("shadow", "detached-alone")
    if shadow and lora_rank is not None:
        raise ShadowConfigError(f"--lora-rank applies to --method lora or dora, not {method!r}; drop it.")
    if not shadow and (init_shadow is not None or refine_steps):
        raise ShadowConfigError(
            f"--init-shadow and a detached refinement (--refine-fraction) apply to ShadowPEFT, not --method "
            f"{method}; drop them."
        )


def build_method(
    method: str, base_model: nn.Module, config: ShadowConfig, *, kind: str, lora_rank: int | None
) -> tuple[nn.Module, tuple[str | None, ...], int | None]:
    """The model a ``--method`` trains, the modes it is evaluated in, and the LoRA rank used (if any).

    ``shadow`` and ``detached-alone`` wrap the base with a shadow built from ``config``; LoRA and DoRA
    take ``lora_rank``, or the rank whose size is closest to that shadow adapter's (a matched budget).

    Raises:
        ShadowConfigError: an unknown method, or a LoRA rank given to a shadow method.
    """
    check_method(method, lora_rank=lora_rank)
    if method in ("shadow", "detached-alone"):
        model = get_shadow_model(base_model, config)
        return model, (("detached",) if method == "detached-alone" else ("attached", "detached")), None
    from shadowpeft.train.baselines import build_baseline, matched_lora_rank

    dora = method == "dora"
    rank = (
        lora_rank
        or matched_lora_rank(
            base_model.config, expected_parameter_counts(base_model.config, config).total, dora=dora
        ).rank
    )
    task = "sequence-classification" if kind == "classification" else "causal-lm"
    return build_baseline(base_model, method, rank=rank, task=task), (None,), rank


def train_job(
    *,
    base: str,
    data: str,
    out: Path,
    config: ShadowConfig,
    settings: TrainSettings,
    init_shadow: Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    detached_only: bool = False,
    max_examples: int | None = None,
    method: str | None = None,
    recipe: str | None = None,
    levers: Levers | None = None,
    lora_rank: int | None = None,
) -> TrainSummary:
    """Train ``method`` on ``data`` and publish the checkpoint to ``out``.

    Methods: ``shadow`` (loss ``CE_base + lambda * aux``), ``detached-alone`` (the detached architecture
    alone: base embeddings, shadow backbone, shadow head, no base layer; ``detached_only`` is the same,
    as ``pretrain-shadow`` uses it), and the ``lora`` / ``dora`` baselines at the shadow's budget.
    ``levers`` (from ``recipe``) are applied to ``config`` and ``settings`` and recorded in
    ``training.json``; without them the config and settings are used as given.
    """
    method = method or ("detached-alone" if detached_only else "shadow")
    detached_only = method == "detached-alone"
    if levers is not None:
        config, settings = apply_levers(levers, config, settings)
    check_method(method, lora_rank=lora_rank, init_shadow=init_shadow, refine_steps=settings.refine_steps)
    if init_shadow is not None and config.backbone.base_layers is not None:
        raise ShadowConfigError(
            f"--init-shadow {init_shadow} and --shadow-init base:... both say where the shadow starts; keep one "
            "(for a pretrain-shadow checkpoint: --recipe paper, or --shadow-init random)."
        )
    # The split is fixed (hash salt 0): --seed changes initialisation and data order, never which rows are test rows.
    task = load_task_data(data, max_examples=max_examples)
    work = check_output(out, overwrite=overwrite, resume=resume)
    if method in ("shadow", "detached-alone"):
        check_config_fits(base, config)  # before the weights load: a wrong layer index fails at once
    torch.manual_seed(settings.seed)
    base_model, tokenizer = load_base(base, kind=task.kind, labels=task.labels, bf16=settings.bf16)
    model, modes, rank = build_method(method, base_model, config, kind=task.kind, lora_rank=lora_rank)
    if isinstance(model, ShadowModel):
        if settings.bf16:
            adapter_to_float32(model)
        if init_shadow is not None:
            load_pretrained_shadow_into(model, init_shadow)
    with work_directory(work, resume=resume), detached_training(model) if detached_only else nullcontext():
        summary = run_training(
            model,
            task,
            tokenizer,
            settings,
            work,
            base_ref=base,
            eval_modes=modes,
            resume_from=latest_checkpoint(work) if resume else None,
        )
        if is_main_process():  # other ranks of a distributed run hold the same weights
            record = RunRecord(
                task.kind,
                task.labels,
                data,
                base,
                settings.max_length,
                detached_only,
                asdict(settings),
                summary.to_dict(),
                method=method,
                recipe=recipe_record(recipe, levers, config, settings),
                lora_rank=rank,
            )
            publish(model, work, out, record)
    return summary


def recipe_record(recipe: str | None, levers: Levers | None, config: ShadowConfig, settings: TrainSettings) -> dict:
    """``{"name", "levers"}`` for training.json: the levers a run used, named by the recipe they match.

    Runs given a config directly (no ``levers``) record the levers read off that config, named
    ``paper`` when they are the paper's and ``custom`` otherwise.
    """
    if levers is None:
        layers = config.backbone.base_layers
        levers = Levers(
            aux_loss_weight=config.aux_loss_weight,
            shadow_lr_multiplier=settings.shadow_lr_multiplier,
            distill_weight=config.distill.weight,
            distill_temperature=config.distill.temperature,
            shadow_init="random" if layers is None else "base:" + ",".join(map(str, layers)),
            refine_fraction=settings.refine_steps / settings.max_steps,
        )
    named = recipe if recipe is not None and RECIPES[recipe].levers == levers else None
    if named is None:
        named = next((name for name, r in RECIPES.items() if r.levers == levers), "custom")
    return {"name": named, "levers": levers.to_dict()}


def _named_base(checkpoint: Path) -> str | None:
    """The base reference in a checkpoint's shadow_config.json (our format), if any."""
    path = checkpoint / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base") or {}
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); re-save the checkpoint.") from err
    return base.get("name_or_path") if isinstance(base, dict) else None


def eval_job(
    *,
    checkpoint: Path,
    data: str | None,
    modes: tuple[str, ...] | None = None,
    limit: int | None = None,
    base: str | None = None,
) -> list[EvalResult]:
    """Evaluate a saved checkpoint of any method on the test split of ``data`` (default: its training data).

    ``modes`` defaults to what the method has: attached and detached for ``shadow``, detached for
    ``detached-alone``; LoRA/DoRA checkpoints have no modes and are evaluated once.

    Raises:
        CheckpointError: the checkpoint does not say what to evaluate on or which base to load, or a
            mode the method does not have was asked for.
    """
    loaded = load_for_eval(checkpoint, data=data, base=base)
    modes = loaded.check_modes(modes)
    return [
        evaluate(loaded.model, loaded.task, loaded.tokenizer, mode=mode, max_length=loaded.max_length, limit=limit)
        for mode in modes
    ]


def selective_job(
    *,
    checkpoint: Path,
    data: str | None,
    limit: int | None = None,
    base: str | None = None,
    tolerance: float = 0.01,
    save: bool = True,
) -> tuple[EscalationRecord, list[SelectiveRow]]:
    """Score a ShadowPEFT checkpoint attached and detached per example and choose its escalation threshold.

    The threshold keeps the largest share of examples local (detached confidence at or above it) while
    the combined accuracy stays within ``tolerance`` of attached; with ``save`` it is written to
    ``<checkpoint>/escalation.json`` (replacing the one training saved), where ``shadow-export`` finds it.
    A language-modelling checkpoint is scored per predicted token (``token-probability``, see
    :func:`~shadowpeft.train.evaluation.score_examples`); ``limit`` then counts texts.

    Raises:
        CheckpointError: not a ShadowPEFT checkpoint with both modes.
    """
    loaded = load_for_eval(checkpoint, data=data, base=base)
    if loaded.method != "shadow":
        raise CheckpointError(
            f"--selective compares the detached and attached modes of a ShadowPEFT checkpoint; {checkpoint} is a "
            f"{loaded.method} checkpoint."
        )
    _, record, rows = escalation_scores(
        loaded.model, loaded.task, loaded.tokenizer, max_length=loaded.max_length, limit=limit, tolerance=tolerance
    )
    if save:
        record.save(checkpoint)
    return record, rows


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready to evaluate: its model, task, tokenizer and what its method can run."""

    model: nn.Module
    task: TaskData
    tokenizer: Any
    method: str
    max_length: int
    source: Path

    @property
    def modes(self) -> tuple[str | None, ...]:
        return {"shadow": ("attached", "detached"), "detached-alone": ("detached",)}.get(self.method, (None,))

    def check_modes(self, asked: tuple[str, ...] | None) -> tuple[str | None, ...]:
        """``asked`` if the method has those modes (its own modes when None)."""
        if not asked:
            return self.modes
        missing = [mode for mode in asked if mode not in self.modes]
        if missing:
            has = ", ".join(m for m in self.modes if m) or "none (evaluated once)"
            raise CheckpointError(
                f"{self.source} is a {self.method} checkpoint; it has no {', '.join(missing)} mode (modes: {has}). "
                "Drop --mode."
            )
        return asked


def load_for_eval(checkpoint: Path, *, data: str | None, base: str | None) -> LoadedCheckpoint:
    """Load a checkpoint of any method with its base and test data, as ``shadowpeft eval`` does."""
    record = RunRecord.read(checkpoint)
    data = data or (record.data if record else None)
    if data is None:
        raise CheckpointError(f"{checkpoint} has no {RUN_NAME}; pass --data to say what to evaluate on.")
    task: TaskData = load_task_data(data)
    method = record.method if record else "shadow"
    base_ref = base or (record.base if record else None) or _named_base(checkpoint)
    if not base_ref:
        raise CheckpointError(f"{checkpoint} does not name its base model; pass --base.")
    labels = record.labels if record else task.labels
    base_model, tokenizer = load_base(base_ref, kind=task.kind, labels=labels)
    if method in ("lora", "dora"):
        from peft import PeftModel

        model: nn.Module = PeftModel.from_pretrained(base_model, str(checkpoint))
    else:
        model = load_shadow(base_model, checkpoint)
    max_length = record.max_length if record else 128
    return LoadedCheckpoint(model, task, tokenizer, method, max_length, checkpoint)

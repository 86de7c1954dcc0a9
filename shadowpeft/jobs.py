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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from shadowpeft.assets import resolve_base
from shadowpeft.checkpoint import CONFIG_NAME, load_pretrained_shadow_into, load_shadow, save_shadow
from shadowpeft.config import ShadowConfig
from shadowpeft.datasets import TaskData, load_task_data
from shadowpeft.errors import AssetError, CheckpointError
from shadowpeft.evaluation import EvalResult, evaluate
from shadowpeft.model import ShadowModel
from shadowpeft.tasks import get_shadow_model
from shadowpeft.trainer import TrainSettings, TrainSummary, adapter_to_float32, run_training

logger = logging.getLogger(__name__)

RUN_NAME = "training.json"


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
    except (OSError, ValueError) as err:
        raise AssetError(
            f"Could not load base model {name_or_path!r} from {path}: {err}. Pass a Hugging Face model directory "
            "(config.json + weights + tokenizer) or the built-in name smollm2-135m-instruct."
        ) from err
    return model, tokenizer


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


def latest_checkpoint(work: Path) -> str | None:
    """The newest ``checkpoint-<step>`` under ``work``, if any."""
    found = sorted((p for p in work.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def publish(model: ShadowModel, work: Path, out: Path, record: RunRecord) -> None:
    """Save the finished adapter and its run record, then move it to ``out`` in one rename."""
    final = work / "final"
    save_shadow(model, final, base_ref=record.base, overwrite=True)
    (final / RUN_NAME).write_text(json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(final, out)
    shutil.rmtree(work)


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
) -> TrainSummary:
    """Train a ShadowPEFT adapter on ``data`` and publish it to ``out``.

    ``detached_only`` trains the shadow alone with the LM/classification loss on its own head
    (``pretrain-shadow``); otherwise the loss is ``CE_base + lambda * CE_shadow``.
    """
    # The split is fixed (hash salt 0): --seed changes initialisation and data order, never which rows are test rows.
    task = load_task_data(data, max_examples=max_examples)
    work = check_output(out, overwrite=overwrite, resume=resume)
    torch.manual_seed(settings.seed)
    base_model, tokenizer = load_base(base, kind=task.kind, labels=task.labels, bf16=settings.bf16)
    model = get_shadow_model(base_model, config)
    if settings.bf16:
        adapter_to_float32(model)
    if init_shadow is not None:
        load_pretrained_shadow_into(model, init_shadow)
    model.inference_mode = "detached" if detached_only else "attached"
    modes = ("detached",) if detached_only else ("attached", "detached")
    with work_directory(work, resume=resume):
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
        model.inference_mode = "attached"
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
            )
            publish(model, work, out, record)
    return summary


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
    *, checkpoint: Path, data: str | None, modes: tuple[str, ...], limit: int | None = None, base: str | None = None
) -> list[EvalResult]:
    """Evaluate a saved adapter on the test split of ``data`` (default: the data it was trained on)."""
    record = RunRecord.read(checkpoint)
    data = data or (record.data if record else None)
    if data is None:
        raise CheckpointError(f"{checkpoint} has no {RUN_NAME}; pass --data to say what to evaluate on.")
    task: TaskData = load_task_data(data)
    header = (
        json.loads((checkpoint / CONFIG_NAME).read_text(encoding="utf-8"))
        if (checkpoint / CONFIG_NAME).is_file()
        else {}
    )
    base_ref = base or (record.base if record else None) or header.get("base", {}).get("name_or_path")
    if not base_ref:
        raise CheckpointError(f"{checkpoint} does not name its base model; pass --base.")
    labels = record.labels if record else task.labels
    base_model, tokenizer = load_base(base_ref, kind=task.kind, labels=labels)
    model = load_shadow(base_model, checkpoint)
    max_length = record.max_length if record else 128
    return [evaluate(model, task, tokenizer, mode=mode, max_length=max_length, limit=limit) for mode in modes]

"""Training through Hugging Face Trainer: ShadowPEFT adapters and peft baselines in one harness.

The Trainer supplies AdamW, the LR schedule with warmup, gradient accumulation, evaluation and
checkpointing, mixed precision and multi-process runs (``accelerate launch``). ShadowTrainer only
changes how a ShadowPEFT model is saved and restored: adapter weights and heads through
:mod:`shadowpeft.checkpoint.store`, never the frozen base.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from shadowpeft.checkpoint.store import load_weights_into, save_shadow
from shadowpeft.errors import ShadowConfigError
from shadowpeft.model import ShadowModel
from shadowpeft.params import count_parameters
from shadowpeft.train.datasets import TaskData
from shadowpeft.train.encoding import PadCollator, encode_task
from shadowpeft.train.evaluation import EvalResult, ExampleScores, evaluate, score_examples
from shadowpeft.train.selective import CONFIDENCE_MEASURES, EscalationRecord, SelectiveRow, escalation_record

logger = logging.getLogger(__name__)

Scheduler = Literal["cosine", "linear", "constant_with_warmup"]


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings shared by ShadowPEFT and the baselines (same data, steps, schedule).

    Attributes:
        max_steps: Optimizer steps.
        batch_size: Examples per device per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of steps with linear warmup.
        scheduler: LR schedule after warmup.
        max_length: Token limit per example (prompts are truncated from the left).
        eval_every: Evaluate the loss on the test split every N steps (0: only at the end).
        save_every: Write a resumable checkpoint every N steps (0: none).
        eval_examples: Test examples used for the final metrics (None: all).
        logging_steps: Log the training loss every N steps.
        seed: Seed for data order and fresh weights.
        bf16: Run the frozen base in bfloat16 under autocast; adapter weights stay fp32.
        max_grad_norm: Gradient clipping.
        shadow_lr_multiplier: The shadow backbone's learning rate is ``learning_rate`` times this
            (the method notes, section 9, lever a); injections, updates and heads keep ``learning_rate``.
        refine_steps: Of ``max_steps``, how many go to a detached refinement after attached training
            (lever d): the shadow backbone and its head train on the detached loss alone, with the
            injections, updates and the base classifier head frozen. 0: attached training only.
    """

    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    scheduler: Scheduler = "cosine"
    max_length: int = 128
    eval_every: int = 0
    save_every: int = 0
    eval_examples: int | None = 200
    logging_steps: int = 10
    seed: int = 0
    bf16: bool = False
    max_grad_norm: float = 1.0
    shadow_lr_multiplier: float = 1.0
    refine_steps: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not self.shadow_lr_multiplier > 0:
            problems.append(f"shadow_lr_multiplier={self.shadow_lr_multiplier!r}: must be > 0")
        if not 0 <= self.refine_steps < self.max_steps:
            problems.append(
                f"refine_steps={self.refine_steps!r}: must be in [0, max_steps={self.max_steps}) so that some "
                "attached training comes first"
            )
        if problems:
            raise ShadowConfigError("Invalid training settings: " + "; ".join(problems))

    @property
    def attached_steps(self) -> int:
        return self.max_steps - self.refine_steps


@dataclass
class TrainSummary:
    """What a run did: losses, timing, parameter counts and final metrics."""

    steps: int
    final_loss: float
    first_loss: float | None
    seconds_per_step: float
    trainable_params: int
    total_params: int
    metrics: list[EvalResult] = field(default_factory=list)
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    escalation: dict[str, Any] | None = None  # selective.EscalationRecord.to_dict(), when both modes ran

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ShadowTrainer(Trainer):
    """Trainer that saves and restores only what a ShadowPEFT run trains.

    With ``shadow_lr_multiplier != 1`` the shadow backbone's parameters get their own AdamW group at
    ``learning_rate * shadow_lr_multiplier`` (the schedule scales every group alike).
    """

    base_ref: str | None = None
    shadow_lr_multiplier: float = 1.0

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        target = self.accelerator.unwrap_model(model or self.model, keep_torch_compile=False)
        if self.shadow_lr_multiplier == 1.0 or not isinstance(target, ShadowModel):
            return optimizer
        # Split each group in place (the optimizer holds no state before the first step).
        backbone = {id(p) for p in target.shadow_model.parameters()}
        groups = []
        for group in optimizer.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            rest = [p for p in group["params"] if id(p) not in backbone]
            shadow = [p for p in group["params"] if id(p) in backbone]
            groups += [{**settings, "params": rest}] if rest else []
            groups += [{**settings, "params": shadow, "lr": group["lr"] * self.shadow_lr_multiplier}] if shadow else []
        optimizer.param_groups = groups
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, ShadowModel):
            super()._save(output_dir, state_dict)
            return
        if self.args.should_save:
            save_shadow(model, output_dir or self.args.output_dir, base_ref=self.base_ref, overwrite=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self.accelerator.unwrap_model(model or self.model, keep_torch_compile=False)
        if not isinstance(target, ShadowModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_weights_into(target, resume_from_checkpoint)


class _LossHistory(TrainerCallback):
    """Keeps (step, loss) pairs from the Trainer's logs for the summary."""

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.history.append((state.global_step, float(logs["loss"])))


def training_arguments(settings: TrainSettings, work_dir: Path, *, has_eval: bool) -> TrainingArguments:
    """The TrainingArguments for ``settings``; checkpoints under ``work_dir``."""
    steps_eval = settings.eval_every if settings.eval_every and has_eval else 0
    return TrainingArguments(
        output_dir=str(work_dir),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=round(settings.warmup_ratio * settings.max_steps),
        lr_scheduler_type=settings.scheduler,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=settings.logging_steps,
        eval_strategy="steps" if steps_eval else "no",
        eval_steps=steps_eval or None,
        save_strategy="steps" if settings.save_every else "no",
        save_steps=settings.save_every or None,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=settings.bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        remove_unused_columns=False,
        # The update after the last base layer is never computed, so its parameters get no gradient.
        ddp_find_unused_parameters=True,
        dataloader_num_workers=0,
    )


def run_training(
    model: nn.Module,
    task: TaskData,
    tokenizer: Any,
    settings: TrainSettings,
    work_dir: Path,
    *,
    resume_from: str | None = None,
    base_ref: str | None = None,
    eval_modes: tuple[str | None, ...] = ("attached", "detached"),
) -> TrainSummary:
    """Train ``model`` (a ShadowModel or a peft baseline) on ``task.train``; evaluate on ``task.test``.

    With ``settings.refine_steps`` the last steps are a detached refinement (see :class:`TrainSettings`),
    a second Trainer run with its own optimizer and checkpoints under ``work_dir/refine``.

    Args:
        model: The model to train; only parameters with ``requires_grad`` are updated.
        task: Examples and their kind.
        tokenizer: The base model's tokenizer (chat template applied to prompts when present).
        settings: Optimisation settings.
        work_dir: Where resumable checkpoints go (``checkpoint-<step>``).
        resume_from: A ``checkpoint-<step>`` directory to continue from (the refinement, if any,
            then resumes from its own latest checkpoint).
        base_ref: Base model reference written into ShadowPEFT checkpoints.
        eval_modes: Modes for the final metrics (``None`` for models without modes).
    """
    if settings.refine_steps and not isinstance(model, ShadowModel):
        raise ShadowConfigError("A detached refinement (refine_steps > 0) needs a ShadowPEFT model, not a baseline.")
    train_rows = encode_task(task, tokenizer, split="train", max_length=settings.max_length)
    eval_rows = encode_task(task, tokenizer, split="test", max_length=settings.max_length) if task.test else []
    phases = [(replace(settings, max_steps=settings.attached_steps, refine_steps=0), work_dir, resume_from)]
    if settings.refine_steps:
        refine_dir = work_dir / "refine"
        refine = replace(settings, max_steps=settings.refine_steps, refine_steps=0)
        phases.append((refine, refine_dir, latest_checkpoint(refine_dir) if resume_from else None))
    history: list[tuple[int, float]] = []
    elapsed, done, offset = 0.0, 0, 0
    for index, (phase, directory, resume) in enumerate(phases):
        with detached_training(model) if index else contextlib.nullcontext():
            trainer, phase_history, seconds = _train_phase(
                model, train_rows, eval_rows, tokenizer, phase, directory, resume, base_ref
            )
        history += [(offset + step, loss) for step, loss in phase_history]
        elapsed += seconds
        done += max(trainer.state.global_step - (_step_of(resume) if resume else 0), 0)
        offset += trainer.state.global_step
    trainable, total = count_parameters(model)
    summary = TrainSummary(
        steps=offset,
        final_loss=history[-1][1] if history else float("nan"),
        first_loss=history[0][1] if history else None,
        seconds_per_step=elapsed / max(done, 1),
        trainable_params=trainable,
        total_params=total,
        loss_history=history,
    )
    if task.test and trainer.args.should_save:
        final_evaluation(model, task, tokenizer, settings, eval_modes, summary)
    return summary


def final_evaluation(
    model: nn.Module,
    task: TaskData,
    tokenizer: Any,
    settings: TrainSettings,
    modes: tuple[str | None, ...],
    summary: TrainSummary,
) -> None:
    """Fill ``summary.metrics`` (one per mode) and, with both modes, ``summary.escalation``.

    With an attached and a detached mode, both are scored per example, and the escalation threshold
    (the largest local share whose combined accuracy stays within 1 point of attached,
    :mod:`shadowpeft.train.selective`) is chosen on these test examples. Classification and generation
    report those per-example accuracies as their metrics; language modelling keeps perplexity as its
    metric and chooses the threshold on the predicted tokens' next-token accuracy (``token-probability``).
    """
    selective = set(modes) == {"attached", "detached"} and task.kind in CONFIDENCE_MEASURES
    limit = settings.eval_examples
    if not selective or task.kind == "lm":
        for mode in modes:
            summary.metrics.append(
                evaluate(model, task, tokenizer, mode=mode, max_length=settings.max_length, limit=limit)
            )
    if not selective:
        return
    scores, record, _ = escalation_scores(model, task, tokenizer, max_length=settings.max_length, limit=limit)
    if task.kind != "lm":
        summary.metrics += [EvalResult("accuracy", s.accuracy, s.examples, mode) for mode, s in scores.items()]
    summary.escalation = record.to_dict()


def escalation_scores(
    model: nn.Module,
    task: TaskData,
    tokenizer: Any,
    *,
    max_length: int,
    limit: int | None,
    tolerance: float = 0.01,
) -> tuple[dict[str, ExampleScores], EscalationRecord, list[SelectiveRow]]:
    """Score ``model`` attached and detached per example and choose the escalation threshold from them."""
    scores = {
        mode: score_examples(model, task, tokenizer, mode=mode, max_length=max_length, limit=limit)
        for mode in ("attached", "detached")
    }
    record, rows = escalation_record(
        scores["attached"], scores["detached"], confidence_name=CONFIDENCE_MEASURES[task.kind], tolerance=tolerance
    )
    return scores, record, rows


def _train_phase(
    model: nn.Module,
    train_rows: list,
    eval_rows: list,
    tokenizer: Any,
    settings: TrainSettings,
    work_dir: Path,
    resume_from: str | None,
    base_ref: str | None,
) -> tuple[ShadowTrainer, list[tuple[int, float]], float]:
    """One Trainer run: the trainer, its (step, loss) log and its wall time."""
    history = _LossHistory()
    trainer = ShadowTrainer(
        model=model,
        args=training_arguments(settings, work_dir, has_eval=bool(eval_rows)),
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=PadCollator.for_tokenizer(tokenizer, side="right"),
        callbacks=[history],
    )
    trainer.base_ref = base_ref
    trainer.shadow_lr_multiplier = settings.shadow_lr_multiplier
    # Our losses are already means over the micro-batch; let the Trainer scale for accumulation.
    trainer.model_accepts_loss_kwargs = False
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    if not history.history:
        history.history.append((trainer.state.global_step, float(result.training_loss)))
    return trainer, history.history, seconds


@contextlib.contextmanager
def detached_training(model: ShadowModel) -> Iterator[None]:
    """Train the detached path only: detached mode, injections, updates and the base classifier head frozen.

    The shadow backbone, its projection and the shadow heads stay as they were (trainable when they
    were). Restores the mode and every ``requires_grad`` flag on exit.
    """
    frozen = [model.shadow_injection_model, model.shadow_update_model]
    frozen += [model.classifier_head] if hasattr(model, "classifier_head") else []
    flags = {id(p): p.requires_grad for module in frozen for p in module.parameters()}
    previous_mode = model.inference_mode
    for module in frozen:
        module.requires_grad_(False)
    model.inference_mode = "detached"
    try:
        yield
    finally:
        model.inference_mode = previous_mode
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(flags[id(p)])


def latest_checkpoint(work: Path) -> str | None:
    """The newest ``checkpoint-<step>`` under ``work``, if any."""
    if not work.is_dir():
        return None
    found = sorted((p for p in work.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def _step_of(checkpoint: str) -> int:
    """``.../checkpoint-40`` -> 40 (the Trainer's naming)."""
    try:
        return int(Path(checkpoint).name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def adapter_to_float32(model: ShadowModel) -> None:
    """fp32 master weights for every trainable ``shadow_*`` module (the frozen base keeps its dtype)."""
    for name, child in model.named_children():
        if name.startswith("shadow_"):
            child.float()

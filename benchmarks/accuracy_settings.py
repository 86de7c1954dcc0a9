"""What an accuracy benchmark run is: its tasks, the settings that change results, and per-device profiles.

``benchmarks.accuracy`` plans and runs them; ``--resume`` compares a record's settings with
:class:`BenchSettings` to decide whether a run can be continued.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shadowpeft.train.datasets import TaskData, load_task_data

__all__ = [
    "EVAL_SUBSET_SEED",
    "PROFILES",
    "SPLIT_SEED",
    "BenchSettings",
    "Profile",
    "Setup",
    "TaskSpec",
    "eval_subset",
]

SPLIT_SEED = 0  # one fixed train/test split for every seed and method
EVAL_SUBSET_SEED = 0  # which test examples form a task's evaluation subset (the split is sorted by label)

# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class TaskSpec:
    """One task of the benchmark and the settings every method uses on it.

    Attributes:
        name: Task name in the results (``sentiment``, ``intent``; ``toy-*`` in smoke mode).
        kind: ``classification``, ``generation`` or ``lm`` (the pretraining corpus).
        max_length: Token limit per example.
        steps: Optimizer steps per training run.
        eval_examples: Size of the fixed random evaluation subset of the test split (None: all).
    """

    name: str
    kind: str
    max_length: int
    steps: int
    eval_examples: int | None


@dataclass(frozen=True)
class BenchSettings:
    """Everything that changes a run's result; ``--resume`` requires the recorded settings to be equal."""

    base: str
    device: str
    bf16: bool
    batch_size: int
    warmup_ratio: float
    scheduler: str
    lr: dict[str, float]
    tasks: tuple[TaskSpec, ...]
    pretrain: TaskSpec
    shadow_config: dict[str, Any]
    split_seed: int = SPLIT_SEED
    eval_subset_seed: int = EVAL_SUBSET_SEED

    def task(self, name: str) -> TaskSpec:
        """The task (or pretraining corpus) called ``name``."""
        return next(t for t in (*self.tasks, self.pretrain) if t.name == name)


@dataclass
class Setup:
    """Where the base model and the data are read from (paths differ between runs; not in the settings)."""

    base_path: str
    data: dict[str, str]  # task name -> built-in name or JSONL path for load_task_data
    work: Path
    loaded: dict[str, TaskData] = dataclasses.field(default_factory=dict)

    def task_data(self, spec: TaskSpec) -> TaskData:
        """The task with its evaluation subset, loaded once."""
        if spec.name not in self.loaded:
            task = load_task_data(self.data[spec.name], seed=SPLIT_SEED)
            self.loaded[spec.name] = eval_subset(task, spec.eval_examples)
        return self.loaded[spec.name]

    def pretrained_dir(self, seed: int) -> Path:
        """Where the pretrained shadow of ``seed`` is kept until the benchmark completes."""
        return self.work / f"pretrained-shadow-seed{seed}"

    def has_pretrained(self, seed: int) -> bool:
        """The pretrained shadow of ``seed`` is on disk."""
        return self.pretrained_dir(seed).is_dir()  # save_shadow publishes atomically


def eval_subset(task: TaskData, size: int | None) -> TaskData:
    """A fixed random subset of the test split, in split order (the first N rows may all share a label)."""
    if size is None or size >= len(task.test):
        return task
    keep = sorted(random.Random(EVAL_SUBSET_SEED).sample(range(len(task.test)), size))
    return dataclasses.replace(task, test=tuple(task.test[i] for i in keep))


@dataclass(frozen=True)
class Profile:
    """Defaults of one kind of run (``cpu``, ``cuda`` or ``smoke``); options override them."""

    seeds: int
    batch_size: int
    tasks: tuple[TaskSpec, ...]
    pretrain: TaskSpec


_SENTIMENT = TaskSpec("sentiment", "classification", 64, 150, 300)
_INTENT = TaskSpec("intent", "generation", 160, 60, None)
_SHAKESPEARE = TaskSpec("shakespeare", "lm", 128, 300, 100)
_TOY = (
    TaskSpec("toy-classification", "classification", 32, 10, None),
    TaskSpec("toy-generation", "generation", 32, 10, None),
)
PROFILES = {
    # About 100 minutes on 2 CPU cores (announce() prints the estimate); see accuracy_report.TUNING.
    "cpu": Profile(seeds=2, batch_size=8, tasks=(_SENTIMENT, _INTENT), pretrain=_SHAKESPEARE),
    # Not timed yet: a guess at a useful GPU run (bf16 base, whole test splits, a few epochs of intent).
    "cuda": Profile(
        seeds=3,
        batch_size=16,
        tasks=(
            dataclasses.replace(_SENTIMENT, steps=800, eval_examples=None),
            dataclasses.replace(_INTENT, steps=200),
        ),
        pretrain=dataclasses.replace(_SHAKESPEARE, steps=1000, eval_examples=None),
    ),
    "smoke": Profile(seeds=2, batch_size=8, tasks=_TOY, pretrain=TaskSpec("toy-lm", "lm", 32, 10, 20)),
}

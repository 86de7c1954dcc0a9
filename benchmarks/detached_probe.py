"""Short single-seed probes of the detached-quality levers on the main job's task (sentiment as generation).

Each probe trains SmolLM2-135M-Instruct with the main job's settings (100 steps, batch 8, lr 3e-3,
max_length 128, seed 0) and one combination of levers, then evaluates attached and detached accuracy
on the main job's 100 held-out examples. Results append to ``results/detached_probe.jsonl``; a probe
already recorded there is skipped, so re-running the command resumes.

Usage::

    python -m benchmarks.detached_probe                 # every probe in PROBES
    python -m benchmarks.detached_probe --only init4    # one probe
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import click
import torch

from benchmarks.harness import RESULTS_DIR
from shadowpeft.config import BackboneConfig, DistillConfig, ShadowConfig
from shadowpeft.demo.mainjob import sentiment_generation_file
from shadowpeft.train.jobs import train_job
from shadowpeft.train.trainer import TrainSettings

RESULTS = RESULTS_DIR / "detached_probe.jsonl"
FOUR = (0, 1, 2, 3)

ALL_IN = dict(aux_loss_weight=1.0, distill=DistillConfig(1.0), backbone=BackboneConfig(4, base_layers=FOUR))
INIT_LAMBDA = dict(aux_loss_weight=1.0, backbone=BackboneConfig(4, base_layers=FOUR))

# name -> (ShadowConfig keyword arguments, TrainSettings overrides[, method]); in the order they run.
PROBES: dict[str, tuple] = {
    "all-in-4": (ALL_IN, {}),
    "all-in-4-lr0.05": (ALL_IN, {"shadow_lr_multiplier": 0.05}),
    "init4-lambda1-lr0.05": (INIT_LAMBDA, {"shadow_lr_multiplier": 0.05}),
    "all-in-4-lr0.2": (ALL_IN, {"shadow_lr_multiplier": 0.2}),
    "alone-init4-lr1.5e-4": (
        dict(backbone=BackboneConfig(4, base_layers=FOUR)),
        {"learning_rate": 1.5e-4},
        "detached-alone",
    ),
    "alone-init4-lr6e-4": (
        dict(backbone=BackboneConfig(4, base_layers=FOUR)),
        {"learning_rate": 6e-4},
        "detached-alone",
    ),
    "alone-init4-lr1.5e-3": (
        dict(backbone=BackboneConfig(4, base_layers=FOUR)),
        {"learning_rate": 1.5e-3},
        "detached-alone",
    ),
    "alone-init8-lr6e-4": (
        dict(backbone=BackboneConfig(8, base_layers=tuple(range(8)))),
        {"learning_rate": 6e-4},
        "detached-alone",
    ),
    "alone-init12-lr6e-4": (
        dict(backbone=BackboneConfig(12, base_layers=tuple(range(12)))),
        {"learning_rate": 6e-4},
        "detached-alone",
    ),
    "init12-lambda1-lr0.2": (
        dict(aux_loss_weight=1.0, backbone=BackboneConfig(12, base_layers=tuple(range(12)))),
        {"shadow_lr_multiplier": 0.2},
    ),
    "init8-lambda1-lr0.2": (
        dict(aux_loss_weight=1.0, backbone=BackboneConfig(8, base_layers=tuple(range(8)))),
        {"shadow_lr_multiplier": 0.2},
    ),
    "all-in-1-lr0.05": (
        dict(aux_loss_weight=1.0, distill=DistillConfig(1.0), backbone=BackboneConfig(1, base_layers=(0,))),
        {"shadow_lr_multiplier": 0.05},
    ),
    "lambda1": (dict(aux_loss_weight=1.0), {}),
    "all-in-4-lr0.05-refine": (ALL_IN, {"shadow_lr_multiplier": 0.05, "refine_steps": 30}),
}
CHECKPOINTS = Path(tempfile.gettempdir()) / "shadowpeft-probe-checkpoints"


def recorded() -> set[str]:
    if not RESULTS.is_file():
        return set()
    return {json.loads(line)["probe"] for line in RESULTS.read_text().splitlines() if line.strip()}


@click.command()
@click.option("--only", multiple=True, help="Run only these probes.")
@click.option("--steps", default=100, show_default=True)
def main(only: tuple[str, ...], steps: int) -> None:
    data = str(sentiment_generation_file())
    torch.set_flush_denormal(True)
    for name, (config_kwargs, overrides, *method) in PROBES.items():
        if (only and name not in only) or name in recorded():
            continue
        settings = TrainSettings(
            **{
                "max_steps": steps,
                "batch_size": 8,
                "learning_rate": 3e-3,
                "max_length": 128,
                "eval_examples": 100,
                "seed": 0,
                "logging_steps": 10,
                **overrides,
            }
        )
        out = CHECKPOINTS / name  # kept for inspection (outside the repository)
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        summary = train_job(
            base="smollm2-135m-instruct",
            data=data,
            out=out,
            config=ShadowConfig(**config_kwargs),
            settings=settings,
            method=method[0] if method else "shadow",
        )
        row = {
            "probe": name,
            "config": {k: str(v) for k, v in config_kwargs.items()},
            "settings": overrides,
            "method": method[0] if method else "shadow",
            "escalation": summary.escalation,
            "steps": steps,
            **{m.mode: m.value for m in summary.metrics},
            "examples": summary.metrics[0].examples,
            "trainable_params": summary.trainable_params,
            "s_per_step": summary.seconds_per_step,
            "wall_s": time.perf_counter() - start,
            "final_loss": summary.final_loss,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        click.echo(json.dumps(row))


if __name__ == "__main__":
    main()

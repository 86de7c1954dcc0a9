"""Variants of the ``edge`` recipe on the tasks where it misses a target, two seeds each.

``benchmarks/detached.py`` measures the fixed rows the issue asks for; this script tries changes to
``edge`` (one lever moved at a time) with the same task settings, so a better recipe can be chosen by
measurement. Each (variant, task, seed) appends one JSON line to ``results/detached_levers.jsonl``; a
line already there is skipped, so re-running resumes.

Usage::

    python -m benchmarks.detached_levers                          # every variant, every task
    python -m benchmarks.detached_levers --only distill --task intent
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from benchmarks import detached as bench  # the sibling benchmark: its task specs and run_one
from benchmarks.harness import RESULTS_DIR
from shadowpeft.train.recipes import RECIPES

RESULTS = RESULTS_DIR / "detached_levers.jsonl"
EDGE = RECIPES["edge"].levers

# name -> (levers, steps multiplier)
VARIANTS = {
    "edge": (EDGE, 1),
    "distill": (dataclasses.replace(EDGE, distill_weight=1.0), 1),
    "distill-t2": (dataclasses.replace(EDGE, distill_weight=1.0, distill_temperature=2.0), 1),
    "lr-x0.5": (dataclasses.replace(EDGE, shadow_lr_multiplier=0.5), 1),
    "lr-x1": (dataclasses.replace(EDGE, shadow_lr_multiplier=1.0), 1),
    "lambda-0.5": (dataclasses.replace(EDGE, aux_loss_weight=0.5), 1),
    "init-0-11": (dataclasses.replace(EDGE, shadow_init="base:0-11"), 1),
    "refine-0.3": (dataclasses.replace(EDGE, refine_fraction=0.3), 1),
    "steps-x2": (EDGE, 2),
}
TASKS = {t.name: t for t in bench.BENCH_DEFAULTS}


def recorded(path: Path) -> set[tuple[str, str, int]]:
    if not path.is_file():
        return set()
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["variant"], r["task"], r["seed"]) for r in lines}


@click.command()
@click.option("--only", multiple=True, type=click.Choice(sorted(VARIANTS)), help="Run only these variants.")
@click.option("--task", "tasks", multiple=True, type=click.Choice(sorted(TASKS)), help="Run only these tasks.")
@click.option("--seeds", default=2, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--out", default=RESULTS, show_default=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--note", default="", help="Stored with every line (e.g. the machine, or that it was shared).")
def main(only: tuple[str, ...], tasks: tuple[str, ...], seeds: int, batch_size: int, out: Path, note: str) -> None:
    """Train each edge variant on each task and seed; append the results as JSON lines."""
    done = recorded(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in only or VARIANTS:
        levers, step_factor = VARIANTS[name]
        for task_name in tasks or ("sentiment-gen", "intent"):
            spec = TASKS[task_name]
            spec = dataclasses.replace(spec, steps=spec.steps * step_factor)
            for seed in range(seeds):
                if (name, task_name, seed) in done:
                    continue
                click.echo(f"{name} / {task_name} / seed {seed}", err=True)
                row = bench.run_one(
                    spec, bench.RowSpec(name, "shadow", levers), seed, base=bench.BASE, batch_size=batch_size
                )
                row.update(variant=name, steps=spec.steps, note=note, machine=bench.machine())
                with out.open("a") as handle:  # one whole line per run: a stopped run leaves no partial line
                    handle.write(json.dumps(row) + "\n")
                click.echo(json.dumps(row), err=True)


if __name__ == "__main__":
    main()

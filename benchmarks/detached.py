"""Detached quality on SmolLM2-135M-Instruct: recipes and levers against LoRA, DoRA and the shadow trained alone.

For each task, method row and seed, one run of ``shadowpeft train`` (``jobs.train_job``, the CLI's code
path) on the same fixed train/test split, then attached and detached accuracy on the same evaluation
subset, and the escalation threshold that run saves (``escalation.json``): the share of examples the
detached model keeps local and the combined accuracy when the rest go to the attached model.

Rows (``ROWS``): LoRA and DoRA on q,k,v,o at the paper shadow's budget (and at edge's, when edge's
budget differs), the detached architecture trained alone (``--method detached-alone``, edge's shadow),
``paper``, each lever added alone to ``paper``, and ``edge``.

Usage::

    python -m benchmarks.detached                 # CPU defaults (see BENCH_DEFAULTS)
    python -m benchmarks.detached --resume        # continue an interrupted run
    python -m benchmarks.detached --seeds 1 --only-task sentiment-gen   # a short probe

Results: ``benchmarks/results/detached.{json,md,png}``, rewritten (atomically) after every run; the
JSON's ``rows`` hold one object per (task, method, seed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import torch
import transformers

from benchmarks.harness import RESULTS_DIR, cpu_model, load_for_resume, now, save_figure, save_json
from shadowpeft import ShadowConfig
from shadowpeft.demo.mainjob import sentiment_generation_file
from shadowpeft.runtime.atomic import write_atomic
from shadowpeft.train.jobs import train_job
from shadowpeft.train.recipes import RECIPES, Levers
from shadowpeft.train.selective import EscalationRecord
from shadowpeft.train.trainer import TrainSettings

RESULTS = RESULTS_DIR
BASE = "smollm2-135m-instruct"
LR = {"lora": 1e-3, "dora": 1e-3, "shadow": 3e-3, "detached-alone": 3e-3}  # benchmarks/accuracy.py's rates


@dataclass(frozen=True)
class TaskSpec:
    """One task: its data, token limit, training steps and evaluation subset size (None: all)."""

    name: str
    data: str  # built-in name, or "sentiment-gen" for the main job's label-generation file
    max_length: int
    steps: int
    eval_examples: int | None


@dataclass(frozen=True)
class RowSpec:
    """One method row: a ``--method`` and the levers it trains with.

    ``budget_of`` names the recipe whose shadow sets a LoRA/DoRA row's matched budget.
    """

    name: str
    method: str
    levers: Levers
    budget_of: str = "paper"


def rows(edge: Levers) -> tuple[RowSpec, ...]:
    """The rows, most important first; edge-budget baselines only when edge's shadow differs in size from paper's."""
    paper = RECIPES["paper"].levers
    out = [
        RowSpec("edge", "shadow", edge),
        RowSpec("paper", "shadow", paper),
        RowSpec("lora", "lora", paper),
        RowSpec("dora", "dora", paper),
        RowSpec("detached-alone", "detached-alone", Levers(shadow_init=edge.shadow_init)),
        RowSpec("paper+lambda", "shadow", dataclasses.replace(paper, aux_loss_weight=edge.aux_loss_weight)),
        # Distillation is scaled by lambda, so it is shown on top of the lambda lever.
        RowSpec(
            "paper+lambda+distill",
            "shadow",
            dataclasses.replace(paper, aux_loss_weight=edge.aux_loss_weight, distill_weight=1.0),
        ),
        RowSpec("paper+init", "shadow", dataclasses.replace(paper, shadow_init=edge.shadow_init)),
        RowSpec("paper+refine", "shadow", dataclasses.replace(paper, refine_fraction=0.3)),
    ]
    if edge.base_layers is not None and len(edge.base_layers) != 1:
        out[4:4] = [RowSpec("lora@edge", "lora", edge, "edge"), RowSpec("dora@edge", "dora", edge, "edge")]
    return tuple(out)


# sentiment-gen first: the main job's task, with the main job's steps and evaluation size.
BENCH_DEFAULTS = (
    TaskSpec("sentiment-gen", "sentiment-gen", 128, 100, 100),
    TaskSpec("sentiment", "sentiment", 64, 100, 200),
    TaskSpec("intent", "intent", 160, 60, None),
)


@dataclass(frozen=True)
class BenchSettings:
    """Everything that changes a result; ``--resume`` needs the recorded settings to be equal."""

    base: str
    tasks: tuple[TaskSpec, ...]
    rows: tuple[str, ...]
    seeds: int
    batch_size: int
    lr: dict[str, float]
    edge: dict[str, Any]

    @property
    def edge_levers(self) -> Levers:
        return Levers(**self.edge)


def data_ref(spec: TaskSpec) -> str:
    """``sentiment-gen`` is the main job's label-generation file; anything else goes to load_task_data as is."""
    return str(sentiment_generation_file()) if spec.data == "sentiment-gen" else spec.data


def train_settings(spec: TaskSpec, row: RowSpec, seed: int, batch_size: int) -> TrainSettings:
    lr = LR["shadow" if row.method == "shadow" else row.method]
    return TrainSettings(
        max_steps=spec.steps,
        batch_size=batch_size,
        learning_rate=lr,
        max_length=spec.max_length,
        eval_examples=spec.eval_examples,
        logging_steps=max(1, spec.steps // 5),
        seed=seed,
    )


def run_one(spec: TaskSpec, row: RowSpec, seed: int, *, base: str, batch_size: int) -> dict[str, Any]:
    """Train and evaluate one (task, row, seed); the checkpoint is deleted afterwards."""
    settings = train_settings(spec, row, seed, batch_size)
    baseline = row.method in ("lora", "dora")
    levers = Levers(shadow_init=row.levers.shadow_init) if baseline else row.levers  # only the budget matters
    work = Path(tempfile.mkdtemp(prefix="detached-bench-"))
    start = time.perf_counter()
    try:
        summary = train_job(
            base=base,
            data=data_ref(spec),
            out=work / "ckpt",
            config=ShadowConfig(),
            settings=settings,
            method=row.method,
            levers=levers,
        )
        escalation = EscalationRecord.read(work / "ckpt")
        record = json.loads((work / "ckpt" / "training.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metrics = {m.mode: m.value for m in summary.metrics}
    attached = metrics.get("attached", metrics.get(None))
    detached = metrics.get("detached")
    return {
        "task": spec.name,
        "method": row.name,
        "seed": seed,
        "attached": attached if row.method != "detached-alone" else None,
        "detached": detached,
        "ratio": detached / attached if detached is not None and attached else None,
        "params": summary.trainable_params,
        "lora_rank": record.get("lora_rank"),
        "local_fraction": escalation.local_fraction if escalation else None,
        "combined": escalation.combined_accuracy if escalation else None,
        "threshold": escalation.threshold if escalation else None,
        "detached_ece": escalation.detached_ece if escalation else None,
        "examples": summary.metrics[0].examples,
        "s_per_step": summary.seconds_per_step,
        "steps": summary.steps,
        "wall_s": time.perf_counter() - start,
        "levers": levers.to_dict(),
    }


# ------------------------------------------------------------------------------------------ records


def load_results(path: Path, settings: BenchSettings, *, resume: bool) -> dict[str, Any]:
    """The recorded run to continue (``resume``), else a fresh record (see harness.load_for_resume)."""
    data = load_for_resume(path, json.loads(json.dumps(asdict(settings)))) if resume else None
    return data or {"settings": asdict(settings), "rows": [], "started": now(), "machine": machine()}


def save_results(path: Path, data: dict[str, Any]) -> None:
    data["updated"] = now()
    save_json(path, data, indent=1)


def machine() -> dict[str, Any]:
    """The machine fields detached.md shows (the committed results use these keys)."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ------------------------------------------------------------------------------------------ report


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.fmean(got) if got else None


def _cell(values: list[float | None], scale: float = 100.0) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "-"
    mean = statistics.fmean(got) * scale
    spread = f" ± {statistics.stdev(got) * scale:.1f}" if len(got) > 1 else ""
    return f"{mean:.1f}{spread} (n={len(got)})"


def summarise(data: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(task, method) -> means over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in data["rows"]:
        groups.setdefault((row["task"], row["method"]), []).append(row)
    out = {}
    for key, runs in groups.items():
        out[key] = {
            "runs": runs,
            **{
                k: _mean([r[k] for r in runs])
                for k in ("attached", "detached", "ratio", "local_fraction", "combined", "s_per_step")
            },
            "params": runs[0]["params"],
        }
    return out


def _within_one_point(gap: float) -> bool:
    """``gap`` (points) >= -1, read on the printed precision: 77.5 vs 78.5 is within 1 point."""
    return round(gap, 6) >= -1.0


def targets(data: dict[str, Any]) -> list[str]:
    """The issue's targets for ``edge``, each with its measured value (only where measured)."""
    s = summarise(data)
    lines = []
    need = {"sentiment": 0.85, "sentiment-gen": 0.85, "intent": 0.60}
    for task, ratio in need.items():
        edge = s.get((task, "edge"))
        if edge and edge["ratio"] is not None:
            ok = "met" if edge["ratio"] >= ratio else "MISSED"
            lines.append(f"{task}: edge detached/attached {edge['ratio']:.3f} (target >= {ratio}): {ok}")
        if edge and edge["attached"] is not None:
            own = ("lora@edge", "dora@edge") if "lora@edge" in data["settings"]["rows"] else ("lora", "dora")
            best = max((s[(task, m)]["attached"] for m in own if (task, m) in s), default=None)
            if best is None:
                lines.append(f"{task}: edge attached vs LoRA/DoRA at edge's budget ({', '.join(own)}): not run yet")
            else:
                gap = (edge["attached"] - best) * 100
                ok = "met" if _within_one_point(gap) else "MISSED"
                lines.append(
                    f"{task}: edge attached {100 * edge['attached']:.1f}% vs best LoRA/DoRA at its budget "
                    f"{100 * best:.1f}% ({gap:+.1f} points; target >= -1): {ok}"
                )
    edge = s.get(("sentiment", "edge"))
    if edge and edge["local_fraction"] is not None:
        gap = (edge["combined"] - edge["attached"]) * 100
        ok = "met" if edge["local_fraction"] >= 0.6 and _within_one_point(gap) else "MISSED"
        lines.append(
            f"sentiment: at the saved threshold {100 * edge['local_fraction']:.0f}% answered locally, combined "
            f"{100 * edge['combined']:.1f}% vs attached {100 * edge['attached']:.1f}% ({gap:+.1f} points; targets "
            f">= 60% local, >= -1 point): {ok}"
        )
    return lines


def render_markdown(data: dict[str, Any], command: str) -> str:
    settings = data["settings"]
    s = summarise(data)
    planned = len(settings["tasks"]) * len(settings["rows"]) * settings["seeds"]
    done = len(data["rows"])
    status = "complete" if done >= planned else f"PARTIAL: {done} of {planned} runs recorded"
    m = data["machine"]
    out = [
        "# Detached quality: recipes and levers vs LoRA / DoRA (smollm2-135m-instruct)",
        "",
        f"Status: **{status}**. Machine: {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads"
        f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}), "
        f"torch {m['torch']}, transformers {m['transformers']}. Started {data['started']}, last written "
        f"{data.get('updated', '-')}.",
        "",
        *[f"Note: {note}" for note in data.get("notes", [])],
        "",
        "Tasks: "
        + "; ".join(
            f"{t['name']} ({t['data']}): {t['steps']} steps, max_length {t['max_length']}, "
            f"{t['eval_examples'] or 'all'} test examples"
            for t in settings["tasks"]
        )
        + f". Batch {settings['batch_size']}, AdamW, warmup 0.1 then cosine; lr {settings['lr']}. "
        f"edge = {settings['edge']}.",
        "",
        "Accuracy in %, mean ± sample std over seeds (n). ratio = detached / attached. params = trainable "
        "parameters including trained heads. local / combined: at the threshold the run saved (largest local "
        "share with combined accuracy within 1 point of attached, chosen on the same evaluation examples). "
        "Budgets: `lora` / `dora` take the rank matched to the paper shadow's trainable parameters, "
        "`lora@edge` / `dora@edge` the rank matched to edge's (a lever that grows the shadow is compared at its "
        "own budget); the LoRA/DoRA attached column is their accuracy (they have no detached mode). "
        "`detached-alone` is edge's shadow trained alone (no attached mode). `paper+X` adds one lever of "
        "edge to paper (distillation needs lambda > 0, so it is shown on top of the lambda lever).",
        "",
    ]
    for task in settings["tasks"]:
        name = task["name"]
        out += [
            f"## {name}",
            "",
            "| method | attached | detached | ratio | params | local % | combined | s/step |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in settings["rows"]:
            g = s.get((name, row))
            if g is None:
                out.append(f"| {row} | not run yet | | | | | | |")
                continue
            runs = g["runs"]
            ratio = f"{g['ratio']:.2f}" if g["ratio"] is not None else "-"
            local = f"{100 * g['local_fraction']:.0f}" if g["local_fraction"] is not None else "-"
            out.append(
                f"| {row} | {_cell([r['attached'] for r in runs])} | {_cell([r['detached'] for r in runs])} | {ratio} "
                f"| {g['params']:,d} | {local} | {_cell([r['combined'] for r in runs])} | {g['s_per_step']:.2f} |"
            )
        out.append("")
    out += ["## Targets (edge)", ""] + [f"- {line}" for line in targets(data) or ["nothing measured yet"]]
    commands = data.get("commands") or [command]
    out += ["", "## Commands (in the order they ran)", "", *[f"    {c}" for c in commands], ""]
    return "\n".join(out)


def render_png(data: dict[str, Any], path: Path) -> None:
    """Per task: attached vs detached accuracy of every row with both, the Pareto front over them, and
    lines for the rows with one mode only (LoRA/DoRA: attached; detached-alone: detached)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarise(data)
    tasks = [t["name"] for t in data["settings"]["tasks"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        both = []
        for (t, method), g in s.items():
            if t != task:
                continue
            x, y = g["attached"], g["detached"]
            if x is not None and y is not None:
                both.append((100 * x, 100 * y, method))
                ax.scatter([100 * x], [100 * y], s=30)
                ax.annotate(method, (100 * x, 100 * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            elif x is not None:
                ax.axvline(100 * x, ls=":", lw=0.9, color="grey")
                ax.annotate(f"{method} (attached only)", (100 * x, 0.03), fontsize=7, rotation=90, color="grey",
                            xycoords=("data", "axes fraction"))  # fmt: skip
            elif y is not None:
                ax.axhline(100 * y, ls=":", lw=0.9, color="grey")
                ax.annotate(f"{method} (detached only)", (1, 100 * y), fontsize=7, color="grey",
                            xycoords=("axes fraction", "data"), ha="right", va="bottom")  # fmt: skip
        front = sorted(
            (p for p in both if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in both)), key=lambda p: p[0]
        )
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
            ax.legend(fontsize=7, loc="lower left")
        if not any(t == task for t, _ in s):
            ax.text(0.5, 0.5, "not run yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(task)
        ax.set_xlabel("attached accuracy %")
        ax.set_ylabel("detached accuracy %")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def run_benchmark(
    settings: BenchSettings, out: Path, *, resume: bool, command: str, notes: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run every planned (seed, task, row) not yet recorded, rewriting the results after each; returns them."""
    all_rows = {r.name: r for r in rows(settings.edge_levers)}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "detached.json"
    data = load_results(path, settings, resume=resume)
    data.setdefault("notes", []).extend(notes)
    data.setdefault("commands", []).append(command)
    torch.set_flush_denormal(True)  # one policy for every row (see benchmarks/README.md, training cost)
    # Per seed: the rows the targets need on every task first, then the lever rows.
    plan = [
        (seed, task, all_rows[name])
        for seed in range(settings.seeds)
        for lever_rows in (False, True)
        for task in settings.tasks
        for name in settings.rows
        if name.startswith("paper+") == lever_rows
    ]
    done = {(r["task"], r["method"], r["seed"]) for r in data["rows"]}
    for index, (seed, task, row) in enumerate(plan, 1):
        if (task.name, row.name, seed) in done:
            continue
        click.echo(f"[{index}/{len(plan)}] {task.name} / {row.name} / seed {seed}", err=True)
        data["rows"].append(run_one(task, row, seed, base=settings.base, batch_size=settings.batch_size))
        write_outputs(out, data, command)
        click.echo(json.dumps(data["rows"][-1]), err=True)
    write_outputs(out, data, command)
    return data


def merge_shards(settings: BenchSettings, shards: Path, out: Path, *, command: str) -> dict[str, Any]:
    """Join the results of runs split by ``--only-task``/``--only-row`` (``shards/*/detached.json``) into one.

    Each shard must have been made with the same settings apart from its subset of tasks and rows; rows
    come out in the order a single run would record them.
    """
    full = json.loads(json.dumps(asdict(settings)))
    fixed = {k: v for k, v in full.items() if k not in ("tasks", "rows")}
    paths = sorted(shards.glob("*/detached.json"))
    if not paths:
        raise click.ClickException(
            f"No */detached.json under {shards}; point --merge at the folder holding the shards."
        )
    data: dict[str, Any] = {"settings": full, "rows": [], "notes": [], "commands": []}
    for path in paths:
        shard = json.loads(path.read_text())
        got = shard["settings"]
        if (
            {k: v for k, v in got.items() if k not in ("tasks", "rows")} != fixed
            or any(t not in full["tasks"] for t in got["tasks"])
            or any(r not in full["rows"] for r in got["rows"])
        ):
            raise click.ClickException(
                f"{path} was made with other settings than this command's; merge it separately."
            )
        data["rows"].extend(shard["rows"])
        data["started"] = min(data.get("started") or shard["started"], shard["started"])
        data.setdefault("machine", shard["machine"])
        data["notes"] += [n for n in shard.get("notes", []) if n not in data["notes"]]
        data["commands"] += shard.get("commands", [])
    task_order = [t["name"] for t in full["tasks"]]
    row_order = list(full["rows"])
    data["rows"].sort(
        key=lambda r: (
            r["seed"],
            r["method"].startswith("paper+"),
            task_order.index(r["task"]),
            row_order.index(r["method"]),
        )
    )
    data["commands"].append(command)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(out, data, command)
    return data


def write_outputs(out: Path, data: dict[str, Any], command: str) -> None:
    save_results(out / "detached.json", data)
    write_atomic(out / "detached.md", render_markdown(data, command))
    render_png(data, out / "detached.png")


@click.command()
@click.option("--resume/--no-resume", default=False, help="Skip the runs the JSON already records.")
@click.option("--seeds", default=2, show_default=True, type=click.IntRange(1))
@click.option("--only-task", "only_tasks", multiple=True, help="Run only these tasks (repeatable).")
@click.option("--only-row", "only_rows", multiple=True, help="Run only these rows (repeatable).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option(
    "--steps-factor",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Train every task this many times longer.",
)
@click.option("--out", default=RESULTS, show_default=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--report-only", is_flag=True, help="Re-render the markdown and PNG from the JSON.")
@click.option(
    "--merge",
    "merge",
    default=None,
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Join shard folders (DIR/*/detached.json, from --only-task/--only-row runs) into --out.",
)
@click.option(
    "--note", "notes", multiple=True, help="A remark stored with the results (e.g. that the machine was shared)."
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(1),
    help="torch threads [torch's default]. 1 keeps runs steady when the machine does other work too.",
)
def main(
    resume: bool,
    seeds: int,
    only_tasks: tuple[str, ...],
    only_rows: tuple[str, ...],
    batch_size: int,
    steps_factor: int,
    out: Path,
    report_only: bool,
    merge: Path | None,
    threads: int | None,
    notes: tuple[str, ...],
) -> None:
    """Train every (task, row, seed) and write detached.{json,md,png}; resumable."""
    if threads:
        torch.set_num_threads(threads)
    edge = RECIPES["edge"].levers
    tasks = tuple(
        dataclasses.replace(t, steps=t.steps * steps_factor)
        for t in BENCH_DEFAULTS
        if not only_tasks or t.name in only_tasks
    )
    chosen = tuple(r.name for r in rows(edge) if not only_rows or r.name in only_rows)
    settings = BenchSettings(BASE, tasks, chosen, seeds, batch_size, LR, edge.to_dict())
    command = "python -m benchmarks.detached " + " ".join(sys.argv[1:])
    if merge is not None:
        data = merge_shards(settings, merge, out, command=command)
    elif report_only:
        data = load_results(out / "detached.json", settings, resume=True)
        data.setdefault("notes", []).extend(notes)
        write_outputs(out, data, command)
    else:
        data = run_benchmark(settings, out, resume=resume, command=command, notes=notes)
    click.echo(render_markdown(data, command))


if __name__ == "__main__":
    main()

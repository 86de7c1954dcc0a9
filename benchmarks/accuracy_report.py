"""Bookkeeping and reports of benchmarks/accuracy.py: methods and their result rows, the run plan and
what ``--resume`` still has to do, the time estimate, the JSON record, the markdown table and the chart.

A record holds one JSON-ready dict per evaluated row (``runs``: task, method, row, seed, accuracy,
parameters, learning rate, steps, s/step) and one per shadow pretraining (``pretrain``). The tables
aggregate rows over seeds: mean and sample standard deviation of the accuracy.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from benchmarks.harness import now, save_figure
from shadowpeft.runtime.atomic import write_atomic

METHODS = ("zero-shot", "lora", "dora", "shadow", "shadow-pretrained")
PRETRAIN = "pretrain"  # the method name of a shadow pretraining run
# Result rows of each method's run: (row name, inference mode passed to evaluate()).
ROWS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "zero-shot": (("zero-shot", None),),
    "lora": (("lora", None),),
    "dora": (("dora", None),),
    "shadow": (("shadow-attached", "attached"), ("shadow-detached", "detached")),
    "shadow-pretrained": (("shadow-pretrained-detached", "detached"), ("shadow-pretrained-attached", "attached")),
}
# Display order and labels of the result rows.
ROW_LABELS = {
    "zero-shot": "base model, zero-shot (chat template)",
    "lora": "LoRA (q,k,v,o, matched rank)",
    "dora": "DoRA (q,k,v,o, matched rank)",
    "shadow-attached": "ShadowPEFT, attached",
    "shadow-detached": "ShadowPEFT, detached",
    "shadow-pretrained-attached": "ShadowPEFT, pretrained shadow, attached",
    "shadow-pretrained-detached": "ShadowPEFT, pretrained shadow, detached",
}


METHOD = (
    "Each training run loads a fresh base, seeds torch with the run's seed, wraps the base (peft LoRA/DoRA on "
    "q,k,v,o at the rank matched to the shadow's adapter size, alpha = 2r, dropout 0.05; or a ShadowPEFT shadow with "
    "the method's defaults) and trains it with shadowpeft.train.trainer.run_training (HF Trainer, AdamW, linear "
    "warmup then cosine, grad clip 1.0) for the same steps, batch size and max_length on the same training split; "
    "only the "
    "learning rate differs by method. Accuracy comes from shadowpeft.train.evaluation.evaluate on the same "
    "fixed random subset of the fixed test split (classification: argmax of the class logits; generation: "
    "greedy decoding and "
    "exact match of the label, which is strict: an untrained base that answers in prose, as SmolLM2-135M does with "
    "'The intent of the utterance is to ...', scores 0). ShadowPEFT's detached row evaluates the same trained model "
    "with the base layers off. The pretrained rows start from a shadow backbone trained alone (detached, LM loss on "
    "the frozen head) on the pretraining corpus, once per seed; injection, update and heads start fresh. Mean and "
    "sample std are over seeds; s/step is the wall time per optimizer step of the training run (data loading "
    "included, evaluation excluded), the fastest seed's: a run that shared the CPU with other work is slower, never "
    "faster, so the minimum is the closest to the undisturbed cost. Parameter counts: adapter (the matched budget) "
    "plus trained heads."
)
TUNING = (
    "Steps, batch and evaluation sizes were chosen to fit about 100 minutes on 2 CPU cores (sentiment 150 steps, "
    "intent 60, shadow pretraining 300, batch 8; 300 sentiment and all 123 intent test examples), not for best "
    "accuracy. Learning rates come from short single-seed probes on SmolLM2 (seed 0, same schedule), not a sweep. "
    "Intent, 20 steps: LoRA 5e-4 62.6%, 1e-3 65.9%; DoRA 5e-4 63.4%; ShadowPEFT 2e-3 52.8%, 3e-3 60.2% (attached). "
    "Sentiment (150 test examples): after 20 steps at LoRA/DoRA 5e-4 and ShadowPEFT 2e-3 every method sat near the "
    "majority class (60.0 / 60.0 / 58.7%); after 60 steps LoRA 1e-3 reached 71.3% and ShadowPEFT 3e-3 66.0% attached, "
    "60.7% detached. Shadow pretraining, 60 steps: detached perplexity 784 at 2e-3, 648 at 3e-3. Defaults: LoRA and "
    "DoRA 1e-3, ShadowPEFT 3e-3 (task and pretraining), the tops of the usual ranges (LoRA 2e-4..1e-3, ShadowPEFT "
    "1e-3..3e-3); short runs favour high rates, so the longer --device cuda runs may prefer lower ones. Everything "
    "else (ShadowConfig, LoRA alpha and dropout, warmup 0.1, cosine) is a library default, untuned."
)


@dataclass(frozen=True)
class Cell:
    """One row on one task, aggregated over seeds."""

    mean: float
    std: float | None
    seeds: int
    trainable_params: int
    adapter_params: int
    head_params: int
    rank: int | None
    lr: float | None
    seconds_per_step: float | None

    def accuracy(self) -> str:
        """``mean ± std (n=seeds)`` in percent."""
        std = f" ± {100 * self.std:.1f}" if self.std is not None else ""
        return f"{100 * self.mean:.1f}{std} (n={self.seeds})"


# --------------------------------------------------------------------------------------------- records


def new_record(settings: dict[str, Any], *, smoke: bool, plan: dict[str, Any], ranks: dict[str, Any]) -> dict:
    """A record with no runs yet; ``settings`` is the benchmark's settings as a JSON-ready dict."""
    return {
        "benchmark": "accuracy",
        "smoke": smoke,
        "model": settings["base"],
        "started": now(),
        "date": now(),
        "commands": [],
        "settings": settings,
        "plan": plan,
        "ranks": ranks,
        "machine": {},
        "warnings": [],
        "estimate_s": None,
        "elapsed_s": 0.0,
        "complete": False,
        "pretrain": [],
        "runs": [],
    }


def fmt_duration(seconds: float) -> str:
    """``1h05m``, ``12m30s`` or ``8s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# -------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Unit:
    """One run: a method on a task with a seed (the zero-shot evaluation, or a shadow pretraining)."""

    task: str
    method: str
    seed: int

    def describe(self) -> str:
        """For progress lines."""
        if self.method == PRETRAIN:
            return f"pretrain shadow (detached) on {self.task}, seed {self.seed}"
        return f"{self.method} on {self.task}, seed {self.seed}"


def plan_units(tasks: list[tuple[str, str]], pretrain: str, methods: list[str], seeds: int) -> list[Unit]:
    """Every run in order, seed by seed (an interrupted run still has whole seeds), pretraining first.

    Args:
        tasks: ``(name, kind)`` of each task.
        pretrain: Name of the shadow pretraining corpus.
        methods: Methods to run (zero-shot only applies to generation: a fresh classifier head is random).
        seeds: Seeds ``0 .. seeds-1``.
    """
    units = []
    for seed in range(seeds):
        if "shadow-pretrained" in methods:
            units.append(Unit(pretrain, PRETRAIN, seed))
        for name, kind in tasks:
            units += [Unit(name, m, seed) for m in methods if m != "zero-shot" or kind == "generation"]
    return units


def is_recorded(unit: Unit, record: dict[str, Any]) -> bool:
    """Every row of ``unit`` is in the record."""
    have = {(r["task"], r["row"], r["seed"]) for r in record["runs"]}
    return all((unit.task, row, unit.seed) in have for row, _ in ROWS[unit.method])


def pending(units: list[Unit], record: dict[str, Any], pretrained: Callable[[int], bool]) -> list[Unit]:
    """The units still to run; a seed's pretraining only while it is not on disk (``pretrained(seed)``)
    and one of that seed's pretrained rows is missing."""
    todo = {u for u in units if u.method != PRETRAIN and not is_recorded(u, record)}
    need = {u.seed for u in todo if u.method == "shadow-pretrained"}
    return [u for u in units if u in todo or (u.method == PRETRAIN and u.seed in need and not pretrained(u.seed))]


# ------------------------------------------------------------------------------------------- estimate

# Seconds measured on the project's 2-core CPU (AMD EPYC, fp32, 2 torch threads, batch 8, each task's
# default max_length, dynamic padding) in short SmolLM2 runs of benchmarks/accuracy.py: per optimizer
# step by (task kind, method); per evaluated example by (task kind, mode); and per run (load the base,
# encode the data, build the Trainer). Scaled linearly in batch x max_length, which is rough: batches
# are padded to their longest example, not to max_length.
STEP_S = {
    ("classification", "lora"): 1.66,
    ("classification", "dora"): 1.97,
    ("classification", "shadow"): 1.52,
    ("generation", "lora"): 5.2,
    ("generation", "dora"): 5.9,
    ("generation", "shadow"): 5.7,
    ("lm", "pretrain"): 1.1,
}
EVAL_S = {
    ("classification", "attached"): 0.075,  # also the peft baselines (no mode)
    ("classification", "detached"): 0.003,
    ("generation", "attached"): 0.23,  # greedy decoding of the label, ~5 new tokens
    ("generation", "detached"): 0.024,
    ("lm", "detached"): 0.08,
}
RUN_OVERHEAD_S = 3.0
REFERENCE_TOKENS = {"classification": 8 * 64, "generation": 8 * 160, "lm": 8 * 128}


def estimate_s(
    kind: str, method: str, *, steps: int, eval_modes: tuple[str, ...], examples: int, tokens: int
) -> float:
    """Predicted seconds of one run on the reference CPU.

    Args:
        kind: Task kind (``classification``, ``generation``, ``lm`` for shadow pretraining).
        method: ``lora``, ``dora``, ``shadow``, ``pretrain`` or ``zero-shot`` (no training).
        steps: Optimizer steps (0 for zero-shot).
        eval_modes: One entry per evaluation (``attached`` also for models without modes).
        examples: Test examples per evaluation.
        tokens: batch size x max_length, against :data:`REFERENCE_TOKENS`.
    """
    scale = tokens / REFERENCE_TOKENS[kind]
    train = steps * STEP_S[(kind, method)] if steps else 0.0
    evals = examples * sum(EVAL_S[(kind, mode)] for mode in eval_modes)
    return RUN_OVERHEAD_S + scale * (train + evals)


def announce(record: dict[str, Any], estimates: list[tuple[Unit, float]], *, planned: int, calibrated: bool) -> None:
    """Print the budget match, the runs to do and the time estimate (stored in the record when calibrated)."""
    ranks = record["ranks"]
    click.echo(
        f"shadow adapter: {ranks['shadow_adapter_params']:,} params; matched LoRA r={ranks['lora']['rank']} "
        f"({ranks['lora']['params']:,}), DoRA r={ranks['dora']['rank']} ({ranks['dora']['params']:,})"
    )
    click.echo(f"{len(estimates)} of {planned} runs to do ({planned - len(estimates)} already recorded)")
    if not calibrated:
        click.echo("estimated time: n/a (calibrated for SmolLM2 on the CPU only); the ETA adapts as runs finish")
        return
    total = sum(seconds for _, seconds in estimates)
    by_task: dict[str, float] = {}
    for unit, seconds in estimates:
        by_task[unit.task] = by_task.get(unit.task, 0.0) + seconds
    if record["estimate_s"] is None:
        record["estimate_s"] = total
    parts = ", ".join(f"{task} {fmt_duration(seconds)}" for task, seconds in by_task.items())
    click.echo(
        f"estimated time: {fmt_duration(total)} ({parts}) from SmolLM2 costs measured on 2 CPU cores: s/step "
        + ", ".join(f"{kind} {method} {s:g}" for (kind, method), s in STEP_S.items())
        + "; eval s/example "
        + ", ".join(f"{kind} {mode} {s:g}" for (kind, mode), s in EVAL_S.items())
        + f"; {RUN_OVERHEAD_S:g} s per run. A shared CPU is slower."
    )


# ----------------------------------------------------------------------------------------- aggregation


def aggregate(runs: list[dict[str, Any]]) -> dict[tuple[str, str], Cell]:
    """``(row, task) -> Cell`` over the recorded seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["row"], run["task"]), []).append(run)
    cells = {}
    for key, group in groups.items():
        accuracies = [r["accuracy"] for r in group]
        steps = [r["seconds_per_step"] for r in group if r["seconds_per_step"] is not None]
        first = group[0]
        cells[key] = Cell(
            mean=statistics.fmean(accuracies),
            std=statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            seeds=len(group),
            trainable_params=first["trainable_params"],
            adapter_params=first["adapter_params"],
            head_params=first["head_params"],
            rank=first["rank"],
            lr=first["lr"],
            seconds_per_step=min(steps) if steps else None,  # the least-disturbed run (see METHOD)
        )
    return cells


def ordered_rows(cells: dict[tuple[str, str], Cell]) -> list[str]:
    """Rows present in ``cells``, in display order."""
    present = {row for row, _ in cells}
    return [row for row in ROW_LABELS if row in present] + sorted(present - set(ROW_LABELS))


def task_names(record: dict[str, Any]) -> list[str]:
    """Tasks in settings order, then any others that have rows."""
    names = [t["name"] for t in record["settings"]["tasks"]]
    return names + sorted({r["task"] for r in record["runs"]} - set(names))


# --------------------------------------------------------------------------------------------- reports


def _params(cells: dict[tuple[str, str], Cell], row: str, tasks: list[str]) -> tuple[str, str]:
    """Adapter params and the heads per task (classification heads differ by task)."""
    found = [cells[(row, t)] for t in tasks if (row, t) in cells]
    if not found or found[0].adapter_params == 0:
        return "0", "-"
    heads = [
        f"{t}: {cells[(row, t)].head_params:,}" for t in tasks if cells.get((row, t)) and cells[(row, t)].head_params
    ]
    return f"{found[0].adapter_params:,}", ", ".join(heads) or "-"


def _table(record: dict[str, Any]) -> list[str]:
    """The markdown table: rows x tasks (accuracy %), params, rank, lr, s/step per task."""
    cells, tasks = aggregate(record["runs"]), task_names(record)
    header = ["method", *(f"{t} acc. %" for t in tasks), "adapter params", "+ heads", "rank", "lr"]
    header += [f"s/step {t}" for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in ordered_rows(cells):
        acc = [cells[(row, t)].accuracy() if (row, t) in cells else "-" for t in tasks]
        any_cell = next(cells[(row, t)] for t in tasks if (row, t) in cells)
        adapter, heads = _params(cells, row, tasks)
        rank = str(any_cell.rank) if any_cell.rank is not None else "-"
        lr = f"{any_cell.lr:g}" if any_cell.lr is not None else "-"
        sps = [_fmt_sps(cells.get((row, t))) for t in tasks]
        lines.append("| " + " | ".join([ROW_LABELS.get(row, row), *acc, adapter, heads, rank, lr, *sps]) + " |")
    return lines


def _fmt_sps(cell: Cell | None) -> str:
    return f"{cell.seconds_per_step:.2f}" if cell and cell.seconds_per_step is not None else "-"


def _settings_lines(record: dict[str, Any]) -> list[str]:
    """What was run, in words."""
    s, m, ranks = record["settings"], record["machine"], record["ranks"]
    tasks = "; ".join(
        f"{t['name']} ({t['kind']}): {t['steps']} steps, max_length {t['max_length']}, "
        f"{'all' if t['eval_examples'] is None else t['eval_examples']} test examples"
        for t in s["tasks"]
    )
    p = s["pretrain"]
    return [
        f"Base {record['model']}, {m.get('device') or s['device']}, {'bf16 base' if s['bf16'] else 'fp32'}, "
        f"batch {s['batch_size']}, AdamW, warmup {s['warmup_ratio']:g} then {s['scheduler']}. Tasks: {tasks}. "
        f"Seeds: {record['plan']['seeds']}. Shadow pretraining: {p['steps']} steps on {p['name']} "
        f"(max_length {p['max_length']}, lr {s['lr']['pretrain']:g}).",
        "",
        f"Budget: the shadow adapter (the method's defaults) has {ranks['shadow_adapter_params']:,} params; LoRA rank "
        f"{ranks['lora']['rank']} has {ranks['lora']['params']:,} and DoRA rank {ranks['dora']['rank']} "
        f"{ranks['dora']['params']:,}. Heads are trained on top (classification: ShadowPEFT trains the base "
        "`score` head and its shadow copy, peft a copy of `score`).",
        "",
        f"Machine: {m.get('cpu_model', '?')} ({m.get('physical_cores', '?')} physical cores, "
        f"{m.get('torch_threads', '?')} torch threads), torch {m.get('torch', '?')}, transformers "
        f"{m.get('transformers', '?')}, peft {m.get('peft', '?')}. Wall time {fmt_duration(record['elapsed_s'])} "
        f"(estimated {fmt_duration(record['estimate_s'] or 0)}).",
    ]


def _pretrain_lines(record: dict[str, Any]) -> list[str]:
    if not record["pretrain"]:
        return []
    items = ", ".join(
        f"seed {p['seed']}: loss {p['first_loss']:.2f} -> {p['final_loss']:.2f}, detached perplexity "
        f"{p['detached_perplexity']:.1f}, {p['seconds_per_step']:.2f} s/step"
        for p in sorted(record["pretrain"], key=lambda p: p["seed"])
        if p["first_loss"] is not None
    )
    return ["", f"Shadow pretraining ({record['settings']['pretrain']['name']}, detached): {items}."]


def markdown_report(record: dict[str, Any]) -> str:
    """The whole page: settings, table, pretraining, warnings, method, tuning and the exact commands."""
    title = "Accuracy at matched budgets: ShadowPEFT vs LoRA / DoRA"
    lines = [f"# {title} ({record['model']})", "", *_settings_lines(record), "", *_table(record)]
    lines += _pretrain_lines(record)
    lines += ["", "Accuracy in %, mean ± sample std over seeds (n); s/step is the fastest seed's."]
    if not record["complete"]:
        lines += ["", "**Incomplete:** some planned runs are missing; rerun the command with `--resume`."]
    lines += [f"\n**Warning:** {w}." for w in record["warnings"]]
    lines += ["", "## Method", "", METHOD, "", "## Tuning", "", TUNING, "", "## Command", ""]
    lines += [f"    {command}" for command in record["commands"]]
    lines += ["", f"Started {record['started']}, last written {record['date']}.", ""]
    return "\n".join(lines)


def format_table(record: dict[str, Any]) -> str:
    """A plain-text table for the terminal: accuracy mean ± std per task."""
    cells, tasks = aggregate(record["runs"]), task_names(record)
    header = f"{'row':<28}" + "".join(f"{t:>24}" for t in tasks)
    lines = [header, "-" * len(header)]
    for row in ordered_rows(cells):
        acc = "".join(f"{cells[(row, t)].accuracy() if (row, t) in cells else '-':>24}" for t in tasks)
        lines.append(f"{row:<28}{acc}")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    """Grouped bar chart: one group per task, one bar per row, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, tasks = aggregate(record["runs"]), task_names(record)
    rows = ordered_rows(cells)
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(tasks) + 2), 4.5))
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j, t in enumerate(tasks) if (row, t) in cells]
        found = [cells[(row, t)] for t in tasks if (row, t) in cells]
        means = [100 * c.mean for c in found]
        errs = [100 * (c.std or 0.0) for c in found]
        bars = ax.bar(xs, means, width, yerr=errs, capsize=3, label=ROW_LABELS.get(row, row))
        ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=2)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    s = record["settings"]
    ax.set_title(f"{record['model']}: {record['plan']['seeds']} seeds, batch {s['batch_size']}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def write_reports(record: dict[str, Any], md_path: Path, png_path: Path) -> None:
    """Write the markdown page and the chart (the JSON is written by the runner after every run)."""
    write_atomic(md_path, markdown_report(record))
    plot(record, png_path)

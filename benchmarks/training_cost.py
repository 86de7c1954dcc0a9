"""Training cost: seconds per optimizer step and peak memory, ShadowPEFT vs LoRA vs DoRA at matched budgets.

Rows (each in a process of its own, one after another; ratios against the first row, LoRA):

    lora               LoRA on q, k, v, o at the rank whose size is closest to the shadow adapter's
    dora               DoRA, likewise
    shadow             this project's ShadowPEFT (the method's defaults), attached training
                       (loss = CE(base) + 0.05 CE(shadow))
    published          the published `shadow-peft` 0.1.1 (1-layer shadow, as in decode_speed.py)
    peft-tuner         the ShadowPEFT tuner of `peft` 0.21.2 (as in decode_speed.py)
    shadow-other-denormals
                       `shadow` again under the other denormal policy: what the policy costs or saves

Every row trains through the project's harness (shadowpeft.train.trainer.run_training: HF Trainer,
AdamW, constant learning rate) on `shakespeare` (language modelling, 64-token rows), batch 8,
fp32, from a fresh adapter and the same seed. A forward pre-hook on the model stamps the start of
each step; step k takes stamp(k+1) - stamp(k) (forward, backward, clipping, optimizer step, data).
The first ``--warmup-steps`` are dropped; the next ``--steps`` count. The rows are run ``--rounds``
times (2 by default), all rows in order and then again, each run a fresh process, and the median
over every counted step of every round is reported with each round's own median: on the shared
2-core machine one row's s/step moved by up to 25% between runs minutes apart, and interleaving
spreads such drift over all rows instead of the ones that happened to run during it.
Peak memory is the peak resident set (VmHWM) of the row's process; the resident set after the
model is built is reported beside it.

The denormal trap: a freshly initialised shadow starts as the identity (W_up = 0) and the
auxiliary loss pushes tiny gradients through it; early steps then produce denormal (subnormal)
floats, which many x86 CPUs process far more slowly than normal ones, and the first steps ran
2-2.5x slower when issue 6 was filed. ``torch.set_flush_denormal(True)`` (flush-to-zero and
denormals-are-zero) removes it. One policy applies to every row (``--denormals``): ``keep`` (torch's
default, no flushing) or ``flush``; ``shadow-other-denormals`` runs the shadow under the other one. The
default is ``keep``: measured on 2026-11-23 with flushing on for every row, the shadow step took 3.25 s
flushed and 2.60 s not (with the trap gone, flushing only cost time), so flushing is no longer the
faster policy for the row it was meant to help.

Usage::

    python -m benchmarks.training_cost                        # SmolLM2, roughly 16 minutes on 2 idle cores
    python -m benchmarks.training_cost --smoke --out /tmp/x   # toy Llama of tests/toy.py, under 2 minutes
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from benchmarks import accuracy, decode_speed, speed_rows
from benchmarks.harness import (
    RESULTS_DIR,
    machine_info,
    now,
    physical_cores,
    run_cli,
    run_module,
    save_figure,
    save_json,
)
from shadowpeft.runtime.atomic import write_atomic

SMOLLM2 = "smollm2-135m-instruct"
ROWS = ("lora", "dora", "shadow", "published", "peft-tuner", "shadow-other-denormals")
DENORMALS = ("keep", "flush")  # the policy of every row: torch's default, or flush-to-zero
LABELS = {
    "lora": "LoRA (q,k,v,o), matched rank",
    "dora": "DoRA (q,k,v,o), matched rank",
    "shadow": "ShadowPEFT (this project)",
    "published": "shadow-peft 0.1.1 (published)",
    "peft-tuner": "peft 0.21.2 ShadowPEFT tuner",
    "shadow-other-denormals": "ShadowPEFT, the other denormal policy",
}
TARGET_RATIO = 1.10  # issue 6: a ShadowPEFT training step <= 1.10x LoRA's at matched budget


@dataclass(frozen=True)
class Job:
    """One row's training run (written as JSON for its process)."""

    row: str
    base: str
    data: str
    steps: int
    warmup_steps: int
    batch_size: int
    seq_len: int
    threads: int
    rank: int | None
    lr: float
    seed: int = 0
    denormals: str = "keep"

    @property
    def method(self) -> str:
        return "shadow" if self.row.startswith("shadow") else self.row

    @property
    def flush_denormal(self) -> bool:
        """The run's policy (``denormals``), flipped for ``shadow-other-denormals``."""
        flush = self.denormals == "flush"
        return not flush if self.row == "shadow-other-denormals" else flush


# ---------------------------------------------------------------------------------------------- worker


def build_model(job: Job, base: torch.nn.Module) -> torch.nn.Module:
    """The row's trainable model on a freshly loaded base."""
    if job.method in ("lora", "dora"):
        from shadowpeft.train.baselines import build_baseline

        return build_baseline(base, job.method, rank=job.rank, task="causal-lm")
    if job.method == "shadow":
        from shadowpeft import ShadowConfig, get_shadow_model

        return get_shadow_model(base, ShadowConfig())
    if job.method == "published":
        return decode_speed.published_model(base)
    return decode_speed.peft_tuner_model(base)


def run_job(job: Job, work: Path) -> dict[str, Any]:
    """Train ``warmup_steps + steps + 1`` steps, stamping each forward; returns step times and memory."""
    from shadowpeft.params import count_parameters
    from shadowpeft.train.datasets import load_task_data
    from shadowpeft.train.jobs import load_base
    from shadowpeft.train.trainer import TrainSettings, run_training

    torch.set_num_threads(job.threads)
    torch.set_flush_denormal(job.flush_denormal)
    base, tokenizer = load_base(job.base, kind="lm")
    torch.manual_seed(job.seed)
    model = build_model(job, base)
    task = load_task_data(job.data, seed=0)
    stamps: list[float] = []
    tokens: list[tuple[int, int, int]] = []  # (batch, width, real tokens) per step

    def stamp(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        stamps.append(time.perf_counter())
        mask = kwargs.get("attention_mask")
        if mask is not None:
            tokens.append((*mask.shape, int(mask.sum())))

    model.register_forward_pre_hook(stamp, with_kwargs=True)  # measurement only: reads nothing, writes nothing
    settings = TrainSettings(
        max_steps=job.warmup_steps + job.steps + 1,
        batch_size=job.batch_size,
        learning_rate=job.lr,
        warmup_ratio=0.0,
        scheduler="constant_with_warmup",
        max_length=job.seq_len,
        eval_examples=None,
        logging_steps=1,
        seed=job.seed,
    )
    rss_loaded = speed_rows.memory_kb("VmRSS")
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints every log dict
        summary = run_training(model, task, tokenizer, settings, work, eval_modes=())
    step_s = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    aux = auxiliary_head_seconds(model, job) if job.method == "shadow" else None
    return {
        "aux_head_s": aux,
        "row": job.row,
        "step_s": step_s,
        "measured_s": step_s[job.warmup_steps : job.warmup_steps + job.steps],
        "trainable_params": count_parameters(model)[0],
        "steps": summary.steps,
        "first_loss": summary.first_loss,
        "final_loss": summary.final_loss,
        "batch_tokens": tokens[: len(step_s)],
        "rss_loaded_kb": rss_loaded,
        "peak_rss_kb": speed_rows.memory_kb("VmHWM"),
        "flush_denormal": job.flush_denormal,
    }


def auxiliary_head_seconds(model: Any, job: Job, repeats: int = 5) -> float:
    """Median time of the shadow loss's head alone: logits of ``s0`` over the vocabulary, CE, backward.

    This is the part of a ShadowPEFT step that LoRA does not have and that does not shrink with the
    adapter: a second (N x d) @ (d x V) product, its softmax, and the gradient product back to ``s0``
    (the head is frozen, so no weight gradient). Measured on the step's shapes after training, with
    random states (the time does not depend on their values).
    """
    import torch.nn.functional as F

    head = model.shadow_head
    weight = head.weight  # (V, d)
    rows = job.batch_size * (job.seq_len - 1)  # positions that take a loss in an LM batch
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(rows, weight.shape[1], generator=generator, dtype=weight.dtype).requires_grad_(True)
    labels = torch.randint(0, weight.shape[0], (rows,), generator=generator)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        F.cross_entropy(head(states).float(), labels).backward()
        times.append(time.perf_counter() - start)
        states.grad = None
    return statistics.median(times[1:])


def worker(job_path: Path, out_path: Path) -> None:
    """The row process: run the job in a scratch directory, write its result atomically."""
    job = Job(**json.loads(job_path.read_text(encoding="utf-8")))
    with tempfile.TemporaryDirectory(prefix="training-cost-") as tmp:
        result = run_job(job, Path(tmp))
    save_json(out_path, result, indent=None)


# ---------------------------------------------------------------------------------------------- parent


@dataclass(frozen=True)
class Options:
    """Parsed command line."""

    smoke: bool
    out_dir: Path
    rows: tuple[str, ...]
    steps: int
    warmup_steps: int
    batch_size: int
    seq_len: int
    threads: int
    command: str
    rounds: int = 1
    denormals: str = "keep"


@contextlib.contextmanager
def assets(smoke: bool) -> Iterator[tuple[str, str, Path]]:
    """(base, data, scratch dir): SmolLM2 + shakespeare, or the toy base and toy LM data of tests/toy.py."""
    with tempfile.TemporaryDirectory(prefix="training-cost-") as tmp:
        scratch = Path(tmp)
        if not smoke:
            yield SMOLLM2, "shakespeare", scratch
            return
        from tests import toy

        base = toy.save_toy_base(scratch / "toy-base")
        yield str(base), str(toy.write_toy_data(scratch)["lm"]), scratch


def run_row(job: Job, scratch: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Run one row in its own process; returns (result, None) or (None, the error's last lines)."""
    job_path, out_path = scratch / f"{job.row}.job.json", scratch / f"{job.row}.result.json"
    job_path.write_text(json.dumps(dataclasses.asdict(job)), encoding="utf-8")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = run_module("benchmarks.training_cost", "--worker-job", str(job_path), str(out_path), env=env)
    if done.returncode != 0 or not out_path.exists():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        return None, f"exit code {done.returncode}: {tail}"
    return json.loads(out_path.read_text(encoding="utf-8")), None


def merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row's results over the rounds: measured steps pooled, first steps and memory from round 1."""
    first = results[0]
    aux = [r["aux_head_s"] for r in results if r["aux_head_s"] is not None]
    return {
        **first,
        "measured_s": [t for r in results for t in r["measured_s"]],
        "round_medians_s": [statistics.median(r["measured_s"]) for r in results],
        "aux_head_s": statistics.median(aux) if aux else None,
        "peak_rss_kb": max((r["peak_rss_kb"] for r in results if r["peak_rss_kb"] is not None), default=None),
    }


def summarise(result: dict[str, Any], ranks: dict[str, Any]) -> dict[str, Any]:
    """One table row from a worker result."""
    measured = result["measured_s"]
    widths = sorted({width for _, width, _ in result["batch_tokens"]})
    real = [n for _, _, n in result["batch_tokens"]]
    row = result["row"]
    return {
        **result,
        "label": LABELS[row],
        "rank": ranks[row]["rank"] if row in ("lora", "dora") else None,
        "s_per_step": statistics.median(measured),
        "s_per_step_mean": statistics.fmean(measured),
        "s_per_step_min": min(measured),
        "s_per_step_max": max(measured),
        "first_steps_s": result["step_s"][:5],
        "batch_widths": widths,
        "mean_real_tokens_per_batch": statistics.fmean(real) if real else None,
        "peak_rss_mb": None if result["peak_rss_kb"] is None else result["peak_rss_kb"] * 1024 / 1e6,
        "rss_loaded_mb": None if result["rss_loaded_kb"] is None else result["rss_loaded_kb"] * 1024 / 1e6,
    }


def target(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 6: ShadowPEFT's step <= 1.10x LoRA's at matched budget."""
    by_row = {r["row"]: r for r in rows}
    if "shadow" not in by_row or "lora" not in by_row:
        return {"text": "ShadowPEFT training step <= 1.10x LoRA", "value": None, "met": None, "missed_by": None}
    lora, shadow = by_row["lora"]["s_per_step"], by_row["shadow"]
    value = shadow["s_per_step"] / lora
    met = value <= TARGET_RATIO
    aux = shadow.get("aux_head_s")
    return {
        "text": "ShadowPEFT training step <= 1.10x LoRA at matched budget",
        "value": value,
        "threshold": TARGET_RATIO,
        "met": met,
        "missed_by": None if met else value / TARGET_RATIO - 1.0,
        "aux_head_s": aux,
        # The step without the shadow loss's head, against LoRA: what the rest of the adapter costs.
        "value_without_aux_head": None if aux is None else (shadow["s_per_step"] - aux) / lora,
    }


def denormal_effect(rows: list[dict[str, Any]], warmup_steps: int) -> dict[str, Any] | None:
    """The shadow row under each denormal policy: the first steps' mean (the trap shows early) and s/step."""
    by_row = {r["row"]: r for r in rows}
    if "shadow" not in by_row or "shadow-other-denormals" not in by_row:
        return None
    pair = (by_row["shadow"], by_row["shadow-other-denormals"])
    flushed, kept = sorted(pair, key=lambda r: not r["flush_denormal"])
    first = max(warmup_steps, 1) + 5
    early = {name: statistics.fmean(r["step_s"][:first]) for name, r in (("flushed", flushed), ("kept", kept))}
    return {
        "first_steps": first,
        "flushed_s": early["flushed"],
        "not_flushed_s": early["kept"],
        "ratio": early["kept"] / early["flushed"],
        "s_per_step_flushed": flushed["s_per_step"],
        "s_per_step_not_flushed": kept["s_per_step"],
    }


# --------------------------------------------------------------------------------------------- reports


def markdown_report(record: dict[str, Any]) -> str:
    """Settings, machine, the table, the target, the denormal trap, the method."""
    m, s = record["machine"], record["settings"]
    lines = [
        f"# Training cost: {record['model']}",
        "",
        f"Command: `{record['command']}`  ",
        f"Date: {record['date']} (elapsed {record['elapsed_s'] / 60:.1f} min)  ",
        f"Machine: {m['cpu_model']}, {m['physical_cores']} physical cores ({m['logical_cpus']} logical), "
        f"{m['platform']}; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
        f"shadow-peft {m['shadow-peft']}  ",
        f"Settings: data `{s['data']}`, batch {s['batch_size']} x {s['seq_len']} tokens, fp32, {s['threads']} torch "
        f"threads, {s['rounds']} interleaved rounds (rows run in order, then again), median of {s['steps']} steps "
        f"per round after {s['warmup_steps']} warm-up steps, pooled over the rounds, constant LR "
        f"(accuracy.py's per-method rates), denormal policy `{s.get('denormals', 'flush')}` for every row "
        "(`shadow-other-denormals`: the other one).",
        "",
        *[line for w in record["warnings"] for line in (f"**Warning:** {w}.", "")],
        "| row | method | trainable params | s/step | vs first | per-round medians, s | min-max s/step | "
        "first 5 steps, s | peak RSS MB | RSS after build MB | batch widths |",
        "|---|---|---:|---:|---:|---|---:|---|---:|---:|---|",
    ]
    first = record["rows"][0]["s_per_step"] if record["rows"] else 1.0
    for r in record["rows"]:
        rank = f" r={r['rank']}" if r["rank"] else ""
        early = ", ".join(f"{x:.2f}" for x in r["first_steps_s"])
        lines.append(
            f"| {r['row']} | {r['label']}{rank} | {r['trainable_params']:,} | {r['s_per_step']:.3f} | "
            f"{r['s_per_step'] / first:.3f}x | {', '.join(f'{x:.3f}' for x in r['round_medians_s'])} | "
            f"{r['s_per_step_min']:.3f}-{r['s_per_step_max']:.3f} | {early} | "
            f"{_num(r['peak_rss_mb'])} | {_num(r['rss_loaded_mb'])} | {r['batch_widths']} |"
        )
    t = record["target"]
    if t["value"] is not None:
        state = "**met**" if t["met"] else f"**missed** by {100 * t['missed_by']:.1f}%"
        lines += ["", f"Target: {t['text']}: {t['value']:.3f}x ({state})."]
        if t.get("aux_head_s") is not None:
            lines += [
                "",
                f"The shadow loss's head alone (shadow logits over the vocabulary, cross-entropy, gradient back "
                f"to s0; measured on the step's shapes in the shadow row's process) takes {t['aux_head_s']:.3f} s "
                f"per step; without it the step would be {t['value_without_aux_head']:.3f}x LoRA.",
            ]
    d = record["denormal"]
    if d is not None:
        lines += [
            "",
            f"Denormal policy (the shadow row under each): mean of the first {d['first_steps']} steps "
            f"{d['not_flushed_s']:.3f} s without flushing vs {d['flushed_s']:.3f} s with it ({d['ratio']:.2f}x)"
            + (
                f"; median s/step {d['s_per_step_not_flushed']:.3f} without vs {d['s_per_step_flushed']:.3f} with."
                if "s_per_step_flushed" in d
                else "."
            ),
        ]
    if record["failed"]:
        lines += ["", "Rows that failed:", ""] + [f"- {k}: {v}" for k, v in record["failed"].items()]
    lines += ["", "## Method", "", record["method"], ""]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def plot(record: dict[str, Any], path: Path) -> None:
    """Left: median s/step per row; right: every step's time, which shows the denormal trap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    bars = left.barh([r["row"] for r in rows][::-1], [r["s_per_step"] for r in rows][::-1], color="tab:blue")
    left.bar_label(bars, fmt="%.3g", fontsize=8, padding=2)
    left.set_xlabel("seconds per step (median)")
    left.margins(x=0.15)
    for r in rows:
        right.plot(range(1, len(r["step_s"]) + 1), r["step_s"], marker=".", label=r["row"])
    right.axvline(record["settings"]["warmup_steps"] + 0.5, color="grey", linestyle=":", linewidth=1)
    right.set_xlabel("step")
    right.set_ylabel("seconds")
    right.legend(fontsize=7)
    s = record["settings"]
    fig.suptitle(f"{record['model']}: batch {s['batch_size']} x {s['seq_len']}, {s['threads']} threads", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_outputs(record: dict[str, Any], out_dir: Path, stem: str) -> None:
    """JSON, markdown and chart, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(record, indent=2) + "\n"), (".md", markdown_report(record))):
        write_atomic(out_dir / f"{stem}{suffix}", text)
    if record["rows"]:
        plot(record, out_dir / f"{stem}.png")


# ------------------------------------------------------------------------------------------------ main

METHOD = __doc__.split("\n\n", 2)[2].rsplit("\n\nUsage::", 1)[0].replace("\n", " ")


def run_benchmark(opts: Options) -> dict[str, Any]:
    """Train every row in its own process and build the record."""
    started = time.perf_counter()
    rows, failed, contended = [], {}, []
    results: dict[str, list[dict[str, Any]]] = {row: [] for row in opts.rows}
    with assets(opts.smoke) as (base, data, scratch):
        ranks = accuracy.matched_ranks(base, accuracy.ShadowConfig())
        for round_index in range(opts.rounds):  # rows interleaved, so a drift of the machine hits them all
            for i, row in enumerate(opts.rows):
                if row in failed:
                    continue
                method = "shadow" if row.startswith("shadow") else row
                rank = ranks[row]["rank"] if row in ("lora", "dora") else None
                lr = accuracy.DEFAULT_LR.get(method, accuracy.DEFAULT_LR["shadow"])
                job = Job(
                    row,
                    base,
                    data,
                    opts.steps,
                    opts.warmup_steps,
                    opts.batch_size,
                    opts.seq_len,
                    opts.threads,
                    rank,
                    lr,
                    denormals=opts.denormals,
                )
                busy = decode_speed.busy_cores(0.1 if opts.smoke else 0.5)
                if busy is not None and busy >= decode_speed.BUSY_CORES:
                    contended.append(f"{row} ({busy:.2f})")
                result, error = run_row(job, scratch)
                where = f"[round {round_index + 1}/{opts.rounds}, row {i + 1}/{len(opts.rows)}] {row}"
                if result is None:
                    failed[row] = error
                    click.echo(f"{where}: FAILED", err=True)
                    continue
                results[row].append(result)
                click.echo(f"{where}: {statistics.median(result['measured_s']):.3f} s/step", err=True)
        rows = [summarise(merge_rounds(results[row]), ranks) for row in opts.rows if row not in failed]
    return {
        "benchmark": "training_cost",
        "smoke": opts.smoke,
        "model": "toy-llama (tests/toy.py)" if opts.smoke else SMOLLM2,
        "date": now(),
        "command": opts.command,
        "elapsed_s": time.perf_counter() - started,
        "settings": {
            "data": "toy lm (tests/toy.py)" if opts.smoke else data,
            **{
                k: getattr(opts, k)
                for k in ("steps", "warmup_steps", "batch_size", "seq_len", "threads", "rounds", "denormals")
            },
            "lr": accuracy.DEFAULT_LR,
        },
        "ranks": ranks,
        "machine": machine_info(opts.threads),
        "rows": rows,
        "target": target(rows),
        "denormal": denormal_effect(rows, opts.warmup_steps),
        "failed": failed,
        "warnings": [
            f"other processes kept cores busy just before rows {', '.join(contended)}: their s/step figures are "
            "contended (inflated and noisy); rerun on an idle machine"
        ]
        if contended
        else [],
        "method": METHOD,
    }


def _row_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    if value is None:
        return ROWS
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in ROWS]
    if bad or not items:
        raise click.BadParameter(f"{value!r}: expected a comma-separated subset of {', '.join(ROWS)}")
    return items


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--smoke", is_flag=True, help="Toy Llama and toy LM data of tests/toy.py, 3 steps.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=RESULTS_DIR)
@click.option("--rows", callback=_row_list, help=f"Comma-separated subset of {','.join(ROWS)} [all].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Measured steps per row [20; smoke 3].")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None, help="Dropped first steps [3; smoke 1].")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--seq-len", type=click.IntRange(min=2), default=64, show_default=True, help="Tokens per row (max_length)."
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads [physical cores; smoke 1].")
@click.option(
    "--rounds", type=click.IntRange(min=1), default=None, help="Passes over the rows, interleaved [2; smoke 1]."
)
@click.option(
    "--denormals",
    type=click.Choice(DENORMALS),
    default="keep",
    show_default=True,
    help="Denormal policy of every row: keep (torch's default) or flush (flush-to-zero); "
    "shadow-other-denormals runs the shadow under the other.",
)
@click.option("--worker-job", nargs=2, type=click.Path(dir_okay=False, path_type=Path), hidden=True)
@click.pass_context
def cli(ctx: click.Context, worker_job: tuple[Path, Path] | None, **o: Any) -> None:
    """Seconds per training step and peak memory of ShadowPEFT, LoRA and DoRA at matched budgets."""
    if worker_job:  # a row's own process (run_row): JOB.json OUT.json
        worker(*worker_job)
        return
    smoke = o["smoke"]
    opts = Options(
        smoke=smoke,
        out_dir=o["out_dir"],
        rows=o["rows"],
        steps=o["steps"] or (3 if smoke else 20),
        warmup_steps=o["warmup_steps"] if o["warmup_steps"] is not None else (1 if smoke else 3),
        batch_size=o["batch_size"],
        seq_len=o["seq_len"],
        threads=o["threads"] or (1 if smoke else physical_cores()),
        command=ctx.obj,
        rounds=o["rounds"] or (1 if smoke else 2),
        denormals=o["denormals"],
    )
    record = run_benchmark(opts)
    stem = "training_cost_smoke" if smoke else "training_cost"
    write_outputs(record, opts.out_dir, stem)
    click.echo(markdown_report(record).split("## Method")[0].rstrip())
    click.echo(f"wrote {opts.out_dir / stem}.json, .md and .png")
    if record["failed"]:
        raise click.ClickException(f"rows failed: {', '.join(record['failed'])} (see the report)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark CLI and return its exit code (0 only when every row was measured)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return run_cli(cli, argv, module="benchmarks.training_cost")


if __name__ == "__main__":
    sys.exit(main())

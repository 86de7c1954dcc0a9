"""Split decoding over a simulated network: how often the device must call the cloud, and what it costs.

A trained shadow (by default shakespeare continuation, the built-in ``shakespeare`` task: real
held-out text, answers of 64+ tokens) is exported as split graphs; the device runtime runs it
against shadow-serve's app in a thread of this process, over loopback HTTP, with a delay injected
before every HTTP request (a simulated round trip at unlimited bandwidth). Rows, each at every delay:

    detached      the device alone (no request at all)
    coupled       one request per token
    spec-k2/4/8   speculative split decoding: the shadow drafts k tokens, the cloud verifies them in one request
    spec-auto     the same with the draft length adapted to the acceptance (--draft-tokens auto)
    escalating    auto mode: the device while the shadow's confidence is at or above the threshold the
                  export carries from training (``escalation.json``), speculative rounds (auto k) below it

Per cell: end-to-end tokens/s (generated tokens / wall time of generate, prefill included), round
trips (HTTP requests: prompt, verify/step calls and the end of the sequence) per generated token,
bytes up and down per generated token, acceptance rate (accepted / drafted), mean tokens per verify
round, cloud fraction (tokens the attached model chose), and whether every prompt's greedy tokens
equal coupled mode's.

Usage::

    python -m benchmarks.split --checkpoint runs/shakespeare            # export, then every cell
    python -m benchmarks.split --checkpoint runs/shakespeare --resume   # continue after an interruption

Results: ``benchmarks/results/split.{json,md,png}``, rewritten (atomically) after every cell.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from benchmarks.harness import RESULTS_DIR, load_for_resume, machine_info, now, run_cli, save_figure, save_json
from shadowpeft.runtime.atomic import write_atomic

DELAYS_MS = (0.0, 20.0, 50.0, 100.0)
TARGETS = (
    "speculative greedy tokens identical to coupled on every prompt; round trips per generated token <= 0.4 "
    "(trained shadow); at 50 ms >= 2.5x coupled tokens/s; bytes per generated token <= coupled's"
)


@dataclass(frozen=True)
class Row:
    """One way of decoding: a runtime mode and its options."""

    id: str
    mode: str
    draft_tokens: int | str = 4
    escalating: bool = False


ROWS: tuple[Row, ...] = (
    Row("detached", "detached"),
    Row("coupled", "coupled"),
    Row("spec-k2", "speculative", 2),
    Row("spec-k4", "speculative", 4),
    Row("spec-k8", "speculative", 8),
    Row("spec-auto", "speculative", "auto"),
    Row("escalating", "auto", "auto", escalating=True),
)


@dataclass
class Cell:
    """One row at one delay, summed over the prompts."""

    row: str
    delay_ms: float
    prompts: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    round_trips: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    cloud_tokens: int = 0
    equal_to_coupled: int | None = None  # prompts whose tokens equal coupled's (greedy), None for coupled itself
    token_ids: list[list[int]] = dataclasses.field(default_factory=list)

    @property
    def figures(self) -> dict[str, float | None]:
        n = max(self.tokens, 1)
        return {
            "tokens_per_s": self.tokens / self.wall_s if self.wall_s else 0.0,
            "round_trips_per_token": self.round_trips / n,
            "bytes_up_per_token": self.bytes_sent / n,
            "bytes_down_per_token": self.bytes_received / n,
            "acceptance": self.accepted / self.drafted if self.drafted else None,
            "tokens_per_round": (self.accepted + self.rounds) / self.rounds if self.rounds else None,
            "cloud_fraction": self.cloud_tokens / n,
        }


def run_cell(export, url: str, token: str, row: Row, delay_ms: float, prompts, new_tokens: int, escalation) -> Cell:
    """Generates every prompt with ``row``'s mode through a client whose requests wait ``delay_ms`` first."""
    from benchmarks.speed_rows import delayed_transport
    from shadowpeft.runtime.client import BackboneClient
    from shadowpeft.runtime.generate import Generator
    from shadowpeft.runtime.sampling import SamplingConfig

    client = None
    if row.mode != "detached":
        transport = delayed_transport(delay_ms / 1000.0) if delay_ms else None
        client = BackboneClient(url, token=token, transport=transport)
    options: dict[str, Any] = {"draft_tokens": row.draft_tokens}
    if row.escalating:
        options["escalation"] = escalation
    generator = Generator(export, mode=row.mode, client=client, **options)
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    generator.generate([list(prompts[0])], SamplingConfig(max_new_tokens=4))  # warm-up (sessions, connection)
    cell = Cell(row.id, delay_ms)
    for prompt in prompts:
        started = time.perf_counter()
        (result,) = generator.generate([list(prompt)], sampling)
        cell.wall_s += time.perf_counter() - started
        cell.prompts += 1
        cell.tokens += len(result.token_ids)
        cell.round_trips += result.round_trips
        cell.bytes_sent += result.bytes_sent
        cell.bytes_received += result.bytes_received
        cell.drafted += result.drafted
        cell.accepted += result.accepted
        cell.rounds += result.rounds
        cell.cloud_tokens += sum(m != "detached" for m in result.modes)
        cell.token_ids.append(list(result.token_ids))
    if client is not None:
        client.close()
    return cell


def run_benchmark(
    export_dir: Path,
    prompts: Sequence[Sequence[int]],
    *,
    out: Path,
    settings: dict[str, Any],
    delays_ms: Sequence[float] = DELAYS_MS,
    rows: Sequence[Row] = ROWS,
    new_tokens: int = 64,
    threads: int = 2,
    escalate_below: float | None = None,
    resume: bool = False,
    command: str = "",
    progress=print,
) -> dict[str, Any]:
    """Every (delay, row) cell not yet in ``out/split.json``; rewrites the JSON, markdown and PNG after each."""
    from benchmarks.speed_rows import TOKEN, serving
    from shadowpeft.runtime.export_dir import open_export
    from shadowpeft.runtime.generate import default_policy

    json_path = out / "split.json"
    record = (load_for_resume(json_path, settings) if resume else None) or {
        "benchmark": "split",
        "started": now(),
        "settings": settings,
        "machine": machine_info(threads),
        "targets": TARGETS,
        "cells": [],
    }
    if command:
        record.setdefault("commands", []).append(command)
    done = {(c["row"], c["delay_ms"]) for c in record["cells"]}
    export = open_export(export_dir, threads=threads, spin_wait=False)
    escalation = default_policy(export)
    if escalate_below is not None:
        escalation = dataclasses.replace(escalation, threshold=escalate_below, source="--escalate-below")
    record["escalation"] = {
        "threshold": escalation.threshold,
        "source": escalation.source,
        "scope": escalation.scope,
        "cloud": escalation.cloud,
    }
    coupled_tokens = {c["delay_ms"]: c["token_ids"] for c in record["cells"] if c["row"] == "coupled"}
    with serving(export) as port:
        url = f"http://127.0.0.1:{port}"
        for delay in delays_ms:
            for row in rows:
                if (row.id, delay) in done:
                    continue
                started = time.perf_counter()
                cell = run_cell(export, url, TOKEN, row, delay, prompts, new_tokens, escalation)
                if row.id == "coupled":
                    coupled_tokens[delay] = cell.token_ids
                elif delay in coupled_tokens:
                    reference = coupled_tokens[delay]
                    cell.equal_to_coupled = sum(a == b for a, b in zip(cell.token_ids, reference, strict=True))
                entry = {**dataclasses.asdict(cell), **cell.figures}
                record["cells"].append(entry)
                record["updated"] = now()
                publish(record, out)
                figures = cell.figures
                progress(
                    f"{row.id:>10} @ {delay:>5g} ms: {figures['tokens_per_s']:7.1f} tok/s, "
                    f"{figures['round_trips_per_token']:.3f} round trips/token, cloud {figures['cloud_fraction']:.0%}"
                    + (
                        f", equal to coupled {cell.equal_to_coupled}/{cell.prompts}"
                        if cell.equal_to_coupled is not None
                        else ""
                    )
                    + f" ({time.perf_counter() - started:.0f} s)"
                )
    return record


# ------------------------------------------------------------------------------------------------ report


def publish(record: dict[str, Any], out: Path) -> None:
    """split.json, split.md and split.png under ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "split.json", record)
    write_atomic(out / "split.md", render_markdown(record).encode())
    plot(record, out / "split.png")


def cell_of(record: dict[str, Any], row: str, delay: float) -> dict[str, Any] | None:
    return next((c for c in record["cells"] if c["row"] == row and c["delay_ms"] == delay), None)


def verdicts(record: dict[str, Any]) -> list[str]:
    """The targets, judged on what the record holds."""
    lines = []
    speculative = [c for c in record["cells"] if c["row"].startswith("spec-")]
    if speculative:
        equal = all(c["equal_to_coupled"] == c["prompts"] for c in speculative if c["equal_to_coupled"] is not None)
        lines.append(
            f"- speculative greedy tokens identical to coupled on every prompt: **{'yes' if equal else 'NO'}**"
        )
        best = min(speculative, key=lambda c: c["round_trips_per_token"])
        met = "met" if best["round_trips_per_token"] <= 0.4 else "missed"
        lines.append(
            f"- round trips per generated token: best {best['round_trips_per_token']:.3f} ({best['row']}) "
            f"(target <= 0.4: **{met}**)"
        )
    coupled = cell_of(record, "coupled", 50.0)
    if coupled and speculative:
        at50 = [c for c in speculative if c["delay_ms"] == 50.0]
        if at50:
            best = max(at50, key=lambda c: c["tokens_per_s"])
            ratio = best["tokens_per_s"] / coupled["tokens_per_s"]
            met = "met" if ratio >= 2.5 else "missed"
            lines.append(
                f"- tokens/s at 50 ms: {best['row']} {best['tokens_per_s']:.1f} vs coupled "
                f"{coupled['tokens_per_s']:.1f} = **{ratio:.2f}x** (target >= 2.5x: **{met}**)"
            )
    for c in speculative:
        ref = cell_of(record, "coupled", c["delay_ms"])
        if ref is None:
            continue
        mine = c["bytes_up_per_token"] + c["bytes_down_per_token"]
        theirs = ref["bytes_up_per_token"] + ref["bytes_down_per_token"]
        if mine > theirs:
            lines.append(
                f"- bytes per token: {c['row']} @ {c['delay_ms']:g} ms {mine:.0f} > coupled {theirs:.0f} (**missed**)"
            )
            break
    else:
        if speculative:
            lines.append("- bytes per generated token no more than coupled's in every speculative cell: **met**")
    return lines


def render_markdown(record: dict[str, Any]) -> str:
    s = record["settings"]
    m = record["machine"]
    e = record.get("escalation", {})
    lines = [
        "# Split decoding over a simulated network",
        "",
        "Commands (in the order they ran): " + "; ".join(f"`{c}`" for c in record.get("commands", [])) + "  ",
        f"Machine: {m.get('cpu_model', '?')}, {m.get('physical_cores', '?')} cores, onnxruntime {s['threads']} "
        f"threads (device and in-thread server share them); {s.get('machine_note', '')}  ",
        f"Checkpoint: {s['checkpoint']} ({s['task']}); export {s['weights']} device graphs, fp32 cloud graph; "
        f"{s['prompts']} held-out prompts of {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens each, "
        "greedy.  ",
        f"Escalating row: threshold {e.get('threshold')} ({e.get('source')}), per token, speculative rounds "
        "(auto k).  ",
        f"Targets: {TARGETS}.",
        "",
        *verdicts(record),
        "",
        "| row | delay ms | tokens/s | round trips/token | bytes up/token | bytes down/token | acceptance "
        "| tokens/round | cloud fraction | equal to coupled |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(record["cells"], key=lambda c: (c["delay_ms"], [r.id for r in ROWS].index(c["row"]))):
        acceptance = "" if c["acceptance"] is None else f"{c['acceptance']:.2f}"
        per_round = "" if c["tokens_per_round"] is None else f"{c['tokens_per_round']:.2f}"
        equal = "" if c["equal_to_coupled"] is None else f"{c['equal_to_coupled']}/{c['prompts']}"
        lines.append(
            f"| {c['row']} | {c['delay_ms']:g} | {c['tokens_per_s']:.1f} | {c['round_trips_per_token']:.3f} "
            f"| {c['bytes_up_per_token']:.0f} | {c['bytes_down_per_token']:.0f} | {acceptance} | {per_round} "
            f"| {c['cloud_fraction']:.2f} | {equal} |"
        )
    lines += ["", f"Recorded {record.get('updated', record['started'])} (started {record['started']}).", ""]
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in ROWS:
        cells = sorted((c for c in record["cells"] if c["row"] == row.id), key=lambda c: c["delay_ms"])
        if cells:
            ax.plot([c["delay_ms"] for c in cells], [c["tokens_per_s"] for c in cells], marker="o", label=row.id)
    ax.set_xlabel("injected delay per round trip (ms)")
    ax.set_ylabel("generated tokens/s (end to end)")
    ax.set_yscale("log")
    ax.set_title("Split decoding: tokens/s against network delay")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- preparing


def prepare_export(checkpoint: Path, work: Path, weights: str, progress) -> Path:
    """The checkpoint's split export under ``work/export`` (reused when its manifest is there)."""
    from shadowpeft.export.pipeline import ExportOptions, export_checkpoint

    target = work / "export"
    if (target / "manifest.json").is_file():
        progress(f"reusing the export in {target}")
        return target
    work.mkdir(parents=True, exist_ok=True)
    options = ExportOptions(selections=("split",), weights=weights)
    export_checkpoint(
        checkpoint, target, options, progress=lambda stage, detail: progress(f"  export {stage}: {detail}")
    )
    return target


def heldout_prompts(export_dir: Path, data: str, count: int, prompt_tokens: int) -> list[list[int]]:
    """The first ``prompt_tokens`` tokens of the first ``count`` test texts long enough to hold them."""
    from shadowpeft.runtime.manifest import Manifest
    from shadowpeft.runtime.tokenizer import RuntimeTokenizer
    from shadowpeft.train.datasets import load_task_data

    task = load_task_data(data)
    tokenizer = RuntimeTokenizer.from_export(export_dir, Manifest.from_file(export_dir))
    prompts = []
    for example in task.test:
        text = getattr(example, "text", None) or getattr(example, "prompt", "")
        ids = tokenizer.encode(text, chat=False)
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == count:
            return prompts
    raise click.UsageError(f"Only {len(prompts)} test texts of {data!r} hold {prompt_tokens} tokens; ask for fewer.")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--data", default="shakespeare", show_default=True, help="Task whose test split gives the prompts.")
@click.option("--weights", default="int8", show_default=True, help="Device graphs' weight format.")
@click.option("--prompts", "prompt_count", default=8, show_default=True, type=click.IntRange(1))
@click.option("--prompt-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(2))
@click.option(
    "--delays", default="0,20,50,100", show_default=True, help="Injected ms per round trip, comma-separated."
)
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--escalate-below", type=click.FloatRange(0, 1), default=None, help="Override the export's threshold.")
@click.option("--note", default="idle machine, nothing else running", show_default=True, help="Machine state.")
@click.option("--work", type=click.Path(path_type=Path), default=RESULTS_DIR / ".split_work", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS_DIR, show_default=True)
@click.option("--resume/--no-resume", default=False, help="Continue the record in --out made with the same options.")
def main(
    checkpoint,
    data,
    weights,
    prompt_count,
    prompt_tokens,
    new_tokens,
    delays,
    threads,
    escalate_below,
    note,
    work,
    out,
    resume,
):
    """Split decoding modes at several network delays (see the module docstring)."""
    try:
        delays_ms = tuple(float(d) for d in delays.split(",") if d.strip())
    except ValueError:
        raise click.BadParameter(f"{delays!r}: give milliseconds separated by commas, e.g. 0,20,50,100.") from None
    export_dir = prepare_export(checkpoint, work, weights, click.echo)
    prompts = heldout_prompts(export_dir, data, prompt_count, prompt_tokens)
    settings = {
        "checkpoint": str(checkpoint),
        "task": data,
        "weights": weights,
        "prompts": prompt_count,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "delays_ms": list(delays_ms),
        "threads": threads,
        "escalate_below": escalate_below,
        "machine_note": note,
    }
    record = run_benchmark(
        export_dir,
        prompts,
        out=out,
        settings=settings,
        delays_ms=delays_ms,
        new_tokens=new_tokens,
        threads=threads,
        escalate_below=escalate_below,
        resume=resume,
        command=click.get_current_context().obj or "python -m benchmarks.split",
        progress=click.echo,
    )
    click.echo("\n".join(verdicts(record)))


if __name__ == "__main__":
    raise SystemExit(run_cli(main, None, module="benchmarks.split"))

"""Speed of every way to run a ShadowPEFT model, side by side, on SmolLM2-135M-Instruct (CPU).

Rows (all measured in one run on one machine; ratios against the first row):

    torch-published        published `shadow-peft` 0.1.1 with its KV cache (matching 1-layer shadow)
    torch-peft-tuner       the ShadowPEFT tuner shipped in `peft` 0.21.2, with its cache
    torch-attached         this project in PyTorch, cached, attached
    torch-detached         this project in PyTorch, cached, detached
    torch-base             the plain base model with its cache (the cost of a merged LoRA)
    ort-{plain,coupled,detached}-{fp32,int8,int4}
                           onnxruntime: the plain base graph, the coupled graph (shadow + base in one),
                           the detached graph (shadow alone), each fp32 / int8 / int4
    genai-plain-{fp32,int8,int4}
                           the anchor: the plain base built by onnxruntime-genai's model builder (fused
                           q/k/v MatMulNBits, GroupQueryAttention, SkipSimplifiedLayerNorm), its Generator
    split-loopback         device runtime (int8 device graphs) + shadow-serve in a thread, over loopback
    split-delay            the same with a simulated network delay per HTTP round trip (default 20 ms)

Figures per row: prefill tokens/s (default 128-token prompt), decode ms/token (default 128 new
tokens), peak resident memory of the row's own process, file sizes, weight bytes read per token
and the fraction of the measured memory bandwidth that decode reaches. Every row runs in its
own process (benchmarks/speed_rows.py), one after another, warm-up first, then ``--repeats``
timed repeats; the table reports medians. How each kind of row is timed is in METHOD below and
in the markdown report.

Usage::

    python -m benchmarks.speed                        # SmolLM2, roughly 20 minutes on 2 idle cores
    python -m benchmarks.speed --smoke --out /tmp/x   # toy Llama of tests/toy.py, 1-2 minutes
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from benchmarks import decode_speed, speed_bandwidth, speed_report, speed_rows
from benchmarks.harness import RESULTS_DIR, machine_info, now, physical_cores, run_cli, run_module

SMOLLM2 = "smollm2-135m-instruct"


METHOD = (
    "Each row runs in a fresh process of its own (benchmarks/speed_rows.py), rows one after another in table "
    "order; within a row: warm-up (one prefill-only and one full decode), then `repeats` timed repeats, each "
    "made of 3 prefill-only calls (the fastest counts: a stall in a short call would bias it) and one full "
    "decode of N new tokens. Figures are medians over repeats. "
    "**PyTorch rows** reuse benchmarks/decode_speed.py's row builders and timing: HF `generate` (greedy, EOS "
    "suppressed, KV cache on); prefill = `generate(max_new_tokens=1)` on the prompt; decode ms/token = "
    "(t(generate N) - t(generate 1)) / (N - 1), which includes generate's per-step overhead. torch runs with "
    "`--threads` threads and denormals flushed. "
    "**onnxruntime rows** run one graph in a bare greedy loop (numpy feeds, every declared output fetched, "
    "argmax of the last logits, KV outputs fed back): prefill = the first call over the whole prompt (the "
    "graphs return logits for every prompt position); decode ms/token = the other N - 1 calls / (N - 1). "
    "Sessions: CPU provider, intra-op threads = `--threads`, inter-op 1, full graph optimisation "
    "(runtime.export_dir.session_options). These processes never import torch. "
    "**Split rows** run the device runtime (runtime.generate.Generator, mode coupled: device/shadow and "
    "device/head in-process) against shadow-serve's app (runtime.server.create_app, cloud/backbone fp32) served "
    "by uvicorn in a thread of the same process, over loopback HTTP with BackboneClient (float16 tensors on "
    "the wire); prefill and decode are the Generator's own timings (first step / the other steps). The delayed "
    "row gives BackboneClient an httpx transport that sleeps the delay before every HTTP request (one request "
    "per decode step), i.e. a simulated round-trip latency with unlimited bandwidth; peak memory of split rows "
    "is device and server together. "
    "**Peak resident memory** is the peak resident set (VmHWM) of the row's own process (imports, model or "
    "sessions, and the run); **files** are the graph files with external data (split: device + cloud graphs; PyTorch "
    "attached/detached: the adapter checkpoint). Adapters are freshly initialised (W_up = 0, the identity), "
    "so attached rows must reproduce their reference row's greedy tokens ('tokens == reference'); speed does "
    "not depend on the weights' values. int8/int4 graphs are shadow-export's quantization passes "
    "(export.quantize.quantize_graph) applied to the validated fp32 export."
)


@dataclass(frozen=True)
class Options:
    """Parsed command line."""

    smoke: bool
    out_dir: Path
    repeats: int
    warmup: int
    new_tokens: int
    prompt_tokens: int
    threads: int
    delay_ms: float
    split_weights: str
    rows: tuple[str, ...] | None
    work: Path | None
    command: str


@contextlib.contextmanager
def work_directory(opts: Options) -> Iterator[Path]:
    """``--work`` (kept) or a temporary directory (removed) for the checkpoint and graphs."""
    if opts.work is not None:
        yield opts.work
        return
    with tempfile.TemporaryDirectory(prefix="speed-bench-") as tmp:
        yield Path(tmp)


def base_model(opts: Options, work: Path) -> str:
    """SmolLM2 by its built-in name, or (smoke) the toy Llama of tests/toy.py saved under ``work``."""
    if not opts.smoke:
        return SMOLLM2
    from tests import toy

    return str(toy.save_toy_base(work / "toy-base", hidden_size=64))  # heads of 16: GroupQueryAttention's least


def machine(threads: int) -> dict[str, Any]:
    """decode_speed's machine description plus onnxruntime's version and the RAM size."""
    import onnxruntime

    memory_kb = 0
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="utf-8") as handle:
        memory_kb = int(next(line for line in handle if line.startswith("MemTotal:")).split()[1])
    return {**machine_info(threads), "onnxruntime": onnxruntime.__version__, "memory_gb": memory_kb / 1e6}


def prepare(opts: Options, work: Path) -> Any:
    """Checkpoint and graphs (speed_prepare), built with ``--threads`` torch threads."""
    from benchmarks import speed_prepare as prep

    base = base_model(opts, work)
    with decode_speed.benchmark_settings(opts.threads):
        return prep.prepare(
            work / "assets",
            base,
            prompt_tokens=opts.prompt_tokens,
            smoke=opts.smoke,
            threads=opts.threads,
            progress=_say,
        )


def _say(text: str) -> None:
    click.echo(f"[prepare] {text}", err=True)


def run_row(job: Any, work: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Run one row in its own process; returns (raw result, None) or (None, the error's last lines)."""
    jobs = work / "jobs"
    jobs.mkdir(exist_ok=True)
    job_path, out_path = jobs / f"{job.row.id}.json", jobs / f"{job.row.id}.result.json"
    job_path.write_text(json.dumps(dataclasses.asdict(job)), encoding="utf-8")
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = run_module("benchmarks.speed_rows", str(job_path), str(out_path), env=env)
    if done.returncode != 0 or not out_path.exists():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        return None, f"exit code {done.returncode}: {tail}"
    return json.loads(out_path.read_text(encoding="utf-8")), None


def measure_rows(opts: Options, prepared: Any, work: Path) -> tuple[list[tuple[Any, dict]], dict[str, str], dict]:
    """Every selected row in table order; returns (spec, raw) pairs, failures, and per-row busy cores."""
    specs = speed_rows.rows(split_weights=opts.split_weights, delay_ms=opts.delay_ms)
    specs = [s for s in specs if opts.rows is None or s.id in opts.rows]
    measured, failed, busy = [], {}, {}
    for i, spec in enumerate(specs):
        job = speed_rows.Job(
            row=spec,
            base=prepared.base,
            prompt=prepared.prompt,
            new_tokens=opts.new_tokens,
            repeats=opts.repeats,
            warmup=opts.warmup,
            threads=opts.threads,
            graphs=prepared.graphs,
            exports=prepared.exports,
        )
        busy[spec.id] = decode_speed.busy_cores(0.1 if opts.smoke else 0.5)
        started = time.perf_counter()
        raw, error = run_row(job, work)
        took = time.perf_counter() - started
        if raw is None:
            failed[spec.id] = error
            click.echo(f"[row {i + 1}/{len(specs)}] {spec.id}: FAILED ({took:.0f} s)", err=True)
            continue
        ms = 1000 * sorted(raw["decode_s_per_token"])[len(raw["decode_s_per_token"]) // 2]
        click.echo(f"[row {i + 1}/{len(specs)}] {spec.id}: {ms:.2f} ms/token ({took:.0f} s)", err=True)
        measured.append((spec, raw))
    return measured, failed, busy


def row_files(spec: Any, prepared: Any) -> tuple[int | None, int | None]:
    """(file bytes, weight bytes per token) of a row: its graph(s); the adapter checkpoint for our PyTorch rows."""
    if spec.kind == "ort":
        path = Path(prepared.graphs[spec.target])
        return prepared.files[spec.target], speed_bandwidth.weight_bytes_per_token(path)
    if spec.kind == "genai":
        return prepared.files[spec.target], None
    if spec.kind == "split":
        device = prepared.files[f"split-{spec.target}-device"]
        return device + prepared.files[f"split-{spec.target}-cloud"], None
    if spec.target in ("attached", "detached"):
        return prepared.files["adapter-checkpoint"], None
    return None, None


def build_record(opts: Options, prepared: Any, bandwidth: dict, results: tuple, elapsed_s: float) -> dict[str, Any]:
    """The JSON record: settings, machine, bandwidth, rows with relations, targets, warnings."""
    measured, failed, busy = results
    rows = []
    for spec, raw in measured:
        row = speed_report.summarise_row(spec, raw, prompt_tokens=opts.prompt_tokens)
        row["file_bytes"], row["weight_bytes_per_token"] = row_files(spec, prepared)
        row["busy_cores_before"] = busy.get(spec.id)
        rows.append(row)
    speed_report.add_relations(rows, read_gb_s=bandwidth["read_gb_s"], eos_ids=prepared.eos_ids)
    contended = [r["id"] for r in rows if (r["busy_cores_before"] or 0) >= decode_speed.BUSY_CORES]
    warnings = []
    if contended:
        warnings.append(
            f"other processes kept >= {decode_speed.BUSY_CORES} cores busy just before rows {', '.join(contended)}: "
            "their timings are contended (inflated and noisy); rerun on an idle machine"
        )
    return {
        "benchmark": "speed",
        "smoke": opts.smoke,
        "model": "toy-llama (tests/toy.py)" if opts.smoke else SMOLLM2,
        "date": now(),
        "command": opts.command,
        "elapsed_s": elapsed_s,
        "prompt_tokens": opts.prompt_tokens,
        "new_tokens": opts.new_tokens,
        "repeats": opts.repeats,
        "warmup": opts.warmup,
        "threads": opts.threads,
        "delay_ms": opts.delay_ms,
        "split_weights": opts.split_weights,
        "machine": machine(opts.threads),
        "bandwidth": bandwidth,
        "weight_bytes_method": speed_bandwidth.WEIGHT_BYTES_METHOD,
        "eos_ids": list(prepared.eos_ids),
        "files": prepared.files,
        "plain_graph_max_abs_diff": prepared.plain_max_abs_diff,
        "rows": rows,
        "targets": speed_report.targets(rows),
        "failed": failed,
        "warnings": warnings,
        "method": METHOD,
    }


def run_benchmark(opts: Options) -> dict[str, Any]:
    """Prepare graphs, measure the bandwidth and every row, and write JSON, markdown and chart."""
    started = time.perf_counter()
    with work_directory(opts) as work:
        prepared = prepare(opts, work)
        click.echo("[bandwidth] measuring", err=True)
        bandwidth = speed_bandwidth.measure_bandwidth(opts.threads, array_mb=64 if opts.smoke else 1024)
        results = measure_rows(opts, prepared, work)
        record = build_record(opts, prepared, bandwidth, results, time.perf_counter() - started)
    speed_report.write_outputs(record, opts.out_dir, "speed_smoke" if opts.smoke else "speed")
    return record


def _row_ids(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    """``--rows a,b``: a subset of the row ids, checked."""
    if value is None:
        return None
    known = [s.id for s in speed_rows.rows(split_weights="int8", delay_ms=20.0)]
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in known]
    if bad or not items:
        raise click.BadParameter(f"{value!r}: expected a comma-separated subset of {', '.join(known)}")
    return items


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--smoke", is_flag=True, help="Toy Llama of tests/toy.py, 2 repeats, 16-token prompt, 8 new tokens.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=RESULTS_DIR)
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Timed repeats per row [5; smoke 2].")
@click.option("--warmup", type=click.IntRange(min=1), default=1, show_default=True, help="Warm-up runs per row.")
@click.option("--new-tokens", type=click.IntRange(min=2), default=None, help="New tokens [128; smoke 8].")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=None, help="Prompt tokens [128; smoke 16].")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch and onnxruntime threads [physical cores; smoke 1].",
)
@click.option(
    "--delay-ms", type=click.FloatRange(min=0), default=20.0, show_default=True, help="Injected delay per round trip."
)
@click.option("--split-weights", type=click.Choice(["fp32", "int8", "int4"]), default="int8", show_default=True)
@click.option("--rows", "rows", callback=_row_ids, help="Comma-separated subset of row ids [all].")
@click.option(
    "--work", type=click.Path(file_okay=False, path_type=Path), default=None, help="Keep graphs here [a temp dir]."
)
@click.pass_context
def cli(ctx: click.Context, **o: Any) -> None:
    """Prefill and decode speed, memory and file sizes of every ShadowPEFT runtime against the plain base."""
    smoke = o["smoke"]
    opts = Options(
        smoke=smoke,
        out_dir=o["out_dir"],
        repeats=o["repeats"] or (2 if smoke else 5),
        warmup=o["warmup"],
        new_tokens=o["new_tokens"] or (8 if smoke else 128),
        prompt_tokens=o["prompt_tokens"] or (16 if smoke else 128),
        threads=o["threads"] or (1 if smoke else physical_cores()),
        delay_ms=o["delay_ms"],
        split_weights=o["split_weights"],
        rows=o["rows"],
        work=o["work"],
        command=ctx.obj,
    )
    record = run_benchmark(opts)
    click.echo(speed_report.format_table(record))
    for warning in record["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    stem = "speed_smoke" if smoke else "speed"
    click.echo(f"wrote {opts.out_dir / stem}.json, .md and .png")
    if record["failed"]:
        raise click.ClickException(f"rows failed: {', '.join(record['failed'])} (see the report)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark CLI and return its exit code (0 only when every row was measured)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return run_cli(cli, argv, module="benchmarks.speed")


if __name__ == "__main__":
    sys.exit(main())

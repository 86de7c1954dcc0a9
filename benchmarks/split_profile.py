"""Where the time of one split decode step goes, per token, stage by stage (``benchmarks/split_stages.py``).

The split-loopback row of benchmarks/speed.py, instrumented: the device runtime
(``runtime.generate.Generator``, mode coupled) against shadow-serve's app in a thread of the same
process over loopback HTTP, every stage timed with ``time.perf_counter`` (device graphs, request
encoding, the HTTP round trip, the server's parse, validation, thread hand-off, backbone session,
response encoding and decoding, and what remains). Beside it, the same graphs timed alone (one
token after the same past), and the export's local coupled graph, so that the report separates
compute from what is not compute.

Per token = (stage total over a generation of N tokens - over a generation of 1) / (N - 1), so the
prompt, the handshake and the end of the sequence cancel out; the table is the repeat of median wall
time (its stages add up to its wall), every repeat is in the JSON.

Usage::

    python -m benchmarks.split_profile --export /path/to/export-int8    # SmolLM2 split export, ~3 minutes
    python -m benchmarks.split_profile                                  # exports SmolLM2 first (int8 device)
    python -m benchmarks.split_profile --smoke --out /tmp/x             # toy Llama of tests/toy.py, seconds
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from benchmarks import speed_rows, split_stages
from benchmarks import split_profile_report as report
from benchmarks.harness import RESULTS_DIR, physical_cores, run_cli

SMOLLM2 = "smollm2-135m-instruct"
ALONE_CALLS = 20  # one-token calls per graph timed alone; the median counts
_SPIN = {False: "no spin", True: "spinning"}
_CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class Settings:
    """What one profile runs."""

    prompt: tuple[int, ...]
    new_tokens: int
    repeats: int
    threads: int
    int8_backbone: bool = False  # also time an int8 copy of cloud/backbone alone (an estimate; see time_alone)
    spin_wait: bool = False  # onnxruntime's spin-waiting for the split sessions (the speed row: off)
    server: str = "thread"  # shadow-serve's app in a thread of this process (the speed row), or "process"
    wire: str = "http"  # BackboneClient's wire: "http" (the speed row) or "grpc"
    other_coupled: tuple[Path, ...] = ()  # more coupled graphs to time locally (e.g. the fp32 export's)


def profile_split(export_path: Path, settings: Settings) -> dict[str, Any]:
    """Profiles split decoding over loopback and times each graph alone; returns the record's measurements.

    Args:
        export_path: A split export (``device/shadow``, ``device/head``, ``cloud/backbone``; ``coupled`` optional).
        settings: Prompt, new tokens (>= 2), repeats, threads.
    """
    from shadowpeft.runtime.client import BackboneClient
    from shadowpeft.runtime.export_dir import open_export
    from shadowpeft.runtime.generate import Generator
    from shadowpeft.runtime.sampling import SamplingConfig

    n = settings.new_tokens
    # As speed_rows.measure_split: one export for both sides, no spin-waiting (runtime.export_dir.session_options)
    # unless --spin-wait asks for it (an experiment: the served graphs then spin as the local rows' do).
    export = open_export(export_path, threads=settings.threads, spin_wait=settings.spin_wait)
    clock = split_stages.StageClock()
    with _served(export, settings, clock) as (port, app):
        client = BackboneClient(f"{settings.wire}://127.0.0.1:{port}", token=speed_rows.TOKEN)
        generator = Generator(export, mode="coupled", client=client)

        def run(tokens: int) -> tuple[Any, float, dict[str, float]]:
            before, start = clock.snapshot(), time.perf_counter()
            (result,) = generator.generate([list(settings.prompt)], SamplingConfig(max_new_tokens=tokens))
            wall, after = time.perf_counter() - start, clock.snapshot()
            if len(result.token_ids) != tokens or set(result.modes) != {"coupled"}:
                raise RuntimeError(f"split run gave {len(result.token_ids)} tokens, modes {set(result.modes)}")
            return result, wall, {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}

        with split_stages.instrumented(clock, export=export, app=app, client=client):
            run(1)
            tokens = run(n)[0].token_ids  # warm-up
            per_repeat = []
            for _ in range(settings.repeats):
                _, wall1, raw1 = run(1)
                full, walln, rawn = run(n)
                raw = {k: (rawn.get(k, 0.0) - raw1.get(k, 0.0)) / (n - 1) for k in rawn}
                wall = (walln - wall1) / (n - 1)
                per_repeat.append(
                    {
                        "wall_s": wall,
                        "generator_decode_s": full.decode_s / (n - 1),
                        "stages_s": split_stages.stages(raw, wall, in_process=app is not None),
                        "raw_s": raw,
                    }
                )
        requests_per_token = (full.round_trips - 2) / (n - 1)  # the prompt's request and the end: 2
        bytes_per_token = ((full.bytes_sent, full.bytes_received), requests_per_token)
        client.close()
    alone = time_alone(export, export_path, settings)
    return {
        "tokens": tokens,
        "repeats": per_repeat,
        "median": median_repeat(per_repeat),
        "wire": {
            "dtype": str(client.dtype),
            "requests_per_token": bytes_per_token[1],
            "run_bytes_sent": bytes_per_token[0][0],
            "run_bytes_received": bytes_per_token[0][1],
        },
        "alone": alone,
    }


@contextlib.contextmanager
def _served(export: Any, settings: Settings, clock: split_stages.StageClock) -> Iterator[tuple[int, Any]]:
    """Yields (port, app): shadow-serve's app in a thread of this process (timed by ``clock``), or (port, None)
    for ``shadow-serve`` itself in a child process (as users run it: its own export, no CPU arena)."""
    from shadowpeft.runtime.server import ServerConfig, create_app

    grpc = settings.wire == "grpc"
    if settings.server == "thread":
        app = create_app(export, ServerConfig(speed_rows.TOKEN))
        timed = lambda inner: split_stages.TimedApp(inner, clock)  # noqa: E731
        with contextlib.ExitStack() as stack:
            if grpc:
                stack.enter_context(split_stages.grpc_servicer_timed(clock))
            port = stack.enter_context(speed_rows.serving(export, app=app, wrap=timed, grpc=grpc))
            yield (app.state.grpc_port if grpc else port), app
        return
    port, grpc_port = _free_port(), _free_port()
    code = "from shadowpeft.runtime.serve_cli import main; main()"
    args = [str(export.root), "--port", str(port), "--token", speed_rows.TOKEN, "--log-level", "warning"]
    args += ["--threads", str(settings.threads), *(["--grpc-port", str(grpc_port)] if grpc else [])]
    child = subprocess.Popen([sys.executable, "-c", code, *args])
    try:
        _wait_ready(port, child)
        yield (grpc_port if grpc else port), None
    finally:
        child.terminate()
        child.wait(30)


def _free_port() -> int:
    """A free port for the child (released just before it binds it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(port: int, child: subprocess.Popen) -> None:
    from shadowpeft.runtime.client import BackboneClient

    with BackboneClient(f"http://127.0.0.1:{port}", token=speed_rows.TOKEN, retries=0) as probe:
        deadline = time.monotonic() + 120
        while not probe.ready():
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"shadow-serve did not start (exit code {child.poll()})")
            time.sleep(0.2)


def median_repeat(per_repeat: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat of median wall time (the lower one of an even count): its stages add up to its wall, which
    per-stage medians would not."""
    ranked = sorted(per_repeat, key=lambda r: r["wall_s"])
    return ranked[(len(ranked) - 1) // 2]


# ----------------------------------------------------------------------------------------- graphs alone


def time_alone(export: Any, export_path: Path, settings: Settings) -> dict[str, Any]:
    """The local coupled graphs' decode (spinning, as the speed rows run them: the export's, then
    ``--coupled-graph``'s), then each split graph alone, one token after a past of the prompt plus half the new
    tokens, without spin-waiting (as served) and spinning, and last the export's coupled graph again (drift
    within the run shows as a difference between the two)."""
    import onnxruntime as ort

    from shadowpeft.runtime.contract import CLOUD_BACKBONE, COUPLED, DEVICE_HEAD, DEVICE_SHADOW
    from shadowpeft.runtime.export_dir import session_options

    past = len(settings.prompt) + settings.new_tokens // 2

    def session(path: Path, *, spin: bool, arena: bool = True) -> Any:
        options = session_options(settings.threads, spin_wait=spin, cpu_arena=arena)
        return ort.InferenceSession(str(path), options, providers=[_CPU])

    def decode(path: Path, name: str) -> None:
        graph = session(path, spin=True)
        runs = [speed_rows.greedy_graph(graph, settings.prompt, settings.new_tokens) for _ in range(2)]
        out[f"{name} decode"] = statistics.median(r[2] / (settings.new_tokens - 1) for r in runs)
        out[f"{name} tokens"] = runs[0][0]

    out: dict[str, Any] = {"past_tokens": past}
    coupled = export.root / export.graph(COUPLED).file if export.has(COUPLED) else None
    if coupled is not None:
        decode(coupled, "coupled local")
    for path in settings.other_coupled:  # e.g. the fp32 export's: the backbone at the cloud graph's precision
        decode(path, f"coupled {path}")
    for key in (DEVICE_SHADOW, DEVICE_HEAD, CLOUD_BACKBONE):
        for spin in (False, True):
            graph = (
                export.session(key)
                if spin == settings.spin_wait
                else session(export.root / export.graph(key).file, spin=spin)
            )
            out[f"{key} {_SPIN[spin]}"] = one_token_s(graph, export.graph(key), past)
            del graph
    # shadow-serve itself opens its graph without the CPU arena too (runtime/serve_cli.py).
    graph = session(export.root / export.graph(CLOUD_BACKBONE).file, spin=False, arena=False)
    out[f"{CLOUD_BACKBONE} no spin, no CPU arena (as shadow-serve)"] = one_token_s(
        graph, export.graph(CLOUD_BACKBONE), past
    )
    del graph
    if settings.int8_backbone and export.graph(CLOUD_BACKBONE).weights == "fp32":
        out.update(int8_backbone_alone(export, settings.threads, past))
    if coupled is not None:
        decode(coupled, "coupled local, again at the end,")
    return out


def int8_backbone_alone(export: Any, threads: int, past: int) -> dict[str, float]:
    """cloud/backbone quantized to int8 by the pass shadow-export runs on device graphs, timed alone.

    Not an export format (the pipeline keeps the cloud graph fp32): a temporary graph, to tell how much of
    the gap to the local int8 coupled graph is the backbone's weight precision.
    """
    import onnxruntime as ort

    from shadowpeft.export.quantize import quantize_graph
    from shadowpeft.runtime.contract import CLOUD_BACKBONE
    from shadowpeft.runtime.export_dir import session_options

    spec = export.graph(CLOUD_BACKBONE)
    with tempfile.TemporaryDirectory(prefix="split-profile-int8-") as tmp:
        dst = Path(tmp) / "backbone-int8.onnx"
        quantize_graph(export.root / spec.file, dst, weights="int8")
        out = {}
        for spin in (False, True):
            options = session_options(threads, spin_wait=spin)
            session = ort.InferenceSession(str(dst), options, providers=[_CPU])
            out[f"{CLOUD_BACKBONE} int8 {_SPIN[spin]}"] = one_token_s(session, spec, past)
            del session
    return out


def one_token_s(session: Any, spec: Any, past: int) -> float:
    """Median seconds of ``session.run`` for one token after ``past`` positions (zeros past, random inputs)."""
    from shadowpeft.runtime.contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, is_past_name

    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for item in session.get_inputs():
        dims = [1 if not isinstance(d, int) else d for d in item.shape]
        if is_past_name(item.name):
            dims[2] = past
        if item.name == ATTENTION_MASK:
            dims[1] = past + 1
        dtype = np.float16 if "float16" in item.type else np.float32
        if item.name in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS):
            value = np.ones(dims, dtype=np.int64)
            if item.name == POSITION_IDS:
                value *= past
        else:
            value = (rng.standard_normal(dims) * 0.1).astype(dtype)
        feeds[item.name] = value
    names = [o.name for o in session.get_outputs()]
    times = []
    for _ in range(ALONE_CALLS + 2):
        start = time.perf_counter()
        session.run(names, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


# ------------------------------------------------------------------------------------------------ setup


@contextlib.contextmanager
def smoke_export() -> Iterator[Path]:
    """The toy Llama of tests/toy.py exported with --split --coupled, device graphs int8, in a temp dir."""
    from tests import toy

    with tempfile.TemporaryDirectory(prefix="split-profile-") as tmp:
        work = Path(tmp)
        base = toy.save_toy_base(work / "toy-base", hidden_size=64)
        yield export_split(str(base), work, weights="int8")


def random_prompt(export_path: Path, tokens: int) -> tuple[int, ...]:
    """Seeded random ids of the export's vocabulary (the smoke prompt, as speed_prepare's smoke prompt)."""
    from shadowpeft.runtime.manifest import Manifest

    vocab = Manifest.from_file(export_path / "manifest.json").vocab_size or 32
    return tuple(int(i) for i in np.random.default_rng(0).integers(4, vocab, tokens))


def export_split(base: str, work: Path, *, weights: str) -> Path:
    """A fresh (W_up = 0) ShadowPEFT checkpoint of ``base`` exported --split --coupled, device graphs ``weights``."""
    import torch

    from shadowpeft import ShadowConfig, get_shadow_model
    from shadowpeft.checkpoint.store import save_shadow
    from shadowpeft.export.pipeline import ExportOptions, export_checkpoint, quantize_export
    from shadowpeft.train.jobs import load_base

    torch.manual_seed(0)  # as speed_prepare: the speed benchmark's adapter
    model = get_shadow_model(load_base(base, kind="lm")[0], ShadowConfig()).eval()
    save_shadow(model, work / "ckpt", base_ref=base)
    export_checkpoint(work / "ckpt", work / "export-fp32", ExportOptions(selections=("split", "coupled")))
    if weights == "fp32":
        return work / "export-fp32"
    quantize_export(work / "export-fp32", work / f"export-{weights}", weights=weights)
    return work / f"export-{weights}"


def machine_load() -> dict[str, Any]:
    """Load averages and the cores other processes kept busy (benchmarks.decode_speed.busy_cores)."""
    from benchmarks.decode_speed import BUSY_CORES, busy_cores

    busy = busy_cores(0.5)
    load = os.getloadavg()
    return {"loadavg": list(load), "busy_cores": busy, "shared": bool((busy or 0) >= BUSY_CORES or load[0] >= 1.3)}


# -------------------------------------------------------------------------------------------------- CLI


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--smoke", is_flag=True, help="Toy Llama of tests/toy.py (or --export's), random 16-token prompt, 8 new tokens."
)
@click.option("--export", "export_path", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A split export to profile [SmolLM2, exported into --work].")  # fmt: skip
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None, help="Export here [temp].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=RESULTS_DIR)
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Timed repeats [5; smoke 2].")
@click.option("--new-tokens", type=click.IntRange(min=2), default=None, help="New tokens [128; smoke 8].")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=None, help="Prompt tokens [128; smoke 16].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime threads [cores; smoke 1].")
@click.option(
    "--int8-backbone/--no-int8-backbone",
    default=True,
    show_default=True,
    help="Also time an int8 copy of an fp32 cloud/backbone alone (an estimate; shadow-export --quantize-cloud "
    "writes the real thing).",
)
@click.option(
    "--spin-wait/--no-spin-wait",
    default=False,
    show_default=True,
    help="Let the split sessions spin-wait (an experiment; shadow-serve and the speed row do not).",
)
@click.option(
    "--server",
    type=click.Choice(["thread", "process"]),
    default="thread",
    show_default=True,
    help="shadow-serve's app in a thread (the speed row; every stage timed) or shadow-serve in a process.",
)
@click.option(
    "--wire",
    type=click.Choice(["http", "grpc"]),
    default="http",
    show_default=True,
    help="BackboneClient's wire: KServe v2 over HTTP (the speed row) or over gRPC (shadow-serve --grpc-port).",
)
@click.option(
    "--coupled-graph",
    "other_coupled",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Another coupled graph to time locally, e.g. the fp32 export's coupled.onnx (repeatable).",
)
@click.pass_context
def cli(ctx: click.Context, **o: Any) -> None:
    """Per-token breakdown of a split decode step over loopback: compute vs everything else."""
    smoke = o["smoke"]
    threads = o["threads"] or (1 if smoke else physical_cores())
    with _export(o, smoke) as (path, prompt):
        new_tokens, repeats = o["new_tokens"] or (8 if smoke else 128), o["repeats"] or (2 if smoke else 5)
        settings = Settings(
            prompt,
            new_tokens,
            repeats,
            threads,
            o["int8_backbone"],
            o["spin_wait"],
            o["server"],
            o["wire"],
            tuple(o["other_coupled"]),
        )
        load_before = machine_load()
        measured = profile_split(path, settings)
        record = report.build_record(
            measured, settings, export=path, smoke=smoke, command=ctx.obj, load=(load_before, machine_load())
        )
    click.echo(report.format_table(record))
    stem = "split_profile_smoke" if smoke else "split_profile"
    report.write_outputs(record, o["out_dir"], stem)
    click.echo(f"wrote {o['out_dir'] / stem}.json and .md")


@contextlib.contextmanager
def _export(o: dict[str, Any], smoke: bool) -> Iterator[tuple[Path, tuple[int, ...]]]:
    """The export to profile and the prompt (SmolLM2: the speed benchmark's passage; smoke: random ids)."""
    with contextlib.ExitStack() as stack:
        path = o["export_path"]
        if path is None and smoke:
            path = stack.enter_context(smoke_export())
        elif path is None:
            work = o["work"] or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="split-profile-")))
            path = export_split(SMOLLM2, work, weights="int8")
        if smoke:
            yield path, random_prompt(path, o["prompt_tokens"] or 16)
            return
        from benchmarks.speed_prepare import prompt_ids

        yield path, prompt_ids(SMOLLM2, o["prompt_tokens"] or 128, smoke=False)


def main(argv: list[str] | None = None) -> int:
    """Run the profiler CLI; returns its exit code."""
    return run_cli(cli, argv, module="benchmarks.split_profile")


if __name__ == "__main__":
    sys.exit(main())

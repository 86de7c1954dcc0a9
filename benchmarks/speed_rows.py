"""One row of the speed benchmark, measured in a process of its own: ``python -m benchmarks.speed_rows JOB OUT``.

Each row runs in a fresh interpreter so that its peak resident memory (``ru_maxrss``) is its own,
and so that the onnxruntime rows never import torch (the runtime is torch-free; their memory is
what a device would need). This module imports only the standard library and the torch-free harness
at the top; a row imports what it uses.

Kinds of row:

    torch   benchmarks/decode_speed.py's row builders (published package, peft tuner, this project
            attached/detached, plain base) and its timing (HF ``generate``; decode cost
            ``(t(N) - t(1)) / (N - 1)``; prefill = fastest of 3 ``generate(1)`` calls per repeat).
    ort     one ONNX graph (plain base, coupled, detached) in a bare greedy loop: the prompt in one
            call, then one call per new token feeding the KV cache back; every declared output is
            fetched, as the runtime does.
    genai   the anchor: the plain base as onnxruntime-genai's model builder writes it, run by its own
            Generator (benchmarks/speed_genai.py).
    split   the device runtime (runtime.generate.Generator, mode="coupled") against shadow-serve's
            app (runtime.server.create_app) served by uvicorn in a thread of the same process, over
            loopback HTTP; optionally every HTTP round trip delayed by ``delay_ms`` in the client's
            transport (:class:`DelayedTransport`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import save_json

PREFILL_SAMPLES = 3  # prefill-only calls per repeat; the fastest counts (a stall would bias it)
TOKEN = "speed-benchmark-token-0123456789"


@dataclass(frozen=True)
class RowSpec:
    """One row of the table.

    Attributes:
        id: Short name (``torch-attached``, ``ort-coupled-int8``, ...).
        label: What the row runs, for the table.
        kind: ``torch``, ``ort`` or ``split``.
        target: torch: the decode_speed builder (``published``, ``peft``, ``attached``, ``detached``,
            ``base``); ort: the graph name in Prepared.graphs; split: the weight format of the export.
        reference: The row whose tokens this row must reproduce (``None``: no check).
        delay_ms: Injected delay per HTTP round trip (split rows).
        agreement_with: A row whose tokens this one's are compared with position by position (quantized
            anchors: the share of tokens before the first difference is reported, not required).
    """

    id: str
    label: str
    kind: str
    target: str
    reference: str | None = None
    delay_ms: float = 0.0
    agreement_with: str | None = None


def rows(*, split_weights: str, delay_ms: float) -> tuple[RowSpec, ...]:
    """Every row, in table order (ratios are taken against the first)."""
    table = [
        RowSpec(
            "torch-published", "shadow-peft 0.1.1 (published), PyTorch, KV cache", "torch", "published", "torch-base"
        ),
        RowSpec("torch-peft-tuner", "peft 0.21.2 ShadowPEFT tuner, PyTorch, its cache", "torch", "peft", "torch-base"),
        RowSpec("torch-attached", "shadowpeft attached, PyTorch, KV cache", "torch", "attached", "torch-base"),
        RowSpec("torch-detached", "shadowpeft detached, PyTorch, KV cache", "torch", "detached"),
        RowSpec("torch-base", "plain base model, PyTorch, KV cache", "torch", "base"),
    ]
    names = {"plain": "plain base", "coupled": "shadowpeft coupled graph", "detached": "shadowpeft detached graph"}
    for weights in ("fp32", "int8", "int4"):
        for graph, name in names.items():
            # fp32 graphs must give PyTorch's tokens; a quantized coupled graph the plain base's of its format.
            reference = {"plain": "torch-base", "coupled": "torch-base", "detached": "torch-detached"}[graph]
            if weights != "fp32":
                reference = f"ort-plain-{weights}" if graph == "coupled" else None
            table.append(
                RowSpec(
                    f"ort-{graph}-{weights}", f"{name}, onnxruntime {weights}", "ort", f"{graph}-{weights}", reference
                )
            )
    for weights in ("fp32", "int8", "int4"):  # the same coupled graph without onnxruntime's fused operators
        table.append(
            RowSpec(
                f"ort-coupled-std-{weights}",
                f"shadowpeft coupled graph, standard ONNX operators (--ops standard), onnxruntime {weights}",
                "ort",
                f"coupled-std-{weights}",
                "torch-base" if weights == "fp32" else f"ort-plain-{weights}",  # as the fused rows
            )
        )
    for weights in ("fp32", "int8", "int4"):  # the anchor: what a user would run for a merged LoRA
        table.append(
            RowSpec(
                f"genai-plain-{weights}",
                f"plain base, onnxruntime-genai model builder {weights} (fused graph, its Generator)",
                "genai",
                f"genai-{weights}",
                "torch-base" if weights == "fp32" else None,
                agreement_with=f"ort-plain-{weights}",
            )
        )
    device = f"device graphs {split_weights}, cloud fp32"
    table += [
        RowSpec(
            "split-loopback",
            f"split: device runtime + shadow-serve over loopback ({device})",
            "split",
            split_weights,
            "torch-base" if split_weights == "fp32" else None,  # int8/int4 device heads may pick other tokens
        ),
        RowSpec(
            "split-delay",
            f"split over loopback + {delay_ms:g} ms injected per round trip ({device})",
            "split",
            split_weights,
            "split-loopback",
            delay_ms,
        ),
    ]
    return tuple(table)


@dataclass(frozen=True)
class Job:
    """What a row's process is given (written as JSON by the parent)."""

    row: RowSpec
    base: str
    prompt: tuple[int, ...]
    new_tokens: int
    repeats: int
    warmup: int
    threads: int
    graphs: dict[str, str]
    exports: dict[str, str]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(**{**data, "row": RowSpec(**data["row"]), "prompt": tuple(data["prompt"])})


@dataclass
class Measured:
    """Raw timings of one row; seconds."""

    prefill_s: list[float] = field(default_factory=list)  # per repeat: fastest of PREFILL_SAMPLES
    decode_s_per_token: list[float] = field(default_factory=list)  # per repeat
    tokens: list[int] = field(default_factory=list)  # the greedy tokens (warm-up run)
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ torch


def measure_torch(job: Job) -> Measured:
    """A decode_speed row: build it on a fresh base, warm up, time ``repeats`` times."""
    import torch

    from benchmarks import decode_speed as speed
    from shadowpeft.train.jobs import load_base

    input_ids = torch.tensor([job.prompt])

    def fresh_base() -> Any:
        base = load_base(job.base, kind="lm")[0]
        torch.manual_seed(0)  # as speed_prepare does before wrapping: our rows get the exported adapter's weights
        return base

    setup = speed.Setup(job.base, fresh_base, input_ids, torch.ones_like(input_ids))
    builders = {
        "published": lambda: speed.build_published(setup, use_cache=True),
        "peft": lambda: speed.build_peft_tuner(setup),
        "attached": lambda: speed.build_ours(setup, mode="attached"),
        "detached": lambda: speed.build_ours(setup, mode="detached"),
        "base": lambda: speed.build_base(setup),
    }
    with speed.benchmark_settings(job.threads), torch.inference_mode():
        row = builders[job.row.target]()
        unavailable: dict[str, str] = {}
        for _ in range(job.warmup):
            outputs = speed.warm_up([row], setup, job.new_tokens, unavailable)
        if unavailable:
            raise RuntimeError(unavailable[row.id])
        result = speed.measure([row], setup, new_tokens=job.new_tokens, repeats=job.repeats)[0]
    return Measured(
        prefill_s=[ms / 1000.0 for ms in result.prefill_ms],
        decode_s_per_token=[ms / 1000.0 for ms in result.ms_per_token_runs(job.new_tokens)],
        tokens=outputs[row.id][0, len(job.prompt) :].tolist(),
        extra={"trainable_params": row.trainable_params},
    )


# -------------------------------------------------------------------------------------------------- ort


def greedy_graph(session: Any, prompt: tuple[int, ...], new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy decode with one graph: returns (tokens, prefill seconds, seconds of the other new_tokens - 1 steps)."""
    import numpy as np

    from shadowpeft.runtime.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, is_past_name
    from shadowpeft.runtime.kv import KVCache

    outputs = [o.name for o in session.get_outputs()]
    cache = KVCache(
        {
            i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
            for i in session.get_inputs()
            if is_past_name(i.name)
        }
    )
    ids = np.asarray([prompt], dtype=np.int64)
    total, tokens, times = ids.shape[1], [], []
    for _ in range(new_tokens):
        start = time.perf_counter()
        feeds = {
            INPUT_IDS: ids,
            ATTENTION_MASK: np.ones((1, total), dtype=np.int64),
            POSITION_IDS: np.arange(total - ids.shape[1], total, dtype=np.int64)[None],
        }
        token = int(cache.step(session, outputs, feeds)[LOGITS][0, -1].argmax())
        times.append(time.perf_counter() - start)
        tokens.append(token)
        ids, total = np.asarray([[token]], dtype=np.int64), total + 1
    return tokens, times[0], sum(times[1:])


def measure_ort(job: Job) -> Measured:
    """One graph in onnxruntime (CPU provider, ``threads`` intra-op threads, as the runtime opens it)."""
    import onnxruntime as ort

    from shadowpeft.runtime.export_dir import session_options

    path = job.graphs[job.row.target]
    session = ort.InferenceSession(path, session_options(job.threads), providers=["CPUExecutionProvider"])
    n = job.new_tokens
    for _ in range(job.warmup):
        greedy_graph(session, job.prompt, 1)
        tokens = greedy_graph(session, job.prompt, n)[0]
    measured = Measured(tokens=tokens)
    for _ in range(job.repeats):
        measured.prefill_s.append(min(greedy_graph(session, job.prompt, 1)[1] for _ in range(PREFILL_SAMPLES)))
        measured.decode_s_per_token.append(greedy_graph(session, job.prompt, n)[2] / (n - 1))
    return measured


def measure_genai(job: Job) -> Measured:
    """onnxruntime-genai's builder graph of the plain base with its own Generator (benchmarks/speed_genai.py)."""
    import onnxruntime_genai as og

    from benchmarks import speed_genai

    model = og.Model(job.graphs[job.row.target])
    n = job.new_tokens
    for _ in range(job.warmup):
        speed_genai.greedy(model, job.prompt, 1)
        tokens = speed_genai.greedy(model, job.prompt, n)[0]
    measured = Measured(tokens=tokens)
    for _ in range(job.repeats):
        measured.prefill_s.append(min(speed_genai.greedy(model, job.prompt, 1)[1] for _ in range(PREFILL_SAMPLES)))
        measured.decode_s_per_token.append(speed_genai.greedy(model, job.prompt, n)[2] / (n - 1))
    measured.extra = {"fused_ops": speed_genai.fused_ops(Path(job.graphs[job.row.target]))}
    return measured


# ------------------------------------------------------------------------------------------------ split


def delayed_transport(delay_s: float) -> Any:
    """An httpx transport that sleeps ``delay_s`` before every request: a simulated network round trip.

    It wraps the transport BackboneClient builds by default (TCP_NODELAY on), so the only
    difference from the loopback row is the sleep.
    """
    import socket

    import httpx

    class DelayedTransport(httpx.BaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            time.sleep(delay_s)
            return self.inner.handle_request(request)

        def close(self) -> None:
            self.inner.close()

    return DelayedTransport()


@contextlib.contextmanager
def serving(export: Any, *, app: Any = None, wrap: Any = None, grpc: bool = False) -> Iterator[int]:
    """shadow-serve's app on 127.0.0.1 (a free port) in a thread of this process; yields the port.

    Args:
        export: The opened export to serve.
        app: The app (``create_app(export, ...)``) if the caller made it; else one is made here.
        wrap: Called with the app, returns the ASGI app uvicorn serves (benchmarks/split_profile.py times it).
        grpc: Serve the gRPC service beside it on the same loop (its port: ``app.state.grpc_port``), as
            ``shadow-serve --grpc-port`` does.
    """
    import asyncio
    import socket
    import threading

    import uvicorn

    from shadowpeft.runtime.server import ServerConfig, create_app, serve, serving_options

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    app = app or create_app(export, ServerConfig(TOKEN))  # served as shadow-serve serves it (connection limits)
    served = wrap(app) if wrap is not None else app
    server = uvicorn.Server(uvicorn.Config(served, log_level="warning", **serving_options(app)))
    if grpc:  # one loop for both, as shadow-serve --grpc-port runs them
        from shadowpeft.runtime.grpc_server import GrpcOptions

        running = serve(server, grpc=GrpcOptions("127.0.0.1", 0), sockets=[sock])
        thread = threading.Thread(target=asyncio.run, args=(running,), daemon=True)
    else:
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the in-thread shadow-serve stopped before it started")
        time.sleep(0.005)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def measure_split(job: Job) -> Measured:
    """Coupled generation through the device runtime and a live in-thread shadow-serve."""
    from shadowpeft.runtime.client import BackboneClient
    from shadowpeft.runtime.export_dir import open_export
    from shadowpeft.runtime.generate import Generator
    from shadowpeft.runtime.sampling import SamplingConfig

    # As in shadow-serve and shadow-run coupled: no spin-waiting (runtime.export_dir.session_options).
    export = open_export(job.exports[job.row.target], threads=job.threads, spin_wait=False)
    n = job.new_tokens
    with serving(export) as port:
        transport = delayed_transport(job.row.delay_ms / 1000.0) if job.row.delay_ms else None
        client = BackboneClient(f"http://127.0.0.1:{port}", token=TOKEN, transport=transport)
        generator = Generator(export, mode="coupled", client=client)

        def run(tokens: int) -> Any:
            (result,) = generator.generate([list(job.prompt)], SamplingConfig(max_new_tokens=tokens))
            if len(result.token_ids) != tokens or set(result.modes) != {"coupled"}:
                raise RuntimeError(f"split run gave {len(result.token_ids)} tokens, modes {set(result.modes)}")
            return result

        for _ in range(job.warmup):
            run(1)
            warm = run(n)
        measured = Measured(tokens=warm.token_ids)
        for _ in range(job.repeats):
            prefill = min((run(1) for _ in range(PREFILL_SAMPLES)), key=lambda r: r.prefill_s)
            full = run(n)
            measured.prefill_s.append(prefill.prefill_s)
            measured.decode_s_per_token.append(full.decode_s / (n - 1))
        requests = client.requests
    measured.extra = {
        "wire_dtype": str(client.dtype),
        "bytes_sent_per_token": (full.bytes_sent - prefill.bytes_sent) / (n - 1),
        "bytes_received_per_token": (full.bytes_received - prefill.bytes_received) / (n - 1),
        "prefill_bytes_sent": prefill.bytes_sent,
        "http_requests_total": requests,
        "delay_ms_per_round_trip": job.row.delay_ms,
    }
    return measured


# ------------------------------------------------------------------------------------------------- main


def memory_kb(field: str) -> int | None:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process in KiB, None without /proc.

    ``VmHWM`` belongs to this program's address space. ``ru_maxrss`` would not do: Linux carries
    the parent's peak over into the child across fork and exec.
    """
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return None


def run_job(job: Job) -> dict[str, Any]:
    """Measure the job's row; the result dict also holds memory figures and whether torch was imported."""
    rss_start = memory_kb("VmRSS")
    start = time.perf_counter()
    measure = {"torch": measure_torch, "ort": measure_ort, "genai": measure_genai, "split": measure_split}[
        job.row.kind
    ]
    measured = measure(job)
    return {
        **asdict(measured),
        "wall_s": time.perf_counter() - start,
        "rss_start_kb": rss_start,
        "peak_rss_kb": memory_kb("VmHWM"),
        "torch_imported": "torch" in sys.modules,
        "pid": os.getpid(),
    }


def main(argv: list[str]) -> int:
    """``python -m benchmarks.speed_rows JOB.json OUT.json``: measure one row, write its result atomically."""
    job_path, out_path = Path(argv[0]), Path(argv[1])
    job = Job.from_dict(json.loads(job_path.read_text(encoding="utf-8")))
    result = run_job(job)
    save_json(out_path, result, indent=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

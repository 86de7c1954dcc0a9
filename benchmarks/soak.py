"""Soak test of ``shadow-serve``: good sessions and bad requests for N minutes against a live server.

The real ``shadow-serve`` runs as a subprocess on a free loopback port (random bearer token, a small
``--kv-budget`` and ``--idle-ttl`` so that the limits are exercised), its log captured to a file and
its resident memory (``VmRSS``) sampled every 0.2 s. Meanwhile, on threads of this process:

    good sessions   the device runtime (Generator, greedy) in coupled, speculative and auto mode on
                    random prompts; every generation's tokens are compared with the coupled tokens
                    computed for that prompt against the same server before the soak (auto mode with
                    no escalation threshold, so every step goes to the cloud; a generation during which
                    auto mode fell back to the device is counted, not compared)
    bad requests    malformed and deep JSON, huge integers, bad ``Inference-Header-Content-Length``,
                    wrong tensor shapes and dtypes, unknown sequences, stale offsets, requests over the
                    token cap, oversized bodies, wrong or missing tokens, ``text/plain`` from a foreign
                    Origin, trickled and half-open requests on raw sockets, bursts of short connections,
                    and sequence starts that are abandoned (they fill the session slots and KV budget)

Reported: HTTP statuses (good and bad apart), 503s with ``Retry-After`` (the admission limits' clear
"busy, retry" refusal, expected under load) apart from any other 5xx, refusals whose body is not a
JSON ``{"error": ...}``, wrong tokens, hangs (a generation over ``HANG_S``, a raw request the server
neither answered nor closed), errors, sessions still held after the idle TTL once everything ended
(leaks), ``Traceback`` lines in the server log, and peak RSS against the baseline RSS + the KV budget
(the budget bounds the KV cache, not the process: the comparison is peak - baseline vs the budget).

Usage::

    python -m benchmarks.soak --minutes 10                 # toy split export built in a temp dir
    python -m benchmarks.soak --minutes 10 --export DIR    # a real split export

Results: ``benchmarks/results/soak.{json,md}`` (written atomically at the end).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import httpx
import numpy as np

from benchmarks.harness import RESULTS_DIR, machine_info, now, run_cli, save_json
from shadowpeft.runtime.atomic import write_atomic

MODEL = "shadow-backbone"
INFER = f"/v2/models/{MODEL}/infer"
STATS = f"/v2/models/{MODEL}/stats"
MODES = ("coupled", "speculative", "auto")
HANG_S = 60.0  # a generation (or a raw request's answer) taking longer than this is a hang
RSS_PERIOD_S = 0.2
TOKEN_CAP = 512  # --max-tokens-per-request passed to the server
TARGETS = (
    "zero 5xx other than 503 + Retry-After (the admission limits' clear refusal); zero hangs; zero tracebacks "
    "in the server log; zero wrong tokens in the good sessions; zero leaked sessions; peak RSS - baseline RSS "
    'under the KV budget; every refusal (4xx/5xx) a JSON {"error": ...} message'
)


# ----------------------------------------------------------------------------------------------- tally


class Tally:
    """Thread-safe counters of everything the soak observes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.good_status: collections.Counter[str] = collections.Counter()
        self.bad_status: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.samples: dict[str, list[str]] = collections.defaultdict(list)  # a few examples per problem

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def note(self, problem: str, example: str) -> None:
        with self.lock:
            if len(self.samples[problem]) < 5:
                self.samples[problem].append(example[:300])

    def response(self, kind: str | None, status: int, headers: Any, body: bytes) -> None:
        """Counts a response (``kind`` None: a good session's) and checks a refusal's body and 5xx."""
        with self.lock:
            (self.good_status if kind is None else self.bad_status[kind])[str(status)] += 1
        where = kind or "good"
        if status >= 500:
            if status == 503 and headers.get("retry-after"):
                self.add("5xx_503_retry_after")
            elif status == 503:
                self.add("5xx_503_connections")
            else:
                self.add("5xx_unexpected")
                self.note("5xx_unexpected", f"{where}: {status} {body[:200]!r}")
        if status >= 400:
            if not _json_error(body):
                self.add("non_json_refusals")
                self.note("non_json_refusals", f"{where}: {status} {body[:200]!r}")


def _json_error(body: bytes) -> bool:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(value, dict) and isinstance(value.get("error"), str) and bool(value["error"].strip())


class CountingTransport(httpx.HTTPTransport):
    """An httpx transport that tallies the status of every response a good session receives."""

    def __init__(self, tally: Tally) -> None:
        super().__init__(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.tally = tally

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if response.status_code >= 400:
            response.read()
            self.tally.response(None, response.status_code, response.headers, response.content)
        else:
            with self.tally.lock:
                self.tally.good_status[str(response.status_code)] += 1
        return response


# ---------------------------------------------------------------------------------------------- server


class Sampler:
    """Samples a process's VmRSS every :data:`RSS_PERIOD_S` and the server's stats every second."""

    def __init__(self, pid: int, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.pid, self.stats = pid, stats
        self.peak_rss = self.baseline_rss = rss_bytes(pid) or 0
        self.peak_active = self.peak_kv = 0
        self.halfway: float | None = None  # monotonic time splitting the soak's halves (set when it starts)
        self.peak_halves = [0, 0]  # peak RSS in the first and the second half of the soak
        self.kv_budget = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="soak-sampler")

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        last_stats = 0.0
        while not self._stop.wait(RSS_PERIOD_S):
            rss = rss_bytes(self.pid) or 0
            self.peak_rss = max(self.peak_rss, rss)
            if self.halfway is not None:
                half = int(time.monotonic() >= self.halfway)
                self.peak_halves[half] = max(self.peak_halves[half], rss)
            if time.monotonic() - last_stats >= 1.0:
                last_stats = time.monotonic()
                seqs = (self.stats() or {}).get("sequences", {})
                self.peak_active = max(self.peak_active, int(seqs.get("active", 0)))
                self.peak_kv = max(self.peak_kv, int(seqs.get("kv_bytes", 0)))
                self.kv_budget = int(seqs.get("kv_budget_bytes", self.kv_budget))


def rss_bytes(pid: int) -> int | None:
    """The process's resident set size (``VmRSS`` of /proc/PID/status), or None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def build_toy_export(work: Path) -> Path:
    """The toy Llama of tests/toy.py, perturbed, exported as split graphs under ``work`` (torch needed)."""
    from transformers import AutoModelForCausalLM

    from shadowpeft import get_shadow_model
    from shadowpeft.checkpoint.store import save_shadow
    from shadowpeft.export.pipeline import ExportOptions, export_checkpoint
    from tests.conftest import perturb
    from tests.toy import save_toy_base

    base = save_toy_base(work / "base")
    model = perturb(get_shadow_model(AutoModelForCausalLM.from_pretrained(base)))
    save_shadow(model, work / "ckpt", base_ref=str(base))
    export_checkpoint(work / "ckpt", work / "export", ExportOptions(selections=("split",)))
    return work / "export"


# ----------------------------------------------------------------------------------------- good sessions


def reference_tokens(export, url: str, token: str, prompts, new_tokens: int) -> list[list[int]]:
    """Coupled greedy tokens per prompt, against the same server, before the soak starts."""
    from shadowpeft.runtime.client import BackboneClient
    from shadowpeft.runtime.generate import Generator
    from shadowpeft.runtime.sampling import SamplingConfig

    with BackboneClient(url, token=token, dtype="float32") as client:
        generator = Generator(export, mode="coupled", client=client)
        results = generator.generate([list(p) for p in prompts], SamplingConfig(max_new_tokens=new_tokens))
    return [list(r.token_ids) for r in results]


def good_worker(export, url, token, prompts, reference, new_tokens, until, tally: Tally, seed: int) -> None:
    """Generates random prompts in random modes until ``until``; compares every result with ``reference``."""
    from shadowpeft.runtime.client import BackboneClient
    from shadowpeft.runtime.escalation import EscalationPolicy
    from shadowpeft.runtime.generate import Generator
    from shadowpeft.runtime.sampling import SamplingConfig

    rng = random.Random(seed)
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    client = BackboneClient(
        url, token=token, dtype="float32", retries=8, backoff=0.05, transport=CountingTransport(tally)
    )
    try:
        while time.monotonic() < until:
            mode = rng.choice(MODES)
            options: dict[str, Any] = {"draft_tokens": rng.choice([2, 4, "auto"])}
            if mode == "auto":
                options |= {"escalation": EscalationPolicy(threshold=None), "cloud_wait_s": 30.0}
            index = rng.randrange(len(prompts))
            started = time.monotonic()
            try:
                (result,) = Generator(export, mode=mode, client=client, **options).generate([prompts[index]], sampling)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, the soak goes on
                tally.add("good_errors")
                with tally.lock:
                    tally.errors[type(exc).__name__] += 1
                tally.note("good_errors", f"{mode}: {type(exc).__name__}: {exc}")
                continue
            finally:
                if time.monotonic() - started > HANG_S:
                    tally.add("hangs")
                    tally.note("hangs", f"{mode} generation took {time.monotonic() - started:.1f} s")
            tally.add(f"good_{mode}")
            tally.add("good_generations")
            tally.add("good_tokens", len(result.token_ids))
            tally.add("good_restarts", result.restarts)
            if mode == "auto" and result.fallbacks:
                tally.add("auto_fallbacks")
                continue
            expected = reference[index]
            wrong = sum(a != b for a, b in zip(result.token_ids, expected, strict=False))
            wrong += abs(len(result.token_ids) - len(expected))
            if wrong:
                tally.add("wrong_tokens", wrong)
                tally.add("wrong_generations")
                tally.note("wrong_tokens", f"{mode} prompt {index}: {result.token_ids} != {expected}")
    finally:
        client.close()


# ------------------------------------------------------------------------------------------ bad requests


class Bad:
    """Sends one random bad request per :meth:`once` and tallies the answer."""

    def __init__(self, url: str, token: str, hidden: int, read_timeout: float, tally: Tally, seed: int) -> None:
        self.url, self.token, self.d, self.read_timeout, self.tally = url, token, hidden, read_timeout, tally
        self.host, self.port = url.removeprefix("http://").rsplit(":", 1)
        self.rng = random.Random(seed)
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0)
        self.kinds: dict[str, Callable[[], None]] = {
            name.removeprefix("kind_"): getattr(self, name) for name in sorted(dir(self)) if name.startswith("kind_")
        }

    def once(self) -> None:
        name = self.rng.choice(list(self.kinds))
        try:
            self.kinds[name]()
        except (httpx.HTTPError, OSError) as exc:
            self.tally.add("bad_transport_errors")
            with self.tally.lock:
                self.tally.bad_status[name][f"error:{type(exc).__name__}"] += 1

    def close(self) -> None:
        self.http.close()

    # ----- helpers
    def post(self, kind: str, body: bytes, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        response = self.http.post(INFER, content=body, headers=headers or {}, **kw)
        self.tally.response(kind, response.status_code, response.headers, response.content)
        return response

    def tensors(self, t: int, *, ids_dtype=np.int64, s0_dtype=np.float32, d: int | None = None):
        ids = np.asarray(self.rng.choices(range(5, 30), k=t), dtype=ids_dtype).reshape(1, t)
        return {"input_ids": ids, "shadow_states": np.zeros((1, t, d or self.d), dtype=s0_dtype)}

    def infer(self, kind: str, inputs, parameters: dict[str, Any], *, binary: bool = True) -> httpx.Response:
        from shadowpeft.runtime.protocol import HEADER_LENGTH, encode_request

        body, header = encode_request(inputs, parameters=parameters, binary=binary)
        headers = {HEADER_LENGTH: str(header), "Content-Type": "application/octet-stream"} if header else {}
        return self.post(kind, body, headers or {"Content-Type": "application/json"})

    def sid(self) -> int:
        return self.rng.randrange(1, 2**62)

    # ----- kinds (each a method named kind_*)
    def kind_malformed_json(self) -> None:
        self.post(
            "malformed_json", b'{"inputs": [{"name": "input_ids", "data": [1,', {"Content-Type": "application/json"}
        )

    def kind_deep_json(self) -> None:
        self.post("deep_json", b"[" * 200_000 + b"]" * 200_000, {"Content-Type": "application/json"})

    def kind_huge_integers(self) -> None:
        body = {
            "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 10**400], "data": [10**30]}],
            "parameters": {"sequence_id": 10**4000, "sequence_start": True},
        }
        self.post("huge_integers", json.dumps(body).encode(), {"Content-Type": "application/json"})

    def kind_bad_header_length(self) -> None:
        from shadowpeft.runtime.protocol import HEADER_LENGTH, encode_request

        body, _ = encode_request(self.tensors(2), parameters={"sequence_id": self.sid(), "sequence_start": True})
        value = self.rng.choice(["abc", "-1", "99999999999", "", "1e3", "0x10", str(len(body) + 1), "1" * 400])
        self.post("bad_header_length", body, {HEADER_LENGTH: value, "Content-Type": "application/octet-stream"})

    def kind_wrong_shape(self) -> None:
        inputs = self.tensors(3, d=self.d + 1)
        if self.rng.random() < 0.5:
            inputs = {"input_ids": np.zeros((2, 3), np.int64), "shadow_states": np.zeros((2, 3, self.d), np.float32)}
        self.infer("wrong_shape", inputs, {"sequence_id": self.sid(), "sequence_start": True})

    def kind_wrong_dtype(self) -> None:
        inputs = self.rng.choice([self.tensors(3, ids_dtype=np.float32), self.tensors(3, s0_dtype=np.int32)])
        self.infer("wrong_dtype", inputs, {"sequence_id": self.sid(), "sequence_start": True})

    def kind_unknown_sequence(self) -> None:
        self.infer("unknown_sequence", self.tensors(1), {"sequence_id": self.sid(), "sequence_offset": 5})

    def kind_stale_offset(self) -> None:
        sid = self.sid()
        self.infer("stale_offset_start", self.tensors(2), {"sequence_id": sid, "sequence_start": True})
        self.infer("stale_offset", self.tensors(1), {"sequence_id": sid, "sequence_offset": 100})
        self.infer("stale_offset_end", self.tensors(0), {"sequence_id": sid, "sequence_end": True})

    def kind_over_token_cap(self) -> None:
        self.infer("over_token_cap", self.tensors(TOKEN_CAP + 1), {"sequence_id": self.sid(), "sequence_start": True})

    def kind_oversized_body(self) -> None:
        if self.rng.random() < 0.5:  # a Content-Length far over the limit, with a short body behind it
            raw = self.raw(
                f"POST {INFER} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {self.token}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n{}"
            )
            self.raw_status("oversized_body", raw)
        else:  # a real body over --max-json-bytes (1 MiB)
            self.post(
                "oversized_body",
                b'{"inputs": [], "id": "' + b"x" * (2 << 20) + b'"}',
                {"Content-Type": "application/json"},
            )

    def kind_wrong_token(self) -> None:
        headers = self.rng.choice(
            [{"Authorization": "Bearer wrong"}, {"Authorization": ""}, {"Authorization": "Basic eA=="}]
        )
        with httpx.Client(base_url=self.url, timeout=30.0) as plain:
            response = plain.post(INFER, content=b"{}", headers={**headers, "Content-Type": "application/json"})
        self.tally.response("wrong_token", response.status_code, response.headers, response.content)

    def kind_foreign_origin(self) -> None:
        headers = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
        self.post("foreign_origin", b'{"inputs": []}', headers)

    def kind_trickle(self) -> None:  # partial headers, then silence: the server must answer 408 or close
        raw = self.raw(f"POST {INFER} HTTP/1.1\r\nHost: {self.host}\r\nContent-Le", hold=True)
        self.raw_status("trickle", raw)

    def kind_half_open(self) -> None:  # whole headers, a tenth of the body, then silence
        raw = self.raw(
            f"POST {INFER} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {self.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + "{" * 100,
            hold=True,
        )
        self.raw_status("half_open", raw)

    def kind_short_connections(self) -> None:
        for _ in range(20):
            raw = self.raw(
                f"GET /v2/health/live HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nConnection: close\r\n\r\n"
            )
            self.raw_status("short_connections", raw)

    def kind_abandoned_start(self) -> None:  # held until evicted (KV budget, slots) or expired (--idle-ttl)
        t = self.rng.choice([16, 128, TOKEN_CAP])
        self.infer("abandoned_start", self.tensors(t), {"sequence_id": self.sid(), "sequence_start": True})

    # ----- raw sockets
    def raw(self, text: str, *, hold: bool = False) -> bytes | None:
        """Sends ``text`` on a fresh connection; reads until closed. None: no answer nor close in time."""
        limit = (self.read_timeout + 10.0) if hold else 30.0
        with socket.create_connection((self.host, int(self.port)), timeout=limit) as sock:
            sock.sendall(text.encode())
            chunks: list[bytes] = []
            deadline = time.monotonic() + limit
            with contextlib.suppress(ConnectionResetError):
                while time.monotonic() < deadline:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        return None
                    if not chunk:
                        break
                    chunks.append(chunk)
                    if not hold and _complete(b"".join(chunks)):
                        break
            return b"".join(chunks)

    def raw_status(self, kind: str, raw: bytes | None) -> None:
        if raw is None:
            self.tally.add("hangs")
            self.tally.note("hangs", f"{kind}: no answer and no close within the read timeout + 10 s")
            with self.tally.lock:
                self.tally.bad_status[kind]["held"] += 1
            return
        if not raw:
            with self.tally.lock:
                self.tally.bad_status[kind]["closed"] += 1
            return
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        self.tally.response(kind, status, headers, body)


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def bad_worker(url, token, hidden, read_timeout, until, tally: Tally, seed: int) -> None:
    bad = Bad(url, token, hidden, read_timeout, tally, seed)
    try:
        while time.monotonic() < until:
            bad.once()
            tally.add("bad_requests")
    finally:
        bad.close()


# ------------------------------------------------------------------------------------------------- soak


def run_soak(
    export_dir: Path,
    *,
    minutes: float,
    out: Path,
    settings: dict[str, Any],
    command: str,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Runs the soak (see the module docstring), writes ``soak.{json,md}`` under ``out`` and returns the record."""
    from shadowpeft.demo.server import backbone_server
    from shadowpeft.runtime.client import BackboneClient
    from shadowpeft.runtime.export_dir import open_export

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "soak-server.log"
    started_at = now()
    options = [
        "--kv-budget", settings["kv_budget"],
        "--idle-ttl", str(settings["idle_ttl_s"]),
        "--max-sessions", str(settings["max_sessions"]),
        "--max-tokens-per-request", str(TOKEN_CAP),
        "--read-timeout", str(settings["read_timeout_s"]),
    ]  # fmt: skip
    tally = Tally()
    rng = random.Random(settings["seed"])
    prompts = [rng.choices(range(5, 30), k=rng.randint(3, 24)) for _ in range(settings["prompts"])]
    with backbone_server(export_dir, threads=1, log_path=log_path, options=options) as server:
        server.wait_ready(120.0)
        stats_client = BackboneClient(server.url, token=server.token, timeout=10.0, retries=0)

        def stats() -> dict[str, Any] | None:
            try:
                return stats_client.stats()
            except Exception:  # noqa: BLE001 - a missed sample is not an error of the server's
                return None

        sampler = Sampler(server.pid, stats).start()
        export = open_export(export_dir, threads=1)
        hidden = int(stats_client.metadata()["inputs"][1]["shape"][2])
        progress(f"server pid {server.pid} on {server.url}; baseline RSS {sampler.baseline_rss / 2**20:.1f} MiB")
        reference = reference_tokens(export, server.url, server.token, prompts, settings["new_tokens"])
        until = time.monotonic() + minutes * 60.0
        sampler.halfway = until - minutes * 30.0
        threads = [
            threading.Thread(
                target=good_worker,
                args=(export, server.url, server.token, prompts, reference, settings["new_tokens"], until, tally, i),
                name=f"good-{i}",
                daemon=True,
            )
            for i in range(settings["good_threads"])
        ] + [
            threading.Thread(
                target=bad_worker,
                args=(server.url, server.token, hidden, settings["read_timeout_s"], until, tally, 1000 + i),
                name=f"bad-{i}",
                daemon=True,
            )
            for i in range(settings["bad_threads"])
        ]
        for thread in threads:
            thread.start()
        while time.monotonic() < until:
            time.sleep(min(30.0, max(0.0, until - time.monotonic())))
            with tally.lock:
                counts = dict(tally.counts)
            progress(
                f"  {counts.get('good_generations', 0)} generations, {counts.get('bad_requests', 0)} bad requests, "
                f"{counts.get('wrong_tokens', 0)} wrong tokens, peak RSS {sampler.peak_rss / 2**20:.1f} MiB"
            )
        join_deadline = time.monotonic() + HANG_S + settings["read_timeout_s"] + 15.0
        for thread in threads:
            thread.join(max(0.0, join_deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            tally.add("hangs", len(stuck))
            tally.note("hangs", f"threads still running at the end: {', '.join(stuck)}")
        time.sleep(settings["idle_ttl_s"] + 2.0)  # abandoned sequences expire
        final = stats() or {}
        sampler.stop()
        stats_client.close()
        alive = server.running()
    tracebacks = sum("Traceback" in line for line in log_path.read_text(errors="replace").splitlines())
    record = {
        "benchmark": "soak",
        "started": started_at,
        "finished": now(),
        "command": command,
        "settings": {**settings, "minutes": minutes, "server_options": options, "export": str(settings["export"])},
        "machine": machine_info(1),
        "targets": TARGETS,
        "results": summarize(tally, sampler, final, tracebacks, alive, log_path),
    }
    record["verdicts"] = verdicts(record["results"])
    save_json(out / "soak.json", record)
    write_atomic(out / "soak.md", render_markdown(record).encode())
    return record


def summarize(tally: Tally, sampler: Sampler, final: dict[str, Any], tracebacks: int, alive: bool, log: Path):
    counts = tally.counts
    sequences = final.get("sequences", {})
    budget = sampler.kv_budget or int(sequences.get("kv_budget_bytes", 0))
    return {
        "good": {
            "generations": counts["good_generations"],
            "by_mode": {m: counts[f"good_{m}"] for m in MODES},
            "tokens": counts["good_tokens"],
            "restarts": counts["good_restarts"],
            "auto_fallbacks_not_compared": counts["auto_fallbacks"],
            "wrong_tokens": counts["wrong_tokens"],
            "wrong_generations": counts["wrong_generations"],
            "errors": counts["good_errors"],
            "errors_by_type": dict(tally.errors),
            "status": dict(sorted(tally.good_status.items())),
        },
        "bad": {
            "requests": counts["bad_requests"],
            "transport_errors": counts["bad_transport_errors"],
            "status_by_kind": {k: dict(sorted(v.items())) for k, v in sorted(tally.bad_status.items())},
        },
        "status_5xx": {
            "unexpected": counts["5xx_unexpected"],
            "503_retry_after": counts["5xx_503_retry_after"],
            "503_connections": counts["5xx_503_connections"],
        },
        "non_json_refusals": counts["non_json_refusals"],
        "hangs": counts["hangs"],
        "tracebacks": tracebacks,
        "server_alive_at_end": alive,
        "server_log": str(log),
        "leaked_sessions": sequences.get("active"),
        "final_stats": final,
        "memory": {
            "baseline_rss_bytes": sampler.baseline_rss,
            "peak_rss_bytes": sampler.peak_rss,
            "peak_minus_baseline_bytes": sampler.peak_rss - sampler.baseline_rss,
            "peak_rss_first_half_bytes": sampler.peak_halves[0],
            "peak_rss_second_half_bytes": sampler.peak_halves[1],
            "kv_budget_bytes": budget,
            "peak_kv_bytes": sampler.peak_kv,
            "peak_active_sessions": sampler.peak_active,
        },
        "examples": dict(tally.samples),
    }


def verdicts(results: dict[str, Any]) -> dict[str, bool]:
    memory = results["memory"]
    return {
        "zero unexpected 5xx (503 + Retry-After excluded)": results["status_5xx"]["unexpected"] == 0,
        "zero hangs": results["hangs"] == 0,
        "zero tracebacks in the server log": results["tracebacks"] == 0,
        "zero wrong tokens": results["good"]["wrong_tokens"] == 0,
        "zero leaked sessions": results["leaked_sessions"] == 0,
        "peak RSS - baseline RSS < KV budget": memory["peak_minus_baseline_bytes"] < memory["kv_budget_bytes"],
        "peak KV bytes <= KV budget": memory["peak_kv_bytes"] <= memory["kv_budget_bytes"],
        "no RSS growth after the first half (second half's peak <= first half's + 5%)": memory[
            "peak_rss_second_half_bytes"
        ]
        <= 1.05 * memory["peak_rss_first_half_bytes"],
        "every refusal a JSON error message": results["non_json_refusals"] == 0,
        "server alive at the end": results["server_alive_at_end"],
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def render_markdown(record: dict[str, Any]) -> str:
    r, s = record["results"], record["settings"]
    good, memory = r["good"], r["memory"]
    lines = [
        "# shadow-serve soak",
        "",
        f"Run {record['started']} to {record['finished']}: `{record['command']}`",
        "",
        f"Settings: {s['minutes']:g} min, export `{s['export']}`, {s['good_threads']} good-session threads, "
        f"{s['bad_threads']} bad-request threads, {s['prompts']} prompts, {s['new_tokens']} new tokens; "
        f"server options `{' '.join(s['server_options'])}`.",
        "",
        f"Machine: {record['machine']['cpu_model']}, {record['machine']['logical_cpus']} logical CPUs. "
        f"{s.get('note', '')}",
        "",
        "## Good sessions",
        "",
        "| generations | coupled | speculative | auto | tokens | wrong tokens | errors | re-prefills | "
        "auto fallbacks (not compared) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {good['generations']} | {good['by_mode']['coupled']} | {good['by_mode']['speculative']} | "
        f"{good['by_mode']['auto']} | {good['tokens']} | {good['wrong_tokens']} | {good['errors']} | "
        f"{good['restarts']} | {good['auto_fallbacks_not_compared']} |",
        "",
        "Statuses of the good sessions' responses: "
        + ", ".join(f"{k}: {v}" for k, v in good["status"].items())
        + (f"; errors by type: {good['errors_by_type']}" if good["errors_by_type"] else ""),
        "",
        "## Bad requests",
        "",
        f"{r['bad']['requests']} bad requests ({r['bad']['transport_errors']} transport errors on the client side).",
        "",
        "| kind | statuses |",
        "|---|---|",
    ]
    for kind, statuses in r["bad"]["status_by_kind"].items():
        lines.append(f"| {kind} | {', '.join(f'{k}: {v}' for k, v in statuses.items())} |")
    lines += [
        "",
        "`closed`: the server closed the connection without an answer; `held`: neither answer nor close in time "
        "(a hang).",
        "",
        "## Server",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| unexpected 5xx (500s, 503 without Retry-After from a request) | {r['status_5xx']['unexpected']} |",
        f"| 503 + Retry-After (admission limits: busy, retry; expected) | {r['status_5xx']['503_retry_after']} |",
        f"| 503 connection limit (--max-connections) | {r['status_5xx']['503_connections']} |",
        f"| refusals without a JSON error message | {r['non_json_refusals']} |",
        f"| hangs | {r['hangs']} |",
        f"| Traceback lines in the server log | {r['tracebacks']} |",
        f"| sessions held after the idle TTL (leaks) | {r['leaked_sessions']} |",
        f"| peak active sessions | {memory['peak_active_sessions']} |",
        f"| peak KV bytes held / KV budget | {_mib(memory['peak_kv_bytes'])} / {_mib(memory['kv_budget_bytes'])} |",
        f"| baseline RSS (ready, before any request) | {_mib(memory['baseline_rss_bytes'])} |",
        f"| peak RSS | {_mib(memory['peak_rss_bytes'])} |",
        f"| peak RSS - baseline RSS (vs the KV budget) | {_mib(memory['peak_minus_baseline_bytes'])} |",
        f"| peak RSS, first half / second half of the soak | {_mib(memory['peak_rss_first_half_bytes'])} / "
        f"{_mib(memory['peak_rss_second_half_bytes'])} |",
        "",
        "The KV budget bounds the sessions' KV cache, not the process: the memory target compares the growth of "
        "the server's RSS over its baseline (sampled every 0.2 s) with the budget. That growth also holds what "
        "the budget does not cover (request bodies and outputs in flight, onnxruntime's arena, Python's heap), "
        "a roughly fixed amount: with a budget smaller than it (the toy's default 1 MiB, which the abandoned "
        "sequences do fill) this target is missed by construction, and the halves' peaks (no growth after the "
        "first half: no leak) are the telling figures.",
        "",
        "## Targets",
        "",
        f'Targets: {record["targets"]}. "Zero 5xx" means no 500 and no 5xx other than the admission limits\' '
        "503 + Retry-After (and the connection limit's 503), which are clear refusals.",
        "",
    ]
    lines += [f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in record["verdicts"].items()]
    if r["examples"]:
        lines += ["", "## Examples of problems", ""]
        for problem, examples in r["examples"].items():
            lines += [f"- {problem}: `{e}`" for e in examples]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- CLI


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--minutes", default=10.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option(
    "--export",
    "export_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="A split export (default: the toy of tests/toy.py, exported in a temp dir; needs torch).",
)
@click.option(
    "--kv-budget",
    default=None,
    help="shadow-serve --kv-budget. Default: 64MiB with --export, 1MiB for the toy (384 bytes of KV per token), "
    "small enough that the abandoned sequences fill it.",
)
@click.option("--idle-ttl", "idle_ttl_s", default=2.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--max-sessions", default=16, show_default=True, type=click.IntRange(1))
@click.option("--read-timeout", "read_timeout_s", default=3.0, show_default=True, type=click.FloatRange(0.1))
@click.option("--good-threads", default=3, show_default=True, type=click.IntRange(1))
@click.option("--bad-threads", default=3, show_default=True, type=click.IntRange(1))
@click.option("--prompts", default=8, show_default=True, type=click.IntRange(1))
@click.option("--new-tokens", default=16, show_default=True, type=click.IntRange(2))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--note", default="", help="Machine state, recorded.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS_DIR, show_default=True)
@click.pass_obj
def main(command, minutes, export_dir, out, **settings):
    """Soak test of shadow-serve: good sessions and bad requests for --minutes (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="soak-") as work:
        settings["export"] = str(export_dir) if export_dir else "toy (tests/toy.py, perturbed, split fp32)"
        settings["kv_budget"] = settings["kv_budget"] or ("64MiB" if export_dir else "1MiB")
        if export_dir is None:
            click.echo("building the toy split export ...")
            export_dir = build_toy_export(Path(work))
        record = run_soak(
            export_dir, minutes=minutes, out=out, settings=settings, command=command or "", progress=click.echo
        )
    click.echo(render_markdown(record))
    return 0 if all(record["verdicts"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(run_cli(main, None, module="benchmarks.soak", interrupted="soak interrupted"))

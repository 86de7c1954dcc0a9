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
(leaks), ``Traceback`` lines in the server log, and peak RSS against ``--memory-budget`` (the server's
bound on its whole RSS) and peak KV bytes against ``--kv-budget``. The server runs with small
``--max-concurrent`` and ``--max-queued`` and the bad requests include bursts of slow requests, so that
the busy refusal (503 + ``Retry-After``) is exercised and the good sessions' clients must honour it.

Usage::

    python -m benchmarks.soak --minutes 10                 # toy split export built in a temp dir
    python -m benchmarks.soak --minutes 10 --export DIR    # a real split export

Results: ``benchmarks/results/soak.{json,md}`` (written atomically at the end).
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from benchmarks.harness import RESULTS_DIR, machine_info, now, run_cli, save_json
from benchmarks.soak_bad import bad_worker
from benchmarks.soak_report import TARGETS, render_markdown, summarize, verdicts
from benchmarks.soak_tally import (
    HANG_S,
    MAX_CONCURRENT,
    MAX_QUEUED,
    MODES,
    RSS_PERIOD_S,
    TOKEN_CAP,
    CountingTransport,
    Tally,
)
from shadowpeft.runtime.atomic import write_atomic

# ---------------------------------------------------------------------------------------------- server


class Sampler:
    """Samples a process's VmRSS every :data:`RSS_PERIOD_S` and the server's stats every second."""

    def __init__(self, pid: int, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.pid, self.stats = pid, stats
        self.peak_rss = self.baseline_rss = rss_bytes(pid) or 0
        self.peak_active = self.peak_kv = 0
        self.halfway: float | None = None  # monotonic time splitting the soak's halves (set when it starts)
        self.peak_halves = [0, 0]  # peak RSS in the first and the second half of the soak
        self.last_rss = self.baseline_rss  # the latest sample: at rest once everything ended (the leak check)
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
            self.peak_rss, self.last_rss = max(self.peak_rss, rss), rss
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
        "--max-concurrent", str(MAX_CONCURRENT),
        "--max-queued", str(MAX_QUEUED),
        "--memory-budget", settings["memory_budget"],
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
@click.option(
    "--memory-budget",
    default=None,
    help="shadow-serve --memory-budget, the bound on the server's RSS. Default: 4GiB with --export, 256MiB for toy.",
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
        settings["memory_budget"] = settings["memory_budget"] or ("4GiB" if export_dir else "256MiB")
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

"""The soak test's summary, verdicts against its targets, and markdown report (benchmarks/soak.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.soak_tally import MODES, Tally

if TYPE_CHECKING:
    from benchmarks.soak import Sampler

TARGETS = (
    "zero 5xx other than 503 + Retry-After (the admission limits' clear refusal); zero hangs; zero tracebacks "
    "in the server log; zero wrong tokens in the good sessions; zero leaked sessions; peak RSS under the "
    'configured --memory-budget throughout; every refusal (4xx/5xx) a JSON {"error": ...} message'
)


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
            "rss_at_rest_after_bytes": sampler.last_rss,  # every request ended and the idle TTL passed
            "kv_budget_bytes": budget,
            "memory_budget_bytes": (final.get("memory") or {}).get("budget_bytes"),
            "server_plan": final.get("memory"),
            "memory_refusals": (final.get("refused") or {}).get("memory"),
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
        "peak RSS <= --memory-budget": memory["memory_budget_bytes"] is not None
        and memory["peak_rss_bytes"] <= memory["memory_budget_bytes"],
        "peak KV bytes <= KV budget": memory["peak_kv_bytes"] <= memory["kv_budget_bytes"],
        "no leak: RSS at rest after the soak <= the first half's peak": memory["rss_at_rest_after_bytes"]
        <= memory["peak_rss_first_half_bytes"],
        "every refusal a JSON error message": results["non_json_refusals"] == 0,
        "server alive at the end": results["server_alive_at_end"],
    }


def _plan(plan: dict[str, Any] | None) -> str:
    if not plan:
        return "none (no --memory-budget)"
    return f"{_mib(plan['baseline_bytes'])} + KV + in flight x {_mib(plan['reserve_per_request_bytes'])}"


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
        f"| peak RSS - baseline RSS | {_mib(memory['peak_minus_baseline_bytes'])} |",
        f"| --memory-budget (whole process) | {_mib(memory['memory_budget_bytes'] or 0)} |",
        f"| server's plan: graphs + KV budget + in flight x reserve per request | {_plan(memory['server_plan'])} |",
        f"| requests refused for memory (503 + Retry-After) | {memory['memory_refusals']} |",
        f"| peak RSS, first half / second half of the soak | {_mib(memory['peak_rss_first_half_bytes'])} / "
        f"{_mib(memory['peak_rss_second_half_bytes'])} |",
        f"| RSS at rest after the soak (requests ended, idle TTL passed) | "
        f"{_mib(memory['rss_at_rest_after_bytes'])} |",
        "",
        "The KV budget bounds the sessions' KV cache; --memory-budget bounds the whole process: the server "
        "measured its graphs and one largest request at start, refused to start unless graphs + KV budget + "
        "--max-concurrent requests fit, and admits a request only while its RSS leaves room for it (503 + "
        "Retry-After otherwise). RSS is sampled here every 0.2 s from outside the server. The halves' peaks move "
        "with what happens to coincide (a burst beside 512-token abandoned starts); the leak check is the RSS at "
        "rest once every request ended and the idle sessions expired, against the first half's peak.",
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

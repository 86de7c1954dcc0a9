"""The split profile's record (JSON) and its per-token table (markdown): benchmarks/split_profile.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.harness import machine_info, now, save_json
from benchmarks.split_stages import PROCESS_STAGES, STAGES

NOTE_PRECISION = (
    "This export's cloud/backbone is fp32 (shadow-export's default) while the local coupled graph is quantized "
    "throughout; `shadow-export --quantize-cloud` (or quantize_export(..., cloud=True)) gives the backbone the "
    "device graphs' weight format, for a comparison at the same precision."
)


def build_record(
    measured: dict[str, Any],
    settings: Any,
    *,
    export: Path,
    smoke: bool,
    command: str,
    load: tuple[dict[str, Any], dict[str, Any]],
) -> dict[str, Any]:
    """The JSON record: settings, machine, load before and after, the per-token stages and the graphs alone."""
    import onnxruntime

    from shadowpeft.runtime.manifest import Manifest

    manifest = Manifest.from_file(export / "manifest.json")
    weights = {key: graph.weights for key, graph in manifest.graphs.items()}
    median, alone = measured["median"], measured["alone"]
    wall = median["wall_s"]
    rows = []
    for stage, label, compute in STAGES if settings.server == "thread" else PROCESS_STAGES:
        seconds = median["stages_s"][stage]
        share = seconds / wall
        rows.append({"stage": stage, "label": label, "compute": compute, "ms": 1000 * seconds, "share": share})
    compute_ms = sum(r["ms"] for r in rows if r["compute"]) if settings.server == "thread" else None
    coupled = alone.get("coupled local decode")
    return {
        "benchmark": "split_profile",
        "smoke": smoke,
        "date": now(),
        "command": command,
        "export": str(export),
        "model": manifest.base_model,
        "graph_weights": weights,
        "prompt_tokens": len(settings.prompt),
        "new_tokens": settings.new_tokens,
        "repeats": settings.repeats,
        "threads": settings.threads,
        "spin_wait": settings.spin_wait,
        "server": settings.server,
        "wire_kind": settings.wire,
        "machine": {**machine_info(settings.threads), "onnxruntime": onnxruntime.__version__},
        "load_before": load[0],
        "load_after": load[1],
        "shared_machine": load[0]["shared"] or load[1]["shared"],
        "wall_ms": 1000 * wall,
        "generator_decode_ms": 1000 * median["generator_decode_s"],
        "compute_ms": compute_ms,
        "not_compute_ms": None if compute_ms is None else 1000 * wall - compute_ms,
        "stages": rows,
        "alone_ms": {k: 1000 * v for k, v in alone.items() if isinstance(v, float) and not k.startswith("coupled ")},
        "coupled_local_end_ms": _ms(alone.get("coupled local, again at the end, decode")),
        "past_tokens_alone": alone["past_tokens"],
        "coupled_local_ms": None if coupled is None else 1000 * coupled,
        "split_vs_coupled_local": None if coupled is None else wall / coupled,
        "coupled_tokens_equal": None if coupled is None else alone["coupled local tokens"] == measured["tokens"],
        "other_coupled": {
            str(path): {
                "ms": 1000 * alone[f"coupled {path} decode"],
                "split_vs": wall / alone[f"coupled {path} decode"],
                "tokens_equal": alone[f"coupled {path} tokens"] == measured["tokens"],
            }
            for path in settings.other_coupled
        },
        "split_int8_backbone_estimate_ms": _int8_estimate(1000 * wall, rows, alone),
        "wire": measured["wire"],
        "tokens": measured["tokens"],
        "per_repeat": measured["repeats"],
        "precision_note": NOTE_PRECISION if weights.get("cloud/backbone") == "fp32" else None,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def _int8_estimate(wall_ms: float, rows: list[dict[str, Any]], alone: dict[str, Any]) -> float | None:
    """The split wall with the backbone's session run replaced by the int8 copy's (served) time alone."""
    int8 = alone.get("cloud/backbone int8 no spin")
    if int8 is None:
        return None
    backbone_ms = next((r["ms"] for r in rows if r["stage"] == "backbone_graph"), None)
    if backbone_ms is None:  # the server ran in another process: its backbone run was not timed
        return None
    return wall_ms - backbone_ms + 1000 * int8


def format_table(record: dict[str, Any]) -> str:
    """The per-token stage table and the graphs-alone table, as markdown."""
    split = (
        f"compute {record['compute_ms']:.2f} ms, not compute {record['not_compute_ms']:.2f} ms"
        if record["compute_ms"] is not None
        else "shadow-serve in a process of its own: its share is one stage"
    )
    lines = [
        f"Split decode over loopback, per token (the repeat of median wall time of {record['repeats']}, "
        f"{record['new_tokens']} new tokens after {record['prompt_tokens']}): wall {record['wall_ms']:.2f} ms, "
        f"{split}.",
        "",
        "| stage | what | compute | ms/token | share of wall |",
        "|---|---|---|---:|---:|",
    ]
    for row in record["stages"]:
        kind = {True: "yes", False: "no", None: "both"}[row["compute"]]
        lines.append(f"| {row['stage']} | {row['label']} | {kind} | {row['ms']:.3f} | {100 * row['share']:.1f}% |")
    lines.append(f"| **wall** | one decode step, end to end | | **{record['wall_ms']:.3f}** | 100% |")
    lines += [
        "",
        f"Graphs alone (one token after {record['past_tokens_alone']} positions; 'no spin': no spin-waiting, as "
        "shadow-serve and the split row open them; 'spinning': as the local rows open them):",
        "",
        "| graph | ms |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in record["alone_ms"].items()]
    if record["coupled_local_ms"] is not None:
        lines += [
            "",
            f"Split {record['wall_ms']:.2f} ms/token vs the export's coupled graph run locally "
            f"{record['coupled_local_ms']:.2f} ms/token: **{record['split_vs_coupled_local']:.2f}x** "
            f"(tokens equal: {record['coupled_tokens_equal']}). The same graph timed again at the end of the run: "
            f"{record['coupled_local_end_ms']:.2f} ms/token.",
        ]
    for path, other in record["other_coupled"].items():
        lines.append(
            f"Split vs the coupled graph {path} run locally: {other['ms']:.2f} ms/token, "
            f"**{other['split_vs']:.2f}x** (tokens equal: {other['tokens_equal']})."
        )
    estimate = record["split_int8_backbone_estimate_ms"]
    if estimate is not None and record["coupled_local_ms"] is not None:
        lines += [
            "",
            f"Estimate with an int8 backbone (the split wall with the backbone's session run replaced by the int8 "
            f"copy's time alone, no spin): {estimate:.2f} ms/token, {estimate / record['coupled_local_ms']:.2f}x "
            "the local coupled graph.",
        ]
    if record["precision_note"]:
        lines += ["", record["precision_note"]]
        if record["coupled_tokens_equal"] is False:
            lines.append("Tokens may differ from a local coupled graph's where the weights differ (int8 vs fp32).")
    return "\n".join(lines)


def markdown(record: dict[str, Any]) -> str:
    """The whole report: command, machine, load, then the tables."""
    m = record["machine"]
    shared = "yes" if record["shared_machine"] else "no"
    load = ", ".join(f"{x:.2f}" for x in record["load_before"]["loadavg"])
    weights = ", ".join(f"{k} {v}" for k, v in record["graph_weights"].items())
    return "\n".join(
        [
            f"# Split profile: {record['model']}",
            "",
            f"Command: `{record['command']}`  ",
            f"Date: {record['date']}  ",
            f"Machine: {m['cpu_model']}, {m['physical_cores']} physical cores, {m['platform']}, onnxruntime "
            f"{m['onnxruntime']}, Python {m['python']}  ",
            f"Shared machine: {shared} (load average before {load}; other processes' busy cores before "
            f"{record['load_before']['busy_cores']}, after {record['load_after']['busy_cores']})  ",
            f"Export: {weights}; {record['threads']} onnxruntime threads; shadow-serve in a {record['server']} "
            f"(spin-waiting {'on' if record['spin_wait'] else 'off'}); wire {record['wire_kind']}, "
            f"{record['wire']['dtype']} tensors, {record['wire']['requests_per_token']:.2f} requests per token",
            "",
            format_table(record),
            "",
        ]
    )


def write_outputs(record: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.json`` and ``<stem>.md`` in ``out_dir``, written atomically."""
    from shadowpeft.runtime.atomic import write_atomic

    json_path = save_json(out_dir / f"{stem}.json", record)
    md_path = write_atomic(out_dir / f"{stem}.md", markdown(record))
    return json_path, md_path

"""The speed benchmark's record: per-row figures, the issue's targets, markdown, text table and chart.

All writes are atomic (benchmarks.harness: a temp file beside the target, then ``os.replace``), so an interrupted run
never leaves a truncated JSON, page or chart.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import save_figure, save_json
from shadowpeft.runtime.atomic import write_atomic

MB = 1e6


@dataclass(frozen=True)
class Target:
    """A speed target: ``metric(numerator) / metric(denominator)`` compared with ``threshold``.

    ``at_least``: the ratio must reach the threshold (a speed-up); otherwise stay at or below it.
    ``metric``: ``decode_ms_per_token`` (default) or ``prefill_ms``.
    """

    id: str
    text: str
    numerator: str
    denominator: str
    threshold: float
    at_least: bool = False
    note: str = ""
    metric: str = "decode_ms_per_token"


TARGETS = (
    Target(
        "attached-vs-published",
        "PyTorch cached attached decode faster per token than the published package",
        "torch-attached",
        "torch-published",
        1.0,
    ),
    Target(
        "attached-vs-peft",
        "PyTorch cached attached decode faster per token than the peft tuner",
        "torch-attached",
        "torch-peft-tuner",
        1.0,
    ),
    Target(
        "attached-vs-base",
        "PyTorch cached attached decode within 1.15x of the plain base with its cache",
        "torch-attached",
        "torch-base",
        1.15,
    ),
    Target(
        "coupled-int8-vs-base-int8",
        "onnxruntime int8 coupled graph within 1.15x of the plain base int8 decode",
        "ort-coupled-int8",
        "ort-plain-int8",
        1.15,
        note="the coupled graph adds the shadow layer, 29 injections and 28 updates to the base's work per token",
    ),
    Target(
        "detached-int8-vs-base-int8",
        "onnxruntime int8 detached decode >= 3x faster per token than plain base int8",
        "ort-plain-int8",
        "ort-detached-int8",
        3.0,
        at_least=True,
    ),
    # Against the anchor a user would pick instead: onnxruntime-genai's builder graph of the plain base.
    *(
        Target(
            f"coupled-{w}-vs-genai-{w}",
            f"onnxruntime {w} coupled graph within 1.05x of the onnxruntime-genai plain base {w} per decoded token",
            f"ort-coupled-{w}",
            f"genai-plain-{w}",
            1.05,
            note="our coupled graph is fused (--ops auto; ort-coupled-std rows: the same graph with standard "
            "operators); beyond the base's layers it runs the shadow layer, 29 injections and 28 updates: ~380 "
            "small nodes per token",
        )
        for w in ("int4", "int8")
    ),
    Target(
        "detached-int4-vs-genai-int4",
        "onnxruntime int4 detached decode >= 5x faster per token than the onnxruntime-genai plain base int4",
        "genai-plain-int4",
        "ort-detached-int4",
        5.0,
        at_least=True,
    ),
    *(
        Target(
            f"coupled-{w}-prefill-vs-genai-{w}",
            f"prefill of the onnxruntime {w} coupled graph within 1.15x of the onnxruntime-genai plain base {w}",
            f"ort-coupled-{w}",
            f"genai-plain-{w}",
            1.15,
            metric="prefill_ms",
        )
        for w in ("int4", "int8")
    ),
    Target(
        "split-vs-coupled-local",
        "split over loopback within 1.3x of the coupled graph run locally, per decoded token (int8 device graphs)",
        "split-loopback",
        "ort-coupled-int8",
        1.3,
        note="the split row's cloud graph is fp32, the local coupled graph int8 throughout",
    ),
)


# ------------------------------------------------------------------------------------------------- rows


def summarise_row(spec: Any, raw: dict[str, Any], *, prompt_tokens: int) -> dict[str, Any]:
    """Medians over repeats of one row's raw measurements (seconds -> ms, tokens/s, MB)."""
    decode_ms = [1000.0 * s for s in raw["decode_s_per_token"]]
    prefill_ms = [1000.0 * s for s in raw["prefill_s"]]
    ms = statistics.median(decode_ms)
    prefill = statistics.median(prefill_ms)
    return {
        "id": spec.id,
        "label": spec.label,
        "kind": spec.kind,
        "reference": spec.reference,
        "agreement_with": getattr(spec, "agreement_with", None),
        "decode_ms_per_token": ms,
        "decode_ms_per_token_runs": decode_ms,
        "decode_ms_per_token_min": min(decode_ms),
        "decode_ms_per_token_max": max(decode_ms),
        "decode_tokens_per_s": 1000.0 / ms if ms > 0 else float("inf"),
        "prefill_ms": prefill,
        "prefill_ms_runs": prefill_ms,
        "prefill_tokens_per_s": prompt_tokens / (prefill / 1000.0) if prefill > 0 else float("inf"),
        "peak_rss_mb": _kib_to_mb(raw["peak_rss_kb"]),
        "rss_at_start_mb": _kib_to_mb(raw["rss_start_kb"]),
        "torch_imported": raw["torch_imported"],
        "tokens": raw["tokens"],
        "wall_s": raw["wall_s"],
        "extra": raw["extra"],
    }


def _kib_to_mb(kib: int | None) -> float | None:
    return None if kib is None else kib * 1024 / MB


def same_tokens(a: list[int], b: list[int], eos_ids: tuple[int, ...]) -> bool:
    """Equal up to the first end-of-sequence token of either.

    PyTorch rows suppress EOS (``min_new_tokens``) while the graph loops and the runtime emit it,
    so two correct decoders part ways right there.
    """
    stops = [i for seq in (a, b) for i, token in enumerate(seq) if token in eos_ids]
    if not stops:
        return a == b
    return a[: min(stops)] == b[: min(stops)]


def prefix_agreement(a: list[int], b: list[int]) -> float:
    """The share of ``a``'s tokens before its first difference from ``b`` (1.0: identical)."""
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return same / max(len(a), 1)


def add_relations(rows: list[dict[str, Any]], *, read_gb_s: float, eos_ids: tuple[int, ...]) -> None:
    """Ratios against the first row, token checks against each row's reference, bandwidth fractions."""
    first = rows[0]
    by_id = {row["id"]: row for row in rows}
    for row in rows:
        row["ratio_vs_first"] = row["decode_ms_per_token"] / first["decode_ms_per_token"]
        row["prefill_ratio_vs_first"] = row["prefill_tokens_per_s"] / first["prefill_tokens_per_s"]
        reference = by_id.get(row["reference"]) if row["reference"] else None
        row["tokens_match_reference"] = (
            None if reference is None else same_tokens(row["tokens"], reference["tokens"], eos_ids)
        )
        other = by_id.get(row.get("agreement_with") or "")
        row["agreement"] = None if other is None else prefix_agreement(row["tokens"], other["tokens"])
        weights = row.get("weight_bytes_per_token")
        row["bandwidth_fraction"] = (
            weights * row["decode_tokens_per_s"] / (read_gb_s * 1e9) if weights and read_gb_s > 0 else None
        )


# ---------------------------------------------------------------------------------------------- targets


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target with its measured ratio, met or missed by how much, and the memory-bound prediction.

    Decode at batch 1 streams every weight once per token, so where the graphs' weight bytes per
    token are known their ratio is what the time ratio would be if decode were purely memory-bound.
    """
    by_id = {row["id"]: row for row in rows}
    results = []
    for t in TARGETS:
        a, b = by_id.get(t.numerator), by_id.get(t.denominator)
        value = a[t.metric] / b[t.metric] if a and b else None
        met = None if value is None else value >= t.threshold if t.at_least else value <= t.threshold
        missed = None
        if met is False:
            missed = t.threshold / value - 1.0 if t.at_least else value / t.threshold - 1.0
        unit = "ms/token" if t.metric == "decode_ms_per_token" else "prefill ms"
        notes = [f"{unit} {t.numerator} / {t.denominator}"]
        weights = [r.get("weight_bytes_per_token") if r else None for r in (a, b)]
        if all(weights) and t.metric == "decode_ms_per_token":
            notes.append(
                f"weight bytes per token in the same ratio (memory-bound prediction): {weights[0] / weights[1]:.2f}x"
            )
        notes += [t.note] if t.note else []
        notes += ["not measured (a row is missing)"] if value is None else []
        results.append({**asdict(t), "value": value, "met": met, "missed_by": missed, "notes": "; ".join(notes)})
    return results


# -------------------------------------------------------------------------------------------- rendering


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _mb(value: float | int | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value / MB:.{digits}f}"


def _target_line(t: dict[str, Any]) -> str:
    if t["value"] is None:
        state = "not measured"
    elif t["met"]:
        state = "**met**"
    else:
        state = f"**missed** by {100 * t['missed_by']:.1f}%"
    required = f">= {t['threshold']:g}x" if t.get("at_least") else f"<= {t['threshold']:g}x"
    value = "-" if t["value"] is None else f"{t['value']:.3f}x"
    return f"| {t['text']} | {value} | {required} | {state} | {t['notes']} |"


def markdown_report(record: dict[str, Any], profiles: list[dict[str, Any]] | None = None) -> str:
    """The results page: settings, machine, the table, targets, bandwidth, split details, method.

    ``profiles``: records of ``benchmarks/split_profile.py`` (separate runs) whose per-token breakdown of a
    split decode step the split section shows.
    """
    m, bw = record["machine"], record["bandwidth"]
    first = record["rows"][0]["label"] if record["rows"] else "-"
    lines = [
        f"# Speed: {record['model']}",
        "",
        f"Command: `{record['command']}`  ",
        f"Date: {record['date']} (elapsed {record['elapsed_s'] / 60:.1f} min)  ",
        f"Machine: {m['cpu_model']}, {m['physical_cores']} physical cores ({m['logical_cpus']} logical), "
        f"{m['memory_gb']:.1f} GB RAM, {m['platform']}  ",
        f"Software: torch {m['torch']}, onnxruntime {m['onnxruntime']}, transformers {m['transformers']}, "
        f"peft {m['peft']}, shadow-peft {m['shadow-peft']}, Python {m['python']}  ",
        f"Settings: {record['prompt_tokens']}-token prompt, {record['new_tokens']} new tokens, greedy, batch 1, "
        f"{record['threads']} threads (torch and onnxruntime intra-op), median of {record['repeats']} repeats after "
        f"{record['warmup']} warm-up, denormals flushed (torch). Ratios are against the first row ({first}).",
        "",
        *[line for w in record["warnings"] for line in (f"**Warning:** {w}.", "")],
        "| row | what | decode ms/token | vs first | tokens/s | prefill tokens/s | prefill vs first | "
        "peak RSS MB | files MB | weights MB/token | % of read bandwidth | tokens == reference |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in record["rows"]:
        fraction = "-" if r["bandwidth_fraction"] is None else f"{100 * r['bandwidth_fraction']:.0f}%"
        match = "-" if r["tokens_match_reference"] is None else f"{r['tokens_match_reference']} ({r['reference']})"
        if r.get("agreement") is not None:
            match += f"; {100 * r['agreement']:.0f}% of tokens before the first difference from {r['agreement_with']}"
        lines.append(
            f"| {r['id']} | {r['label']} | {r['decode_ms_per_token']:.2f} | {r['ratio_vs_first']:.3f}x | "
            f"{r['decode_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.0f} | {r['prefill_ratio_vs_first']:.2f}x | "
            f"{_num(r['peak_rss_mb'])} | {_mb(r.get('file_bytes'))} | {_mb(r.get('weight_bytes_per_token'))} | "
            f"{fraction} | {match} |"
        )
    lines += ["", "## Targets", "", "| target | measured | required | state | notes |", "|---|---:|---:|---|---|"]
    lines += [_target_line(t) for t in record["targets"]]
    lines += _bandwidth_lines(record, bw) + _split_lines(record) + split_profile_lines(profiles or [])
    if record["failed"]:
        lines += ["", "## Rows that failed", ""] + [f"- {k}: {v}" for k, v in record["failed"].items()]
    lines += ["", "## Method", "", record["method"], ""]
    return "\n".join(lines)


def _bandwidth_lines(record: dict[str, Any], bw: dict[str, Any]) -> list[str]:
    by_id = {r["id"]: r for r in record["rows"]}
    lines = [
        "",
        "## Memory bandwidth",
        "",
        f"Measured read bandwidth {bw['read_gb_s']:.1f} GB/s with {bw['threads']} threads "
        f"({bw['read_1_thread_gb_s']:.1f} GB/s with one), copy {bw['copy_gb_s']:.1f} GB/s (read + write).",
    ]
    row = by_id.get("ort-detached-int8")
    if row and row["bandwidth_fraction"] is not None:
        rate = row["weight_bytes_per_token"] * row["decode_tokens_per_s"] / 1e9
        lines.append(
            f"The int8 detached decode reads {row['weight_bytes_per_token'] / MB:.1f} MB of weights per token at "
            f"{row['decode_tokens_per_s']:.1f} tokens/s = {rate:.2f} GB/s, "
            f"**{100 * row['bandwidth_fraction']:.0f}% of the measured read bandwidth**."
        )
    return lines + ["", bw["method"], "", record["weight_bytes_method"]]


def _split_lines(record: dict[str, Any]) -> list[str]:
    lines = []
    for r in record["rows"]:
        if r["kind"] != "split":
            continue
        e = r["extra"]
        lines.append(
            f"- {r['id']}: {e['bytes_sent_per_token']:.0f} B sent and {e['bytes_received_per_token']:.0f} B received "
            f"per decode token (HTTP framing included, {e['wire_dtype']} tensors); "
            f"{e['delay_ms_per_round_trip']:g} ms injected per round trip."
        )
    return ["", "## Split rows", "", *lines] if lines else []


def split_profile_lines(profiles: list[dict[str, Any]]) -> list[str]:
    """The per-token breakdown of a split decode step, one column per profile run (its own command and date)."""
    if not profiles:
        return []
    lines = [
        "",
        "### Where a split decode step's time goes (benchmarks/split_profile.py)",
        "",
        "Separate runs of the profiler (the split-loopback row with every stage timed; each run's command, date and "
        "machine load are in its own results file), ms per decoded token:",
        "",
    ]
    names = [f"backbone {p['graph_weights'].get('cloud/backbone', '?')}" for p in profiles]
    lines += ["| stage | compute | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(profiles)]
    labels = {stage["stage"]: (stage["label"], stage["compute"]) for p in profiles for stage in p["stages"]}
    for stage, (label, compute) in labels.items():
        values = [next((s["ms"] for s in p["stages"] if s["stage"] == stage), None) for p in profiles]
        cells = " | ".join("-" if v is None else f"{v:.2f}" for v in values)
        lines.append(f"| {label} | {'yes' if compute else 'no'} | {cells} |")
    for key, label in (("compute_ms", "**compute**"), ("not_compute_ms", "**not compute**"), ("wall_ms", "**wall**")):
        lines.append(f"| {label} | | " + " | ".join(f"**{p[key]:.2f}**" for p in profiles) + " |")
    lines += [
        "| local coupled graph, same run | | " + " | ".join(f"{p['coupled_local_ms']:.2f}" for p in profiles) + " |",
        "| split / local coupled | | " + " | ".join(f"{p['split_vs_coupled_local']:.2f}x" for p in profiles) + " |",
        "",
        "Runs: " + "; ".join(f"`{p['command']}` ({p['date'][:16]}, shared: {p['shared_machine']})" for p in profiles),
    ]
    return lines


def format_table(record: dict[str, Any]) -> str:
    """A plain-text table for the terminal."""
    header = f"{'row':<22} {'ms/token':>9} {'vs 1st':>7} {'prefill tok/s':>13} {'peak MB':>8}  tokens==ref"
    lines = [header, "-" * len(header)]
    for r in record["rows"]:
        lines.append(
            f"{r['id']:<22} {r['decode_ms_per_token']:>9.2f} {r['ratio_vs_first']:>6.3f}x "
            f"{r['prefill_tokens_per_s']:>13.0f} {_num(r['peak_rss_mb']):>8}  {r['tokens_match_reference']}"
        )
    for t in record["targets"]:
        state = "n/a" if t["met"] is None else "met" if t["met"] else f"MISSED by {100 * t['missed_by']:.1f}%"
        value = "-" if t["value"] is None else f"{t['value']:.3f}x"
        lines.append(f"target: {t['text']}: {value} ({state})")
    for row_id, reason in record["failed"].items():
        lines.append(f"{row_id:<22} FAILED: {reason.splitlines()[-1] if reason else ''}")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    """Three horizontal bar charts: decode ms/token, prefill tokens/s, peak RSS; one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    colors = {"torch": "tab:blue", "ort": "tab:orange", "genai": "tab:purple", "split": "tab:green"}
    panels = (
        ("decode_ms_per_token", "decode ms/token (lower is better)"),
        ("prefill_tokens_per_s", f"prefill tokens/s, {record['prompt_tokens']}-token prompt"),
        ("peak_rss_mb", "peak resident memory, MB (own process)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.32 * len(rows) + 1.8), sharey=True)
    labels = [r["id"] for r in rows][::-1]
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [r[key] or 0.0 for r in rows][::-1]
        bars = ax.barh(labels, values, color=[colors[r["kind"]] for r in rows][::-1])
        ax.bar_label(bars, fmt="%.1f" if key == "decode_ms_per_token" else "%.0f", fontsize=7, padding=2)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.margins(x=0.15)
    fig.suptitle(f"{record['model']}: {record['machine']['cpu_model']}, {record['threads']} threads", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ files


def split_profiles(folder: Path) -> list[dict[str, Any]]:
    """The full (non-smoke) split profile records in ``folder``, by file name."""
    records = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("split_profile*.json"))]
    return [r for r in records if not r.get("smoke")]


def write_outputs(record: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path, Path]:
    """``<stem>.json``, ``.md`` and ``.png`` in ``out_dir``, each written atomically.

    The page includes the split profiles (``split_profile*.json``) found in ``out_dir`` for a full run.
    """
    paths = (out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png")
    save_json(paths[0], record)
    profiles = [] if record["smoke"] else split_profiles(out_dir)
    write_atomic(paths[1], markdown_report(record, profiles))
    if record["rows"]:
        plot(record, paths[2])
    return paths

"""The main job's report: its records, the summary table, and the files of the report directory.

============================  ==========================================================================
file                          content
============================  ==========================================================================
``summary.json``              :class:`MainJobReport` as JSON (``job`` = :data:`JOB_NAME`), with derived rates
``summary.md``                the summary table (also printed by ``shadowpeft demo``), the plots, details
``tokens_per_s.png``          prefill and decode tokens/s per runtime mode
``graph_sizes.png``           size of each exported graph, with the fp32 size of quantized ones
``auto_timeline.png``         which mode produced each token of the auto run, and where the server stopped
``training_loss.png``         training loss per logged step
============================  ==========================================================================

Plots use matplotlib's object API (``Figure.savefig``, Agg), never pyplot's global state.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shadowpeft.runtime.contract import CLOUD_BACKBONE, GRAPH_ROLES

JOB_NAME = "shadowpeft-main-job"
SCHEMA_VERSION = 1
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
PLOT_FILES = {
    "speed": "tokens_per_s.png",
    "graphs": "graph_sizes.png",
    "timeline": "auto_timeline.png",
    "loss": "training_loss.png",
}
MODE_COLORS = {
    "coupled": "#1f77b4",
    "detached": "#ff7f0e",
    "auto": "#2ca02c",
    "speculative": "#9467bd",
    "escalating": "#8c564b",
}


OUTPUT_COLUMNS = ("detached", "coupled", "escalating", "auto")  # speculative's outputs are coupled's


@dataclass
class TrainFigures:
    """What training did and the PyTorch accuracy on held-out examples per mode (attached, detached)."""

    steps: int
    first_loss: float | None
    final_loss: float
    seconds_per_step: float
    trainable_params: int
    total_params: int
    accuracy: dict[str, float]
    eval_examples: int
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    escalation: dict[str, Any] | None = None  # selective.EscalationRecord.to_dict()

    @classmethod
    def from_summary(cls, summary: Any) -> TrainFigures:
        """From a :class:`~shadowpeft.train.trainer.TrainSummary`."""
        return cls(
            steps=summary.steps,
            first_loss=summary.first_loss,
            final_loss=summary.final_loss,
            seconds_per_step=summary.seconds_per_step,
            trainable_params=summary.trainable_params,
            total_params=summary.total_params,
            accuracy={m.mode: m.value for m in summary.metrics if m.metric == "accuracy" and m.mode},
            eval_examples=max((m.examples for m in summary.metrics), default=0),
            loss_history=[(int(step), float(loss)) for step, loss in summary.loss_history],
            escalation=summary.escalation,
        )

    def describe(self) -> str:
        first = f"{self.first_loss:.3f} -> " if self.first_loss is not None else ""
        accuracy = ", ".join(f"{mode} {_pct(value)}" for mode, value in self.accuracy.items())
        return (
            f"loss {first}{self.final_loss:.3f}, {self.seconds_per_step:.2f} s/step; trainable params: "
            f"{self.trainable_params:,d} || all params: {self.total_params:,d}; PyTorch accuracy on "
            f"{self.eval_examples} held-out examples: {accuracy or '-'}"
        )


@dataclass
class GraphFigure:
    """One exported graph; ``fp32_bytes`` is its size before quantization (device graphs only)."""

    file: str
    role: str
    weights: str
    bytes: int
    fp32_bytes: int | None = None

    @classmethod
    def from_manifest(cls, manifest: Any) -> dict[str, GraphFigure]:
        """Every graph of an export's :class:`~shadowpeft.runtime.manifest.Manifest`, sizes from its ``validation``."""
        figures = manifest.validation
        return {
            key: cls(
                file=spec.file,
                role=spec.role,
                weights=spec.weights,
                bytes=int(figures.get(f"{key}.bytes", 0)),
                fp32_bytes=int(figures[f"{key}.fp32_bytes"]) if f"{key}.fp32_bytes" in figures else None,
            )
            for key, spec in manifest.graphs.items()
        }


@dataclass
class ModeRun:
    """All prompts of one runtime mode: tokens, timings, wire traffic, exact-match accuracy.

    ``decode_steps`` counts the steps after each prompt's first (the one that ends at EOS included);
    ``prefill_s`` is the time of the first steps (prompt in, first token out), ``decode_s`` of the rest.
    """

    mode: str
    prompts: int
    prompt_tokens: int
    tokens: int
    tokens_by_mode: dict[str, int]
    decode_steps: int
    prefill_s: float
    decode_s: float
    fallbacks: int
    restarts: int
    bytes_sent: int
    bytes_received: int
    exact_match: float
    outputs: list[str] = field(default_factory=list)
    round_trips: int = 0  # HTTP requests to the server, prompt chunks and sequence ends included
    drafted: int = 0  # speculative rounds: tokens the shadow drafted
    accepted: int = 0  # speculative rounds: drafts the attached model accepted
    escalated: int = 0  # auto mode: steps the confidence sent to the cloud

    @property
    def cloud_fraction(self) -> float:
        """Share of the generated tokens the attached model chose (coupled or speculative)."""
        return (self.tokens - self.tokens_by_mode.get("detached", 0)) / self.tokens if self.tokens else 0.0

    @property
    def round_trips_per_token(self) -> float:
        return self.round_trips / self.tokens if self.tokens else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def wire_bytes_per_token(self) -> float | None:
        """Bytes both ways per token the server processed (prompt + decode steps); coupled runs only."""
        if self.tokens_by_mode.get("detached") or not self.tokens_by_mode.get("coupled"):
            return None
        return (self.bytes_sent + self.bytes_received) / max(self.prompt_tokens + self.decode_steps, 1)

    def describe(self) -> str:
        counts = ", ".join(f"{n} {m}" for m, n in sorted(self.tokens_by_mode.items())) or "none"
        line = (
            f"{self.mode}: {self.tokens} tokens ({counts}), prefill {self.prefill_tokens_per_s:.0f} tok/s, "
            f"decode {self.decode_tokens_per_s:.1f} tok/s, exact match {100 * self.exact_match:.1f}%"
        )
        if self.wire_bytes_per_token is not None:
            line += f", {self.wire_bytes_per_token:.0f} B/token on the wire"
        if self.round_trips:
            line += f", {self.round_trips_per_token:.2f} round trips/token, cloud {100 * self.cloud_fraction:.0f}%"
        if self.drafted:
            line += f", {self.accepted}/{self.drafted} drafts accepted"
        if self.fallbacks:
            line += f", {self.fallbacks} fallback(s) to detached"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "wire_bytes_per_token": self.wire_bytes_per_token,
            "cloud_fraction": self.cloud_fraction,
            "round_trips_per_token": self.round_trips_per_token,
        }


@dataclass
class ServerStop:
    """Where the auto run stopped the server: after its ``after_tokens``-th token (prompt, token index)."""

    after_tokens: int
    prompt: int | None = None
    token: int | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        if self.prompt is None:
            return f"the server was not stopped: auto produced fewer than {self.after_tokens} tokens"
        return (
            f"server stopped after token {self.after_tokens} (prompt {self.prompt}, token {self.token}; "
            f"SIGTERM to exit took {self.seconds:.2f} s, not counted in the timings)"
        )


@dataclass(frozen=True)
class TokenRecord:
    """One token of the auto run and the mode that produced it."""

    prompt: int
    index: int
    token_id: int
    text: str
    mode: str


@dataclass
class MainJobReport:
    """Everything the main job measured (``summary.json``)."""

    job: str
    settings: dict[str, Any]
    data: str
    base_params: int
    train: TrainFigures
    graphs: dict[str, GraphFigure]
    runs: dict[str, ModeRun]
    answers: list[str]
    auto_timeline: list[TokenRecord]
    server_stop: ServerStop
    server_pid: int
    stages: dict[str, float]
    elapsed_s: float

    @property
    def fallback_events(self) -> int:
        return sum(run.fallbacks for run in self.runs.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema_version"] = SCHEMA_VERSION
        data["runs"] = {mode: run.to_dict() for mode, run in self.runs.items()}
        data["fallback_events"] = self.fallback_events
        return data


def write_report(report: MainJobReport, directory: Path, *, plots: bool = True) -> list[Path]:
    """Write ``summary.json``, ``summary.md`` and (``plots``) the PNGs into ``directory``; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / SUMMARY_JSON, directory / SUMMARY_MD]
    written[0].write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    written[1].write_text(summary_markdown(report), encoding="utf-8")
    if plots:
        for name, draw in (("speed", _plot_speed), ("graphs", _plot_graphs), ("timeline", _plot_timeline)):
            draw(report, directory / PLOT_FILES[name])
            written.append(directory / PLOT_FILES[name])
        if report.train.loss_history:
            _plot_loss(report, directory / PLOT_FILES["loss"])
            written.append(directory / PLOT_FILES["loss"])
    return written


# ----- text ------------------------------------------------------------------------------------------


def summary_table(report: MainJobReport) -> str:
    """The summary printed at the end of ``shadowpeft demo`` (markdown tables, readable as plain text)."""
    s = report.settings
    return "\n".join(
        [
            f"Main job: {s['base']} + shadow, {report.data}; {report.train.steps} training steps, "
            f"{s['device']} export, {s['prompts']} prompts per runtime mode.",
            "",
            *_accuracy_lines(report),
            "",
            *_mode_lines(report),
            "",
            *_graph_lines(report),
            "",
            *_stage_lines(report),
        ]
    )


def summary_markdown(report: MainJobReport) -> str:
    """``summary.md``: title, the summary table, the plots and the details behind them."""
    t = report.train
    first = f"{t.first_loss:.3f} -> " if t.first_loss is not None else ""
    plots = [f"![{name}]({file})" for name, file in PLOT_FILES.items() if name != "loss" or t.loss_history]
    outputs = [
        f"| {i} | {_cell(answer)} | "
        + " | ".join(_cell(report.runs[mode].outputs[i]) for mode in OUTPUT_COLUMNS)
        + " |"
        for i, answer in enumerate(report.answers)
    ]
    return "\n".join(
        [
            "# shadowpeft main job",
            "",
            summary_table(report),
            "",
            "## Training",
            "",
            f"{t.steps} steps, loss {first}{t.final_loss:.3f}, {t.seconds_per_step:.2f} s/step; trainable params "
            f"{t.trainable_params:,d} of {t.total_params:,d} (base alone {report.base_params:,d}).",
            "",
            "## Plots",
            "",
            *plots,
            "",
            "## Runtime outputs per prompt",
            "",
            report.server_stop.describe() + f"; fallback events: {report.fallback_events}.",
            "",
            "| prompt | expected | " + " | ".join(OUTPUT_COLUMNS) + " |",
            "|---:|---|" + "---|" * len(OUTPUT_COLUMNS),
            *outputs,
            "",
            "## Settings",
            "",
            "```json",
            json.dumps(report.settings, indent=2, default=str),
            "```",
            "",
        ]
    )


def _accuracy_lines(report: MainJobReport) -> list[str]:
    acc, runs = report.train.accuracy, report.runs
    weights = ", ".join(sorted({g.weights for g in report.graphs.values() if g.role != GRAPH_ROLES[CLOUD_BACKBONE]}))
    return [
        "Accuracy on held-out examples (exact match of the generated label)",
        "",
        "| engine | examples | with backbone | shadow alone (detached) | escalating by confidence "
        "| auto (server stopped half-way) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| PyTorch | {report.train.eval_examples} | {_pct(acc.get('attached'))} attached | "
        f"{_pct(acc.get('detached'))} | - | - |",
        f"| onnxruntime, device graphs {weights} | {runs['coupled'].prompts} | "
        f"{_pct(runs['coupled'].exact_match)} coupled, {_pct(runs['speculative'].exact_match)} speculative | "
        f"{_pct(runs['detached'].exact_match)} | {_pct(runs['escalating'].exact_match)} "
        f"({_pct(1 - runs['escalating'].cloud_fraction)} of tokens on the device) "
        f"| {_pct(runs['auto'].exact_match)} |",
        *_escalation_lines(report.train.escalation),
    ]


def _escalation_lines(escalation: dict[str, Any] | None) -> list[str]:
    """Where the detached model's confidence would send each held-out example (PyTorch, the saved threshold)."""
    if not escalation:
        return []
    e = escalation
    return [
        "",
        f"Escalation by detached confidence ({e['confidence']} >= {e['threshold']:.3f}, chosen on the "
        f"{e['examples']} PyTorch examples): {_pct(e['local_fraction'])} answered on the device, combined accuracy "
        f"{_pct(e['combined_accuracy'])} (attached {_pct(e['attached_accuracy'])}, detached "
        f"{_pct(e['detached_accuracy'])}; detached calibration error {e['detached_ece']:.3f}).",
    ]


def _mode_lines(report: MainJobReport) -> list[str]:
    rows = [
        "Runtime per mode (greedy, one prompt at a time; prefill = prompt in, first token out)",
        "",
        "| run | tokens | cloud / device | cloud fraction | round trips/token | drafts accepted | prefill tok/s "
        "| decode tok/s | wire B/token | wire KB | fallbacks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, run in report.runs.items():
        wire, device = run.wire_bytes_per_token, run.tokens_by_mode.get("detached", 0)
        drafts = f"{run.accepted}/{run.drafted}" if run.drafted else "-"
        rows.append(
            f"| {mode} | {run.tokens} | {run.tokens - device} / {device} | {run.cloud_fraction:.2f} "
            f"| {run.round_trips_per_token:.2f} | {drafts} | {run.prefill_tokens_per_s:.0f} "
            f"| {run.decode_tokens_per_s:.1f} | {'-' if wire is None else f'{wire:.0f}'} "
            f"| {(run.bytes_sent + run.bytes_received) / 1e3:.1f} | {run.fallbacks} |"
        )
    rows.append("")
    rows.append(
        f"Fallback events: {report.fallback_events} (auto tries the server again for each new prompt, so every "
        f"prompt after the stop adds one); {report.server_stop.describe()}."
    )
    return rows


def _graph_lines(report: MainJobReport) -> list[str]:
    rows = ["Exported graphs", "", "| graph | role | weights | size | fp32 size |", "|---|---|---|---:|---:|"]
    for key, graph in report.graphs.items():
        fp32 = "-" if graph.fp32_bytes is None else _mb(graph.fp32_bytes)
        rows.append(f"| {key} | {graph.role} | {graph.weights} | {_mb(graph.bytes)} | {fp32} |")
    return rows


def _stage_lines(report: MainJobReport) -> list[str]:
    rows = ["Stage times", "", "| stage | time |", "|---|---:|"]
    rows += [f"| {name} | {_duration(seconds)} |" for name, seconds in report.stages.items()]
    rows.append(f"| **total** | **{_duration(report.elapsed_s)}** |")
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def _cell(text: str) -> str:
    return repr(text)[1:-1].replace("|", "\\|")[:80]


# ----- plots -----------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _plot_speed(report: MainJobReport, path: Path) -> None:
    fig = _figure(8, 3.2)
    modes = list(report.runs)
    colors = [MODE_COLORS.get(mode, "grey") for mode in modes]
    for ax, (title, values) in zip(
        fig.subplots(1, 2),
        (
            ("prefill tokens/s", [run.prefill_tokens_per_s for run in report.runs.values()]),
            ("decode tokens/s", [run.decode_tokens_per_s for run in report.runs.values()]),
        ),
        strict=True,
    ):
        bars = ax.bar(modes, values, color=colors)
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(title)
    fig.suptitle("onnxruntime speed per mode")
    fig.savefig(path, dpi=110)


def _plot_graphs(report: MainJobReport, path: Path) -> None:
    fig = _figure(8, 0.6 + 0.5 * len(report.graphs))
    ax = fig.subplots()
    keys = list(report.graphs)
    sizes = [report.graphs[k].bytes / 1e6 for k in keys]
    fp32 = [(report.graphs[k].fp32_bytes or 0) / 1e6 for k in keys]
    ax.barh(keys, fp32, color="#cccccc", label="fp32 before quantization")
    bars = ax.barh(keys, sizes, color="#1f77b4", label="exported")
    ax.bar_label(bars, labels=[f"{s:.1f} MB ({report.graphs[k].weights})" for s, k in zip(sizes, keys, strict=True)])
    ax.set_xlabel("MB")
    ax.set_xlim(0, 1.3 * max([*sizes, *fp32, 1e-6]))  # room for the labels
    ax.legend(loc="lower right")
    ax.set_title("exported graph sizes")
    fig.savefig(path, dpi=110)


def _plot_timeline(report: MainJobReport, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    fig = _figure(8, 3.2)
    ax = fig.subplots()
    for mode in ("coupled", "speculative", "detached"):
        points = [(i, t.prompt) for i, t in enumerate(report.auto_timeline) if t.mode == mode]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, s=18, color=MODE_COLORS[mode], label=mode)
    stop = report.server_stop
    if stop.prompt is not None:
        ax.axvline(stop.after_tokens - 0.5, color="red", linestyle="--", label="server stopped")
    ax.set_xlabel("token of the auto run (in order)")
    ax.set_ylabel("prompt")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"auto mode: which side produced each token ({report.fallback_events} fallback events)")
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=110)


def _plot_loss(report: MainJobReport, path: Path) -> None:
    fig = _figure(6, 3)
    ax = fig.subplots()
    steps, losses = zip(*report.train.loss_history, strict=True)
    ax.plot(steps, losses, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss (CE base + lambda * CE shadow)")
    fig.savefig(path, dpi=110)

"""Greedy decode speed of ShadowPEFT implementations on SmolLM2-135M-Instruct (CPU, fp32).

Rows (all measured in one run, round-robin, each wrapped model built on a fresh copy of the base):

    a-cached     published `shadow-peft` 0.1.1, KV cache on (use_cache=True)
    a-uncached   published `shadow-peft` 0.1.1, full recompute every token (use_cache=False)
    b-cached     the `shadow` tuner of `peft` 0.21.2, KV cache on (its ShadowCache)
    c-attached   this project, cached decode, attached mode
    c-detached   this project, cached decode, detached mode (shadow backbone + head only)
    d-base       the plain base model, KV cache on (the reference for all ratios)

Method: for a fixed 32-token prompt, ``generate(max_new_tokens=1)`` runs exactly one forward
pass (the prefill) and ``generate(max_new_tokens=N)`` runs the prefill plus N-1 single-token
decode steps. So one decode step costs

    ms/token = (t_generate(N) - t_generate(1)) / (N - 1)

which removes the prefill and the fixed per-call overhead of ``generate``. EOS is suppressed with
``min_new_tokens=N`` and every output is checked to hold exactly N new tokens. After one warm-up
call of each kind per row, each row is timed ``--repeats`` times, the rows interleaved so that
drift of the machine hits all rows alike; the table reports the median over repeats. Within a
repeat the prefill-only time is the fastest of 3 calls, since a stall in that short call would
bias the difference low (even below zero). Other processes' CPU use just before and after the run
is sampled from /proc/stat and a contended run is flagged in the output. Shadows
are freshly initialised (W_up = 0), so attached rows must produce the base model's tokens; the
JSON records whether they do. Denormal floats are flushed to zero (torch.set_flush_denormal),
and torch uses one thread per physical core.

Usage::

    python -m benchmarks.decode_speed                 # SmolLM2, 128 new tokens, 5 repeats
    python -m benchmarks.decode_speed --smoke --out /tmp/x   # tiny random Llama, seconds
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from benchmarks.harness import RESULTS_DIR, machine_info, physical_cores, run_cli, save_json
from shadowpeft.runtime.atomic import write_atomic

BASE_ROW = "d-base"
# Prefill-only calls per repeat; the fastest is used (see measure()).
PREFILL_SAMPLES = 3
# Other processes keeping this many cores busy just before or after the run means a contended measurement.
BUSY_CORES = 0.25
SMOKE_CONFIG = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
# A fixed English passage; its first `prompt_tokens` tokens are the prompt.
PROMPT_TEXT = (
    "The lighthouse keeper climbed the narrow spiral stairs every evening at dusk, carrying a small lamp and "
    "a notebook in which he recorded the wind, the colour of the sea and the ships that passed the rocky "
    "headland on their way to the harbour."
)

GenerateFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class RowUnavailable(RuntimeError):
    """A row cannot be measured in this environment (e.g. its implementation does not import yet)."""


@dataclass(frozen=True)
class Row:
    """One measured configuration: a generate callable on its own freshly wrapped model."""

    id: str
    label: str
    generate: GenerateFn
    trainable_params: int


@dataclass
class RowResult:
    """Timings of one row, in milliseconds."""

    id: str
    label: str
    trainable_params: int
    prefill_ms: list[float] = field(default_factory=list)
    generate_ms: list[float] = field(default_factory=list)
    tokens_match_base: bool | None = None

    def ms_per_token_runs(self, new_tokens: int) -> list[float]:
        """Per-repeat decode cost: (generate(N) - generate(1)) / (N - 1)."""
        return [(g - p) / (new_tokens - 1) for p, g in zip(self.prefill_ms, self.generate_ms, strict=True)]


@dataclass(frozen=True)
class Setup:
    """What every row shares: how to get a fresh base model, and the prompt."""

    model_name: str
    fresh_base: Callable[[], PreTrainedModel]
    input_ids: torch.Tensor  # (1, T)
    attention_mask: torch.Tensor  # (1, T)


# --------------------------------------------------------------------------------------------- machine


@contextlib.contextmanager
def benchmark_settings(threads: int) -> Iterator[None]:
    """Set thread count and denormal flushing for the run; restore the defaults afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------- setup


def smoke_setup(prompt_tokens: int) -> Setup:
    """A tiny random Llama (seeded) and a random prompt: the whole benchmark runs in seconds."""
    torch.manual_seed(0)
    template = LlamaForCausalLM(LlamaConfig(**SMOKE_CONFIG)).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, SMOKE_CONFIG["vocab_size"], (1, prompt_tokens), generator=generator)
    return Setup(
        model_name="tiny-random-llama",
        fresh_base=lambda: copy.deepcopy(template),
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
    )


def smollm2_setup(prompt_tokens: int) -> Setup:
    """SmolLM2-135M-Instruct from the local cache (0.2 s per fresh copy) and a fixed text prompt."""
    from shadowpeft.checkpoint.assets import SMOLLM2_NAME, load_smollm2

    _, tokenizer = load_smollm2()
    ids = tokenizer(PROMPT_TEXT, return_tensors="pt").input_ids
    if ids.shape[1] < prompt_tokens:
        raise click.BadParameter(f"the built-in prompt has {ids.shape[1]} tokens; --prompt-tokens must be <= that")
    input_ids = ids[:, :prompt_tokens]
    return Setup(
        model_name=SMOLLM2_NAME,
        fresh_base=lambda: load_smollm2()[0],
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
    )


# ------------------------------------------------------------------------------------------------ rows


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _hf_generate(model: Any, **extra: Any) -> GenerateFn:
    """A greedy generate call that always produces exactly `n` new tokens (EOS suppressed)."""

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            **extra,
        )

    return run


def build_base(setup: Setup) -> Row:
    """Row (d): the plain base model with its KV cache."""
    model = setup.fresh_base().eval()
    return Row(BASE_ROW, "base model (HF generate, KV cache)", _hf_generate(model, use_cache=True), 0)


def published_model(base: torch.nn.Module) -> torch.nn.Module:
    """The authors' `shadow-peft` 0.1.1 on ``base`` (1-layer shadow, r=16, gate 10); wraps its layers in place."""
    from shadow_peft import ShadowConfig, ShadowForCausalLM, get_shadow_model

    config = ShadowConfig(num_shadow_layers=1, injection_hidden_size=16, gate_hidden_size=10)
    return ShadowForCausalLM(get_shadow_model(base, config))


def peft_tuner_model(base: torch.nn.Module) -> torch.nn.Module:
    """peft 0.21.2's `shadow` tuner on ``base``: blocks 1..L-1, r=16, gate 10, 1 shadow layer."""
    from peft import ShadowConfig as PeftShadowConfig
    from peft import get_peft_model

    config = PeftShadowConfig(
        task_type="CAUSAL_LM",
        r=16,
        update_hidden_size=10,
        shadow_num_hidden_layers=1,
        shadow_alpha=0.1,
        shadow_dropout=0.2,
        target_modules=[f"model.layers.{i}" for i in range(1, base.config.num_hidden_layers)],
    )
    return get_peft_model(base, config)


def build_published(setup: Setup, *, use_cache: bool) -> Row:
    """Row (a): the authors' `shadow-peft` 0.1.1 package (wraps the base's layers in place)."""
    model = published_model(setup.fresh_base()).eval()
    kind = "KV cache" if use_cache else "full recompute per token"
    row_id = "a-cached" if use_cache else "a-uncached"
    trainable = _trainable(model.peft_model)
    return Row(row_id, f"shadow-peft 0.1.1 ({kind})", _hf_generate(model, use_cache=use_cache), trainable)


def build_peft_tuner(setup: Setup) -> Row:
    """Row (b): the `shadow` tuner shipped in peft 0.21.2, at the closest budget its options allow.

    Blocks 1..L-1 are targeted explicitly (as in the method, block 0 is not injected); the tuner's
    `layers_to_transform` is ignored when `target_modules` is left at None. Its update MLPs use
    GELU and biases and cannot be made bias-free, so it has slightly more parameters.
    """
    model = peft_tuner_model(setup.fresh_base()).eval()
    return Row(
        "b-cached", "peft 0.21.2 shadow tuner (ShadowCache)", _hf_generate(model, use_cache=True), _trainable(model)
    )


def build_ours(setup: Setup, *, mode: str) -> Row:
    """Row (c): this project's cached decode (`shadowpeft.get_shadow_model(...).generate(mode=...)`)."""
    try:
        from shadowpeft import ShadowConfig, get_shadow_model
    except (ImportError, AttributeError) as exc:  # the lazy __init__ raises ImportError for missing modules
        raise RowUnavailable(f"`from shadowpeft import ShadowConfig, get_shadow_model` failed: {exc}") from exc
    model = get_shadow_model(setup.fresh_base(), ShadowConfig()).eval()
    label = f"shadowpeft (this project, KV cache, {mode})"
    return Row(f"c-{mode}", label, _hf_generate(model, mode=mode), _trainable(model))


def build_rows(setup: Setup) -> tuple[list[Row], dict[str, str]]:
    """Build every row on its own fresh base; rows of this project may be unavailable (with the reason)."""
    rows = [
        build_published(setup, use_cache=True),
        build_published(setup, use_cache=False),
        build_peft_tuner(setup),
    ]
    unavailable: dict[str, str] = {}
    for mode in ("attached", "detached"):
        try:
            rows.append(build_ours(setup, mode=mode))
        except RowUnavailable as exc:
            unavailable[f"c-{mode}"] = str(exc)
    rows.append(build_base(setup))
    return rows, unavailable


# ---------------------------------------------------------------------------------------------- timing


def _timed(row: Row, setup: Setup, n: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = row.generate(setup.input_ids, setup.attention_mask, n)
    elapsed_ms = (time.perf_counter() - start) * 1000.0
    expected = setup.input_ids.shape[1] + n
    if out.shape != (1, expected):
        raise RuntimeError(f"row {row.id} returned shape {tuple(out.shape)}, expected (1, {expected})")
    return elapsed_ms, out


def warm_up(rows: list[Row], setup: Setup, new_tokens: int, unavailable: dict[str, str]) -> dict[str, torch.Tensor]:
    """One prefill-only and one full call per row; returns each row's generated tokens.

    A row of this project that fails here is dropped and reported, so that the other rows still get
    measured; the competitors' and the base's failures propagate.
    """
    outputs: dict[str, torch.Tensor] = {}
    for row in list(rows):
        try:
            _timed(row, setup, 1)
            outputs[row.id] = _timed(row, setup, new_tokens)[1]
        except Exception as exc:  # CLI boundary: report the row, keep measuring the others
            if not row.id.startswith("c-"):
                raise
            unavailable[row.id] = f"generate failed: {type(exc).__name__}: {exc}"
            rows.remove(row)
    return outputs


def measure(rows: list[Row], setup: Setup, *, new_tokens: int, repeats: int) -> list[RowResult]:
    """Time every row `repeats` times, round-robin, prefill-only then full generate."""
    results = {row.id: RowResult(row.id, row.label, row.trainable_params) for row in rows}
    for _ in range(repeats):
        for row in rows:
            # A stall during the short prefill call would bias the difference low (even below 0), so
            # take the best of a few; stalls during the long call only inflate that repeat.
            prefill = min(_timed(row, setup, 1)[0] for _ in range(PREFILL_SAMPLES))
            results[row.id].prefill_ms.append(prefill)
            results[row.id].generate_ms.append(_timed(row, setup, new_tokens)[0])
    return [results[row.id] for row in rows]


# --------------------------------------------------------------------------------------------- reports


def summarise(results: list[RowResult], new_tokens: int) -> list[dict[str, Any]]:
    """Medians, spread and ratios against the base row, one dict per row (JSON-ready)."""
    base = next(r for r in results if r.id == BASE_ROW)
    base_ms = statistics.median(base.ms_per_token_runs(new_tokens))
    base_prefill = statistics.median(base.prefill_ms)
    summary = []
    for result in results:
        runs = result.ms_per_token_runs(new_tokens)
        ms = statistics.median(runs)
        prefill = statistics.median(result.prefill_ms)
        summary.append(
            {
                **asdict(result),
                "ms_per_token": ms,
                "ms_per_token_runs": runs,
                "ms_per_token_min": min(runs),
                "ms_per_token_max": max(runs),
                "ms_per_token_best": (min(result.generate_ms) - min(result.prefill_ms)) / (new_tokens - 1),
                "tokens_per_s": 1000.0 / ms if ms > 0 else float("inf"),
                "ratio_vs_base": ms / base_ms,
                "prefill_ms_median": prefill,
                "prefill_ratio_vs_base": prefill / base_prefill,
            }
        )
    return summary


def markdown_report(record: dict[str, Any]) -> str:
    """Render the run as a markdown page: settings, the table, unavailable rows, method."""
    m = record["machine"]
    lines = [
        f"# Decode speed: {record['model']}",
        "",
        f"{record['prompt_tokens']}-token prompt, {record['new_tokens']} new tokens, greedy, batch 1, fp32, "
        f"median of {record['repeats']} repeats after {record['warmup']} warm-up. "
        f"CPU: {m['cpu_model']} ({m['physical_cores']} physical cores, {m['torch_threads']} torch threads), "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, shadow-peft {m['shadow-peft']}. "
        "Denormals flushed to zero.",
        "",
        "| row | implementation | ms/token | tokens/s | vs base | min-max ms/token | prefill ms | prefill vs base "
        "| trainable params | tokens == base |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in record["rows"]:
        lines.append(
            f"| {r['id']} | {r['label']} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['ratio_vs_base']:.3f}x | {r['ms_per_token_min']:.2f}-{r['ms_per_token_max']:.2f} | "
            f"{r['prefill_ms_median']:.1f} | {r['prefill_ratio_vs_base']:.3f}x | {r['trainable_params']:,} | "
            f"{r['tokens_match_base']} |"
        )
    if record["warnings"]:
        lines += ["", *[f"**Warning:** {warning}." for warning in record["warnings"]]]
    if record["unavailable"]:
        lines += ["", "Unavailable rows:", ""]
        lines += [f"- {row_id}: {reason}" for row_id, reason in record["unavailable"].items()]
    lines += ["", "## Method", "", record["method"], ""]
    return "\n".join(lines)


METHOD = (
    "ms/token = (t(generate N new tokens) - t(generate 1 new token)) / (N - 1): generate(1) is exactly the "
    "prefill forward, generate(N) adds N-1 single-token decode steps, so the difference is the decode cost "
    "including the generate loop's per-step overhead. Each repeat takes the fastest of "
    f"{PREFILL_SAMPLES} prefill-only calls; the reported ms/token is the median over repeats "
    "(ms_per_token_best in the JSON uses the fastest calls of all repeats). "
    "EOS is suppressed (min_new_tokens=N) and output lengths "
    "are checked. Rows are interleaved within each repeat; each wrapped model wraps its own fresh copy of the "
    "base. Shadows are freshly initialised (W_up = 0), so attached rows must reproduce the base tokens "
    "('tokens == base'); detached rows are a different predictor. 'vs base' is the ratio of ms/token to row d."
)


def format_table(record: dict[str, Any]) -> str:
    """A plain-text table for the terminal."""
    header = f"{'row':<11} {'ms/token':>9} {'tok/s':>7} {'vs base':>8} {'prefill ms':>11}  implementation"
    lines = [header, "-" * len(header)]
    for r in record["rows"]:
        lines.append(
            f"{r['id']:<11} {r['ms_per_token']:>9.2f} {r['tokens_per_s']:>7.1f} {r['ratio_vs_base']:>7.3f}x "
            f"{r['prefill_ms_median']:>11.1f}  {r['label']}"
        )
    for row_id, reason in record["unavailable"].items():
        lines.append(f"{row_id:<11} {'n/a':>9}  UNAVAILABLE: {reason}")
    return "\n".join(lines)


def run_benchmark(*, smoke: bool, prompt_tokens: int, new_tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    """Build all rows, warm up, measure, and return the JSON record."""
    load_before, busy_before = _load_average(), busy_cores()
    with benchmark_settings(threads), torch.inference_mode():
        setup = smoke_setup(prompt_tokens) if smoke else smollm2_setup(prompt_tokens)
        rows, unavailable = build_rows(setup)
        outputs = warm_up(rows, setup, new_tokens, unavailable)
        results = measure(rows, setup, new_tokens=new_tokens, repeats=repeats)
    load_after, busy_after = _load_average(), busy_cores()
    for result in results:
        result.tokens_match_base = bool(torch.equal(outputs[result.id], outputs[BASE_ROW]))
    busy = max((b for b in (busy_before, busy_after) if b is not None), default=None)
    warnings = []
    if busy is not None and busy >= BUSY_CORES:
        warnings.append(
            f"other processes kept {busy:.2f} cores busy around the run: timings are contended (inflated and "
            "noisy, ratios included); rerun on an idle machine"
        )
    machine = {
        **machine_info(threads),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "busy_cores_before": busy_before,
        "busy_cores_after": busy_after,
    }
    return {
        "benchmark": "decode_speed",
        "smoke": smoke,
        "model": setup.model_name,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": 1,
        "batch_size": 1,
        "dtype": "float32",
        "flush_denormal": True,
        "method": METHOD,
        "machine": machine,
        "rows": summarise(results, new_tokens),
        "unavailable": unavailable,
        "warnings": warnings,
    }


def _load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return None


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat", encoding="utf-8") as handle:
            fields = [int(x) for x in handle.readline().split()[1:9]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)
    return None


def busy_cores(interval_s: float = 0.5) -> float | None:
    """Cores kept busy by *other* processes, sampled while this one sleeps (None without /proc/stat)."""
    before = _cpu_ticks()
    time.sleep(interval_s)
    after = _cpu_ticks()
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def write_results(record: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write `decode_speed[_smoke].json` and `.md` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "decode_speed_smoke" if record["smoke"] else "decode_speed"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    save_json(json_path, record)
    write_atomic(md_path, markdown_report(record))
    return json_path, md_path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--smoke", is_flag=True, help="Tiny random Llama, 2 repeats, 8 new tokens (seconds).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=RESULTS_DIR)
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Timed repeats [5; smoke 2].")
@click.option("--new-tokens", type=click.IntRange(min=2), default=None, help="New tokens [128; smoke 8].")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads [physical cores].")
def cli(
    smoke: bool, out_dir: Path, repeats: int | None, new_tokens: int | None, prompt_tokens: int, threads: int | None
) -> int:
    """Measure ms per generated token for every ShadowPEFT implementation against the base model."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    record = run_benchmark(
        smoke=smoke,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens or (8 if smoke else 128),
        repeats=repeats or (2 if smoke else 5),
        threads=threads or physical_cores(),
    )
    json_path, md_path = write_results(record, out_dir)
    click.echo(format_table(record))
    for warning in record["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {json_path} and {md_path}")
    if record["unavailable"]:
        click.echo(f"error: rows unavailable: {', '.join(record['unavailable'])}", err=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark CLI and return its exit code (0 only when every row was measured)."""
    return run_cli(cli, argv, module="benchmarks.decode_speed")


if __name__ == "__main__":
    sys.exit(main())

"""Task accuracy of ShadowPEFT against LoRA and DoRA at matched budgets, on SmolLM2-135M-Instruct.

Rows per task: the base model zero-shot (generation tasks: the chat-template prompt, untrained);
LoRA and DoRA on q, k, v, o at the rank whose size is closest to the shadow adapter's; ShadowPEFT
(the method's defaults) attached, and the same trained model detached; and ShadowPEFT whose shadow
backbone was first pretrained alone on `shakespeare` (detached, LM loss, once per seed), detached
and attached. Every method gets the same training examples, steps, batch, schedule, max_length and
test examples; only the learning rate differs (options, recorded in the JSON). The test split is
fixed and never trained on; seeds change fresh weights and data order. `sentiment` uses a
sequence-classification head, `intent` generates the label (greedy, exact match). The full method
is in accuracy_report.METHOD, which the markdown report repeats.

Usage::

    python -m benchmarks.accuracy                          # CPU defaults, about 1h40 on 2 cores
    python -m benchmarks.accuracy --resume                 # continue an interrupted run
    python -m benchmarks.accuracy --device cuda            # bf16 base, 3 seeds, more steps
    python -m benchmarks.accuracy --smoke --out /tmp/x     # toy Llama of tests/toy.py, seconds

The JSON is rewritten atomically after every run; `--resume` skips what it records. Pretrained
shadows stay in `<out>/.accuracy_work/` until every planned run is recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import torch
import transformers
from torch import nn
from transformers import AutoConfig

from benchmarks import accuracy_report as rep
from benchmarks import decode_speed as speed
from benchmarks.accuracy_settings import PROFILES, BenchSettings, Profile, Setup, TaskSpec
from benchmarks.harness import RESULTS_DIR, load_for_resume, machine_info, now, physical_cores, run_cli, save_json
from shadowpeft import ShadowConfig, count_parameters, expected_parameter_counts, get_shadow_model, save_shadow
from shadowpeft.checkpoint.store import head_modules, load_pretrained_shadow_into
from shadowpeft.train.baselines import baseline_parameter_counts, build_baseline, matched_lora_rank
from shadowpeft.train.datasets import TaskData
from shadowpeft.train.evaluation import evaluate
from shadowpeft.train.jobs import load_base
from shadowpeft.train.trainer import TrainSettings, TrainSummary, adapter_to_float32, run_training

DEFAULT_LR = {"lora": 1e-3, "dora": 1e-3, "shadow": 3e-3, "pretrain": 3e-3}  # see accuracy_report.TUNING
METHODS, ROWS, PRETRAIN, Unit = rep.METHODS, rep.ROWS, rep.PRETRAIN, rep.Unit


# ----------------------------------------------------------------------------------------- building


def build_model(unit: Unit, task: TaskData, setup: Setup, settings: BenchSettings, ranks: dict[str, int]):
    """Load a fresh base and wrap it for ``unit.method``; returns (model, tokenizer, param info)."""
    torch.manual_seed(unit.seed)  # fresh shadow / LoRA / score-head weights depend on the seed only
    base, tokenizer = load_base(setup.base_path, kind=task.kind, labels=task.labels, bf16=settings.bf16)
    if settings.bf16 and task.kind == "classification":
        base.score.float()  # the trained head keeps fp32 master weights, as the adapters do
    info: dict[str, Any] = {"adapter_params": 0, "head_params": 0, "rank": None}
    if unit.method in ("lora", "dora"):
        kind = "sequence-classification" if task.kind == "classification" else "causal-lm"
        model = build_baseline(base, unit.method, rank=ranks[unit.method], task=kind)
        counts = baseline_parameter_counts(model)
        info = {"adapter_params": counts.adapter, "head_params": counts.head, "rank": ranks[unit.method]}
    elif unit.method in ("shadow", "shadow-pretrained"):
        model = get_shadow_model(base, ShadowConfig.from_dict(settings.shadow_config))
        if settings.bf16:
            adapter_to_float32(model)
        if unit.method == "shadow-pretrained":
            load_pretrained_shadow_into(model, setup.pretrained_dir(unit.seed))
        trainable = count_parameters(model)[0]
        head = sum(p.numel() for m in head_modules(model).values() for p in m.parameters() if p.requires_grad)
        info = {"adapter_params": trainable - head, "head_params": head, "rank": None}
    else:
        model = base
    return model, tokenizer, info


class OnDevice(nn.Module):
    """Moves ``evaluate()``'s CPU batches to the model's device and its outputs back (bf16 autocast on request).

    ``shadowpeft.train.evaluation.evaluate`` builds its batches on the CPU and compares them with CPU labels.
    """

    def __init__(self, model: nn.Module, device: torch.device, *, bf16: bool) -> None:
        super().__init__()
        self.inner = model.to(device)
        self.device, self.bf16 = device, bf16

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _move(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def forward(self, **inputs: Any) -> SimpleNamespace:
        """The wrapped forward; only ``logits`` (fp32, on the CPU) come back, which is all evaluate() reads."""
        with self._autocast():
            logits = self.inner(**self._move(inputs)).logits
        return SimpleNamespace(logits=logits.float().cpu())

    def generate(self, **inputs: Any) -> torch.Tensor:
        """The wrapped ``generate``; token ids come back on the CPU."""
        with self._autocast():
            return self.inner.generate(**self._move(inputs)).cpu()


def train_settings(spec: TaskSpec, settings: BenchSettings, *, lr: float, seed: int) -> TrainSettings:
    """The optimisation settings shared by every method on a task (only ``lr`` differs)."""
    return TrainSettings(
        max_steps=spec.steps,
        batch_size=settings.batch_size,
        learning_rate=lr,
        warmup_ratio=settings.warmup_ratio,
        scheduler=settings.scheduler,  # type: ignore[arg-type]
        max_length=spec.max_length,
        eval_examples=None,
        logging_steps=max(1, spec.steps // 4),
        seed=seed,
        bf16=settings.bf16,
    )


def _train_quietly(model: nn.Module, task: TaskData, tokenizer: Any, ts: TrainSettings, work: Path) -> TrainSummary:
    """run_training without its own final evaluation (done here, device-safe); Trainer output in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints every log dict; losses are recorded
            return run_training(model, task, tokenizer, ts, work, eval_modes=())
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------- running


def run_method(unit: Unit, setup: Setup, settings: BenchSettings, ranks: dict[str, int]) -> list[dict[str, Any]]:
    """Train ``unit.method`` on its task (zero-shot: no training) and evaluate each of its rows."""
    spec = settings.task(unit.task)
    task = setup.task_data(spec)
    model, tokenizer, info = build_model(unit, task, setup, settings, ranks)
    lr = None if unit.method == "zero-shot" else settings.lr["shadow" if "shadow" in unit.method else unit.method]
    summary: TrainSummary | None = None
    start = time.perf_counter()
    if lr is not None:
        ts = train_settings(spec, settings, lr=lr, seed=unit.seed)
        summary = _train_quietly(model, task, tokenizer, ts, setup.work / f"train-{unit.task}-{unit.method}")
    train_s = time.perf_counter() - start
    wrapped = OnDevice(model, torch.device(settings.device), bf16=settings.bf16)
    common = {"task": unit.task, "method": unit.method, "seed": unit.seed, **info, "lr": lr}
    common |= _training_fields(summary, settings, spec) | {"train_s": train_s}
    rows = []
    for row, mode in ROWS[unit.method]:
        start = time.perf_counter()
        result = evaluate(wrapped, task, tokenizer, mode=mode, max_length=spec.max_length)
        rows.append(
            {**common, "row": row, "mode": mode, "accuracy": result.value, "examples": result.examples}
            | {"eval_s": time.perf_counter() - start}
        )
    return rows


def run_pretrain(unit: Unit, setup: Setup, settings: BenchSettings) -> dict[str, Any]:
    """Pretrain the shadow alone (detached, LM loss on its head) and save it for ``shadow-pretrained``.

    The same steps as ``shadowpeft pretrain-shadow`` (``jobs.train_job(detached_only=True)``), done here so
    that the perplexity evaluation goes through :class:`OnDevice`: train_job's evaluation feeds CPU batches
    to the model, which fails once the Trainer has moved it to a GPU.
    """
    spec = settings.pretrain
    task = setup.task_data(spec)
    torch.manual_seed(unit.seed)
    base, tokenizer = load_base(setup.base_path, kind=task.kind, bf16=settings.bf16)
    model = get_shadow_model(base, ShadowConfig.from_dict(settings.shadow_config))
    if settings.bf16:
        adapter_to_float32(model)
    model.inference_mode = "detached"
    ts = train_settings(spec, settings, lr=settings.lr[PRETRAIN], seed=unit.seed)
    summary = _train_quietly(model, task, tokenizer, ts, setup.work / "train-pretrain")
    start = time.perf_counter()
    wrapped = OnDevice(model, torch.device(settings.device), bf16=settings.bf16)
    ppl = evaluate(wrapped, task, tokenizer, mode="detached", max_length=spec.max_length)
    model.inference_mode = "attached"
    save_shadow(model.to("cpu"), setup.pretrained_dir(unit.seed), base_ref=settings.base, overwrite=True)
    entry = {"task": unit.task, "seed": unit.seed, "lr": settings.lr[PRETRAIN]}
    entry |= _training_fields(summary, settings, spec) | {"detached_perplexity": ppl.value}
    return entry | {"perplexity_examples": ppl.examples, "eval_s": time.perf_counter() - start}


def _training_fields(summary: TrainSummary | None, settings: BenchSettings, spec: TaskSpec) -> dict[str, Any]:
    """What a record keeps of a training run (zeros and None for the untrained zero-shot row)."""
    return {
        "trainable_params": summary.trainable_params if summary else 0,
        "steps": summary.steps if summary else 0,
        "batch_size": settings.batch_size,
        "max_length": spec.max_length,
        "seconds_per_step": summary.seconds_per_step if summary else None,
        "first_loss": summary.first_loss if summary else None,
        "final_loss": summary.final_loss if summary else None,
    }


# -------------------------------------------------------------------------------------------- planning


def estimate_s(unit: Unit, settings: BenchSettings, setup: Setup) -> float:
    """Predicted seconds of one unit on the reference CPU (see accuracy_report.estimate_s)."""
    spec = settings.task(unit.task)
    method = "shadow" if unit.method.startswith("shadow") else unit.method
    modes = ("detached",) if unit.method == PRETRAIN else tuple(mode or "attached" for _, mode in ROWS[unit.method])
    return rep.estimate_s(
        spec.kind,
        method,
        steps=0 if unit.method == "zero-shot" else spec.steps,
        eval_modes=modes,
        examples=len(setup.task_data(spec).test),
        tokens=settings.batch_size * spec.max_length,
    )


def matched_ranks(base_path: str, shadow_config: ShadowConfig) -> dict[str, Any]:
    """The shadow's adapter size on this base and the LoRA / DoRA ranks closest to it."""
    from shadowpeft.checkpoint.assets import resolve_base

    config = AutoConfig.from_pretrained(resolve_base(base_path), local_files_only=True)
    target = expected_parameter_counts(config, shadow_config).total
    return {
        "shadow_adapter_params": target,
        "lora": asdict(matched_lora_rank(config, target)),
        "dora": asdict(matched_lora_rank(config, target, dora=True)),
    }


# ----------------------------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Options:
    """Parsed command line."""

    smoke: bool
    device: str
    out_dir: Path
    tasks: tuple[str, ...] | None
    methods: tuple[str, ...] | None
    seeds: int | None
    steps: int | None
    pretrain_steps: int | None
    eval_examples: int | None
    batch_size: int | None
    lr: dict[str, float]
    threads: int | None
    resume: bool
    dry_run: bool
    command: str

    @property
    def profile(self) -> Profile:
        """The defaults these options start from."""
        return PROFILES["smoke" if self.smoke else self.device]

    @property
    def stem(self) -> str:
        """File stem of the outputs: ``accuracy`` or ``accuracy_smoke``."""
        return "accuracy_smoke" if self.smoke else "accuracy"


def make_settings(opts: Options, profile: Profile, base: str) -> BenchSettings:
    """Profile defaults with the command line's overrides applied."""
    names = [t.name for t in profile.tasks]
    unknown = [t for t in opts.tasks or () if t not in names]
    if unknown:
        raise click.BadParameter(
            f"unknown task(s) {unknown!r}; allowed here: {', '.join(names)}", param_hint="--tasks"
        )
    tasks = tuple(
        _override(t, opts.steps, opts.eval_examples) for t in profile.tasks if t.name in (opts.tasks or names)
    )
    pretrain = dataclasses.replace(profile.pretrain, steps=opts.pretrain_steps or profile.pretrain.steps)
    return BenchSettings(
        base=base,
        device=opts.device,
        bf16=opts.device == "cuda",
        batch_size=opts.batch_size or profile.batch_size,
        warmup_ratio=0.1,
        scheduler="cosine",
        lr=opts.lr,
        tasks=tasks,
        pretrain=pretrain,
        shadow_config=ShadowConfig().to_dict(),
    )


def _override(spec: TaskSpec, steps: int | None, eval_examples: int | None) -> TaskSpec:
    """``spec`` with the command line's steps and evaluation size (0: every test example)."""
    if eval_examples is not None:
        spec = dataclasses.replace(spec, eval_examples=eval_examples or None)
    return dataclasses.replace(spec, steps=steps or spec.steps)


@contextlib.contextmanager
def open_setup(smoke: bool, work: Path) -> Iterator[Setup]:
    """SmolLM2 and the built-in tasks, or (smoke) the toy base and data of tests/toy.py in a temp dir."""
    if not smoke:
        yield Setup("smollm2-135m-instruct", {name: name for name in ("sentiment", "intent", "shakespeare")}, work)
        return
    from tests import toy

    with tempfile.TemporaryDirectory(prefix="accuracy-smoke-") as tmp:
        base = toy.save_toy_base(Path(tmp) / "base")
        files = toy.write_toy_data(Path(tmp))
        yield Setup(str(base), {f"toy-{kind}": str(path) for kind, path in files.items()}, work)


def execute(todo: list[Unit], record: dict[str, Any], ctx: SimpleNamespace) -> None:
    """Run each pending unit, record it, rewrite the JSON, and print progress with a running ETA."""
    estimates = [estimate_s(u, ctx.settings, ctx.setup) for u in todo]
    ranks = {method: record["ranks"][method]["rank"] for method in ("lora", "dora")}
    elapsed = 0.0
    for i, unit in enumerate(todo):
        click.echo(f"[run {i + 1}/{len(todo)}] {unit.describe()} ...")
        start = time.perf_counter()
        if unit.method == PRETRAIN:
            entry = run_pretrain(unit, ctx.setup, ctx.settings)
            record["pretrain"] = [p for p in record["pretrain"] if p["seed"] != unit.seed] + [entry]
            outcome = f"detached perplexity {entry['detached_perplexity']:.1f}, {entry['seconds_per_step']:.2f} s/step"
        else:
            rows = run_method(unit, ctx.setup, ctx.settings, ranks)
            key = (unit.task, unit.method, unit.seed)
            record["runs"] = [r for r in record["runs"] if (r["task"], r["method"], r["seed"]) != key] + rows
            outcome = ", ".join(f"{r['row']} {r['accuracy']:.3f}" for r in rows)
            if rows[0]["seconds_per_step"] is not None:
                outcome += f" (loss {rows[0]['first_loss']:.3f} -> {rows[0]['final_loss']:.3f}, "
                outcome += f"{rows[0]['seconds_per_step']:.2f} s/step)"
        took = time.perf_counter() - start
        elapsed += took
        record["elapsed_s"] += took
        record["date"] = now()
        save_json(ctx.json_path, record)
        done_est, left_est = sum(estimates[: i + 1]), sum(estimates[i + 1 :])
        eta = left_est * elapsed / done_est if done_est else 0.0
        click.echo(
            f"    done in {rep.fmt_duration(took)}: {outcome} | elapsed {rep.fmt_duration(elapsed)}, "
            f"ETA {rep.fmt_duration(eta)}"
        )


def start_record(opts: Options, settings: BenchSettings, setup: Setup, json_path: Path) -> dict[str, Any]:
    """The record to continue (``--resume``) or a fresh one; a fresh one discards old pretrained shadows."""
    wanted = json.loads(json.dumps(asdict(settings)))
    record = load_for_resume(json_path, wanted) if opts.resume else None
    if record is None:
        if opts.resume:
            click.echo(f"nothing to resume at {json_path}; starting a new run")
        if not opts.dry_run:
            shutil.rmtree(setup.work, ignore_errors=True)
        ranks = matched_ranks(setup.base_path, ShadowConfig.from_dict(settings.shadow_config))
        plan = {"methods": list(opts.methods or METHODS), "seeds": opts.seeds or opts.profile.seeds}
        record = rep.new_record(wanted, smoke=opts.smoke, plan=plan, ranks=ranks)
    else:  # a resumed run keeps its plan unless told to add (or drop) seeds or methods
        plan = record["plan"]
        record["plan"] = {"methods": list(opts.methods or plan["methods"]), "seeds": opts.seeds or plan["seeds"]}
    record["commands"].append(opts.command)
    return record


def run_benchmark(opts: Options) -> dict[str, Any]:
    """Plan, resume, run what is missing, and write JSON, markdown and chart; returns the record."""
    json_path = opts.out_dir / f"{opts.stem}.json"
    # One thread for the toy model: more only adds OpenMP sync, and oversubscribes the cores under pytest -n.
    threads = opts.threads or (1 if opts.smoke else physical_cores())
    with open_setup(opts.smoke, opts.out_dir / f".{opts.stem}_work") as setup, speed.benchmark_settings(threads):
        base_name = "toy-llama (tests/toy.py)" if opts.smoke else setup.base_path
        settings = make_settings(opts, opts.profile, base_name)
        record = start_record(opts, settings, setup, json_path)
        device = torch.cuda.get_device_name(0) if opts.device == "cuda" else "cpu"
        record["machine"] = {**machine_info(threads), "device": device}
        tasks = [(t.name, t.kind) for t in settings.tasks]
        units = rep.plan_units(tasks, settings.pretrain.name, record["plan"]["methods"], record["plan"]["seeds"])
        for spec in (*settings.tasks, settings.pretrain):
            setup.task_data(spec)  # fail early on missing data, before hours of training
        todo = rep.pending(units, record, setup.has_pretrained)
        announce(todo, units, record, settings, setup)
        if opts.dry_run:
            return record
        ctx = SimpleNamespace(settings=settings, setup=setup, json_path=json_path)
        execute(todo, record, ctx)
        record["complete"] = not rep.pending(units, record, setup.has_pretrained)
    save_json(json_path, record)
    rep.write_reports(record, opts.out_dir / f"{opts.stem}.md", opts.out_dir / f"{opts.stem}.png")
    if record["complete"]:
        shutil.rmtree(setup.work, ignore_errors=True)
    return record


def announce(todo: list[Unit], units: list[Unit], record: dict, settings: BenchSettings, setup: Setup) -> None:
    """Print the plan and the time estimate; warn (and record) when other processes load the CPU."""
    calibrated = settings.device == "cpu" and not record["smoke"]
    estimates = [(u, estimate_s(u, settings, setup)) for u in todo]
    rep.announce(record, estimates, planned=len(units), calibrated=calibrated)
    busy = speed.busy_cores()
    if busy is not None and busy >= speed.BUSY_CORES:
        warning = f"other processes kept {busy:.2f} cores busy at the start: s/step figures will be inflated"
        record["warnings"].append(warning)
        click.echo(f"warning: {warning}", err=True)


def _csv(choices: tuple[str, ...] | None) -> Any:
    """A click callback parsing ``a,b,c`` into a tuple, checked against ``choices`` when given."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
        """``None`` when the option is not given."""
        if value is None:
            return None
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in items if choices is not None and v not in choices]
        if bad or not items:
            raise click.BadParameter(f"{value!r}: expected a comma-separated subset of {', '.join(choices or ())}")
        return items

    return parse


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--smoke", is_flag=True, help="Toy Llama and toy tasks from tests/toy.py (under a minute).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=RESULTS_DIR)
@click.option("--tasks", callback=_csv(None), help="Comma-separated [sentiment,intent; smoke: toy-*].")
@click.option("--methods", callback=_csv(METHODS), help=f"Comma-separated subset of {','.join(METHODS)} [all].")
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Seeds 0..N-1 [cpu 2, cuda 3, smoke 2].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps per training run [per task].")
@click.option("--pretrain-steps", type=click.IntRange(min=1), default=None, help="Shadow pretraining steps.")
@click.option("--eval-examples", type=click.IntRange(min=0), default=None, help="Test examples [per task]; 0: all.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[cpu 8, cuda 16].")
@click.option("--lr-lora", type=click.FloatRange(0, min_open=True), default=DEFAULT_LR["lora"], show_default=True)
@click.option("--lr-dora", type=click.FloatRange(0, min_open=True), default=DEFAULT_LR["dora"], show_default=True)
@click.option("--lr-shadow", type=click.FloatRange(0, min_open=True), default=DEFAULT_LR["shadow"], show_default=True)
@click.option(
    "--lr-pretrain", type=click.FloatRange(0, min_open=True), default=DEFAULT_LR["pretrain"], show_default=True
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads [physical cores; smoke 1].")
@click.option("--resume/--no-resume", default=False, help="Skip runs already recorded in the JSON.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the time estimate; run and write nothing.")
@click.pass_context
def cli(ctx: click.Context, **o: Any) -> None:
    """Accuracy of ShadowPEFT (attached, detached, pretrained shadow) vs LoRA and DoRA at matched budgets."""
    if o["device"] == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available here; use --device cpu", param_hint="--device")
    if o["device"] == "cpu" and torch.cuda.is_available():
        raise click.BadParameter(
            "a GPU is visible and the HF Trainer would use it; pass --device cuda, or hide it with "
            "CUDA_VISIBLE_DEVICES=",
            param_hint="--device",
        )
    lr = {k: o.pop(f"lr_{k}") for k in ("lora", "dora", "shadow", "pretrain")}
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    opts = Options(**o, lr=lr, command=ctx.obj)
    record = run_benchmark(opts)
    if opts.dry_run:
        return
    click.echo(rep.format_table(record))
    state = "complete" if record["complete"] else "INCOMPLETE (rerun with --resume)"
    click.echo(f"{state}; wrote {opts.out_dir / opts.stem}.json, .md and .png")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark CLI and return its exit code (130 on Ctrl-C: every finished run is already in the JSON)."""
    interrupted = "interrupted; rerun the same command with --resume to continue"
    return run_cli(cli, argv, module="benchmarks.accuracy", interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())

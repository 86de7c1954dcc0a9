"""``shadow-triton``: write a Triton Inference Server model repository for an export's cloud graph."""

from __future__ import annotations

from pathlib import Path

import click

from shadowpeft.export.errors import ExportError
from shadowpeft.export.triton import DEFAULT_MAX_SEQUENCE_IDLE_US, DEFAULT_MAX_SEQUENCES, DEFAULT_MODEL_NAME
from shadowpeft.runtime.cli_errors import cli_errors

__all__ = ["main"]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Repository directory to write.")
@click.option("--model-name", default=DEFAULT_MODEL_NAME, show_default=True, help="Triton model name.")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(1), help="Sequences per batch.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1), help="Model instances.")
@click.option(
    "--max-sequences",
    default=DEFAULT_MAX_SEQUENCES,
    show_default=True,
    type=click.IntRange(1),
    help="Sequences (devices) one instance holds; more wait in a backlog.",
)
@click.option(
    "--max-sequence-idle-us",
    default=DEFAULT_MAX_SEQUENCE_IDLE_US,
    show_default=True,
    type=click.IntRange(1),
    help="Idle microseconds after which a sequence and its KV cache are dropped.",
)
@click.option("--overwrite/--no-overwrite", default=False, help="Replace an existing repository directory.")
@cli_errors(ExportError, OSError, bad_parameter=(ValueError,))
def main(
    export_dir: Path,
    out: Path,
    model_name: str,
    max_batch_size: int,
    instances: int,
    max_sequences: int,
    max_sequence_idle_us: int,
    overwrite: bool,
) -> None:
    """Write a Triton model repository serving EXPORT_DIR's cloud/backbone graph.

    EXPORT_DIR is a directory written by `shadow-export --split`. Triton keeps each device's base
    KV cache as implicit sequence state; see README.md in the written repository.
    """
    from shadowpeft.export.triton import write_triton_repository

    write_triton_repository(
        export_dir,
        out,
        model_name=model_name,
        max_batch_size=max_batch_size,
        instances=instances,
        max_sequences=max_sequences,
        max_sequence_idle_us=max_sequence_idle_us,
        overwrite=overwrite,
    )
    click.echo(f"Wrote {out}. Serve it with: tritonserver --model-repository={out}")

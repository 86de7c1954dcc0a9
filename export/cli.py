"""``shadow-export``: parse options, run the export pipeline, print progress and a summary."""

from __future__ import annotations

import time
from pathlib import Path

import click

from shadowpeft.export.errors import ExportError
from shadowpeft.export.quantize.formats import FORMATS
from shadowpeft.runtime.cli_errors import cli_errors
from shadowpeft.runtime.errors import DeviceProfileError

__all__ = ["main"]

# --quantize value -> weight format, from the registry (none, int8, int4).
_WEIGHTS = {fmt.option: fmt.name for fmt in FORMATS.values()}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Export directory [CHECKPOINT-export].")
@click.option("--detached", "selections", flag_value="detached", multiple=True, help="On-device graph only.")
@click.option("--split", "selections", flag_value="split", multiple=True, help="Device and cloud graphs [default].")
@click.option("--coupled", "selections", flag_value="coupled", multiple=True, help="The single-machine graph.")
@click.option("--device", "device", default=None, help="Device profile: a name in devices/ or a .toml path.")
@click.option(
    "--quantize",
    type=click.Choice(list(_WEIGHTS)),
    default=None,
    help="Weights of the on-device graphs [the profile's, else none]. The cloud graph stays fp32 "
    "unless --quantize-cloud.",
)
@click.option(
    "--quantize-cloud",
    is_flag=True,
    help="Quantize cloud/backbone too, to the device graphs' weight format (default: it stays fp32).",
)
@click.option("--opset", default=18, show_default=True, type=click.IntRange(17, 23), help="ONNX opset.")
@click.option("--base", default=None, help="Base model to load instead of the one the checkpoint names.")
@click.option(
    "--tolerance",
    default=1e-4,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Largest |logit difference| allowed between the fp32 graphs and PyTorch.",
)
@click.option(
    "--ops",
    type=click.Choice(["auto", "fused", "standard"]),
    default="auto",
    show_default=True,
    help="Decoder layers as onnxruntime's fused operators (GroupQueryAttention, RotaryEmbedding, "
    "SkipSimplifiedLayerNormalization): auto = where the architecture allows, fused = or fail, "
    "standard = plain ONNX operators only (for providers without onnxruntime's contrib operators).",
)
@click.option("--overwrite/--no-overwrite", default=False, help="Replace an existing export directory.")
@cli_errors(ExportError, DeviceProfileError, OSError, ValueError)
def main(
    checkpoint: Path,
    out: Path | None,
    selections: tuple[str, ...],
    device: str | None,
    quantize: str | None,
    quantize_cloud: bool,
    opset: int,
    base: str | None,
    tolerance: float,
    ops: str,
    overwrite: bool,
) -> None:
    """Export a ShadowPEFT checkpoint to ONNX: the detached on-device shadow, the cloud backbone, or both.

    CHECKPOINT is a directory written by `shadowpeft train` or by the published shadow-peft package
    (then pass --base). Every graph is checked against PyTorch with onnxruntime before anything is
    written; the export directory appears only once it is complete.
    """
    _export(checkpoint, out, selections, device, quantize, quantize_cloud, opset, base, tolerance, ops, overwrite)


def _export(
    checkpoint, out, selections, device, quantize, quantize_cloud, opset, base, tolerance, ops, overwrite
) -> None:
    from shadowpeft.errors import AssetError, CheckpointError, UnsupportedArchitectureError
    from shadowpeft.export.pipeline import STAGES, ExportOptions, export_checkpoint
    from shadowpeft.export.report import summary_lines
    from shadowpeft.runtime.devices import load_device_profile

    profile = load_device_profile(device) if device else None
    out = out or checkpoint.with_name(checkpoint.name + "-export")
    options = ExportOptions(
        selections=tuple(dict.fromkeys(selections)) or ("split",),
        weights=_WEIGHTS[quantize] if quantize else None,
        profile=profile,
        opset=opset,
        base=base,
        overwrite=overwrite,
        tolerance=tolerance,
        ops=ops,
        quantize_cloud=quantize_cloud,
    )
    start = time.perf_counter()

    def progress(stage: str, detail: str) -> None:
        elapsed = time.perf_counter() - start
        click.echo(f"[{STAGES.index(stage) + 1}/{len(STAGES)} {stage:<8}] {detail}  ({elapsed:.0f}s)", err=True)

    try:
        manifest = export_checkpoint(checkpoint, out, options, progress=progress)
    except (CheckpointError, AssetError, UnsupportedArchitectureError) as err:
        raise ExportError(str(err)) from err
    for line in summary_lines(manifest, profile):
        click.echo(line)
    click.echo(f"Wrote {out} in {time.perf_counter() - start:.0f}s.")

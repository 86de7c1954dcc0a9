"""``shadow-run``: generate with an export on this machine, detached, coupled to a server, auto or speculative."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from shadowpeft.runtime.cli_errors import cli_errors
from shadowpeft.runtime.errors import DeviceProfileError, ExportLoadError, ManifestError, RuntimeGenerationError
from shadowpeft.runtime.graph_format import GRAPH_FORMATS
from shadowpeft.runtime.speculative import AUTO

__all__ = ["main"]


class _DraftTokens(click.ParamType):
    """``--draft-tokens``: an integer >= 1, or ``auto`` (the draft length adapts to the acceptance)."""

    name = "K"

    def convert(self, value, param, ctx) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif str(value).strip().lower() == AUTO:
            return AUTO
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a whole number of tokens; give an integer >= 1 (e.g. 4) or auto.")
        if number < 1:
            self.fail(f"{number} is too small; the shadow drafts at least 1 token per verify request.")
        return number


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", "prompts", multiple=True, help="A prompt; repeat for a batch.")
@click.option("--prompts-file", type=click.Path(path_type=Path), help="One prompt per line.")
@click.option(
    "--mode", type=click.Choice(["detached", "coupled", "auto", "speculative"]), default="detached", show_default=True
)
@click.option(
    "--draft-tokens",
    type=_DraftTokens(),
    default=None,
    help="speculative, and auto's cloud rounds: tokens the shadow drafts per verify request (an integer >= 1, "
    "or auto: 4 to start, +2 after a round fully accepted, -1 after a rejection, within 1..8) [4].",
)
@click.option(
    "--escalate-below",
    type=click.FloatRange(0, 1),
    default=None,
    help="auto: go to the cloud when the shadow's top-token probability is below P [the threshold the export's "
    "manifest carries from training; none there: every token goes to the cloud].",
    metavar="P",
)
@click.option(
    "--escalate",
    type=click.Choice(["token", "request"]),
    default=None,
    help="auto: decide at every token, or once per prompt at its first token [token].",
)
@click.option(
    "--cloud",
    type=click.Choice(["speculative", "coupled"]),
    default=None,
    help="auto: how escalated tokens use the server: draft-and-verify rounds, or one token per request [speculative].",
)
@click.option(
    "--server",
    default=None,
    help="shadow-serve URL for coupled/auto/speculative: http://HOST:8000, or grpc://HOST:PORT for its gRPC port "
    "(shadow-serve --grpc-port; grpcs:// with TLS).",
)
@click.option("--token", default=None, envvar="SHADOW_SERVE_TOKEN", help="Bearer token [env SHADOW_SERVE_TOKEN].")
@click.option("--wire", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--timeout", default=2.0, show_default=True, type=click.FloatRange(0, min_open=True), help="Seconds.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0: greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--repetition-penalty", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="Stop string; repeatable.")
@click.option("--chat/--no-chat", default=True, show_default=True, help="Apply the chat template.")
@click.option("--device", default=None, help="Device profile (providers, threads, max context).")
@click.option("--threads", default=None, type=click.IntRange(1), help="Override the profile's threads.")
@click.option("--provider", "providers", multiple=True, help="onnxruntime provider, repeatable [the profile's].")
@click.option(
    "--graph-format",
    type=click.Choice(GRAPH_FORMATS),
    default="auto",
    show_default=True,
    help="auto: load the .ort copies an export for an ort_format profile carries (the .onnx where a copy will "
    "not load, with a warning); onnx: ignore them; ort: require them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per token, then a summary.")
@cli_errors(ManifestError, DeviceProfileError, ExportLoadError, RuntimeGenerationError, ValueError, OSError)
def main(export_dir: Path, prompts, prompts_file, mode, server, token, wire, timeout, as_json, **options) -> None:
    """Generate text with EXPORT_DIR (written by shadow-export) using onnxruntime only, no torch.

    detached runs the device graphs alone. coupled sends each token and its shadow state to a
    shadow-serve backbone and applies the head locally (the server sees token ids and shadow
    states). speculative lets the shadow draft --draft-tokens tokens and has the server verify them
    in one request: the attached model's tokens (greedy: exactly coupled's), in fewer round trips.
    auto stays on the device while the shadow is confident (--escalate-below), goes to the server
    when it is not (--cloud), and answers on the device whenever the server does not answer within
    --timeout.
    """
    _run(export_dir, prompts, prompts_file, mode, server, token, wire, timeout, as_json, options)


def _run(export_dir, prompts, prompts_file, mode, server, token, wire, timeout, as_json, options) -> None:
    from shadowpeft.runtime.devices import load_device_profile
    from shadowpeft.runtime.export_dir import open_export
    from shadowpeft.runtime.generate import GenerationResult, Generator
    from shadowpeft.runtime.sampling import SamplingConfig
    from shadowpeft.runtime.tokenizer import RuntimeTokenizer

    texts = list(prompts) + (_read_prompts(prompts_file) if prompts_file else [])
    if not texts:
        raise click.UsageError("Give at least one --prompt or a --prompts-file.")
    if mode != "detached" and not server:
        raise click.UsageError(f"--mode {mode} needs --server URL (a running shadow-serve).")
    draft_tokens = options.pop("draft_tokens")
    if draft_tokens is not None and mode not in ("speculative", "auto"):
        raise click.UsageError(f"--draft-tokens applies to --mode speculative or auto only (got --mode {mode}).")
    escalation_options = {name: options.pop(name) for name in ("escalate_below", "escalate", "cloud")}
    for name, value in escalation_options.items():
        if value is not None and mode != "auto":
            raise click.UsageError(f"--{name.replace('_', '-')} applies to --mode auto only (got --mode {mode}).")
    profile = load_device_profile(options.pop("device")) if options.get("device") else None
    options.pop("device", None)
    providers = tuple(options.pop("providers")) or None
    # Spinning only pays in detached mode; otherwise the process waits on the server between runs.
    export = open_export(
        export_dir,
        profile=profile,
        threads=options.pop("threads"),
        providers=providers,
        spin_wait=mode == "detached",
        graph_format=options.pop("graph_format"),
    )
    tokenizer = RuntimeTokenizer.from_export(export.root, export.manifest)
    escalation = _policy(export, **escalation_options) if mode == "auto" else None
    if escalation is not None and not as_json:
        click.echo(_policy_line(escalation), err=True)
    client = _client(server, token, wire, timeout) if mode != "detached" else None
    chat = options.pop("chat")
    sampling = SamplingConfig(
        max_new_tokens=options["max_new_tokens"],
        temperature=options["temperature"],
        top_k=options["top_k"],
        top_p=options["top_p"],
        repetition_penalty=options["repetition_penalty"],
        seed=options["seed"],
        stop=tuple(options["stop"]),
    )
    generator = Generator(
        export,
        mode=mode,
        client=client,
        eos_ids=tokenizer.eos_ids,
        decode=tokenizer.decode,
        max_context=profile.max_context if profile else None,
        retry_interval_s=max(1.0, timeout),
        draft_tokens=draft_tokens or 4,
        escalation=escalation,
        cloud_wait_s=timeout,
    )
    announced: set[str] = set()  # fallback reasons already printed
    for index, text in enumerate(texts):
        result = GenerationResult(tokenizer.encode(text, chat=chat))
        if not as_json:
            click.echo(f"[{index}] ", nl=False)
        for event in generator.stream(result.prompt_ids, sampling, result):
            if as_json:
                record = {
                    "prompt": index,
                    "token_id": event.token_id,
                    "text": event.text,
                    "mode": event.mode,
                    "side": event.side,
                }
                click.echo(json.dumps(record))
            else:
                _announce_fallback(result, announced)
                click.echo(event.text, nl=False)
                sys.stdout.flush()
        if not as_json:
            _announce_fallback(result, announced)
        summary = _summary(index, result)
        click.echo(json.dumps(summary) if as_json else "")
        if not as_json:
            click.echo(_summary_line(summary), err=True)


def _policy(export, escalate_below: float | None, escalate: str | None, cloud: str | None):
    import dataclasses

    from shadowpeft.runtime.generate import default_policy

    policy = default_policy(export)
    if escalate_below is not None:
        policy = dataclasses.replace(policy, threshold=escalate_below, source="--escalate-below")
    return dataclasses.replace(policy, scope=escalate or "token", cloud=cloud or "speculative")


def _policy_line(policy) -> str:
    if policy.threshold is None:
        return (
            f"auto: no escalation threshold (the manifest carries none; --escalate-below P sets one): every token "
            f"goes to the server ({policy.cloud}), the device answers when it does not."
        )
    return (
        f"auto: on the device while the shadow's confidence >= {policy.threshold:.4g} ({policy.source}), "
        f"decided per {policy.scope}; below it the server ({policy.cloud})."
    )


def _client(server: str, token: str | None, wire: str, timeout: float):
    from shadowpeft.runtime.client import BackboneClient

    try:
        return BackboneClient(server, token=token, timeout=timeout, dtype=wire)
    except ModuleNotFoundError as err:  # grpc:// without grpcio installed
        raise click.BadParameter(str(err), param_hint="--server") from None


def _read_prompts(path: Path) -> list[str]:
    return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _summary(index: int, result) -> dict:
    tokens = len(result.token_ids)
    modes = {mode: result.modes.count(mode) for mode in dict.fromkeys(result.modes)}
    cloud = tokens - modes.get("detached", 0)
    return {
        "prompt": index,
        "summary": True,
        "prompt_tokens": len(result.prompt_ids),
        "new_tokens": tokens,
        "finish_reason": result.finish_reason,
        "tokens_by_mode": modes,
        "token_ids": list(result.token_ids),
        "round_trips": result.round_trips,
        "drafted": result.drafted,
        "accepted": result.accepted,
        "bytes_sent": result.bytes_sent,
        "bytes_received": result.bytes_received,
        "cloud_fraction": round(result.cloud_fraction, 4),
        "round_trips_per_token": round(result.round_trips / tokens, 4) if tokens else 0.0,
        "escalated": result.escalated,
        "fallbacks": result.fallbacks,
        "fallback_reason": result.fallback_reason,
        "session_restarts": result.restarts,
        "prefill_s": round(result.prefill_s, 4),
        "decode_tokens_per_s": round(result.tokens_per_s, 2),
        "bytes_per_cloud_token": round((result.bytes_sent + result.bytes_received) / cloud, 1) if cloud else 0,
    }


def _announce_fallback(result, announced: set[str]) -> None:
    """Prints (to stderr, once per reason) why auto mode answers on the device, as soon as it does."""
    reason = result.fallback_reason
    if reason and reason not in announced:
        announced.add(reason)
        click.echo(f"\nauto: answering on the device: {reason}", err=True)


def _summary_line(summary: dict) -> str:
    modes = ", ".join(f"{n} {m}" for m, n in summary["tokens_by_mode"].items()) or "none"
    line = (
        f"  {summary['new_tokens']} tokens ({modes}), {summary['decode_tokens_per_s']} tok/s, "
        f"finish: {summary['finish_reason']}"
    )
    if summary["escalated"]:
        line += f", {summary['escalated']} steps escalated, {summary['cloud_fraction']:.0%} of tokens from the cloud"
    if summary["fallbacks"]:
        line += f", fell back to detached {summary['fallbacks']}x"
    if summary["drafted"]:
        line += f", {summary['round_trips']} round trips, {summary['accepted']}/{summary['drafted']} drafts accepted"
    if summary["bytes_per_cloud_token"]:
        line += f", {summary['bytes_per_cloud_token']:.0f} B per cloud token on the wire"
    return line

"""``shadow-serve``: serve an export's ``cloud/backbone`` graph over KServe v2 HTTP, and gRPC with
``--grpc-port`` (coupled mode's cloud side)."""

from __future__ import annotations

import ipaddress
import json
import logging
from pathlib import Path

import click

from shadowpeft.runtime.cli_errors import cli_errors
from shadowpeft.runtime.errors import DeviceProfileError, ExportLoadError, ManifestError

__all__ = ["main"]

_DEFAULT_MAX_TOKENS = 4096
_DEFAULT_TOKENS_PER_REQUEST = 512  # BackboneClient sends prefill in chunks of 256 by default
_MIN_TOKEN_CHARS = 16
_SANE_CONTEXT = 1 << 20  # tokenizers store "unset" as a huge number; ignore anything above this
_SPARE_DESCRIPTORS = 64  # the export's files, logs, onnxruntime and the listening socket


class _Size(click.ParamType):
    """Bytes, written as a number or with a unit (``1GiB``, ``512MiB``, ``2GB``), at least ``minimum``."""

    name = "size"

    def __init__(self, minimum: int) -> None:
        self.minimum = minimum

    def convert(self, value, param, ctx) -> int:
        from shadowpeft.runtime.admission import parse_size

        try:
            size = value if isinstance(value, int) else parse_size(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)
        if size < self.minimum:
            self.fail(f"{value!r} is {size} bytes; use at least {self.minimum}.", param, ctx)
        return size


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--grpc-port",
    default=None,
    type=click.IntRange(0, 65535),
    help="Also serve KServe v2 over gRPC on this port (Triton's is 8001), with the same sessions, token and "
    "limits [off].",
)
@click.option("--token", default=None, envvar="SHADOW_SERVE_TOKEN", help="Bearer token [env SHADOW_SERVE_TOKEN].")
@click.option("--auth/--no-auth", default=True, show_default=True, help="--no-auth: loopback hosts only.")
@click.option("--max-sessions", default=64, show_default=True, type=click.IntRange(1))
@click.option(
    "--max-tokens-per-session",
    default=None,
    type=click.IntRange(1),
    help="Default: the --device profile's max_context, else the tokenizer's model_max_length, else 4096.",
)
@click.option(
    "--max-tokens-per-request",
    default=None,
    type=click.IntRange(1),
    help=f"Tokens one request may carry (longer prompts come in chunks). Default: {_DEFAULT_TOKENS_PER_REQUEST}, "
    "or --max-tokens-per-session if smaller.",
)
@click.option(
    "--kv-budget",
    default="1GiB",
    show_default=True,
    type=_Size(1),
    help="KV-cache bytes all sessions may hold together, e.g. 512MiB, 4GiB; past it idle sessions are evicted "
    "(least recently used first) or the step is refused with 503 + Retry-After.",
)
@click.option(
    "--memory-budget",
    default=None,
    type=_Size(1 << 20),
    help="Resident memory the whole server may hold, e.g. 2GiB. Checked at start against the loaded graphs, "
    "--kv-budget and --max-concurrent requests measured by a warm-up step; while serving, a request that would "
    "pass it gets 503 + Retry-After. Default: no process-wide check.",
)
@click.option("--idle-ttl", default=300.0, show_default=True, type=click.FloatRange(0, min_open=True), help="Seconds.")
@click.option(
    "--max-body-bytes",
    default=None,
    type=_Size(1024),
    help="Largest request body. Default: --max-tokens-per-request tokens at fp32, plus --max-json-bytes.",
)
@click.option(
    "--max-json-bytes",
    default="1MiB",
    show_default=True,
    type=_Size(1024),
    help="Largest JSON body (or JSON header of a binary one); parsing JSON costs ~14x its size.",
)
@click.option("--max-concurrent", default=4, show_default=True, type=click.IntRange(1), help="Requests in flight.")
@click.option(
    "--max-queued", default=64, show_default=True, type=click.IntRange(0), help="Requests waiting; then 503."
)
@click.option(
    "--max-connections",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Open connections at once; one more is answered 503 and closed.",
)
@click.option(
    "--read-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds a request's headers, then its body, may take to arrive (408 after).",
)
@click.option(
    "--keep-alive-timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds an idle connection stays open between requests.",
)
@click.option("--threads", default=None, type=click.IntRange(1), help="onnxruntime intra-op threads per run.")
@click.option("--device", default=None, help="Device profile for providers and threads (e.g. a GPU profile).")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), help="Serve HTTPS with this cert.")
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), help="Private key of --ssl-certfile.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@cli_errors(ManifestError, DeviceProfileError, ExportLoadError, OSError)
def main(export_dir: Path, host: str, port: int, token: str | None, auth: bool, **options) -> None:
    """Serve EXPORT_DIR's cloud/backbone graph to shadow-run --mode coupled|auto clients.

    The server sees every token id and shadow state its clients send; only detached mode keeps
    content on the device. Requests need 'Authorization: Bearer TOKEN' (except health checks).
    """
    token = _checked_auth(host, token, auth)
    _check_descriptors(options["max_connections"])
    if options["ssl_keyfile"] and not options["ssl_certfile"]:
        raise click.BadParameter("--ssl-keyfile needs --ssl-certfile.", param_hint="--ssl-keyfile")
    _serve(export_dir, host, port, token, options)


def _checked_auth(host: str, token: str | None, auth: bool) -> str | None:
    """The token to require, or ``None`` for --no-auth; refuses unsafe or contradictory settings."""
    if not auth:
        if not _is_loopback(host):
            raise click.BadParameter(
                f"--no-auth is allowed only on a loopback host (127.0.0.1, ::1, localhost); got --host {host!r}. "
                "Anyone who can reach the port could use the backbone and read what it returns. Set --token "
                "(or SHADOW_SERVE_TOKEN) instead.",
                param_hint="--no-auth",
            )
        if token:
            raise click.BadParameter(
                "--no-auth contradicts --token/SHADOW_SERVE_TOKEN; drop one.", param_hint="--no-auth"
            )
        return None
    if not token:
        raise click.BadParameter(
            "shadow-serve needs a bearer token: set SHADOW_SERVE_TOKEN (or --token), e.g. "
            "SHADOW_SERVE_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))'). "
            "On a loopback host, --no-auth turns authentication off.",
            param_hint="--token",
        )
    if len(token) < _MIN_TOKEN_CHARS:
        raise click.BadParameter(
            f"The token has {len(token)} characters; use at least {_MIN_TOKEN_CHARS} (a short token can be "
            "guessed), e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'.",
            param_hint="--token",
        )
    return token


def _check_descriptors(max_connections: int) -> None:
    """Makes sure this process may open the file descriptors --max-connections needs (``ulimit -n``).

    The server holds up to three times the cap at once (see runtime.connections); past the
    limit, accepting fails and every client, good ones included, waits. A soft limit below the need
    is raised up to the hard limit (as Go programs and nginx do; macOS starts shells at 256); a
    hard limit below it is refused.
    """
    try:
        import resource
    except ImportError:  # Windows has no descriptor limit of this kind
        return
    from shadowpeft.runtime.connections import DESCRIPTORS_PER_CONNECTION

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = DESCRIPTORS_PER_CONNECTION * max_connections + _SPARE_DESCRIPTORS
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard == resource.RLIM_INFINITY or needed <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return
    raise click.BadParameter(
        f"--max-connections {max_connections} needs up to {needed} file descriptors (connections served, "
        f"refused ones being closed and ones being accepted, plus {_SPARE_DESCRIPTORS} for the export and logs), "
        f"but this process may open at most {hard} (ulimit -Hn). Use --max-connections "
        f"{max(1, (hard - _SPARE_DESCRIPTORS) // DESCRIPTORS_PER_CONNECTION)} or less, or raise the hard limit.",
        param_hint="--max-connections",
    )


def _serve(export_dir: Path, host: str, port: int, token: str | None, options: dict) -> None:
    from shadowpeft.runtime.admission import RequestLimits
    from shadowpeft.runtime.connections import ConnectionLimits
    from shadowpeft.runtime.contract import CLOUD_BACKBONE, MODEL_NAME
    from shadowpeft.runtime.devices import load_device_profile
    from shadowpeft.runtime.export_dir import open_export
    from shadowpeft.runtime.kv import kv_bytes_per_token
    from shadowpeft.runtime.memory import MemoryBudgetTooSmall
    from shadowpeft.runtime.server import ServerConfig, create_app, run_server
    from shadowpeft.runtime.sessions import SessionLimits

    level = options["log_level"]
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    profile = load_device_profile(options["device"]) if options["device"] else None
    # No spin-waiting: the server idles between requests; no CPU arena: it would keep the memory of the
    # largest step ever run (runtime.export_dir.session_options).
    export = open_export(export_dir, profile=profile, threads=options["threads"], spin_wait=False, cpu_arena=False)
    max_tokens = options["max_tokens_per_session"] or _default_max_tokens(export.root, export.manifest, profile)
    limits = SessionLimits(options["max_sessions"], max_tokens, options["idle_ttl"], options["kv_budget"])
    per_request = options["max_tokens_per_request"] or min(_DEFAULT_TOKENS_PER_REQUEST, max_tokens)
    requests = RequestLimits(
        per_request,
        options["max_body_bytes"],
        options["max_json_bytes"],
        options["max_concurrent"],
        options["max_queued"],
    )
    per_token = kv_bytes_per_token(export.graph(CLOUD_BACKBONE)) if export.has(CLOUD_BACKBONE) else 0
    if per_request * per_token > limits.kv_budget_bytes:
        raise click.BadParameter(
            f"--kv-budget {limits.kv_budget_bytes} bytes cannot hold even one request of {per_request} tokens "
            f"({per_token} bytes of KV cache per token). Raise --kv-budget or lower --max-tokens-per-request.",
            param_hint="--kv-budget",
        )
    connections = ConnectionLimits(options["max_connections"], options["read_timeout"], options["keep_alive_timeout"])
    config = ServerConfig(token, limits, requests, connections, options["memory_budget"])
    try:
        app = create_app(export, config)
    except MemoryBudgetTooSmall as err:
        raise click.BadParameter(str(err), param_hint="--memory-budget") from None
    memory = app.state.backbone.memory
    scheme = "https" if options["ssl_certfile"] else "http"
    click.echo(
        f"shadow-serve: {export.root} as {MODEL_NAME!r} on {scheme}://{host}:{port} "
        f"(auth {'bearer token' if token else 'OFF'}; {limits.max_sessions} sessions x {max_tokens} tokens, "
        f"KV budget {limits.kv_budget_bytes} B = {limits.kv_budget_bytes // max(per_token, 1)} tokens in all "
        f"at {per_token} B/token, {per_request} tokens per request, {requests.max_concurrent} in flight, "
        f"idle TTL {limits.idle_ttl:g} s, {connections.max_connections} connections, read timeout "
        f"{connections.read_timeout:g} s, providers {', '.join(export.providers)}"
        + (_memory_line(memory.plan) if memory else "")
        + ")",
        err=True,
    )
    tls = {key: options[key] for key in ("ssl_certfile", "ssl_keyfile") if options[key]}
    grpc = _grpc_options(host, port, options["grpc_port"], tls)
    if grpc is not None:
        click.echo(f"shadow-serve: KServe v2 gRPC on {host}:{grpc.port} ({'TLS' if tls else 'plaintext'})", err=True)
    run_server(app, host=host, port=port, log_level=level, grpc=grpc, **tls)


def _grpc_options(host: str, http_port: int, port: int | None, tls: dict):
    """The gRPC service's options for ``--grpc-port`` (``None``: off); refuses it when gRPC is not installed."""
    if port is None:
        return None
    if port == http_port and port != 0:
        raise click.BadParameter(
            f"--grpc-port {port} is also the HTTP --port; give gRPC its own port (e.g. {port + 1}).",
            param_hint="--grpc-port",
        )
    from shadowpeft.runtime.grpc_server import GrpcOptions
    from shadowpeft.runtime.grpc_tensors import grpc_modules

    try:
        grpc_modules()
    except ModuleNotFoundError as err:
        raise click.BadParameter(str(err), param_hint="--grpc-port") from None
    return GrpcOptions(host, port, tls.get("ssl_certfile"), tls.get("ssl_keyfile"))


def _memory_line(plan) -> str:
    mib = 1 << 20
    return (
        f"; memory budget {plan.budget / mib:.0f} MiB: graphs {plan.baseline / mib:.0f} MiB + KV "
        f"{plan.kv_budget / mib:.0f} MiB + {plan.concurrent} x {plan.reserve / mib:.1f} MiB per request "
        f"= {plan.required / mib:.0f} MiB"
    )


def _default_max_tokens(root: Path, manifest, profile) -> int:
    """Default --max-tokens-per-session: the profile's max_context, the tokenizer's model_max_length, or 4096."""
    if profile is not None:
        return profile.max_context
    for relative in manifest.tokenizer_files:
        if Path(relative).name == "tokenizer_config.json":
            try:
                length = json.loads((root / relative).read_text(encoding="utf-8")).get("model_max_length")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(length, int) and 0 < length <= _SANE_CONTEXT:
                return length
    return _DEFAULT_MAX_TOKENS


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    main()

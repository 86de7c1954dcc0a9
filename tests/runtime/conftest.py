"""Shared by the runtime and server tests: a toy export (built once per test process) and a server in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class ToyExport:
    """The toy base, its checkpoint and an fp32 export with every graph (split + coupled)."""

    base: Path
    checkpoint: Path
    export: Path


@pytest.fixture(scope="session")
def toy_export(tmp_path_factory) -> ToyExport:
    from transformers import AutoModelForCausalLM

    from shadowpeft import get_shadow_model
    from shadowpeft.checkpoint.store import save_shadow
    from shadowpeft.export.pipeline import ExportOptions, export_checkpoint
    from tests.conftest import perturb
    from tests.toy import save_toy_base

    root = tmp_path_factory.mktemp("toy-export")
    base = save_toy_base(root / "base")
    model = perturb(get_shadow_model(AutoModelForCausalLM.from_pretrained(base)))
    save_shadow(model, root / "ckpt", base_ref=str(base))
    export_checkpoint(root / "ckpt", root / "export", ExportOptions(selections=("split", "coupled")))
    return ToyExport(base, root / "ckpt", root / "export")


@contextlib.contextmanager
def serve_in_thread(
    app: Any, *, port: int = 0, options: dict[str, Any] | None = None, grpc_port: int | None = None
) -> Iterator[str]:
    """Serves shadow-serve's ``create_app(...)`` with uvicorn in a daemon thread, as ``shadow-serve`` does.

    With the app's connection limits (:func:`~shadowpeft.runtime.server.serving_options`). Binds
    127.0.0.1:``port`` (0: any free port; SO_REUSEADDR, so a test can restart a server on the port it
    just used), waits until uvicorn has started, yields the base URL, and stops the server on exit.
    ``options`` replace the app's uvicorn options (e.g. to serve a stand-in app with given limits).
    With ``grpc_port`` (0: any free port) the gRPC service runs beside it on the same event loop, as
    ``shadow-serve --grpc-port`` runs it; its port is then ``app.state.grpc_port``.
    """
    import asyncio

    import uvicorn

    from shadowpeft.runtime.grpc_server import GrpcOptions
    from shadowpeft.runtime.server import serve, serving_options

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # proto: asyncio sets NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", **(serving_options(app) if options is None else options))
    )
    grpc = None if grpc_port is None else GrpcOptions("127.0.0.1", grpc_port)
    thread = threading.Thread(target=asyncio.run, args=(serve(server, grpc=grpc, sockets=[sock]),), daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server thread died before it started (see its traceback above)"
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()

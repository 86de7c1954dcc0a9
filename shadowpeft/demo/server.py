"""``shadow-serve`` as a subprocess of the main job: free loopback port, random bearer token, always stopped.

The token reaches the child through ``SHADOW_SERVE_TOKEN``, never argv (which other users can read).
The child gets its own session, so a terminal's Ctrl-C reaches only the main job, which then stops it
in order (SIGTERM, then SIGKILL); on Linux it also gets SIGTERM from the kernel if the main job dies
without stopping it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from shadowpeft.runtime.client import BackboneClient

__all__ = ["BackboneServer", "ServerStartError", "backbone_server", "free_port"]

logger = logging.getLogger(__name__)

SERVER_STOP_TIMEOUT_S = 10.0


class ServerStartError(RuntimeError):
    """``shadow-serve`` exited or did not become ready in time; the message ends with its log's tail."""


# Runs shadow-serve's CLI after asking Linux to SIGTERM it when the main job dies without stopping it
# (e.g. killed by the OOM killer); argv[1] is the parent's pid, to catch a parent that died first.
_SERVER_BOOT = """\
import ctypes, os, signal, sys
parent = int(sys.argv.pop(1))
if sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit(1)
from shadowpeft.runtime.serve_cli import main
main(prog_name="shadow-serve")
"""


class BackboneServer:
    """``shadow-serve EXPORT --host 127.0.0.1 --port FREE`` as a subprocess, with a random bearer token.

    The token reaches the child through ``SHADOW_SERVE_TOKEN``, not argv (which other users can read).
    The child has its own session, so a terminal's Ctrl-C reaches only the main job, which then stops
    it; :meth:`stop` is idempotent. Output goes to ``log_path``. ``options`` are more ``shadow-serve``
    options (e.g. ``["--kv-budget", "64MiB"]``).
    """

    def __init__(
        self,
        export_dir: Path,
        *,
        threads: int | None,
        log_path: Path,
        host: str = "127.0.0.1",
        options: Sequence[str] = (),
        log_level: str = "warning",
    ) -> None:
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.token = secrets.token_urlsafe(32)
        self.log_path = log_path
        command = [sys.executable, "-c", _SERVER_BOOT, str(os.getpid()), str(export_dir)]
        command += ["--host", host, "--port", str(self.port), "--log-level", log_level]
        command += ["--threads", str(threads)] if threads else []
        command += list(options)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                env={**os.environ, "SHADOW_SERVE_TOKEN": self.token},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout_s: float) -> None:
        """Poll ``/v2/health/ready`` (and the model's ready endpoint) until both answer 200.

        Raises:
            ServerStartError: The server exited, or was not ready within ``timeout_s``; with its log's tail.
        """
        deadline = time.monotonic() + timeout_s
        with BackboneClient(self.url, token=self.token, timeout=2.0, retries=0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise ServerStartError(
                        f"shadow-serve exited with status {code} before it was ready:\n{self.log_tail()}"
                    )
                if client.ready():
                    return
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"shadow-serve was not ready after {timeout_s:g} s (log: {self.log_path}):\n{self.log_tail()}"
                    )
                time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`SERVER_STOP_TIMEOUT_S` (or at once if interrupted meanwhile)."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning(
                "shadow-serve (pid %d) ignored SIGTERM for %g s; killing it", self.pid, SERVER_STOP_TIMEOUT_S
            )
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"


@contextlib.contextmanager
def backbone_server(
    export_dir: Path, *, threads: int | None, log_path: Path, options: Sequence[str] = (), log_level: str = "warning"
) -> Iterator[BackboneServer]:
    """A :class:`BackboneServer` that is stopped however the block ends (error, Ctrl-C, SIGTERM)."""
    server = BackboneServer(export_dir, threads=threads, log_path=log_path, options=options, log_level=log_level)
    try:
        yield server
    finally:
        server.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it; the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])

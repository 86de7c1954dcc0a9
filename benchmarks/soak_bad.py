"""The soak test's bad requests: one random malformed, hostile or abandoned request at a time (benchmarks/soak.py)."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

from benchmarks.soak_tally import BURST, INFER, TOKEN_CAP, Tally

# ------------------------------------------------------------------------------------------ bad requests


class Bad:
    """Sends one random bad request per :meth:`once` and tallies the answer."""

    def __init__(self, url: str, token: str, hidden: int, read_timeout: float, tally: Tally, seed: int) -> None:
        self.url, self.token, self.d, self.read_timeout, self.tally = url, token, hidden, read_timeout, tally
        self.host, self.port = url.removeprefix("http://").rsplit(":", 1)
        self.rng = random.Random(seed)
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0)
        self.kinds: dict[str, Callable[[], None]] = {
            name.removeprefix("kind_"): getattr(self, name) for name in sorted(dir(self)) if name.startswith("kind_")
        }

    def once(self) -> None:
        name = self.rng.choice(list(self.kinds))
        try:
            self.kinds[name]()
        except (httpx.HTTPError, OSError) as exc:
            self.tally.add("bad_transport_errors")
            with self.tally.lock:
                self.tally.bad_status[name][f"error:{type(exc).__name__}"] += 1

    def close(self) -> None:
        self.http.close()

    # ----- helpers
    def post(self, kind: str, body: bytes, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        response = self.http.post(INFER, content=body, headers=headers or {}, **kw)
        self.tally.response(kind, response.status_code, response.headers, response.content)
        return response

    def tensors(self, t: int, *, ids_dtype=np.int64, s0_dtype=np.float32, d: int | None = None):
        ids = np.asarray(self.rng.choices(range(5, 30), k=t), dtype=ids_dtype).reshape(1, t)
        return {"input_ids": ids, "shadow_states": np.zeros((1, t, d or self.d), dtype=s0_dtype)}

    def infer(self, kind: str, inputs, parameters: dict[str, Any], *, binary: bool = True) -> httpx.Response:
        from shadowpeft.runtime.protocol import HEADER_LENGTH, encode_request

        body, header = encode_request(inputs, parameters=parameters, binary=binary)
        headers = {HEADER_LENGTH: str(header), "Content-Type": "application/octet-stream"} if header else {}
        return self.post(kind, body, headers or {"Content-Type": "application/json"})

    def sid(self) -> int:
        return self.rng.randrange(1, 2**62)

    # ----- kinds (each a method named kind_*)
    def kind_malformed_json(self) -> None:
        self.post(
            "malformed_json", b'{"inputs": [{"name": "input_ids", "data": [1,', {"Content-Type": "application/json"}
        )

    def kind_deep_json(self) -> None:
        self.post("deep_json", b"[" * 200_000 + b"]" * 200_000, {"Content-Type": "application/json"})

    def kind_huge_integers(self) -> None:
        body = {
            "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 10**400], "data": [10**30]}],
            "parameters": {"sequence_id": 10**4000, "sequence_start": True},
        }
        self.post("huge_integers", json.dumps(body).encode(), {"Content-Type": "application/json"})

    def kind_bad_header_length(self) -> None:
        from shadowpeft.runtime.protocol import HEADER_LENGTH, encode_request

        body, _ = encode_request(self.tensors(2), parameters={"sequence_id": self.sid(), "sequence_start": True})
        value = self.rng.choice(["abc", "-1", "99999999999", "", "1e3", "0x10", str(len(body) + 1), "1" * 400])
        self.post("bad_header_length", body, {HEADER_LENGTH: value, "Content-Type": "application/octet-stream"})

    def kind_wrong_shape(self) -> None:
        inputs = self.tensors(3, d=self.d + 1)
        if self.rng.random() < 0.5:
            inputs = {"input_ids": np.zeros((2, 3), np.int64), "shadow_states": np.zeros((2, 3, self.d), np.float32)}
        self.infer("wrong_shape", inputs, {"sequence_id": self.sid(), "sequence_start": True})

    def kind_wrong_dtype(self) -> None:
        inputs = self.rng.choice([self.tensors(3, ids_dtype=np.float32), self.tensors(3, s0_dtype=np.int32)])
        self.infer("wrong_dtype", inputs, {"sequence_id": self.sid(), "sequence_start": True})

    def kind_unknown_sequence(self) -> None:
        self.infer("unknown_sequence", self.tensors(1), {"sequence_id": self.sid(), "sequence_offset": 5})

    def kind_stale_offset(self) -> None:
        sid = self.sid()
        self.infer("stale_offset_start", self.tensors(2), {"sequence_id": sid, "sequence_start": True})
        self.infer("stale_offset", self.tensors(1), {"sequence_id": sid, "sequence_offset": 100})
        self.infer("stale_offset_end", self.tensors(0), {"sequence_id": sid, "sequence_end": True})

    def kind_over_token_cap(self) -> None:
        self.infer("over_token_cap", self.tensors(TOKEN_CAP + 1), {"sequence_id": self.sid(), "sequence_start": True})

    def kind_oversized_body(self) -> None:
        if self.rng.random() < 0.5:  # a Content-Length far over the limit, with a short body behind it
            raw = self.raw(
                f"POST {INFER} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {self.token}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n{}"
            )
            self.raw_status("oversized_body", raw)
        else:  # a real body over --max-json-bytes (1 MiB)
            self.post(
                "oversized_body",
                b'{"inputs": [], "id": "' + b"x" * (2 << 20) + b'"}',
                {"Content-Type": "application/json"},
            )

    def kind_wrong_token(self) -> None:
        headers = self.rng.choice(
            [{"Authorization": "Bearer wrong"}, {"Authorization": ""}, {"Authorization": "Basic eA=="}]
        )
        with httpx.Client(base_url=self.url, timeout=30.0) as plain:
            response = plain.post(INFER, content=b"{}", headers={**headers, "Content-Type": "application/json"})
        self.tally.response("wrong_token", response.status_code, response.headers, response.content)

    def kind_foreign_origin(self) -> None:
        headers = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
        self.post("foreign_origin", b'{"inputs": []}', headers)

    def kind_trickle(self) -> None:  # partial headers, then silence: the server must answer 408 or close
        raw = self.raw(f"POST {INFER} HTTP/1.1\r\nHost: {self.host}\r\nContent-Le", hold=True)
        self.raw_status("trickle", raw)

    def kind_half_open(self) -> None:  # whole headers, a tenth of the body, then silence
        raw = self.raw(
            f"POST {INFER} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {self.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + "{" * 100,
            hold=True,
        )
        self.raw_status("half_open", raw)

    def kind_short_connections(self) -> None:
        for _ in range(20):
            raw = self.raw(
                f"GET /v2/health/live HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nConnection: close\r\n\r\n"
            )
            self.raw_status("short_connections", raw)

    def kind_abandoned_start(self) -> None:  # held until evicted (KV budget, slots) or expired (--idle-ttl)
        t = self.rng.choice([16, 128, TOKEN_CAP])
        self.infer("abandoned_start", self.tensors(t), {"sequence_id": self.sid(), "sequence_start": True})

    def kind_burst(self) -> None:  # more slow requests at once than --max-concurrent + --max-queued admit
        from shadowpeft.runtime.protocol import HEADER_LENGTH, encode_request

        def slow(body: bytes):  # the body trickles in, so that each request holds its place a while
            yield body[:8]
            time.sleep(0.3)
            yield body[8:]

        def one() -> None:
            body, header = encode_request(self.tensors(4), parameters={"sequence_id": self.sid()})
            headers = {HEADER_LENGTH: str(header), "Content-Type": "application/octet-stream"}
            try:  # an unknown sequence: 409 once admitted, 503 + Retry-After when every place is taken
                self.post("burst", slow(body), headers)
            except (httpx.HTTPError, OSError) as exc:
                self.tally.add("bad_transport_errors")
                with self.tally.lock:
                    self.tally.bad_status["burst"][f"error:{type(exc).__name__}"] += 1

        workers = [threading.Thread(target=one, daemon=True) for _ in range(BURST)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60.0)

    # ----- raw sockets
    def raw(self, text: str, *, hold: bool = False) -> bytes | None:
        """Sends ``text`` on a fresh connection; reads until closed. None: no answer nor close in time."""
        limit = (self.read_timeout + 10.0) if hold else 30.0
        with socket.create_connection((self.host, int(self.port)), timeout=limit) as sock:
            sock.sendall(text.encode())
            chunks: list[bytes] = []
            deadline = time.monotonic() + limit
            with contextlib.suppress(ConnectionResetError):
                while time.monotonic() < deadline:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        return None
                    if not chunk:
                        break
                    chunks.append(chunk)
                    if not hold and _complete(b"".join(chunks)):
                        break
            return b"".join(chunks)

    def raw_status(self, kind: str, raw: bytes | None) -> None:
        if raw is None:
            self.tally.add("hangs")
            self.tally.note("hangs", f"{kind}: no answer and no close within the read timeout + 10 s")
            with self.tally.lock:
                self.tally.bad_status[kind]["held"] += 1
            return
        if not raw:
            with self.tally.lock:
                self.tally.bad_status[kind]["closed"] += 1
            return
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        self.tally.response(kind, status, headers, body)


def _complete(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def bad_worker(url, token, hidden, read_timeout, until, tally: Tally, seed: int) -> None:
    bad = Bad(url, token, hidden, read_timeout, tally, seed)
    try:
        while time.monotonic() < until:
            bad.once()
            tally.add("bad_requests")
    finally:
        bad.close()

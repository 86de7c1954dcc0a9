"""An in-process stand-in for BackboneClient: runs the export's cloud/backbone graph per sequence.

Lets the runtime's coupled and auto logic be tested without a server; faults are switched on by
the test (``down``: every call raises ServerUnavailable; ``evict()``: every session is forgotten). Its
handshake compares the device manifest with its own export's, as a server's metadata would.
"""

from __future__ import annotations

import itertools

import numpy as np

from shadowpeft.runtime.contract import CLOUD_BACKBONE
from shadowpeft.runtime.errors import BackboneMismatch, ServerUnavailable, SessionLost
from shadowpeft.runtime.export_dir import ExportDir
from shadowpeft.runtime.handshake import METADATA_KEY, BackboneCheck, check_backbone
from shadowpeft.runtime.kv import KVCache
from shadowpeft.runtime.sessions import BackboneRunner


class LoopbackBackbone:
    def __init__(self, export: ExportDir) -> None:
        self.runner = BackboneRunner(export.session(CLOUD_BACKBONE), export.graph(CLOUD_BACKBONE))
        spec = export.graph(CLOUD_BACKBONE)
        self.identity = {  # what shadow-serve publishes in its model metadata
            "base_fingerprint": export.manifest.base_fingerprint,
            "graph_sha256": spec.sha256,
            "graph_external_data": dict(spec.external_data),
        }
        self.timeout: float | None = None  # auto mode: no total wait per step
        self.sessions: dict[int, KVCache] = {}
        self.down = False
        self.calls = 0
        self.ended: list[int] = []
        self.bytes_sent = self.bytes_received = 0
        self._ids = itertools.count(1)

    def verify_backbone(self, manifest, *, deadline: float | None = None) -> BackboneCheck:
        if self.down:
            raise ServerUnavailable("loopback backbone is down")
        check = check_backbone(manifest, {METADATA_KEY: self.identity}, url="loopback")
        if not check.matches:
            raise BackboneMismatch(check.mismatch())
        return check

    def new_sequence_id(self) -> int:
        return next(self._ids)

    def evict(self) -> None:
        self.sessions.clear()

    def step(
        self,
        sequence_id: int,
        input_ids: np.ndarray,
        shadow_states: np.ndarray,
        *,
        start: bool,
        deadline: float | None = None,
    ) -> np.ndarray:
        self.calls += 1
        if self.down:
            raise ServerUnavailable("loopback backbone is down")
        if start:
            self.sessions[sequence_id] = self.runner.empty_past()
        if sequence_id not in self.sessions:
            raise SessionLost(f"unknown sequence {sequence_id}")
        hidden, self.sessions[sequence_id] = self.runner.run(self.sessions[sequence_id], input_ids, shadow_states)
        self.bytes_sent += input_ids.nbytes + shadow_states.astype(np.float16).nbytes
        self.bytes_received += hidden.astype(np.float16).nbytes
        return hidden

    def end(self, sequence_id: int, **options) -> None:
        if self.down:
            raise ServerUnavailable("loopback backbone is down")
        self.ended.append(sequence_id)
        self.sessions.pop(sequence_id, None)

    def rewind(self, sequence_id: int, length: int) -> None:
        """The server side of a rollback, done at once (a real server trims on the next request's offset)."""
        if sequence_id in self.sessions:
            self.sessions[sequence_id].trim(self.sessions[sequence_id].length - length)

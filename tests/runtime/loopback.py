"""An in-process stand-in for BackboneClient: runs the export's cloud/backbone graph per sequence.

Lets the runtime's coupled and auto logic be tested without a server; faults are switched on by
the test (``down``: every call raises ServerUnavailable; ``evict()``: every session is forgotten).
"""

from __future__ import annotations

import itertools

import numpy as np

from shadowpeft.runtime.errors import ServerUnavailable, SessionLost
from shadowpeft.runtime.export_dir import ExportDir


class LoopbackBackbone:
    def __init__(self, export: ExportDir) -> None:
        self.spec = export.graph("cloud/backbone")
        self.session = export.session("cloud/backbone")
        self.sessions: dict[int, dict[str, np.ndarray]] = {}
        self.down = False
        self.calls = 0
        self.bytes_sent = self.bytes_received = 0
        self._ids = itertools.count(1)

    def new_sequence_id(self) -> int:
        return next(self._ids)

    def evict(self) -> None:
        self.sessions.clear()

    def step(self, sequence_id: int, input_ids: np.ndarray, shadow_states: np.ndarray, *, start: bool) -> np.ndarray:
        self.calls += 1
        if self.down:
            raise ServerUnavailable("loopback backbone is down")
        if start:
            self.sessions[sequence_id] = {
                t.name: np.zeros((1, t.shape[1], 0, t.shape[3]), np.float32)
                for t in self.spec.inputs
                if t.name.startswith("past_key_values.")
            }
        if sequence_id not in self.sessions:
            raise SessionLost(f"unknown sequence {sequence_id}")
        past = self.sessions[sequence_id]
        length = next(iter(past.values())).shape[2] + input_ids.shape[1]
        feeds = {
            "input_ids": input_ids,
            "shadow_states": shadow_states.astype(np.float32),
            "attention_mask": np.ones((1, length), np.int64),
            "position_ids": np.arange(length - input_ids.shape[1], length, dtype=np.int64)[None],
            **past,
        }
        names = [t.name for t in self.spec.outputs]
        out = dict(zip(names, self.session.run(names, feeds), strict=True))
        for name in past:
            past[name] = out[name.replace("past_key_values", "present")]
        self.bytes_sent += input_ids.nbytes + shadow_states.astype(np.float16).nbytes
        self.bytes_received += out["hidden_states"].astype(np.float16).nbytes
        return out["hidden_states"]

    def end(self, sequence_id: int) -> None:
        self.sessions.pop(sequence_id, None)

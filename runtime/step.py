"""The two halves of a decode step: the device shadow graph, and the link to the cloud backbone.

:class:`DeviceShadow` runs ``device/shadow`` for a batch, keeping the shadow KV cache. Its
``shadow_states`` (s0) rows are what coupled mode sends up. :class:`CloudLink` owns one remote
sequence: it remembers every (token, s0) the device has processed and how many of them the server
holds, so a step after a restart, an eviction or a detached stretch simply sends what is missing
(with ``sequence_start`` when the server holds nothing), then applies ``device/head`` to the
returned final hidden state.

Before its first request the link checks that the server runs this export's backbone (the
handshake, runtime/handshake.py); a request may carry a deadline (auto mode's wait per step), and
closing is best effort (one request with no retry, none when the server was just found gone).
"""

from __future__ import annotations

import numpy as np

from shadowpeft.runtime.contract import (
    ATTENTION_MASK,
    DEVICE_HEAD,
    DEVICE_SHADOW,
    HIDDEN_STATES,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    SHADOW_STATES,
    positions_for,
)
from shadowpeft.runtime.export_dir import ExportDir
from shadowpeft.runtime.kv import KVCache

__all__ = ["CloudLink", "DeviceShadow"]

_ABANDON_TIMEOUT_S = 0.5  # ending a sequence after a failure must not hold up the fallback to the device


class DeviceShadow:
    """``device/shadow`` with its KV cache for a batch of sequences (left-padded)."""

    def __init__(self, export: ExportDir, batch: int) -> None:
        self.spec = export.graph(DEVICE_SHADOW)
        self.session = export.session(DEVICE_SHADOW)
        self.outputs = list(self.spec.output_names)
        self.cache = KVCache.empty(self.spec, batch)
        self.mask = np.zeros((batch, 0), dtype=np.int64)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def trim(self, n: int) -> None:
        """Forgets the last ``n`` positions (cache and mask), e.g. rejected draft tokens."""
        self.cache.trim(n)
        self.mask = self.mask[:, : self.mask.shape[1] - n]

    def step(self, ids: np.ndarray, real: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Feeds ``ids`` (B, T); ``real`` (B, T) marks non-padding (default: all real).

        Returns:
            Shadow logits (B, T, V) and ``s0`` (B, T, d).
        """
        real = np.ones_like(ids) if real is None else real.astype(np.int64)
        self.mask = np.concatenate([self.mask, real], axis=1)
        feeds = {
            INPUT_IDS: ids.astype(np.int64),
            ATTENTION_MASK: self.mask,
            POSITION_IDS: positions_for(self.mask, ids.shape[1]),
        }
        values = self.cache.step(self.session, self.outputs, feeds)
        return values[LOGITS], values[SHADOW_STATES]


class CloudLink:
    """One sequence on the remote backbone (batch 1), resumable after a restart or an eviction.

    Before its first request the link makes the handshake (:meth:`handshake`): the server must run
    the backbone of this export.

    Args:
        export: The export (for ``device/head``, and its manifest for the handshake).
        client: A :class:`~shadowpeft.runtime.client.BackboneClient`.
    """

    def __init__(self, export: ExportDir, client) -> None:
        self.client = client
        self.manifest = export.manifest
        self.head = export.session(DEVICE_HEAD)
        self.ids: list[int] = []
        self.states: list[np.ndarray] = []  # one (d,) s0 row per processed token
        self.synced = 0  # tokens the server holds for `sequence_id`
        self.sequence_id: int | None = None
        self.restarts = 0
        self.checked = False  # the handshake passed
        self.unreachable = False  # the last request found no server: close() does not try to end the sequence

    def handshake(self, *, deadline: float | None = None) -> None:
        """Checks, once per link (the client fetches the metadata once), that the server runs this export's backbone.

        Raises:
            BackboneMismatch: It runs another one; the message says what differs and what to do.
            ServerUnavailable, ServerRejected: From the client.
        """
        from shadowpeft.runtime.errors import ServerUnavailable

        if self.checked:
            return
        try:
            self.client.verify_backbone(self.manifest, deadline=deadline)
        except ServerUnavailable:
            self.unreachable = True
            raise
        self.checked, self.unreachable = True, False

    def record(self, ids: np.ndarray, s0: np.ndarray) -> None:
        """Remembers tokens the device processed: ``ids`` (T,), ``s0`` (T, d)."""
        self.ids.extend(int(i) for i in ids)
        self.states.extend(np.asarray(s0, dtype=np.float32))

    def rollback(self, n: int) -> None:
        """Forgets the last ``n`` recorded tokens (rejected drafts); the server drops them on the next step."""
        if not 0 <= n <= len(self.ids):
            raise ValueError(f"rollback(n) takes 0 <= n <= {len(self.ids)} (the tokens recorded); got {n!r}.")
        del self.ids[len(self.ids) - n :], self.states[len(self.states) - n :]
        if self.synced > len(self.ids):
            self.synced = len(self.ids)
            if self.sequence_id is not None:
                self.client.rewind(self.sequence_id, self.synced)  # the next step carries this sequence_offset

    def logits(self, *, deadline: float | None = None) -> np.ndarray:
        """Base logits (V,) at the last recorded token; sends the server whatever it is missing.

        Args:
            deadline: ``time.monotonic()`` by which the server must have answered, retries and re-prefills
                included (``None``: the client's timeout and retries per request).

        Raises:
            BackboneMismatch: The handshake found another backbone on the server.
            ServerUnavailable, ServerRejected: From the client; the caller decides (fail or fall back).
        """
        return self.verify(1, deadline=deadline)[0]

    def verify(self, last: int, *, deadline: float | None = None) -> np.ndarray:
        """Base logits (last, V) at the last ``last`` recorded tokens, in one request (plus what the server
        is missing); they must all be new to the server, e.g. a pending token and the drafts after it.

        Args:
            last: How many of the last recorded tokens to return logits for.
            deadline: As :meth:`logits`.

        Raises:
            BackboneMismatch: The handshake found another backbone on the server.
            ServerUnavailable, ServerRejected: From the client; the caller decides (fail or fall back).
        """
        from shadowpeft.runtime.errors import ServerUnavailable, SessionLost

        if not 1 <= last <= len(self.ids) - self.synced:
            raise ValueError(f"verify(last) needs 1 <= last <= {len(self.ids) - self.synced} (unsent); got {last}.")
        self.handshake(deadline=deadline)
        for _attempt in range(2):
            start = self.sequence_id is None or self.synced == 0
            if start:
                self.sequence_id, self.synced = self.client.new_sequence_id(), 0
            ids = np.asarray([self.ids[self.synced :]], dtype=np.int64)  # (1, T)
            states = np.stack(self.states[self.synced :])[None]  # (1, T, d)
            try:
                hidden = self.client.step(self.sequence_id, ids, states, start=start, deadline=deadline)
            except SessionLost:
                self.synced, self.restarts = 0, self.restarts + 1  # evicted or restarted: re-prefill
                continue
            except ServerUnavailable:
                self.unreachable = True
                raise
            self.synced, self.unreachable = len(self.ids), False
            (logits,) = self.head.run([LOGITS], {HIDDEN_STATES: hidden[:, -last:].astype(np.float32)})
            return logits[0]
        raise SessionLost("The server lost this sequence again right after a re-prefill.")

    def abandon(self) -> None:
        """Gives the remote sequence up after the server failed (auto mode falls back to the device): ends it
        with one short try, so that it does not hold a session and its KV cache until the server's idle TTL;
        the next step starts a fresh sequence and re-sends the whole history."""
        if self.sequence_id is not None and not self.unreachable:
            self._end(timeout=_ABANDON_TIMEOUT_S, retries=0)
        self.sequence_id, self.synced = None, 0

    def close(self) -> None:
        """Ends the remote sequence, best effort: one request with no retry (the client's ``end``), and none when the
        last request found no server (the server's idle TTL frees the sequence otherwise)."""
        if self.sequence_id is not None and self.synced and not self.unreachable:
            self._end()
        self.sequence_id, self.synced = None, 0

    def _end(self, **options) -> None:
        try:
            self.client.end(self.sequence_id, **options)
        except Exception:  # noqa: BLE001 - the server may be gone; nothing else to free here
            pass

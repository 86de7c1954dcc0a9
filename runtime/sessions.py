"""Per-sequence base KV caches of the backbone server, and the one call that advances them.

One :class:`Session` per client sequence (batch 1, no padding). A step feeds T new tokens::

    input_ids (1,T) + shadow_states (1,T,d) + attention_mask ones(1,P+T) + position_ids P..P+T-1
      + past_key_values.* (1,h,P,dh)  --cloud/backbone-->  hidden_states (1,T,d) + present.* (1,h,P+T,dh)

and the ``present.*`` outputs become the next step's ``past_key_values.*``. The cache is replaced
only after the graph succeeds, so a failed step leaves the sequence as it was.

:class:`SessionTable` enforces the limits: at most ``max_sessions`` sequences, at most ``max_tokens``
per sequence, at most ``kv_budget_bytes`` of KV cache in all (tokens held x the graph's KV bytes per
token), and an idle TTL. A step that needs room evicts idle sequences, least recently used first,
only when that makes enough room; otherwise it is refused (503) and nothing changes. It is
used from the server's event loop only, so it needs no lock; each sequence has an
:class:`asyncio.Lock` that serializes its steps while different sequences run concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from shadowpeft.runtime.contract import (
    ATTENTION_MASK,
    CLOUD_BACKBONE,
    HIDDEN_STATES,
    INPUT_IDS,
    POSITION_IDS,
    SHADOW_STATES,
    GraphSpec,
    is_past_name,
    present_name_for,
)
from shadowpeft.runtime.errors import ExportLoadError, ServerRejected, SessionLost, format_problems
from shadowpeft.runtime.kv import KVCache, kv_inputs

__all__ = [
    "BackboneRunner",
    "Session",
    "SequenceId",
    "SessionLimits",
    "SessionTable",
    "TableStats",
]

logger = logging.getLogger(__name__)

_NUMPY = {"float32": np.float32, "float16": np.float16}
_GONE_MEMORY = 4096  # ids of recently removed sequences, so their owners learn why
RETRY_AFTER_S = 1  # Retry-After of a refusal for want of room: idle sequences expire, busy ones finish

SequenceId = int | str


class BackboneRunner:
    """Calls the ``cloud/backbone`` graph for one sequence step (thread-safe: onnxruntime's ``run`` is).

    Args:
        session: The graph's onnxruntime session.
        spec: The graph's manifest entry.

    Raises:
        ExportLoadError: If the graph's inputs and outputs are not those of a cloud backbone.
    """

    def __init__(self, session: ort.InferenceSession, spec: GraphSpec) -> None:
        _check_backbone(spec)
        self.session = session
        self.spec = spec
        states = next(s for s in spec.inputs if s.name == SHADOW_STATES)
        self.hidden_size: int = states.shape[2]
        self.states_dtype = _NUMPY[states.dtype]
        self.outputs = [HIDDEN_STATES, *(present_name_for(s.name) for s in kv_inputs(spec))]

    def empty_past(self) -> KVCache:
        """A KV cache holding no tokens (past length 0)."""
        return KVCache.empty(self.spec, 1)

    def run(self, past: KVCache, ids: np.ndarray, s0: np.ndarray) -> tuple[np.ndarray, KVCache]:
        """One step: T new tokens after the P in ``past`` (which is left unchanged).

        Args:
            past: The sequence's cache, ``past_key_values.*`` -> (1, h, P, dh).
            ids: (1, T) int64.
            s0: (1, T, d) shadow states.

        Returns:
            ``hidden_states`` (1, T, d) float32 and the new cache (1, h, P+T, dh).
        """
        length, steps = past.length, ids.shape[1]
        feeds = {
            INPUT_IDS: ids.astype(np.int64, copy=False),
            SHADOW_STATES: s0.astype(self.states_dtype, copy=False),
            ATTENTION_MASK: np.ones((1, length + steps), dtype=np.int64),
            POSITION_IDS: np.arange(length, length + steps, dtype=np.int64)[None],
        }
        values, present = past.run(self.session, self.outputs, feeds)
        return values[HIDDEN_STATES].astype(np.float32, copy=False), present


def _check_backbone(spec: GraphSpec) -> None:
    wanted = (INPUT_IDS, SHADOW_STATES, ATTENTION_MASK, POSITION_IDS)
    problems = [f"input {name!r} is missing" for name in wanted if name not in spec.input_names]
    if HIDDEN_STATES not in spec.output_names:
        problems.append(f"output {HIDDEN_STATES!r} is missing")
    for item in spec.inputs:
        if is_past_name(item.name) and present_name_for(item.name) not in spec.output_names:
            problems.append(f"input {item.name!r} has no matching {present_name_for(item.name)!r} output")
        if is_past_name(item.name) and (len(item.shape) != 4 or item.dtype not in _NUMPY):
            problems.append(f"input {item.name!r} must be a float32/float16 (batch, heads, past, head_dim) cache")
        if item.name == SHADOW_STATES and (len(item.shape) != 3 or not isinstance(item.shape[2], int)):
            problems.append(f"input {SHADOW_STATES!r} must have a fixed width: shape (batch, seq, d)")
        if item.name == SHADOW_STATES and item.dtype not in _NUMPY:
            problems.append(f"input {SHADOW_STATES!r} has dtype {item.dtype}; expected float32 or float16")
    if problems:
        header = f"{spec.file} is not a {CLOUD_BACKBONE} graph this server can run; re-export with --split:"
        raise ExportLoadError(format_problems(header, problems))


@dataclass(frozen=True)
class SessionLimits:
    """Limits of the session table.

    Attributes:
        max_sessions: Sequences held at once; a new one evicts the least recently used idle one.
        max_tokens: Tokens one sequence may hold (prompt + generated).
        idle_ttl: Seconds a sequence may stay idle before it is dropped.
        kv_budget_bytes: KV-cache bytes all sequences may hold together (tokens held x the graph's
            KV bytes per token); a step beyond it evicts idle sequences if that makes room, else is refused.
    """

    max_sessions: int = 64
    max_tokens: int = 4096
    idle_ttl: float = 300.0
    kv_budget_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_tokens < 1 or not self.idle_ttl > 0 or self.kv_budget_bytes < 1:
            raise ValueError(f"Limits must be positive; got {self}.")


@dataclass(eq=False)  # identity: a restarted id gets a new Session, and the table tells them apart
class Session:
    """One client sequence: its base KV cache and accounting.

    Attributes:
        sequence_id: The client's id.
        past: The base KV cache, ``past_key_values.*`` -> (1, h, P, dh).
        length: P, the tokens the cache holds.
        last_used: ``time.monotonic()`` of the last request.
        busy: Requests in flight or waiting for ``lock`` (a busy sequence is never evicted).
        reserved: Tokens the step in flight will leave it holding (admitted against the KV budget).
        bytes_in: Request body bytes received for this sequence.
        bytes_out: Response body bytes sent for it.
        steps: Graph calls made for it.
        last_step: ``(offset, tokens, digest, hidden)`` of the last step (``digest``: a hash of its
            inputs), so that a retry of it (its response was lost) is answered again, not appended twice.
    """

    sequence_id: SequenceId
    past: KVCache
    last_used: float
    length: int = 0
    busy: int = 0
    reserved: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    steps: int = 0
    last_step: tuple[int, int, bytes, np.ndarray] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def replay(self, offset: int, tokens: int, digest: bytes) -> np.ndarray | None:
        """The last step's hidden states if a request at ``offset`` repeats it exactly, else ``None``."""
        if self.last_step is None or self.length != offset + tokens:
            return None
        return self.last_step[3] if self.last_step[:3] == (offset, tokens, digest) else None


@dataclass
class TableStats:
    """Counters of a :class:`SessionTable` since the server started.

    ``refused`` counts refused requests by reason (the table's: ``sessions``, ``kv_budget``; the
    server adds its own, e.g. ``tokens_per_request``, ``body_bytes``, ``busy``).
    """

    started: int = 0
    ended: int = 0
    evicted: int = 0
    expired: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    refused: Counter[str] = field(default_factory=Counter)


class SessionTable:
    """The server's sequences, with limits; see the module docstring.

    A step is admitted before it runs and committed once it succeeded::

        open(id) (sequence_start: a new Session outside the table) | get(id) (a live one)
          -> admit(session, tokens)   room for a slot and the KV bytes, or 503: evicts idle LRU
                                      sequences only when that makes enough room
          -> commit(session, past, n) the step succeeded: a started session enters the table,
                                      replacing the old one under its id
          -> release(session)         always; a start that never committed leaves no trace

    so a refused or failed start takes no slot, evicts nobody and leaves a restarted id's old
    sequence usable.

    Args:
        limits: Max sessions, max tokens, idle TTL, KV budget.
        new_past: Returns an empty KV cache.
        kv_bytes_per_token: KV-cache bytes per token of one sequence (see
            :func:`~shadowpeft.runtime.kv.kv_bytes_per_token`).
        clock: Seconds, monotonic (tests pass a fake).
    """

    def __init__(
        self,
        limits: SessionLimits,
        new_past: Callable[[], KVCache],
        *,
        kv_bytes_per_token: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.stats = TableStats()
        self.kv_bytes_per_token = kv_bytes_per_token
        self._new_past = new_past
        self._clock = clock
        self._live: OrderedDict[SequenceId, Session] = OrderedDict()  # least recently used first
        self._admitted: list[Session] = []  # started sessions admitted but not yet committed
        self._gone: OrderedDict[SequenceId, str] = OrderedDict()  # why recent ids were removed

    def __len__(self) -> int:
        return len(self._live)

    def open(self, sequence_id: SequenceId) -> Session:
        """A fresh sequence for ``sequence_start``, held as busy until :meth:`release`.

        It stays outside the table (no slot taken, nobody evicted, a live sequence under the same id
        untouched) until :meth:`admit` and :meth:`commit`.
        """
        return Session(sequence_id, self._new_past(), self._clock(), busy=1)

    def get(self, sequence_id: SequenceId) -> Session:
        """The live sequence ``sequence_id``, held as busy until :meth:`release`.

        Raises:
            SessionLost: It was never started, was evicted, expired or ended: re-prefill with sequence_start.
        """
        sequence = self._live.get(sequence_id)
        if sequence is not None and sequence.busy == 0 and self._clock() - sequence.last_used > self.limits.idle_ttl:
            self._remove(sequence_id, f"it was idle for more than {self.limits.idle_ttl:g} s (--idle-ttl)")
            self.stats.expired += 1
            sequence = None
        if sequence is None:
            why = self._gone.get(sequence_id, "this server does not know it (never started, or the server restarted)")
            raise SessionLost(
                f"Sequence {sequence_id!r} is not held by the server: {why}. Re-send its whole history with "
                "sequence_start=true, then continue."
            )
        self._live.move_to_end(sequence_id)
        sequence.busy += 1
        return sequence

    def admit(self, sequence: Session, tokens: int) -> None:
        """Reserves room for ``sequence`` to hold ``tokens`` after its step: a slot (for a new id) and the
        KV bytes; evicts idle sequences, least recently used first, only if that makes enough room.

        Raises:
            ServerRejected: 400 if ``tokens`` alone exceed the KV budget; 503 (with ``retry_after``) when
                the table or the budget is full of sequences that cannot be evicted now. Nothing is
                evicted or reserved then.
        """
        per_token, budget = self.kv_bytes_per_token, self.limits.kv_budget_bytes
        if tokens * per_token > budget:
            raise ServerRejected(
                f"Sequence {sequence.sequence_id!r} would hold {tokens} tokens, {tokens * per_token} bytes of KV "
                f"cache ({per_token} per token), more than this server's whole KV budget of {budget} bytes "
                "(--kv-budget). End it (sequence_end=true) and start a shorter one.",
                status=400,
            )
        replaced = None if self.is_current(sequence) else self._live.get(sequence.sequence_id)
        credit = self._held(sequence) + (self._held(replaced) if replaced is not None else 0)
        short_bytes = self.kv_tokens() * per_token - credit * per_token + tokens * per_token - budget
        new_slot = not self.is_current(sequence) and replaced is None and sequence not in self._admitted
        short_slots = len(self._live) + len(self._admitted) + new_slot - self.limits.max_sessions
        reason = "sessions" if short_slots > 0 else "kv_budget"
        victims: list[Session] = []
        for candidate in self._live.values():  # least recently used first
            if short_bytes <= 0 and short_slots <= 0:
                break
            frees = self._held(candidate) * per_token
            if candidate.busy or candidate is replaced or candidate is sequence or (short_slots <= 0 and not frees):
                continue
            victims.append(candidate)
            short_bytes, short_slots = short_bytes - frees, short_slots - 1
        if short_slots > 0 or short_bytes > 0:
            self._refuse(sequence, tokens, "sessions" if short_slots > 0 else "kv_budget")
        for victim in victims:
            self._evict(victim, reason)
        sequence.reserved = tokens
        if not self.is_current(sequence) and sequence not in self._admitted:
            self._admitted.append(sequence)

    def commit(self, sequence: Session, past: KVCache, length: int) -> None:
        """Keeps the result of ``sequence``'s admitted step: its new cache of ``length`` tokens. A started
        sequence enters the table now, replacing any older one under its id."""
        if sequence in self._admitted:
            self._admitted.remove(sequence)
            self._live.pop(sequence.sequence_id, None)
            self._gone.pop(sequence.sequence_id, None)
            self._live[sequence.sequence_id] = sequence
            self.stats.started += 1
        sequence.past, sequence.length, sequence.reserved = past, length, 0

    def release(self, sequence: Session) -> None:
        """Marks the end of one request on ``sequence`` (each :meth:`open` or :meth:`get` needs one); an
        admitted step that did not commit gives its reservation back."""
        sequence.busy -= 1
        sequence.last_used = self._clock()
        sequence.reserved = 0
        if sequence in self._admitted:
            self._admitted.remove(sequence)

    def is_current(self, sequence: Session) -> bool:
        """Whether ``sequence`` is the one held under its id (not ended, evicted or restarted meanwhile,
        and not a start that has not committed yet)."""
        return self._live.get(sequence.sequence_id) is sequence

    def end(self, sequence: Session) -> None:
        """Drops ``sequence`` after its ``sequence_end`` request (a no-op if already replaced)."""
        if self.is_current(sequence):
            self._remove(sequence.sequence_id, "the client ended it (sequence_end)")
            self.stats.ended += 1

    def sweep(self) -> int:
        """Drops every idle sequence older than the TTL; returns how many."""
        now = self._clock()
        old = [key for key, s in self._live.items() if s.busy == 0 and now - s.last_used > self.limits.idle_ttl]
        for key in old:
            self._remove(key, f"it was idle for more than {self.limits.idle_ttl:g} s (--idle-ttl)")
        self.stats.expired += len(old)
        return len(old)

    def tokens(self) -> int:
        """Tokens held by all live sequences."""
        return sum(s.length for s in self._live.values())

    def kv_tokens(self) -> int:
        """Tokens charged against the KV budget: those held, or reserved by a step in flight if more."""
        return sum(map(self._held, self._live.values())) + sum(map(self._held, self._admitted))

    def kv_bytes(self) -> int:
        """KV-cache bytes charged against the budget (:meth:`kv_tokens` x bytes per token)."""
        return self.kv_tokens() * self.kv_bytes_per_token

    @staticmethod
    def _held(sequence: Session) -> int:
        return max(sequence.length, sequence.reserved)

    def _refuse(self, sequence: Session, tokens: int, reason: str) -> None:
        self.stats.refused[reason] += 1
        busy = sum(1 for s in self._live.values() if s.busy) + len(self._admitted)
        if reason == "sessions":
            held = len(self._live) + len(self._admitted)
            what = f"{held} sequences (at most {self.limits.max_sessions}, --max-sessions)"
        else:
            what = (
                f"{self.kv_bytes()} bytes of KV cache (budget {self.limits.kv_budget_bytes}, --kv-budget) and this "
                f"step needs {tokens * self.kv_bytes_per_token - self._held(sequence) * self.kv_bytes_per_token} more"
            )
        raise ServerRejected(
            f"The server is full: it holds {what}, and evicting every idle sequence would not make room "
            f"({busy} are busy). Sequence {sequence.sequence_id!r} was left as it was; retry shortly.",
            status=503,
            retry_after=RETRY_AFTER_S,
        )

    def _evict(self, victim: Session, reason: str) -> None:
        limit = (
            f"the server holds at most {self.limits.max_sessions}, --max-sessions"
            if reason == "sessions"
            else f"the server's KV cache budget is {self.limits.kv_budget_bytes} bytes, --kv-budget"
        )
        self._remove(victim.sequence_id, f"it was evicted, least recently used, to make room for another ({limit})")
        self.stats.evicted += 1
        logger.info("evicted sequence %r (%s)", victim.sequence_id, limit)

    def _remove(self, sequence_id: SequenceId, why: str) -> None:
        gone = self._live.pop(sequence_id, None)
        if gone is not None:
            logger.debug(
                "sequence %r removed (%s): %d tokens, %d steps, %d B in, %d B out",
                sequence_id, why, gone.length, gone.steps, gone.bytes_in, gone.bytes_out,
            )  # fmt: skip
        self._gone[sequence_id] = why
        self._gone.move_to_end(sequence_id)
        while len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)

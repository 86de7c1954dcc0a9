"""The server's session table (runtime/sessions.py): LRU eviction, busy sessions, idle TTL, reasons."""

from __future__ import annotations

import numpy as np
import pytest

from shadowpeft.runtime.errors import ServerRejected, SessionLost
from shadowpeft.runtime.sessions import Session, SessionLimits, SessionTable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _table(max_sessions: int = 2, ttl: float = 10.0) -> tuple[SessionTable, Clock]:
    clock = Clock()
    table = SessionTable(SessionLimits(max_sessions, 100, ttl), lambda: {"k": np.zeros((1, 1, 0, 2))}, clock=clock)
    return table, clock


def _use(table: SessionTable, sequence_id, *, start: bool = False) -> Session:
    session = table.start(sequence_id) if start else table.get(sequence_id)
    table.release(session)
    return session


def test_new_sequence_evicts_the_least_recently_used_idle_one() -> None:
    table, clock = _table()
    _use(table, 1, start=True)
    clock.now = 1
    _use(table, 2, start=True)
    clock.now = 2
    _use(table, 1)  # 1 is now more recent than 2
    _use(table, 3, start=True)
    assert len(table) == 2 and table.stats.evicted == 1
    _use(table, 1)
    with pytest.raises(SessionLost, match=r"Sequence 2 .* evicted, least recently used, .*--max-sessions"):
        table.get(2)


def test_busy_sequences_are_never_evicted_and_a_full_busy_table_answers_503() -> None:
    table, _ = _table()
    busy = [table.start(1), table.start(2)]  # not released: requests in flight
    with pytest.raises(ServerRejected, match="all are busy") as info:
        table.start(3)
    assert info.value.status == 503
    table.release(busy[0])
    table.start(3)
    assert table.is_current(busy[1]) and not table.is_current(busy[0])


def test_idle_sequences_expire_lazily_and_by_sweep() -> None:
    table, clock = _table(max_sessions=4, ttl=5)
    for sequence_id in (1, 2, "three"):
        _use(table, sequence_id, start=True)
    clock.now = 4
    _use(table, 1)
    clock.now = 6
    with pytest.raises(SessionLost, match="idle for more than 5 s"):
        table.get(2)
    assert table.sweep() == 1  # "three"; 1 was used at t=4
    assert len(table) == 1 and table.stats.expired == 2


def test_restart_end_and_unknown_ids() -> None:
    table, _ = _table()
    first = _use(table, "a", start=True)
    first.length = 5
    second = _use(table, "a", start=True)  # sequence_start on a live id restarts it
    assert second is not first and second.length == 0 and not table.is_current(first)
    table.end(first)  # stale: no effect
    assert table.is_current(second)
    table.end(second)
    with pytest.raises(SessionLost, match="ended it"):
        table.get("a")
    with pytest.raises(SessionLost, match="never started"):
        table.get("b")


def test_replay_recognises_only_an_exact_repeat_of_the_last_step() -> None:
    table, _ = _table()
    session = _use(table, 1, start=True)
    hidden = np.ones((1, 2, 4), dtype=np.float32)
    session.length, session.last_step = 7, (5, 2, b"digest", hidden)
    assert session.replay(5, 2, b"digest") is hidden
    assert session.replay(5, 2, b"other") is None
    assert session.replay(4, 3, b"digest") is None


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        SessionLimits(0, 10, 1.0)

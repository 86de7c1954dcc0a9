"""The server's session table (runtime/sessions.py): admission (slots and the KV budget), LRU eviction only when
it makes room, busy sessions, idle TTL, starts that commit only on success, and the reasons a sequence is gone."""

from __future__ import annotations

import numpy as np
import pytest

from shadowpeft.runtime.errors import ServerRejected, SessionLost
from shadowpeft.runtime.sessions import Session, SessionLimits, SessionTable

PER_TOKEN = 10  # KV bytes per token in these tables


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _table(max_sessions: int = 2, ttl: float = 10.0, *, budget_tokens: int = 1000) -> tuple[SessionTable, Clock]:
    clock = Clock()
    limits = SessionLimits(max_sessions, 100, ttl, budget_tokens * PER_TOKEN)
    table = SessionTable(limits, lambda: {"k": np.zeros((1, 1, 0, 2))}, kv_bytes_per_token=PER_TOKEN, clock=clock)
    return table, clock


def _start(table: SessionTable, sequence_id, tokens: int = 0, *, release: bool = True) -> Session:
    """A sequence_start step of ``tokens`` tokens that succeeds."""
    session = table.open(sequence_id)
    table.admit(session, tokens)
    table.commit(session, session.past, tokens)
    if release:
        table.release(session)
    return session


def _use(table: SessionTable, sequence_id) -> Session:
    session = table.get(sequence_id)
    table.release(session)
    return session


def test_new_sequence_evicts_the_least_recently_used_idle_one() -> None:
    table, clock = _table()
    _start(table, 1)
    clock.now = 1
    _start(table, 2)
    clock.now = 2
    _use(table, 1)  # 1 is now more recent than 2
    _start(table, 3)
    assert len(table) == 2 and table.stats.evicted == 1
    _use(table, 1)
    with pytest.raises(SessionLost, match=r"Sequence 2 .* evicted, least recently used, .*--max-sessions"):
        table.get(2)


def test_busy_sequences_are_never_evicted_and_a_refused_start_takes_no_slot() -> None:
    table, _ = _table()
    busy = [_start(table, 1, release=False), _start(table, 2, release=False)]  # requests in flight
    refused = table.open(3)
    with pytest.raises(
        ServerRejected, match=r"2 sequences \(at most 2, --max-sessions\).*would not make room \(2 are busy\)"
    ) as info:
        table.admit(refused, 1)
    table.release(refused)
    assert info.value.status == 503 and info.value.retry_after == 1
    assert len(table) == 2 and table.stats.evicted == 0 and table.stats.refused["sessions"] == 1
    assert table.kv_tokens() == 0 and all(map(table.is_current, busy))
    table.release(busy[0])
    _start(table, 3)
    assert table.is_current(busy[1]) and not table.is_current(busy[0])


def test_the_kv_budget_evicts_idle_lru_sequences_only_when_that_makes_room() -> None:
    table, _ = _table(max_sessions=8, budget_tokens=10)
    _start(table, "a", 4)
    _start(table, "b", 4)
    _start(table, "c", 5)  # 4 + 4 + 5 > 10: "a" (least recently used) goes, and is enough
    with pytest.raises(SessionLost, match="evicted, least recently used.*KV cache budget is 100 bytes, --kv-budget"):
        table.get("a")
    assert table.kv_bytes() == 9 * PER_TOKEN and table.stats.evicted == 1
    b = table.get("b")  # busy: never evicted
    d = table.open("d")
    with pytest.raises(ServerRejected, match="100 bytes of KV|budget 100") as info:
        table.admit(d, 7)  # needs 6 more; evicting idle "c" frees only 5: refused, and "c" stays
    assert info.value.status == 503 and info.value.retry_after == 1
    assert table.stats.evicted == 1 and table.stats.refused["kv_budget"] == 1 and len(table) == 2
    table.admit(d, 6)  # needs 5: evicting "c" makes room
    assert table.stats.evicted == 2 and table.kv_tokens() == 4 + 6
    with pytest.raises(ServerRejected, match="retry shortly"):
        table.admit(b, 5)  # "b" growing by one: "d" is reserved, nothing idle
    table.commit(d, d.past, 6)
    table.release(d)
    table.release(b)
    with pytest.raises(ServerRejected, match="more than this server's whole KV budget") as info:
        table.admit(table.open("e"), 11)
    assert info.value.status == 400


def test_a_start_that_fails_leaves_the_old_sequence_under_its_id() -> None:
    table, _ = _table(budget_tokens=10)
    old = _start(table, "a", 3)
    new = table.open("a")
    assert not table.is_current(new) and table.is_current(old)
    table.admit(new, 9)  # a restart is charged net of the sequence it replaces: 9 <= 10
    table.release(new)  # the step failed: no commit
    assert table.get("a") is old and table.kv_tokens() == 3 and table.stats.started == 1


def test_idle_sequences_expire_lazily_and_by_sweep() -> None:
    table, clock = _table(max_sessions=4, ttl=5)
    for sequence_id in (1, 2, "three"):
        _start(table, sequence_id)
    clock.now = 4
    _use(table, 1)
    clock.now = 6
    with pytest.raises(SessionLost, match="idle for more than 5 s"):
        table.get(2)
    assert table.sweep() == 1  # "three"; 1 was used at t=4
    assert len(table) == 1 and table.stats.expired == 2


def test_restart_end_and_unknown_ids() -> None:
    table, _ = _table()
    first = _start(table, "a", 5)
    second = _start(table, "a")  # sequence_start on a live id restarts it
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
    session = _start(table, 1)
    hidden = np.ones((1, 2, 4), dtype=np.float32)
    session.length, session.last_step = 7, (5, 2, b"digest", hidden)
    assert session.replay(5, 2, b"digest") is hidden
    assert session.replay(5, 2, b"other") is None
    assert session.replay(4, 3, b"digest") is None


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        SessionLimits(0, 10, 1.0)
    with pytest.raises(ValueError, match="positive"):
        SessionLimits(kv_budget_bytes=0)

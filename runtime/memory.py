"""The backbone server's resident memory, held under one budget (``shadow-serve --memory-budget``).

The KV budget (:class:`~shadowpeft.runtime.sessions.SessionLimits`) bounds the caches sessions hold; the
request limits (:mod:`~shadowpeft.runtime.admission`) bound what each request may bring. This module ties
them to what the process really holds (its RSS)::

    budget >= baseline + kv_budget + max_concurrent x reserve

    baseline   RSS with the graphs loaded, after one warm-up step (onnxruntime's first run allocates)
    reserve    RSS one request of ``max_tokens_per_request`` tokens adds at its peak, measured at start
               by that warm-up (sampled every millisecond), plus its body and parsed tensors

The server refuses to start when the sum does not fit, naming what to change. While it runs, a request
that gets a place is admitted only while ``RSS + in_flight x reserve <= budget``; otherwise the freed heap
is handed back to the system (glibc ``malloc_trim``) and, if that does not make room, the request gets
503 + ``Retry-After``. The guard samples RSS at every admission and release and reports the peak it saw.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import psutil

from shadowpeft.runtime.errors import ServerRejected

__all__ = [
    "MemoryBudgetTooSmall",
    "MemoryGuard",
    "MemoryPlan",
    "measure_step_peak",
    "plan_memory",
    "release_free_heap",
    "resident_bytes",
    "warm_up_step",
]

_MEMORY_RETRY_AFTER_S = 1
_SAMPLE_S = 0.001


class MemoryBudgetTooSmall(ValueError):
    """``--memory-budget`` cannot hold the loaded graphs, the KV budget and the requests in flight."""


def resident_bytes() -> int:
    """This process's resident set size (RSS), in bytes."""
    return psutil.Process().memory_info().rss


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to call
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Hands the heap's free pages back to the system (glibc ``malloc_trim(0)``).

    Returns:
        Whether there was such a call to make (``False`` off glibc).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def measure_step_peak(step: Callable[[], object], rss: Callable[[], int] = resident_bytes) -> int:
    """Bytes of RSS that ``step()`` adds at its peak, sampled every millisecond from another thread.

    The heap is trimmed first, so that memory freed earlier does not hide the step's own growth.
    """
    release_free_heap()
    before = peak = rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss())
            time.sleep(_SAMPLE_S)

    sampler = threading.Thread(target=sample, name="memory-sampler", daemon=True)
    sampler.start()
    try:
        step()
        peak = max(peak, rss())
    finally:
        done.set()
        sampler.join()
    return max(0, peak - before)


@dataclass(frozen=True)
class MemoryPlan:
    """What ``--memory-budget`` must hold, in bytes.

    Attributes:
        budget: The budget.
        baseline: RSS with the graphs loaded and warmed up.
        kv_budget: KV-cache bytes all sessions may hold (``--kv-budget``).
        reserve: RSS one request of ``tokens`` tokens adds at its peak, its body and tensors included.
        concurrent: Requests computed at once (``--max-concurrent``).
        tokens: Tokens per request (``--max-tokens-per-request``).
    """

    budget: int
    baseline: int
    kv_budget: int
    reserve: int
    concurrent: int
    tokens: int

    @property
    def required(self) -> int:
        """The smallest budget that holds everything at once."""
        return self.baseline + self.kv_budget + self.concurrent * self.reserve

    def check(self) -> None:
        """Raises :class:`MemoryBudgetTooSmall`, with the figures and what to change, when it does not fit."""
        if self.required <= self.budget:
            return
        mib = 1 << 20
        raise MemoryBudgetTooSmall(
            f"--memory-budget {self.budget / mib:.0f} MiB cannot hold this server: graphs loaded "
            f"{self.baseline / mib:.0f} MiB + KV budget {self.kv_budget / mib:.0f} MiB (--kv-budget) + "
            f"{self.concurrent} requests in flight (--max-concurrent) x {self.reserve / mib:.1f} MiB each "
            f"(measured for {self.tokens} tokens, --max-tokens-per-request) = {self.required / mib:.0f} MiB. "
            f"Raise --memory-budget to at least {-(-self.required // mib)} MiB, or lower --kv-budget, "
            "--max-concurrent or --max-tokens-per-request."
        )


class MemoryGuard:
    """Admits a request only while the process's RSS leaves room for it (see the module docstring).

    Args:
        plan: The checked plan (its ``budget`` and ``reserve`` are used).
        rss: Reads the process's RSS (tests pass a stand-in).
        trim: Hands free heap back to the system; returns whether it could.

    Attributes:
        refused: Requests refused for memory since the start.
        peak: Largest RSS seen at an admission or a release.
    """

    def __init__(
        self,
        plan: MemoryPlan,
        *,
        rss: Callable[[], int] = resident_bytes,
        trim: Callable[[], bool] = release_free_heap,
    ) -> None:
        self.plan, self._rss, self._trim = plan, rss, trim
        self.refused = 0
        self.peak = self.plan.baseline

    def admit(self, in_flight: int) -> None:
        """Checks that one more request fits beside the ``in_flight - 1`` others already computing.

        Args:
            in_flight: Requests computing once this one is admitted (itself included).

        Raises:
            ServerRejected: 503 with ``retry_after`` when even a trimmed heap leaves no room.
        """
        need = in_flight * self.plan.reserve
        if self._sample() + need <= self.plan.budget:
            return
        if self._trim() and self._sample() + need <= self.plan.budget:
            return
        self.refused += 1
        mib = 1 << 20
        raise ServerRejected(
            f"The server is near its memory budget: it holds {self._last / mib:.0f} MiB and {in_flight} "
            f"request(s) of up to {self.plan.reserve / mib:.1f} MiB each would pass --memory-budget "
            f"{self.plan.budget / mib:.0f} MiB. Retry shortly; end sequences you no longer need.",
            status=503,
            retry_after=_MEMORY_RETRY_AFTER_S,
        )

    def released(self) -> None:
        """Notes the RSS after a request finished (for :attr:`peak`)."""
        self._sample()

    def stats(self) -> dict[str, int]:
        """The budget, the plan's figures, the last and peak RSS seen and the refusals, in bytes/counts."""
        return {
            "budget_bytes": self.plan.budget,
            "baseline_bytes": self.plan.baseline,
            "reserve_per_request_bytes": self.plan.reserve,
            "rss_bytes": self._sample(),
            "peak_rss_bytes": self.peak,
            "refused": self.refused,
        }

    def _sample(self) -> int:
        self._last = self._rss()
        self.peak = max(self.peak, self._last)
        return self._last


def plan_memory(
    budget: int,
    warm_up: Callable[[], object],
    *,
    kv_budget: int,
    concurrent: int,
    tokens: int,
    request_bytes: int,
    rss: Callable[[], int] = resident_bytes,
) -> MemoryPlan:
    """Measures the baseline and one request's reserve with ``warm_up`` (a step of ``tokens`` tokens on an
    empty cache), and checks that ``budget`` holds them.

    Args:
        budget: ``--memory-budget``.
        warm_up: Runs one largest request's step.
        kv_budget, concurrent, tokens: As :class:`MemoryPlan`.
        request_bytes: Bytes one request's body and decoded tensors hold beside the step (added to the reserve).
        rss: Reads the process's RSS.

    Raises:
        MemoryBudgetTooSmall: When it does not fit.
    """
    step_peak = measure_step_peak(warm_up, rss)
    release_free_heap()
    plan = MemoryPlan(budget, rss(), kv_budget, step_peak + request_bytes, concurrent, tokens)
    plan.check()
    return plan


def warm_up_step(run: Callable[[np.ndarray, np.ndarray], object], tokens: int, hidden_size: int, dtype) -> Callable:
    """A zero-argument call running ``run(ids, s0)`` on ``tokens`` zero tokens (what :func:`plan_memory` times)."""
    ids = np.zeros((1, tokens), dtype=np.int64)
    s0 = np.zeros((1, tokens, hidden_size), dtype=dtype)
    return lambda: run(ids, s0)

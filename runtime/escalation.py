"""Auto mode: run on the device while the detached shadow is confident, escalate to the cloud when not.

Every step the device shadow processes the pending token and gives its logits anyway (the cloud
needs its ``s0``), so its confidence costs nothing: the largest softmax probability of those logits
(temperature 1), the same measure training used to choose the threshold it saved in
``escalation.json`` (``token-probability`` for language modelling; ``first-token-probability`` for
generation tasks, which is this measure at the first step). ::

    confidence >= threshold ──> the shadow's own token        (mode "detached", on the device)
    confidence <  threshold ──> a cloud round from this token (mode "speculative" or "coupled")
    no answer in ``wait_s`` ──> the shadow's own token (the step waits no longer, retries included),
                                and the cloud is tried again after ``retry_interval_s`` (the link
                                re-sends what the server missed)
    another backbone served ──> the shadow's own token for the whole sequence (the handshake
                                found the server runs another export: ``fallback_reason`` says so)

``scope="token"`` decides at every step; ``scope="request"`` decides once, at the first step, for
the whole answer (the way a generation task's threshold was chosen: per example, on the first token).
Without a threshold every step is escalated: the cloud for every token, the device when it fails.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from shadowpeft.runtime.sampling import Sampler
from shadowpeft.runtime.speculative import SpeculativeDecoder

__all__ = ["CLOUD_MODES", "SCOPES", "EscalationPolicy", "Escalator", "confidence"]

Scope = Literal["token", "request"]
SCOPES: tuple[str, ...] = ("token", "request")
CLOUD_MODES: tuple[str, ...] = ("speculative", "coupled")


def confidence(logits: np.ndarray) -> float:
    """The largest softmax probability of ``logits`` (V,), computed in float64."""
    scores = logits.astype(np.float64)
    shifted = np.exp(scores - scores.max())
    return float(1.0 / shifted.sum())  # the largest entry of `shifted` is exp(0) = 1


@dataclass(frozen=True)
class EscalationPolicy:
    """When auto mode leaves the device, and for which cloud mode.

    Attributes:
        threshold: Stay on the device when the shadow's confidence is >= this; ``None``: never (every
            step goes to the cloud while it answers).
        scope: ``token`` (decide every step) or ``request`` (decide once, at the first step).
        cloud: ``speculative`` (the shadow drafts, the cloud verifies) or ``coupled`` (one token per request).
        source: Where the threshold came from, for messages (``manifest``, ``--escalate-below`` or ``none``).
    """

    threshold: float | None = None
    scope: Scope = "token"
    cloud: str = "speculative"
    source: str = "none"

    def __post_init__(self) -> None:
        problems = []
        if self.threshold is not None and not (math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0 + 1e-6):
            problems.append(f"threshold must be a probability in [0, 1] (got {self.threshold!r})")
        if self.scope not in SCOPES:
            problems.append(f"scope must be one of {', '.join(SCOPES)} (got {self.scope!r})")
        if self.cloud not in CLOUD_MODES:
            problems.append(f"cloud must be one of {', '.join(CLOUD_MODES)} (got {self.cloud!r})")
        if problems:
            raise ValueError("Invalid escalation settings: " + "; ".join(problems) + ".")

    def local(self, confident: float) -> bool:
        """Whether a step with this confidence stays on the device."""
        return self.threshold is not None and confident >= self.threshold


class Escalator:
    """Auto mode's steps for one sequence (batch 1), for :func:`~shadowpeft.runtime.speculative.decode_rounds`.

    Args:
        decoder: Speculative rounds over the sequence's shadow and link (its draft length is used for
            ``cloud="speculative"``).
        policy: The threshold, scope and cloud mode.
        retry_interval_s: After the cloud failed, how long to stay on the device before trying it again.
        wait_s: Most seconds an escalated step waits for the cloud, retries included, before the shadow's
            token is used (``None``: the client's timeout and retries per request, with no total).
        clock: Monotonic seconds (tests pass their own).

    Attributes:
        refused: Why the cloud is never used for this sequence (the server runs another backbone), or ``None``.
        fallback_reason: Why the device first took over from the cloud, or ``None``.
    """

    def __init__(
        self,
        decoder: SpeculativeDecoder,
        policy: EscalationPolicy,
        *,
        retry_interval_s: float = 1.0,
        wait_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.decoder, self.policy = decoder, policy
        self.retry_interval_s, self.wait_s, self.clock = retry_interval_s, wait_s, clock
        self.sampler: Sampler = decoder.sampler
        self.request_local: bool | None = None  # scope "request": the first step's decision
        self.down_since: float | None = None
        self.escalated = 0  # steps the policy sent to the cloud (answered there or not)
        self.fallbacks = 0  # times the cloud failed and the device took over
        self.confidences: list[float] = []  # the shadow's confidence at each step
        self.refused: str | None = None
        self.fallback_reason: str | None = None

    def handshake(self) -> None:
        """Checks the server's backbone before the first step, within ``wait_s``: another backbone keeps every
        step on the device; no answer counts as a cloud failure (retried after ``retry_interval_s``)."""
        from shadowpeft.runtime.errors import BackboneMismatch, ServerRejected, ServerUnavailable

        deadline = None if self.wait_s is None else time.monotonic() + self.wait_s
        try:
            self.decoder.link.handshake(deadline=deadline)
        except BackboneMismatch as err:
            self._refuse(err)
        except (ServerUnavailable, ServerRejected) as err:
            self._cloud_failed(err)

    def __call__(self, pending: list[int], seen: list[int], room: int) -> tuple[list[int], str]:
        """One step: the shadow processes ``pending``; its token, or a cloud round's tokens, and their mode."""
        from shadowpeft.runtime.errors import BackboneMismatch, ServerRejected, ServerUnavailable

        shadow, link = self.decoder.shadow, self.decoder.link
        logits, s0 = shadow.step(np.asarray([pending], dtype=np.int64))
        link.record(np.asarray(pending), s0[0])
        row = logits[0, -1]
        confident = confidence(row)
        self.confidences.append(confident)
        local = self.policy.local(confident)
        if self.policy.scope == "request":
            if self.request_local is None:
                self.request_local = local
            local = self.request_local
        if not local:
            self.escalated += 1
            if self._cloud_may_answer():
                most = 0 if self.policy.cloud == "coupled" else None
                try:
                    tokens = self.decoder.round_from(row, seen, room, most=most, wait_s=self.wait_s).tokens
                except BackboneMismatch as err:
                    self._refuse(err)
                except (ServerUnavailable, ServerRejected) as err:
                    self._cloud_failed(err)
                else:
                    self.down_since = None
                    return tokens, self.policy.cloud
        return [self.sampler(row, seen)], "detached"

    def _cloud_may_answer(self) -> bool:
        if self.refused is not None:
            return False
        return self.down_since is None or self.clock() - self.down_since >= self.retry_interval_s

    def _refuse(self, err: Exception) -> None:
        self.refused = f"{err} Answering every token on the device (detached)."
        self.fallbacks += 1
        self.fallback_reason = self.fallback_reason or self.refused

    def _cloud_failed(self, err: Exception) -> None:
        if self.down_since is None:
            self.fallbacks += 1
        self.fallback_reason = self.fallback_reason or f"{err}"
        self.decoder.link.abandon()  # ends the server's session; next time: a fresh one, re-prefilled
        self.down_since = self.clock()

"""Speculative split decoding (greedy): the device shadow drafts, the cloud backbone verifies k tokens at once.

One round, for a sequence whose last chosen token ``b`` (the prompt, at first) is still unprocessed::

    device  shadow.step(b) -> s0(b), draft d1; shadow.step(d1) -> s0(d1), d2; ... shadow.step(dk) -> s0(dk)
    up      one infer request: ids [b, d1..dk] and their s0 rows (plus any tokens the server is missing)
    cloud   one backbone pass over the k+1 tokens -> hidden states (k+1, d)
    down    hidden states; device/head -> the attached model's choice t1..t(k+1) after b, d1, .., dk
    accept  the longest prefix with d(j) == t(j), then the attached model's own next token
    trim    both KV caches drop the rejected drafts (device: now; server: on the next request's
            sequence_offset); the new last token's s0 is computed at the next round's first shadow step

Each round emits 1 to k+1 tokens, all of them the attached model's greedy choices, so the output is
the coupled mode's token for token. Sampling (temperature > 0) is not supported here yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from shadowpeft.runtime.errors import RuntimeGenerationError
from shadowpeft.runtime.sampling import Sampler, SamplingConfig
from shadowpeft.runtime.step import CloudLink, DeviceShadow

__all__ = [
    "AUTO",
    "DraftLength",
    "Round",
    "SpeculativeDecoder",
    "accepted_prefix",
    "check_draft_tokens",
    "check_greedy",
    "decode_rounds",
]

T = TypeVar("T")


AUTO = "auto"  # draft_tokens: adapt the draft length to the acceptance measured so far


def check_draft_tokens(draft_tokens: object) -> int | str:
    """``draft_tokens`` as an int >= 1 or ``"auto"``, or a ValueError that says what is accepted."""
    if draft_tokens == AUTO:
        return AUTO
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(
            f"draft_tokens must be an integer >= 1 (tokens the shadow drafts per verify request) or 'auto'; "
            f"got {draft_tokens!r}."
        )
    return draft_tokens


@dataclass
class DraftLength:
    """How many tokens the next round drafts: fixed, or adapted to the acceptance (``auto``).

    The adaptive rule: after a round whose drafts were all accepted, draft 2 more next time (the
    shadow is on a run the attached model agrees with); after a rejection, 1 fewer. Bounded to
    [``SMALLEST``, ``LARGEST``] and starting at ``START``, so a shadow that never agrees costs one
    draft per round and one that always agrees sends up to 8 at once.
    """

    current: int
    adaptive: bool = False

    START = 4
    SMALLEST = 1
    LARGEST = 8

    @classmethod
    def of(cls, draft_tokens: int | str) -> DraftLength:
        """The policy for a checked ``draft_tokens`` (see :func:`check_draft_tokens`)."""
        if draft_tokens == AUTO:
            return cls(cls.START, adaptive=True)
        return cls(int(draft_tokens))

    def update(self, drafted: int, accepted: int) -> None:
        """Adapts to a round that drafted ``drafted`` tokens and had ``accepted`` of them accepted."""
        if not self.adaptive or drafted == 0:
            return
        if accepted == drafted:
            self.current = min(self.LARGEST, self.current + 2)
        else:
            self.current = max(self.SMALLEST, self.current - 1)


def check_greedy(sampling: SamplingConfig) -> None:
    if sampling.temperature != 0:
        raise ValueError(
            f"Speculative mode decodes greedily only (temperature 0); got temperature {sampling.temperature}. "
            "Speculative sampling is not implemented yet: use --mode coupled to sample with the attached model."
        )


def accepted_prefix(drafts: Sequence[int], choices: Sequence[int]) -> int:
    """How many drafts the verifier accepts: the longest prefix where ``drafts[j] == choices[j]``.

    ``choices[j]`` is the attached model's token after the drafts before ``j``; it has one more entry
    than ``drafts``, so ``choices[accepted]`` is the attached model's own next token in every case.
    """
    if len(choices) != len(drafts) + 1:
        raise ValueError(f"choices needs one entry more than drafts; got {len(choices)} and {len(drafts)}.")
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
        accepted += 1
    return accepted


@dataclass(frozen=True)
class Round:
    """One draft-and-verify round: what was drafted, the attached choices, and the tokens it yields."""

    drafts: list[int]
    choices: list[int]
    accepted: int

    @property
    def tokens(self) -> list[int]:
        """The accepted drafts, then the attached model's own next token."""
        return self.drafts[: self.accepted] + [self.choices[self.accepted]]


class SpeculativeDecoder:
    """Draft-and-verify rounds for one sequence (batch 1).

    Args:
        shadow: The device shadow (batch 1); it holds exactly the tokens the link has recorded.
        link: The sequence on the backbone server.
        sampler: Picks tokens (greedy; a repetition penalty applies to drafts and choices alike).
        draft_tokens: Most tokens drafted per round (k), or ``"auto"`` (:class:`DraftLength`).
        eos_ids: Drafting stops after one of these.
    """

    def __init__(
        self,
        shadow: DeviceShadow,
        link: CloudLink,
        sampler: Sampler,
        *,
        draft_tokens: int | str,
        eos_ids: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        check_greedy(sampler.config)
        self.shadow, self.link, self.sampler = shadow, link, sampler
        self.draft_length = DraftLength.of(check_draft_tokens(draft_tokens))
        self.eos_ids = set(eos_ids)
        self.rounds = self.drafted = self.accepted = 0

    def draft(self, shadow_logits: np.ndarray, seen: list[int]) -> int:
        """The drafted token from the shadow's logits (V,) (tests override it to force drafts)."""
        return self.sampler(shadow_logits, seen)

    def round(self, pending: Sequence[int], seen: list[int], room: int) -> Round:
        """Processes the ``pending`` tokens (not yet seen by the shadow), drafts, verifies, rolls back.

        Args:
            pending: The prompt, or the previous round's last token.
            seen: Every token so far, ``pending`` included (for the repetition penalty).
            room: Most tokens this round may yield (>= 1): at most ``room - 1`` are drafted.

        Returns:
            The round; afterwards both caches hold ``seen`` plus the accepted drafts, and the round's
            last token is pending.

        Raises:
            ServerUnavailable, ServerRejected: From the link (the server failed twice or refused).
        """
        logits, s0 = self.shadow.step(np.asarray([pending], dtype=np.int64))
        self.link.record(np.asarray(pending), s0[0])
        drafts: list[int] = []
        while len(drafts) < min(self.draft_length.current, room - 1) and not (drafts and drafts[-1] in self.eos_ids):
            drafts.append(self.draft(logits[0, -1], seen + drafts))
            logits, s0 = self.shadow.step(np.asarray([drafts[-1:]], dtype=np.int64))
            self.link.record(np.asarray(drafts[-1:]), s0[0])
        attached = self.link.verify(len(drafts) + 1)  # (k+1, V): after the last pending token, d1, .., dk
        choices = [self.sampler(attached[j], seen + drafts[:j]) for j in range(len(drafts) + 1)]
        accepted = accepted_prefix(drafts, choices)
        rejected = len(drafts) - accepted
        self.shadow.trim(rejected)
        self.link.rollback(rejected)
        self.rounds += 1
        self.drafted += len(drafts)
        self.accepted += accepted
        self.draft_length.update(len(drafts), accepted)
        return Round(drafts, choices, accepted)


def decode_rounds(
    decoder: SpeculativeDecoder,
    prompt: Sequence[int],
    budget: int,
    emit: Callable[[int], tuple[bool, T | None]],
    timed: Callable[[float], None],
) -> Iterator[T]:
    """Runs rounds until ``emit`` says the sequence finished or ``budget`` tokens were generated.

    Args:
        decoder: The rounds' decoder (a fresh shadow and link).
        prompt: The prompt's ids.
        budget: Most tokens to generate.
        emit: Takes each token in order; returns (finished, an event to yield or ``None``).
        timed: Gets each round's seconds (drafting, the verify request, the rollback).

    Raises:
        RuntimeGenerationError: The server is gone or refuses the sequence.
    """
    from shadowpeft.runtime.errors import ServerRejected, ServerUnavailable

    pending, seen, produced = list(prompt), list(prompt), 0
    while produced < budget:
        started = time.perf_counter()
        try:
            result = decoder.round(pending, seen, budget - produced)
        except (ServerUnavailable, ServerRejected) as err:
            raise RuntimeGenerationError(
                f"Speculative mode lost the backbone server: {err}. Start it again, or run with --mode detached."
            ) from err
        timed(time.perf_counter() - started)
        seen += result.tokens
        pending = result.tokens[-1:]
        for token in result.tokens:
            produced += 1
            finished, event = emit(token)
            if event is not None:
                yield event
            if finished:
                return

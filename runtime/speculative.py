"""Speculative split decoding (greedy): the device shadow drafts, the cloud backbone verifies k tokens at once.

One round, for a sequence whose last chosen token ``b`` (the prompt, at first) is still unprocessed::

    device  shadow.step(b) -> s0(b), draft d1; shadow.step(d1) -> s0(d1), d2; ... shadow.step(dk) -> s0(dk)
    up      one infer request: ids [b, d1..dk] and their s0 rows (plus any tokens the server is missing)
    cloud   one backbone pass over the k+1 tokens -> hidden states (k+1, d)
    down    hidden states; device/head -> the attached model's distributions p1..p(k+1) after b, d1, .., dk
    accept  d(j) with probability min(1, p(j)[d(j)] / q(j)[d(j)]) in order (q(j): the shadow's distribution
            d(j) was drawn from); at the first rejection a token from max(p(j) - q(j), 0), normalised;
            after k acceptances a token from p(k+1)
    trim    both KV caches drop the rejected drafts (device: now; server: on the next request's
            sequence_offset); the new last token's s0 is computed at the next round's first shadow step

This is speculative sampling: every emitted token is distributed exactly as the attached model would
have sampled it (with the same temperature, top-k, top-p and repetition penalty), whatever the
shadow drafts. Greedy decoding is its special case in which every distribution is one-hot: a draft
is accepted when it is the attached model's argmax, and the output is the coupled mode's token for
token. A round may also start from shadow logits already computed (:meth:`SpeculativeDecoder.round_from`),
which is how auto mode escalates a token it is not confident about.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from shadowpeft.runtime.errors import RuntimeGenerationError
from shadowpeft.runtime.sampling import Sampler
from shadowpeft.runtime.step import CloudLink, DeviceShadow

__all__ = [
    "AUTO",
    "DraftLength",
    "Round",
    "SpeculativeDecoder",
    "check_draft_tokens",
    "decode_rounds",
    "speculative_step",
    "verify_drafts",
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


def verify_drafts(
    sampler: Sampler, drafts: Sequence[int], draft_probs: Sequence[np.ndarray], target_probs: Sequence[np.ndarray]
) -> tuple[int, int]:
    """Speculative sampling's acceptance test: how many drafts to keep, and the token that follows them.

    Args:
        sampler: Draws the random numbers and the next token (greedy: no randomness is used).
        drafts: The drafted tokens d(1..k).
        draft_probs: q(j), the distribution (V,) each draft was drawn from.
        target_probs: p(j), the attached model's distribution (V,) at each draft's position, plus one
            more after the last draft (k + 1 rows).

    Returns:
        (accepted, next token): drafts[:accepted] then the next token are distributed as tokens drawn
        from the attached model one by one.
    """
    if len(target_probs) != len(drafts) + 1 or len(draft_probs) != len(drafts):
        raise ValueError(
            f"verify_drafts needs one draft distribution per draft and one target more; got {len(drafts)} drafts, "
            f"{len(draft_probs)} draft and {len(target_probs)} target distributions."
        )
    for j, token in enumerate(drafts):
        p, q = target_probs[j], draft_probs[j]
        ratio = p[token] / q[token] if q[token] > 0 else 0.0
        if ratio >= 1.0 or (ratio > 0.0 and sampler.rng.random() < ratio):
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        # p != q whenever a draft can be rejected, so the residual has mass; rounding could still empty it.
        return j, sampler.pick(residual / total if total > 0 else p)
    return len(drafts), sampler.pick(target_probs[-1])


@dataclass(frozen=True)
class Round:
    """One draft-and-verify round: what was drafted, how much of it was accepted, and the token after."""

    drafts: list[int]
    accepted: int
    next_token: int

    @property
    def tokens(self) -> list[int]:
        """The accepted drafts, then the attached model's own next token."""
        return self.drafts[: self.accepted] + [self.next_token]


class SpeculativeDecoder:
    """Draft-and-verify rounds for one sequence (batch 1).

    Args:
        shadow: The device shadow (batch 1); it holds exactly the tokens the link has recorded.
        link: The sequence on the backbone server.
        sampler: Picks tokens; its settings (and a repetition penalty) apply to drafts and targets alike.
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
        self.shadow, self.link, self.sampler = shadow, link, sampler
        self.draft_length = DraftLength.of(check_draft_tokens(draft_tokens))
        self.eos_ids = set(eos_ids)
        self.rounds = self.drafted = self.accepted = 0

    def draft(self, shadow_logits: np.ndarray, seen: list[int]) -> tuple[int, np.ndarray]:
        """A drafted token and the distribution (V,) it was drawn from (tests override it to force drafts)."""
        probs = self.sampler.distribution(shadow_logits, seen)
        return self.sampler.pick(probs), probs

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
        return self.round_from(logits[0, -1], seen, room)

    def round_from(
        self,
        shadow_logits: np.ndarray,
        seen: list[int],
        room: int,
        *,
        most: int | None = None,
        wait_s: float | None = None,
    ) -> Round:
        """A round whose pending tokens the shadow (and the link) already processed.

        Args:
            shadow_logits: The shadow's logits (V,) after the last processed token.
            seen: Every token so far.
            room: Most tokens this round may yield (>= 1).
            most: Draft at most this many tokens (0: a plain coupled step); by default the draft length.
            wait_s: Most seconds to wait for the server's verification, retries included (``None``: the
                client's timeout and retries per request).

        Raises:
            BackboneMismatch: The link's handshake found another backbone on the server.
            ServerUnavailable, ServerRejected: From the link; the drafts are rolled back on both sides
            first, so the shadow's cache ends at the last processed token again.
        """
        limit = min(self.draft_length.current if most is None else most, room - 1)
        logits = shadow_logits
        drafts: list[int] = []
        draft_probs: list[np.ndarray] = []
        while len(drafts) < limit and not (drafts and drafts[-1] in self.eos_ids):
            token, probs = self.draft(logits, seen + drafts)
            drafts.append(token)
            draft_probs.append(probs)
            step_logits, s0 = self.shadow.step(np.asarray([[token]], dtype=np.int64))
            logits = step_logits[0, -1]
            self.link.record(np.asarray([token]), s0[0])
        try:
            deadline = None if wait_s is None else time.monotonic() + wait_s
            # (k+1, V): after the last pending token, d1, .., dk
            attached = self.link.verify(len(drafts) + 1, deadline=deadline)
        except Exception:
            self.shadow.trim(len(drafts))
            self.link.rollback(len(drafts))
            raise
        targets = [self.sampler.distribution(attached[j], seen + drafts[:j]) for j in range(len(drafts) + 1)]
        accepted, next_token = verify_drafts(self.sampler, drafts, draft_probs, targets)
        rejected = len(drafts) - accepted
        self.shadow.trim(rejected)
        self.link.rollback(rejected)
        self.rounds += 1
        self.drafted += len(drafts)
        self.accepted += accepted
        if most is None:
            self.draft_length.update(len(drafts), accepted)
        return Round(drafts, accepted, next_token)


def decode_rounds(
    step: Callable[[list[int], list[int], int], tuple[list[int], str]],
    prompt: Sequence[int],
    budget: int,
    emit: Callable[[int, str, bool], tuple[bool, T | None]],
    timed: Callable[[float, bool], None],
) -> Iterator[T]:
    """Runs rounds until ``emit`` says the sequence finished or ``budget`` tokens were generated.

    Args:
        step: Takes (pending tokens, every token so far, room) and returns the round's tokens (1..room)
            and the mode that produced them; the last token is pending for the next round.
        prompt: The prompt's ids (pending for the first round).
        budget: Most tokens to generate.
        emit: Takes each token in order, its mode and whether it came from the first round; returns
            (finished, an event to yield or ``None``).
        timed: Gets each round's seconds and whether it was the first round (the prefill).
    """
    pending, seen, produced, first = list(prompt), list(prompt), 0, True
    while produced < budget:
        started = time.perf_counter()
        tokens, mode = step(pending, seen, budget - produced)
        timed(time.perf_counter() - started, first)
        seen += tokens
        pending = tokens[-1:]
        for token in tokens:
            produced += 1
            finished, event = emit(token, mode, first)
            if event is not None:
                yield event
            if finished:
                return
        first = False


def speculative_step(decoder: SpeculativeDecoder) -> Callable[[list[int], list[int], int], tuple[list[int], str]]:
    """Speculative mode's round for :func:`decode_rounds`: always the cloud, a clear error when it is gone."""
    from shadowpeft.runtime.errors import ServerRejected, ServerUnavailable

    def step(pending: list[int], seen: list[int], room: int) -> tuple[list[int], str]:
        try:
            return decoder.round(pending, seen, room).tokens, "speculative"
        except (ServerUnavailable, ServerRejected) as err:
            raise RuntimeGenerationError(
                f"Speculative mode lost the backbone server: {err}. Start it again, or run with --mode auto "
                "(falls back to the device shadow) or --mode detached."
            ) from err

    return step

"""Generation with an export: detached (device graphs only), coupled (device + remote backbone), auto,
speculative (the device drafts, the backbone verifies several tokens per request: runtime/speculative.py).

Every token event says which mode produced it. In ``auto`` mode the device shadow runs for every
token anyway (coupled mode needs its ``s0``), so when the server is unreachable, slow or lost the
shadow's own logits take over for that token with no extra work, and once the server answers again
(checked at most every ``retry_interval_s``) the link sends it the tokens it missed and coupled
decoding resumes on a fresh session.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from shadowpeft.runtime.contract import DEVICE_HEAD, left_pad
from shadowpeft.runtime.errors import RuntimeGenerationError
from shadowpeft.runtime.export_dir import ExportDir
from shadowpeft.runtime.sampling import Sampler, SamplingConfig
from shadowpeft.runtime.speculative import SpeculativeDecoder, check_draft_tokens, check_greedy, decode_rounds
from shadowpeft.runtime.step import CloudLink, DeviceShadow

__all__ = ["MODES", "Generator", "GenerationResult", "Mode", "TokenEvent"]

Mode = Literal["detached", "coupled", "auto", "speculative"]
MODES: tuple[str, ...] = ("detached", "coupled", "auto", "speculative")


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: batch row, id, the new text it completes, and the mode that produced it."""

    row: int
    token_id: int
    text: str
    mode: str
    index: int


@dataclass
class GenerationResult:
    """Everything about one prompt's generation."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    modes: list[str] = field(default_factory=list)
    finish_reason: str = "length"
    fallbacks: int = 0  # times auto mode switched from coupled to detached
    restarts: int = 0  # times the link re-prefilled a fresh server session
    prefill_s: float = 0.0
    decode_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    round_trips: int = 0  # HTTP requests to the server: prompt chunks, steps, retries, re-prefills, the end
    drafted: int = 0  # speculative mode: tokens the shadow drafted and the server verified
    accepted: int = 0  # speculative mode: drafted tokens the attached model agreed with
    prefill_tokens: int = 0  # tokens the prefill step yielded beyond the first (left out of tokens_per_s)

    @property
    def tokens_per_s(self) -> float:
        return (len(self.token_ids) - self.prefill_tokens) / self.decode_s if self.decode_s > 0 else 0.0


class Generator:
    """Decodes prompts (token id lists) with an export.

    Args:
        export: The opened export (``device/shadow`` needed; ``device/head`` too for coupled/auto).
        mode: ``detached``, ``coupled``, ``auto`` or ``speculative`` (greedy only).
        client: A :class:`~shadowpeft.runtime.client.BackboneClient` for coupled/auto.
        eos_ids: Token ids that end a sequence.
        decode: Turns ids into text (for stop strings and streamed text); identity-free default: ``str`` of ids.
        max_context: Longest prompt + output allowed.
        retry_interval_s: In auto mode, how long to stay detached before trying the server again.
        draft_tokens: In speculative mode, most tokens the shadow drafts per verify request (k >= 1), or
            ``"auto"`` to adapt k to the acceptance (:class:`~shadowpeft.runtime.speculative.DraftLength`).
    """

    def __init__(
        self,
        export: ExportDir,
        *,
        mode: Mode = "detached",
        client=None,
        eos_ids: Sequence[int] = (),
        decode=None,
        max_context: int | None = None,
        retry_interval_s: float = 1.0,
        draft_tokens: int | str = 4,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
        if mode != "detached" and client is None:
            raise ValueError(f"mode {mode!r} needs a server: pass a BackboneClient (shadow-run --server URL).")
        if mode != "detached" and not export.has(DEVICE_HEAD):
            raise RuntimeGenerationError(
                f"mode {mode!r} needs the {DEVICE_HEAD} graph, which this export lacks; re-export with --split."
            )
        self.export, self.mode, self.client = export, mode, client
        self.eos_ids = set(eos_ids)
        self.decode = decode or (lambda ids: " ".join(map(str, ids)))
        self.max_context = max_context
        self.retry_interval_s = retry_interval_s
        self.draft_tokens = check_draft_tokens(draft_tokens) if mode == "speculative" else draft_tokens

    # ----- public API -------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[GenerationResult]:
        """Generates for every prompt; detached prompts run as one padded batch, others one by one."""
        results = [GenerationResult(list(p)) for p in prompts]
        groups = [list(range(len(prompts)))] if self.mode == "detached" else [[i] for i in range(len(prompts))]
        for rows in groups:
            for _event in self._run([results[i] for i in rows], sampling):
                pass
        return results

    def stream(self, prompt: Sequence[int], sampling: SamplingConfig, result: GenerationResult | None = None):
        """Yields :class:`TokenEvent` as tokens are generated for one prompt; fills ``result`` if given."""
        result = result or GenerationResult(list(prompt))
        yield from self._run([result], sampling)

    # ----- the loop ---------------------------------------------------------------------------------
    def _run(self, results: list[GenerationResult], sampling: SamplingConfig) -> Iterator[TokenEvent]:
        budget = self._budget(results, sampling)
        if self.mode == "speculative":
            check_greedy(sampling)
        shadow = DeviceShadow(self.export, len(results))
        link = CloudLink(self.export, self.client) if self.mode != "detached" else None
        samplers = [Sampler(sampling) for _ in results]
        down_since: float | None = None
        emitted = [0] * len(results)
        done = [False] * len(results)
        ids, real = left_pad([r.prompt_ids for r in results])
        sent0, received0, requests0 = self._wire()
        try:
            if self.mode == "speculative":
                yield from self._speculative(shadow, link, samplers[0], results[0], sampling.stop, budget)
                return
            for step in range(budget):
                started = time.perf_counter()
                shadow_logits, s0 = shadow.step(ids, real)
                logits, mode = shadow_logits[:, -1], "detached"
                if link is not None:
                    link.record(ids[0], s0[0])
                    logits, mode, down_since = self._coupled(link, logits, down_since, results[0])
                for row, result in enumerate(results):
                    if done[row]:
                        continue
                    token = samplers[row](logits[row], result.prompt_ids + result.token_ids)
                    result.token_ids.append(token)
                    result.modes.append(mode)
                    done[row], delta = self._advance(result, token, sampling.stop, emitted, row)
                    if delta or not done[row]:
                        yield TokenEvent(row, token, delta, mode, len(result.token_ids) - 1)
                elapsed = time.perf_counter() - started
                for result in results:
                    if step == 0:
                        result.prefill_s += elapsed
                    else:
                        result.decode_s += elapsed
                if all(done):
                    break
                ids = np.asarray([[r.token_ids[-1]] for r in results], dtype=np.int64)
                real = np.ones_like(ids)
        finally:
            if link is not None:
                results[0].restarts = link.restarts
                link.close()
            sent, received, requests = self._wire()
            for result in results:
                result.bytes_sent, result.bytes_received = sent - sent0, received - received0
                result.round_trips = requests - requests0

    def _speculative(self, shadow, link, sampler, result: GenerationResult, stop, budget: int):
        """Speculative mode's rounds for one prompt; see :mod:`shadowpeft.runtime.speculative`."""
        decoder = SpeculativeDecoder(shadow, link, sampler, draft_tokens=self.draft_tokens, eos_ids=self.eos_ids)
        emitted = [0]

        def emit(token: int):
            before = len(result.token_ids)
            result.token_ids.append(token)
            result.modes.append("speculative")
            done, delta = self._advance(result, token, stop, emitted, 0)
            if decoder.rounds == 1 and len(result.token_ids) > max(before, 1):
                result.prefill_tokens += 1  # the first round's accepted drafts came with the prefill
            event = TokenEvent(0, token, delta, "speculative", len(result.token_ids) - 1)
            return done, event if delta or not done else None

        def timed(seconds: float) -> None:
            if decoder.rounds == 1:
                result.prefill_s += seconds
            else:
                result.decode_s += seconds

        try:
            yield from decode_rounds(decoder, result.prompt_ids, budget, emit, timed)
        finally:
            result.drafted, result.accepted = decoder.drafted, decoder.accepted

    def _coupled(self, link: CloudLink, shadow_logits: np.ndarray, down_since: float | None, result):
        """Base logits from the server, or (auto mode) the shadow's when the server does not answer."""
        from shadowpeft.runtime.errors import ServerRejected, ServerUnavailable

        if self.mode == "auto" and down_since is not None and time.monotonic() - down_since < self.retry_interval_s:
            return shadow_logits, "detached", down_since
        try:
            return link.logits()[None], "coupled", None
        except (ServerUnavailable, ServerRejected) as err:
            if self.mode == "coupled":
                raise RuntimeGenerationError(
                    f"Coupled mode lost the backbone server: {err}. Start it again, or run with --mode auto "
                    "(falls back to the device shadow) or --mode detached."
                ) from err
            if down_since is None:
                result.fallbacks += 1
            link.sequence_id, link.synced = None, 0  # next time: a fresh session, re-prefilled
            return shadow_logits, "detached", time.monotonic()

    def _advance(self, result: GenerationResult, token: int, stop: tuple[str, ...], emitted: list[int], row: int):
        """Updates text and finish state after ``token``; returns (finished, new text to emit)."""
        finished = False
        if token in self.eos_ids:
            result.token_ids.pop()
            result.modes.pop()
            result.finish_reason, finished = "eos", True
        text = self.decode(result.token_ids)
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        if cut >= 0:
            text, result.finish_reason, finished = text[:cut], "stop", True
        result.text = text
        hold = 0 if finished else _held_back(text, stop)
        delta = text[emitted[row] : len(text) - hold]
        emitted[row] += len(delta)
        return finished, delta

    def _budget(self, results: list[GenerationResult], sampling: SamplingConfig) -> int:
        longest = max(len(r.prompt_ids) for r in results)
        if any(not r.prompt_ids for r in results):
            raise ValueError("Every prompt needs at least one token.")
        if self.max_context is None:
            return sampling.max_new_tokens
        if longest >= self.max_context:
            raise ValueError(
                f"A prompt of {longest} tokens leaves no room within the device's max_context of {self.max_context}; "
                "shorten it or use a profile with a longer context."
            )
        return min(sampling.max_new_tokens, self.max_context - longest)

    def _wire(self) -> tuple[int, int, int]:
        """The client's counters: bytes sent, bytes received, requests."""
        counters = ("bytes_sent", "bytes_received", "requests")
        return tuple(int(getattr(self.client, name, 0)) for name in counters)  # type: ignore[return-value]


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that may still become a stop string, or an incomplete character."""
    if text.endswith("\ufffd"):
        return 1
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold

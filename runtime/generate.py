"""Generation with an export: detached (device graphs only), coupled (device + remote backbone, one
token per request), speculative (the device drafts, the backbone verifies several tokens per request:
runtime/speculative.py) and auto (the device while the shadow is confident, the cloud otherwise:
runtime/escalation.py).

Every token event says which mode produced it, and so which side (:attr:`TokenEvent.side`). The
device shadow runs for every token in every mode (the cloud needs its ``s0``), so when auto mode's
server is unreachable, slow or lost the shadow's own logits take over with no extra work, and once
the server answers again (tried at most every ``retry_interval_s``) the link sends it the tokens it
missed and escalation resumes on a fresh session.

Before the first step of every mode but detached, the link checks that the server runs this
export's backbone (runtime/handshake.py; once per client): coupled and speculative mode refuse another
one, auto mode answers on the device and says why (:attr:`GenerationResult.fallback_reason`). Auto
mode waits at most ``cloud_wait_s`` per step for the server, retries included, before it uses the
shadow's token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from shadowpeft.runtime.contract import DEVICE_HEAD, left_pad
from shadowpeft.runtime.errors import RuntimeGenerationError
from shadowpeft.runtime.escalation import EscalationPolicy, Escalator
from shadowpeft.runtime.export_dir import ExportDir
from shadowpeft.runtime.sampling import Sampler, SamplingConfig
from shadowpeft.runtime.speculative import SpeculativeDecoder, check_draft_tokens, decode_rounds, speculative_step
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

    @property
    def side(self) -> str:
        """``device`` for a detached token, ``cloud`` for one the attached model chose (coupled, speculative)."""
        return "device" if self.mode == "detached" else "cloud"


@dataclass
class GenerationResult:
    """Everything about one prompt's generation."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    modes: list[str] = field(default_factory=list)
    finish_reason: str = "length"
    fallbacks: int = 0  # times auto mode found the cloud gone and answered on the device
    fallback_reason: str | None = None  # auto mode: why the device first took over (no server, another backbone)
    escalated: int = 0  # auto mode: steps whose confidence sent them to the cloud (answered there or not)
    restarts: int = 0  # times the link re-prefilled a fresh server session
    prefill_s: float = 0.0
    decode_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    round_trips: int = 0  # HTTP requests to the server: prompt chunks, steps, retries, re-prefills, the end
    drafted: int = 0  # speculative rounds: tokens the shadow drafted and the server verified
    accepted: int = 0  # speculative rounds: drafted tokens the attached model accepted
    rounds: int = 0  # speculative rounds: verify requests (each yields its accepted drafts plus one token)
    prefill_tokens: int = 0  # tokens the prefill step yielded beyond the first (left out of tokens_per_s)

    @property
    def tokens_per_s(self) -> float:
        return (len(self.token_ids) - self.prefill_tokens) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def cloud_fraction(self) -> float:
        """Share of the generated tokens the attached model chose (0.0 when nothing was generated)."""
        return sum(m != "detached" for m in self.modes) / len(self.modes) if self.modes else 0.0


class Generator:
    """Decodes prompts (token id lists) with an export.

    Args:
        export: The opened export (``device/shadow`` needed; ``device/head`` too for coupled/auto).
        mode: ``detached``, ``coupled``, ``speculative`` or ``auto``.
        client: A :class:`~shadowpeft.runtime.client.BackboneClient` for every mode but detached.
        eos_ids: Token ids that end a sequence.
        decode: Turns ids into text (for stop strings and streamed text); identity-free default: ``str`` of ids.
        max_context: Longest prompt + output allowed.
        retry_interval_s: In auto mode, how long to stay detached before trying the server again.
        draft_tokens: Speculative rounds (speculative mode, and auto mode's cloud): most tokens the shadow
            drafts per verify request (k >= 1), or ``"auto"`` to adapt k to the acceptance
            (:class:`~shadowpeft.runtime.speculative.DraftLength`).
        escalation: Auto mode's policy (:class:`~shadowpeft.runtime.escalation.EscalationPolicy`); by
            default the threshold the export's manifest carries (none: every step goes to the cloud).
        cloud_wait_s: In auto mode, most seconds a step waits for the server, retries included, before the
            shadow's token is used (default: the client's ``timeout``).
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
        escalation: EscalationPolicy | None = None,
        cloud_wait_s: float | None = None,
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
        self.draft_tokens = check_draft_tokens(draft_tokens)
        self.escalation = escalation or default_policy(export)
        self.cloud_wait_s = cloud_wait_s if cloud_wait_s is not None or mode != "auto" else client.timeout

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
        shadow = DeviceShadow(self.export, len(results))
        link = CloudLink(self.export, self.client) if self.mode != "detached" else None
        samplers = [Sampler(sampling) for _ in results]
        decoder, escalator = self._decoder(shadow, link, samplers[0])
        self._handshake(link, escalator)  # before the counters: one request per client, not per prompt
        emitted = [0] * len(results)
        done = [False] * len(results)
        ids, real = left_pad([r.prompt_ids for r in results])
        sent0, received0, requests0 = self._wire()
        try:
            if decoder is not None:
                yield from self._rounds(decoder, escalator, results[0], sampling.stop, budget)
                return
            for step in range(budget):
                started = time.perf_counter()
                shadow_logits, s0 = shadow.step(ids, real)
                logits, mode = shadow_logits[:, -1], "detached"
                if link is not None:
                    link.record(ids[0], s0[0])
                    logits, mode = self._coupled(link), "coupled"
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

    def _decoder(self, shadow, link, sampler) -> tuple[SpeculativeDecoder | None, Escalator | None]:
        """Speculative and auto mode's rounds over ``shadow`` and ``link``, and auto's escalator (else ``None``)."""
        if self.mode not in ("speculative", "auto"):
            return None, None
        decoder = SpeculativeDecoder(shadow, link, sampler, draft_tokens=self.draft_tokens, eos_ids=self.eos_ids)
        if self.mode != "auto":
            return decoder, None
        escalator = Escalator(
            decoder, self.escalation, retry_interval_s=self.retry_interval_s, wait_s=self.cloud_wait_s
        )
        return decoder, escalator

    def _handshake(self, link: CloudLink | None, escalator: Escalator | None) -> None:
        """Before the first step: does the server run this export's backbone? (runtime/handshake.py)

        Coupled and speculative mode stop with a clear error on another backbone (BackboneMismatch) or no
        server; auto mode's escalator keeps to the device and records why.
        """
        from shadowpeft.runtime.errors import ServerRejected, ServerUnavailable

        if escalator is not None:
            escalator.handshake()
        elif link is not None:
            try:
                link.handshake()
            except (ServerUnavailable, ServerRejected) as err:
                raise RuntimeGenerationError(
                    f"{self.mode.capitalize()} mode cannot reach the backbone server: {err} Start it, or run with "
                    "--mode auto (falls back to the device shadow) or --mode detached."
                ) from err

    def _rounds(self, decoder, escalator, result: GenerationResult, stop, budget: int):
        """Speculative and auto mode: rounds of one or more tokens for one prompt (runtime/speculative.py)."""
        emitted = [0]

        def emit(token: int, mode: str, first_round: bool):
            result.token_ids.append(token)
            result.modes.append(mode)
            done, delta = self._advance(result, token, stop, emitted, 0)
            if escalator is not None:  # known from the handshake on: shadow-run prints it at once
                result.fallback_reason = escalator.fallback_reason
            if first_round and len(result.token_ids) > 1:
                result.prefill_tokens += 1  # the first round's accepted drafts came with the prefill
            event = TokenEvent(0, token, delta, mode, len(result.token_ids) - 1)
            return done, event if delta or not done else None

        def timed(seconds: float, first_round: bool) -> None:
            if first_round:
                result.prefill_s += seconds
            else:
                result.decode_s += seconds

        try:
            yield from decode_rounds(escalator or speculative_step(decoder), result.prompt_ids, budget, emit, timed)
        finally:
            result.drafted, result.accepted, result.rounds = decoder.drafted, decoder.accepted, decoder.rounds
            if escalator is not None:
                result.escalated, result.fallbacks = escalator.escalated, escalator.fallbacks
                result.fallback_reason = escalator.fallback_reason

    def _coupled(self, link: CloudLink) -> np.ndarray:
        """Base logits (1, V) from the server, or a clear error when it does not answer."""
        from shadowpeft.runtime.errors import ServerRejected, ServerUnavailable

        try:
            return link.logits()[None]
        except (ServerUnavailable, ServerRejected) as err:
            raise RuntimeGenerationError(
                f"Coupled mode lost the backbone server: {err}. Start it again, or run with --mode auto "
                "(falls back to the device shadow) or --mode detached."
            ) from err

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


def default_policy(export: ExportDir) -> EscalationPolicy:
    """Auto mode's policy from the export: the threshold its manifest carries, escalating per token."""
    carried = export.manifest.escalation
    if carried is None:
        return EscalationPolicy()
    return EscalationPolicy(threshold=float(carried.threshold), source="manifest")


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

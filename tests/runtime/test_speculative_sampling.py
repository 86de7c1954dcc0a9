"""Speculative sampling keeps the attached model's distribution, whatever the shadow drafts.

A toy pair of models on a 4-token vocabulary (each token's logits depend on the previous token
only) stands in for the shadow (drafts) and the attached model (targets). Thousands of sequences of
3 tokens are decoded with draft-and-verify rounds and their empirical joint distribution is compared
with the exact one of sampling from the attached model token by token.

Tolerance: total variation distance <= 0.04 between the empirical and the exact joint distribution
of 64 outcomes from 12,000 sequences. Sampling noise alone gives about 0.02 (measured: 0.019 to
0.027 over seeds 0 to 5 of the correct decoder, 2 drafts per round), while the draft model's own
joint distribution is 0.68 away, so a decoder that keeps drafts it should reject lands far outside
(the test checks that too).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shadowpeft.runtime.sampling import Sampler, SamplingConfig
from shadowpeft.runtime.speculative import SpeculativeDecoder, decode_rounds, speculative_step, verify_drafts

VOCAB = 4
LENGTH = 3
SEQUENCES = 12_000
TOLERANCE = 0.04
PROMPT = [0]
# Rows: the previous token; columns: the next token's logits.
ATTACHED = np.log(
    np.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
)
SHADOW = np.log(np.array([[0.2, 0.2, 0.5, 0.1], [0.4, 0.3, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.3, 0.3, 0.2, 0.2]]))
SETTINGS = SamplingConfig(max_new_tokens=LENGTH, temperature=0.9, top_p=0.95, repetition_penalty=1.2, seed=0)


class ToyShadow:
    """The device shadow's interface over the SHADOW table (its cache is the list of processed tokens)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def step(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.tokens += ids[0].tolist()
        return SHADOW[ids[0]][None], np.zeros((1, ids.shape[1], 2), np.float32)

    def trim(self, n: int) -> None:
        del self.tokens[len(self.tokens) - n :]


class ToyLink:
    """The cloud link's interface over the ATTACHED table."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.requests = 0

    def record(self, ids: np.ndarray, s0: np.ndarray) -> None:
        self.ids += [int(i) for i in ids]

    def verify(self, last: int, *, deadline: float | None = None) -> np.ndarray:
        self.requests += 1
        return ATTACHED[self.ids[-last:]]

    def rollback(self, n: int) -> None:
        del self.ids[len(self.ids) - n :]


def decode(sampler: Sampler, draft_tokens: int) -> tuple[int, ...]:
    shadow, link = ToyShadow(), ToyLink()
    decoder = SpeculativeDecoder(shadow, link, sampler, draft_tokens=draft_tokens)  # type: ignore[arg-type]
    tokens = list(
        decode_rounds(speculative_step(decoder), PROMPT, LENGTH, lambda t, m, f: (False, t), lambda s, f: None)
    )
    assert shadow.tokens == link.ids == PROMPT + tokens[:-1], "the caches drifted from the accepted text"
    return tuple(tokens)


def exact_joint(table: np.ndarray) -> dict[tuple[int, ...], float]:
    """P(t1..t3) when every token is drawn from ``table``'s processed distribution (penalty, temperature, top-p)."""
    sampler = Sampler(SETTINGS)
    joint = {}
    for tokens in itertools.product(range(VOCAB), repeat=LENGTH):
        seen, probability = list(PROMPT), 1.0
        for token in tokens:
            probability *= sampler.distribution(table[seen[-1]], seen)[token]
            seen.append(token)
        joint[tokens] = probability
    return joint


def total_variation(samples: list[tuple[int, ...]], joint: dict[tuple[int, ...], float]) -> float:
    counts = dict.fromkeys(joint, 0)
    for sample in samples:
        counts[sample] += 1
    return 0.5 * sum(abs(counts[k] / len(samples) - p) for k, p in joint.items())


@pytest.mark.parametrize("draft_tokens", [1, 4])
def test_speculative_sampling_draws_from_the_attached_distribution(draft_tokens: int) -> None:
    sampler = Sampler(SETTINGS)
    samples = [decode(sampler, draft_tokens) for _ in range(SEQUENCES)]
    attached = exact_joint(ATTACHED)
    assert total_variation(samples, attached) <= TOLERANCE
    # The drafts alone follow a clearly different distribution: the check above can tell them apart.
    assert total_variation(samples, exact_joint(SHADOW)) > 4 * TOLERANCE


def test_a_decoder_that_keeps_every_draft_fails_the_same_check(monkeypatch) -> None:
    def keep_all(sampler, drafts, draft_probs, target_probs):
        return len(drafts), sampler.pick(target_probs[-1])

    monkeypatch.setattr("shadowpeft.runtime.speculative.verify_drafts", keep_all)
    sampler = Sampler(SETTINGS)
    samples = [decode(sampler, 2) for _ in range(SEQUENCES // 4)]
    assert total_variation(samples, exact_joint(ATTACHED)) > 3 * TOLERANCE


def test_verification_residual_and_acceptance_for_one_draft() -> None:
    # p = (0.6, 0.4), q = (0.2, 0.8): draft 0 is always kept (p/q = 3); draft 1 is kept with probability
    # 0.5 and otherwise replaced by a token from max(p - q, 0) = (0.4, 0): always 0.
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=1))
    p, q = np.array([0.6, 0.4]), np.array([0.2, 0.8])
    after = np.array([0.5, 0.5])
    assert all(verify_drafts(sampler, [0], [q], [p, after])[0] == 1 for _ in range(200))
    outcomes = [verify_drafts(sampler, [1], [q], [p, after]) for _ in range(4000)]
    kept = sum(accepted == 1 for accepted, _ in outcomes) / len(outcomes)
    assert abs(kept - 0.5) < 0.03  # 4000 draws: standard error 0.008
    assert all(token == 0 for accepted, token in outcomes if accepted == 0)

"""The sampler: greedy, top-k, top-p, repetition penalty, seeds and bad settings."""

from __future__ import annotations

import numpy as np
import pytest

from shadowpeft.runtime.sampling import Sampler, SamplingConfig


def test_greedy_and_top_k_1_pick_the_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingConfig())(logits, []) == 1
    assert all(Sampler(SamplingConfig(temperature=1.0, top_k=1, seed=s))(logits, []) == 1 for s in range(20))


def test_plain_greedy_takes_the_argmax_of_the_logits_directly(monkeypatch):
    rng = np.random.default_rng(0)
    cases = [rng.standard_normal(4096).astype(np.float32) for _ in range(20)]
    cases += [np.array([1.0, 3.0, 3.0, -np.inf], dtype=np.float32), np.full(8, -np.inf, dtype=np.float32)]
    sampler = Sampler(SamplingConfig())
    expected = [sampler.pick(sampler.distribution(logits, [])) for logits in cases]  # ties: the first, as before
    monkeypatch.setattr(Sampler, "distribution", lambda *args: pytest.fail("no V-sized float64 distribution"))
    assert [sampler(logits, [1, 2]) for logits in cases] == expected


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities ~ [0.6, 0.3, 0.1]: p=0.5 keeps only the first, p=0.8 the first two.
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    picks = {Sampler(SamplingConfig(temperature=1.0, top_p=0.5, seed=s))(logits, []) for s in range(50)}
    assert picks == {0}
    picks = {Sampler(SamplingConfig(temperature=1.0, top_p=0.8, seed=s))(logits, []) for s in range(200)}
    assert picks == {0, 1}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, 1.9, -0.5])
    assert Sampler(SamplingConfig())(logits, [0]) == 0
    assert Sampler(SamplingConfig(repetition_penalty=1.2))(logits, [0]) == 1  # 2.0 / 1.2 < 1.9
    logits = np.array([-1.0, -1.1])
    assert Sampler(SamplingConfig(repetition_penalty=1.2))(logits, [0]) == 1  # -1.2 < -1.1


def test_same_seed_same_tokens():
    logits = np.random.default_rng(0).standard_normal(50)
    config = SamplingConfig(temperature=1.0, seed=7)
    a, b = Sampler(config), Sampler(config)
    assert [a(logits, []) for _ in range(20)] == [b(logits, []) for _ in range(20)]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_new_tokens": 0}, {"temperature": -1}, {"top_k": -1}, {"top_p": 0}, {"repetition_penalty": 0}],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="Invalid sampling settings"):
        SamplingConfig(**kwargs)

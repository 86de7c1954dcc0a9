"""Auto mode's escalation by confidence: tokens are routed by the threshold as specified.

Against the in-process loopback backbone (the same cloud/backbone graph a server runs): each step's
confidence is the top softmax probability of the shadow's logits; a step at or above the threshold
is the shadow's own token, one below is the cloud's; ``request`` scope decides once at the first
step; without a threshold every token is the cloud's, and a cloud that fails leaves the device
answering with the shadow's tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from shadowpeft.runtime.errors import ServerUnavailable
from shadowpeft.runtime.escalation import EscalationPolicy, confidence
from shadowpeft.runtime.generate import GenerationResult, Generator
from shadowpeft.runtime.sampling import SamplingConfig
from tests.runtime.loopback import LoopbackBackbone
from tests.runtime.test_generate import GREEDY, PROMPTS, export, model, pytorch_greedy  # noqa: F401


def run(export, policy: EscalationPolicy, prompt=PROMPTS[0], backbone=None, sampling=GREEDY):  # noqa: F811
    backbone = backbone or LoopbackBackbone(export)
    generator = Generator(export, mode="auto", client=backbone, escalation=policy, retry_interval_s=0.0)
    result = GenerationResult(list(prompt))
    events = list(generator.stream(prompt, sampling, result))
    return result, events, backbone


def shadow_confidences(export, prompt, tokens) -> list[float]:  # noqa: F811
    """The shadow's confidence before each of ``tokens`` (a fresh detached pass over prompt + tokens)."""
    from shadowpeft.runtime.step import DeviceShadow

    shadow = DeviceShadow(export, 1)
    logits, _ = shadow.step(np.asarray([list(prompt) + list(tokens)], dtype=np.int64))
    return [confidence(logits[0, len(prompt) - 1 + i]) for i in range(len(tokens))]


def test_confidence_is_the_top_softmax_probability() -> None:
    logits = np.array([2.0, 1.0, 0.0, -3.0])
    probs = np.exp(logits) / np.exp(logits).sum()
    assert confidence(logits) == pytest.approx(probs.max(), rel=1e-12)
    assert confidence(np.array([1000.0, 0.0])) == pytest.approx(1.0)  # no overflow


def test_a_threshold_of_zero_never_leaves_the_device(export, model) -> None:  # noqa: F811
    result, events, backbone = run(export, EscalationPolicy(threshold=0.0))
    assert result.token_ids == pytorch_greedy(model, PROMPTS[:1], "detached")[0].tolist()
    assert {e.mode for e in events} == {"detached"} and {e.side for e in events} == {"device"}
    assert backbone.calls == 0 and result.escalated == 0 and result.cloud_fraction == 0.0


@pytest.mark.parametrize("cloud", ["speculative", "coupled"])
def test_without_a_threshold_every_token_is_the_clouds(export, model, cloud) -> None:  # noqa: F811
    result, events, backbone = run(export, EscalationPolicy(cloud=cloud))
    assert result.token_ids == pytorch_greedy(model, PROMPTS[:1], "attached")[0].tolist()
    assert {e.mode for e in events} == {cloud} and {e.side for e in events} == {"cloud"}
    assert result.cloud_fraction == 1.0 and result.escalated >= 1
    if cloud == "coupled":
        assert result.escalated == backbone.calls == GREEDY.max_new_tokens


def test_each_token_goes_where_its_confidence_sends_it(export, model) -> None:  # noqa: F811
    # A threshold between the shadow's confidences on this prompt, so both sides answer.
    everywhere, _, _ = run(export, EscalationPolicy(cloud="coupled"))
    middle = float(np.median(shadow_confidences(export, PROMPTS[0], everywhere.token_ids)))
    result, _, backbone = run(export, EscalationPolicy(threshold=middle, cloud="coupled"))
    confidences = shadow_confidences(export, PROMPTS[0], result.token_ids)
    expected_modes = ["detached" if c >= middle else "coupled" for c in confidences]
    assert result.modes == expected_modes and {"detached", "coupled"} <= set(expected_modes)
    assert backbone.calls == result.escalated == expected_modes.count("coupled")
    # Every token is the chosen side's greedy token given the text so far.
    for i, mode in enumerate(result.modes):
        prefix = PROMPTS[0] + result.token_ids[:i]
        side = "attached" if mode == "coupled" else "detached"
        assert result.token_ids[i] == pytorch_greedy(model, [prefix], side, steps=1)[0, 0].item()


def test_speculative_escalation_emits_the_attached_tokens_after_a_low_confidence_step(export, model) -> None:  # noqa: F811
    everywhere, _, _ = run(export, EscalationPolicy(cloud="coupled"))
    middle = float(np.median(shadow_confidences(export, PROMPTS[0], everywhere.token_ids)))
    result, _, _ = run(export, EscalationPolicy(threshold=middle, cloud="speculative"))
    confidences = shadow_confidences(export, PROMPTS[0], result.token_ids)
    i = 0
    while i < len(result.token_ids):
        prefix = PROMPTS[0] + result.token_ids[:i]
        if result.modes[i] == "detached":
            assert confidences[i] >= middle
            assert result.token_ids[i] == pytorch_greedy(model, [prefix], "detached", steps=1)[0, 0].item()
            i += 1
            continue
        assert confidences[i] < middle, "a confident step went to the cloud"
        # A speculative round: its tokens, up to the next detached one, are attached greedy from here.
        end = next((j for j in range(i, len(result.modes)) if result.modes[j] == "detached"), len(result.modes))
        expected = pytorch_greedy(model, [prefix], "attached", steps=end - i)[0].tolist()
        assert result.token_ids[i:end] == expected[: end - i]
        i = end
    assert result.drafted >= result.accepted


def test_request_scope_decides_once_at_the_first_token(export, model) -> None:  # noqa: F811
    first = shadow_confidences(export, PROMPTS[0], [0])[0]
    local, _, backbone = run(export, EscalationPolicy(threshold=first, scope="request"))
    assert set(local.modes) == {"detached"} and backbone.calls == 0
    assert local.token_ids == pytorch_greedy(model, PROMPTS[:1], "detached")[0].tolist()
    cloud, _, _ = run(export, EscalationPolicy(threshold=min(1.0, first * 1.0001), scope="request"))
    assert set(cloud.modes) == {"speculative"}
    assert cloud.token_ids == pytorch_greedy(model, PROMPTS[:1], "attached")[0].tolist()


def test_a_failing_cloud_leaves_the_device_answering(export, model) -> None:  # noqa: F811
    backbone = LoopbackBackbone(export)
    backbone.down = True
    result, events, _ = run(export, EscalationPolicy(), backbone=backbone)
    assert result.token_ids == pytorch_greedy(model, PROMPTS[:1], "detached")[0].tolist()
    assert set(result.modes) == {"detached"} and result.fallbacks == 1
    assert result.escalated == GREEDY.max_new_tokens  # every step asked for the cloud and got the device


class _FailsOnce(LoopbackBackbone):
    """Its third request fails as a timeout would, while the server still holds the sequence."""

    def step(self, *args, **options):
        if self.calls == 2:
            self.calls += 1
            raise ServerUnavailable("timed out")
        return super().step(*args, **options)


def test_a_fallback_ends_the_abandoned_server_session(export) -> None:  # noqa: F811
    backbone = _FailsOnce(export)
    result, _, _ = run(export, EscalationPolicy(), backbone=backbone)
    assert result.fallbacks == 1 and "detached" in result.modes and "speculative" in result.modes
    assert backbone.ended[0] == 1  # the abandoned first sequence, ended at the fallback (best effort)
    assert backbone.sessions == {}  # and the second one at the end: the server holds nothing


def test_auto_mode_samples_too(export) -> None:  # noqa: F811
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.8, seed=5)
    a, _, _ = run(export, EscalationPolicy(), sampling=sampling)  # speculative sampling for every token
    b, _, _ = run(export, EscalationPolicy(), sampling=sampling)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 10 and set(a.modes) == {"speculative"}


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="threshold must be a probability"):
        EscalationPolicy(threshold=1.5)
    with pytest.raises(ValueError, match="scope must be one of token, request"):
        EscalationPolicy(scope="prompt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cloud must be one of speculative, coupled"):
        EscalationPolicy(cloud="detached")


def test_the_default_policy_is_the_threshold_the_manifest_carries(export) -> None:  # noqa: F811
    import dataclasses

    from shadowpeft.runtime.generate import default_policy
    from shadowpeft.runtime.manifest import Escalation

    assert default_policy(export) == EscalationPolicy()  # the toy export carries none: every token to the cloud
    escalation = Escalation(confidence="token-probability", threshold=0.3)
    carried = dataclasses.replace(export.manifest, escalation=escalation)
    policy = default_policy(dataclasses.replace(export, manifest=carried))
    assert (policy.threshold, policy.scope, policy.cloud, policy.source) == (0.3, "token", "speculative", "manifest")

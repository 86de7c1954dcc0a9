"""Speculative split decoding against a live shadow-serve on loopback: greedy tokens equal coupled mode's
for k = 1..8 and for drafts that are all right, all wrong or mixed; the rollback leaves both KV caches equal
to a fresh prefill; an offset beyond what the server holds is refused with a 409 and the device recovers.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from shadowpeft.runtime.client import BackboneClient
from shadowpeft.runtime.contract import INPUT_IDS, MODEL_NAME, SEQUENCE_ID, SEQUENCE_OFFSET, SHADOW_STATES
from shadowpeft.runtime.export_dir import open_export
from shadowpeft.runtime.generate import GenerationResult, Generator
from shadowpeft.runtime.protocol import HEADER_LENGTH, encode_request
from shadowpeft.runtime.sampling import Sampler, SamplingConfig
from shadowpeft.runtime.server import ServerConfig, create_app
from shadowpeft.runtime.speculative import DraftLength, SpeculativeDecoder, verify_drafts
from shadowpeft.runtime.step import CloudLink, DeviceShadow
from tests.runtime.conftest import serve_in_thread
from tests.runtime.test_generate import PROMPTS

TOKEN = "speculative-test-token-0123456789"
GREEDY = SamplingConfig(max_new_tokens=12)
FP32_TOL = 1e-5  # cached one-token steps vs one pass over the same tokens, fp32 onnxruntime: ~1e-6 apart


@pytest.fixture(scope="module")
def export(toy_export):
    return open_export(toy_export.export, threads=1)


@pytest.fixture(scope="module")
def live(export):
    """(app, url) of one server for the whole module."""
    app = create_app(export, ServerConfig(TOKEN))
    with serve_in_thread(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def coupled(export, live):
    """Coupled mode's greedy tokens for PROMPTS over the same server (the reference)."""
    client = BackboneClient(live[1], token=TOKEN, dtype="float32")
    return [r.token_ids for r in Generator(export, mode="coupled", client=client).generate(PROMPTS, GREEDY)]


def speculative(export, url, k, **client_options) -> list[GenerationResult]:
    client = BackboneClient(url, token=TOKEN, dtype=client_options.pop("dtype", "float32"), **client_options)
    return Generator(export, mode="speculative", client=client, draft_tokens=k).generate(PROMPTS, GREEDY)


def one_hot(token: int, size: int) -> tuple[int, np.ndarray]:
    """A draft chosen for sure (greedy): the token and its one-hot distribution."""
    probs = np.zeros(size)
    probs[token] = 1.0
    return token, probs


def oracle(monkeypatch, expected: list[list[int]], right) -> None:
    """Makes the shadow draft ``expected`` (coupled's tokens) where ``right(position)``, a wrong token elsewhere."""

    def draft(self, shadow_logits, seen):
        for prompt, tokens in zip(PROMPTS, expected, strict=True):
            position = len(seen) - len(prompt)
            if seen[: len(prompt)] != prompt:
                continue
            if seen[len(prompt) :] != tokens[:position]:
                return one_hot(0, shadow_logits.size)  # after a wrong draft: rejected whatever it is
            token = tokens[position] if right(position) else (tokens[position] + 1) % shadow_logits.size
            return one_hot(token, shadow_logits.size)
        raise AssertionError("drafting for an unknown prompt")

    monkeypatch.setattr(SpeculativeDecoder, "draft", draft)


def test_greedy_verification_keeps_the_agreeing_prefix_then_the_attached_token() -> None:
    greedy = Sampler(SamplingConfig())

    def verify(drafts, choices):
        size = 10
        draft_probs = [one_hot(d, size)[1] for d in drafts]
        return verify_drafts(greedy, drafts, draft_probs, [one_hot(c, size)[1] for c in choices])

    assert verify([], [7]) == (0, 7)
    assert verify([1, 2, 3], [1, 2, 3, 4]) == (3, 4)  # all right: three drafts plus the bonus token
    assert verify([1, 2, 3], [9, 2, 3, 4]) == (0, 9)  # the first is wrong: only the attached token
    assert verify([1, 2, 3], [1, 9, 3, 4]) == (1, 9)  # agreement after a mismatch does not count
    with pytest.raises(ValueError, match="one target more"):
        verify([1, 2], [1, 2])


@pytest.mark.parametrize("k", range(1, 9))
def test_speculative_greedy_equals_coupled(export, live, coupled, k) -> None:
    results = speculative(export, live[1], k, max_chunk_tokens=3)  # the 7-token prompt goes up in 3 chunks
    assert [r.token_ids for r in results] == coupled
    assert all(r.modes == ["speculative"] * GREEDY.max_new_tokens for r in results)
    assert all(r.drafted > 0 and 0 <= r.accepted <= r.drafted for r in results)
    assert all(r.bytes_sent > 0 and r.bytes_received > 0 and r.round_trips > 0 for r in results)


def test_fp16_wire_equals_coupled(export, live, coupled) -> None:
    client = BackboneClient(live[1], token=TOKEN, dtype="float16")
    reference = [r.token_ids for r in Generator(export, mode="coupled", client=client).generate(PROMPTS, GREEDY)]
    assert [r.token_ids for r in speculative(export, live[1], 4, dtype="float16")] == reference


def test_all_right_drafts(export, live, coupled, monkeypatch) -> None:
    oracle(monkeypatch, coupled, lambda position: True)
    results = speculative(export, live[1], 4)
    assert [r.token_ids for r in results] == coupled
    for r in results:  # rounds of 4 drafts + 1 bonus: 5 + 5 + (1 + 1): 12 tokens in 3 verify requests
        assert (r.drafted, r.accepted) == (9, 9)
        assert r.round_trips == 3 + 1  # + sequence_end
    assert live[0].state.backbone.table.tokens() == 0, "sessions leaked"


def test_all_wrong_drafts(export, live, coupled, monkeypatch) -> None:
    oracle(monkeypatch, coupled, lambda position: False)
    results = speculative(export, live[1], 4)
    assert [r.token_ids for r in results] == coupled
    for r in results:  # one token per round; rooms 12..1 allow min(4, room - 1) drafts
        assert (r.drafted, r.accepted) == (4 * 8 + 3 + 2 + 1, 0)
        assert r.round_trips == 12 + 1


def test_draft_length_adapts_within_its_bounds() -> None:
    fixed = DraftLength.of(3)
    fixed.update(3, 0)
    assert fixed.current == 3  # a fixed k never moves
    auto = DraftLength.of("auto")
    assert (auto.current, auto.adaptive) == (DraftLength.START, True)
    for drafted, accepted, expected in [(4, 4, 6), (6, 6, 8), (8, 8, 8), (8, 2, 7), (0, 0, 7), (7, 0, 6)]:
        auto.update(drafted, accepted)
        assert auto.current == expected, (drafted, accepted)
    for _ in range(10):
        auto.update(auto.current, 0)
    assert auto.current == DraftLength.SMALLEST


def test_auto_draft_length_equals_coupled_and_follows_the_acceptance(export, live, coupled, monkeypatch) -> None:
    assert [r.token_ids for r in speculative(export, live[1], "auto")] == coupled
    oracle(monkeypatch, coupled, lambda position: True)
    for r in speculative(export, live[1], "auto"):  # rounds of 4 + 1, then 6 + 1 = 12 tokens in 2 requests
        assert (r.drafted, r.accepted, r.round_trips) == (10, 10, 2 + 1)
    oracle(monkeypatch, coupled, lambda position: False)
    results = speculative(export, live[1], "auto")
    assert [r.token_ids for r in results] == coupled
    for r in results:  # k shrinks 4, 3, 2, then 1 per round (rooms 9..2), nothing in the last room of 1
        assert (r.drafted, r.accepted, r.round_trips) == (4 + 3 + 2 + 8, 0, 12 + 1)


def test_mixed_drafts(export, live, coupled, monkeypatch) -> None:
    oracle(monkeypatch, coupled, lambda position: position % 3 != 2)
    results = speculative(export, live[1], 4)
    assert [r.token_ids for r in results] == coupled
    assert all(0 < r.accepted < r.drafted for r in results)


def test_rollback_leaves_both_caches_equal_to_a_fresh_prefill(export, live, coupled, monkeypatch) -> None:
    oracle(monkeypatch, coupled, lambda position: position % 3 != 1)  # accept 1 draft, then a mismatch
    app, url = live
    client = BackboneClient(url, token=TOKEN, dtype="float32")
    shadow, link = DeviceShadow(export, 1), CloudLink(export, client)
    decoder = SpeculativeDecoder(shadow, link, Sampler(GREEDY), draft_tokens=4)
    prompt = PROMPTS[0]
    first = decoder.round(prompt, list(prompt), room=12)
    assert (first.accepted, first.tokens) == (1, coupled[0][:2])
    accepted = prompt + first.tokens[:-1]  # the bonus token is pending: neither cache holds it yet
    assert link.ids == accepted and shadow.length == len(accepted)
    fresh = DeviceShadow(export, 1)
    fresh.step(np.asarray([accepted]))
    for name, value in fresh.cache.past.items():
        assert np.abs(shadow.cache.past[name] - value).max() <= FP32_TOL, name

    second = decoder.round(first.tokens[-1:], prompt + first.tokens, room=10)  # its request rolls the server back
    session = app.state.backbone.table.get(link.sequence_id)
    app.state.backbone.table.release(session)
    verified = accepted + first.tokens[-1:] + second.drafts  # what the server held after the second request
    assert session.length == len(verified)
    states = np.stack(link.states[: len(accepted) + 1])  # the drafts' rows were rolled back on the device
    drafted_states = DeviceShadow(export, 1).step(np.asarray([verified]))[1][0, len(accepted) + 1 :]
    expected = app.state.backbone.runner.run(
        app.state.backbone.runner.empty_past(), np.asarray([verified]), np.concatenate([states, drafted_states])[None]
    )[1]
    for name, value in expected.past.items():
        assert np.abs(session.past.past[name] - value).max() <= 1e-4, name  # s0 rows: incremental vs one pass
    link.close()


def test_an_offset_beyond_the_server_is_refused_and_the_device_recovers(export, live, coupled) -> None:
    app, url = live
    client = BackboneClient(url, token=TOKEN, dtype="float32")
    client.new_sequence_id = lambda: 4242  # so that this test can reach the device's sequence
    result = GenerationResult(PROMPTS[0])
    generator = Generator(export, mode="speculative", client=client, draft_tokens=3)
    for event in generator.stream(PROMPTS[0], GREEDY, result):
        if event.index == 0:  # after the first round: roll the server back behind the device's back
            assert infer(app, url, np.zeros((1, 0), np.int64), 3).status_code == 200  # a v2 client's rollback
            refused = infer(app, url, np.ones((1, 1), np.int64), 5)
            assert refused.status_code == 409
            error = refused.json()["error"]
            assert "holds 3 tokens on the server, but this request continues at sequence_offset 5" in error
    assert result.token_ids == coupled[0]
    assert result.restarts == 1  # the device's next request was refused the same way; it re-prefilled


def infer(app, url: str, ids: np.ndarray, offset: int) -> httpx.Response:
    """A plain KServe v2 request on sequence 4242 at ``offset`` (zero shadow states)."""
    s0 = np.zeros((1, ids.shape[1], app.state.backbone.runner.hidden_size), np.float32)
    body, size = encode_request(
        {INPUT_IDS: ids, SHADOW_STATES: s0}, parameters={SEQUENCE_ID: 4242, SEQUENCE_OFFSET: offset}
    )
    headers = {HEADER_LENGTH: str(size), "Authorization": f"Bearer {TOKEN}"}
    return httpx.post(f"{url}/v2/models/{MODEL_NAME}/infer", content=body, headers=headers)


def _shadow_run(toy_export, url: str, *args: str):
    from click.testing import CliRunner

    from shadowpeft.runtime.run_cli import main

    base = [str(toy_export.export), "-p", "the color is red", "--no-chat", "--server", url, "--token", TOKEN]
    return CliRunner().invoke(main, [*base, "--max-new-tokens", "8", "--wire", "float32", *args])


def test_shadow_run_json_summary(toy_export, live) -> None:
    import json

    runs = {}
    for mode, extra in (("coupled", ()), ("speculative", ("--draft-tokens", "3"))):
        cli = _shadow_run(toy_export, live[1], "--mode", mode, "--json", *extra)
        assert cli.exit_code == 0, cli.output
        lines = [json.loads(line) for line in cli.output.splitlines()]
        runs[mode] = lines[-1]
        assert runs[mode]["summary"] and [r["mode"] for r in lines[:-1]] == [mode] * len(lines[:-1])
    coupled, spec = runs["coupled"], runs["speculative"]
    assert spec["token_ids"] == coupled["token_ids"] and len(spec["token_ids"]) == spec["new_tokens"] == 8
    assert spec["tokens_by_mode"] == {"speculative": 8} and coupled["tokens_by_mode"] == {"coupled": 8}
    assert coupled["round_trips"] == 8 + 1 and (coupled["drafted"], coupled["accepted"]) == (0, 0)
    assert 0 < spec["round_trips"] <= 8 + 1 and spec["drafted"] >= spec["accepted"] >= 0
    for summary in runs.values():
        assert summary["bytes_sent"] > 0 and summary["bytes_received"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--mode", "speculative", "--draft-tokens", "0"), "drafts at least 1 token"),
        (("--mode", "speculative", "--draft-tokens", "two"), "not a whole number"),
        (("--mode", "coupled", "--draft-tokens", "2"), "--draft-tokens applies to --mode speculative or auto"),
        (("--mode", "speculative", "--escalate-below", "0.5"), "--escalate-below applies to --mode auto only"),
        (("--mode", "auto", "--escalate-below", "1.5"), "1.5 is not in the range"),
        (("--mode", "coupled", "--cloud", "coupled"), "--cloud applies to --mode auto only"),
    ],
)
def test_shadow_run_refuses_what_speculative_mode_does_not_do(toy_export, args, message) -> None:
    cli = _shadow_run(toy_export, "http://127.0.0.1:9", *args)
    assert cli.exit_code == 2 and message in cli.output, cli.output


def test_generator_refuses_bad_draft_tokens(export, live) -> None:
    client = BackboneClient(live[1], token=TOKEN)
    for bad in (0, "Auto", True, 2.5):
        with pytest.raises(ValueError, match="draft_tokens must be an integer >= 1"):
            Generator(export, mode="speculative", client=client, draft_tokens=bad)


def test_speculative_sampling_with_one_candidate_is_greedy_and_a_seed_repeats_itself(export, live, coupled) -> None:
    # top-k 1 leaves one candidate per step: sampling must give coupled's greedy tokens, through the
    # sampling path (acceptance ratios, residuals) rather than the greedy one.
    client = BackboneClient(live[1], token=TOKEN, dtype="float32")
    one = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=1, seed=0)
    results = Generator(export, mode="speculative", client=client, draft_tokens=3).generate(PROMPTS, one)
    assert [r.token_ids for r in results] == coupled
    free = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=11)
    runs = [Generator(export, mode="speculative", client=client, draft_tokens=3).generate(PROMPTS, free) for _ in "ab"]
    assert [r.token_ids for r in runs[0]] == [r.token_ids for r in runs[1]]
    assert all(len(r.token_ids) == 12 for r in runs[0])


def test_shadow_run_auto_mode_reports_sides_and_the_cloud_fraction(toy_export, live) -> None:
    import json

    summaries = {}
    for threshold in ("0", "1"):  # 0: every token on the device; 1: every token escalated
        cli = _shadow_run(toy_export, live[1], "--mode", "auto", "--escalate-below", threshold, "--json")
        assert cli.exit_code == 0, cli.output
        lines = [json.loads(line) for line in cli.output.splitlines()]
        summaries[threshold] = lines[-1]
        sides = {line["side"] for line in lines[:-1]}
        assert sides == ({"device"} if threshold == "0" else {"cloud"})
    device, cloud = summaries["0"], summaries["1"]
    assert device["cloud_fraction"] == 0.0 and device["escalated"] == 0 and device["round_trips"] == 0
    assert cloud["cloud_fraction"] == 1.0 and cloud["tokens_by_mode"] == {"speculative": 8}
    assert cloud["escalated"] >= 1 and cloud["round_trips_per_token"] == round(cloud["round_trips"] / 8, 4)


def test_shadow_run_auto_mode_says_where_its_threshold_comes_from(toy_export, live) -> None:
    cli = _shadow_run(toy_export, live[1], "--mode", "auto", "--escalate-below", "0.25", "--escalate", "request")
    assert cli.exit_code == 0, cli.output
    assert "confidence >= 0.25 (--escalate-below), decided per request" in cli.output

"""Runtime generation: detached and coupled tokens equal the graphs and PyTorch; auto falls back and resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shadowpeft.export.loading import load_checkpoint
from shadowpeft.export.validate import ChainRunner
from shadowpeft.reference_decode import greedy_decode
from shadowpeft.runtime.contract import GraphIO, positions_for
from shadowpeft.runtime.errors import RuntimeGenerationError
from shadowpeft.runtime.escalation import EscalationPolicy
from shadowpeft.runtime.export_dir import open_export
from shadowpeft.runtime.generate import Generator
from shadowpeft.runtime.sampling import SamplingConfig
from tests.runtime.loopback import LoopbackBackbone

PROMPTS = [[5, 9, 31, 7, 12, 40, 3 + 8], [17, 23, 6]]
GREEDY = SamplingConfig(max_new_tokens=10)
COUPLED_CLOUD = EscalationPolicy(cloud="coupled")  # auto mode without a threshold: the server for every token


@pytest.fixture(scope="module")
def model(toy_export):
    return load_checkpoint(toy_export.checkpoint).model


@pytest.fixture
def export(toy_export):
    return open_export(toy_export.export, threads=1)


def pytorch_greedy(model, prompts, mode, steps=GREEDY.max_new_tokens):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return greedy_decode(model, ids, attention_mask=mask, max_new_tokens=steps, mode=mode).tokens


def graph_greedy(export, prompts, chain, steps=GREEDY.max_new_tokens):
    """Greedy decode by running the exported graphs directly (the export's own validation runner)."""
    keys = ("device/shadow", "cloud/backbone", "device/head", "coupled")
    sessions = {k: export.session(k) for k in keys}
    ios = {k: GraphIO(export.graph(k).inputs, export.graph(k).outputs) for k in keys}
    runner = ChainRunner(chain, sessions, ios)
    runner.start(len(prompts))
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    tokens = []
    for _ in range(steps):
        nxt = runner.step(ids, mask, positions_for(mask, ids.shape[1]))[:, -1].argmax(-1)[:, None]
        tokens.append(nxt)
        ids, mask = nxt, np.concatenate([mask, np.ones_like(nxt)], axis=1)
    return np.concatenate(tokens, axis=1).tolist()


def test_detached_batch_equals_graph_and_pytorch_detached(export, model):
    results = Generator(export).generate(PROMPTS, GREEDY)
    expected = pytorch_greedy(model, PROMPTS, "detached")
    assert [r.token_ids for r in results] == expected.tolist() == graph_greedy(export, PROMPTS, "detached")
    assert all(r.modes == ["detached"] * 10 for r in results)
    # One prompt alone gives the same tokens as inside the padded batch.
    (alone,) = Generator(export).generate(PROMPTS[1:], GREEDY)
    assert alone.token_ids == results[1].token_ids


def test_coupled_equals_pytorch_attached(export, model):
    backbone = LoopbackBackbone(export)
    results = Generator(export, mode="coupled", client=backbone).generate(PROMPTS, GREEDY)
    expected = pytorch_greedy(model, PROMPTS, "attached")
    assert [r.token_ids for r in results] == expected.tolist() == graph_greedy(export, PROMPTS, "coupled")
    assert all(r.modes == ["coupled"] * 10 for r in results)
    assert backbone.sessions == {}, "sessions were not ended"


def test_coupled_session_eviction_reprefills_and_continues_identically(export, model):
    backbone = LoopbackBackbone(export)
    generator = Generator(export, mode="coupled", client=backbone)
    events = generator.stream(PROMPTS[0], GREEDY)
    tokens = []
    for event in events:
        tokens.append(event.token_id)
        if len(tokens) == 4:
            backbone.evict()
    assert tokens == pytorch_greedy(model, PROMPTS[:1], "attached")[0].tolist()


def test_coupled_fails_clearly_when_the_server_goes_away(export):
    backbone = LoopbackBackbone(export)
    backbone.down = True
    with pytest.raises(RuntimeGenerationError, match="--mode auto"):
        Generator(export, mode="coupled", client=backbone).generate(PROMPTS[:1], GREEDY)


def test_auto_falls_back_to_detached_and_returns_to_coupled(export, model):
    backbone = LoopbackBackbone(export)
    generator = Generator(export, mode="auto", client=backbone, retry_interval_s=0.0, escalation=COUPLED_CLOUD)
    from shadowpeft.runtime.generate import GenerationResult

    result = GenerationResult(PROMPTS[0])
    for event in generator.stream(PROMPTS[0], SamplingConfig(max_new_tokens=9), result):
        if event.index == 2:
            backbone.down = True  # the server dies after the third token
        if event.index == 5:
            backbone.down = False  # and is back three tokens later
    assert result.modes == ["coupled"] * 3 + ["detached"] * 3 + ["coupled"] * 3
    assert result.fallbacks == 1
    # The tokens produced while detached are the shadow's own choice given that prefix, and the
    # resumed coupled tokens equal PyTorch attached given the same prefix.
    prefix = PROMPTS[0] + result.token_ids[:6]
    expected = pytorch_greedy(model, [prefix], "attached")[0].tolist()
    assert result.token_ids[6:] == expected[:3]
    detached_from = pytorch_greedy(model, [PROMPTS[0] + result.token_ids[:3]], "detached")[0].tolist()
    assert result.token_ids[3:6] == detached_from[:3]


def test_stop_strings_eos_and_streamed_text(export):
    words = {i: f"w{i}" for i in range(1000)}

    def decode(ids):
        return " ".join(words[i] for i in ids)

    (full,) = Generator(export, decode=decode).generate(PROMPTS[:1], GREEDY)
    stop = decode(full.token_ids[3:5])
    generator = Generator(export, decode=decode)
    events = list(generator.stream(PROMPTS[0], SamplingConfig(max_new_tokens=10, stop=(stop,))))
    text = "".join(e.text for e in events)
    assert text == decode(full.token_ids)[: decode(full.token_ids).find(stop)]
    eos = full.token_ids[2]
    (cut,) = Generator(export, eos_ids=[eos], decode=decode).generate(PROMPTS[:1], GREEDY)
    assert cut.finish_reason == "eos" and cut.token_ids == full.token_ids[:2]


def test_max_context_bounds_generation(export):
    generator = Generator(export, max_context=len(PROMPTS[0]) + 3)
    (result,) = generator.generate(PROMPTS[:1], GREEDY)
    assert len(result.token_ids) == 3
    with pytest.raises(ValueError, match="max_context"):
        Generator(export, max_context=len(PROMPTS[0])).generate(PROMPTS[:1], GREEDY)


def test_sampling_is_seeded_and_bounded(export):
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    a = Generator(export).generate(PROMPTS, sampling)
    b = Generator(export).generate(PROMPTS, sampling)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    vocab = export.graph("device/shadow").outputs[0].shape[-1]
    assert all(0 <= t < vocab for r in a for t in r.token_ids)
    np.testing.assert_equal(len(a[0].token_ids), 8)

"""Tests for shadowpeft.runtime.kv: the one KV holder (with trim) and the step with past -> present feedback."""

from __future__ import annotations

import numpy as np
import pytest

from shadowpeft.runtime.contract import (
    CLOUD_BACKBONE,
    DEVICE_SHADOW,
    LOGITS,
    StackLayout,
    cloud_backbone_io,
    coupled_io,
    detached_shadow_io,
)
from shadowpeft.runtime.kv import KVCache, kv_inputs

SIZES = {"num_layers": 2, "kv_heads": 2, "head_dim": 4, "hidden": 8}


class _AppendSession:
    """Stands in for onnxruntime: each present.* is its past plus one row per new token (value = token id)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls = 0

    def run(self, names, feeds):
        self.calls += 1
        if self.fail:
            raise RuntimeError("graph failed")
        ids = feeds["input_ids"]
        out = []
        for name in names:
            past_name = name.replace("present", "past_key_values")
            if past_name in feeds:
                past = feeds[past_name]
                new = np.broadcast_to(ids[:, None, :, None], (*past.shape[:2], ids.shape[1], past.shape[3]))
                out.append(np.concatenate([past, new.astype(past.dtype)], axis=2))
            else:
                out.append(np.zeros((ids.shape[0], ids.shape[1], 3), np.float32))
        return out


def _names(graph_io):
    return [spec.name for spec in graph_io.outputs]


def test_empty_cache_follows_the_declared_kv_inputs() -> None:
    graph = detached_shadow_io(**SIZES, vocab=16, dtype="float16")
    cache = KVCache.empty(graph, 3)
    assert (
        list(cache.past)
        == [spec.name for spec in kv_inputs(graph)]
        == [
            "past_key_values.0.key",
            "past_key_values.0.value",
            "past_key_values.1.key",
            "past_key_values.1.value",
        ]
    )
    assert all(value.shape == (3, 2, 0, 4) and value.dtype == np.float16 for value in cache.past.values())
    assert cache.length == 0


def test_coupled_graph_has_both_stacks_shadow_first() -> None:
    layout = StackLayout(1, 2, 4)
    graph = coupled_io(shadow=layout, base=StackLayout(2, 1, 8), hidden=8, vocab=16)
    names = list(KVCache.empty(graph, 1).past)
    assert names[:2] == ["shadow_past_key_values.0.key", "shadow_past_key_values.0.value"]
    assert len(names) == 2 + 4


def test_step_feeds_present_back_as_past() -> None:
    graph = detached_shadow_io(**SIZES, vocab=16)
    cache, session = KVCache.empty(graph, 1), _AppendSession()
    values = cache.step(session, _names(graph), {"input_ids": np.array([[5, 6]])})
    assert LOGITS in values and cache.length == 2
    cache.step(session, _names(graph), {"input_ids": np.array([[7]])})
    assert cache.length == 3
    np.testing.assert_array_equal(cache.past["past_key_values.1.value"][0, 0, :, 0], [5, 6, 7])


def test_run_leaves_the_cache_unchanged_and_a_failed_step_keeps_it() -> None:
    graph = cloud_backbone_io(**SIZES)
    cache = KVCache.empty(graph, 1)
    _, following = cache.run(_AppendSession(), _names(graph), {"input_ids": np.array([[1, 2]])})
    assert (cache.length, following.length) == (0, 2)
    with pytest.raises(RuntimeError, match="graph failed"):
        following.step(_AppendSession(fail=True), _names(graph), {"input_ids": np.array([[3]])})
    assert following.length == 2


def test_trim_drops_the_last_positions() -> None:
    graph = detached_shadow_io(**SIZES, vocab=16)
    cache = KVCache.empty(graph, 1)
    cache.step(_AppendSession(), _names(graph), {"input_ids": np.array([[4, 5, 6, 7]])})
    cache.trim(3)
    assert cache.length == 1
    np.testing.assert_array_equal(cache.past["past_key_values.0.key"][0, 1, :, 2], [4])
    cache.trim(0)
    assert cache.length == 1


@pytest.mark.parametrize("n", [-1, 2, True, 1.0])
def test_trim_refuses_more_than_it_holds(n: object) -> None:
    graph = detached_shadow_io(**SIZES, vocab=16)
    cache = KVCache.empty(graph, 1)
    cache.step(_AppendSession(), _names(graph), {"input_ids": np.array([[4]])})
    with pytest.raises(ValueError, match=r"0 <= n <= 1"):
        cache.trim(n)  # type: ignore[arg-type]


def test_empty_refuses_a_kv_input_it_cannot_hold() -> None:
    graph = detached_shadow_io(**SIZES, vocab=16, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"'past_key_values.0.key' is bfloat16"):
        KVCache.empty(graph, 1)


# --- on the toy export's real graphs -----------------------------------------------------------------


def test_trim_equals_a_fresh_prefill(toy_export) -> None:
    from shadowpeft.runtime.export_dir import open_export
    from shadowpeft.runtime.step import DeviceShadow

    export = open_export(toy_export.export)
    ids = np.random.default_rng(3).integers(0, export.manifest.vocab_size, (1, 7))
    trimmed, fresh = DeviceShadow(export, 1), DeviceShadow(export, 1)
    trimmed.step(ids)
    trimmed.trim(3)
    fresh.step(ids[:, :4])
    assert trimmed.length == fresh.length == 4
    assert trimmed.cache.past.keys() == fresh.cache.past.keys()
    for name, value in fresh.cache.past.items():
        assert trimmed.cache.past[name].shape == value.shape, name
        np.testing.assert_allclose(trimmed.cache.past[name], value, atol=1e-5, err_msg=name)
    # Continuing after the trim is continuing the fresh prefill.
    logits_a, states_a = trimmed.step(ids[:, 4:5])
    logits_b, states_b = fresh.step(ids[:, 4:5])
    np.testing.assert_allclose(logits_a, logits_b, atol=1e-5)
    np.testing.assert_allclose(states_a, states_b, atol=1e-5)


def test_backbone_runner_steps_through_the_holder(toy_export) -> None:
    from shadowpeft.runtime.export_dir import open_export
    from shadowpeft.runtime.sessions import BackboneRunner

    export = open_export(toy_export.export)
    runner = BackboneRunner(export.session(CLOUD_BACKBONE), export.graph(CLOUD_BACKBONE))
    shadow = export.graph(DEVICE_SHADOW)
    d = runner.hidden_size
    empty = runner.empty_past()
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    s0 = np.random.default_rng(0).standard_normal((1, 3, d)).astype(np.float32)
    whole, after_three = runner.run(empty, ids, s0)
    first, after_two = runner.run(empty, ids[:, :2], s0[:, :2])
    last, _ = runner.run(after_two, ids[:, 2:], s0[:, 2:])
    assert (empty.length, after_two.length, after_three.length) == (0, 2, 3)
    np.testing.assert_allclose(np.concatenate([first, last], axis=1), whole, atol=1e-5)
    after_three.trim(1)
    for name, value in after_two.past.items():
        np.testing.assert_allclose(after_three.past[name], value, atol=1e-5)
    assert shadow.output_names[0] == LOGITS

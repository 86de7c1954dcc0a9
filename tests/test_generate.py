"""Exact KV-cached decoding: cached logits equal a full recompute, in both modes, with padding."""

from __future__ import annotations

import pytest
import torch

from shadowpeft import ShadowCache, greedy_decode
from tests.conftest import padded_batch
from tests.tolerances import CACHED_VS_FULL_FP32

NEW = 32


def _full_recompute(model, sequences, prompt_mask, mode):
    """Logits for every generated token from one uncached forward over prompt + generated tokens."""
    mask = torch.cat(
        [
            prompt_mask,
            torch.ones(sequences.shape[0], sequences.shape[1] - prompt_mask.shape[1], dtype=prompt_mask.dtype),
        ],
        dim=1,
    )
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(sequences, attention_mask=mask, position_ids=positions, mode=mode).logits
    start = prompt_mask.shape[1] - 1
    return logits[:, start : start + sequences.shape[1] - prompt_mask.shape[1]]


@pytest.mark.parametrize("mode", ["attached", "detached"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
def test_hf_generate_cached_equals_full_recompute(perturbed, mode, do_sample):
    ids, mask = padded_batch((9, 5))
    torch.manual_seed(0)
    out = perturbed.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=do_sample,
        top_k=0,
        mode=mode,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (2, ids.shape[1] + NEW)
    cached = torch.stack(out.logits, dim=1)  # (B, NEW, V) raw logits before sampling
    full = _full_recompute(perturbed, out.sequences, mask, mode)
    assert (cached - full).abs().max().item() <= CACHED_VS_FULL_FP32


@pytest.mark.parametrize("mode", ["attached", "detached"])
def test_reference_loop_matches_hf_generate(perturbed, mode):
    ids, mask = padded_batch((7, 3))
    hf = perturbed.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        mode=mode,
        pad_token_id=0,
        eos_token_id=None,
    )
    ref = greedy_decode(perturbed, ids, attention_mask=mask, max_new_tokens=12, mode=mode)
    assert torch.equal(ref.tokens, hf[:, ids.shape[1] :])
    full = _full_recompute(perturbed, torch.cat([ids, ref.tokens], dim=1), mask, mode)
    assert (ref.logits - full).abs().max().item() <= CACHED_VS_FULL_FP32


@pytest.mark.parametrize("mode", ["attached", "detached"])
def test_batched_padded_generation_equals_one_prompt_at_a_time(perturbed, mode):
    ids, mask = padded_batch((8, 4))
    batched = greedy_decode(perturbed, ids, attention_mask=mask, max_new_tokens=10, mode=mode)
    for row in range(2):
        alone = ids[row][mask[row] == 1].unsqueeze(0)
        single = greedy_decode(perturbed, alone, max_new_tokens=10, mode=mode)
        assert torch.equal(single.tokens[0], batched.tokens[row])
        torch.testing.assert_close(single.logits[0], batched.logits[row], atol=1e-4, rtol=1e-4)


def test_cache_advances_both_stacks_in_attached_mode_and_only_shadow_when_detached(perturbed):
    ids = torch.tensor([[5, 6, 7, 8]])
    cache = perturbed.new_cache()
    perturbed(ids, past_key_values=cache, use_cache=True)
    assert isinstance(cache, ShadowCache)
    assert cache.get_seq_length() == cache.base.get_seq_length() == cache.shadow.get_seq_length() == 4
    detached = perturbed.new_cache()
    perturbed(ids, past_key_values=detached, use_cache=True, mode="detached")
    assert detached.get_seq_length() == 4 and detached.base.get_seq_length() == 0


def test_beam_search_reorders_both_caches(perturbed):
    ids, mask = padded_batch((6, 6))
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        num_beams=3,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    cached = perturbed.generate(**kwargs)
    uncached = perturbed.generate(**kwargs, use_cache=False)  # recomputes everything each step
    assert cached.shape == (2, ids.shape[1] + 6)
    assert torch.equal(cached, uncached)


def test_wrong_cache_type_is_refused(perturbed):
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="ShadowCache"):
        perturbed(torch.tensor([[5]]), past_key_values=DynamicCache(), use_cache=True)


def test_unknown_mode_is_refused(perturbed):
    with pytest.raises(ValueError, match=r"mode='both'; allowed: attached, detached"):
        perturbed.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=2, mode="both")

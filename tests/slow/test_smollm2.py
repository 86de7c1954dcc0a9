"""The method on the real SmolLM2-135M-Instruct: identity, exact cached decode, the demo job."""

from __future__ import annotations

import pytest
import torch

from shadowpeft import ShadowConfig, count_parameters, expected_parameter_counts, get_shadow_model, greedy_decode
from tests.conftest import no_dropout_config, perturb
from tests.slow.conftest import requires_smollm2
from tests.tolerances import CACHED_VS_FULL_FP32, REAL_MODEL_CACHED_FACTOR

pytestmark = [pytest.mark.slow, requires_smollm2]


def _chat(tokenizer, texts):
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


@torch.inference_mode()
def test_identity_at_init_on_real_model(smollm2_fresh):
    base, tokenizer = smollm2_fresh
    enc = _chat(tokenizer, ["Name a color.", "What is two plus two? Answer briefly."])
    expected = base(**enc).logits
    model = get_shadow_model(base, no_dropout_config()).eval()
    assert torch.equal(model(enc.input_ids, attention_mask=enc.attention_mask).logits, expected)


def _cached_vs_full_gap(model, enc, *, mode=None):
    """Max |cached - full recompute| over 32 greedy tokens; ``mode=None`` runs the plain HF model."""
    if mode is None:
        g = model.generate(
            **enc,
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens, cached = g.sequences[:, enc.input_ids.shape[1] :], torch.stack(g.logits, dim=1)
    else:
        out = greedy_decode(model, enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=32, mode=mode)
        tokens, cached = out.tokens, out.logits
    seq = torch.cat([enc.input_ids, tokens], dim=1)
    mask = torch.cat([enc.attention_mask, torch.ones_like(tokens)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {} if mode is None else {"mode": mode}
    full = model(seq, attention_mask=mask, position_ids=positions, **kwargs).logits
    p = enc.input_ids.shape[1]
    return (full[:, p - 1 : p + 31] - cached).abs().max().item()


@torch.inference_mode()
@pytest.mark.parametrize("mode", ["attached", "detached"])
def test_cached_decode_equals_full_recompute_on_real_model(smollm2_fresh, mode):
    base, tokenizer = smollm2_fresh
    enc = _chat(tokenizer, ["Name a color.", "What is two plus two? Answer briefly."])
    base_gap = _cached_vs_full_gap(base, enc)  # the plain model's own fp32 noise floor
    model = perturb(get_shadow_model(base, no_dropout_config()), scale=0.02).eval()
    gap = _cached_vs_full_gap(model, enc, mode=mode)
    assert gap <= max(CACHED_VS_FULL_FP32, REAL_MODEL_CACHED_FACTOR * base_gap), (gap, base_gap)


def test_parameter_counts_on_real_model(smollm2_fresh):
    base, _ = smollm2_fresh
    config = ShadowConfig()
    model = get_shadow_model(base, config)
    assert count_parameters(model)[0] == expected_parameter_counts(base.config, config).total


def test_demo_job_runs_end_to_end(smollm2_fresh):
    from shadowpeft.demo.decode_demo import DEFAULT_PROMPT, build_chat_prompt, run_demo

    base, tokenizer = smollm2_fresh
    report = run_demo(base, tokenizer, max_new_tokens=6)
    assert [r.mode for r in report.runs] == ["attached", "detached"]
    assert report.trainable_params == expected_parameter_counts(base.config, ShadowConfig()).total
    attached = report.runs[0]
    assert attached.new_tokens >= 2 and attached.ms_per_token > 0 and attached.text
    # The untrained adapter is the identity: attached text is the base model's own greedy answer.
    # Wrapping does not modify the base's own modules, so base.generate is still the plain model.
    enc = tokenizer(build_chat_prompt(tokenizer, DEFAULT_PROMPT), return_tensors="pt")
    plain = base.generate(**enc, max_new_tokens=6, do_sample=False)
    assert tokenizer.decode(plain[0, enc.input_ids.shape[1] :], skip_special_tokens=False) == attached.text

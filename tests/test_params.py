"""Measured parameter counts equal the formulas of the method notes, section 5."""

from __future__ import annotations

import pytest

from shadowpeft import ShadowConfig, count_parameters, expected_parameter_counts, get_shadow_model
from shadowpeft.config import BackboneConfig, InjectionConfig, UpdateConfig
from tests.conftest import ARCHS, qwen3_0_6b_config, tiny_base

SHAPES = {
    "default": BackboneConfig(),
    "two-layers-narrow-mlp": BackboneConfig(num_layers=2, intermediate_size=32),
    "fewer-heads": BackboneConfig(num_attention_heads=2, num_key_value_heads=1, intermediate_size=48),
    "own-head-dim": BackboneConfig(num_attention_heads=2, num_key_value_heads=2, head_dim=8),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("arch_name", ARCHS)
def test_counts_match_formula(arch_name, shape):
    backbone = SHAPES[shape]
    if arch_name == "gpt2" and (backbone.num_key_value_heads or backbone.head_dim):
        pytest.skip("GPT-2 has no KV-head or head-dim setting")
    config = ShadowConfig(backbone=backbone, injection=InjectionConfig(rank=4), update=UpdateConfig(gate_width=3))
    base = tiny_base(arch_name)
    model = get_shadow_model(base, config)
    expected = expected_parameter_counts(base.config, config)
    assert sum(p.numel() for p in model.shadow_model.parameters()) == expected.backbone
    assert sum(p.numel() for p in model.shadow_injection_model.parameters()) == expected.injection
    assert sum(p.numel() for p in model.shadow_update_model.parameters()) == expected.update
    trainable, total = count_parameters(model)
    assert trainable == expected.total
    assert total == expected.total + count_parameters(base)[1]


def test_formula_by_hand_for_llama_default():
    # d=64, L=3, hs=4, kv=2, hd=16, m=128, n=1, r=16, g=10
    d, L, hs, kv, hd, m, r, g = 64, 3, 4, 2, 16, 128, 16, 10
    layer = d * hs * hd + 2 * d * kv * hd + hs * hd * d + 3 * d * m + 2 * d
    counts = expected_parameter_counts(tiny_base("llama").config, ShadowConfig())
    assert counts.backbone == layer + d
    assert counts.injection == (L - 1) * 2 * d * r
    assert counts.update == (L - 1) * 4 * d * g + 2 * d


def test_paper_budget_for_qwen3_0_6b():
    """The method notes: about 9.1M trainable parameters for Qwen3-0.6B with n=1, m=256, hs=16, r=16, g=10."""
    qwen3_06b = qwen3_0_6b_config()
    config = ShadowConfig(backbone=BackboneConfig(intermediate_size=256, num_attention_heads=16))
    total = expected_parameter_counts(qwen3_06b, config).total
    assert 8.9e6 < total < 9.3e6


def test_print_trainable_parameters(capsys):
    model = get_shadow_model(tiny_base("llama"), ShadowConfig())
    model.print_trainable_parameters()
    trainable, total = count_parameters(model)
    assert capsys.readouterr().out.startswith(f"trainable params: {trainable:,d} || all params: {total:,d}")

"""Every invalid ShadowConfig value raises ShadowConfigError naming the field, the value and what is allowed."""

from __future__ import annotations

import math

import pytest

from shadowpeft import ShadowConfig, ShadowConfigError, get_shadow_model
from shadowpeft.config import BackboneConfig, InjectionConfig, UpdateConfig
from shadowpeft.errors import UnsupportedArchitectureError
from tests.conftest import ARCH_CONFIGS, tiny_base

INVALID = [
    (dict(injection=InjectionConfig(rank=0)), "injection.rank=0", "integer >= 1"),
    (dict(injection=InjectionConfig(rank=-3)), "injection.rank=-3", "integer >= 1"),
    (dict(injection=InjectionConfig(rank=2.5)), "injection.rank=2.5", "integer >= 1"),
    (dict(update=UpdateConfig(gate_width=1)), "update.gate_width=1", "integer >= 2"),
    (dict(injection=InjectionConfig(dropout=1.0)), "injection.dropout=1.0", "[0, 1)"),
    (dict(injection=InjectionConfig(dropout=-0.1)), "injection.dropout=-0.1", "[0, 1)"),
    (dict(update=UpdateConfig(dropout=1.5)), "update.dropout=1.5", "[0, 1)"),
    (dict(injection=InjectionConfig(alpha=-0.1)), "injection.alpha=-0.1", "finite number >= 0"),
    (dict(injection=InjectionConfig(alpha=math.nan)), "injection.alpha=nan", "finite number >= 0"),
    (dict(injection=InjectionConfig(alpha=math.inf)), "injection.alpha=inf", "finite number >= 0"),
    (dict(backbone=BackboneConfig(num_layers=0)), "backbone.num_layers=0", "integer >= 1"),
    (dict(backbone=BackboneConfig(intermediate_size=0)), "backbone.intermediate_size=0", "integer >= 1"),
    (dict(aux_loss_weight=-1.0), "aux_loss_weight=-1.0", "finite number >= 0"),
    (dict(train_shadow_head="yes"), "train_shadow_head='yes'", "true or false"),
]


@pytest.mark.parametrize(("kwargs", "field", "allowed"), INVALID, ids=[c[1] for c in INVALID])
def test_invalid_value_names_field_value_and_allowed(kwargs, field, allowed):
    with pytest.raises(ShadowConfigError) as err:
        ShadowConfig(**kwargs)
    assert field in str(err.value)
    assert allowed in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ShadowConfigError) as err:
        ShadowConfig(injection=InjectionConfig(rank=0, alpha=-1.0), update=UpdateConfig(gate_width=1))
    message = str(err.value)
    assert "injection.rank=0" in message and "injection.alpha=-1.0" in message and "update.gate_width=1" in message


def test_defaults_follow_method():
    c = ShadowConfig()
    assert (c.injection.rank, c.update.gate_width, c.injection.alpha) == (16, 10, 0.1)
    assert (c.injection.dropout, c.update.dropout, c.aux_loss_weight, c.backbone.num_layers) == (0.2, 0.2, 0.05, 1)


def test_kv_heads_that_do_not_divide_heads_are_refused():
    config = ShadowConfig(backbone=BackboneConfig(num_attention_heads=4, num_key_value_heads=3))
    with pytest.raises(ShadowConfigError, match=r"num_key_value_heads=3 does not divide num_attention_heads=4"):
        get_shadow_model(tiny_base("llama"), config)


def test_heads_that_do_not_divide_hidden_without_head_dim_are_refused():
    # Qwen2 derives head_dim = hidden / heads; 64 / 3 is not an integer.
    config = ShadowConfig(backbone=BackboneConfig(num_attention_heads=3, num_key_value_heads=1))
    with pytest.raises(ShadowConfigError, match=r"num_attention_heads=3 does not divide hidden_size=64"):
        get_shadow_model(tiny_base("qwen2"), config)


def test_odd_head_dim_is_refused():
    with pytest.raises(ShadowConfigError, match=r"head_dim=15"):
        get_shadow_model(tiny_base("llama"), ShadowConfig(backbone=BackboneConfig(head_dim=15)))


def test_override_the_family_cannot_express_is_refused():
    with pytest.raises(ShadowConfigError, match=r"backbone.head_dim=8 cannot be applied to a 'gpt2' shadow"):
        get_shadow_model(tiny_base("gpt2"), ShadowConfig(backbone=BackboneConfig(head_dim=8)))


def test_base_with_one_layer_is_refused():
    from transformers import LlamaForCausalLM

    config = ARCH_CONFIGS["llama"]()
    config.num_hidden_layers = 1
    with pytest.raises(ShadowConfigError, match=r"at least 2 decoder layers"):
        get_shadow_model(LlamaForCausalLM(config), ShadowConfig())


def test_unsupported_architecture_names_supported_ones():
    from transformers import PhiConfig, PhiForCausalLM

    base = PhiForCausalLM(
        PhiConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )
    with pytest.raises(UnsupportedArchitectureError, match=r"Unsupported model_type 'phi'. Supported: .*llama"):
        get_shadow_model(base, ShadowConfig())


def test_round_trip_and_unknown_keys():
    config = ShadowConfig(backbone=BackboneConfig(num_layers=2, intermediate_size=32), aux_loss_weight=0.1)
    assert ShadowConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ShadowConfigError, match=r"unknown key\(s\) \['rnak'\]"):
        ShadowConfig.from_dict({"injection": {"rnak": 4}})


def test_published_flat_config_maps_onto_nested():
    flat = {
        "num_shadow_layers": 2,
        "injection_hidden_size": 8,
        "gate_hidden_size": 4,
        "alpha": 0.2,
        "dropout": 0.1,
        "shadow_intermediate_size": 64,
        "modules_to_save": [],
    }
    c = ShadowConfig.from_published(flat)
    assert (c.backbone.num_layers, c.injection.rank, c.update.gate_width) == (2, 8, 4)
    assert (c.injection.alpha, c.injection.dropout, c.update.dropout, c.backbone.intermediate_size) == (
        0.2,
        0.1,
        0.1,
        64,
    )

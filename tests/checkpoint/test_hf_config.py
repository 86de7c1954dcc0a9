"""portable_config: the legacy RoPE keys beside transformers 5's rope_parameters, read back unchanged by 5.x.

That transformers 4.57 reads the same RoPE base (and computes the same logits) is checked in its own
environment: tests/export/test_optimum_config.py::test_portable_config_reads_alike_in_transformers_4_57.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from shadowpeft.checkpoint.hf_config import portable_config, write_portable_config


@pytest.mark.parametrize(
    ("params", "scaling"),
    [
        ({"rope_type": "default", "rope_theta": 1e5}, None),
        (
            {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0},
            {"rope_type": "linear", "type": "linear", "factor": 2.0},
        ),
    ],
    ids=["default", "linear"],
)
def test_legacy_keys_are_added_beside_rope_parameters(params, scaling) -> None:
    data = {"model_type": "llama", "rope_parameters": params, "text_config": {"rope_parameters": params}}
    original = copy.deepcopy(data)
    out = portable_config(data)
    assert out["rope_theta"] == params["rope_theta"] and out["rope_scaling"] == scaling
    assert out["text_config"]["rope_theta"] == params["rope_theta"]
    assert out["rope_parameters"] == params and data == original  # the input is not modified
    assert portable_config({"model_type": "gpt2"}) == {"model_type": "gpt2"}
    assert portable_config({**data, "rope_theta": 7.0})["rope_theta"] == 7.0  # an existing key is kept


def test_transformers_5_reads_the_portable_config_as_before(tmp_path) -> None:
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5},
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    before = AutoConfig.from_pretrained(tmp_path).to_dict()
    write_portable_config(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == 1e5 and written["rope_scaling"] is None
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.rope_parameters == before["rope_parameters"]
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)

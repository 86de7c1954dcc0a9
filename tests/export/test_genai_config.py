"""onnxruntime-genai opens an export's device folder (export/genai_config.py): config, files, greedy parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shadowpeft.export.errors import ExportError
from shadowpeft.export.genai_config import GENAI_CONFIG_NAME, SpecialTokens, genai_config
from shadowpeft.runtime.contract import DEVICE_SHADOW, GraphSpec, detached_shadow_io
from shadowpeft.runtime.errors import ManifestError
from shadowpeft.runtime.manifest import Manifest
from shadowpeft.runtime.manifest_files import verify_files
from tests.export.genai_run import genai_greedy, runtime_greedy

PROMPTS = ([2, 10, 11, 12], [2, 20, 30, 40, 50, 60], [2, 7])
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The toy Llama base (word-level tokenizer, EOS 3) with a perturbed shadow, saved as a checkpoint."""
    from transformers import AutoModelForCausalLM

    from shadowpeft import get_shadow_model
    from shadowpeft.checkpoint.store import save_shadow
    from tests.conftest import perturb
    from tests.toy import save_toy_base

    root = tmp_path_factory.mktemp("genai")
    base = save_toy_base(root / "base")
    save_shadow(
        perturb(get_shadow_model(AutoModelForCausalLM.from_pretrained(base))), root / "ckpt", base_ref=str(base)
    )
    return root / "ckpt"


@pytest.fixture(scope="module")
def exports(checkpoint) -> dict[str, Path]:
    """Detached exports of the checkpoint, fp32 and int4, written by the export pipeline."""
    from shadowpeft.export.pipeline import ExportOptions, export_checkpoint

    out = {}
    for weights in ("fp32", "int4"):
        out[weights] = checkpoint.parent / f"export-{weights}"
        export_checkpoint(checkpoint, out[weights], ExportOptions(selections=("detached",), weights=weights))
    return out


def _spec(**sizes) -> GraphSpec:
    inputs, outputs = detached_shadow_io(**{"num_layers": 2, "kv_heads": 2, "head_dim": 16, "hidden": 64, **sizes})
    return GraphSpec("device/shadow.onnx", "detached-shadow", 18, inputs, outputs, "fp32", "a" * 64, {})


def _config(spec: GraphSpec) -> dict:
    tokens = SpecialTokens(eos=(1,), bos=2, pad=0)
    return genai_config(spec, attention_heads=4, hidden_size=64, context_length=256, vocab_size=128, tokens=tokens)


def test_config_is_read_from_the_graph_spec():
    config = _config(_spec(vocab=128))
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "decoder"
    assert (decoder["filename"], decoder["num_hidden_layers"], decoder["num_key_value_heads"]) == ("shadow.onnx", 2, 2)
    assert (decoder["head_size"], decoder["num_attention_heads"], decoder["hidden_size"]) == (16, 4, 64)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert config["search"]["past_present_share_buffer"] is False  # the graph concatenates its KV
    assert config["search"]["do_sample"] is False and config["search"]["max_length"] == 256


def test_a_graph_whose_kv_names_break_the_pattern_is_refused():
    spec = _spec(vocab=128)
    broken = GraphSpec(spec.file, spec.role, 18, spec.inputs, spec.outputs[:-1], "fp32", "a" * 64, {})
    with pytest.raises(ExportError, match=r"lacks the KV outputs present\.1\.value .* pattern 'present\.%d\.value'"):
        _config(broken)


def test_special_tokens_fall_back_like_the_runtime():
    class Tokenizer:
        eos_token_id, bos_token_id, pad_token_id = 7, None, None

    assert SpecialTokens.from_tokenizer(Tokenizer()) == SpecialTokens(eos=(7,), bos=7, pad=7)


def test_every_genai_file_is_sealed_in_the_manifest(exports, tmp_path):
    root = exports["fp32"]
    manifest = verify_files(root)
    files = {"device/genai_config.json", "device/tokenizer.json", "device/tokenizer_config.json"}
    assert set(manifest.interop_files) >= files  # beside Optimum's config.json and generation_config.json
    config = json.loads((root / "device" / GENAI_CONFIG_NAME).read_text())
    assert config["model"]["eos_token_id"] == 3 and config["model"]["context_length"] == 128
    assert config["model"]["decoder"]["num_hidden_layers"] == manifest.graph(DEVICE_SHADOW).input_names.count(
        "past_key_values.0.key"
    )  # one shadow layer in the toy
    copy = shutil.copytree(root, tmp_path / "copy")
    (copy / "device" / GENAI_CONFIG_NAME).write_text("{}")
    with pytest.raises(ManifestError, match=r"interop_files: file 'device/genai_config.json' has sha256"):
        verify_files(copy)


def test_context_length_is_the_base_limit_capped_by_the_profile():
    from types import SimpleNamespace

    from shadowpeft.export.genai_config import _context_length
    from shadowpeft.runtime.devices import load_device_profile

    model = SimpleNamespace(base_backbone=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192)))
    assert _context_length(model, None) == 8192
    assert _context_length(model, load_device_profile("arm64-phone")) == load_device_profile("arm64-phone").max_context


def test_coupled_only_export_writes_no_genai_config():
    from shadowpeft.export.genai_config import write_genai_folder

    assert write_genai_folder(Path("unused"), None, None, None) is None


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_genai_greedy_tokens_equal_shadow_run_detached(exports, weights):
    root = exports[weights]
    assert Manifest.from_file(root).graph(DEVICE_SHADOW).weights == weights
    for prompt in PROMPTS:  # one at a time, as onnxruntime-genai's generator runs them
        ours = runtime_greedy(root, list(prompt), NEW_TOKENS)
        theirs, _ = genai_greedy(root / "device", list(prompt), NEW_TOKENS)
        assert theirs == ours
        assert len(ours) == NEW_TOKENS  # no early EOS: every step is compared


def test_manifest_reads_back_interop_files(exports):
    manifest = Manifest.from_file(exports["int4"])
    assert Manifest.from_dict(manifest.to_dict()) == manifest and manifest.interop_files

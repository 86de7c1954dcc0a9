"""The tokenizer files beside the detached shadow graph (export/device_tokenizer.py), written once for both."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shadowpeft.export.device_tokenizer import TOKENIZER_CONFIG_NAME, copy_tokenizer_files, tokenizer_config
from shadowpeft.runtime.contract import GraphSpec, detached_shadow_io

TOKENIZER_FILES = ("tokenizer/chat_template.jinja", "tokenizer/tokenizer.json", f"tokenizer/{TOKENIZER_CONFIG_NAME}")


def _spec() -> GraphSpec:
    inputs, outputs = detached_shadow_io(num_layers=1, kv_heads=2, head_dim=16, hidden=64, vocab=128)
    return GraphSpec("device/shadow.onnx", "detached-shadow", 18, inputs, outputs, "fp32", "a" * 64, {})


def _export(root: Path) -> Path:
    (root / "tokenizer").mkdir(parents=True)
    (root / "device").mkdir()
    (root / "tokenizer" / "chat_template.jinja").write_text("{{ messages }}")
    (root / "tokenizer" / "tokenizer.json").write_text('{"model": {"type": "WordLevel"}}')
    config = {"tokenizer_class": "TokenizersBackend", "eos_token": "</s>", "model_input_names": ["input_ids"]}
    (root / "tokenizer" / TOKENIZER_CONFIG_NAME).write_text(json.dumps(config))
    return root


def test_tokenizer_config_is_the_form_transformers_4_57_reads() -> None:
    config = tokenizer_config({"tokenizer_class": "TokenizersBackend", "eos_token": "</s>"})
    assert config == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "</s>",
        "model_input_names": ["input_ids", "attention_mask"],
        "padding_side": "left",
    }


def test_copies_sit_beside_the_graph_with_their_sha256(tmp_path: Path) -> None:
    root = _export(tmp_path)
    written = copy_tokenizer_files(root, _spec(), TOKENIZER_FILES)
    names = ("chat_template.jinja", "tokenizer.json", TOKENIZER_CONFIG_NAME)
    assert list(written) == [f"device/{name}" for name in names]  # each once, sorted
    for relative, sha256 in written.items():
        assert hashlib.sha256((root / relative).read_bytes()).hexdigest() == sha256
    for name in names[:2]:  # byte copies
        assert (root / "device" / name).read_bytes() == (root / "tokenizer" / name).read_bytes()
    source = json.loads((root / "tokenizer" / TOKENIZER_CONFIG_NAME).read_text())
    text = (root / "device" / TOKENIZER_CONFIG_NAME).read_text()
    assert text == json.dumps(tokenizer_config(source), indent=2, sort_keys=True) + "\n"
    assert json.loads((root / "tokenizer" / TOKENIZER_CONFIG_NAME).read_text()) == source  # the runtime's copy kept

"""``shadow-export`` end to end on the toy checkpoint: outputs, manifest, determinism and every refusal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from shadowpeft import get_shadow_model
from shadowpeft.checkpoint.store import save_shadow
from shadowpeft.export import pipeline
from shadowpeft.export.cli import main
from shadowpeft.runtime.export_dir import open_export
from shadowpeft.runtime.manifest import MANIFEST_NAME, Escalation, Manifest
from shadowpeft.runtime.manifest_files import verify_files
from shadowpeft.train.selective import ESCALATION_NAME, EscalationRecord
from tests.conftest import perturb
from tests.modes import set_umask, wrong_modes
from tests.tolerances import BROKEN_PASS_KL, BROKEN_PASS_TOP1
from tests.toy import save_toy_base


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    """A toy base (3-layer Llama, word-level tokenizer) and a trained-looking checkpoint on it."""
    root = tmp_path_factory.mktemp("toy")
    base_dir = save_toy_base(root / "base")
    model = perturb(get_shadow_model(AutoModelForCausalLM.from_pretrained(base_dir)))
    save_shadow(model, root / "ckpt", base_ref=str(base_dir))
    other = save_toy_base(root / "other-base", seed=1)
    return {"root": root, "base": base_dir, "ckpt": root / "ckpt", "other": other}


def run(*args: str | Path) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


ESCALATION = EscalationRecord(
    confidence="token-probability",
    threshold=0.4375,
    tolerance=0.01,
    local_fraction=0.625,
    combined_accuracy=0.5,
    attached_accuracy=0.505,
    detached_accuracy=0.375,
    detached_ece=0.08,
    examples=96,
    split="test",
)


def test_split_coupled_int8_for_a_laptop_profile(toy, tmp_path):
    out = tmp_path / "export"
    result = run(toy["ckpt"], "-o", out, "--split", "--coupled", "--device", "x86-64-laptop")
    assert result.exit_code == 0, result.output
    manifest = verify_files(out)  # every file present with its recorded sha256
    assert set(manifest.graphs) == {"device/shadow", "device/head", "cloud/backbone", "coupled"}
    assert {key: g.weights for key, g in manifest.graphs.items()} == {
        "device/shadow": "int8",
        "device/head": "int8",
        "cloud/backbone": "fp32",
        "coupled": "int8",
    }
    assert manifest.quantization == "int8-block64-acc4" and manifest.device_profile == "x86-64-laptop"
    assert manifest.base_model == str(toy["base"])
    figures = manifest.validation
    for chain in ("detached", "split", "coupled"):
        assert figures[f"{chain}.logits_max_abs_diff"] <= 1e-4
        assert figures[f"{chain}.greedy_agreement"] == 1.0
        # Flat random-toy logits allow no tight bound (tests/tolerances.py); a broken pass agrees on ~1%
        # of positions with a mean KL of ~10, so these bounds still catch one.
        assert figures[f"int8.{chain}.top1_agreement"] >= BROKEN_PASS_TOP1
        assert 0.0 <= figures[f"int8.{chain}.mean_kl"] <= BROKEN_PASS_KL
    assert figures["device/shadow.bytes"] < figures["device/shadow.fp32_bytes"]
    assert figures["memory.estimate_mb"] <= figures["memory.budget_mb"]
    assert "fits" in result.output and "top-1 agreement" in result.output
    # --ops auto (the default) fuses both Llama stacks, and the manifest and summary say so per graph.
    assert {key: g.fused for key, g in manifest.graphs.items()} == {
        "device/shadow": ("shadow",),
        "device/head": (),
        "cloud/backbone": ("base",),
        "coupled": ("shadow", "base"),
    }
    assert "shadow stack fused; base stack fused" in result.output and "fused: shadow, base" in result.output
    for stage in ("load", "trace", "export", "validate", "quantize", "write"):
        assert f" {stage}" in result.output
    # Tokenizer and chat template travel with the graphs, and every graph opens in onnxruntime.
    assert "tokenizer/tokenizer.json" in manifest.tokenizer_files
    for graph in manifest.graphs.values():
        ort.InferenceSession(str(out / graph.file))
    assert not list(tmp_path.glob(".export.*")), "staging directories left behind"


def test_detached_reexport_is_byte_identical_and_int4_applies(toy, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        result = run(toy["ckpt"], "-o", out, "--detached", "--quantize", "int4")
        assert result.exit_code == 0, result.output
    manifest = Manifest.from_file(first)
    assert set(manifest.graphs) == {"device/shadow"} and manifest.quantization == "int4-block32-acc4"
    # No escalation.json in the checkpoint: no escalation in the manifest, not even a null.
    assert manifest.escalation is None and "escalation" not in json.loads((first / MANIFEST_NAME).read_text())
    names = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_quantize_cloud_quantizes_the_backbone_to_the_device_format(toy, tmp_path):
    out = tmp_path / "export"
    result = run(toy["ckpt"], "-o", out, "--split", "--quantize", "int8", "--quantize-cloud")
    assert result.exit_code == 0, result.output
    manifest = verify_files(out)
    assert {key: g.weights for key, g in manifest.graphs.items()} == {
        "device/shadow": "int8",
        "device/head": "int8",
        "cloud/backbone": "int8",
    }
    figures = manifest.validation
    # The backbone went through the quantizer (the toy's 32-wide matrices are below its block size, so
    # nothing in it is narrow enough to change: the count says how many MatMuls it quantized) ...
    assert "cloud/backbone.onnx -> int8" in result.output
    assert figures["cloud/backbone.quantized_matmuls"] >= 0 and "cloud/backbone.fp32_bytes" in figures
    # ... and the split chain's agreement is measured with it in the chain.
    assert figures["int8.split.top1_agreement"] >= BROKEN_PASS_TOP1


def test_ops_standard_writes_plain_onnx_operators(toy, tmp_path):
    out = tmp_path / "export"
    result = run(toy["ckpt"], "-o", out, "--detached", "--ops", "standard")
    assert result.exit_code == 0, result.output
    graph = Manifest.from_file(out).graphs["device/shadow"]
    assert graph.fused == () and "shadow stack standard (--ops standard)" in result.output
    domains = {node.domain for node in onnx.load(str(out / graph.file)).graph.node}
    assert domains <= {"", "ai.onnx"}  # no com.microsoft operator


def test_export_gets_the_umask_modes(toy, tmp_path):
    """The staging folder (mkdtemp, 0700) does not leak its mode into the export.

    One export, under umask 027 (under 022 the old fixed 0755/0644 happened to be right; the atomic tests
    cover both masks on the same code).
    """
    out = tmp_path / "export"
    previous = set_umask(0o027)
    try:
        result = run(toy["ckpt"], "-o", out, "--detached")
    finally:
        set_umask(previous)
    assert result.exit_code == 0, result.output
    assert wrong_modes(out, 0o027) == []


def test_existing_output_is_refused_then_replaced_with_overwrite(toy, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run(toy["ckpt"], "-o", out, "--detached")
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = run(toy["ckpt"], "-o", out, "--detached", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).is_file()


def test_failure_mid_export_leaves_nothing_that_looks_complete(toy, tmp_path, monkeypatch):
    out = tmp_path / "export"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "check_parity", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.export_checkpoint(toy["ckpt"], out, pipeline.ExportOptions(selections=("detached",)))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "staging directory left behind"


def test_leftovers_of_a_killed_export_are_removed_by_the_next_one(toy, tmp_path, monkeypatch):
    out = tmp_path / "export"
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = tmp_path / f".export.{dead.pid}-k1ll.partial"  # kill -9 leaves the staging dir, scratch inside
    (killed / ".scratch-x" / "device").mkdir(parents=True)
    running = tmp_path / f".export.{os.getpid()}-l1ve.partial"  # another export still writing: left alone
    running.mkdir()
    seen = {}

    def interrupted(model, jobs, root, fp32_root, options):
        seen["root"], seen["fp32_root"] = root, fp32_root
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.export_checkpoint(toy["ckpt"], out, pipeline.ExportOptions(selections=("detached",), weights="int8"))
    assert not killed.exists() and running.is_dir()
    assert seen["fp32_root"].parent == seen["root"], "the fp32 scratch folder lives inside the staging directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name], "the interrupted run left nothing"


@pytest.mark.parametrize(
    ("setup", "args", "expected"),
    [
        ("missing", [], "does not exist"),
        ("no-config", [], "not a ShadowPEFT checkpoint"),
        ("corrupt-weights", [], "shadow_model.safetensors"),
        ("ok", ["--base", "OTHER"], "differs in"),
        ("ok", ["--device", "no-such-phone"], "Unknown device profile 'no-such-phone'"),
        ("published", [], "--base"),
        ("ok", ["--quantize", "int3"], "Invalid value for '--quantize'"),
        ("ok", ["--quantize-cloud"], "--quantize-cloud quantizes cloud/backbone to the device graphs' weight format"),
        ("ok", ["--detached", "--quantize", "int8", "--quantize-cloud"], "writes no cloud graph; add --split"),
        ("escalation-not-json", [], "escalation.json is not valid JSON"),
        ("escalation-bad-threshold", [], "threshold=2.5 is not a number in [0, 1]"),
        ("header-base-not-object", [], "not a valid checkpoint header (base must be an object, got 'x')"),
        ("header-too-deep", [], "shadow_config.json nests its JSON too deeply to read"),
        ("header-explicit-malformed", [], "explicit_shadow must be null or an object whose 'config'"),
        ("explicit-unknown-type", [], "explicit_shadow config (model_type 'no-such-model') does not build"),
        ("base-config-wrong-type", ["--base", "BAD"], "Field 'hidden_size' expected int"),
        ("base-weights-corrupt", ["--base", "BAD"], "Error while deserializing header"),
        ("base-shapes-mismatch", ["--base", "BAD"], "Could not load base model"),
    ],
)
def test_bad_input_gets_one_clear_error_and_no_output(toy, tmp_path, setup, args, expected):
    ckpt = tmp_path / "ckpt"
    if setup != "missing":
        shutil.copytree(toy["ckpt"], ckpt)
    if setup == "no-config":
        (ckpt / "shadow_config.json").unlink()
    if setup == "corrupt-weights":
        (ckpt / "shadow_model.safetensors").write_bytes(b"not safetensors")
    if setup == "published":
        (ckpt / "shadow_config.json").write_text(json.dumps({"num_shadow_layers": 1}))
    if setup == "escalation-not-json":
        (ckpt / ESCALATION_NAME).write_text("{")
    if setup == "escalation-bad-threshold":
        (ckpt / ESCALATION_NAME).write_text(json.dumps({**ESCALATION.to_dict(), "threshold": 2.5}))
    _break(setup, ckpt, toy["base"], tmp_path / "bad-base")
    args = [str(toy["other"]) if a == "OTHER" else str(tmp_path / "bad-base") if a == "BAD" else a for a in args]
    result = run(ckpt, "-o", tmp_path / "out", "--detached", *args)
    assert result.exit_code in (1, 2), result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    if setup.startswith("escalation"):  # names the file and the command that rewrites it
        assert f"{ckpt / ESCALATION_NAME}" in result.output and "--selective" in result.output


def _break(setup: str, ckpt: Path, base: Path, bad_base: Path) -> None:
    """Damages the checkpoint header, or writes a damaged copy of the base to ``bad_base``."""
    header_path = ckpt / "shadow_config.json"
    header = json.loads(header_path.read_text()) if header_path.is_file() else {}
    if setup == "header-base-not-object":
        header_path.write_text(json.dumps({**header, "base": "x"}))
    if setup == "header-too-deep":
        header_path.write_text("[" * 100_000 + "]" * 100_000)
    if setup == "header-explicit-malformed":
        header_path.write_text(json.dumps({**header, "explicit_shadow": {"config": 3}}))
    if setup == "explicit-unknown-type":
        header_path.write_text(json.dumps({**header, "explicit_shadow": {"config": {"model_type": "no-such-model"}}}))
    if setup.startswith("base-"):
        shutil.copytree(base, bad_base)
        config = json.loads((bad_base / "config.json").read_text())
    if setup == "base-config-wrong-type":
        (bad_base / "config.json").write_text(json.dumps({**config, "hidden_size": "x"}))
    if setup == "base-weights-corrupt":
        (bad_base / "model.safetensors").write_bytes(b"garbage")
    if setup == "base-shapes-mismatch":
        (bad_base / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))


def test_unsupported_architecture_is_named(toy, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    base = tmp_path / "neox"
    config = GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    GPTNeoXForCausalLM(config).save_pretrained(base)
    shutil.copy(toy["base"] / "tokenizer.json", base)
    shutil.copy(toy["base"] / "tokenizer_config.json", base)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "shadow_config.json").write_text(json.dumps({"num_shadow_layers": 1}))
    save_file({"shadow_injection_model.injection_downs": torch.zeros(1, 32, 16)}, ckpt / "shadow_adapter.safetensors")
    result = run(ckpt, "-o", tmp_path / "out", "--detached", "--base", base)
    assert result.exit_code == 1, result.output
    assert "gpt_neox" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_published_shadow_peft_checkpoint_exports_with_base(toy, tmp_path):
    from shadow_peft import ShadowConfig as PubConfig
    from shadow_peft import ShadowForCausalLM as PubLM
    from shadow_peft import get_shadow_model as pub_get

    published = PubLM(pub_get(AutoModelForCausalLM.from_pretrained(toy["base"]), PubConfig(dropout=0.0)))
    perturb(published.peft_model)
    published.save_pretrained(tmp_path / "pub")
    out = tmp_path / "export"
    result = run(tmp_path / "pub", "-o", out, "--detached", "--base", toy["base"])
    assert result.exit_code == 0, result.output
    manifest = verify_files(out)
    assert manifest.base_model == str(toy["base"])
    assert manifest.validation["detached.logits_max_abs_diff"] <= 1e-4


def test_a_multi_layer_shadow_copied_from_base_layers_exports_with_parity(toy, tmp_path):
    """The edge recipe's shadow (several layers, initialised from base layers) goes through every graph."""
    from shadowpeft.config import BackboneConfig, ShadowConfig

    config = ShadowConfig(backbone=BackboneConfig(num_layers=2, base_layers=(0, 1)), aux_loss_weight=1.0)
    model = perturb(get_shadow_model(AutoModelForCausalLM.from_pretrained(toy["base"]), config))
    save_shadow(model, tmp_path / "ckpt", base_ref=str(toy["base"]))
    out = tmp_path / "export"
    result = run(tmp_path / "ckpt", "-o", out, "--split", "--coupled")
    assert result.exit_code == 0, result.output
    manifest = verify_files(out)
    shadow_inputs = [t.name for t in manifest.graphs["device/shadow"].inputs if t.name.startswith("past_key_values")]
    assert len(shadow_inputs) == 4  # key and value of each of the 2 shadow layers
    for chain in ("detached", "split", "coupled"):
        assert manifest.validation[f"{chain}.logits_max_abs_diff"] <= 1e-4
        assert manifest.validation[f"{chain}.greedy_agreement"] == 1.0


def test_the_checkpoints_escalation_threshold_travels_into_the_manifest(toy, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy["ckpt"], ckpt)
    ESCALATION.save(ckpt)
    out = tmp_path / "export"
    result = run(ckpt, "-o", out, "--detached")
    assert result.exit_code == 0, result.output
    assert json.loads((out / MANIFEST_NAME).read_text())["escalation"] == ESCALATION.to_dict()
    escalation = open_export(out).manifest.escalation  # verified, as the runtime opens it
    assert escalation == Escalation(**ESCALATION.to_dict())
    assert (escalation.confidence, escalation.threshold) == ("token-probability", 0.4375)
    assert "Escalation: threshold 0.4375, answer on the device when token-probability >= it" in result.output
    assert "62.5% local" in result.output and "on 96 predicted tokens of the test split" in result.output

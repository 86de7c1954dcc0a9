"""The arch registry holds every family fact: one module per family, and no model_type branch elsewhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from shadowpeft.arch import REGISTRY, spec_for
from shadowpeft.checkpoint.fingerprint import ARCHITECTURE_KEYS, architecture_config, describe
from tests.conftest import ARCH_CONFIGS, ARCHS, tiny_base

ROOT = Path(__file__).resolve().parents[1]
# Our source outside shadowpeft/arch/: the core's other rooms, export and runtime.
SCANNED = [
    path
    for folder in ("shadowpeft", "export", "runtime")
    for path in sorted((ROOT / folder).rglob("*.py"))
    if (ROOT / "shadowpeft" / "arch") not in path.parents
]


def _mentions_model_type(node: ast.AST) -> bool:
    """``x.model_type``, ``model_type``, ``d["model_type"]`` or ``getattr(x, "model_type")`` anywhere in ``node``."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr == "model_type":
            return True
        if isinstance(sub, ast.Name) and sub.id == "model_type":
            return True
        if isinstance(sub, ast.Constant) and sub.value == "model_type":
            return True
    return False


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _family_branches(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = _docstrings(tree)
    where = path.relative_to(root)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and _mentions_model_type(node):
            found.append(f"{where}:{node.lineno}: compares model_type")
        elif isinstance(node, ast.Match) and _mentions_model_type(node.subject):
            found.append(f"{where}:{node.lineno}: matches on model_type")
        elif isinstance(node, ast.Constant) and node.value in REGISTRY and id(node) not in docstrings:
            found.append(f"{where}:{node.lineno}: names the family {node.value!r}")
    return found


def test_scan_covers_the_packages():
    names = {path.relative_to(ROOT).as_posix() for path in SCANNED}
    assert {"shadowpeft/params.py", "shadowpeft/train/baselines.py", "export/graphs.py"} <= names
    assert "shadowpeft/checkpoint/fingerprint.py" in names
    assert not any(name.startswith("shadowpeft/arch/") for name in names)


def test_only_the_arch_registry_branches_on_model_type():
    found = [line for path in SCANNED for line in _family_branches(path)]
    assert found == [], "family facts belong in an ArchSpec under shadowpeft/arch/:\n" + "\n".join(found)


def test_the_scan_catches_a_branch(tmp_path):
    """The scan is not vacuous: each kind of family branch it looks for is found."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        '"""llama docstrings are fine."""\n'
        'if config.model_type == "x":\n    pass\n'
        'TABLE = {"gpt2": 1}\n'
        'ok = getattr(config, "model_type", None) in ("a", "b")\n'
    )
    found = _family_branches(probe, tmp_path)
    assert sorted(found) == [
        "probe.py:2: compares model_type",
        "probe.py:4: names the family 'gpt2'",
        "probe.py:5: compares model_type",
    ]


def test_every_registered_family_has_a_tiny_config():
    assert sorted(REGISTRY) == ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_layout_is_the_cache_the_model_writes(arch):
    base = tiny_base(arch)
    spec = spec_for(base.config)
    with torch.no_grad():
        cache = base(torch.tensor([[3, 4, 5, 6]]), use_cache=True).past_key_values
    layers, kv_heads, head_dim = spec.kv_layout(base.config)
    assert len(cache.layers) == layers
    assert all(tuple(layer.keys.shape) == (1, kv_heads, 4, head_dim) for layer in cache.layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_and_parameter_terms_read_the_model(arch):
    base = tiny_base(arch)
    spec = spec_for(base.config)
    assert spec.output_head(base) is base.get_output_embeddings()
    backbone = spec.backbone(base)
    dims = spec.attention_dims(base.config)
    layer = spec.layer_parameter_count(base.config, dims, mlp_width=spec.mlp_width(base.config))
    assert sum(p.numel() for p in spec.layers(backbone)[0].parameters()) == layer
    embedding = spec.embedding(backbone).weight.numel()
    rest = sum(p.numel() for p in backbone.parameters()) - embedding - len(spec.layers(backbone)) * layer
    assert rest == spec.stack_parameter_count(base.config)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_names_and_fingerprint_keys(arch):
    config = ARCH_CONFIGS[arch]()
    spec = spec_for(config)
    stored = config.to_dict()
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        assert stored[spec.config_name(field)] == getattr(config, field)
    assert set(spec.architecture_keys) <= set(ARCHITECTURE_KEYS)
    summary = describe(architecture_config(config))
    assert summary == f"{arch}, hidden 64, 3 layers, vocab 128"

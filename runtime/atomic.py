"""Atomic publish of files and directories: write beside the target, then rename into place.

A reader (or an interrupted writer) never sees a half-written file or directory: it sees the old
one, the new one, or none. Standard library only, so every room uses this one copy: the runtime,
``shadowpeft.export``, the main job, the benchmarks, and the method core's checkpoints and data
caches (the one runtime module the core may import; ``tests/test_layering.py`` keeps it stdlib-only).

::

    target.parent/
      .target.XXXX.tmp           a file being written (write_atomic), renamed over target when complete
      .target.PID-XXXX.partial/  a directory being filled by process PID (staging_directory), renamed to
                                 target when complete
      .target.old-XXXX/          the replaced directory, deleted after the swap (restored if the swap fails)

A process killed outright (``kill -9``, power loss) cannot delete its staging directory; the next
:func:`staging_directory` for the same target removes those whose process is gone
(:func:`remove_stale_staging`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["publish_directory", "remove_stale_staging", "staging_directory", "write_atomic"]

logger = logging.getLogger(__name__)

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
    checks); if the block raises or is interrupted, nothing appears at ``target``. The directory's
    name carries this process's id, and staging directories for ``target`` left by processes that no
    longer run are removed first (:func:`remove_stale_staging`).

    Args:
        target: Where the directory will be published; its parent is created if missing.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    prefix = f".{target.name}.{os.getpid()}-"
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=target.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(target: str | os.PathLike[str]) -> list[Path]:
    """Deletes the staging directories for ``target`` whose writing process no longer runs.

    Only directories named as :func:`staging_directory` names them (``.NAME.PID-XXXX.partial``) are
    considered, and only when no process ``PID`` exists on this machine: a live writer's directory,
    another user's (whose process this one may not signal) and anything else are left alone. A reused
    PID errs on the safe side (the directory stays until that process ends too).

    Args:
        target: The path the staging directories were for.

    Returns:
        The directories removed.
    """
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)-[^/]*\.partial")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in target.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir() and not entry.is_symlink() and not _process_exists(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                logger.info("removed %s, left by process %s, which no longer runs", entry, match.group(1))
                removed.append(entry)
    return removed


def _process_exists(pid: int) -> bool:
    """Whether ``pid`` may be running; True whenever that cannot be ruled out."""
    if pid == os.getpid() or os.name == "nt":  # on Windows, os.kill(pid, 0) would send CTRL_C_EVENT
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process, or no pid we wrote
        return True
    return True

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

What is published gets the permissions a plain ``mkdir``/``open`` would give it under the process's
umask (directories ``0o777 & ~umask``, files ``0o666 & ~umask``: 0755/0644 under the usual 022,
0700/0600 under 077), not the private modes of ``mkstemp``/``mkdtemp`` or of libraries that write
through their own temporary files (safetensors writes 0600): see :func:`default_modes`.
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

__all__ = [
    "apply_default_modes",
    "current_umask",
    "default_modes",
    "publish_directory",
    "remove_stale_staging",
    "staging_directory",
    "write_atomic",
]

logger = logging.getLogger(__name__)

_PROC_STATUS = Path("/proc/self/status")


def current_umask() -> int:
    """The process's file mode creation mask.

    Read from ``/proc/self/status`` where the kernel reports it (Linux 4.7+), which changes nothing;
    elsewhere set and restored at once with ``os.umask`` (the only portable way to read it).
    """
    with contextlib.suppress(OSError, ValueError):
        for line in _PROC_STATUS.read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_modes() -> tuple[int, int]:
    """``(directory mode, file mode)`` that ``mkdir`` and ``open`` give under the current umask."""
    mask = current_umask()
    return 0o777 & ~mask, 0o666 & ~mask


def apply_default_modes(root: str | os.PathLike[str]) -> None:
    """Gives ``root`` and everything under it the modes of :func:`default_modes` before it is published.

    Files that the owner may execute keep their execute bits (``0o777 & ~umask``); symbolic links are
    left alone (``chmod`` would follow them).

    Args:
        root: A directory about to be published, or a single file.
    """
    dir_mode, file_mode = default_modes()
    root = Path(root)
    if not root.is_dir():
        _chmod_file(root, file_mode, dir_mode)
        return
    os.chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), dir_mode)
        for name in files:
            _chmod_file(Path(folder, name), file_mode, dir_mode)


def _chmod_file(path: Path, file_mode: int, exec_mode: int) -> None:
    if path.is_symlink():
        return
    os.chmod(path, exec_mode if path.stat().st_mode & 0o100 else file_mode)


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
        os.chmod(temp, default_modes()[1])  # mkstemp created it 0600
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return target


def publish_directory(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Renames the complete directory ``staging`` to ``target``, replacing an existing ``target``.

    rename(2) cannot replace a non-empty directory, so an existing ``target`` is first moved aside
    (and moved back if the swap fails), then deleted once ``staging`` is in place. Everything in
    ``staging`` first gets the umask's ordinary modes (:func:`apply_default_modes`).

    Args:
        staging: A directory on the same file system as ``target`` (e.g. from :func:`staging_directory`).
        target: Where the directory appears.
    """
    staging, target = Path(staging), Path(target)
    apply_default_modes(staging)
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

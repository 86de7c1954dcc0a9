"""Permission checks for what the project publishes: directories ``0o777 & ~umask``, files ``0o666 & ~umask``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: The umasks the permission tests run under: the usual one (0755/0644) and a private one (0700/0600).
UMASKS = (0o022, 0o077)


def wrong_modes(root: Path, mask: int) -> list[str]:
    """Every path under ``root`` (``root`` included) whose mode is not what ``mkdir``/``open`` give under ``mask``."""
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    wrong = []
    for path in [root, *sorted(root.rglob("*"))]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = dir_mode if path.is_dir() else file_mode
        if mode != expected:
            wrong.append(f"{path.relative_to(root.parent)}: {oct(mode)} (expected {oct(expected)})")
    return wrong


def set_umask(mask: int) -> int:
    """Sets the process umask; returns the previous one."""
    return os.umask(mask)

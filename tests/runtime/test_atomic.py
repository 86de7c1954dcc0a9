"""Atomic publish: a reader sees the old file or directory, the new one, or none; nothing is left behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shadowpeft.runtime import atomic
from tests.modes import wrong_modes


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_write_atomic_replaces_a_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("old")
    atomic.write_atomic(path, '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n'
    atomic.write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert path.stat().st_mode & 0o777 == 0o644
    assert _hidden(tmp_path) == []


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "results.json"
    path.write_text("old")

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        atomic.write_atomic(path, "new")
    assert path.read_text() == "old"
    assert _hidden(tmp_path) == []


def test_staging_directory_is_published_once_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic.staging_directory(out) as staging:
        (staging / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()
        atomic.publish_directory(staging, out)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert out.stat().st_mode & 0o777 == 0o755
    assert _hidden(tmp_path) == []


def test_a_failed_block_publishes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out"
    with pytest.raises(KeyboardInterrupt), atomic.staging_directory(out) as staging:
        (staging / "half.txt").write_text("half")
        raise KeyboardInterrupt
    assert list(out.parent.iterdir()) == []


def test_a_failed_swap_restores_the_old_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace, calls = os.replace, []

    def flaky(src: Path, dst: Path) -> None:
        calls.append(dst)
        if len(calls) == 2:  # old -> backup worked; staging -> out fails
            raise OSError(5, "I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError, match="I/O error"), atomic.staging_directory(out) as staging:
        atomic.publish_directory(staging, out)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert _hidden(tmp_path) == []


def _dead_pid() -> int:
    """The id of a process that has exited (reaped, so the id is free)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_staging_names_carry_the_pid_and_stale_ones_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = tmp_path / f".out.{_dead_pid()}-k1ll.partial"  # what kill -9 mid-export leaves
    (killed / ".scratch-x" / "device").mkdir(parents=True)
    (killed / ".scratch-x" / "device" / "shadow.onnx").write_bytes(b"half")
    live = tmp_path / f".out.{os.getpid()}-l1ve.partial"  # a writer still running (this process)
    live.mkdir()
    other = [tmp_path / ".out.k1ll.partial", tmp_path / f".other.{_dead_pid()}-x.partial", tmp_path / ".out.old-1"]
    for path in other:  # an older naming, another target, a swap backup: not provably stale, kept
        path.mkdir()
    with atomic.staging_directory(out) as staging:
        assert staging.name.startswith(f".out.{os.getpid()}-") and staging.name.endswith(".partial")
        assert not killed.exists()
        atomic.publish_directory(staging, out)
    assert live.is_dir() and all(path.is_dir() for path in other)
    assert atomic.remove_stale_staging(out) == []


def test_published_files_and_directories_get_the_umask_modes(tmp_path: Path, umask: int) -> None:
    """Not mkstemp's 0600 or mkdtemp's 0700, nor the 0600 that libraries writing through temp files leave."""
    written = atomic.write_atomic(tmp_path / "results.json", "{}\n")
    assert wrong_modes(written, umask) == []
    out = tmp_path / "out"
    with atomic.staging_directory(out) as staging:
        (staging / "nested").mkdir(mode=0o700)
        private = os.open(staging / "nested" / "weights.bin", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(private)
        (staging / "run.sh").write_text("#!/bin/sh\n")
        (staging / "run.sh").chmod(0o700)
        atomic.publish_directory(staging, out)
    assert wrong_modes(out / "nested", umask) == []
    # an owner-executable file stays executable, as far as the umask allows
    assert (out / "run.sh").stat().st_mode & 0o777 == 0o777 & ~umask
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_current_umask_reads_the_mask_without_changing_it(umask: int) -> None:
    assert atomic.current_umask() == umask
    assert atomic.current_umask() == umask
    assert atomic.default_modes() == (0o777 & ~umask, 0o666 & ~umask)

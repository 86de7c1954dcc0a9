"""The files a manifest lists, on disk: where each one is, its sha256, and the check of all of them.

:func:`export_file` gives the path of one of the export's files and refuses any that is a symbolic link
or lies outside the export directory; :func:`file_sha256` is the digest the exporter records and the
runtime checks; :func:`verify_files` checks every file that
:class:`~shadowpeft.runtime.manifest.Manifest` lists (graphs and their external data, tokenizer files,
``interop_files``) against its recorded sha256 and raises one
:class:`~shadowpeft.runtime.errors.ManifestError` that lists every problem.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Collection
from pathlib import Path, PurePosixPath

from shadowpeft.runtime.contract.fields import count
from shadowpeft.runtime.errors import ManifestError, format_problems
from shadowpeft.runtime.manifest import MANIFEST_NAME, Manifest

__all__ = ["export_file", "file_sha256", "verify_files"]

logger = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


def export_file(root: str | Path, relative: str) -> Path:
    """The path of the export's file ``relative``, refused unless it is the export's own regular file.

    The runtime reads only files inside the export directory: ``relative`` must be a relative path without
    ``..``, no part of it below ``root`` may be a symbolic link (a link could swap in any file of the machine,
    e.g. a chat template rendered into the prompt coupled mode sends to a server), and the resolved path must
    stay under the resolved ``root``. ``root`` itself may be a link (e.g. ``current -> v3``).

    Args:
        root: The export directory.
        relative: A path as the manifest lists it (``/`` separators).

    Returns:
        ``root / relative`` (which may not exist: callers check, and report a missing file their way).

    Raises:
        ManifestError: ``relative`` is absolute, has ``..``, passes through a symbolic link, or leaves ``root``.
    """
    base = Path(root).resolve()
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or "\\" in relative or not pure.parts:
        raise ManifestError(
            f"file {relative!r} is not a relative path inside the export directory {str(root)!r}; "
            "the runtime reads only the export's own files. Re-export."
        )
    path = base
    for part in pure.parts:
        path = path / part
        if path.is_symlink():
            raise ManifestError(
                f"file {relative!r} is a symbolic link ({path} -> {os.readlink(path)}); the runtime reads only "
                "the export's own files, never links. Replace it with the file itself (cp -L), or re-export."
            )
    if not path.resolve().is_relative_to(base):  # defence in depth: no link was followed above
        raise ManifestError(f"file {relative!r} resolves outside the export directory {str(root)!r}. Re-export.")
    return Path(root) / relative


def file_sha256(path: str | Path) -> str:
    """Lower-case hex sha256 of a file, read in chunks (graphs can be gigabytes).

    The exporter records it with this function and :func:`verify_files` checks it with the same one.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(
    export_dir: str | Path, manifest: Manifest | None = None, *, unread: Collection[str] = ()
) -> Manifest:
    """Checks that every file the manifest lists exists and has its recorded sha256.

    Args:
        export_dir: The export directory.
        manifest: Its manifest if already loaded; read from ``export_dir`` otherwise.
        unread: Listed files the caller will not read, which may therefore be absent (the ``.onnx``
            graphs of a run that loads their ``.ort`` copies); if present they are checked like the rest.

    Returns:
        The manifest that was checked.

    Raises:
        ManifestError: Listing every missing file, every sha256 mismatch, and every file that is a
            symbolic link or lies outside ``export_dir``.
    """
    root = Path(export_dir)
    if manifest is None:
        manifest = Manifest.from_file(root)
    problems: list[str] = []
    for key, graph in manifest.graphs.items():
        expected = {graph.file: graph.sha256, **graph.external_data}
        for relative, sha256 in expected.items():
            if relative in unread and not os.path.lexists(root / relative):
                continue
            problem = _digest_problem(root, relative, sha256)
            if problem:
                problems.append(f"graphs[{key!r}]: {problem}")
    for relative, sha256 in (manifest.interop_files or {}).items():
        problem = _digest_problem(root, relative, sha256)
        if problem:
            problems.append(f"interop_files: {problem}")
    digests = manifest.tokenizer_sha256
    for relative in manifest.tokenizer_files:
        problem = _digest_problem(root, relative, None if digests is None else digests[relative], noun="")
        if problem:
            problems.append(f"tokenizer_files: {problem}")
    if digests is None and manifest.tokenizer_files:
        logger.warning(
            "%s: this export (manifest schema_version %d) records no sha256 for its tokenizer files, so a "
            "replaced vocabulary or chat template cannot be detected. Re-export with shadow-export to record them.",
            root,
            manifest.schema_version,
        )
    if problems:
        header = (
            f"Files in {str(root)!r} do not match its {MANIFEST_NAME} ({count(problems)}); the export is "
            "incomplete or was modified. Copy the whole directory again, or re-export:"
        )
        raise ManifestError(format_problems(header, problems), problems=problems)
    return manifest


def _digest_problem(root: Path, relative: str, expected: str | None, *, noun: str = "file ") -> str | None:
    """What is wrong with one listed file (``expected=None``: an older manifest without its digest), or None."""
    try:
        path = export_file(root, relative)
    except ManifestError as err:
        return str(err)
    if not path.is_file():
        return f"{noun}{relative!r} is missing ({path})."
    actual = file_sha256(path)
    if expected is not None and actual != expected:
        return f"{noun}{relative!r} has sha256 {actual}, but the manifest records {expected}."
    return None

"""Validation of the contract's JSON-shaped records, shared by the graph specs and the manifest.

Each check takes a value read from JSON (or a dataclass turned into a dict), appends one message per
problem to ``problems``, prefixed with where the value is (e.g. ``graphs['device/shadow'].opset``),
and says whether the value passed. Records collect every problem and raise once (:func:`raise_if`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from shadowpeft.runtime.errors import ManifestError, format_problems

__all__ = [
    "at",
    "check_choice",
    "check_int",
    "check_kind",
    "check_path",
    "check_sha256",
    "check_str",
    "count",
    "instance_problems",
    "raise_if",
    "record_problems",
    "shallow_values",
    "show",
]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")
_LABELS = {"Manifest": "manifest", "GraphSpec": "graph", "TensorSpec": "tensor"}  # for errors at the top level


def record_problems(data: Any, where: str, cls: type, problems: list[str]) -> bool:
    """Checks that ``data`` is an object with exactly ``cls``'s fields as keys (those with a default may be absent)."""
    label = where or _LABELS.get(cls.__name__, cls.__name__)
    if not isinstance(data, Mapping):
        problems.append(f"{label} must be a JSON object; got {show(data)}. Re-export.")
        return False
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            problems.append(
                f"{label}: unknown key {key!r}. Allowed keys: {', '.join(names)}. Remove it, or "
                "upgrade shadowpeft if a newer version wrote this export."
            )
    for f in fields:
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if f.name not in data and not has_default:  # keys with a default may be omitted
            problems.append(f"{label}: missing key {f.name!r}. Re-export with shadow-export.")
    return True


def check_str(value: Any, where: str, problems: list[str], *, optional: bool = False) -> bool:
    if isinstance(value, str) and value.strip():
        return True
    allowed = "a non-empty string or null" if optional else "a non-empty string"
    problems.append(f"{where} must be {allowed}; got {show(value)}.")
    return False


def check_int(value: Any, where: str, problems: list[str], *, minimum: int) -> bool:
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return True
    problems.append(f"{where} must be an integer >= {minimum}; got {show(value)}.")
    return False


def check_kind(value: Any, where: str, problems: list[str], *, array: bool) -> bool:
    if isinstance(value, list | tuple) if array else isinstance(value, Mapping):
        return True
    problems.append(f"{where} must be {'an array' if array else 'an object'}; got {show(value)}.")
    return False


def check_choice(value: Any, where: str, problems: list[str], *, allowed: tuple[str, ...], what: str) -> bool:
    if not check_str(value, where, problems):
        return False
    if value in allowed:
        return True
    problems.append(f"{where} {value!r} is not {what}. Allowed: {', '.join(allowed)}. Re-export, or fix the value.")
    return False


def check_path(value: Any, where: str, problems: list[str]) -> bool:
    if not check_str(value, where, problems):
        return False
    parts = PurePosixPath(value).parts
    if "\\" in value or value.startswith("/") or _WINDOWS_DRIVE.match(value) or ".." in parts or not parts:
        problems.append(
            f"{where} must be a relative path inside the export directory, with '/' separators and no '..'; "
            f"got {value!r}. Re-export."
        )
        return False
    return True


def check_sha256(value: Any, where: str, problems: list[str]) -> bool:
    if isinstance(value, str) and _SHA256.fullmatch(value):
        return True
    problems.append(f"{where} must be a sha256 digest (64 lower-case hex digits); got {show(value)}. Re-export.")
    return False


def instance_problems(items: Any, cls: type, where: str) -> list[str]:
    """For objects built in code: nested records must be dataclass instances, not raw dicts."""
    if not isinstance(items, list | tuple):
        return [f"{where} must be a tuple of {cls.__name__}; got {show(items)}."]
    return [
        f"{where}[{index}] must be a {cls.__name__}; got {show(item)}. Build it with {cls.__name__}(...) "
        f"or {cls.__name__}.from_dict(...)."
        for index, item in enumerate(items)
        if not isinstance(item, cls)
    ]


def raise_if(problems: list[str], what: str, *, fix: str = "fix these fields") -> None:
    """Raises one :class:`ManifestError` listing every problem, if there are any."""
    if problems:
        header = f"{what} ({count(problems)}); {fix}:"
        raise ManifestError(format_problems(header, problems), problems=problems)


def shallow_values(record: Any) -> dict[str, Any]:
    """A dataclass's fields, shallow (``dataclasses.asdict`` would also convert nested records)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def count(problems: list[str]) -> str:
    return "1 problem" if len(problems) == 1 else f"{len(problems)} problems"

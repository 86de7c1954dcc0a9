"""Which file each graph loads from: the ``.onnx`` graph, or the ``.ort`` copy its export carries.

An export made for a device profile with ``ort_format = true`` lists, beside each on-device graph
``device/shadow``, its copy ``ort/device/shadow`` (``device/shadow.ort``: same inputs, outputs and
weights, pre-optimized in onnxruntime's own format, the format mobile and reduced-operator builds
load). The manifest records the copies, with their sha256, only when the profile asked for them, so
their presence is the export's request::

    graph_format   graphs with an .ort copy              graphs without one
    auto           the .ort copy (the .onnx if the        the .onnx
                   copy will not load, with a warning)
    ort            the .ort copy, or refuse               the .onnx (an export with no copy at all: refuse)
    onnx           the .onnx                              the .onnx

A graph that loads from its copy does not need its ``.onnx`` file (and its external data): a device
may ship only the ``.ort`` files, and :func:`unread_files` tells the verifier which absent files the
run will not read. Every file that is present is still checked against its sha256.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from shadowpeft.runtime.contract import ORT_KEY_PREFIX, GraphSpec, ort_copy_key
from shadowpeft.runtime.errors import ExportLoadError

__all__ = ["GRAPH_FORMATS", "GraphFormat", "graph_sources", "unread_files"]

GraphFormat = Literal["auto", "onnx", "ort"]
GRAPH_FORMATS: tuple[str, ...] = ("auto", "onnx", "ort")


def graph_sources(graphs: Mapping[str, GraphSpec], graph_format: GraphFormat, *, source: str) -> dict[str, str]:
    """For every graph key (copies excluded), the manifest key whose file its session loads.

    Args:
        graphs: The manifest's graphs.
        graph_format: ``auto``, ``onnx`` or ``ort`` (see the module docstring).
        source: The export directory, for the error message.

    Raises:
        ExportLoadError: ``graph_format`` is unknown, or ``ort`` for an export that has no ``.ort`` copies.
    """
    if graph_format not in GRAPH_FORMATS:
        raise ExportLoadError(f"graph_format={graph_format!r}; choose one of {', '.join(GRAPH_FORMATS)}.")
    keys = [key for key in graphs if not key.startswith(ORT_KEY_PREFIX)]
    copies = {key: ort_copy_key(key) for key in keys if ort_copy_key(key) in graphs}
    if graph_format == "ort" and not copies:
        raise ExportLoadError(
            f"The export {source!r} has no .ort copies of its graphs (its device profile did not set "
            "ort_format = true). Re-export with such a profile (e.g. shadow-export --device arm64-phone), or run "
            "the .onnx graphs with --graph-format auto or onnx."
        )
    if graph_format == "onnx":
        return {key: key for key in keys}
    return {key: copies.get(key, key) for key in keys}


def unread_files(root: Path, graphs: Mapping[str, GraphSpec], sources: Mapping[str, str]) -> set[str]:
    """The absent ``.onnx`` files (and external data) of graphs that load from their ``.ort`` copy.

    The verifier may skip these: the run never opens them. A present file is always verified.
    """
    unread: set[str] = set()
    for key, loaded in sources.items():
        if loaded != key:
            spec = graphs[key]
            unread |= {name for name in (spec.file, *spec.external_data) if not os.path.lexists(root / name)}
    return unread

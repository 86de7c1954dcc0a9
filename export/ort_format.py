"""Optional conversion of on-device graphs to onnxruntime's ``.ort`` format (``ort_format = true`` profiles).

Mobile and reduced-operator builds of onnxruntime load ``.ort`` files. onnxruntime writes one when a
session is created with ``session.save_model_format = ORT``; only basic (provider-independent)
graph optimizations are applied, so the file runs on any execution provider the profile names.
The runtime loads these copies instead of the ``.onnx`` graphs (``shadowpeft.runtime.graph_format``).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from shadowpeft.export.errors import ExportError
from shadowpeft.runtime.contract import ORT_KEY_PREFIX

__all__ = ["ORT_KEY_PREFIX", "convert_to_ort"]

# ORT_KEY_PREFIX (the manifest key of a copy) is declared in the contract, which the runtime reads too.


def convert_to_ort(onnx_path: Path) -> Path:
    """Writes ``<graph>.ort`` beside ``onnx_path`` (atomically) and returns its path.

    Raises:
        ExportError: onnxruntime could not load or convert the graph.
    """
    target = onnx_path.with_suffix(".ort")
    temp = target.with_name(f".{target.name}.tmp.ort")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(temp)
    options.add_session_config_entry("session.save_model_format", "ORT")
    try:
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        os.replace(temp, target)
    except Exception as err:  # onnxruntime raises its own exception types for load/convert failures
        temp.unlink(missing_ok=True)
        raise ExportError(f"onnxruntime could not convert {onnx_path.name} to the .ort format: {err}") from err
    return target

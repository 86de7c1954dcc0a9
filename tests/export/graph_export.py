"""Export helpers for tests: trace graphs of a tiny wrapped model into a folder and open sessions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import torch

from shadowpeft.export.fused_layers import Fusion
from shadowpeft.export.graphs import export_view
from shadowpeft.export.onnx_export import export_graph
from shadowpeft.export.plan import graph_jobs
from shadowpeft.heads import ShadowForCausalLM
from shadowpeft.runtime.contract import CLOUD_BACKBONE, COUPLED, DEVICE_HEAD, DEVICE_SHADOW, GraphIO

ALL_GRAPHS = (DEVICE_SHADOW, DEVICE_HEAD, CLOUD_BACKBONE, COUPLED)


@dataclass
class Exported:
    model: ShadowForCausalLM
    root: Path
    files: dict[str, Path]
    ios: dict[str, GraphIO]

    def sessions(self, files: dict[str, Path] | None = None) -> dict[str, ort.InferenceSession]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        return {key: ort.InferenceSession(str(path), options) for key, path in (files or self.files).items()}


def export_graphs(
    model: ShadowForCausalLM, root: Path, keys: tuple[str, ...] = ALL_GRAPHS, fusion: Fusion | None = None
) -> Exported:
    """Trace ``keys`` of ``model`` into ``root`` as the pipeline does (standard operators unless ``fusion``)."""
    files, ios = {}, {}
    with export_view(model, fusion), torch.no_grad():
        for job in graph_jobs(model, keys):
            path = root / job.file
            path.parent.mkdir(parents=True, exist_ok=True)
            export_graph(job.wrapper, job.example, job.io, path)
            files[job.key], ios[job.key] = path, job.io
    return Exported(model, root, files, ios)

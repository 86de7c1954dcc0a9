"""The Optimum stack the interop tests run in (its own venv, :mod:`tests.venvs`) and how they call it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import onnxruntime
import torch

from tests.venvs import venv_python

PROBE = Path(__file__).resolve().parent / "optimum_probe.py"
#: transformers 4.57 (optimum-onnx pins < 4.58); the main environment's onnxruntime, so both sides run the
#: same kernels; torch pinned beside them (a bare torch would be the CUDA build).
OPTIMUM_PINS = (
    "optimum-onnx==0.1.0",
    "optimum==2.1.0",
    "transformers==4.57.6",
    f"onnxruntime=={onnxruntime.__version__}",
    f"torch=={torch.__version__.split('+')[0]}",
)


def optimum_python() -> Path:
    """The Optimum venv's Python (built on first use, about 2 minutes; skips the test without PyPI)."""
    return venv_python("optimum", OPTIMUM_PINS)


def probe(python: Path, request: dict) -> dict:
    """Runs ``optimum_probe.py`` with ``request``; returns its answer (see that script)."""
    done = subprocess.run(
        [str(python), str(PROBE)], input=json.dumps(request), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def runtime_greedy(export_dir: Path, prompts: list[str], new_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """The prompts' ids (no chat template) and the greedy tokens of the runtime's detached ``Generator`` (what
    ``shadow-run --mode detached`` runs) for them as one left-padded batch, each cut after EOS."""
    from shadowpeft.runtime.export_dir import open_export
    from shadowpeft.runtime.generate import Generator
    from shadowpeft.runtime.sampling import SamplingConfig
    from shadowpeft.runtime.tokenizer import RuntimeTokenizer

    export = open_export(export_dir)
    tokenizer = RuntimeTokenizer.from_export(export.root, export.manifest)
    ids = [tokenizer.encode(prompt, chat=False) for prompt in prompts]
    results = Generator(export, eos_ids=tokenizer.eos_ids).generate(ids, SamplingConfig(max_new_tokens=new_tokens))
    return ids, [result.token_ids for result in results]

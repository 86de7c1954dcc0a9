"""The speed benchmark's anchor rows: the plain base as onnxruntime-genai's model builder writes it.

What a user would pick to run a merged LoRA on a laptop is ``python -m onnxruntime_genai.models.builder``:
its graph fuses q/k/v into one MatMulNBits, uses GroupQueryAttention with a KV buffer and
SkipSimplifiedLayerNormalization. These rows build that graph from the same base model (fp32, int8,
int4; builder defaults otherwise) and time it with onnxruntime-genai's own Generator, greedy, with the
same prompt, new tokens and threads as every other row::

    prefill  append_tokens(prompt) + the first generate_next_token() (picks token 1 from the prompt's
             logits: what our graph rows' first call does)
    decode   the other N - 1 generate_next_token() calls (each runs the model on the last token,
             then picks the next) / (N - 1)

End of sequence is suppressed with ``min_length`` = ``max_length`` (as the PyTorch rows do with
``min_new_tokens``). Threads: ``intra_op_num_threads`` in the folder's ``genai_config.json``, inter-op 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GENAI_CONFIG = "genai_config.json"


def build(source: Path, out: Path, weights: str, *, threads: int, cache: Path) -> Path:
    """Runs the model builder on the Hugging Face folder ``source`` into ``out`` at ``weights`` for the CPU.

    Args:
        source: A Hugging Face model folder (config, safetensors weights, tokenizer).
        out: The folder to write (``model.onnx``, its data, ``genai_config.json``, tokenizer files).
        weights: ``fp32``, ``int8`` or ``int4``.
        threads: Intra-op threads written into the config's session options.
        cache: The builder's scratch directory.

    Raises:
        RuntimeError: The builder failed (its last lines of output).
    """
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out)]
    command += ["-p", weights, "-e", "cpu", "-c", str(cache)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (out / GENAI_CONFIG).is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"onnxruntime-genai's model builder failed at {weights} (exit {done.returncode}):\n{tail}")
    config = json.loads((out / GENAI_CONFIG).read_text(encoding="utf-8"))
    decoder = config["model"]["decoder"]
    decoder["session_options"] = {
        **decoder.get("session_options", {}),
        "intra_op_num_threads": threads,
        "inter_op_num_threads": 1,
    }
    (out / GENAI_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def folder_bytes(folder: Path) -> int:
    """Bytes of the folder's ONNX graph files and their external data (tokenizer and config excluded)."""
    config = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))
    graph = folder / config["model"]["decoder"]["filename"]
    data = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(graph.name) and p != graph]
    return graph.stat().st_size + sum(p.stat().st_size for p in data)


def fused_ops(folder: Path) -> dict[str, int]:
    """Counts of the fused contrib operators in the folder's graph (what makes it fast), for the report."""
    import onnx

    config = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))
    model = onnx.load(str(folder / config["model"]["decoder"]["filename"]), load_external_data=False)
    wanted = ("MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization")
    counts = {op: 0 for op in wanted}
    for node in model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts


def greedy(model: Any, prompt: tuple[int, ...], new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy generation with onnxruntime-genai: (new tokens, prefill seconds, seconds of the other steps)."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    length = len(prompt) + new_tokens
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    generator.generate_next_token()
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        generator.generate_next_token()
    decode = time.perf_counter() - start
    tokens = [int(t) for t in generator.get_sequence(0)[len(prompt) :]]
    return tokens, prefill, decode

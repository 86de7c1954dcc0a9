"""Memory figures of the speed benchmark: the machine's measured bandwidth, and bytes of weights read per token.

Bandwidth: a float64 array much larger than any cache is split into one contiguous chunk per
thread, and ``threads`` Python threads each run ``np.sum`` (read) or ``np.copyto`` (copy) on their
chunk at once; numpy releases the GIL inside both, so the threads run in parallel, as the decode
threads do. Each test runs ``repeats`` times; the fastest counts (bandwidth tests report the best
run: a slower one only means something else was using the memory bus). Read bandwidth = array
bytes / time; copy bandwidth counts bytes read plus bytes written (2 x array bytes; write-allocate
traffic is not counted). The read figure is the reference for decode, which streams weights.

Weight bytes per token: a decode step (batch 1, one token) reads every weight of an ONNX graph
once, except embedding tables, of which it reads one row. So: the bytes of every initializer,
where an initializer that feeds only Gather / GatherBlockQuantized as the table (and its scales)
counts for one row. KV-cache reads are not counted (they grow with the context; at 128-256
tokens they are small next to the weights).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

BANDWIDTH_METHOD = __doc__.split("\n\n")[1].replace("\n", " ")
WEIGHT_BYTES_METHOD = __doc__.split("\n\n")[2].replace("\n", " ")
_FOUR_BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
_GATHERS = {"Gather": (0,), "GatherBlockQuantized": (0, 2, 3)}  # table inputs read one row at a time


def measure_bandwidth(threads: int, *, array_mb: int = 1024, repeats: int = 5) -> dict[str, Any]:
    """Read and copy bandwidth in GB/s (1e9 bytes) with ``threads`` threads, and read bandwidth with one."""
    source = np.ones(array_mb * (1 << 20) // 8, dtype=np.float64)  # np.ones touches every page
    target = np.zeros_like(source)

    def best(work: Callable[[np.ndarray, np.ndarray], Any], count: int) -> float:
        sources, targets = np.array_split(source, count), np.array_split(target, count)
        fastest = float("inf")
        with ThreadPoolExecutor(count) as pool:
            for _ in range(repeats):
                start = time.perf_counter()
                list(pool.map(work, sources, targets))
                fastest = min(fastest, time.perf_counter() - start)
        return fastest

    read = best(lambda src, _: np.sum(src), threads)
    copy = best(lambda src, dst: np.copyto(dst, src), threads)
    read_one = best(lambda src, _: np.sum(src), 1)
    return {
        "threads": threads,
        "array_mb": array_mb,
        "repeats": repeats,
        "read_gb_s": source.nbytes / read / 1e9,
        "copy_gb_s": 2 * source.nbytes / copy / 1e9,
        "read_1_thread_gb_s": source.nbytes / read_one / 1e9,
        "method": BANDWIDTH_METHOD,
    }


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of weights one batch-1 decode step of the graph at ``path`` reads (see the module docstring)."""
    model = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: _tensor_bytes(t) for t in model.graph.initializer}
    rows = {t.name: (t.dims[0] if t.dims else 1) for t in model.graph.initializer}
    table_uses: dict[str, int] = {}
    other_uses: set[str] = set()
    for node in model.graph.node:
        tables = _GATHERS.get(node.op_type, ())
        for position, name in enumerate(node.input):
            if name in sizes:
                if position in tables:
                    table_uses[name] = table_uses.get(name, 0) + 1
                else:
                    other_uses.add(name)
    total = 0
    for name, size in sizes.items():
        one_row = name in table_uses and name not in other_uses
        total += size // max(rows[name], 1) if one_row else size
    return total


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    if tensor.data_type in _FOUR_BIT:
        return (count + 1) // 2
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize

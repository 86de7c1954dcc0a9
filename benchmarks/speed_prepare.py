"""What the speed benchmark measures: the prompt, the adapter checkpoint, and every ONNX graph.

Exports (one folder each under the work directory)::

    export-fp32/   shadow-export's own pipeline (export_checkpoint, --split --coupled): fp32 graphs
                   validated against PyTorch (prefill + cached steps)
    export-int8/   the same graphs with the on-device ones (device/shadow, device/head, coupled)
    export-int4/   passed through export.quantize.quantize_graph with the pipeline's defaults (int4:
                   block 32, accuracy level 4); cloud/backbone stays fp32, as in the pipeline.
                   manifest.json is rewritten with the new hashes and weight formats. These graphs
                   use onnxruntime's fused operators (shadow-export's default, --ops auto).
    export-std-<w>/  the coupled graph exported with --ops standard (plain ONNX operators), quantized
                   the same way: the fused graphs' comparison.
    plain-<w>/base.onnx   the plain base model (no adapter) as one graph: embed -> base layers ->
                   final norm -> head as a (d, V) MatMul weight, KV cache in and out like the
                   export's graphs; fp32 traced with export_graph, int8/int4 by quantize_graph.
    genai-<w>/     the plain base as onnxruntime-genai's model builder writes it (the anchor rows,
                   benchmarks/speed_genai.py), from the same Hugging Face folder.

Deriving int8/int4 from the fp32 export (export.pipeline.quantize_export) runs exactly the quantization
pass that
``shadow-export --quantize int8|int4`` runs (deterministic: same input, same bytes), without
tracing every graph three times; the export-time agreement check of the quantized graphs is
skipped (the benchmark records token agreement between rows instead).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from benchmarks import speed_genai
from shadowpeft import ShadowConfig, get_shadow_model
from shadowpeft.arch import spec_for
from shadowpeft.checkpoint.assets import resolve_base
from shadowpeft.checkpoint.store import save_shadow
from shadowpeft.export.graphs import HeadWeight, example_past, kv_layout
from shadowpeft.export.onnx_export import export_graph, external_data_files
from shadowpeft.export.pipeline import ExportOptions, export_checkpoint, quantize_export
from shadowpeft.export.quantize import quantize_graph
from shadowpeft.runtime.contract import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    SHADOW_STATES,
    GraphIO,
    detached_shadow_io,
    is_past_name,
)
from shadowpeft.runtime.export_dir import session_options
from shadowpeft.train.jobs import load_base

WEIGHTS = ("fp32", "int8", "int4")
PLAIN_GRAPH = "base.onnx"
#: The single-graph rows: kind -> graph file inside an export (``plain`` lives in its own folder).
GRAPH_FILES = {"coupled": "coupled.onnx", "detached": "device/shadow.onnx"}
#: Largest |logit difference| accepted between the fp32 plain-base graph and PyTorch (see export.validate).
PLAIN_TOLERANCE = 1e-3
# A fixed English passage (about 190 SmolLM2 tokens); its first `prompt_tokens` tokens are the prompt.
PROMPT_TEXT = (
    "The lighthouse keeper climbed the narrow spiral stairs every evening at dusk, carrying a small lamp and "
    "a notebook in which he recorded the wind, the colour of the sea and the ships that passed the rocky "
    "headland on their way to the harbour. In winter the storms came from the west, and the waves broke so "
    "high against the tower that salt crusted the windows of the lantern room. He cleaned the glass each "
    "morning with vinegar and old newspapers, trimmed the wick, and wound the clockwork that turned the great "
    "lens. Once a month a boat brought flour, coffee, lamp oil and letters from his sister, who lived in a "
    "town far inland and could not imagine why anyone would choose to live on a rock surrounded by water. "
    "He answered every letter on the evening it arrived, describing the birds that nested in the cliffs, the "
    "seals that slept on the flat stones at low tide, and the long silences that he had learned to love."
)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything the rows need, as plain data (it is written into each row's job file).

    Attributes:
        base: Base model reference (``smollm2-135m-instruct`` or a local directory).
        prompt: Prompt token ids.
        eos_ids: End-of-sequence ids (PyTorch rows suppress them; token checks stop at the first one).
        exports: Weight format -> export directory.
        graphs: Row graph name (``plain-int8``, ``coupled-fp32``, ...) -> ONNX file.
        files: Name -> size in bytes (graphs with their external data, the adapter checkpoint, the base).
        plain_max_abs_diff: fp32 plain-base graph vs PyTorch, largest |logit difference| on the prompt.
    """

    base: str
    prompt: tuple[int, ...]
    eos_ids: tuple[int, ...]
    exports: dict[str, str]
    graphs: dict[str, str]
    files: dict[str, int]
    plain_max_abs_diff: float


def prompt_ids(base: str, prompt_tokens: int, *, smoke: bool) -> tuple[int, ...]:
    """The first ``prompt_tokens`` tokens of :data:`PROMPT_TEXT` (smoke: seeded random ids of the toy vocabulary)."""
    _, tokenizer = load_base(base, kind="lm")
    if smoke:
        rng = np.random.default_rng(0)
        return tuple(int(i) for i in rng.integers(4, len(tokenizer), prompt_tokens))
    ids = tokenizer(PROMPT_TEXT).input_ids
    if len(ids) < prompt_tokens:
        raise ValueError(f"the built-in prompt has {len(ids)} tokens; --prompt-tokens must be <= that")
    return tuple(ids[:prompt_tokens])


def prepare(work: Path, base: str, *, prompt_tokens: int, smoke: bool, threads: int, progress) -> Prepared:
    """Write the checkpoint and every graph under ``work`` (emptied first); ``progress(str)`` reports stages."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    prompt = prompt_ids(base, prompt_tokens, smoke=smoke)
    base_model, tokenizer = load_base(base, kind="lm")
    torch.manual_seed(0)  # speed_rows seeds the same way: our PyTorch rows hold these weights too
    model = get_shadow_model(base_model, ShadowConfig()).eval()  # fresh: W_up = 0
    save_shadow(model, work / "ckpt", base_ref=base)
    progress("export fp32 (shadow-export pipeline: trace, validate)")
    exports = {"fp32": work / "export-fp32"}
    export_checkpoint(work / "ckpt", exports["fp32"], ExportOptions(selections=("split", "coupled")))
    for weights in WEIGHTS[1:]:
        progress(f"quantize the on-device graphs to {weights}")
        exports[weights] = work / f"export-{weights}"
        quantize_export(exports["fp32"], exports[weights], weights=weights)
    progress("export the coupled graph with standard operators only (--ops standard), for comparison")
    standard = {"fp32": work / "export-std-fp32"}
    export_checkpoint(work / "ckpt", standard["fp32"], ExportOptions(selections=("coupled",), ops="standard"))
    for weights in WEIGHTS[1:]:
        standard[weights] = work / f"export-std-{weights}"
        quantize_export(standard["fp32"], standard[weights], weights=weights)
    progress("export the plain base graph")
    plain = {"fp32": work / "plain-fp32" / PLAIN_GRAPH}
    diff = export_plain_base(base, plain["fp32"], prompt)
    for weights in WEIGHTS[1:]:
        plain[weights] = work / f"plain-{weights}" / PLAIN_GRAPH
        plain[weights].parent.mkdir()
        quantize_graph(plain["fp32"], plain[weights], weights=weights)
    graphs = {f"plain-{w}": str(path) for w, path in plain.items()}
    for kind, file in GRAPH_FILES.items():
        graphs |= {f"{kind}-{w}": str(root / file) for w, root in exports.items()}
    graphs |= {f"coupled-std-{w}": str(root / GRAPH_FILES["coupled"]) for w, root in standard.items()}
    files = {name: graph_bytes(Path(path)) for name, path in graphs.items()}
    for weights, root in exports.items():
        files[f"split-{weights}-device"] = sum(
            graph_bytes(root / f) for f in ("device/shadow.onnx", "device/head.onnx")
        )
        files[f"split-{weights}-cloud"] = graph_bytes(root / "cloud" / "backbone.onnx")
    files["adapter-checkpoint"] = sum(p.stat().st_size for p in (work / "ckpt").rglob("*") if p.is_file())
    for weights in WEIGHTS:
        progress(f"onnxruntime-genai model builder, plain base {weights}")
        folder = speed_genai.build(
            resolve_base(base), work / f"genai-{weights}", weights, threads=threads, cache=work / "genai-cache"
        )
        graphs[f"genai-{weights}"] = str(folder)
        files[f"genai-{weights}"] = speed_genai.folder_bytes(folder)
    eos = {tokenizer.eos_token_id, *_as_tuple(base_model.generation_config.eos_token_id)} - {None}
    return Prepared(base, prompt, tuple(sorted(eos)), {w: str(p) for w, p in exports.items()}, graphs, files, diff)


def _as_tuple(value: int | list[int] | None) -> tuple[int | None, ...]:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def graph_bytes(path: Path) -> int:
    """Size of an ONNX graph plus its external-data files."""
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in external_data_files(path))


# ------------------------------------------------------------------------------------------ derived exports


# --------------------------------------------------------------------------------------------- plain base


class PlainBaseGraph(nn.Module):
    """The base model alone as a flat-tensor graph: ids, mask, positions, KV -> logits, KV.

    The same pieces as :mod:`shadowpeft.export.graphs` (``ArchSpec.traced_context`` masks, the ArchSpec's
    layer call, a ``(d, V)`` head weight), without the shadow: what a merged LoRA costs.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.spec = spec_for(base.config)
        self.backbone = self.spec.backbone(base)
        self.head = HeadWeight(base.get_output_embeddings())
        self.num_layers = len(self.spec.layers(self.backbone))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor):
        spec, bb = self.spec, self.backbone
        cache = DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)])
        x = spec.embedding(bb)(input_ids)  # (B, T, d)
        ctx = spec.traced_context(bb, x, attention_mask=attention_mask, position_ids=position_ids)
        h = spec.input_stage(bb, x, ctx.position_ids)
        for i, layer in enumerate(spec.layers(bb)):
            h = spec.call_layer(layer, h, ctx, i, cache)
        logits = self.head(spec.final_norm(bb)(h))  # (B, T, V)
        return (logits, *(t for layer in cache.layers[: self.num_layers] for t in (layer.keys, layer.values)))


def plain_base_io(base: nn.Module) -> GraphIO:
    """The detached graph's I/O without ``shadow_states``: ids, mask, positions, KV -> logits, KV."""
    layout = kv_layout(spec_for(base.config).backbone(base))
    vocab, d = base.get_output_embeddings().weight.shape
    io = detached_shadow_io(**layout._asdict(), hidden=d, vocab=vocab)
    return GraphIO(io.inputs, tuple(spec for spec in io.outputs if spec.name != SHADOW_STATES))


def export_plain_base(base: str, path: Path, prompt: tuple[int, ...]) -> float:
    """Trace the plain base graph of ``base`` to ``path``; returns its largest |logit diff| vs PyTorch on ``prompt``.

    Raises:
        ValueError: The graph's logits differ from PyTorch's by more than :data:`PLAIN_TOLERANCE`.
    """
    model = load_base(base, kind="lm")[0].eval()
    reference = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # plain MatMul/Softmax ops, as export_view does
    wrapper = PlainBaseGraph(model).eval()
    layout = kv_layout(wrapper.backbone)
    batch, new, past = 2, 3, 5  # every dynamic axis >= 2 and distinct (see export.plan)
    generator = torch.Generator().manual_seed(0)
    example = (
        torch.randint(0, model.config.vocab_size, (batch, new), generator=generator),
        torch.ones(batch, past + new, dtype=torch.long),
        torch.arange(past, past + new).expand(batch, -1).contiguous(),
        *example_past(layout, batch, past, torch.float32),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        export_graph(wrapper, example, plain_base_io(model), path)
    model.config._attn_implementation = reference
    return _plain_parity(model, path, prompt)


def _plain_parity(model: nn.Module, path: Path, prompt: tuple[int, ...]) -> float:
    ids = np.asarray([prompt], dtype=np.int64)
    session = ort.InferenceSession(str(path), session_options(None), providers=["CPUExecutionProvider"])
    feeds: dict[str, Any] = {
        INPUT_IDS: ids,
        ATTENTION_MASK: np.ones_like(ids),
        POSITION_IDS: np.arange(ids.shape[1])[None],
    }
    for spec in session.get_inputs():
        if is_past_name(spec.name):
            feeds[spec.name] = np.zeros((1, spec.shape[1], 0, spec.shape[3]), dtype=np.float32)
    (logits,) = session.run([LOGITS], feeds)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    diff = float(np.abs(logits - expected).max())
    if not diff <= PLAIN_TOLERANCE:
        raise ValueError(f"the plain base graph differs from PyTorch by {diff:.3g} (> {PLAIN_TOLERANCE}); it is wrong")
    return diff

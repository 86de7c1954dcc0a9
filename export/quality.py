"""Figures the export reports beside parity: quantized-vs-fp32 agreement and the device memory fit."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnxruntime as ort
from transformers import PreTrainedTokenizerBase

from shadowpeft.export.graphs import kv_layout
from shadowpeft.export.quantize import agreement
from shadowpeft.export.validate import ChainRunner, chains_for
from shadowpeft.heads import ShadowForCausalLM
from shadowpeft.runtime.contract import LOGITS, GraphIO, left_pad, positions_for
from shadowpeft.runtime.devices import DeviceProfile

__all__ = ["HELD_OUT_TEXT", "held_out_batch", "memory_figures", "quantized_agreement"]

#: Text no built-in dataset contains, for judging quantized graphs against fp32 ones.
HELD_OUT_TEXT = (
    "The lighthouse keeper wrote down the weather every morning: wind from the west, a low grey sky, "
    "and the sea too rough for the ferry. By noon the clouds had thinned, and the first boat crossed "
    "the bay with crates of apples, two bicycles and a letter for the school.",
    "To replace a bicycle chain, shift to the smallest cog, open the quick link with pliers, and thread "
    "the new chain through the derailleur before joining its ends again.",
)
_MAX_TOKENS = 64


def held_out_batch(tokenizer: PreTrainedTokenizerBase | None, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """:data:`HELD_OUT_TEXT` tokenized and left-padded (B, T), or seeded random ids without a tokenizer."""
    if tokenizer is None:
        rng = np.random.default_rng(7)
        return rng.integers(0, vocab, (2, 32)).astype(np.int64), np.ones((2, 32), dtype=np.int64)
    rows = [tokenizer(text, add_special_tokens=False).input_ids[:_MAX_TOKENS] for text in HELD_OUT_TEXT]
    return left_pad([np.minimum(row, vocab - 1) for row in rows])


def quantized_agreement(
    reference: Mapping[str, ort.InferenceSession],
    quantized: Mapping[str, ort.InferenceSession],
    ios: Mapping[str, GraphIO],
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    prefix: str,
) -> dict[str, float]:
    """Top-1 agreement and mean KL of every chain, quantized against fp32, on held-out text.

    Returns:
        ``{f"{prefix}.{chain}.top1_agreement": ..., f"{prefix}.{chain}.mean_kl": ...}``.
    """
    vocab = next(spec.shape[-1] for graph in ios.values() for spec in graph.outputs if spec.name == LOGITS)
    ids, mask = held_out_batch(tokenizer, vocab)
    feed = {"ids": ids, "mask": mask}
    figures: dict[str, float] = {}
    for chain in chains_for(tuple(reference)):
        result = agreement(_prefill(chain, reference, ios), _prefill(chain, quantized, ios), [(feed, mask)])
        figures[f"{prefix}.{chain}.top1_agreement"] = result.top1
        figures[f"{prefix}.{chain}.mean_kl"] = result.mean_kl
    return figures


def _prefill(chain: str, sessions: Mapping[str, ort.InferenceSession], ios: Mapping[str, GraphIO]):
    def run(feed: Mapping[str, np.ndarray]) -> np.ndarray:
        runner = ChainRunner(chain, sessions, ios)
        runner.start(feed["ids"].shape[0])
        return runner.step(feed["ids"], feed["mask"], positions_for(feed["mask"], feed["ids"].shape[1]))

    return run


def memory_figures(model: ShadowForCausalLM, device_bytes: int, profile: DeviceProfile) -> dict[str, float]:
    """Estimated device memory (graph files + the shadow KV cache at ``max_context``) against the budget.

    The weights are counted once at their file size; onnxruntime's own arena and pre-packed weights
    come on top, so a result within about 10% of the budget is tight.
    """
    layers, kv_heads, head_dim = kv_layout(model.shadow_model)
    kv_bytes = 2 * layers * kv_heads * head_dim * profile.max_context * 4  # one sequence, fp32
    figures = {
        "memory.graph_mb": device_bytes / 2**20,
        "memory.kv_cache_mb": kv_bytes / 2**20,
        "memory.estimate_mb": (device_bytes + kv_bytes) / 2**20,
    }
    if profile.memory_budget_mb is not None:
        figures["memory.budget_mb"] = float(profile.memory_budget_mb)
    return figures

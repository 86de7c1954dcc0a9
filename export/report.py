"""The summary ``shadow-export`` prints: graphs and sizes, parity, quantization agreement, memory fit, escalation."""

from __future__ import annotations

from shadowpeft.runtime.contract import FP32
from shadowpeft.runtime.devices import DeviceProfile
from shadowpeft.runtime.manifest import Manifest
from shadowpeft.train.selective import CONFIDENCE_MEASURES

__all__ = ["summary_lines"]


def summary_lines(manifest: Manifest, profile: DeviceProfile | None) -> list[str]:
    """Human-readable lines describing an export, from its manifest alone."""
    figures = manifest.validation
    lines = [f"Graphs ({manifest.quantization}):"]
    for key, graph in manifest.graphs.items():
        size = figures.get(f"{key}.bytes", 0) / 2**20
        before = figures.get(f"{key}.fp32_bytes")
        change = f" (fp32 {before / 2**20:.1f} MB)" if before else ""
        ops = f"  fused: {', '.join(graph.fused)}" if graph.fused else ""
        lines.append(f"  {key:<15} {graph.file:<22} {graph.weights:<5} {size:8.1f} MB{change}{ops}")
    tolerance = figures.get("parity.tolerance", 0)
    lines.append(f"Parity with PyTorch (fp32 graphs, tolerance {tolerance:g} x max(1, max|logit| / 10)):")
    for chain in ("detached", "split", "coupled"):
        if f"{chain}.logits_max_abs_diff" in figures:
            lines.append(
                f"  {chain:<9} max |logit diff| {figures[f'{chain}.logits_max_abs_diff']:.2e} "
                f"(allowed {figures.get(f'{chain}.logits_bound', tolerance):.2e}), "
                f"greedy agreement {figures[f'{chain}.greedy_agreement']:.1%}"
            )
    weights = {graph.weights for graph in manifest.graphs.values()} - {FP32}
    for fmt in sorted(weights):
        lines.append(f"{fmt} vs fp32 on held-out text:")
        for chain in ("detached", "split", "coupled"):
            if f"{fmt}.{chain}.top1_agreement" in figures:
                lines.append(
                    f"  {chain:<9} top-1 agreement {figures[f'{fmt}.{chain}.top1_agreement']:.1%}, "
                    f"mean KL {figures[f'{fmt}.{chain}.mean_kl']:.4f}"
                )
    if profile is not None and "memory.estimate_mb" in figures:
        estimate = figures["memory.estimate_mb"]
        budget = figures.get("memory.budget_mb")
        verdict = "no budget set" if budget is None else ("fits" if estimate <= budget else "DOES NOT FIT")
        lines.append(
            f"Device {profile.name}: ~{estimate:.0f} MB (graphs {figures['memory.graph_mb']:.0f} MB + shadow KV cache "
            f"at {profile.max_context} tokens {figures['memory.kv_cache_mb']:.0f} MB)"
            + (f" vs budget {budget:.0f} MB: {verdict}" if budget is not None else f": {verdict}")
        )
    lines += _escalation_lines(manifest)
    return lines


def _escalation_lines(manifest: Manifest) -> list[str]:
    """The escalation threshold the export carries (from the checkpoint's escalation.json), or that it has none."""
    e = manifest.escalation
    if e is None:
        return ["Escalation: none (the checkpoint has no escalation.json; `shadowpeft eval --selective` writes one)."]
    if e.threshold > 1.0:  # selective.ALL_ESCALATED
        line = f"Escalation: threshold {e.threshold!r} on {e.confidence}, above 1: every step is escalated"
    else:
        line = f"Escalation: threshold {e.threshold:.4f}, answer on the device when {e.confidence} >= it"
    if e.local_fraction is not None and e.combined_accuracy is not None and e.attached_accuracy is not None:
        unit = "predicted tokens" if e.confidence == CONFIDENCE_MEASURES["lm"] else "examples"
        line += (
            f" ({e.local_fraction:.1%} local, combined accuracy {e.combined_accuracy:.1%} vs attached "
            f"{e.attached_accuracy:.1%}"
            + (f" on {e.examples} {unit} of the {e.split} split" if e.examples is not None and e.split else "")
            + ")"
        )
    return [line + "."]

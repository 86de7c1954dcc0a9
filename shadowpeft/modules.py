"""The trainable adapter modules of the method notes, section 3, step 4. Plain nn.Modules, no HF imports.

Parameter names and shapes follow the published ``shadow-peft`` layout (``injection_downs``
[L-1, d, r], ``injection_ups`` [L-1, r, d], ``update_gates.{j}.{0,2}``,
``update_transforms.{j}.{0,3}``, ``hidden_norm``) so checkpoints stay interchangeable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShadowInjection(nn.Module):
    """``h + alpha * (Dropout_p((h - s) @ W_down[j])) @ W_up[j]`` for adapter index ``j = l - 1``.

    ``W_down ~ N(0, init_std^2)`` and ``W_up = 0``, so at initialisation the injection is exactly
    the identity. Dropout acts on the r-wide bottleneck; the scale is plain ``alpha``.
    """

    def __init__(
        self, num_adapters: int, hidden_size: int, *, rank: int, alpha: float, dropout: float, init_std: float = 0.02
    ) -> None:
        super().__init__()
        self.injection_downs = nn.Parameter(torch.empty(num_adapters, hidden_size, rank))
        self.injection_ups = nn.Parameter(torch.zeros(num_adapters, rank, hidden_size))
        nn.init.normal_(self.injection_downs, mean=0.0, std=init_std)
        self.alpha = float(alpha)
        self.dropout = float(dropout)

    def forward(self, h: Tensor, s: Tensor, j: int) -> Tensor:
        """h, s: (B, T, d) -> corrected h (B, T, d)."""
        z = (h - s) @ self.injection_downs[j]  # (B, T, r)
        z = F.dropout(z, self.dropout, self.training)
        return torch.add(h, z @ self.injection_ups[j], alpha=self.alpha)


class ShadowUpdate(nn.Module):
    """``u = LayerNorm(h); s + sigmoid(G_j(u)) * (T_j(u) - s)`` with bias-free SiLU MLPs d -> g -> d.

    One LayerNorm (affine) is shared by all adapters; ``T_j`` has dropout after its SiLU.
    """

    def __init__(self, num_adapters: int, hidden_size: int, *, gate_width: int, dropout: float) -> None:
        super().__init__()
        self.update_gates = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden_size, gate_width, bias=False),
                nn.SiLU(),
                nn.Linear(gate_width, hidden_size, bias=False),
            )
            for _ in range(num_adapters)
        )
        self.update_transforms = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden_size, gate_width, bias=False),
                nn.SiLU(),
                nn.Dropout(dropout),
                nn.Linear(gate_width, hidden_size, bias=False),
            )
            for _ in range(num_adapters)
        )
        self.hidden_norm = nn.LayerNorm(hidden_size)

    def forward(self, h: Tensor, s: Tensor, j: int) -> Tensor:
        """h (post-layer), s: (B, T, d) -> new s (B, T, d)."""
        # Functional calls on the Sequential's weights: the same math, without four module
        # dispatches per MLP on the per-token decode path.
        norm, gate, transform = self.hidden_norm, self.update_gates[j], self.update_transforms[j]
        u = F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)  # (B, T, d)
        gamma = torch.sigmoid(F.linear(F.silu(F.linear(u, gate[0].weight)), gate[2].weight))  # (B, T, d)
        z = F.dropout(F.silu(F.linear(u, transform[0].weight)), transform[2].p, self.training)  # (B, T, g)
        t = F.linear(z, transform[3].weight)  # (B, T, d)
        # lerp needs one dtype; under bf16 autocast the MLPs return bf16 while s stays fp32 (no-op otherwise).
        return torch.lerp(s, t.to(s.dtype), gamma.to(s.dtype))  # s + gamma * (t - s), one kernel

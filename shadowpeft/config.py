"""ShadowConfig: every knob of the method (the method notes, section 2), nested by concern.

Values are checked in ``__post_init__``; checks that need the base model (head-dim divisibility,
layer count, architecture) live in :meth:`ShadowConfig.check_against`. Every check collects all
problems and raises one :class:`ShadowConfigError` listing them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from shadowpeft.errors import ShadowConfigError


@dataclass(frozen=True)
class BackboneConfig:
    """Shape of an *implicit* shadow backbone: a fresh copy of the base architecture.

    Attributes:
        num_layers: Decoder layers in the shadow backbone (``num_shadow_layers``, default 1).
        intermediate_size: MLP width override (``None`` keeps the base's).
        num_attention_heads: Attention-head override.
        num_key_value_heads: KV-head override; must divide the attention heads.
        head_dim: Head-dimension override.
        base_layers: Initialise the shadow from these base decoder layers (in this order) plus the
            base final norm, instead of at random: a pretrained shadow that needs no second model
            (``--shadow-init base:0,1,2,3``). Needs ``num_layers == len(base_layers)`` and no shape
            override. With the injection at identity, detached logits equal the truncated base's.
    """

    num_layers: int = 1
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    base_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.base_layers, list):  # read back from JSON
            object.__setattr__(self, "base_layers", tuple(self.base_layers))

    def problems(self) -> list[str]:
        out = []
        if not _is_int(self.num_layers) or self.num_layers < 1:
            out.append(f"backbone.num_layers={self.num_layers!r}: must be an integer >= 1 (a shadow needs a layer)")
        for name in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                out.append(f"backbone.{name}={value!r}: must be None (keep the base's) or an integer >= 1")
        return out + self._base_layer_problems()

    def _base_layer_problems(self) -> list[str]:
        layers = self.base_layers
        if layers is None:
            return []
        if not isinstance(layers, tuple) or not layers or not all(_is_int(i) and i >= 0 for i in layers):
            return [f"backbone.base_layers={layers!r}: must be a non-empty list of base layer indices >= 0"]
        out = []
        if self.num_layers != len(layers):
            out.append(
                f"backbone.num_layers={self.num_layers!r} but base_layers names {len(layers)} layer(s); "
                "leave --shadow-layers at its default with --shadow-init (the layer list sets it)"
            )
        overrides = [
            name
            for name in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
            if getattr(self, name) is not None
        ]
        if overrides:
            out.append(
                f"backbone.base_layers copies base layers, whose shapes are the base's; drop the override(s) "
                f"{', '.join(overrides)}"
            )
        return out


@dataclass(frozen=True)
class InjectionConfig:
    """Low-rank injection ``h += alpha * Dropout((h - s) W_down) W_up`` (the method notes, section 3, step 4)."""

    rank: int = 16
    alpha: float = 0.1
    dropout: float = 0.2
    init_std: float = 0.02

    def problems(self) -> list[str]:
        out = []
        if not _is_int(self.rank) or self.rank < 1:
            out.append(f"injection.rank={self.rank!r}: must be an integer >= 1")
        if not _is_real(self.alpha) or math.isnan(self.alpha) or self.alpha < 0 or math.isinf(self.alpha):
            out.append(f"injection.alpha={self.alpha!r}: must be a finite number >= 0")
        out += _dropout_problems("injection.dropout", self.dropout)
        if not _is_real(self.init_std) or not (self.init_std >= 0) or math.isinf(self.init_std):
            out.append(f"injection.init_std={self.init_std!r}: must be a finite number >= 0")
        return out


@dataclass(frozen=True)
class UpdateConfig:
    """Gated update ``s += sigmoid(G(u)) * (T(u) - s)``, ``u = LayerNorm(h)``; G, T are d -> g -> d MLPs."""

    gate_width: int = 10
    dropout: float = 0.2

    def problems(self) -> list[str]:
        out = []
        if not _is_int(self.gate_width) or self.gate_width < 2:
            out.append(f"update.gate_width={self.gate_width!r}: must be an integer >= 2")
        return out + _dropout_problems("update.dropout", self.dropout)


@dataclass(frozen=True)
class DistillConfig:
    """Distil the attached model's next-token (or class) distribution into the detached head.

    The auxiliary term becomes ``lambda * (CE_shadow + weight * T^2 * KL(p_attached^T || p_detached^T))``
    at the supervised positions, with ``p^T = softmax(logits / T)`` and the attached side detached from
    the graph (the method notes, section 9, lever b). ``weight = 0`` (the default) is the paper's loss exactly.
    """

    weight: float = 0.0
    temperature: float = 1.0

    def problems(self) -> list[str]:
        out = []
        if not _is_real(self.weight) or not (self.weight >= 0) or math.isinf(self.weight):
            out.append(f"distill.weight={self.weight!r}: must be a finite number >= 0 (0 turns distillation off)")
        t = self.temperature
        if not _is_real(t) or not (t > 0) or math.isinf(t):
            out.append(f"distill.temperature={t!r}: must be a finite number > 0")
        return out


@dataclass(frozen=True)
class ShadowConfig:
    """Configuration of a ShadowPEFT adapter.

    Attributes:
        backbone: Implicit shadow backbone shape (ignored for an explicit shadow model).
        injection: Injection rank, scale, dropout and init.
        update: Update gate width and dropout.
        aux_loss_weight: ``lambda`` in ``CE(base) + lambda * CE(shadow)``.
        train_shadow_head: Give the shadow its own trainable copy of the LM head instead of
            aliasing the frozen base head.
        share_embeddings: For an explicit shadow, drop its embedding table and feed it the base
            embeddings (requires equal hidden sizes). Implicit shadows always share.
        distill: Distillation of the attached distribution into the detached head (off by default).
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    injection: InjectionConfig = field(default_factory=InjectionConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    aux_loss_weight: float = 0.05
    train_shadow_head: bool = False
    share_embeddings: bool = False
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        problems = self.backbone.problems() + self.injection.problems() + self.update.problems()
        problems += self.distill.problems()
        w = self.aux_loss_weight
        if not _is_real(w) or not (w >= 0) or math.isinf(w):
            problems.append(f"aux_loss_weight={w!r}: must be a finite number >= 0")
        elif w == 0 and _is_real(self.distill.weight) and self.distill.weight > 0:
            problems.append(
                f"distill.weight={self.distill.weight!r} with aux_loss_weight=0: the distillation term is scaled "
                "by lambda, so it would do nothing; set --aux-weight above 0 or drop --distill"
            )
        for name in ("train_shadow_head", "share_embeddings"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r}: must be true or false")
        _raise_if(problems, "Invalid ShadowConfig")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShadowConfig:
        """Build from a nested dict (as written by :meth:`to_dict`); unknown keys are an error."""
        nested = {
            "backbone": BackboneConfig,
            "injection": InjectionConfig,
            "update": UpdateConfig,
            "distill": DistillConfig,
        }
        _check_keys("ShadowConfig", data, {f.name for f in fields(cls)})
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in nested:
                if not isinstance(value, dict):
                    raise ShadowConfigError(f"ShadowConfig.{key} must be a mapping, got {value!r}.")
                _check_keys(f"ShadowConfig.{key}", value, {f.name for f in fields(nested[key])})
                kwargs[key] = nested[key](**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> ShadowConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_published(cls, data: dict[str, Any]) -> ShadowConfig:
        """Map the flat ``shadow_config.json`` of the published ``shadow-peft`` package onto this config."""
        p = data.get("dropout", 0.2)
        return cls(
            backbone=BackboneConfig(
                num_layers=data.get("num_shadow_layers", 1),
                intermediate_size=data.get("shadow_intermediate_size"),
                num_attention_heads=data.get("shadow_num_attention_heads"),
                num_key_value_heads=data.get("shadow_num_key_value_heads"),
                head_dim=data.get("shadow_head_dim"),
            ),
            injection=InjectionConfig(
                rank=data.get("injection_hidden_size", 16), alpha=data.get("alpha", 0.1), dropout=p
            ),
            update=UpdateConfig(gate_width=data.get("gate_hidden_size", 10), dropout=p),
            train_shadow_head="shadow_lm_head" in (data.get("modules_to_save") or []),
        )

    def check_against(self, base_config: Any, *, implicit: bool) -> None:
        """Check the parts of this config that depend on the base model's config.

        Raises:
            ShadowConfigError: listing every problem (layer count, head-dim divisibility).
        """
        problems = []
        n = getattr(base_config, "num_hidden_layers", None)
        if n is None or n < 2:
            problems.append(
                f"base model has {n!r} decoder layers: ShadowPEFT injects before layers 1..L-1, so it needs "
                "a base with at least 2 decoder layers"
            )
        layers = self.backbone.base_layers
        if layers is not None and not implicit:
            problems.append(
                "backbone.base_layers (--shadow-init base:...) builds the shadow from base layers, but an explicit "
                "shadow model was given; drop one of the two"
            )
        elif layers is not None and n is not None:
            bad = [i for i in layers if i >= n]
            if bad:
                problems.append(
                    f"backbone.base_layers={list(layers)!r}: layer(s) {bad} out of range; the base has {n} decoder "
                    f"layers (indices 0..{n - 1}). Pick indices below {n} with --shadow-init base:..., or use "
                    "--recipe paper (a random shadow)"
                )
        if implicit:
            problems += self._head_problems(base_config)
        _raise_if(problems, "ShadowConfig does not fit this base model")

    def _head_problems(self, base_config: Any) -> list[str]:
        b = self.backbone
        heads = b.num_attention_heads or getattr(base_config, "num_attention_heads", None)
        base_kv = getattr(base_config, "num_key_value_heads", None)
        kv = b.num_key_value_heads or (base_kv if b.num_attention_heads is None else None) or heads
        d = getattr(base_config, "hidden_size", None)
        out = []
        if heads and kv and heads % kv:
            out.append(
                f"backbone.num_key_value_heads={kv!r} does not divide num_attention_heads={heads!r}; "
                "pick a KV-head count that divides the attention heads"
            )
        explicit_hd = b.head_dim or getattr(base_config, "head_dim", None)
        derived_hd = getattr(base_config, "head_dim", None) is None and b.head_dim is None
        if derived_hd and heads and d and d % heads:
            out.append(
                f"backbone.num_attention_heads={heads!r} does not divide hidden_size={d!r} and no head_dim is "
                "set; set backbone.head_dim or choose a head count that divides the hidden size"
            )
        if explicit_hd is not None and explicit_hd % 2:
            out.append(f"backbone.head_dim={explicit_hd!r}: rotary embeddings need an even head dimension")
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _dropout_problems(name: str, p: Any) -> list[str]:
    if not _is_real(p) or not (0 <= p < 1):
        return [f"{name}={p!r}: must be a probability in [0, 1)"]
    return []


def _check_keys(where: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ShadowConfigError(f"{where} has unknown key(s) {unknown}; allowed: {sorted(allowed)}.")


def _raise_if(problems: list[str], title: str) -> None:
    if problems:
        raise ShadowConfigError(f"{title}:\n" + "\n".join(f"  - {p}" for p in problems))

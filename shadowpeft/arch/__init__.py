"""Registry ``model_type -> ArchSpec``. Add a family: a module here, then register its spec."""

from __future__ import annotations

from typing import Any

from shadowpeft.arch.base import ArchSpec, LayerContext, default_position_ids
from shadowpeft.arch.gpt2 import GPT2
from shadowpeft.arch.llama import LLAMA, MISTRAL
from shadowpeft.errors import UnsupportedArchitectureError

REGISTRY: dict[str, ArchSpec] = {t: spec for spec in (LLAMA, MISTRAL, GPT2) for t in spec.model_types}

__all__ = ["REGISTRY", "ArchSpec", "LayerContext", "default_position_ids", "spec_for"]


def spec_for(config: Any) -> ArchSpec:
    """The ArchSpec for a HF config.

    Raises:
        UnsupportedArchitectureError: naming the model_type and the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    spec = REGISTRY.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"Unsupported model_type {model_type!r}. Supported: {', '.join(sorted(REGISTRY))} "
            "(see shadowpeft/arch/ to add one)."
        )
    return spec

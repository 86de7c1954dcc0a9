"""Registry ``model_type -> ArchSpec``: everything about a family of base models lives here.

Add a family: one module ``shadowpeft/arch/<model_type>.py`` that defines ``SPECS``, a tuple of the
:class:`ArchSpec` objects it contributes (see ``llama.py``; ``gpt2.py`` for a family that overrides
methods). The registry imports every module of this package and collects them, so nothing else
changes; then add a tiny config for it to ``tests/conftest.py`` (``ARCH_CONFIGS``) and run
``pytest -k <model_type>``. No module outside this package branches on ``model_type``
(``tests/test_arch_registry.py`` checks it).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from shadowpeft.arch.base import (
    ArchSpec,
    AttentionDims,
    AttentionTargets,
    LayerContext,
    additive_mask,
    default_position_ids,
)
from shadowpeft.errors import UnsupportedArchitectureError

__all__ = [
    "REGISTRY",
    "ArchSpec",
    "AttentionDims",
    "AttentionTargets",
    "LayerContext",
    "additive_mask",
    "default_position_ids",
    "spec_for",
]


def _collect() -> dict[str, ArchSpec]:
    """``model_type -> ArchSpec`` from the ``SPECS`` of every module of this package."""
    registry: dict[str, ArchSpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda module: module.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for spec in getattr(module, "SPECS", ()):
            for model_type in spec.model_types:
                if model_type in registry:
                    raise RuntimeError(f"model_type {model_type!r} is registered twice (second in {module.__name__})")
                registry[model_type] = spec
    return registry


REGISTRY: dict[str, ArchSpec] = _collect()


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

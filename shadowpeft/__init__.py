"""ShadowPEFT: a small trainable shadow network beside a frozen LLM.

The torch parts are imported lazily so that ``import shadowpeft.runtime`` (torch-free) does not
load torch through this package's ``__init__``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "ShadowConfig": "shadowpeft.config",
    "BackboneConfig": "shadowpeft.config",
    "InjectionConfig": "shadowpeft.config",
    "UpdateConfig": "shadowpeft.config",
    "DistillConfig": "shadowpeft.config",
    "ShadowConfigError": "shadowpeft.errors",
    "CheckpointError": "shadowpeft.errors",
    "ShadowModel": "shadowpeft.model",
    "ShadowForCausalLM": "shadowpeft.heads",
    "ShadowForSequenceClassification": "shadowpeft.heads",
    "get_shadow_model": "shadowpeft.heads",
    "ShadowCache": "shadowpeft.cache",
    "save_shadow": "shadowpeft.checkpoint.store",
    "load_shadow": "shadowpeft.checkpoint.store",
    "count_parameters": "shadowpeft.params",
    "expected_parameter_counts": "shadowpeft.params",
    "ParameterCounts": "shadowpeft.params",
    "pinv_projection_init": "shadowpeft.backbone",
    "greedy_decode": "shadowpeft.reference_decode",
}

__all__ = [
    "__version__",
    "ShadowConfig",
    "BackboneConfig",
    "InjectionConfig",
    "UpdateConfig",
    "DistillConfig",
    "ShadowConfigError",
    "CheckpointError",
    "ShadowModel",
    "ShadowForCausalLM",
    "ShadowForSequenceClassification",
    "get_shadow_model",
    "ShadowCache",
    "save_shadow",
    "load_shadow",
    "count_parameters",
    "expected_parameter_counts",
    "ParameterCounts",
    "pinv_projection_init",
    "greedy_decode",
]

if TYPE_CHECKING:  # pragma: no cover
    from shadowpeft.backbone import pinv_projection_init
    from shadowpeft.cache import ShadowCache
    from shadowpeft.checkpoint.store import load_shadow, save_shadow
    from shadowpeft.config import BackboneConfig, DistillConfig, InjectionConfig, ShadowConfig, UpdateConfig
    from shadowpeft.errors import CheckpointError, ShadowConfigError
    from shadowpeft.heads import ShadowForCausalLM, ShadowForSequenceClassification, get_shadow_model
    from shadowpeft.model import ShadowModel
    from shadowpeft.params import ParameterCounts, count_parameters, expected_parameter_counts
    from shadowpeft.reference_decode import greedy_decode


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shadowpeft' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

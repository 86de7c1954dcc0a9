"""Training recipes: named sets of the detached-quality levers (the method notes, section 9).

A recipe fixes five levers; every lever is also a ``shadowpeft train`` option that overrides the
recipe's value, and the resolved levers are recorded in the checkpoint's ``training.json``:

=====================  ========================================  =========================
lever                  what it changes                           option
=====================  ========================================  =========================
aux_loss_weight        lambda in ``CE_base + lambda * aux``      ``--aux-weight``
shadow_lr_multiplier   the shadow backbone's learning rate       ``--shadow-lr-mult``
distill_weight, _temp  ``aux = CE_shadow + w T^2 KL(att||det)``  ``--distill``, ``--distill-temperature``
shadow_init            random, or copies of base layers + norm   ``--shadow-init base:0,1,2,3``
refine_fraction        last steps: detached-only refinement      ``--refine-fraction``
=====================  ========================================  =========================

``paper`` is the method's defaults (checkpoints from before recipes existed read as ``paper``);
``edge`` is the combination that measured best for detached use (``benchmarks/detached.py``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, replace
from typing import Any

from shadowpeft.config import DistillConfig, ShadowConfig
from shadowpeft.errors import ShadowConfigError
from shadowpeft.train.trainer import TrainSettings

RANDOM_INIT = "random"
_BASE_INIT = re.compile(r"base:(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)")


def parse_shadow_init(text: str) -> tuple[int, ...] | None:
    """``random`` -> None; ``base:0,1,2,3`` or ``base:0-3`` -> ``(0, 1, 2, 3)``.

    Raises:
        ShadowConfigError: anything else, or a descending range.
    """
    if text == RANDOM_INIT:
        return None
    match = _BASE_INIT.fullmatch(text.replace(" ", "")) if isinstance(text, str) else None
    if match is None:
        raise ShadowConfigError(
            f"shadow init {text!r} is not understood; use 'random' or 'base:' with base layer indices, e.g. "
            "'base:0,1,2,3' or 'base:0-3'."
        )
    layers: list[int] = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if last < first:
            raise ShadowConfigError(f"shadow init {text!r}: range {part!r} runs backwards; write it low-high.")
        layers += range(first, last + 1)
    return tuple(layers)


@dataclass(frozen=True)
class Levers:
    """The detached-quality levers of one run.

    Attributes:
        aux_loss_weight: lambda (the method notes, section 4).
        shadow_lr_multiplier: Shadow-backbone learning rate as a multiple of the run's.
        distill_weight: Weight of the distillation KL inside the auxiliary term (0: off).
        distill_temperature: Softening temperature of that KL.
        shadow_init: ``random`` or ``base:I,J,...`` (ranges ``I-J`` allowed): copy those base layers.
        refine_fraction: Fraction of the steps spent on a detached refinement at the end.
    """

    aux_loss_weight: float = 0.05
    shadow_lr_multiplier: float = 1.0
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    shadow_init: str = RANDOM_INIT
    refine_fraction: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.refine_fraction < 1:
            problems.append(f"refine_fraction={self.refine_fraction!r}: must be in [0, 1)")
        try:
            parse_shadow_init(self.shadow_init)
        except ShadowConfigError as err:
            problems.append(str(err))
        if problems:
            raise ShadowConfigError("Invalid levers: " + "; ".join(problems))

    @property
    def base_layers(self) -> tuple[int, ...] | None:
        return parse_shadow_init(self.shadow_init)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Recipe:
    """A named set of levers and why it exists."""

    name: str
    levers: Levers
    summary: str


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        "paper", Levers(), "the method's defaults (the method notes, sections 2-4): lambda 0.05, random shadow"
    ),
    # Chosen by the probes in benchmarks/results/detached_probe.jsonl (sentiment as label generation):
    # depth and a lower shadow learning rate moved detached accuracy; distillation did not.
    "edge": Recipe(
        "edge",
        Levers(aux_loss_weight=1.0, shadow_lr_multiplier=0.2, shadow_init="base:0-7"),
        "for detached use: shadow copied from base layers 0-7, lambda 1, shadow learning rate x0.2",
    ),
}
DEFAULT_RECIPE = "edge"


def resolve_levers(recipe: str, overrides: dict[str, Any]) -> Levers:
    """The recipe's levers with ``overrides`` (lever name -> value; ``None`` values are ignored).

    Raises:
        ShadowConfigError: an unknown recipe or lever, or an invalid value.
    """
    if recipe not in RECIPES:
        raise ShadowConfigError(
            f"Unknown recipe {recipe!r}. Known: {', '.join(RECIPES)} (see shadowpeft/train/recipes.py)."
        )
    given = {key: value for key, value in overrides.items() if value is not None}
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(Levers)})
    if unknown:
        raise ShadowConfigError(f"Unknown lever(s) {unknown}; known: {[f.name for f in dataclasses.fields(Levers)]}.")
    return replace(RECIPES[recipe].levers, **given)


def apply_levers(levers: Levers, config: ShadowConfig, settings: TrainSettings) -> tuple[ShadowConfig, TrainSettings]:
    """The adapter config and training settings that carry ``levers`` (other fields unchanged).

    A base-layer init sets the shadow's layer count to the number of copied layers; the config then
    refuses shape overrides (a copied layer has the base's shapes).
    """
    layers = levers.base_layers
    num_layers = config.backbone.num_layers if layers is None else len(layers)
    config = replace(
        config,
        backbone=replace(config.backbone, num_layers=num_layers, base_layers=layers),
        aux_loss_weight=levers.aux_loss_weight,
        distill=DistillConfig(weight=levers.distill_weight, temperature=levers.distill_temperature),
    )
    settings = replace(
        settings,
        shadow_lr_multiplier=levers.shadow_lr_multiplier,
        refine_steps=round(levers.refine_fraction * settings.max_steps),
    )
    return config, settings

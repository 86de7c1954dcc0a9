"""LoRA and DoRA baselines on the attention projections, at a budget matched to a shadow.

The paper compares ShadowPEFT with LoRA and DoRA on q, k, v, o at (about) the same number of
trainable parameters (METHOD.md section 5). This module builds those baselines with ``peft`` on the
same HF base models the shadow wraps, predicts their size, and picks the LoRA rank whose size is
closest to a given budget::

    shadow = expected_parameter_counts(base.config, ShadowConfig()).total
    match = matched_lora_rank(base.config, shadow, dora=True)     # RankMatch(rank, params, target, gap)
    model = build_baseline(base, "dora", rank=match.rank)         # peft.PeftModel, base frozen

Parameter count of one adapted ``Linear(n_in -> n_out)`` at rank ``r``: LoRA ``r * (n_in + n_out)``
(``A`` is ``r x n_in``, ``B`` is ``n_out x r``, no bias); DoRA adds a magnitude vector of ``n_out``.
Summed over q, k, v, o of ``L`` layers this is ``L * r * ((d+q) + 2(d+k) + (q+d))`` with
``q = heads * hd`` and ``k = kv_heads * hd``, plus ``L * (q + 2k + d)`` for DoRA. GPT-2 computes
q, k and v with one fused ``Conv1D(d -> 3d)`` (``c_attn``) sharing one ``A``, so its count is
``L * r * ((d + 3d) + (d + d))`` (+ ``L * 4d`` for DoRA).

Sequence classification: the ``score`` head is trained too (``modules_to_save``: peft keeps the
frozen original and trains a copy). The shadow side trains its heads as well, so compare like with
like: :func:`baseline_parameter_counts` reports the adapter and the head separately, and
:func:`lora_parameter_count` counts the adapter only.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from shadowpeft.arch import REGISTRY, AttentionTargets, spec_for
from shadowpeft.errors import BaselineError
from shadowpeft.params import count_parameters

logger = logging.getLogger(__name__)

BaselineKind = Literal["lora", "dora"]
BaselineTask = Literal["causal-lm", "sequence-classification"]
KINDS: tuple[str, ...] = ("lora", "dora")
TASKS: tuple[str, ...] = ("causal-lm", "sequence-classification")
# Name of the classification head on every supported *ForSequenceClassification model.
HEAD_MODULE = "score"
# peft marks the trainable copy of a modules_to_save module with this path segment.
_HEAD_COPY_SEGMENT = ".modules_to_save."


# model_type -> the attention projections its baselines adapt (each family's ArchSpec.lora_targets).
ATTENTION_TARGETS: dict[str, AttentionTargets] = {
    model_type: spec.lora_targets for model_type, spec in REGISTRY.items() if spec.lora_targets is not None
}


@dataclass(frozen=True)
class RankMatch:
    """The LoRA/DoRA rank whose trainable-parameter count is closest to a budget.

    Attributes:
        rank: The chosen rank (>= 1; the smaller one on a tie).
        params: Adapter parameters at that rank (heads excluded).
        target: The budget asked for.
        relative_gap: ``(params - target) / target``: positive when the baseline is larger.
    """

    rank: int
    params: int
    target: int
    relative_gap: float


@dataclass(frozen=True)
class BaselineParameterCounts:
    """Trainable parameters of a built baseline, by part.

    Attributes:
        adapter: LoRA ``A``/``B`` matrices (and DoRA magnitude vectors).
        head: The trained copy of the classification head (0 for causal LM).
    """

    adapter: int
    head: int

    @property
    def total(self) -> int:
        return self.adapter + self.head


def attention_targets(base_config: Any) -> AttentionTargets:
    """The :class:`AttentionTargets` of a HF config.

    Raises:
        BaselineError: The model_type has no ArchSpec with ``lora_targets`` (:data:`ATTENTION_TARGETS`).
    """
    model_type = getattr(base_config, "model_type", None)
    targets = ATTENTION_TARGETS.get(model_type)
    if targets is None:
        raise BaselineError(
            f"Unsupported model_type {model_type!r} for LoRA/DoRA baselines. Supported: "
            f"{', '.join(sorted(ATTENTION_TARGETS))} (give its ArchSpec lora_targets in shadowpeft/arch/)."
        )
    return targets


def lora_parameter_count(base_config: Any, rank: int, *, dora: bool = False) -> int:
    """Trainable adapter parameters of LoRA (or DoRA) at ``rank`` on every layer's q, k, v, o.

    Args:
        base_config: HF config of the base model.
        rank: LoRA rank, >= 1.
        dora: Count DoRA's magnitude vectors too.

    Returns:
        ``L * r * ((d+q) + 2(d+k) + (q+d))`` (+ ``L * (q + 2k + d)`` for DoRA); GPT-2 from its fused
        layout. Classification heads are not included.

    Raises:
        BaselineError: Unsupported model_type, or rank not an integer >= 1.
    """
    if not _is_int(rank) or rank < 1:
        raise BaselineError(f"rank={rank!r}: must be an integer >= 1 (LoRA rank)")
    per_rank, fixed = _linear_budget(base_config, dora=dora)
    return per_rank * rank + fixed


def matched_lora_rank(base_config: Any, target_params: int, *, dora: bool = False, max_rank: int = 512) -> RankMatch:
    """The rank in ``1..max_rank`` whose adapter count is closest to ``target_params``.

    Args:
        base_config: HF config of the base model.
        target_params: The budget, e.g. ``expected_parameter_counts(base.config, shadow_config).total``.
        dora: Match DoRA instead of LoRA.
        max_rank: Largest rank considered.

    Returns:
        The :class:`RankMatch`; on a tie the smaller rank. A budget outside what ranks ``1..max_rank``
        can reach gives the nearest end of the range and a logged warning.

    Raises:
        BaselineError: Unsupported model_type, or target_params / max_rank not an integer >= 1.
    """
    problems = [
        f"{name}={value!r}: must be an integer >= 1"
        for name, value in (("target_params", target_params), ("max_rank", max_rank))
        if not _is_int(value) or value < 1
    ]
    if problems:
        raise BaselineError("; ".join(problems))
    per_rank, fixed = _linear_budget(base_config, dora=dora)
    # The count is linear in the rank, so only the two ranks around the exact solution can be closest.
    below = min(max(1, (target_params - fixed) // per_rank), max_rank)
    candidates = {below, min(below + 1, max_rank)}
    rank = min(candidates, key=lambda r: (abs(per_rank * r + fixed - target_params), r))
    params = per_rank * rank + fixed
    # An unclamped best rank is always within half a rank of the target; farther means the range cut it off.
    if 2 * abs(params - target_params) > per_rank:
        logger.warning(
            "%d params is out of reach of ranks 1..%d for %s on %s: using rank %d (%d params)",
            target_params,
            max_rank,
            "DoRA" if dora else "LoRA",
            base_config.model_type,
            rank,
            params,
        )
    return RankMatch(
        rank=rank, params=params, target=target_params, relative_gap=(params - target_params) / target_params
    )


def build_baseline(
    base: nn.Module,
    kind: BaselineKind,
    *,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.05,
    task: BaselineTask = "causal-lm",
) -> PeftModel:
    """Wrap ``base`` with LoRA or DoRA on the attention projections of every layer.

    peft replaces the projections of ``base`` in place and freezes everything else, so build each
    baseline on a freshly loaded base.

    Args:
        base: A supported HF ``*ForCausalLM`` or ``*ForSequenceClassification`` model.
        kind: ``"lora"`` or ``"dora"`` (``LoraConfig(use_dora=True)``).
        rank: LoRA rank, >= 1 (see :func:`matched_lora_rank`).
        alpha: LoRA scaling numerator (update scaled by ``alpha / rank``); default ``2 * rank``.
        dropout: Dropout on the LoRA input, in ``[0, 1)``.
        task: ``"causal-lm"``, or ``"sequence-classification"``, which also trains the ``score`` head.

    Returns:
        The ``peft.PeftModel``; trainable: adapters, and for classification a copy of the head
        (:func:`baseline_parameter_counts` reports the two separately).

    Raises:
        BaselineError: Listing every invalid argument, an unsupported architecture, or a task that
            does not fit ``base``.
    """
    targets = attention_targets(base.config)
    problems = _build_problems(base, kind, rank=rank, alpha=alpha, dropout=dropout, task=task)
    if problems:
        raise BaselineError("Invalid baseline: " + "; ".join(problems))
    config = _lora_config(targets, kind, rank=rank, alpha=alpha, dropout=dropout, task=task)
    with warnings.catch_warnings():
        # peft 0.21.2 probes `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
        # FutureWarning on every wrap; nothing the caller can change.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(base, config)
    _check_adapted(model, base.config, targets)
    counts = baseline_parameter_counts(model)
    logger.info(
        "%s r=%d on %s: %d adapter + %d head trainable", kind, rank, targets.pattern, counts.adapter, counts.head
    )
    return model


def count_trainable(model: nn.Module) -> int:
    """Trainable parameters of ``model`` (tied or shared parameters count once)."""
    return count_parameters(model)[0]


def baseline_parameter_counts(model: nn.Module) -> BaselineParameterCounts:
    """Trainable parameters of a :func:`build_baseline` model, split into adapter and head."""
    adapter = head = 0
    for name, p in model.named_parameters():  # named_parameters yields a shared parameter once
        if not p.requires_grad:
            continue
        if _HEAD_COPY_SEGMENT in name:
            head += p.numel()
        else:
            adapter += p.numel()
    return BaselineParameterCounts(adapter=adapter, head=head)


def _linear_budget(base_config: Any, *, dora: bool) -> tuple[int, int]:
    """``(per_rank, fixed)`` with adapter count ``per_rank * r + fixed`` over all layers."""
    shapes = _projection_shapes(base_config)
    layers = base_config.num_hidden_layers
    per_rank = layers * sum(n_in + n_out for n_in, n_out in shapes)
    fixed = layers * sum(n_out for _, n_out in shapes) if dora else 0
    return per_rank, fixed


def _projection_shapes(base_config: Any) -> tuple[tuple[int, int], ...]:
    """``(in, out)`` of each adapted projection in one layer, in :class:`AttentionTargets` order."""
    targets = attention_targets(base_config)
    dims = spec_for(base_config).attention_dims(base_config)
    return targets.projection_shapes(base_config.hidden_size, dims)


def _lora_config(
    targets: AttentionTargets,
    kind: BaselineKind,
    *,
    rank: int,
    alpha: float | None,
    dropout: float,
    task: BaselineTask,
) -> LoraConfig:
    """The peft config of a checked :func:`build_baseline` request."""
    classify = task == "sequence-classification"
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=targets.pattern,
        fan_in_fan_out=targets.fan_in_fan_out,
        use_dora=kind == "dora",
        bias="none",
        task_type=TaskType.SEQ_CLS if classify else TaskType.CAUSAL_LM,
        # peft's SEQ_CLS also appends "classifier" and "score" itself; naming the head keeps it explicit.
        modules_to_save=[HEAD_MODULE] if classify else None,
    )


def _build_problems(
    base: nn.Module, kind: object, *, rank: object, alpha: object, dropout: object, task: object
) -> list[str]:
    """Every problem with the arguments of :func:`build_baseline`, as messages."""
    out = []
    if kind not in KINDS:
        out.append(f"kind={kind!r}: must be one of {', '.join(KINDS)}")
    if not _is_int(rank) or rank < 1:
        out.append(f"rank={rank!r}: must be an integer >= 1")
    if alpha is not None and (not _is_number(alpha) or alpha <= 0):
        out.append(f"alpha={alpha!r}: must be None (2 * rank) or a number > 0")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        out.append(f"dropout={dropout!r}: must be a number in [0, 1)")
    has_head = isinstance(getattr(base, HEAD_MODULE, None), nn.Module)
    name = type(base).__name__
    if task not in TASKS:
        out.append(f"task={task!r}: must be one of {', '.join(TASKS)}")
    elif task == "sequence-classification" and not has_head:
        out.append(
            f"task='sequence-classification' needs a *ForSequenceClassification base with a "
            f"{HEAD_MODULE!r} head; got {name}"
        )
    elif task == "causal-lm" and has_head:
        out.append(
            f"task='causal-lm' but {name} is a sequence classifier: pass task='sequence-classification' "
            "so its head is trained"
        )
    return out


def _check_adapted(model: PeftModel, base_config: Any, targets: AttentionTargets) -> None:
    """Every layer got exactly its listed projections adapted (guards against renamed modules)."""
    adapted = sum(isinstance(m, LoraLayer) for m in model.modules())
    expected = base_config.num_hidden_layers * len(targets.projections)
    if adapted != expected:
        raise BaselineError(
            f"{adapted} modules matched {targets.pattern!r} on {base_config.model_type!r}, expected {expected} "
            f"({base_config.num_hidden_layers} layers x {len(targets.projections)}); the module names of this "
            "model differ from its ArchSpec's lora_targets in shadowpeft/arch/."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

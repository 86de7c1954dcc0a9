"""Task models on top of ShadowModel: causal LM (with HF ``generate``) and sequence classification."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from shadowpeft.cache import ShadowCache
from shadowpeft.config import ShadowConfig
from shadowpeft.errors import ShadowConfigError
from shadowpeft.losses import (
    auxiliary_loss,
    combined_loss,
    distillation_loss,
    labelled_cross_entropy,
    labelled_states,
    shifted_cross_entropy,
)
from shadowpeft.model import MODES, Mode, ShadowModel, ShadowStates


@dataclass
class ShadowCausalLMOutput(ModelOutput):
    """``logits`` are the base's in attached mode and the shadow's in detached mode."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    shadow_logits: Tensor | None = None
    past_key_values: ShadowCache | None = None
    base_loss: Tensor | None = None
    shadow_loss: Tensor | None = None
    shadow_states: Tensor | None = None
    distill_loss: Tensor | None = None


@dataclass
class ShadowSequenceClassifierOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    shadow_logits: Tensor | None = None
    base_loss: Tensor | None = None
    shadow_loss: Tensor | None = None
    distill_loss: Tensor | None = None


class ShadowForCausalLM(ShadowModel, GenerationMixin):
    """Causal LM with base logits ``lm_head(norm(h))`` and shadow logits ``shadow_head(s0)``.

    The shadow head aliases the frozen base ``lm_head`` (no copy) unless
    ``config.train_shadow_head``, in which case ``shadow_lm_head`` is a trainable copy.
    ``generate()`` works in both modes: pass ``mode="detached"`` or set :attr:`inference_mode`.
    """

    main_input_name = "input_ids"
    _is_stateful = False

    def __init__(self, base: PreTrainedModel, config: ShadowConfig, shadow_model: nn.Module | None = None) -> None:
        super().__init__(base, config, shadow_model)
        head = self.spec.output_head(base)
        if head is None:
            raise ShadowConfigError(f"{type(base).__name__} has no LM head; wrap a *ForCausalLM model.")
        self.shadow_lm_head: nn.Module | None = None
        if config.train_shadow_head:
            self.shadow_lm_head = copy.deepcopy(head)  # its own storage, even when the base head is tied
            self.shadow_lm_head.requires_grad_(True)
        self.inference_mode: Mode = "attached"
        self.config = base.config
        self.generation_config = getattr(base, "generation_config", None) or GenerationConfig.from_model_config(
            base.config
        )

    @property
    def shadow_head(self) -> nn.Module:
        return self.shadow_lm_head if self.shadow_lm_head is not None else self.spec.output_head(self.base)

    # What GenerationMixin asks of a PreTrainedModel: we bring our own cache and slice logits.
    @classmethod
    def can_generate(cls) -> bool:
        return True

    @classmethod
    def is_remote_code(cls) -> bool:
        return False

    def _supports_default_dynamic_cache(self) -> bool:
        return False

    def _supports_logits_to_keep(self) -> bool:
        return True

    def get_experts_implementation(self) -> dict[str, str | None]:
        return self.base.get_experts_implementation()

    def set_experts_implementation(self, implementation: str | dict) -> None:
        self.base.set_experts_implementation(implementation)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: ShadowCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        mode: Mode | None = None,
        return_shadow_logits: bool = False,
        **hf_flags: object,
    ) -> ShadowCausalLMOutput:
        """One forward. ``labels`` gives ``loss = CE_base + lambda * CE_shadow`` (attached) or ``CE_shadow``.

        ``logits_to_keep=k > 0`` computes logits for the last ``k`` positions only (``generate`` uses 1).
        In training mode with ``labels`` the heads run only at positions that take a loss (see
        :func:`~shadowpeft.losses.labelled_cross_entropy`) and ``logits``/``shadow_logits`` are
        ``None``; call in eval mode, or without labels, for logits.
        """
        check_hf_flags(hf_flags)
        mode = mode or self.inference_mode
        use_cache = bool(use_cache) if use_cache is not None else past_key_values is not None
        if past_key_values is not None and not isinstance(past_key_values, ShadowCache):
            raise TypeError(f"past_key_values must be a ShadowCache (model.new_cache()), got {type(past_key_values)}")
        out = self.run(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,
            use_cache=use_cache,
            mode=mode,
        )
        if labels is not None and logits_to_keep:
            raise ValueError("labels need logits for every position; leave logits_to_keep=0 when training.")
        if labels is not None and self.training:
            teacher = None
            if mode == "detached" and self.distilling:
                teacher = self.teacher_states(input_ids, attention_mask, position_ids)
            return self._training_loss(out, labels, mode, teacher)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        want_shadow = labels is not None or return_shadow_logits or mode == "detached"
        shadow_logits = self.shadow_head(out.s0[:, keep]) if want_shadow else None
        if mode == "detached":
            logits = shadow_logits
        else:
            logits = self.spec.output_head(self.base)(out.hidden[:, keep])
        result = ShadowCausalLMOutput(
            logits=logits, shadow_logits=shadow_logits, past_key_values=out.cache, shadow_states=out.s0
        )
        if labels is not None:
            result.shadow_loss = shifted_cross_entropy(shadow_logits, labels)
            if mode == "detached":
                result.loss = result.shadow_loss
            else:
                result.base_loss = shifted_cross_entropy(logits, labels)
                result.loss = combined_loss(result.base_loss, result.shadow_loss, self.shadow_config.aux_loss_weight)
        return result

    def _training_loss(
        self, out: ShadowStates, labels: Tensor, mode: Mode, teacher: Tensor | None = None
    ) -> ShadowCausalLMOutput:
        """The loss of :meth:`forward` with each head run only where a label is taken; no logits.

        With distillation on, the detached head also learns the attached next-token distribution at
        the same positions: from this forward's base hidden (attached), or from ``teacher``, the
        attached hidden computed without gradient (detached refinement).
        """
        if self.distilling:
            return self._distilled_loss(out, labels, mode, teacher)
        result = ShadowCausalLMOutput(past_key_values=out.cache, shadow_states=out.s0)
        result.shadow_loss = labelled_cross_entropy(self.shadow_head, out.s0, labels)
        if mode == "detached":
            result.loss = result.shadow_loss
            return result
        result.base_loss = labelled_cross_entropy(self.spec.output_head(self.base), out.hidden, labels)
        result.loss = combined_loss(result.base_loss, result.shadow_loss, self.shadow_config.aux_loss_weight)
        return result

    def _distilled_loss(
        self, out: ShadowStates, labels: Tensor, mode: Mode, teacher: Tensor | None
    ) -> ShadowCausalLMOutput:
        """``CE_base + lambda * (CE_shadow + w * T^2 KL)`` attached; ``CE_shadow + w * T^2 KL`` detached."""
        distill = self.shadow_config.distill
        result = ShadowCausalLMOutput(past_key_values=out.cache, shadow_states=out.s0)
        rows, targets = labelled_states(out.s0, labels)  # (N, d), (N,)
        student = self.shadow_head(rows)  # (N, V)
        result.shadow_loss = F.cross_entropy(student.float(), targets)
        hidden = out.hidden if mode == "attached" else teacher
        if hidden is None:
            raise ValueError("detached training with distillation needs the attached hidden state as teacher")
        base_logits = self.spec.output_head(self.base)(labelled_states(hidden, labels)[0])  # (N, V)
        result.distill_loss = distillation_loss(student, base_logits, distill.temperature)
        aux = auxiliary_loss(result.shadow_loss, result.distill_loss, distill_weight=distill.weight)
        if mode == "detached":
            result.loss = aux
            return result
        result.base_loss = F.cross_entropy(base_logits.float(), targets)
        result.loss = combined_loss(result.base_loss, aux, self.shadow_config.aux_loss_weight)
        return result

    def generate(self, *args: object, mode: Mode | None = None, **kwargs: object) -> Tensor:
        """HF ``generate`` with exact KV caching of base and shadow. ``mode`` overrides :attr:`inference_mode`."""
        mode = mode or self.inference_mode
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}.")
        if kwargs.get("use_cache", True) and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = self.new_cache()
        return super().generate(*args, mode=mode, **kwargs)


class ShadowForSequenceClassification(ShadowModel):
    """Sequence classification: the base's ``score`` head on the final hidden state and a shadow
    classifier (initialised as a copy of it) on ``s0``, both pooled at the last real token and
    both trainable. Pooling reads ``attention_mask``, so left and right padding both work.
    """

    def __init__(self, base: PreTrainedModel, config: ShadowConfig, shadow_model: nn.Module | None = None) -> None:
        super().__init__(base, config, shadow_model)
        head = getattr(base, "score", None)
        if not isinstance(head, nn.Module):
            raise ShadowConfigError(f"{type(base).__name__} has no `score` head; wrap a *ForSequenceClassification.")
        head.requires_grad_(True)
        self.shadow_classifier_head = copy.deepcopy(head)
        self.shadow_classifier_head.requires_grad_(True)
        self.inference_mode: Mode = "attached"
        self.config = base.config

    @property
    def classifier_head(self) -> nn.Module:
        return self.base.score

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        mode: Mode | None = None,
        **hf_flags: object,
    ) -> ShadowSequenceClassifierOutput:
        """Class logits pooled at the last real token; ``labels`` (B,) give ``CE_base + lambda * CE_shadow``."""
        check_hf_flags(hf_flags)
        mode = mode or self.inference_mode
        out = self.run(input_ids, attention_mask=attention_mask, position_ids=position_ids, mode=mode)
        last = last_token_index(input_ids, attention_mask)  # (B,)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        shadow_logits = self.shadow_classifier_head(out.s0[rows, last])
        logits = shadow_logits if mode == "detached" else self.classifier_head(out.hidden[rows, last])
        result = ShadowSequenceClassifierOutput(logits=logits, shadow_logits=shadow_logits)
        if labels is None:
            return result
        result.shadow_loss = F.cross_entropy(shadow_logits.float(), labels)
        aux = result.shadow_loss
        if self.training and self.distilling:
            if mode == "detached":
                teacher = self.teacher_states(input_ids, attention_mask, position_ids)[rows, last]
                teacher_logits = self.classifier_head(teacher).detach()
            else:
                teacher_logits = logits
            distill = self.shadow_config.distill
            result.distill_loss = distillation_loss(shadow_logits, teacher_logits, distill.temperature)
            aux = auxiliary_loss(aux, result.distill_loss, distill_weight=distill.weight)
        if mode == "detached":
            result.loss = aux
        else:
            result.base_loss = F.cross_entropy(logits.float(), labels)
            result.loss = combined_loss(result.base_loss, aux, self.shadow_config.aux_loss_weight)
        return result


# Flags HF callers (generate, Trainer) pass that change nothing here when left at these values.
_NEUTRAL_HF_FLAGS = {
    "return_dict": (True, None),
    "output_attentions": (False, None),
    "output_hidden_states": (False, None),
    "num_items_in_batch": None,
}


def check_hf_flags(flags: dict[str, object]) -> None:
    """Refuse keyword arguments this model would otherwise silently ignore."""
    bad = {
        k: v
        for k, v in flags.items()
        if k not in _NEUTRAL_HF_FLAGS or (_NEUTRAL_HF_FLAGS[k] is not None and v not in _NEUTRAL_HF_FLAGS[k])
    }
    if bad:
        raise TypeError(
            f"Unsupported forward argument(s) {bad!r}; ShadowPEFT models take input_ids, attention_mask, "
            "position_ids, past_key_values, labels, use_cache, logits_to_keep and mode."
        )


def last_token_index(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Index of the last real token per row, for left or right padding: (B,)."""
    if attention_mask is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(dim=-1)


def get_shadow_model(
    base: PreTrainedModel, config: ShadowConfig | None = None, shadow_model: nn.Module | None = None
) -> ShadowModel:
    """Wrap ``base`` with a ShadowPEFT adapter; the task model is chosen from the base's head.

    Args:
        base: ``XForCausalLM`` or ``XForSequenceClassification`` of a registered family. Frozen in place.
        config: Adapter configuration (defaults: the method notes, section 2).
        shadow_model: Optional explicit shadow model (implicit random copy when ``None``).

    Returns:
        :class:`ShadowForCausalLM` or :class:`ShadowForSequenceClassification`.
    """
    config = config or ShadowConfig()
    if isinstance(getattr(base, "score", None), nn.Module):
        return ShadowForSequenceClassification(base, config, shadow_model)
    return ShadowForCausalLM(base, config, shadow_model)

"""Losses and parameter freezing for training a shadow adapter."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def shifted_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token CE: position t predicts ``labels[t+1]``; mean over labels != -100.

    Args:
        logits: (B, T, V).
        labels: (B, T), ``-100`` where no loss is taken (padding, prompt tokens in SFT).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def labelled_states(states: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The (N, d) states whose next label is taken and those N labels (next-token shift, -100 dropped)."""
    next_labels = labels[:, 1:].to(states.device)  # (B, T-1)
    taken = next_labels != IGNORE_INDEX  # (B, T-1)
    return states[:, :-1][taken], next_labels[taken]


def labelled_cross_entropy(head: nn.Module, states: Tensor, labels: Tensor) -> Tensor:
    """``shifted_cross_entropy(head(states), labels)`` with the head run only where a loss is taken.

    Same value and gradients (up to float summation order), without the (B, T, V) logits: the head
    sees the N positions whose next label is not -100. With a 49k vocabulary the two heads over every
    position are about a third of an SFT step's FLOPs on SmolLM2 (estimated), and SFT masks the prompt.

    Args:
        head: Maps (N, d) states to (N, V) logits (the base ``lm_head`` or the shadow head).
        states: (B, T, d) states whose logits predict the next token.
        labels: (B, T), ``-100`` where no loss is taken.
    """
    rows, targets = labelled_states(states, labels)
    return F.cross_entropy(head(rows).float(), targets)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over rows; no gradient to the teacher.

    Args:
        student_logits: (N, V) detached-head logits (next-token or class logits).
        teacher_logits: (N, V) attached logits at the same rows; detached from the graph here.
        temperature: Softening ``T`` > 0; the ``T^2`` factor keeps gradient scale comparable across ``T``.
    """
    t = float(temperature)
    teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)  # (N, V)
    student = F.log_softmax(student_logits.float() / t, dim=-1)  # (N, V)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum") / max(student.shape[0], 1)
    return kl * (t * t)


def auxiliary_loss(shadow_ce: Tensor, kl: Tensor | None, *, distill_weight: float) -> Tensor:
    """The detached path's term before lambda: ``CE_shadow`` (paper) or ``CE_shadow + weight * KL``."""
    return shadow_ce if kl is None else shadow_ce + distill_weight * kl


def combined_loss(base: Tensor, shadow: Tensor, weight: float) -> Tensor:
    """``CE_base + lambda * CE_shadow`` (the method notes, section 4)."""
    return base + weight * shadow


def mark_only_shadow_trainable(model: nn.Module, *, extra: tuple[str, ...] = ()) -> None:
    """``requires_grad`` on every parameter under a top-level ``shadow_*`` module (plus ``extra`` prefixes)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("shadow_") or name.startswith(extra))

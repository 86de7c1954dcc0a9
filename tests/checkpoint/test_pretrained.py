"""peft-style API: ``model.save_pretrained(dir)`` and ``ShadowModel.from_pretrained(base, dir)`` over our format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shadowpeft import (
    CheckpointError,
    ShadowForCausalLM,
    ShadowForSequenceClassification,
    ShadowModel,
    get_shadow_model,
)
from shadowpeft.checkpoint.store import load_shadow, save_shadow
from tests.conftest import no_dropout_config, padded_batch, perturb, tiny_base

CLS = "sequence-classification"


def _trained(task: str = "causal-lm", *, seed: int = 0, **config: object) -> ShadowModel:
    """A tiny qwen3 whose adapter is off its identity init (and, for classification, a moved score head)."""
    model = perturb(get_shadow_model(tiny_base("qwen3", task=task, seed=seed), no_dropout_config(**config)))
    if task == CLS:
        with torch.no_grad():
            model.classifier_head.weight.add_(0.1)
    return model.eval()


@torch.no_grad()
def _outputs(model: ShadowModel, task: str = "causal-lm") -> tuple[torch.Tensor, ...]:
    ids, mask = padded_batch((9, 5))
    extra = {} if task == CLS else {"return_shadow_logits": True}
    out = model(ids, attention_mask=mask, **extra)
    detached = model(ids, attention_mask=mask, mode="detached").logits
    return out.logits, out.shadow_logits, detached


def _assert_same_outputs(a: ShadowModel, b: ShadowModel, task: str = "causal-lm") -> None:
    for x, y in zip(_outputs(a, task), _outputs(b, task), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    ("task", "cls", "head"),
    [("causal-lm", ShadowForCausalLM, True), (CLS, ShadowForSequenceClassification, False)],
    ids=["causal-lm", "classification"],
)
def test_save_pretrained_then_from_pretrained_gives_identical_outputs(
    task: str, cls: type, head: bool, tmp_path: Path
) -> None:
    model = _trained(task, train_shadow_head=head)
    assert model.save_pretrained(tmp_path / "adapter") == tmp_path / "adapter"
    # The generic entry point picks the task class from the checkpoint, like PeftModel.from_pretrained.
    loaded = ShadowModel.from_pretrained(tiny_base("qwen3", task=task), tmp_path / "adapter")
    assert type(loaded) is cls
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    _assert_same_outputs(model, loaded, task)
    same = cls.from_pretrained(tiny_base("qwen3", task=task), str(tmp_path / "adapter"), is_trainable=True)
    assert same.training and any(p.requires_grad for p in same.parameters())
    _assert_same_outputs(model, same.eval(), task)


def test_save_pretrained_writes_what_save_shadow_writes(tmp_path: Path) -> None:
    model = _trained(train_shadow_head=True)
    model.save_pretrained(tmp_path / "pretrained")
    save_shadow(model, tmp_path / "shadow")
    files = {p.name: p.read_bytes() for p in (tmp_path / "pretrained").iterdir()}
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "shadow").iterdir()}
    # Each folder loads through the other API.
    _assert_same_outputs(model, load_shadow(tiny_base("qwen3"), tmp_path / "pretrained"))
    _assert_same_outputs(model, ShadowForCausalLM.from_pretrained(tiny_base("qwen3"), tmp_path / "shadow"))


def test_from_pretrained_refuses_the_wrong_base(tmp_path: Path) -> None:
    _trained().save_pretrained(tmp_path / "adapter", base_ref="tiny/qwen3-seed0")
    with pytest.raises(CheckpointError) as info:
        ShadowModel.from_pretrained(tiny_base("qwen3", seed=1), tmp_path / "adapter")
    message = str(info.value)
    assert "trained on base 'tiny/qwen3-seed0'" in message
    assert "differs in: embedding weights, output head weights" in message
    with pytest.raises(CheckpointError, match="causal-lm adapter but the base you passed is a sequence-class"):
        ShadowModel.from_pretrained(tiny_base("qwen3", task=CLS), tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="plain base model"):
        ShadowModel.from_pretrained(_trained(), tmp_path / "adapter")


def test_from_pretrained_on_a_task_class_checks_the_task(tmp_path: Path) -> None:
    _trained().save_pretrained(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match=r"holds a ShadowForCausalLM adapter, not a ShadowForSequenceClass"):
        ShadowForSequenceClassification.from_pretrained(tiny_base("qwen3"), tmp_path / "adapter")


def test_save_pretrained_refuses_pickle_and_keeps_existing_checkpoints(tmp_path: Path) -> None:
    model = _trained()
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert not (tmp_path / "adapter").exists()
    model.save_pretrained(tmp_path / "adapter")
    other = _trained(seed=0, train_shadow_head=True)
    with pytest.raises(CheckpointError, match="pass overwrite=True"):
        other.save_pretrained(tmp_path / "adapter")
    other.save_pretrained(tmp_path / "adapter", overwrite=True)
    _assert_same_outputs(other, ShadowModel.from_pretrained(tiny_base("qwen3"), tmp_path / "adapter"))

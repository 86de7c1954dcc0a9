"""Detached-quality levers (the method notes, section 9) and the recipes that combine them, on tiny models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from shadowpeft import ShadowConfig, get_shadow_model
from shadowpeft.config import BackboneConfig, DistillConfig
from shadowpeft.errors import ShadowConfigError
from shadowpeft.losses import combined_loss, distillation_loss, labelled_cross_entropy, shifted_cross_entropy
from shadowpeft.train.recipes import RECIPES, Levers, apply_levers, parse_shadow_init, resolve_levers
from shadowpeft.train.trainer import ShadowTrainer, TrainSettings, detached_training, training_arguments
from tests.conftest import ARCHS, no_dropout_config, perturb, tiny_base


def test_distillation_loss_equals_a_hand_computed_kl():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]])
    for t in (1.0, 2.0):
        expected = 0.0
        for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
            p = [math.exp(v / t) for v in t_row]
            q = [math.exp(v / t) for v in s_row]
            p = [v / sum(p) for v in p]
            q = [v / sum(q) for v in q]
            expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        expected = expected / 2 * t * t
        assert distillation_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_sends_no_gradient_to_the_teacher():
    student = torch.randn(4, 7, requires_grad=True)
    teacher = torch.randn(4, 7, requires_grad=True)
    distillation_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that takes no loss
    return labels


def test_paper_recipe_is_todays_config_and_loss():
    config, settings = apply_levers(RECIPES["paper"].levers, ShadowConfig(), TrainSettings())
    assert config == ShadowConfig() and settings == TrainSettings()
    torch.manual_seed(0)
    model = perturb(get_shadow_model(tiny_base("llama"), no_dropout_config())).train()
    ids = torch.randint(3, 128, (2, 9))
    out = model(ids, labels=_labels(ids))
    assert out.distill_loss is None
    model.eval()  # the same loss from full logits: the paper's formula, computed the long way
    full = model(ids, return_shadow_logits=True)
    reference = combined_loss(
        shifted_cross_entropy(full.logits, _labels(ids)), shifted_cross_entropy(full.shadow_logits, _labels(ids)), 0.05
    )
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["attached", "detached"])
def test_distilled_loss_adds_the_weighted_kl_to_the_auxiliary_term(mode):
    torch.manual_seed(0)
    config = no_dropout_config(aux_loss_weight=0.5, distill=DistillConfig(weight=2.0, temperature=3.0))
    model = perturb(get_shadow_model(tiny_base("llama"), config)).train()
    ids = torch.randint(3, 128, (2, 9))
    labels = _labels(ids)
    out = model(ids, labels=labels, mode=mode)
    model.eval()
    full = model(ids, return_shadow_logits=True)  # attached logits and shadow logits at every position
    rows = labels[:, 1:] != -100
    kl = distillation_loss(full.shadow_logits[:, :-1][rows], full.logits[:, :-1][rows], 3.0)
    shadow_ce = shifted_cross_entropy(full.shadow_logits, labels)
    aux = shadow_ce + 2.0 * kl
    expected = aux if mode == "detached" else shifted_cross_entropy(full.logits, labels) + 0.5 * aux
    assert out.distill_loss.item() == pytest.approx(kl.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_reaches_only_the_shadow_when_detached():
    torch.manual_seed(0)
    config = no_dropout_config(aux_loss_weight=1.0, distill=DistillConfig(weight=1.0))
    model = perturb(get_shadow_model(tiny_base("llama"), config)).train()
    ids = torch.randint(3, 128, (2, 9))
    model(ids, labels=_labels(ids), mode="detached").loss.backward()
    assert all(p.grad is None for p in model.shadow_injection_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.shadow_model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_base_layer_init_copies_exactly_the_chosen_layers(arch):
    base = tiny_base(arch)
    config = ShadowConfig(backbone=BackboneConfig(num_layers=2, base_layers=(2, 0)))
    model = get_shadow_model(base, config)
    spec = model.spec
    base_layers, shadow_layers = spec.layers(model.base_backbone), spec.layers(model.shadow_model)
    for j, i in enumerate((2, 0)):
        for (name, a), (_, b) in zip(
            shadow_layers[j].state_dict().items(), base_layers[i].state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), (j, name)
    assert (
        torch.equal(spec.final_norm(model.shadow_model).weight, spec.final_norm(model.base_backbone).weight)
        and spec.final_norm(model.shadow_model).weight is not spec.final_norm(model.base_backbone).weight
    )
    # A random shadow differs from the base layer it would replace.
    random_model = get_shadow_model(tiny_base(arch), ShadowConfig())
    fresh = spec.layers(random_model.shadow_model)[0].state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in base_layers[0].state_dict().items())


@pytest.mark.parametrize("arch", ARCHS)
def test_base_layer_init_detached_logits_equal_the_truncated_base(arch):
    base = tiny_base(arch)
    model = get_shadow_model(base, ShadowConfig(backbone=BackboneConfig(num_layers=2, base_layers=(0, 1)))).eval()
    truncated_config = copy.deepcopy(base.config)
    model.spec.shrink_config(truncated_config, num_layers=2)
    truncated = AutoModelForCausalLM.from_config(truncated_config).eval()
    truncated.load_state_dict(base.state_dict(), strict=False)  # layers 0 and 1, embeddings, norm, head
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        expected = truncated(ids).logits
        got = model(ids, mode="detached").logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_parse_shadow_init():
    assert parse_shadow_init("random") is None
    assert parse_shadow_init("base:0,1,2,3") == (0, 1, 2, 3)
    assert parse_shadow_init("base:0-2,5") == (0, 1, 2, 5)
    for bad in ("base:", "base:3-1", "layers:0", "base:a"):
        with pytest.raises(ShadowConfigError):
            parse_shadow_init(bad)


def test_levers_and_recipes_refuse_bad_values_clearly():
    with pytest.raises(ShadowConfigError, match="Unknown recipe 'fast'"):
        resolve_levers("fast", {})
    with pytest.raises(ShadowConfigError, match="out of range; the base has 3 decoder layers"):
        get_shadow_model(tiny_base("llama"), ShadowConfig(backbone=BackboneConfig(num_layers=1, base_layers=(3,))))
    with pytest.raises(ShadowConfigError, match="explicit shadow model was given"):
        get_shadow_model(
            tiny_base("llama"),
            ShadowConfig(backbone=BackboneConfig(num_layers=1, base_layers=(0,))),
            shadow_model=tiny_base("llama", seed=1),
        )
    with pytest.raises(ShadowConfigError, match="aux_loss_weight=0"):
        ShadowConfig(aux_loss_weight=0.0, distill=DistillConfig(weight=1.0))
    with pytest.raises(ShadowConfigError, match="drop the override"):
        ShadowConfig(backbone=BackboneConfig(num_layers=1, base_layers=(0,), intermediate_size=16))


def test_apply_levers_sets_config_and_settings():
    levers = Levers(aux_loss_weight=1.0, distill_weight=0.5, shadow_init="base:0-1", refine_fraction=0.25)
    config, settings = apply_levers(levers, ShadowConfig(), TrainSettings(max_steps=40))
    assert config.backbone.base_layers == (0, 1) and config.backbone.num_layers == 2
    assert config.aux_loss_weight == 1.0 and config.distill == DistillConfig(0.5, 1.0)
    assert settings.refine_steps == 10 and settings.attached_steps == 30
    assert ShadowConfig.from_dict(config.to_dict()) == config  # the base layer list survives JSON


def test_shadow_lr_multiplier_gives_the_backbone_its_own_rate(tmp_path):
    model = get_shadow_model(tiny_base("llama"), ShadowConfig())
    settings = TrainSettings(max_steps=2, learning_rate=1e-2, shadow_lr_multiplier=0.1)
    trainer = ShadowTrainer(model=model, args=training_arguments(settings, tmp_path, has_eval=False))
    trainer.shadow_lr_multiplier = 0.1
    optimizer = trainer.create_optimizer()
    backbone = {id(p) for p in model.shadow_model.parameters()}
    rates = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            rates[id(p)] = group["lr"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(rates) == len(trainable)
    assert sorted({rates[i] for i in backbone}) == [pytest.approx(1e-3)]
    assert sorted({rates[id(p)] for p in trainable if id(p) not in backbone}) == [pytest.approx(1e-2)]


def test_detached_training_freezes_injections_updates_and_restores_them():
    model = get_shadow_model(tiny_base("llama", task="sequence-classification"), ShadowConfig())
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    with detached_training(model):
        assert model.inference_mode == "detached"
        assert not any(p.requires_grad for p in model.shadow_injection_model.parameters())
        assert not any(p.requires_grad for p in model.shadow_update_model.parameters())
        assert not any(p.requires_grad for p in model.classifier_head.parameters())
        assert all(p.requires_grad for p in model.shadow_model.parameters())
        assert all(p.requires_grad for p in model.shadow_classifier_head.parameters())
    assert model.inference_mode == "attached"
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before


def test_training_settings_refuse_a_refinement_without_attached_steps():
    with pytest.raises(ShadowConfigError, match="refine_steps=10"):
        TrainSettings(max_steps=10, refine_steps=10)
    with pytest.raises(ShadowConfigError, match="shadow_lr_multiplier"):
        TrainSettings(shadow_lr_multiplier=0.0)


def test_paper_recipe_loss_and_gradients_are_todays_bit_for_bit():
    """The paper recipe runs the loss as it was before recipes: CE of each head at the labelled positions."""
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 9))
    labels = _labels(ids)
    model = perturb(get_shadow_model(tiny_base("llama"), no_dropout_config())).train()
    config, _ = apply_levers(RECIPES["paper"].levers, no_dropout_config(), TrainSettings())
    twin = perturb(get_shadow_model(tiny_base("llama"), config)).train()
    loss = model(ids, labels=labels).loss
    loss.backward()
    states = twin.run(ids)  # the formula written out, as the code computed it before the levers existed
    reference = combined_loss(
        labelled_cross_entropy(twin.base.get_output_embeddings(), states.hidden, labels),
        labelled_cross_entropy(twin.shadow_head, states.s0, labels),
        0.05,
    )
    reference.backward()
    assert torch.equal(loss, reference)
    grads = [
        (n, p.grad, q.grad) for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True)
    ]
    assert any(g is not None for _, g, _ in grads)
    for name, a, b in grads:
        assert (a is None and b is None) or torch.equal(a, b), name

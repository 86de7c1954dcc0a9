"""ShadowModel and its task heads: identity at init, the method's math, modes, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shadowpeft import ShadowConfig, get_shadow_model
from shadowpeft.config import BackboneConfig
from shadowpeft.heads import ShadowForCausalLM, ShadowForSequenceClassification
from shadowpeft.losses import shifted_cross_entropy
from tests.conftest import ARCHS, no_dropout_config, padded_batch, perturb, tiny_base


@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification"])
def test_identity_at_init(arch, task):
    base = tiny_base(arch, task=task)
    ids, mask = padded_batch(side="right" if task != "causal-lm" else "left")
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
        got = get_shadow_model(base, no_dropout_config()).eval()(ids, attention_mask=mask).logits
    # For classification HF pools at the last non-pad id and we at the last mask==1 token: the same token here.
    assert torch.equal(got, expected)


def test_perturbed_adapter_changes_base_logits(perturbed):
    ids, mask = padded_batch()
    with torch.no_grad():
        wrapped = perturbed(ids, attention_mask=mask).logits
        plain = perturbed.base(input_ids=ids, attention_mask=mask).logits
    assert (wrapped - plain).abs().max() > 1e-3


def test_injection_matches_formula():
    model = perturb(get_shadow_model(tiny_base("llama"), no_dropout_config()))
    inj = model.shadow_injection_model
    h, s = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    expected = h + 0.1 * ((h - s) @ inj.injection_downs[1]) @ inj.injection_ups[1]
    torch.testing.assert_close(inj(h, s, 1), expected)


def test_update_matches_formula():
    model = perturb(get_shadow_model(tiny_base("llama"), no_dropout_config()))
    upd = model.shadow_update_model
    h, s = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    u = F.layer_norm(h, (64,), upd.hidden_norm.weight, upd.hidden_norm.bias)
    g0, g2 = upd.update_gates[0][0].weight, upd.update_gates[0][2].weight
    t0, t3 = upd.update_transforms[0][0].weight, upd.update_transforms[0][3].weight
    gamma = torch.sigmoid(F.silu(u @ g0.T) @ g2.T)
    t = F.silu(u @ t0.T) @ t3.T
    torch.testing.assert_close(upd(h, s, 0), s + gamma * (t - s))


def test_initialisation():
    model = get_shadow_model(tiny_base("qwen3"), ShadowConfig())
    inj, upd = model.shadow_injection_model, model.shadow_update_model
    assert inj.injection_downs.shape == (2, 64, 16) and inj.injection_ups.shape == (2, 16, 64)
    assert torch.count_nonzero(inj.injection_ups) == 0
    assert 0.015 < inj.injection_downs.std().item() < 0.025
    assert torch.equal(upd.hidden_norm.weight, torch.ones(64)) and torch.equal(upd.hidden_norm.bias, torch.zeros(64))
    assert len(upd.update_gates) == len(upd.update_transforms) == 2
    assert all(m.bias is None for m in upd.modules() if isinstance(m, torch.nn.Linear))


def test_schedule_skips_layer_zero_and_last_update(monkeypatch):
    """Injection runs before layers 1..L-1; updates after layers 1..L-2 (the last has no reader)."""
    model = perturb(get_shadow_model(tiny_base("llama"), no_dropout_config())).eval()
    calls = {"inject": [], "update": []}
    inj_forward, upd_forward = type(model.shadow_injection_model).forward, type(model.shadow_update_model).forward
    monkeypatch.setattr(
        type(model.shadow_injection_model),
        "forward",
        lambda self, h, s, j: calls["inject"].append(j) or inj_forward(self, h, s, j),
    )
    monkeypatch.setattr(
        type(model.shadow_update_model),
        "forward",
        lambda self, h, s, j: calls["update"].append(j) or upd_forward(self, h, s, j),
    )
    model(torch.tensor([[5, 6, 7]]))
    assert calls == {"inject": [0, 1], "update": [0]}


def test_detached_does_not_run_base_layers(perturbed, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a base decoder layer ran in detached mode")

    for layer in perturbed.spec.layers(perturbed.base_backbone):
        monkeypatch.setattr(layer, "forward", boom)
    out = perturbed(torch.tensor([[5, 6, 7]]), mode="detached")
    assert out.logits.shape == (1, 3, 128)
    torch.testing.assert_close(out.logits, perturbed.shadow_head(out.shadow_states))


def test_forward_leaves_no_state_on_modules(perturbed):
    before = {name: set(vars(m)) for name, m in perturbed.named_modules()}
    perturbed(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]]))
    after = {name: set(vars(m)) for name, m in perturbed.named_modules()}
    assert before == after


def test_shadow_head_aliases_base_head_unless_trained():
    model = get_shadow_model(tiny_base("llama"), ShadowConfig())
    assert model.shadow_head is model.base.get_output_embeddings() and model.shadow_lm_head is None
    trained = get_shadow_model(tiny_base("llama"), ShadowConfig(train_shadow_head=True))
    assert trained.shadow_head is trained.shadow_lm_head
    assert trained.shadow_lm_head.weight.data_ptr() != trained.base.lm_head.weight.data_ptr()
    assert trained.shadow_lm_head.weight.requires_grad


def test_loss_is_base_plus_lambda_shadow(perturbed):
    ids, mask = padded_batch(side="right")
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a masked prompt
    out = perturbed(ids, attention_mask=mask, labels=labels)
    base_ce = shifted_cross_entropy(out.logits, labels)
    shadow_ce = shifted_cross_entropy(out.shadow_logits, labels)
    torch.testing.assert_close(out.loss, base_ce + 0.05 * shadow_ce)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(base_ce, manual)
    torch.testing.assert_close(out.shadow_logits, perturbed.shadow_head(out.shadow_states))
    detached = perturbed(ids, attention_mask=mask, labels=labels, mode="detached")
    torch.testing.assert_close(detached.loss, shadow_ce)


@pytest.mark.parametrize("train_shadow_head", [False, True])
@pytest.mark.parametrize("mode", ["attached", "detached"])
def test_training_loss_runs_the_heads_only_where_labels_are_taken(mode, train_shadow_head):
    """Training mode skips the (B, T, V) logits: same loss and gradients as the eval-mode full path."""
    model = perturb(get_shadow_model(tiny_base("qwen3"), no_dropout_config(train_shadow_head=train_shadow_head)))
    ids, mask = padded_batch(side="right")
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a masked prompt
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(training):
        model.train(training)
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels, mode=mode)
        out.loss.backward()
        return out, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trainable]

    rows = []
    hooks = [
        head.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[:-1]))
        for head in {model.shadow_head, model.base.lm_head}
    ]
    full, full_grads = loss_and_grads(False)
    assert full.logits is not None and rows and all(r == ids.shape for r in rows)
    rows.clear()
    fast, fast_grads = loss_and_grads(True)
    for hook in hooks:
        hook.remove()
    taken = int((labels[:, 1:] != -100).sum())
    assert rows == [(taken,)] * (1 if mode == "detached" else 2)
    assert fast.logits is None and fast.shadow_logits is None
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.shadow_loss, full.shadow_loss, rtol=1e-6, atol=1e-6)
    assert sum(g.abs().sum() for g in fast_grads) > 0
    for got, expected in zip(fast_grads, full_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_gradients_reach_only_shadow_parameters(arch):
    model = perturb(get_shadow_model(tiny_base(arch), no_dropout_config())).train()
    base_before = {n: p.detach().clone() for n, p in model.base.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = padded_batch(side="right")
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("shadow_"):
            assert p.requires_grad, name
        else:
            assert not p.requires_grad and p.grad is None, name
    reached = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(n.startswith("shadow_injection_model") for n in reached)
    assert any(n.startswith("shadow_update_model") for n in reached)
    assert any(n.startswith("shadow_model") for n in reached)
    opt.step()
    for name, p in model.base.named_parameters():
        assert torch.equal(p, base_before[name]), name


def test_dropout_only_in_training():
    model = perturb(get_shadow_model(tiny_base("llama"), ShadowConfig()))
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    torch.manual_seed(0)
    a = model(ids).logits
    torch.manual_seed(1)
    assert not torch.equal(a, model(ids).logits)


@pytest.mark.parametrize("arch_name", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_classification_pooling_at_last_real_token(arch_name, side):
    model = perturb(get_shadow_model(tiny_base(arch_name, task="sequence-classification"), no_dropout_config()))
    assert isinstance(model, ShadowForSequenceClassification)
    model.eval()
    ids, mask = padded_batch(side=side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=positions)
    assert out.logits.shape == out.shadow_logits.shape == (2, 3)
    # Row 1 is padded: its logits must equal those of the same tokens run alone, unpadded.
    alone = model(ids[1:][mask[1:] == 1].unsqueeze(0))
    torch.testing.assert_close(out.shadow_logits[1], alone.shadow_logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[1], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_classification_heads_trainable_and_loss():
    model = perturb(get_shadow_model(tiny_base("qwen3", task="sequence-classification"), no_dropout_config()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base.score.weight" in trainable and "shadow_classifier_head.weight" in trainable
    ids, mask = padded_batch(side="right")
    labels = torch.tensor([0, 2])
    out = model(ids, attention_mask=mask, labels=labels)
    expected = F.cross_entropy(out.logits, labels) + 0.05 * F.cross_entropy(out.shadow_logits, labels)
    torch.testing.assert_close(out.loss, expected)


def test_explicit_shadow_with_projection_and_own_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    small = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
        )
    )
    model = get_shadow_model(tiny_base("llama"), no_dropout_config(), shadow_model=small)
    assert isinstance(model, ShadowForCausalLM) and model.explicit
    assert isinstance(model.shadow_hidden_projection, torch.nn.Linear)
    assert model.shadow_hidden_projection.weight.shape == (64, 32)
    assert model.shadow_model.embed_tokens is not None  # keeps its own table by default
    out = model(torch.tensor([[5, 6, 7]]), return_shadow_logits=True)
    assert out.shadow_states.shape == (1, 3, 64) and out.shadow_logits.shape == (1, 3, 128)


def test_explicit_shadow_sharing_embeddings_needs_equal_width():
    from transformers import LlamaConfig, LlamaForCausalLM

    from shadowpeft import ShadowConfigError

    small = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
        )
    )
    with pytest.raises(ShadowConfigError, match=r"share_embeddings=True needs the shadow's hidden size \(32\)"):
        get_shadow_model(tiny_base("llama"), ShadowConfig(share_embeddings=True), shadow_model=small)
    same = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        )
    )
    model = get_shadow_model(tiny_base("llama"), ShadowConfig(share_embeddings=True), shadow_model=same)
    assert model.shadow_model.embed_tokens is None and isinstance(model.shadow_hidden_projection, torch.nn.Identity)


def test_pinv_projection_init_recovers_exact_map():
    from shadowpeft import pinv_projection_init

    torch.manual_seed(0)
    w_big = torch.randn(128, 64)
    a = torch.randn(64, 32)
    p = pinv_projection_init(w_big, w_big @ a)
    torch.testing.assert_close(p, a, atol=1e-4, rtol=1e-4)
    # Least squares: no other P does better on a random target.
    target = torch.randn(128, 32)
    best = torch.linalg.norm(w_big @ pinv_projection_init(w_big, target) - target)
    assert best <= torch.linalg.norm(w_big @ (a * 0.9) - target)


def test_implicit_shadow_shape_overrides():
    config = ShadowConfig(
        backbone=BackboneConfig(
            num_layers=2, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=8
        )
    )
    model = get_shadow_model(tiny_base("qwen3"), config)
    sc = model.shadow_model.config
    assert (
        sc.num_hidden_layers,
        sc.intermediate_size,
        sc.num_attention_heads,
        sc.num_key_value_heads,
        sc.head_dim,
    ) == (2, 32, 2, 1, 8)
    assert len(model.shadow_model.layers) == 2 and model.shadow_model.embed_tokens is None
    assert model.shadow_model.layers[0].self_attn.q_proj.weight.shape == (16, 64)

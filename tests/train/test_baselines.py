"""LoRA/DoRA baselines: the parameter formula against peft, rank matching, training, errors."""

from __future__ import annotations

import logging

import pytest
import torch

from shadowpeft import ShadowConfig, expected_parameter_counts
from shadowpeft.checkpoint.assets import load_smollm2
from shadowpeft.config import BackboneConfig, InjectionConfig, UpdateConfig
from shadowpeft.errors import BaselineError
from shadowpeft.train.baselines import (
    ATTENTION_TARGETS,
    RankMatch,
    baseline_parameter_counts,
    build_baseline,
    count_trainable,
    lora_parameter_count,
    matched_lora_rank,
)
from tests.conftest import ARCH_CONFIGS, ARCHS, qwen3_0_6b_config, tiny_base
from tests.slow.conftest import requires_smollm2

KINDS = ("lora", "dora")
TASKS = ("causal-lm", "sequence-classification")

SHADOW_CONFIGS = {
    "default": ShadowConfig(),
    "narrow-mlp": ShadowConfig(backbone=BackboneConfig(intermediate_size=16)),
    "two-layers-r4": ShadowConfig(backbone=BackboneConfig(num_layers=2), injection=InjectionConfig(rank=4)),
    "wide-gate": ShadowConfig(backbone=BackboneConfig(intermediate_size=32), update=UpdateConfig(gate_width=24)),
}


def _head_params(base: torch.nn.Module) -> int:
    return sum(p.numel() for p in base.score.parameters())


def test_every_registered_arch_has_targets():
    assert set(ATTENTION_TARGETS) == set(ARCHS)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_formula_equals_peft_trainable_count(arch, kind, task):
    for rank in (1, 4, 7):
        base = tiny_base(arch, task=task)
        head = _head_params(base) if task == "sequence-classification" else 0
        model = build_baseline(base, kind, rank=rank, task=task)
        expected = lora_parameter_count(base.config, rank, dora=kind == "dora")
        assert count_trainable(model) - head == expected
        assert baseline_parameter_counts(model).adapter == expected
        assert baseline_parameter_counts(model).head == head


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_formula_by_hand(arch):
    """The method notes, section 5 on the tiny configs: d=64, q=64, k=32 (llama), GPT-2's fused c_attn (d -> 3d)."""
    config = ARCH_CONFIGS[arch]()
    d, q, k, layers, r = 64, 64, 32, 3, 5
    if arch == "llama":
        lora = layers * r * ((d + q) + 2 * (d + k) + (q + d))
        dora = lora + layers * (q + 2 * k + d)
    else:
        lora = layers * r * ((d + 3 * d) + (d + d))
        dora = lora + layers * 4 * d
    assert lora_parameter_count(config, r) == lora
    assert lora_parameter_count(config, r, dora=True) == dora


def test_gpt2_adapts_attention_c_proj_only():
    model = build_baseline(tiny_base("gpt2"), "lora", rank=2)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {f"base_model.model.transformer.h.{i}.attn.{p}" for i in range(3) for p in ("c_attn", "c_proj")}


@pytest.mark.parametrize("shadow", sorted(SHADOW_CONFIGS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_matched_rank_is_closest_by_brute_force(arch, kind, shadow):
    config = ARCH_CONFIGS[arch]()
    target = expected_parameter_counts(config, SHADOW_CONFIGS[shadow]).total
    dora = kind == "dora"
    match = matched_lora_rank(config, target, dora=dora)
    gaps = {r: abs(lora_parameter_count(config, r, dora=dora) - target) for r in range(1, 513)}
    best = min(gaps, key=lambda r: (gaps[r], r))
    assert match == RankMatch(
        rank=best,
        params=lora_parameter_count(config, best, dora=dora),
        target=target,
        relative_gap=(lora_parameter_count(config, best, dora=dora) - target) / target,
    )


def test_matched_rank_tie_takes_smaller_rank():
    config = ARCH_CONFIGS["llama"]()
    midpoint = (lora_parameter_count(config, 6) + lora_parameter_count(config, 7)) // 2
    assert lora_parameter_count(config, 6) + lora_parameter_count(config, 7) == 2 * midpoint  # exact tie
    assert matched_lora_rank(config, midpoint).rank == 6
    assert matched_lora_rank(config, midpoint + 1).rank == 7


def test_matched_rank_clamps_to_range_and_warns(caplog):
    config = ARCH_CONFIGS["llama"]()
    with caplog.at_level(logging.WARNING, logger="shadowpeft.train.baselines"):
        assert matched_lora_rank(config, 10**9, max_rank=8).rank == 8
        assert matched_lora_rank(config, 1).rank == 1
        assert matched_lora_rank(config, lora_parameter_count(config, 8) + 600, max_rank=8).rank == 8  # in reach
    assert [r.getMessage().split(" params")[0] for r in caplog.records] == ["1000000000", "1"]
    assert matched_lora_rank(config, lora_parameter_count(config, 8), max_rank=8).relative_gap == 0.0


def test_paper_budget_on_qwen3_0_6b():
    """The method notes: about 9.1M shadow parameters on Qwen3-0.6B versus LoRA/DoRA r=32 on q,k,v,o.

    Shadow (n=1, m=256, r=16, g=10): 9,073,920. LoRA r=32: 28 * 32 * 10,240 = 9,175,040 (+1.1%);
    DoRA r=32 adds 28 * 5,120 magnitudes: 9,318,400 (+2.7%). The closest ranks are LoRA 32 and DoRA 31.
    """
    config = qwen3_0_6b_config()
    shadow = ShadowConfig(backbone=BackboneConfig(num_layers=1, intermediate_size=256, num_attention_heads=16))
    target = expected_parameter_counts(config, shadow).total
    assert target == 9_073_920
    assert lora_parameter_count(config, 32) == 9_175_040
    assert lora_parameter_count(config, 32, dora=True) == 9_318_400
    for dora in (False, True):
        assert abs(lora_parameter_count(config, 32, dora=dora) / target - 1) < 0.03
    assert matched_lora_rank(config, target).rank == 32
    assert matched_lora_rank(config, target, dora=True).rank == 31


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_trains_only_adapters_and_head(arch, kind, task):
    torch.manual_seed(0)
    model = build_baseline(tiny_base(arch, task=task), kind, rank=4, task=task).train()
    ids = torch.randint(3, 128, (2, 7))
    labels = ids if task == "causal-lm" else torch.tensor([0, 2])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        trained = ".lora_" in name or ".modules_to_save." in name
        assert p.requires_grad == trained, name
        assert (p.grad is not None) == trained, name
    # B starts at zero, so its gradient is the one that must move the adapter off the identity.
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)


def test_alpha_defaults_to_twice_rank():
    model = build_baseline(tiny_base("llama"), "lora", rank=4)
    assert model.peft_config["default"].lora_alpha == 8
    assert build_baseline(tiny_base("llama"), "dora", rank=4, alpha=1.0).peft_config["default"].use_dora


def test_unsupported_model_type_is_named():
    config = ARCH_CONFIGS["llama"]()
    config.model_type = "phi"
    with pytest.raises(BaselineError, match=r"Unsupported model_type 'phi'.*Supported: gemma, gpt2, llama"):
        lora_parameter_count(config, 4)
    with pytest.raises(BaselineError, match="Unsupported model_type 'phi'"):
        matched_lora_rank(config, 1000)


@pytest.mark.parametrize("rank", [0, -3, 2.0, True])
def test_rank_below_one_is_refused(rank):
    with pytest.raises(BaselineError, match=r"rank=.*must be an integer >= 1"):
        lora_parameter_count(ARCH_CONFIGS["llama"](), rank)
    with pytest.raises(BaselineError, match=r"rank=.*must be an integer >= 1"):
        build_baseline(tiny_base("llama"), "lora", rank=rank)


@pytest.mark.parametrize("target", [0, -1, 1.5])
def test_target_below_one_is_refused(target):
    with pytest.raises(BaselineError, match=r"target_params=.*must be an integer >= 1"):
        matched_lora_rank(ARCH_CONFIGS["llama"](), target)


def test_every_bad_argument_is_listed_once():
    with pytest.raises(BaselineError) as err:
        build_baseline(tiny_base("llama"), "vera", rank=0, alpha=-1, dropout=1.0, task="qa")
    message = str(err.value)
    for part in ("kind='vera'", "rank=0", "alpha=-1", "dropout=1.0", "task='qa'"):
        assert part in message
    with pytest.raises(BaselineError, match="max_rank=0"):
        matched_lora_rank(ARCH_CONFIGS["llama"](), 100, max_rank=0)


def test_task_must_fit_the_base():
    with pytest.raises(BaselineError, match="needs a \\*ForSequenceClassification base"):
        build_baseline(tiny_base("llama"), "lora", rank=2, task="sequence-classification")
    with pytest.raises(BaselineError, match="is a sequence classifier"):
        build_baseline(tiny_base("llama", task="sequence-classification"), "lora", rank=2)


@pytest.mark.slow
@requires_smollm2
def test_matched_ranks_on_smollm2():
    """Default ShadowConfig on SmolLM2-135M: 4,744,512 trainable. Per rank 30 * 3,840 = 115,200 params.

    LoRA r=41: 4,723,200 (-0.45%); DoRA r=41: 4,769,280 (+0.52%, with 30 * 1,536 magnitudes).
    """
    base, _ = load_smollm2()  # the smollm2_fresh fixture lives in tests/slow/, out of reach here
    target = expected_parameter_counts(base.config, ShadowConfig()).total
    assert target == 4_744_512
    lora = matched_lora_rank(base.config, target)
    dora = matched_lora_rank(base.config, target, dora=True)
    assert (lora.rank, lora.params) == (41, 4_723_200)
    assert (dora.rank, dora.params) == (41, 4_769_280)
    assert count_trainable(build_baseline(base, "dora", rank=dora.rank)) == dora.params

"""`shadowpeft train --method / --recipe / levers` and `shadowpeft eval` of every method, on the toy Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from shadowpeft import ShadowConfig
from shadowpeft.cli import DEFAULT_RECIPE, RECIPE_NAMES, main
from shadowpeft.train.jobs import eval_job, train_job
from shadowpeft.train.recipes import DEFAULT_RECIPE as LIBRARY_DEFAULT
from shadowpeft.train.recipes import RECIPES, Levers
from shadowpeft.train.trainer import TrainSettings
from tests.toy import save_toy_base, write_toy_data

FAST = TrainSettings(max_steps=12, learning_rate=1e-1, logging_steps=4, max_length=32, batch_size=8)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy")
    return {"base": save_toy_base(root / "base"), **write_toy_data(root)}


def _train(toy: dict[str, Path], out: Path, *extra: str, data: str = "generation") -> tuple[int, str]:
    args = ["train", "--base", str(toy["base"]), "--data", str(toy[data]), "--out", str(out)]
    args += ["--steps", "6", "--max-length", "32", "--lr", "0.1", "--eval-examples", "8", *extra]
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def test_cli_recipe_names_match_the_library():
    assert RECIPE_NAMES == tuple(RECIPES) and DEFAULT_RECIPE == LIBRARY_DEFAULT


@pytest.mark.parametrize("method", ["lora", "dora", "detached-alone"])
@pytest.mark.parametrize("data", ["generation", "classification"])
def test_every_method_trains_and_evaluates_from_the_cli(toy, tmp_path, method, data):
    out = tmp_path / method
    code, output = _train(toy, out, "--method", method, "--recipe", "paper", data=data)
    assert code == 0, output
    record = json.loads((out / "training.json").read_text())
    assert record["method"] == method
    metrics = record["summary"]["metrics"]
    if method == "detached-alone":
        assert [m["mode"] for m in metrics] == ["detached"]
        assert (out / "shadow_config.json").is_file()
    else:
        assert [m["mode"] for m in metrics] == [None]
        assert record["lora_rank"] >= 1 and (out / "adapter_config.json").is_file()
    again = eval_job(checkpoint=out, data=None, limit=8)
    assert [(r.mode, r.value, r.examples) for r in again] == [(m["mode"], m["value"], m["examples"]) for m in metrics]


def test_lora_rank_is_matched_to_the_shadow_budget_unless_given(toy, tmp_path):
    from shadowpeft.params import expected_parameter_counts
    from shadowpeft.train.baselines import matched_lora_rank
    from shadowpeft.train.jobs import load_base

    base, _ = load_base(str(toy["base"]), kind="generation")
    config = ShadowConfig()
    expected = matched_lora_rank(base.config, expected_parameter_counts(base.config, config).total).rank
    assert _train(toy, tmp_path / "m", "--method", "lora", "--recipe", "paper")[0] == 0
    assert json.loads((tmp_path / "m" / "training.json").read_text())["lora_rank"] == expected
    assert _train(toy, tmp_path / "g", "--method", "lora", "--lora-rank", "3", "--recipe", "paper")[0] == 0
    assert json.loads((tmp_path / "g" / "training.json").read_text())["lora_rank"] == 3


def test_detached_alone_never_runs_a_base_layer(toy, tmp_path, monkeypatch):
    calls = []
    from shadowpeft import heads as tasks

    real = tasks.get_shadow_model

    def counting(base, config=None, shadow_model=None):
        model = real(base, config, shadow_model)
        for layer in model.spec.layers(model.base_backbone):
            layer.register_forward_hook(lambda *args: calls.append(1))
        return model

    monkeypatch.setattr("shadowpeft.train.jobs.get_shadow_model", counting)
    summary = train_job(
        base=str(toy["base"]),
        data=str(toy["generation"]),
        out=tmp_path / "alone",
        config=ShadowConfig(),
        settings=FAST,
        method="detached-alone",
    )
    assert summary.steps == 12 and summary.metrics[0].mode == "detached"
    assert calls == []
    # The same hook counts base layers when the method does run them.
    train_job(
        base=str(toy["base"]),
        data=str(toy["generation"]),
        out=tmp_path / "shadow",
        config=ShadowConfig(),
        settings=FAST,
    )
    assert calls


def test_detached_alone_trains_only_the_detached_architecture(toy, tmp_path):
    out = tmp_path / "alone"
    summary = train_job(
        base=str(toy["base"]),
        data=str(toy["classification"]),
        out=out,
        config=ShadowConfig(),
        settings=FAST,
        method="detached-alone",
    )
    from shadowpeft.params import expected_parameter_counts
    from shadowpeft.train.jobs import load_base

    base, _ = load_base(str(toy["base"]), kind="classification", labels=("blue", "green", "red"))
    counts = expected_parameter_counts(base.config, ShadowConfig())
    head = base.score.weight.numel()
    assert summary.trainable_params == counts.backbone + head  # no injection, update or base head


def test_recipe_and_levers_are_recorded_and_override(toy, tmp_path):
    out = tmp_path / "custom"
    code, output = _train(
        toy, out, "--recipe", "paper", "--aux-weight", "1", "--distill", "0.5", "--shadow-init", "base:0-1"
    )
    assert code == 0, output
    record = json.loads((out / "training.json").read_text())
    assert record["recipe"]["name"] == "custom"
    assert (
        record["recipe"]["levers"] == Levers(aux_loss_weight=1.0, distill_weight=0.5, shadow_init="base:0-1").to_dict()
    )
    header = json.loads((out / "shadow_config.json").read_text())["shadow"]
    assert header["backbone"]["base_layers"] == [0, 1] and header["distill"]["weight"] == 0.5
    assert _train(toy, tmp_path / "paper", "--recipe", "paper")[0] == 0
    assert json.loads((tmp_path / "paper" / "training.json").read_text())["recipe"]["name"] == "paper"


def test_records_from_before_recipes_read_as_paper_shadow_runs(toy, tmp_path):
    out = tmp_path / "old"
    assert _train(toy, out, "--recipe", "paper")[0] == 0
    record = json.loads((out / "training.json").read_text())
    for key in ("method", "recipe", "lora_rank"):
        record.pop(key)
    (out / "training.json").write_text(json.dumps(record))
    from shadowpeft.train.jobs import RunRecord

    old = RunRecord.read(out)
    assert old.method == "shadow" and old.recipe["name"] == "paper"
    assert [r.mode for r in eval_job(checkpoint=out, data=None)] == ["attached", "detached"]


def test_refinement_changes_the_shadow_but_not_the_injections(toy, tmp_path, monkeypatch):
    import contextlib

    from safetensors.torch import load_file

    from shadowpeft.train import trainer

    snapshots = []
    real = trainer.detached_training

    @contextlib.contextmanager
    def watched(model):
        snapshots.append({k: v.clone() for k, v in model.adapter_state_dict().items()})
        with real(model):
            yield

    monkeypatch.setattr(trainer, "detached_training", watched)
    out = tmp_path / "refined"
    summary = train_job(
        base=str(toy["base"]),
        data=str(toy["generation"]),
        out=out,
        config=ShadowConfig(aux_loss_weight=1.0),
        settings=TrainSettings(**{**FAST.__dict__, "refine_steps": 4}),
    )
    assert summary.steps == 12 and max(step for step, _ in summary.loss_history) > 8
    (before,) = snapshots  # taken when the refinement (the last 4 steps) started
    after = load_file(out / "shadow_model.safetensors")
    frozen = [k for k in after if k.startswith(("shadow_injection_model.", "shadow_update_model."))]
    trained = [k for k in after if k.startswith("shadow_model.")]
    assert frozen and trained
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    assert any(not torch.equal(after[k], before[k]) for k in trained)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--shadow-init", "base:0,7"], "out of range; the base has 3 decoder layers"),
        (["--shadow-init", "layers:1"], "is not understood"),
        (["--aux-weight", "0", "--distill", "1"], "aux_loss_weight=0"),
        (["--shadow-init", "base:0-1", "--shadow-layers", "3"], "drop --shadow-layers"),
        (["--method", "shadow", "--lora-rank", "4"], "--lora-rank applies to --method lora or dora"),
        (["--method", "lora", "--refine-fraction", "0.5"], "apply to ShadowPEFT"),
        (["--shadow-init", "base:0", "--init-shadow", "."], "both say where the shadow starts"),
    ],
)
def test_bad_levers_give_one_clear_error_and_write_nothing(toy, tmp_path, extra, expected):
    out = tmp_path / "out"
    code, output = _train(toy, out, "--recipe", "paper", *extra)
    assert code == 1, output
    assert output.startswith("Error: ") and expected in output and "Traceback" not in output
    assert not out.exists() and not out.with_name("out.partial").exists()


@pytest.mark.parametrize(("extra", "expected"), [(["--recipe", "fast"], "--recipe"), (["--method", "x"], "--method")])
def test_unknown_recipe_or_method_is_a_usage_error(toy, tmp_path, extra, expected):
    out = tmp_path / "out"
    code, output = _train(toy, out, *extra)
    assert code == 2 and expected in output and "Traceback" not in output
    assert not out.exists()


def test_eval_refuses_a_mode_the_method_lacks(toy, tmp_path):
    out = tmp_path / "alone"
    assert _train(toy, out, "--method", "detached-alone", "--recipe", "paper")[0] == 0
    result = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--mode", "attached"])
    assert result.exit_code == 1 and "has no attached mode" in result.output


def test_distillation_with_a_frozen_teacher_trains(toy, tmp_path):
    torch.manual_seed(0)
    summary = train_job(
        base=str(toy["base"]),
        data=str(toy["classification"]),
        out=tmp_path / "d",
        config=ShadowConfig(),
        settings=TrainSettings(**{**FAST.__dict__, "refine_steps": 4}),
        levers=Levers(aux_loss_weight=1.0, distill_weight=1.0, refine_fraction=1 / 3),
    )
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in summary.loss_history)


@pytest.mark.parametrize("data", ["generation", "classification"])
def test_training_saves_the_escalation_threshold(toy, tmp_path, data):
    from shadowpeft.train.selective import EscalationRecord

    out = tmp_path / "shadow"
    summary = train_job(base=str(toy["base"]), data=str(toy[data]), out=out, config=ShadowConfig(), settings=FAST)
    record = EscalationRecord.read(out)
    assert record is not None and record.to_dict() == summary.escalation
    accuracy = {m.mode: m.value for m in summary.metrics}
    assert record.attached_accuracy == accuracy["attached"] and record.detached_accuracy == accuracy["detached"]
    assert record.combined_accuracy >= record.attached_accuracy - 0.01 - 1e-9
    assert record.confidence == ("class-probability" if data == "classification" else "first-token-probability")


def test_eval_selective_prints_the_sweep_and_saves_the_threshold(toy, tmp_path):
    from shadowpeft.train.selective import EscalationRecord

    out = tmp_path / "shadow"
    train_job(base=str(toy["base"]), data=str(toy["classification"]), out=out, config=ShadowConfig(), settings=FAST)
    (out / "escalation.json").unlink()
    runner = CliRunner()
    kept = runner.invoke(main, ["eval", "--checkpoint", str(out), "--selective", "--no-save-threshold"])
    assert kept.exit_code == 0, kept.output
    assert "answered locally" in kept.output and "calibration error" in kept.output
    assert not (out / "escalation.json").exists()
    saved = runner.invoke(main, ["eval", "--checkpoint", str(out), "--selective", "--tolerance", "0.5"])
    assert saved.exit_code == 0, saved.output
    record = EscalationRecord.read(out)
    assert record is not None and record.tolerance == 0.5
    assert f"threshold {record.threshold:.4f}" in saved.output


def test_eval_selective_refuses_what_it_cannot_score(toy, tmp_path):
    out = tmp_path / "lora"
    assert _train(toy, out, "--method", "lora", "--recipe", "paper")[0] == 0
    runner = CliRunner()
    lora = runner.invoke(main, ["eval", "--checkpoint", str(out), "--selective"])
    assert lora.exit_code == 1 and "is a lora checkpoint" in lora.output
    mode = runner.invoke(main, ["eval", "--checkpoint", str(out), "--selective", "--mode", "detached"])
    assert mode.exit_code == 2 and "drop --mode" in mode.output

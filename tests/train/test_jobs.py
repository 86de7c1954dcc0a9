"""`shadowpeft train / pretrain-shadow / eval` on a tiny word-level Llama saved to disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from shadowpeft import ShadowConfig
from shadowpeft.checkpoint.store import load_pretrained_shadow_into, load_shadow
from shadowpeft.cli import main
from shadowpeft.train.jobs import eval_job, load_base, train_job
from shadowpeft.train.selective import EscalationRecord
from shadowpeft.train.trainer import TrainSettings
from tests.toy import save_toy_base, write_toy_data

FAST = TrainSettings(max_steps=60, learning_rate=1e-1, logging_steps=5, max_length=32, batch_size=8)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy")
    return {"base": save_toy_base(root / "base"), **write_toy_data(root)}


@pytest.mark.parametrize("kind", ["generation", "classification", "lm"])
def test_training_reduces_loss_and_the_checkpoint_reloads(toy, tmp_path, kind):
    out = tmp_path / "adapter"
    summary = train_job(base=str(toy["base"]), data=str(toy[kind]), out=out, config=ShadowConfig(), settings=FAST)
    assert summary.steps == 60
    assert summary.final_loss < 0.5 * summary.first_loss
    assert summary.trainable_params > 0 and summary.seconds_per_step > 0
    assert [m.mode for m in summary.metrics] == ["attached", "detached"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["shadow_config.json", "shadow_model.safetensors", "training.json"]
        + (["shadow_modules.safetensors"] if kind == "classification" else [])
        + ["escalation.json"]  # language modelling too: one example per predicted token
    )
    assert not out.with_name("adapter.partial").exists()
    again = eval_job(checkpoint=out, data=None, modes=("attached", "detached"))
    assert [(r.metric, r.value, r.examples) for r in again] == [
        (m.metric, m.value, m.examples) for m in summary.metrics
    ]
    record = EscalationRecord.read(out)
    assert record is not None and record.to_dict() == summary.escalation
    if kind == "lm":  # perplexity stays the metric; the threshold is chosen per token
        assert [m.metric for m in summary.metrics] == ["perplexity", "perplexity"]
        assert record.confidence == "token-probability" and record.examples > summary.metrics[0].examples
        code, output = _cli(["eval", "--checkpoint", str(out), "--selective", "--no-save-threshold"])
        assert code == 0, output
        assert f"on {record.examples} predicted tokens" in output and "(confidence: token-probability)" in output
        assert f"threshold {record.threshold:.4f}:" in output  # the same choice as training's


def test_resume_continues_from_the_saved_step(toy, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    settings = TrainSettings(**{**FAST.__dict__, "max_steps": 20, "save_every": 10})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill after the last checkpoint

    monkeypatch.setattr("shadowpeft.train.jobs.publish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_job(base=str(toy["base"]), data=str(toy["lm"]), out=out, config=ShadowConfig(), settings=settings)
    work = out.with_name("adapter.partial")
    assert not out.exists()  # nothing that looks complete
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    monkeypatch.undo()
    longer = TrainSettings(**{**settings.__dict__, "max_steps": 30})
    summary = train_job(
        base=str(toy["base"]), data=str(toy["lm"]), out=out, config=ShadowConfig(), settings=longer, resume=True
    )
    assert summary.steps == 30
    assert [step for step, _ in summary.loss_history] == [25, 30]  # logging every 5 steps, from step 20 on
    assert out.is_dir() and not work.exists()


def test_pretrained_shadow_initialises_train(toy, tmp_path):
    pre = tmp_path / "pretrained"
    train_job(
        base=str(toy["base"]), data=str(toy["lm"]), out=pre, config=ShadowConfig(), settings=FAST, detached_only=True
    )
    record = json.loads((pre / "training.json").read_text())
    assert record["detached_only"] is True
    base, _ = load_base(str(toy["base"]), kind="lm")
    pretrained = load_shadow(base, pre)
    fresh_base, _ = load_base(str(toy["base"]), kind="generation")
    from shadowpeft import get_shadow_model

    model = get_shadow_model(fresh_base, ShadowConfig())
    load_pretrained_shadow_into(model, pre)
    for (name, a), (_, b) in zip(
        model.shadow_model.state_dict().items(), pretrained.shadow_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert torch.count_nonzero(model.shadow_injection_model.injection_ups) == 0  # the rest stays fresh
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--recipe",
            "paper",
            "--base",
            str(toy["base"]),
            "--data",
            str(toy["generation"]),
            "--out",
            str(tmp_path / "tuned"),
            "--steps",
            "5",
            "--max-length",
            "32",
            "--init-shadow",
            str(pre),
        ],
    )
    assert result.exit_code == 0, result.output


def test_bf16_base_keeps_fp32_adapter_weights(toy, tmp_path):
    settings = TrainSettings(**{**FAST.__dict__, "max_steps": 10, "bf16": True})
    summary = train_job(
        base=str(toy["base"]), data=str(toy["lm"]), out=tmp_path / "a", config=ShadowConfig(), settings=settings
    )
    assert torch.isfinite(torch.tensor(summary.final_loss))
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "a" / "shadow_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


def _cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


BAD_INPUTS = {
    "missing data file": (lambda t, d: ["--data", str(d / "nope.jsonl")], "nope.jsonl"),
    "malformed jsonl": (
        lambda t, d: ["--data", str(_write(d / "bad.jsonl", '{"text": "a"}\n{"text": \n'))],
        "bad.jsonl:2",
    ),
    "unknown fields": (lambda t, d: ["--data", str(_write(d / "f.jsonl", '{"txt": "a"}\n'))], "txt"),
    "empty dataset": (lambda t, d: ["--data", str(_write(d / "e.jsonl", "\n\n"))], "no examples"),
    "unknown built-in": (lambda t, d: ["--data", "tweets"], "tweets"),
    "base that cannot be loaded": (
        lambda t, d: ["--data", str(t["lm"]), "--base", str(_mkdir(d / "empty"))],
        "Could not load base model",
    ),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_error_and_no_output(toy, tmp_path, case):
    extra, expected = BAD_INPUTS[case]
    args = ["train", "--recipe", "paper", "--base", str(toy["base"]), "--out", str(tmp_path / "out"), "--steps", "2"]
    args += extra(toy, tmp_path)
    code, output = _cli(args)
    assert code == 1, output
    assert output.startswith("Error: ") and expected in output
    assert "Traceback" not in output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_existing_checkpoint_is_refused_unless_overwrite(toy, tmp_path):
    out = tmp_path / "out"
    args = [
        "train",
        "--recipe",
        "paper",
        "--base",
        str(toy["base"]),
        "--data",
        str(toy["lm"]),
        "--out",
        str(out),
        "--steps",
        "2",
        "--max-length",
        "32",
    ]
    assert _cli(args)[0] == 0
    before = (out / "shadow_model.safetensors").read_bytes()
    code, output = _cli(args)
    assert code == 1 and "already holds a checkpoint; pass --overwrite" in output
    assert (out / "shadow_model.safetensors").read_bytes() == before
    assert _cli([*args, "--overwrite", "--seed", "1"])[0] == 0


def test_eval_command_prints_metrics(toy, tmp_path):
    out = tmp_path / "out"
    train_job(
        base=str(toy["base"]),
        data=str(toy["classification"]),
        out=out,
        config=ShadowConfig(),
        settings=TrainSettings(**{**FAST.__dict__, "max_steps": 10}),
    )
    code, output = _cli(["eval", "--checkpoint", str(out), "--mode", "detached"])
    assert code == 0, output
    # The last line (after transformers' weight-loading progress bar on stderr) is the metric.
    assert re.search(r"accuracy \(detached\): \d+\.\d\d% on \d+ examples$", output.strip())


_GLOO_ABORT = "terminate called without an active exception"


@pytest.mark.slow
def test_two_process_accelerate_launch(toy, tmp_path):
    """DDP over gloo on CPU: `accelerate launch --multi_gpu` starts torchrun; without CUDA the Trainer uses CPU."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "shadowpeft.cli",
        "train",
        "--recipe",
        "paper",
        "--base",
        str(toy["base"]),
        "--data",
        str(toy["lm"]),
        "--out",
        str(out),
        "--steps",
        "30",
        "--lr",
        "0.1",
        "--max-length",
        "32",
        "--batch-size",
        "4",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    if done.returncode != 0 and _GLOO_ABORT in done.stderr:
        # Known environmental abort: under the other xdist worker's load on 2 cores, a gloo rank now and then
        # dies with this C++ message mid-training (seen in two clean-clone CI runs; the same test then passed alone).
        # One fresh launch; a second abort, or any other failure, fails the test.
        shutil.rmtree(out, ignore_errors=True)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved: ") == 1  # only rank 0 reports and publishes
    summary = json.loads((out / "training.json").read_text())["summary"]
    assert summary["final_loss"] < 0.5 * summary["first_loss"]
    base, _ = load_base(str(toy["base"]), kind="lm")
    loaded = load_shadow(base, out)  # rank 0's published adapter, as trained (not a fresh W_up = 0 one)
    ups = [t for name, t in loaded.adapter_state_dict().items() if "injection_ups" in name]
    assert ups and any(bool(t.abs().sum() > 0) for t in ups)


def test_evaluation_subset_is_fixed_random_not_the_first_rows():
    from shadowpeft.train.evaluation import evaluation_subset

    rows = tuple(range(100))
    subset = evaluation_subset(rows, 10)
    assert subset == evaluation_subset(rows, 10) and len(subset) == 10
    assert subset != rows[:10] and list(subset) == sorted(subset)
    assert evaluation_subset(rows, None) == rows and evaluation_subset(rows, 500) == rows

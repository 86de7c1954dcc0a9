"""Selective prediction (shadowpeft.train.selective) and per-example scores (evaluation.score_examples)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from shadowpeft import get_shadow_model
from shadowpeft.errors import CheckpointError
from shadowpeft.train.datasets import (
    ClassificationExample,
    GenerationExample,
    TaskData,
    TextExample,
    load_task_data,
)
from shadowpeft.train.encoding import encode_prompt, encode_task
from shadowpeft.train.evaluation import ExampleScores, evaluate, evaluation_subset, score_examples
from shadowpeft.train.selective import (
    ALL_ESCALATED,
    ESCALATION_NAME,
    EscalationRecord,
    SelectiveRow,
    choose_threshold,
    escalation_record,
    expected_calibration_error,
    format_selective_table,
    selective_rows,
)
from tests.conftest import no_dropout_config, perturb
from tests.toy import COLORS, save_toy_base, write_toy_data

# Eight examples, sorted by the detached confidence.
#   index         0    1    2    3    4    5    6    7
#   confidence  0.1  0.2  0.3  0.4  0.6  0.7  0.8  0.9
#   attached      T    F    T    T    F    T    T    T    6/8
#   detached      F    F    T    F    T    T    F    T    4/8
CONFIDENCE = (0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9)
ATTACHED = (True, False, True, True, False, True, True, True)
DETACHED = (False, False, True, False, True, True, False, True)


def test_rows_count_local_and_combined_accuracy_by_hand() -> None:
    rows = selective_rows(ATTACHED, DETACHED, CONFIDENCE, thresholds=[0.3, 0.5, 0.8])
    assert rows == [
        # local 2..7 (detached right on 2, 4, 5, 7); escalated 0, 1 (attached right on 0)
        SelectiveRow(threshold=0.3, local_fraction=6 / 8, local_accuracy=4 / 6, combined_accuracy=5 / 8),
        # local 4..7 (right on 4, 5, 7); escalated 0..3 (right on 0, 2, 3)
        SelectiveRow(threshold=0.5, local_fraction=4 / 8, local_accuracy=3 / 4, combined_accuracy=6 / 8),
        # local 6, 7 (right on 7); escalated 0..5 (right on 0, 2, 3, 5)
        SelectiveRow(threshold=0.8, local_fraction=2 / 8, local_accuracy=1 / 2, combined_accuracy=5 / 8),
    ]


def test_default_thresholds_run_from_all_local_to_all_escalated() -> None:
    rows = selective_rows(ATTACHED, DETACHED, CONFIDENCE)
    assert [r.threshold for r in rows] == [0.0, *CONFIDENCE, ALL_ESCALATED]
    assert ALL_ESCALATED > 1.0
    first, last = rows[0], rows[-1]
    assert (first.local_fraction, first.local_accuracy, first.combined_accuracy) == (1.0, 4 / 8, 4 / 8)
    assert (last.local_fraction, last.local_accuracy, last.combined_accuracy) == (0.0, None, 6 / 8)
    # A threshold equal to a confidence keeps that example local (>=).
    assert rows[CONFIDENCE.index(0.9) + 1].local_fraction == 1 / 8


def test_choose_threshold_trades_accuracy_for_local_answers() -> None:
    rows = selective_rows(ATTACHED, DETACHED, CONFIDENCE)
    strict = choose_threshold(rows, 6 / 8, tolerance=0.0)
    assert (strict.threshold, strict.local_fraction, strict.combined_accuracy) == (0.6, 4 / 8, 6 / 8)
    loose = choose_threshold(rows, 6 / 8, tolerance=0.2)
    assert (loose.threshold, loose.local_fraction, loose.combined_accuracy) == (0.2, 7 / 8, 5 / 8)
    # Exactly at the tolerance still qualifies: 6/8 - 1/8 = 5/8.
    assert choose_threshold(rows, 6 / 8, tolerance=1 / 8).threshold == 0.2


def test_choose_threshold_breaks_ties_with_the_lower_threshold() -> None:
    rows = selective_rows(ATTACHED, DETACHED, CONFIDENCE, thresholds=[0.6, 0.5, ALL_ESCALATED])
    assert rows[0].local_fraction == rows[1].local_fraction == 4 / 8
    assert choose_threshold(rows, 6 / 8, tolerance=0.0).threshold == 0.5


def test_choose_threshold_always_has_the_all_escalated_row() -> None:
    never_right = selective_rows([True] * 4, [False] * 4, [0.9, 0.8, 0.7, 1.0])
    chosen = choose_threshold(never_right, 1.0, tolerance=0.0)
    assert (chosen.threshold, chosen.local_fraction, chosen.combined_accuracy) == (ALL_ESCALATED, 0.0, 1.0)


def test_choose_threshold_refuses_impossible_requests() -> None:
    rows = selective_rows(ATTACHED, DETACHED, CONFIDENCE, thresholds=[0.0])
    with pytest.raises(ValueError, match=r"No threshold keeps combined accuracy within 0\.0"):
        choose_threshold(rows, 6 / 8, tolerance=0.0)
    with pytest.raises(ValueError, match="tolerance=-0.1"):
        choose_threshold(rows, 6 / 8, tolerance=-0.1)
    with pytest.raises(ValueError, match="no rows"):
        choose_threshold([], 0.5)


def test_expected_calibration_error_by_hand() -> None:
    # bin 9: 0.95, 0.95 (1 of 2 right): 2/4 * |0.95 - 0.5|
    # bin 1: 0.15 (wrong): 1/4 * 0.15; bin 5: 0.55 (right): 1/4 * 0.45
    ece = expected_calibration_error([0.95, 0.95, 0.15, 0.55], [True, False, False, True])
    assert ece == pytest.approx(0.5 * 0.45 + 0.25 * 0.15 + 0.25 * 0.45, abs=1e-12)
    assert ece == pytest.approx(0.375, abs=1e-12)
    assert expected_calibration_error([0.95, 0.15], [True, False], bins=1) == pytest.approx(abs(0.55 - 0.5))
    assert expected_calibration_error([1.0, 0.0], [True, False]) == 0.0


def test_confidence_one_lands_in_the_last_bin() -> None:
    # Together in bin 9: |0.95 - 0.5| = 0.45. Were 1.0 a bin of its own it would be 0.5 * 1 + 0.5 * 0.1 = 0.55.
    assert expected_calibration_error([1.0, 0.9], [False, True]) == pytest.approx(0.45, abs=1e-12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: selective_rows([True], [True, False], [0.5, 0.5]),
            "attached_correct has 1 entries but confidence has 2",
        ),
        (
            lambda: selective_rows([True, True], [True], [0.5, 0.5]),
            "detached_correct has 1 entries but confidence has 2",
        ),
        (
            lambda: selective_rows([True, True], [True, True], [0.5, 1.5]),
            r"confidence must lie in \[0, 1\]; got \[1\]=1\.5",
        ),
        (lambda: selective_rows([], [], []), "no examples"),
        (lambda: selective_rows([True], [True], [math.nan]), r"\[0\]=nan"),
        (lambda: expected_calibration_error([0.5, -0.1], [True]), r"correct has 1 entries.*\[1\]=-0\.1"),
        (lambda: expected_calibration_error([0.5], [True], bins=0), "bins=0"),
    ],
)
def test_invalid_input_is_named(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def _record(**overrides: object) -> EscalationRecord:
    values = dict(
        confidence="first-token-probability",
        threshold=0.6,
        tolerance=0.01,
        local_fraction=0.5,
        combined_accuracy=0.75,
        attached_accuracy=0.75,
        detached_accuracy=0.5,
        detached_ece=0.125,
        examples=8,
        split="test",
    )
    return EscalationRecord(**{**values, **overrides})


def test_escalation_record_round_trips(tmp_path: Path) -> None:
    record = _record(threshold=ALL_ESCALATED)
    path = record.save(tmp_path)
    assert path == tmp_path / ESCALATION_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [ESCALATION_NAME]  # no temporary file left behind
    assert EscalationRecord.read(tmp_path) == record
    assert EscalationRecord.from_dict(record.to_dict()) == record
    _record(threshold=0.2).save(tmp_path)  # replaces the file
    assert EscalationRecord.read(tmp_path).threshold == 0.2


def test_escalation_record_read_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert EscalationRecord.read(tmp_path) is None


def test_escalation_record_refuses_bad_files(tmp_path: Path) -> None:
    path = tmp_path / ESCALATION_NAME
    path.write_text(json.dumps({**_record().to_dict(), "margin": 0.1}))
    with pytest.raises(CheckpointError, match=r"escalation\.json: .*unknown key\(s\) 'margin'"):
        EscalationRecord.read(tmp_path)
    missing = _record().to_dict()
    del missing["split"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\) 'split'"):
        EscalationRecord.from_dict(missing)
    with pytest.raises(CheckpointError, match="local_fraction=1.5 is not a fraction"):
        EscalationRecord.from_dict({**_record().to_dict(), "local_fraction": 1.5})
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        EscalationRecord.read(tmp_path)


def test_escalation_record_from_scores() -> None:
    attached = ExampleScores("attached", ATTACHED, tuple(c / 2 for c in CONFIDENCE))
    detached = ExampleScores("detached", DETACHED, CONFIDENCE)
    record, rows = escalation_record(attached, detached, confidence_name="class-probability", tolerance=0.0)
    assert rows == selective_rows(ATTACHED, DETACHED, CONFIDENCE)
    assert record == EscalationRecord(
        confidence="class-probability",
        threshold=0.6,
        tolerance=0.0,
        local_fraction=4 / 8,
        combined_accuracy=6 / 8,
        attached_accuracy=6 / 8,
        detached_accuracy=4 / 8,
        detached_ece=expected_calibration_error(CONFIDENCE, DETACHED),
        examples=8,
        split="test",
    )
    with pytest.raises(ValueError, match="attached scores 8 examples but detached scores 2"):
        escalation_record(attached, ExampleScores("detached", (True, False), (0.5, 0.5)), confidence_name="x")
    with pytest.raises(ValueError, match="swapped"):
        escalation_record(detached, attached, confidence_name="class-probability")
    with pytest.raises(ValueError, match="confidence='x' is not one of class-probability, first-token-probability"):
        escalation_record(attached, detached, confidence_name="x")


def test_selective_table_marks_the_chosen_row_and_stays_short() -> None:
    confidence = [i / 40 for i in range(40)]
    correct = [i % 3 != 0 for i in range(40)]
    rows = selective_rows([True] * 40, correct, confidence)
    chosen = choose_threshold(rows, 1.0, tolerance=0.3)
    table = format_selective_table(rows, 1.0, chosen).splitlines()
    body = table[1:-1]
    assert table[0].split() == ["threshold", "local", "%", "local", "acc", "%", "combined", "acc", "%"]
    assert len(rows) == 41 and len(body) <= 15
    assert body[0].split()[:2] == ["0.0000", "100.0"]
    assert body[-1].split() == ["1.0000+", "0.0", "-", "100.0"]
    marked = [line for line in body if line.endswith("<- chosen")]
    assert len(marked) == 1 and marked[0].split()[0] == f"{chosen.threshold:.4f}"
    assert "attached accuracy 100.0%" in table[-1]
    short = format_selective_table(selective_rows(ATTACHED, DETACHED, CONFIDENCE), 0.75, chosen=rows[0])
    assert len(short.splitlines()) == 1 + 10 + 1  # every row when there are few


def test_selective_does_not_import_torch() -> None:
    code = "import sys, shadowpeft.train.selective; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- score_examples on a tiny random model ---------------------------------------------------------------
# Prompts and texts of different lengths, so batches are padded (left for generation, right for classes).
WORDS = ("red", "blue", "green", "the", "color", "is", "sample", "7", "12", "99")
MAX_LENGTH, NEW_TOKENS = 32, 3


def _text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(2 + i % 5))


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("selective-toy")
    base = save_toy_base(root / "base")
    lm = load_task_data(write_toy_data(root, rows=20)["lm"], test_fraction=0.5)
    classes = tuple(ClassificationExample(_text(i), COLORS[i % 3]) for i in range(10))
    texts = tuple(TextExample(_text(i)) for i in range(10))  # 2 to 6 words: batches are right-padded
    return {
        "base": base,
        "tokenizer": AutoTokenizer.from_pretrained(base),
        "classification": TaskData("toy-classes", "classification", (), classes, tuple(sorted(COLORS))),
        "lm": lm,
        "texts": TaskData("toy-texts", "lm", (), texts, ()),
    }


def _shadow_model(toy: dict[str, object], kind: str) -> torch.nn.Module:
    if kind == "classification":
        base = AutoModelForSequenceClassification.from_pretrained(toy["base"], num_labels=len(COLORS))
    else:
        base = AutoModelForCausalLM.from_pretrained(toy["base"])
    return perturb(get_shadow_model(base, no_dropout_config()), scale=0.2).eval()


def _alone(model: torch.nn.Module, features: dict, **kwargs: object) -> torch.Tensor:
    """One unpadded example through ``model``: its (V,) or (C,) logits at the last position."""
    with torch.no_grad():
        logits = model(**_collate(features), **kwargs).logits
    return logits[0, -1] if logits.dim() == 3 else logits[0]


def _collate(features: dict) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([value]) for key, value in features.items() if key != "labels"}


def _half_right_generation(model: torch.nn.Module, tokenizer, mode: str | None) -> tuple[TaskData, list[float]]:
    """A generation task whose even examples expect the model's own greedy text (odd ones cannot be
    right), and the first-token probability of each prompt, all computed one unpadded prompt at a time."""
    examples, first_token = [], []
    for i in range(8):
        prompt = _text(i)
        features = encode_prompt(prompt, tokenizer, max_length=MAX_LENGTH)
        batch = _collate(features)
        kwargs = {} if mode is None else {"mode": mode}
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **kwargs)
        own = tokenizer.decode(ids[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        examples.append(GenerationExample(prompt, own if i % 2 == 0 else "no such answer"))
        first_token.append(float(_alone(model, features, **kwargs).float().softmax(-1).max()))
    return TaskData("toy-echo", "generation", (), tuple(examples), ()), first_token


@pytest.mark.parametrize("mode", ["attached", "detached"])
def test_generation_scores_match_unpadded_generation(toy, mode: str) -> None:
    model, tokenizer = _shadow_model(toy, "generation"), toy["tokenizer"]
    task, first_token = _half_right_generation(model, tokenizer, mode)
    kwargs = dict(mode=mode, batch_size=3, max_length=MAX_LENGTH, max_new_tokens=NEW_TOKENS)
    scores = score_examples(model, task, tokenizer, **kwargs)
    assert scores.mode == mode and scores.correct == (True, False) * 4
    assert scores.accuracy == evaluate(model, task, tokenizer, **kwargs).value == 0.5
    # The probability of the first generated token, against one unpadded forward per prompt.
    assert scores.confidence == pytest.approx(first_token, abs=1e-5)
    assert all(0.0 <= c <= 1.0 for c in scores.confidence) and len(set(scores.confidence)) > 1
    limited = score_examples(model, task, tokenizer, **kwargs, limit=5)
    assert limited.examples == 5 and limited.accuracy == evaluate(model, task, tokenizer, **kwargs, limit=5).value
    kept = [i for i, e in enumerate(task.test) if e in evaluation_subset(task.test, 5)]
    assert limited.confidence == pytest.approx([first_token[i] for i in kept], abs=1e-5)


@pytest.mark.parametrize("mode", ["attached", "detached"])
def test_classification_scores_match_unpadded_forwards(toy, mode: str) -> None:
    model, task, tokenizer = _shadow_model(toy, "classification"), toy["classification"], toy["tokenizer"]
    scores = score_examples(model, task, tokenizer, mode=mode, batch_size=4, max_length=MAX_LENGTH)
    result = evaluate(model, task, tokenizer, mode=mode, batch_size=4, max_length=MAX_LENGTH)
    assert scores.mode == mode and scores.examples == result.examples == 10
    assert scores.accuracy == result.value
    expected_correct, expected_confidence = [], []
    for features in encode_task(task, tokenizer, split="test", max_length=MAX_LENGTH):
        probabilities = _alone(model, features, mode=mode).float().softmax(-1)  # (C,)
        expected_correct.append(int(probabilities.argmax()) == features["labels"])
        expected_confidence.append(float(probabilities.max()))
    assert list(scores.correct) == expected_correct and 0 < sum(expected_correct) < 10
    assert scores.confidence == pytest.approx(expected_confidence, abs=1e-5)
    assert all(1 / len(COLORS) - 1e-6 <= c <= 1.0 for c in scores.confidence)  # the max of 3 probabilities


def test_score_examples_works_on_a_plain_hf_model(toy) -> None:
    model, tokenizer = AutoModelForCausalLM.from_pretrained(toy["base"]).eval(), toy["tokenizer"]
    task, first_token = _half_right_generation(model, tokenizer, None)
    scores = score_examples(model, task, tokenizer, batch_size=3, max_length=MAX_LENGTH, max_new_tokens=NEW_TOKENS)
    assert scores.mode is None and scores.correct == (True, False) * 4
    assert scores.confidence == pytest.approx(first_token, abs=1e-5)


class _IdsOnly(torch.nn.Module):
    """A wrapper whose ``generate`` returns only token ids, like benchmarks/accuracy.py's ``OnDevice``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def generate(self, **inputs: object) -> torch.Tensor:
        out = self.inner.generate(**inputs)
        return out.sequences if not isinstance(out, torch.Tensor) else out


def test_evaluate_still_works_when_generate_returns_only_ids(toy) -> None:
    model, tokenizer = _shadow_model(toy, "generation"), toy["tokenizer"]
    task, _ = _half_right_generation(model, tokenizer, "detached")
    kwargs = dict(mode="detached", batch_size=3, max_length=MAX_LENGTH, max_new_tokens=NEW_TOKENS)
    assert evaluate(_IdsOnly(model), task, tokenizer, **kwargs).value == 0.5
    with pytest.raises(TypeError, match="generate returned a tensor although return_dict_in_generate=True"):
        score_examples(_IdsOnly(model), task, tokenizer, **kwargs)


@pytest.mark.parametrize("mode", ["attached", "detached"])
def test_lm_scores_every_predicted_token_teacher_forced(toy, mode: str) -> None:
    model, task, tokenizer = _shadow_model(toy, "lm"), toy["texts"], toy["tokenizer"]
    rows = encode_task(task, tokenizer, split="test", max_length=MAX_LENGTH)
    assert len({len(r["input_ids"]) for r in rows}) > 1  # batches of 4 are right-padded
    scores = score_examples(model, task, tokenizer, mode=mode, batch_size=4, max_length=MAX_LENGTH)
    assert scores.mode == mode and scores.examples == sum(len(r["input_ids"]) - 1 for r in rows)
    assert all(0.0 <= c <= 1.0 for c in scores.confidence) and len(set(scores.confidence)) > 1
    # By hand: one unpadded forward per text; position t predicts token t + 1.
    expected_correct, expected_confidence = [], []
    for features in rows:
        with torch.no_grad():
            logits = model(**_collate(features), mode=mode).logits[0, :-1]  # (T-1, V)
        probabilities = logits.float().softmax(-1)
        expected_correct += (probabilities.argmax(-1) == torch.tensor(features["input_ids"][1:])).tolist()
        expected_confidence += probabilities.amax(-1).tolist()
    assert list(scores.correct) == expected_correct
    assert scores.confidence == pytest.approx(expected_confidence, abs=1e-5)
    # limit counts texts: the tokens of the evaluation subset's texts.
    limited = score_examples(model, task, tokenizer, mode=mode, batch_size=4, max_length=MAX_LENGTH, limit=3)
    kept = encode_task(
        TaskData(task.name, "lm", (), evaluation_subset(task.test, 3), ()),
        tokenizer,
        split="test",
        max_length=MAX_LENGTH,
    )
    assert limited.examples == sum(len(r["input_ids"]) - 1 for r in kept)


def test_lm_escalation_record_uses_token_probability(toy) -> None:
    from shadowpeft.train.selective import CONFIDENCE_MEASURES
    from shadowpeft.train.trainer import escalation_scores

    model = _shadow_model(toy, "lm")
    scores, record, rows = escalation_scores(model, toy["lm"], toy["tokenizer"], max_length=MAX_LENGTH, limit=None)
    assert record.confidence == CONFIDENCE_MEASURES["lm"] == "token-probability"
    assert record.examples == scores["detached"].examples == scores["attached"].examples > len(toy["lm"].test)
    assert record.attached_accuracy == scores["attached"].accuracy and record.combined_accuracy >= (
        record.attached_accuracy - 0.01 - 1e-9
    )
    assert any(row.threshold == record.threshold for row in rows)


def test_example_scores_accuracy_and_validation() -> None:
    assert ExampleScores(None, (), ()).accuracy == 0.0
    assert ExampleScores("detached", (True, False, True), (0.9, 0.2, 0.7)).accuracy == 2 / 3
    with pytest.raises(ValueError, match="2 correctness flags but 1 confidences"):
        ExampleScores("attached", (True, False), (0.5,))
    empty = TaskData("empty", "generation", (), (), ())
    assert score_examples(torch.nn.Linear(1, 1), empty, tokenizer=None).examples == 0

"""Selective prediction: answer on the device when the detached model is confident, else escalate.

An example is answered locally (by the detached shadow) when its confidence is at least a threshold,
and by the attached (cloud) model otherwise::

    confidence >= threshold ──> detached answer (local)
    confidence <  threshold ──> attached answer (escalated)

:func:`selective_rows` sweeps the threshold, :func:`choose_threshold` picks the one that keeps most
examples local within a tolerance of the attached accuracy, and :class:`EscalationRecord` saves the
choice as ``escalation.json`` beside a checkpoint. Pure Python: no torch import.

The confidence depends on the task (:data:`CONFIDENCE_MEASURES`, computed by
:func:`shadowpeft.train.evaluation.score_examples`): the largest class probability
(classification), the probability of the first generated token (generation), or, for language
modelling, the largest next-token probability at each predicted token: there every token is an
example, answered locally or escalated on its own. That is the measure the runtime's token-level
escalation reads at each decoding step (the largest softmax probability of the detached shadow's
logits, temperature 1), so a threshold chosen on ``token-probability`` applies to it as is.
``shadow-export`` carries the record into the export's manifest (``Manifest.escalation``).
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shadowpeft.errors import CheckpointError
from shadowpeft.runtime.atomic import write_atomic

if TYPE_CHECKING:
    from shadowpeft.train.evaluation import ExampleScores

ESCALATION_NAME = "escalation.json"
# Task kind -> the name of the confidence measure that evaluation.score_examples computes for it.
CONFIDENCE_MEASURES: dict[str, str] = {
    "classification": "class-probability",
    "generation": "first-token-probability",
    "lm": "token-probability",
}
# A threshold just above 1.0: no confidence reaches it, so every example is escalated.
ALL_ESCALATED = math.nextafter(1.0, 2.0)
# Slack when comparing a combined accuracy with ``attached - tolerance``: both are float quotients.
_ACCURACY_SLACK = 1e-9
MAX_TABLE_ROWS = 15


@dataclass(frozen=True)
class SelectiveRow:
    """The outcome of one confidence threshold.

    Attributes:
        threshold: Examples with confidence >= threshold are answered locally (detached).
        local_fraction: Share of examples answered locally.
        local_accuracy: Detached accuracy on the local examples; None when no example is local.
        combined_accuracy: Accuracy of the mix: detached on local examples, attached on escalated ones.
    """

    threshold: float
    local_fraction: float
    local_accuracy: float | None
    combined_accuracy: float


def selective_rows(
    attached_correct: Sequence[bool],
    detached_correct: Sequence[bool],
    confidence: Sequence[float],
    thresholds: Sequence[float] | None = None,
) -> list[SelectiveRow]:
    """One :class:`SelectiveRow` per threshold, in the order of ``thresholds``.

    Args:
        attached_correct: Per example, whether the attached model answered correctly.
        detached_correct: Per example, whether the detached model answered correctly.
        confidence: Per example, the detached model's confidence in [0, 1].
        thresholds: Thresholds to evaluate; by default 0.0, every distinct confidence (ascending) and
            :data:`ALL_ESCALATED` (just above 1.0, so nothing is local).

    Raises:
        ValueError: The sequences are empty or of different lengths, or a confidence is outside [0, 1].
    """
    _check_scores(confidence, {"attached_correct": attached_correct, "detached_correct": detached_correct})
    n = len(confidence)
    if thresholds is None:
        thresholds = sorted({0.0, *map(float, confidence), ALL_ESCALATED})
    # Sort by confidence so the local examples of any threshold are a suffix; prefix sums count them.
    order = sorted(range(n), key=lambda i: confidence[i])
    ranked = [confidence[i] for i in order]
    attached_before, detached_before = [0], [0]  # correct answers among the first k ranked examples
    for i in order:
        attached_before.append(attached_before[-1] + bool(attached_correct[i]))
        detached_before.append(detached_before[-1] + bool(detached_correct[i]))
    rows = []
    for threshold in thresholds:
        first_local = bisect.bisect_left(ranked, threshold)
        local = n - first_local
        local_correct = detached_before[n] - detached_before[first_local]
        escalated_correct = attached_before[first_local]
        rows.append(
            SelectiveRow(
                threshold=float(threshold),
                local_fraction=local / n,
                local_accuracy=local_correct / local if local else None,
                combined_accuracy=(local_correct + escalated_correct) / n,
            )
        )
    return rows


def choose_threshold(
    rows: Sequence[SelectiveRow], attached_accuracy: float, *, tolerance: float = 0.01
) -> SelectiveRow:
    """The row with the largest local fraction whose combined accuracy is within ``tolerance`` of attached.

    Ties on the local fraction go to the lower threshold. With the default thresholds of
    :func:`selective_rows` a row always qualifies: the all-escalated one, whose combined accuracy is
    the attached accuracy.

    Args:
        rows: Rows from :func:`selective_rows`.
        attached_accuracy: The attached model's accuracy on the same examples.
        tolerance: Accuracy (as a fraction, 0.01 = one point) the mix may lose against attached.

    Raises:
        ValueError: ``rows`` is empty, ``tolerance`` is negative, or no row is accurate enough.
    """
    if not rows:
        raise ValueError("choose_threshold got no rows; build them with selective_rows().")
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r}; it must be >= 0 (an accuracy fraction, 0.01 = one point).")
    floor = attached_accuracy - tolerance - _ACCURACY_SLACK
    eligible = [row for row in rows if row.combined_accuracy >= floor]
    if not eligible:
        best = max(row.combined_accuracy for row in rows)
        raise ValueError(
            f"No threshold keeps combined accuracy within {tolerance!r} of the attached accuracy "
            f"{attached_accuracy!r} (best combined: {best!r}). Include the all-escalated threshold "
            f"({ALL_ESCALATED!r}, the default) or raise the tolerance."
        )
    return min(eligible, key=lambda row: (-row.local_fraction, row.threshold))


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], *, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-width confidence bins on [0, 1].

    ``ECE = sum over non-empty bins b of (|b| / n) * |mean confidence in b - accuracy in b|``. Bin ``k``
    holds confidences in ``[k / bins, (k + 1) / bins)``; a confidence of exactly 1.0 goes in the last bin.

    Raises:
        ValueError: ``bins`` < 1, the sequences are empty or of different lengths, or a confidence is
            outside [0, 1].
    """
    if bins < 1:
        raise ValueError(f"bins={bins!r}; expected_calibration_error needs at least 1 bin.")
    _check_scores(confidence, {"correct": correct})
    totals = [[0, 0.0, 0] for _ in range(bins)]  # per bin: examples, sum of confidence, correct
    for c, ok in zip(confidence, correct, strict=True):
        total = totals[min(int(c * bins), bins - 1)]
        total[0] += 1
        total[1] += c
        total[2] += bool(ok)
    n = len(confidence)
    return sum(size / n * abs(conf / size - right / size) for size, conf, right in totals if size)


def _check_scores(confidence: Sequence[float], others: dict[str, Sequence[bool]]) -> None:
    """Raise one ValueError listing every problem: empty input, unequal lengths, confidences outside [0, 1]."""
    problems = []
    if not confidence:
        problems.append("no examples (confidence is empty)")
    for name, values in others.items():
        if len(values) != len(confidence):
            problems.append(f"{name} has {len(values)} entries but confidence has {len(confidence)}")
    outside = [(i, c) for i, c in enumerate(confidence) if not 0.0 <= c <= 1.0]
    if outside:
        shown = ", ".join(f"[{i}]={c!r}" for i, c in outside[:5])
        more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        problems.append(f"confidence must lie in [0, 1]; got {shown}{more}")
    if problems:
        raise ValueError("Invalid selective-prediction input: " + "; ".join(problems) + ".")


@dataclass(frozen=True)
class EscalationRecord:
    """The escalation threshold chosen for a checkpoint, saved as ``escalation.json`` beside it.

    Attributes:
        confidence: Name of the confidence measure, a value of :data:`CONFIDENCE_MEASURES`.
        threshold: Answer locally when the detached confidence is >= this.
        tolerance: Accuracy the combined model was allowed to lose against attached.
        local_fraction: Share of ``split`` answered locally at ``threshold``.
        combined_accuracy: Accuracy of the local / escalated mix at ``threshold``.
        attached_accuracy: Attached accuracy on the same examples.
        detached_accuracy: Detached accuracy on the same examples.
        detached_ece: Expected calibration error of the detached confidence (10 bins).
        examples: Number of examples the threshold was chosen on (predicted tokens, for ``token-probability``).
        split: The split they came from, e.g. ``"test"``.
    """

    confidence: str
    threshold: float
    tolerance: float
    local_fraction: float
    combined_accuracy: float
    attached_accuracy: float
    detached_accuracy: float
    detached_ece: float
    examples: int
    split: str

    def __post_init__(self) -> None:
        problems = []
        if self.confidence not in CONFIDENCE_MEASURES.values():
            allowed = ", ".join(sorted(CONFIDENCE_MEASURES.values()))
            problems.append(f"confidence={self.confidence!r} is not one of {allowed}")
        for name in ("local_fraction", "combined_accuracy", "attached_accuracy", "detached_accuracy", "detached_ece"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                problems.append(f"{name}={value!r} is not a fraction in [0, 1]")
        for name in ("threshold", "tolerance"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= ALL_ESCALATED:
                problems.append(f"{name}={value!r} is not a number in [0, 1]")
        if not isinstance(self.examples, int) or isinstance(self.examples, bool) or self.examples < 1:
            problems.append(f"examples={self.examples!r} is not a positive integer")
        if not isinstance(self.split, str) or not self.split:
            problems.append(f"split={self.split!r} is not a split name")
        if problems:
            raise ValueError("Invalid EscalationRecord: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EscalationRecord:
        """Build a record from :meth:`to_dict` output.

        Raises:
            CheckpointError: ``data`` is not a dict, has unknown or missing keys, or holds invalid values.
        """
        if not isinstance(data, dict):
            raise CheckpointError(f"An escalation record must be a JSON object; got {type(data).__name__}.")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        missing = [name for name in known if name not in data]
        if unknown or missing:
            parts = ([f"unknown key(s) {', '.join(map(repr, unknown))}"] if unknown else []) + (
                [f"missing key(s) {', '.join(map(repr, missing))}"] if missing else []
            )
            raise CheckpointError(
                f"Escalation record has {' and '.join(parts)}; expected exactly: {', '.join(known)}. "
                "It may come from another shadowpeft version: choose the threshold again."
            )
        try:
            return cls(**data)
        except ValueError as err:
            raise CheckpointError(f"{err} Choose the threshold again to rewrite it.") from err

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``directory/escalation.json`` atomically (a temporary file, then ``os.replace``)."""
        return write_atomic(Path(directory) / ESCALATION_NAME, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> EscalationRecord | None:
        """Read ``directory/escalation.json``; None when the file does not exist.

        Raises:
            CheckpointError: The file is not valid JSON or not a valid record.
        """
        path = Path(directory) / ESCALATION_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CheckpointError(
                f"{path} is not valid JSON ({err}); delete it or choose the threshold again."
            ) from err
        try:
            return cls.from_dict(data)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from err


def escalation_record(
    attached: ExampleScores,
    detached: ExampleScores,
    *,
    confidence_name: str,
    tolerance: float = 0.01,
    split: str = "test",
) -> tuple[EscalationRecord, list[SelectiveRow]]:
    """Choose the escalation threshold from both modes' scores on the same examples.

    Args:
        attached: Per-example scores of the attached model.
        detached: Per-example scores of the detached model; its confidence decides what stays local.
        confidence_name: The confidence measure, ``CONFIDENCE_MEASURES[task.kind]``.
        tolerance: Accuracy the combined model may lose against attached (0.01 = one point).
        split: Name of the split the scores come from.

    Returns:
        The record to save and every row of the threshold sweep (for :func:`format_selective_table`).

    Raises:
        ValueError: The scores cover different numbers of examples (or none), or were passed in the wrong order.
    """
    problems = []
    if attached.examples != detached.examples:
        problems.append(f"attached scores {attached.examples} examples but detached scores {detached.examples}")
    if attached.mode == "detached" or detached.mode == "attached":
        problems.append(f"got attached={attached.mode!r} and detached={detached.mode!r} scores; are they swapped?")
    if problems:
        raise ValueError("Cannot choose an escalation threshold: " + "; ".join(problems) + ".")
    rows = selective_rows(attached.correct, detached.correct, detached.confidence)
    chosen = choose_threshold(rows, attached.accuracy, tolerance=tolerance)
    record = EscalationRecord(
        confidence=confidence_name,
        threshold=chosen.threshold,
        tolerance=tolerance,
        local_fraction=chosen.local_fraction,
        combined_accuracy=chosen.combined_accuracy,
        attached_accuracy=attached.accuracy,
        detached_accuracy=detached.accuracy,
        detached_ece=expected_calibration_error(detached.confidence, detached.correct),
        examples=detached.examples,
        split=split,
    )
    return record, rows


def format_selective_table(rows: Sequence[SelectiveRow], attached_accuracy: float, chosen: SelectiveRow) -> str:
    """A plain-text table of the threshold sweep for a CLI, the chosen row marked.

    At most :data:`MAX_TABLE_ROWS` rows: with more thresholds an evenly spaced subset, always with the
    first (0.0) row, the last (all-escalated) row and the chosen one.
    """
    shown = range(len(rows))
    if len(rows) > MAX_TABLE_ROWS:
        spaced = MAX_TABLE_ROWS - 1  # leaves room for the chosen row; includes the first and last
        picked = {round(k * (len(rows) - 1) / (spaced - 1)) for k in range(spaced)}
        picked |= {i for i, row in enumerate(rows) if row == chosen}
        shown = sorted(picked)
    lines = [f"{'threshold':>10}  {'local %':>7}  {'local acc %':>11}  {'combined acc %':>14}"]
    for i in shown:
        row = rows[i]
        local_acc = "-" if row.local_accuracy is None else f"{100 * row.local_accuracy:.1f}"
        marker = "  <- chosen" if row == chosen else ""
        lines.append(
            f"{_threshold_text(row.threshold):>10}  {100 * row.local_fraction:>7.1f}  {local_acc:>11}  "
            f"{100 * row.combined_accuracy:>14.1f}{marker}"
        )
    lines.append(
        f"attached accuracy {100 * attached_accuracy:.1f}%; chosen threshold {_threshold_text(chosen.threshold)} "
        f"answers {100 * chosen.local_fraction:.1f}% locally, {100 * chosen.combined_accuracy:.1f}% combined accuracy."
    )
    return "\n".join(lines)


def _threshold_text(threshold: float) -> str:
    """Four decimals; ``1.0000+`` for the all-escalated threshold just above 1.0."""
    return "1.0000+" if threshold > 1.0 else f"{threshold:.4f}"

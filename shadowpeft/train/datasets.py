"""Task data for ``shadowpeft train``: a built-in corpus or a JSONL file, deduplicated and split.

A JSONL file holds one JSON object per line; the first record's fields pick the schema, which
every line must then follow exactly (blank lines are skipped):

==============  ================================  ========================================
kind            fields                            example
==============  ================================  ========================================
generation      ``prompt``, ``completion``        ``{"prompt": "2+2=", "completion": "4"}``
classification  ``text``, ``label`` (str or int)  ``{"text": "great film", "label": "pos"}``
lm              ``text``                          ``{"text": "Once upon a time"}``
==============  ================================  ========================================

Built-in tasks (see :mod:`shadowpeft.train.corpora` for sources): ``sentiment`` (classification of
tweets), ``intent`` (generation: name the intent of an utterance) and ``shakespeare`` (lm).

From rows to splits::

    rows -> deduplicate -> [max_examples subset] -> split by hash -> TaskData(train, test)

* Deduplicate: exact repeats of a record are dropped (first kept). A classification text seen
  with different labels is dropped entirely, since one of its labels must be wrong. A generation
  prompt may keep several different completions.
* Split: a row is a test row iff ``sha256(f"{seed}:{input JSON}")``, read as a number in
  [0, 1), is below ``test_fraction``. The input is the prompt (generation) or the text, so every
  copy of an input lands in the same split and a test input is never trained on. The rule looks
  at one row only: appending rows never moves an existing row between splits.
* ``max_examples`` keeps the rows with the smallest value of a second hash (a fixed random subset,
  not biased by file order); a kept row sits in the same split as without the limit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from shadowpeft.errors import DataError
from shadowpeft.train.corpora import read_intent, read_sentiment, read_shakespeare

logger = logging.getLogger(__name__)

Kind = Literal["generation", "classification", "lm"]
SCHEMAS: dict[Kind, tuple[str, ...]] = {
    "generation": ("prompt", "completion"),
    "classification": ("text", "label"),
    "lm": ("text",),
}
# Generation tasks with at most this many distinct completions list them in TaskData.labels.
MAX_GENERATION_LABELS = 50
# Invalid lines quoted in one DataError; the rest are counted.
MAX_REPORTED_PROBLEMS = 10
INTENT_INSTRUCTION = "Classify the intent of the utterance. Answer with exactly one of: {choices}."


@dataclass(frozen=True)
class GenerationExample:
    """A prompt and the completion the model should learn to produce after it."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class ClassificationExample:
    """A text and its class name."""

    text: str
    label: str


@dataclass(frozen=True)
class TextExample:
    """Plain text for language modelling."""

    text: str


Example = GenerationExample | ClassificationExample | TextExample
EXAMPLE_TYPES: dict[Kind, type] = {
    "generation": GenerationExample,
    "classification": ClassificationExample,
    "lm": TextExample,
}


@dataclass(frozen=True)
class TaskData:
    """A task's examples, split into disjoint train and test tuples.

    Attributes:
        name: Built-in name or the JSONL file's stem.
        kind: ``"generation"``, ``"classification"`` or ``"lm"``; all examples have the matching type.
        train: Training examples, in source order.
        test: Held-out examples, in source order; no input occurs in both splits.
        labels: Sorted class names (classification); for generation the sorted distinct
            completions when there are at most :data:`MAX_GENERATION_LABELS`, else empty; empty for lm.
    """

    name: str
    kind: Kind
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in get_args(Kind):
            raise DataError(f"TaskData kind {self.kind!r} is not one of {', '.join(get_args(Kind))}.")


def load_task_data(
    name_or_path: str | os.PathLike[str],
    *,
    test_fraction: float = 0.2,
    max_examples: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Load a built-in task or a JSONL file, deduplicate it and split it into train and test.

    Built-in names take precedence over files of the same name; write ``./sentiment`` for a file.

    Args:
        name_or_path: ``"sentiment"``, ``"intent"``, ``"shakespeare"`` or a path to a JSONL file.
        test_fraction: Expected share of rows held out for test, in [0, 1).
        max_examples: Keep at most this many rows (a fixed pseudo-random subset) before splitting.
        seed: Changes which rows are held out (and which are kept by ``max_examples``).

    Returns:
        The split task.

    Raises:
        DataError: Bad arguments, an unknown name, a missing package or cache file, or an invalid
            JSONL file (every invalid line up to :data:`MAX_REPORTED_PROBLEMS` is quoted).
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction!r} must be in [0, 1), e.g. 0.2 to hold out a fifth.")
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples={max_examples!r} must be at least 1, or None for every example.")
    key = os.fspath(name_or_path)
    if key in BUILTIN_TASKS:
        name, (kind, examples) = key, BUILTIN_TASKS[key]()
    else:
        path = Path(key).expanduser()
        if not path.exists() and not _looks_like_path(key):
            raise DataError(
                f"Unknown data {key!r}: it is neither a built-in task ({', '.join(sorted(BUILTIN_TASKS))}) "
                "nor an existing file. Pass one of those names or the path of a JSONL file."
            )
        name, (kind, examples) = path.stem, read_jsonl(path)
    return build_task(name, kind, examples, test_fraction=test_fraction, max_examples=max_examples, seed=seed)


def build_task(
    name: str,
    kind: Kind,
    examples: list[Example],
    *,
    test_fraction: float = 0.2,
    max_examples: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Deduplicate, optionally subsample, and split examples (the rules are in the module docstring).

    Args:
        name: Task name.
        kind: Task kind; every example must be of its type.
        examples: The rows in source order.
        test_fraction: Expected share of rows held out for test, in [0, 1).
        max_examples: Keep at most this many rows before splitting.
        seed: Salt of the split and subset hashes.

    Returns:
        The split task.

    Raises:
        DataError: Rows of another kind, no rows, fewer than 2 classes, or no training rows left after the split.
    """
    wrong = [type(e).__name__ for e in examples if not isinstance(e, EXAMPLE_TYPES[kind])]
    if wrong:
        raise DataError(f"Task {name!r} is {kind} but holds {len(wrong)} {wrong[0]} rows; expected only {kind} rows.")
    rows = deduplicate(examples)
    if max_examples is not None and len(rows) > max_examples:
        ranked = sorted(range(len(rows)), key=lambda i: _unit_hash(f"subset:{seed}:{_record_json(rows[i])}"))
        rows = [rows[i] for i in sorted(ranked[:max_examples])]
    if not rows:
        raise DataError(f"Task {name!r} has no examples. Add at least one record.")
    labels = _labels(kind, rows)
    if kind == "classification" and len(labels) < 2:
        raise DataError(
            f"Task {name!r} is a classification task but every example has the label {labels[0]!r}; "
            'a classifier needs at least 2 labels. Add examples of other classes, or use {"text"} records '
            "to train a language model instead."
        )
    held_out = [in_test_split(r, test_fraction=test_fraction, seed=seed) for r in rows]
    train = tuple(r for r, out in zip(rows, held_out, strict=True) if not out)
    test = tuple(r for r, out in zip(rows, held_out, strict=True) if out)
    if not train:
        raise DataError(
            f"Task {name!r}: all {len(rows)} examples fell into the test split (test_fraction={test_fraction}). "
            "Add examples or lower test_fraction."
        )
    if not test and test_fraction > 0:
        logger.warning("Task %r: no example fell into the test split (%d rows); add rows to evaluate", name, len(rows))
    logger.info("Task %r (%s): %d train, %d test, %d labels", name, kind, len(train), len(test), len(labels))
    return TaskData(name=name, kind=kind, train=train, test=test, labels=labels)


def deduplicate(examples: list[Example]) -> list[Example]:
    """Drop repeated records (keeping the first) and classification texts that carry several labels.

    Args:
        examples: Rows in source order.

    Returns:
        The remaining rows, in source order.
    """
    unique = list(dict.fromkeys(examples))  # frozen dataclasses hash by value
    seen_labels: dict[str, set[str]] = defaultdict(set)
    for row in unique:
        if isinstance(row, ClassificationExample):
            seen_labels[row.text].add(row.label)
    ambiguous = {text for text, labels in seen_labels.items() if len(labels) > 1}
    if ambiguous:
        logger.warning("Dropping %d texts that occur with different labels", len(ambiguous))
    kept = [row for row in unique if not (isinstance(row, ClassificationExample) and row.text in ambiguous)]
    if len(kept) != len(examples):
        logger.info("Deduplication kept %d of %d rows", len(kept), len(examples))
    return kept


def in_test_split(example: Example, *, test_fraction: float, seed: int = 0) -> bool:
    """Tell whether a row belongs to the test split; depends on the row's input and ``seed`` only.

    Args:
        example: The row; its prompt (generation) or text decides.
        test_fraction: Expected share of test rows, in [0, 1).
        seed: Hash salt.

    Returns:
        True for a test row.
    """
    field = "prompt" if isinstance(example, GenerationExample) else "text"
    key = json.dumps({field: getattr(example, field)}, ensure_ascii=False)
    return _unit_hash(f"{seed}:{key}") < test_fraction


def intent_prompt(utterance: str, intents: tuple[str, ...]) -> str:
    """Build the instruction for one BIG-bench intent example.

    Args:
        utterance: The example's ``input`` (``"Utterance: ..."``).
        intents: The intent names to choose from, in the task's order.

    Returns:
        Instruction, blank line, utterance, and ``"Intent:"`` on a line of its own.
    """
    return f"{INTENT_INSTRUCTION.format(choices=', '.join(intents))}\n\n{utterance}\nIntent:"


def read_jsonl(path: str | os.PathLike[str]) -> tuple[Kind, list[Example]]:
    """Read and validate a JSONL data file (schemas in the module docstring).

    Args:
        path: The file.

    Returns:
        The kind chosen by the first record, and the examples in file order.

    Raises:
        DataError: The file is missing, a directory, unreadable, not UTF-8, empty, or has invalid
            lines (all collected; the first :data:`MAX_REPORTED_PROBLEMS` are quoted as ``path:line``).
    """
    path = Path(path)
    lines = _read_text(path).splitlines()
    kind: Kind | None = None
    examples: list[Example] = []
    problems: list[str] = []
    nonblank = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        nonblank += 1
        record, problem = _parse_object(line)
        if record is not None and kind is None:
            kind = _detect_kind(record)
        if record is not None and problem is None:
            problem = _check_record(record, kind)
        if problem is not None:
            problems.append(f"{path}:{lineno}: {problem}")
        elif kind is not None and record is not None:
            examples.append(_make_example(kind, record))
    if problems:
        raise DataError(_problems_message(path, problems, nonblank, kind))
    if kind is None:
        raise DataError(
            f"{path} contains no examples (it is empty or has only blank lines). Write one JSON object per line, "
            f'e.g. {{"prompt": "2+2=", "completion": "4"}}.'
        )
    return kind, examples


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, with a DataError for every way that can fail."""
    if not path.exists():
        raise DataError(
            f"Data file {str(path)!r} does not exist (looked at {path.absolute()}). Pass an existing JSONL file or "
            f"a built-in task: {', '.join(sorted(BUILTIN_TASKS))}."
        )
    if path.is_dir():
        raise DataError(f"Data path {str(path)!r} is a directory; pass the JSONL file inside it instead.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read data file {str(path)!r}: {exc.strerror}. Check that it is readable.") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}). Save the file as UTF-8 JSONL."
        ) from exc


def _parse_object(line: str) -> tuple[dict[str, Any] | None, str | None]:
    """Parse one line as a JSON object: ``(record, None)`` or ``(None, problem)``."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON: {exc.msg} (column {exc.colno})"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {_json_type(value)} {_preview(value)}"
    return value, None


def _detect_kind(record: dict[str, Any]) -> Kind | None:
    """The schema sharing most fields with ``record`` (fewest missing on a tie); None if none shares any."""
    scored = [(len(set(fields) & set(record)), -len(fields), kind) for kind, fields in SCHEMAS.items()]
    overlap, _, kind = max(scored)
    return kind if overlap else None


def _check_record(record: dict[str, Any], kind: Kind | None) -> str | None:
    """Everything wrong with one record under ``kind``, joined by ``"; "``, or None."""
    if kind is None:
        return f"fields {_names(record)} match no schema"
    fields = SCHEMAS[kind]
    problems = []
    unknown = [key for key in record if key not in fields]
    if unknown:
        problems.append(f"unknown field(s) {_names(unknown)} (a {kind} record has exactly {_names(fields)})")
    missing = [key for key in fields if key not in record]
    if missing:
        problems.append(f"missing field(s) {_names(missing)}")
    for key in fields:
        if key not in record:
            continue
        value = record[key]
        if key == "label" and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, str):
            allowed = "a string or an integer" if key == "label" else "a string"
            problems.append(f"{key!r} must be {allowed}, got {_json_type(value)} {_preview(value)}")
        elif not value.strip():
            problems.append(f"{key!r} is empty")
    return "; ".join(problems) or None


def _make_example(kind: Kind, record: dict[str, Any]) -> Example:
    """Build the example of ``kind`` from a record that passed :func:`_check_record`."""
    if kind == "generation":
        return GenerationExample(prompt=record["prompt"], completion=record["completion"])
    if kind == "classification":
        return ClassificationExample(text=record["text"], label=str(record["label"]))
    return TextExample(text=record["text"])


def _problems_message(path: Path, problems: list[str], nonblank: int, kind: Kind | None) -> str:
    """One paragraph: how many lines are bad, the first few with ``path:line``, and the schema to follow."""
    shown = "\n".join(f"  {p}" for p in problems[:MAX_REPORTED_PROBLEMS])
    more = len(problems) - MAX_REPORTED_PROBLEMS
    schemas = ", ".join(f"{{{', '.join(json.dumps(f) for f in fields)}}} ({k})" for k, fields in SCHEMAS.items())
    chosen = f"; the first record selected {kind}" if kind else ""
    return (
        f"{path}: {len(problems)} of {nonblank} non-blank lines are invalid:\n{shown}\n"
        + (f"  ... and {more} more\n" if more > 0 else "")
        + f"Fix: every line must be one JSON object with exactly the fields of one schema, the same for the whole "
        f"file: {schemas}{chosen}. Values are strings (a label may be an integer); blank lines are skipped."
    )


def _labels(kind: Kind, rows: list[Example]) -> tuple[str, ...]:
    """TaskData.labels for ``rows`` (see :class:`TaskData`)."""
    if kind == "classification":
        return tuple(sorted({r.label for r in rows if isinstance(r, ClassificationExample)}))
    if kind == "generation":
        completions = {r.completion for r in rows if isinstance(r, GenerationExample)}
        return tuple(sorted(completions)) if len(completions) <= MAX_GENERATION_LABELS else ()
    return ()


def _record_json(example: Example) -> str:
    """A row's full record as canonical JSON (what the subset hash reads)."""
    return json.dumps(example.__dict__, ensure_ascii=False, sort_keys=True)


def _unit_hash(text: str) -> float:
    """sha256 of ``text`` as a number in [0, 1) (its first 8 bytes over 2**64)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _looks_like_path(name: str) -> bool:
    """A string meant as a file: it has a directory part or an extension."""
    return os.sep in name or "/" in name or Path(name).suffix != ""


def _names(keys: Any) -> str:
    return ", ".join(repr(k) for k in keys)


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _preview(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sentiment() -> tuple[Kind, list[Example]]:
    return "classification", [ClassificationExample(text=t, label=label) for t, label in read_sentiment()]


def _intent() -> tuple[Kind, list[Example]]:
    corpus = read_intent()
    return "generation", [GenerationExample(intent_prompt(u, corpus.intents), i) for u, i in corpus.examples]


def _shakespeare() -> tuple[Kind, list[Example]]:
    return "lm", [TextExample(text=chunk) for chunk in read_shakespeare()]


BUILTIN_TASKS: dict[str, Callable[[], tuple[Kind, list[Example]]]] = {
    "intent": _intent,
    "sentiment": _sentiment,
    "shakespeare": _shakespeare,
}

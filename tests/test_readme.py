"""The README starts with exactly two set-up commands, and CI runs the second one verbatim."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    before = text.split("```sh\n", 1)[0]
    assert before.strip().startswith("# ") and before.strip().count("\n") == 0, "README must open with the commands"
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    commands = _setup_commands()
    assert len(commands) == 2
    install = commands[0].split(" && .venv/bin/shadowpeft demo")[0]
    assert commands[0].endswith(".venv/bin/shadowpeft demo")
    assert commands[1].startswith(install + " && ")
    assert "torch" not in commands[0].split("requirements")[0], "torch must come from requirements.txt"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert _setup_commands()[1] in ci.splitlines()


def test_torch_pinned_in_the_same_requirements_file_as_everything_else():
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    pins = [line for line in lines if line and not line.startswith("#")]
    assert "torch==2.13.0" in pins and "transformers==5.23.0" in pins
    assert all("==" in pin for pin in pins)

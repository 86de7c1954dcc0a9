"""Tests for shadowpeft.runtime.devices: device profiles in devices/*.toml."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest

from shadowpeft.runtime.contract import WEIGHT_FORMATS
from shadowpeft.runtime.devices import (
    DEVICES_DIR,
    PROVIDERS,
    DeviceProfile,
    list_device_profiles,
    load_device_profile,
)
from shadowpeft.runtime.errors import DeviceProfileError

REPO_DEVICES = Path(__file__).resolve().parents[2] / "devices"
SHIPPED = sorted(path.stem for path in REPO_DEVICES.glob("*.toml"))

VALID = """\
name = "{name}"
description = "Test board"
providers = ["CPUExecutionProvider"]
intra_op_threads = 2
weights = "int4"
"""


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def _problems(tmp_path: Path, text: str, name: str = "board") -> tuple[str, ...]:
    path = _write(tmp_path, name, text)
    with pytest.raises(DeviceProfileError) as info:
        load_device_profile(path)
    assert str(info.value).startswith(f"Invalid device profile {path} (")
    for problem in info.value.problems:
        assert problem in str(info.value)
    return info.value.problems


def _one_problem(tmp_path: Path, text: str, name: str = "board") -> str:
    problems = _problems(tmp_path, text, name)
    assert len(problems) == 1, problems
    return problems[0]


# --- shipped profiles ------------------------------------------------------------------------------


def test_devices_dir_holds_the_repository_profiles() -> None:
    # DEVICES_DIR is devices/ itself in a source checkout and the package-data copy in an install.
    for name in SHIPPED:
        assert (DEVICES_DIR / f"{name}.toml").read_text() == (REPO_DEVICES / f"{name}.toml").read_text()


def test_the_three_targets_ship() -> None:
    assert {"x86-64-laptop", "arm64-phone", "raspberry-pi-5"} <= set(SHIPPED)
    assert list_device_profiles() == tuple(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads(name: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        profile = load_device_profile(name)
    assert not caplog.records, "a shipped profile must not set keys that are ignored"
    assert profile.name == name
    assert load_device_profile(REPO_DEVICES / f"{name}.toml") == profile
    assert load_device_profile(str(REPO_DEVICES / f"{name}.toml")) == profile
    assert profile.providers and set(profile.providers) <= set(PROVIDERS)
    assert profile.intra_op_threads >= 1
    assert profile.weights in WEIGHT_FORMATS
    assert profile.memory_budget_mb is not None, "shipped profiles state their memory budget"


def test_shipped_values() -> None:
    laptop = load_device_profile("x86-64-laptop")
    assert laptop.providers == ("CPUExecutionProvider",)
    assert laptop.weights in ("fp32", "int8")
    assert (laptop.intra_op_threads, laptop.memory_budget_mb, laptop.ort_format) == (4, 8192, False)

    phone = load_device_profile("arm64-phone")
    assert phone.providers == ("XnnpackExecutionProvider", "CPUExecutionProvider")
    assert (phone.weights, phone.int4_block_size, phone.int4_accuracy_level) == ("int4", 32, 4)
    assert (phone.intra_op_threads, phone.memory_budget_mb, phone.ort_format) == (4, 1500, True)

    pi = load_device_profile("raspberry-pi-5")
    assert pi.providers == ("CPUExecutionProvider",)
    assert pi.weights in ("int8", "int4")
    assert (pi.intra_op_threads, pi.memory_budget_mb) == (4, 2048)


def test_readme_documents_every_key() -> None:
    readme = (REPO_DEVICES / "README.md").read_text()
    for field in dataclasses.fields(DeviceProfile):
        assert re.search(rf"^\| `{field.name}` \|", readme, re.MULTILINE), f"devices/README.md lacks {field.name}"
    for name in SHIPPED:
        assert f"`{name}`" in readme


# --- loading ---------------------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    profile = load_device_profile(_write(tmp_path, "board", VALID.format(name="board")))
    assert profile == DeviceProfile(
        name="board",
        description="Test board",
        providers=("CPUExecutionProvider",),
        intra_op_threads=2,
        weights="int4",
        int4_block_size=32,
        int4_accuracy_level=4,
        max_context=2048,
        memory_budget_mb=None,
        ort_format=False,
    )
    assert profile.to_dict()["providers"] == ["CPUExecutionProvider"]
    assert DeviceProfile.from_dict(profile.to_dict()) == profile


def test_name_lookup_in_a_directory(tmp_path: Path) -> None:
    _write(tmp_path, "board", VALID.format(name="board"))
    assert load_device_profile("board", directory=tmp_path).name == "board"
    assert list_device_profiles(tmp_path) == ("board",)


def test_unknown_name_lists_available() -> None:
    with pytest.raises(DeviceProfileError) as info:
        load_device_profile("iphone-99")
    message = str(info.value)
    assert message.startswith("Unknown device profile 'iphone-99'. Available: arm64-phone, raspberry-pi-5")
    assert "x86-64-laptop" in message
    assert "Pass one of these names, or a path to a .toml file." in message


def test_unknown_name_with_no_profiles(tmp_path: Path) -> None:
    with pytest.raises(DeviceProfileError, match=r"Available: none \(no \.toml files in "):
        load_device_profile("board", directory=tmp_path)
    with pytest.raises(DeviceProfileError, match=r"Available: none \(.* does not exist"):
        load_device_profile("board", directory=tmp_path / "absent")
    assert list_device_profiles(tmp_path / "absent") == ()


def test_missing_file_path(tmp_path: Path) -> None:
    with pytest.raises(DeviceProfileError, match=r"Device profile file '.*nope\.toml' does not exist"):
        load_device_profile(tmp_path / "nope.toml")


def test_unreadable_toml_names_file_and_parser_message(tmp_path: Path) -> None:
    path = _write(tmp_path, "board", 'name = "board"\nintra_op_threads = = 4\n')
    with pytest.raises(DeviceProfileError) as info:
        load_device_profile(path)
    message = str(info.value)
    assert message.startswith(f"Cannot parse device profile {str(path)!r}: ")
    assert "(at line 2, column" in message  # tomllib's own message
    assert "Fix the TOML syntax" in message


def test_unknown_key(tmp_path: Path) -> None:
    problem = _one_problem(tmp_path, VALID.format(name="board") + "threads = 4\n")
    assert problem.startswith("unknown key 'threads'. Allowed keys: name, description, providers, intra_op_threads")
    assert "ort_format" in problem


def test_missing_key(tmp_path: Path) -> None:
    text = VALID.format(name="board").replace("intra_op_threads = 2\n", "")
    problem = _one_problem(tmp_path, text)
    assert problem == "missing required key 'intra_op_threads' (an integer). Add it, e.g. intra_op_threads = 4."


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('intra_op_threads = "4"', "intra_op_threads must be an integer; got '4' (str). Write it as e.g."),
        ("intra_op_threads = true", "intra_op_threads must be an integer; got True (bool)"),
        ("intra_op_threads = 4.0", "intra_op_threads must be an integer; got 4.0 (float)"),
        ('providers = "CPUExecutionProvider"', "providers must be an array of strings; got 'CPUExecutionProvider'"),
        ("providers = [1]", "providers must be an array of strings; got [1] (list)"),
        ("ort_format = 1", "ort_format must be a boolean; got 1 (int). Write it as e.g. ort_format = true."),
        ('memory_budget_mb = "1G"', "memory_budget_mb must be an integer; got '1G' (str)"),
        ("weights = 4", "weights must be a string; got 4 (int)"),
    ],
)
def test_wrong_type(tmp_path: Path, line: str, expected: str) -> None:
    key = line.split(" = ")[0]
    text = "\n".join(row for row in VALID.format(name="board").splitlines() if not row.startswith(key + " "))
    assert _one_problem(tmp_path, f"{text}\n{line}\n").startswith(expected)


@pytest.mark.parametrize("threads", [0, -2])
def test_threads_below_one(tmp_path: Path, threads: int) -> None:
    text = VALID.format(name="board").replace("intra_op_threads = 2", f"intra_op_threads = {threads}")
    assert _one_problem(tmp_path, text).startswith(f"intra_op_threads must be >= 1; got {threads}.")


@pytest.mark.parametrize("size", [8, 48, 0, 100])
def test_int4_block_size_not_power_of_two_ge_16(tmp_path: Path, size: int) -> None:
    problem = _one_problem(tmp_path, VALID.format(name="board") + f"int4_block_size = {size}\n")
    assert problem.startswith(f"int4_block_size must be a power of two >= 16 (16, 32, 64, 128, ...); got {size}.")


@pytest.mark.parametrize("size", [16, 32, 64, 128, 256])
def test_int4_block_sizes_allowed(tmp_path: Path, size: int) -> None:
    path = _write(tmp_path, "board", VALID.format(name="board") + f"int4_block_size = {size}\n")
    assert load_device_profile(path).int4_block_size == size


def test_unknown_provider_lists_allowed(tmp_path: Path) -> None:
    text = VALID.format(name="board").replace('["CPUExecutionProvider"]', '["TensorRT", "CPUExecutionProvider"]')
    problem = _one_problem(tmp_path, text)
    assert problem.startswith("providers[0] 'TensorRT' is not a supported onnxruntime execution provider.")
    assert "Allowed: " + ", ".join(PROVIDERS) in problem


def test_empty_and_duplicate_providers(tmp_path: Path) -> None:
    empty = VALID.format(name="board").replace('["CPUExecutionProvider"]', "[]")
    assert _one_problem(tmp_path, empty).startswith("providers must list at least one execution provider; got []")
    twice = VALID.format(name="board").replace(
        '["CPUExecutionProvider"]', '["CPUExecutionProvider", "CPUExecutionProvider"]'
    )
    assert "lists 'CPUExecutionProvider' more than once" in _one_problem(tmp_path, twice)


def test_name_must_equal_file_stem(tmp_path: Path) -> None:
    problem = _one_problem(tmp_path, VALID.format(name="other-board"), name="board")
    assert problem == (
        "name 'other-board' does not match the file name 'board.toml'; a profile's name must equal its file "
        "stem. Rename the file to 'other-board.toml' or set name = 'board'."
    )


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("weights", '"int3"', "weights must be one of 'fp32', 'fp16', 'int8', 'int4'; got 'int3'."),
        ("int4_accuracy_level", "5", "int4_accuracy_level must be one of 0, 1, 2, 3, 4"),
        ("max_context", "0", "max_context must be >= 1 token; got 0."),
        ("memory_budget_mb", "0", "memory_budget_mb must be >= 1 (MiB); got 0. Omit the key for no budget."),
        ("description", '" "', "description must not be empty"),
    ],
)
def test_bad_values(tmp_path: Path, key: str, value: str, expected: str) -> None:
    text = "\n".join(row for row in VALID.format(name="board").splitlines() if not row.startswith(key + " "))
    assert _one_problem(tmp_path, f"{text}\n{key} = {value}\n").startswith(expected)


def test_bad_name(tmp_path: Path) -> None:
    problem = _one_problem(tmp_path, VALID.format(name="My Board"), name="My Board")
    assert problem.startswith("name must be lowercase letters and digits joined by '-', '_' or '.'")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """\
name = "elsewhere"
providers = ["Cpu"]
intra_op_threads = 0
weights = "int4"
int4_block_size = 24
colour = "blue"
"""
    problems = _problems(tmp_path, text)
    assert len(problems) == 6, problems
    assert problems[0].startswith("unknown key 'colour'")
    assert problems[1].startswith("missing required key 'description'")
    assert problems[2].startswith("providers[0] 'Cpu'")
    assert problems[3].startswith("intra_op_threads must be >= 1")
    assert problems[4].startswith("int4_block_size must be a power of two")
    assert problems[5].startswith("name 'elsewhere' does not match the file name 'board.toml'")


def test_int4_keys_with_other_weights_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = VALID.format(name="board").replace('"int4"', '"int8"') + "int4_block_size = 64\n"
    with caplog.at_level(logging.WARNING, logger="shadowpeft.runtime.devices"):
        profile = load_device_profile(_write(tmp_path, "board", text))
    assert profile.weights == "int8"
    assert "sets int4_block_size = 64 but weights = 'int8'" in caplog.text
    assert "is ignored" in caplog.text


def test_construction_in_code_is_validated() -> None:
    with pytest.raises(DeviceProfileError) as info:
        DeviceProfile("x", "d", ("CPUExecutionProvider",), intra_op_threads=0, weights="int4", int4_block_size=20)
    assert str(info.value).startswith("Invalid device profile 'x' (2 problems):")
    profile = DeviceProfile("x", "d", ["CPUExecutionProvider"], 1, "fp32")  # type: ignore[arg-type]
    assert profile.providers == ("CPUExecutionProvider",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.intra_op_threads = 3  # type: ignore[misc]


def test_from_dict_accepts_none_budget() -> None:
    data = {"name": "x", "description": "d", "providers": ["CPUExecutionProvider"], "intra_op_threads": 1}
    profile = DeviceProfile.from_dict({**data, "weights": "fp16", "memory_budget_mb": None})
    assert profile.memory_budget_mb is None
    with pytest.raises(DeviceProfileError, match=r"^Invalid device profile <dict> \(1 problem\)"):
        DeviceProfile.from_dict(data)

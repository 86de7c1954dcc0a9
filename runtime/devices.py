"""Device profiles: where and how an export runs (``devices/<name>.toml``).

A profile names the onnxruntime execution providers, the thread count, the weight format the
export quantizes to (and its int4 parameters), the context length and the memory budget of one
target device. ``shadow-export --device NAME`` applies one; the runtime opens sessions from it.

One TOML file per device, keys = :class:`DeviceProfile` fields, file stem = ``name``. Every key is
documented in ``devices/README.md``. Loading validates every key and raises one
:class:`~shadowpeft.runtime.errors.DeviceProfileError` that lists every problem.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shadowpeft.runtime.contract.weights import INT4, INT4_ACCURACY_LEVELS, WEIGHT_FORMATS, WeightFormat
from shadowpeft.runtime.errors import DeviceProfileError, format_problems

__all__ = [
    "DEVICES_DIR",
    "PROFILE_SUFFIX",
    "PROVIDERS",
    "DeviceProfile",
    "list_device_profiles",
    "load_device_profile",
]

logger = logging.getLogger(__name__)

#: onnxruntime execution providers a profile may name, spelled as onnxruntime spells them.
PROVIDERS: tuple[str, ...] = (
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "CoreMLExecutionProvider",
    "NnapiExecutionProvider",
    "XnnpackExecutionProvider",
    "QNNExecutionProvider",
)

#: The repository's ``devices/`` folder. In a regular install it must ship as package data at
#: ``shadowpeft/devices/`` (beside ``shadowpeft/runtime/``), which this same expression finds.
DEVICES_DIR: Path = Path(__file__).resolve().parent.parent / "devices"
PROFILE_SUFFIX = ".toml"

_NAME_PATTERN = re.compile(r"[a-z0-9]+(?:[-_.][a-z0-9]+)*")
_INT4_KEYS = ("int4_block_size", "int4_accuracy_level")

# Expected TOML type of every key: kind -> (description, example for the fix).
_KINDS: dict[str, tuple[str, str]] = {
    "str": ("a string", '"text"'),
    "int": ("an integer", "4"),
    "bool": ("a boolean", "true"),
    "providers": ("an array of strings", '["CPUExecutionProvider"]'),
}
_FIELD_KINDS: dict[str, str] = {
    "name": "str",
    "description": "str",
    "providers": "providers",
    "intra_op_threads": "int",
    "weights": "str",
    "int4_block_size": "int",
    "int4_accuracy_level": "int",
    "max_context": "int",
    "memory_budget_mb": "int",
    "ort_format": "bool",
}


@dataclass(frozen=True)
class DeviceProfile:
    """One target device: execution providers, threads, weight format and limits.

    Attributes:
        name: Profile name; equals the file stem of ``devices/<name>.toml``.
        description: The hardware this profile targets, for humans.
        providers: onnxruntime execution providers in priority order (see :data:`PROVIDERS`).
        intra_op_threads: Threads of onnxruntime's intra-op pool (>= 1).
        weights: Weight format the export quantizes to: ``fp32``, ``fp16``, ``int8`` or ``int4``
            (both block-wise MatMulNBits weights; see ``shadowpeft.export.quantize``).
        int4_block_size: Block size of int4 quantization (power of two >= 16); used only when
            ``weights == "int4"``.
        int4_accuracy_level: MatMulNBits ``accuracy_level`` (0-4); used only when ``weights == "int4"``.
        max_context: Longest sequence (prompt + generated tokens) the runtime allows.
        memory_budget_mb: Memory the export may use on the device, or ``None`` for no budget.
        ort_format: Whether the export also converts graphs to the ``.ort`` format for mobile builds (the
            runtime then loads those copies, see ``shadowpeft.runtime.graph_format``).

    Raises:
        DeviceProfileError: On construction, listing every invalid field.
    """

    name: str
    description: str
    providers: tuple[str, ...]
    intra_op_threads: int
    weights: WeightFormat
    int4_block_size: int = 32
    int4_accuracy_level: int = 4
    max_context: int = 2048
    memory_budget_mb: int | None = None
    ort_format: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.providers, list):
            object.__setattr__(self, "providers", tuple(self.providers))
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        problems = _field_problems(values)
        if problems:
            header = f"Invalid device profile {self.name!r} ({_count(problems)}):"
            raise DeviceProfileError(format_problems(header, problems), problems=problems)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> DeviceProfile:
        """Builds a profile from parsed TOML, checking every key.

        Args:
            data: Keys and values as ``tomllib`` returns them.
            source: Where ``data`` came from, for the error message.

        Returns:
            The validated profile.

        Raises:
            DeviceProfileError: Listing every unknown, missing or invalid key.
        """
        if not isinstance(data, Mapping):
            raise DeviceProfileError(f"A device profile must be a table of keys; got {data!r} from {source}.")
        return _build(data, _data_problems(data), source)

    @classmethod
    def from_file(cls, path: str | Path) -> DeviceProfile:
        """Reads and validates one ``<name>.toml`` profile file.

        Args:
            path: The TOML file. Its stem must equal the ``name`` key.

        Returns:
            The validated profile.

        Raises:
            DeviceProfileError: If the file cannot be read or parsed, or listing every invalid key.
        """
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DeviceProfileError(
                f"Device profile file {str(path)!r} does not exist. Pass an existing .toml file or one "
                f"of the profile names: {_available(DEVICES_DIR)}."
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DeviceProfileError(f"Cannot read device profile {str(path)!r}: {exc}.") from exc
        except tomllib.TOMLDecodeError as exc:
            raise DeviceProfileError(
                f"Cannot parse device profile {str(path)!r}: {exc}. Fix the TOML syntax (keys are "
                "documented in devices/README.md)."
            ) from exc
        problems = _data_problems(data)
        name = data.get("name")
        if isinstance(name, str) and name != path.stem:
            problems.append(
                f"name {name!r} does not match the file name {path.name!r}; a profile's name must equal "
                f"its file stem. Rename the file to '{name}{PROFILE_SUFFIX}' or set name = {path.stem!r}."
            )
        return _build(data, problems, str(path))

    def to_dict(self) -> dict[str, Any]:
        """Returns the profile as plain data (providers as a list), e.g. for logs or a manifest."""
        data = dataclasses.asdict(self)
        data["providers"] = list(self.providers)
        return data


def list_device_profiles(directory: str | Path | None = None) -> tuple[str, ...]:
    """Names of the profiles in a devices folder, sorted.

    Args:
        directory: Folder of ``<name>.toml`` files; defaults to :data:`DEVICES_DIR`.

    Returns:
        The file stems of every ``*.toml`` file, or ``()`` if the folder does not exist.
    """
    folder = DEVICES_DIR if directory is None else Path(directory)
    if not folder.is_dir():
        return ()
    return tuple(sorted(path.stem for path in folder.glob(f"*{PROFILE_SUFFIX}") if path.is_file()))


def load_device_profile(name_or_path: str | Path, *, directory: str | Path | None = None) -> DeviceProfile:
    """Loads a device profile by name (``devices/<name>.toml``) or from a TOML file path.

    A :class:`~pathlib.Path`, or a string ending in ``.toml`` or containing a path separator, is a
    file path; anything else is a profile name looked up in ``directory``.

    Args:
        name_or_path: A profile name such as ``"raspberry-pi-5"``, or a path to a ``.toml`` file.
        directory: Folder that names are looked up in; defaults to :data:`DEVICES_DIR`.

    Returns:
        The validated profile.

    Raises:
        DeviceProfileError: For an unknown name (listing the available ones), an unreadable file, or
            listing every invalid key.
    """
    text = str(name_or_path)
    is_path = isinstance(name_or_path, Path) or text.endswith(PROFILE_SUFFIX) or "/" in text or os.sep in text
    if is_path:
        return DeviceProfile.from_file(name_or_path)
    folder = DEVICES_DIR if directory is None else Path(directory)
    path = folder / f"{text}{PROFILE_SUFFIX}"
    if not path.is_file():
        raise DeviceProfileError(
            f"Unknown device profile {text!r}. Available: {_available(folder)}. Pass one of these names, "
            f"or a path to a {PROFILE_SUFFIX} file."
        )
    return DeviceProfile.from_file(path)


def _available(folder: Path) -> str:
    names = list_device_profiles(folder)
    if names:
        return f"{', '.join(names)} (in {folder})"
    if not folder.is_dir():
        return f"none ({folder} does not exist; is shadowpeft installed with its devices/ data?)"
    return f"none (no {PROFILE_SUFFIX} files in {folder})"


def _build(data: Mapping[str, Any], problems: list[str], source: str) -> DeviceProfile:
    if problems:
        header = f"Invalid device profile {source} ({_count(problems)}); fix these keys (see devices/README.md):"
        raise DeviceProfileError(format_problems(header, problems), problems=problems)
    weights = data["weights"]
    for key in _INT4_KEYS:
        if key in data and weights != INT4:
            logger.warning(
                "Device profile %s sets %s = %r but weights = %r; it is used only with weights = 'int4' "
                "and is ignored.",
                source,
                key,
                data[key],
                weights,
            )
    values = dict(data)
    values["providers"] = tuple(values["providers"])
    return DeviceProfile(**values)


def _data_problems(data: Mapping[str, Any]) -> list[str]:
    """Every unknown, missing or invalid key of parsed profile data."""
    return _key_problems(data) + _field_problems({k: v for k, v in data.items() if k in _FIELD_KINDS})


def _key_problems(data: Mapping[str, Any]) -> list[str]:
    problems = []
    allowed = ", ".join(_FIELD_KINDS)
    for key in data:
        if key not in _FIELD_KINDS:
            problems.append(f"unknown key {key!r}. Allowed keys: {allowed}. Remove it or fix its spelling.")
    for field in dataclasses.fields(DeviceProfile):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and field.name not in data:
            kind = _FIELD_KINDS[field.name]
            problems.append(
                f"missing required key {field.name!r} ({_KINDS[kind][0]}). Add it, e.g. "
                f"{field.name} = {_KINDS[kind][1]}."
            )
    return problems


def _field_problems(values: Mapping[str, Any]) -> list[str]:
    """Checks the type and range of every present key (missing keys are checked elsewhere)."""
    problems = []
    for key, value in values.items():
        if key == "memory_budget_mb" and value is None:
            continue  # None = no budget; TOML cannot write it, so files omit the key instead.
        kind = _FIELD_KINDS[key]
        if not _has_kind(value, kind):
            description, example = _KINDS[kind]
            problems.append(
                f"{key} must be {description}; got {value!r} ({type(value).__name__}). "
                f"Write it as e.g. {key} = {example}."
            )
            continue
        problem = _VALUE_CHECKS[key](value) if key in _VALUE_CHECKS else None
        if isinstance(problem, list):
            problems.extend(problem)
        elif problem:
            problems.append(problem)
    return problems


def _has_kind(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    return isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)


def _check_name(value: str) -> str | None:
    if _NAME_PATTERN.fullmatch(value):
        return None
    return (
        f"name must be lowercase letters and digits joined by '-', '_' or '.', e.g. 'raspberry-pi-5'; "
        f"got {value!r}. Rename the profile (and its file)."
    )


def _check_description(value: str) -> str | None:
    if value.strip():
        return None
    return f"description must not be empty; got {value!r}. Say which hardware this profile targets."


def _check_providers(value: tuple[str, ...] | list[str]) -> list[str]:
    if not value:
        return [
            f"providers must list at least one execution provider; got {list(value)!r}. Add 'CPUExecutionProvider'."
        ]
    problems = []
    for index, provider in enumerate(value):
        if provider not in PROVIDERS:
            problems.append(
                f"providers[{index}] {provider!r} is not a supported onnxruntime execution provider. "
                f"Allowed: {', '.join(PROVIDERS)}. Fix the spelling or remove it."
            )
    for provider in sorted({p for p in value if list(value).count(p) > 1}):
        problems.append(f"providers lists {provider!r} more than once; list each provider once, in priority order.")
    return problems


def _check_threads(value: int) -> str | None:
    if value >= 1:
        return None
    return f"intra_op_threads must be >= 1; got {value!r}. Use the number of performance cores, e.g. 4."


def _check_weights(value: str) -> str | None:
    if value in WEIGHT_FORMATS:
        return None
    allowed = ", ".join(repr(w) for w in WEIGHT_FORMATS)
    return f"weights must be one of {allowed}; got {value!r}. Pick the format the device runs best."


def _check_block_size(value: int) -> str | None:
    if value >= 16 and value & (value - 1) == 0:
        return None
    return (
        f"int4_block_size must be a power of two >= 16 (16, 32, 64, 128, ...); got {value!r}. 32 is the usual choice."
    )


def _check_accuracy_level(value: int) -> str | None:
    if value in INT4_ACCURACY_LEVELS:
        return None
    return (
        f"int4_accuracy_level must be one of 0, 1, 2, 3, 4 (onnxruntime MatMulNBits: 0 unset, 1 fp32, "
        f"2 fp16, 3 bf16, 4 int8); got {value!r}. Use 4 on CPUs."
    )


def _check_max_context(value: int) -> str | None:
    if value >= 1:
        return None
    return f"max_context must be >= 1 token; got {value!r}. Use e.g. max_context = 2048."


def _check_memory_budget(value: int) -> str | None:
    if value >= 1:
        return None
    return f"memory_budget_mb must be >= 1 (MiB); got {value!r}. Omit the key for no budget."


_VALUE_CHECKS = {
    "name": _check_name,
    "description": _check_description,
    "providers": _check_providers,
    "intra_op_threads": _check_threads,
    "weights": _check_weights,
    "int4_block_size": _check_block_size,
    "int4_accuracy_level": _check_accuracy_level,
    "max_context": _check_max_context,
    "memory_budget_mb": _check_memory_budget,
}


def _count(problems: list[str]) -> str:
    return "1 problem" if len(problems) == 1 else f"{len(problems)} problems"

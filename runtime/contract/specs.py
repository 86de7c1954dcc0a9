"""The records that declare a graph: :class:`TensorSpec` (one input or output) and :class:`GraphSpec`.

The exporter builds them (see :mod:`~shadowpeft.runtime.contract.graph_io`), writes them into the
manifest, and the runtime reads every tensor name, dtype and symbolic dimension back from them.
Construction validates every field and raises one :class:`~shadowpeft.runtime.errors.ManifestError`
listing every problem; the same checks run on the JSON form when a manifest is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from shadowpeft.runtime.contract.fields import (
    at,
    check_choice,
    check_int,
    check_kind,
    check_path,
    check_sha256,
    check_str,
    instance_problems,
    raise_if,
    record_problems,
    shallow_values,
)
from shadowpeft.runtime.contract.weights import WEIGHT_FORMATS, WeightFormat

__all__ = ["DTYPES", "ROLES", "STACKS", "GraphRole", "GraphSpec", "TensorSpec", "graph_problems", "tensor_problems"]

#: Tensor element types a graph input or output may have (ONNX names, lower case).
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")

GraphRole = Literal["detached-shadow", "head", "cloud-backbone", "coupled"]
ROLES: tuple[str, ...] = get_args(GraphRole)
#: The decoder stacks a graph may run, named in :attr:`GraphSpec.fused`.
STACKS: tuple[str, ...] = ("shadow", "base")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    Attributes:
        name: ONNX tensor name, e.g. ``"input_ids"`` or ``"present.0.key"``.
        dtype: Element type, one of :data:`DTYPES`.
        shape: One entry per axis: an ``int`` for a fixed size, a ``str`` for a symbolic dimension
            such as ``"batch_size"``.

    Raises:
        ManifestError: On construction, listing every invalid field.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.shape, list):
            object.__setattr__(self, "shape", tuple(self.shape))
        raise_if(tensor_problems(dataclasses.asdict(self), ""), f"Invalid TensorSpec {self.name!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        """Builds a tensor spec from its JSON form (``shape`` as a list).

        Raises:
            ManifestError: Listing every unknown, missing or invalid key.
        """
        raise_if(tensor_problems(data, ""), "Invalid tensor spec")
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON form."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of an export and everything the runtime needs to call it.

    Attributes:
        file: Graph file, relative to the export directory, with ``/`` separators.
        role: What the graph computes, one of :data:`ROLES`.
        opset: ONNX default-domain opset the graph was exported with.
        inputs: Graph inputs in order.
        outputs: Graph outputs in order.
        weights: Weight format of the graph, one of ``fp32``, ``fp16``, ``int8``, ``int4``.
        sha256: Lower-case hex sha256 of ``file``.
        external_data: External-data files of the graph (relative path -> sha256). The runtime
            lets onnxruntime read their location from the model; this only lists them for
            :func:`~shadowpeft.runtime.manifest_files.verify_files` and for copying.
        fused: The decoder stacks (:data:`STACKS`) this graph runs with onnxruntime's fused
            operators (``com.microsoft`` GroupQueryAttention, RotaryEmbedding,
            SkipSimplifiedLayerNormalization; ``shadow-export --ops``); empty: standard ONNX operators only.

    Raises:
        ManifestError: On construction, listing every invalid field.
    """

    file: str
    role: GraphRole
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights: WeightFormat
    sha256: str
    external_data: dict[str, str] = field(default_factory=dict)
    fused: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("inputs", "outputs", "fused"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = instance_problems(self.inputs, TensorSpec, "inputs")
        problems += instance_problems(self.outputs, TensorSpec, "outputs")
        if not problems:
            problems = graph_problems(dataclasses.asdict(self), "")
        raise_if(problems, f"Invalid GraphSpec for {self.file!r}")

    @property
    def input_names(self) -> tuple[str, ...]:
        """Names of the inputs, in order."""
        return tuple(spec.name for spec in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the outputs, in order."""
        return tuple(spec.name for spec in self.outputs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraphSpec:
        """Builds a graph spec from its JSON form.

        Raises:
            ManifestError: Listing every unknown, missing or invalid key, nested ones included.
        """
        raise_if(graph_problems(data, ""), "Invalid graph spec")
        inputs = tuple(TensorSpec.from_dict(spec) for spec in data["inputs"])
        outputs = tuple(TensorSpec.from_dict(spec) for spec in data["outputs"])
        return cls(
            **{
                **data,
                "inputs": inputs,
                "outputs": outputs,
                "external_data": dict(data.get("external_data", {})),
                "fused": tuple(data.get("fused", ())),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON form."""
        inputs = [spec.to_dict() for spec in self.inputs]
        outputs = [spec.to_dict() for spec in self.outputs]
        data = {
            **shallow_values(self),
            "inputs": inputs,
            "outputs": outputs,
            "external_data": dict(self.external_data),
            "fused": list(self.fused),
        }
        if not self.fused:  # absent for a standard graph: its JSON reads as before schema 5
            del data["fused"]
        return data


# --- validation of the JSON form ------------------------------------------------------------------
# Each *_problems function takes JSON-shaped data (dicts, lists or tuples, scalars) and returns one
# message per problem, prefixed with where it is (e.g. "graphs['device/shadow'].inputs[0].dtype").
# The dataclasses run the same functions on dataclasses.asdict(self), so a spec built in code
# (by the exporter) is held to the same rules as one read from disk.


def tensor_problems(data: Any, where: str) -> list[str]:
    """Every problem of a tensor spec's JSON form."""
    problems: list[str] = []
    if not record_problems(data, where, TensorSpec, problems):
        return problems
    if "name" in data:
        check_str(data["name"], at(where, "name"), problems)
    if "dtype" in data:
        check_choice(data["dtype"], at(where, "dtype"), problems, allowed=DTYPES, what="a supported dtype")
    if "shape" in data and check_kind(data["shape"], at(where, "shape"), problems, array=True):
        for axis, dim in enumerate(data["shape"]):
            is_size = isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0
            if not is_size and not (isinstance(dim, str) and dim.strip()):
                problems.append(
                    f"{at(where, 'shape')}[{axis}] must be a size >= 0 or a symbolic dimension name such as "
                    f"'batch_size'; got {dim!r}."
                )
    return problems


def graph_problems(data: Any, where: str) -> list[str]:
    """Every problem of a graph spec's JSON form, its tensors' included."""
    problems: list[str] = []
    if not record_problems(data, where, GraphSpec, problems):
        return problems
    if "file" in data:
        check_path(data["file"], at(where, "file"), problems)
    if "role" in data:
        check_choice(data["role"], at(where, "role"), problems, allowed=ROLES, what="a graph role")
    if "opset" in data:
        check_int(data["opset"], at(where, "opset"), problems, minimum=1)
    names: dict[str, list[str]] = {}
    for kind in ("inputs", "outputs"):
        if kind not in data or not check_kind(data[kind], at(where, kind), problems, array=True):
            continue
        if not data[kind]:
            problems.append(f"{at(where, kind)} is empty; a graph has at least one. Re-export.")
        for index, spec in enumerate(data[kind]):
            problems += tensor_problems(spec, f"{at(where, kind)}[{index}]")
            if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
                names.setdefault(spec["name"], []).append(f"{kind}[{index}]")
    for name, places in names.items():
        if len(places) > 1:
            problems.append(
                f"{where or 'graph'}: tensor name {name!r} is used {len(places)} times ({', '.join(places)}); "
                "names must be unique within a graph. Re-export."
            )
    if "weights" in data:
        check_choice(data["weights"], at(where, "weights"), problems, allowed=WEIGHT_FORMATS, what="a weight format")
    if "sha256" in data:
        check_sha256(data["sha256"], at(where, "sha256"), problems)
    if "external_data" in data and check_kind(
        data["external_data"], at(where, "external_data"), problems, array=False
    ):
        for relative, sha256 in data["external_data"].items():
            place = f"{at(where, 'external_data')}[{relative!r}]"
            check_path(relative, place, problems)
            check_sha256(sha256, place, problems)
    if "fused" in data and check_kind(data["fused"], at(where, "fused"), problems, array=True):
        for index, stack in enumerate(data["fused"]):
            check_choice(stack, f"{at(where, 'fused')}[{index}]", problems, allowed=STACKS, what="a decoder stack")
        if len(set(map(str, data["fused"]))) != len(data["fused"]):
            problems.append(f"{at(where, 'fused')} names a stack twice; got {data['fused']!r}. Re-export.")
    return problems

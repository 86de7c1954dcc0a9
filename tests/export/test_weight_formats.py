"""The weight-format registry: each format has its pass, parameters and manifest name, declared once."""

from __future__ import annotations

import dataclasses

import pytest

from shadowpeft.export.cli import _WEIGHTS
from shadowpeft.export.errors import QuantizationError
from shadowpeft.export.pipeline import quantization_name
from shadowpeft.export.quantize import (
    DEFAULT_PARAMS,
    FORMATS,
    INT8_BLOCK_SIZE,
    QuantizationParams,
    WeightFormatPass,
    register,
    weight_format,
)
from shadowpeft.runtime.devices import WEIGHT_FORMATS, list_device_profiles, load_device_profile
from tests.tolerances import QUANTIZED_MEAN_KL_TOY, QUANTIZED_TOP1_SMOLLM2, QUANTIZED_TOP1_TOY

QUANTIZING = [name for name, fmt in FORMATS.items() if fmt.quantizes]


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_has_a_pass_parameters_and_a_manifest_name(name):
    fmt = weight_format(name)
    assert fmt.name == name and name in WEIGHT_FORMATS, "names come from the runtime's vocabulary"
    params = fmt.parameters(DEFAULT_PARAMS)
    manifest = fmt.manifest_name(params)
    if fmt.quantizes:
        assert callable(fmt.run)
        assert isinstance(params.block_size, int) and isinstance(params.accuracy_level, int)
        assert manifest == f"{name}-block{params.block_size}-acc{params.accuracy_level}"
    else:
        assert params == QuantizationParams() and manifest == "none"


def test_the_registered_formats():
    assert list(FORMATS) == ["fp32", "int8", "int4"]
    assert weight_format("int8").parameters(QuantizationParams(16, 1)) == QuantizationParams(INT8_BLOCK_SIZE, 4)
    assert weight_format("int4").parameters(QuantizationParams(16, 1)) == QuantizationParams(16, 1)


@pytest.mark.parametrize("name", QUANTIZING)
def test_each_quantizing_format_has_tolerances(name):
    assert name in QUANTIZED_TOP1_TOY and name in QUANTIZED_MEAN_KL_TOY and name in QUANTIZED_TOP1_SMOLLM2


def test_the_cli_offers_every_registered_format():
    assert sorted(_WEIGHTS.values()) == sorted(FORMATS)
    assert _WEIGHTS["none"] == "fp32"


@pytest.mark.parametrize("name", ["int3", "", None, 4])
def test_an_unknown_format_names_the_registered_ones(name):
    with pytest.raises(QuantizationError, match=rf"Unknown weight format {name!r}\. Supported: fp32, int8, int4"):
        weight_format(name)


def test_a_vocabulary_format_without_a_pass_says_so():
    unregistered = [name for name in WEIGHT_FORMATS if name not in FORMATS]
    assert unregistered == ["fp16"]
    with pytest.raises(QuantizationError, match=r"'fp16' is not supported yet.*Use one of fp32, int8, int4"):
        weight_format("fp16")


def test_bad_requested_parameters_are_all_listed():
    with pytest.raises(QuantizationError, match=r"block_size .*got 24.*; int4 accuracy_level .*got 7"):
        weight_format("int4").parameters(QuantizationParams(24, 7))


def test_register_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="registered twice"):
        register(dataclasses.replace(FORMATS["int4"]))
    with pytest.raises(ValueError, match="not in the runtime's vocabulary"):
        register(WeightFormatPass(name="int2", option="int2"))
    assert list(FORMATS) == ["fp32", "int8", "int4"]


@pytest.mark.parametrize("device", list_device_profiles())
def test_profile_parameters_give_the_manifest_name(device):
    profile = load_device_profile(device)
    fmt = weight_format(profile.weights) if profile.weights in FORMATS else None
    if fmt is None:
        pytest.skip(f"{device} asks for {profile.weights}, which has no pass")
    expected = {
        "fp32": "none",
        "int8": f"int8-block{INT8_BLOCK_SIZE}-acc4",
        "int4": f"int4-block{profile.int4_block_size}-acc{profile.int4_accuracy_level}",
    }.get(profile.weights)
    assert expected is None or quantization_name(profile.weights, profile) == expected

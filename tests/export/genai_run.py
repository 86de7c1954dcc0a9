"""Greedy generation with onnxruntime-genai's own Generator API, for the tests that compare it with ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest


def genai_greedy(folder: Path, prompt: list[int], new_tokens: int) -> tuple[list[int], dict[str, Any]]:
    """The new tokens onnxruntime-genai generates greedily from ``folder``, and its speculative statistics.

    Skips the test when onnxruntime-genai is not installed (requirements.txt pins it). Generation stops at
    ``new_tokens`` or at the config's EOS, as ``shadow-run`` does. The statistics count nothing unless the
    folder's config has a draft model.
    """
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    tokens = [int(token) for token in generator.get_sequence(0)[len(prompt) :]]
    return tokens, dict(generator.get_speculative_stats())


def runtime_greedy(export_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """The new tokens of the runtime's detached ``Generator`` (what ``shadow-run --mode detached`` runs), greedy,
    stopping at the tokenizer's EOS as ``shadow-run`` does."""
    from shadowpeft.runtime.export_dir import open_export
    from shadowpeft.runtime.generate import Generator
    from shadowpeft.runtime.sampling import SamplingConfig
    from shadowpeft.runtime.tokenizer import RuntimeTokenizer

    export = open_export(export_dir)
    eos = RuntimeTokenizer.from_export(export_dir, export.manifest).eos_ids
    generator = Generator(export, mode="detached", eos_ids=eos)
    return generator.generate([prompt], SamplingConfig(max_new_tokens=new_tokens))[0].token_ids

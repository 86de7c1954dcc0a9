"""The handshake at the start of split decoding: the device export against a server of another checkpoint.

Two toy checkpoints of one base (same base fingerprint, other adapter weights): coupled and
speculative mode refuse with a message that says what differs and what to serve; auto mode answers
on the device and says why; a matching server works as before, with one metadata request per client.
"""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from shadowpeft.runtime.client import BackboneClient
from shadowpeft.runtime.contract import CLOUD_BACKBONE
from shadowpeft.runtime.errors import BackboneMismatch
from shadowpeft.runtime.export_dir import open_export
from shadowpeft.runtime.generate import Generator
from shadowpeft.runtime.handshake import METADATA_KEY, check_backbone
from shadowpeft.runtime.server import ServerConfig, create_app
from tests.runtime.conftest import serve_in_thread
from tests.runtime.test_generate import COUPLED_CLOUD, GREEDY, PROMPTS

TOKEN = "handshake-test-token-0123456789"


@pytest.fixture(scope="module")
def export(toy_export):
    return open_export(toy_export.export, threads=1)


@pytest.fixture(scope="module")
def other_export(toy_export, tmp_path_factory):
    """An export of another checkpoint of the same toy base: other adapter weights, the same base fingerprint."""
    from transformers import AutoModelForCausalLM

    from shadowpeft import get_shadow_model
    from shadowpeft.checkpoint.store import save_shadow
    from shadowpeft.export.pipeline import ExportOptions, export_checkpoint
    from tests.conftest import perturb

    root = tmp_path_factory.mktemp("other-export")
    model = perturb(get_shadow_model(AutoModelForCausalLM.from_pretrained(toy_export.base)), seed=2)
    save_shadow(model, root / "ckpt", base_ref=str(toy_export.base))
    export_checkpoint(root / "ckpt", root / "export", ExportOptions(selections=("split",)))
    return open_export(root / "export", threads=1)


@pytest.fixture(scope="module")
def other_server(other_export):
    """shadow-serve of the other checkpoint's export."""
    with serve_in_thread(create_app(other_export, ServerConfig(TOKEN))) as url:
        yield url


@pytest.fixture(scope="module")
def same_server(export):
    """shadow-serve of the device's own export."""
    with serve_in_thread(create_app(export, ServerConfig(TOKEN))) as url:
        yield url


def client_for(url: str) -> BackboneClient:
    return BackboneClient(url, token=TOKEN, dtype="float32", timeout=5.0)


def test_the_two_exports_differ_only_by_checkpoint(export, other_export) -> None:
    assert export.manifest.base_fingerprint == other_export.manifest.base_fingerprint
    assert export.manifest.graph(CLOUD_BACKBONE).sha256 != other_export.manifest.graph(CLOUD_BACKBONE).sha256


@pytest.mark.parametrize("mode", ["coupled", "speculative"])
def test_coupled_and_speculative_refuse_another_checkpoints_server(export, other_server, mode) -> None:
    client = client_for(other_server)
    with pytest.raises(BackboneMismatch) as caught:
        Generator(export, mode=mode, client=client).generate(PROMPTS[:1], GREEDY)
    message = str(caught.value)
    assert message.startswith(f"The backbone server at {other_server} runs a different backbone")
    assert f"the server's {CLOUD_BACKBONE} sha256 is" in message and "base_fingerprint" not in message
    assert "Serve the export made from the same checkpoint" in message and "--mode detached" in message
    assert client.requests == 1, "only the metadata: no token went up"


def test_auto_answers_on_the_device_and_says_why(export, other_server) -> None:
    client = client_for(other_server)
    generator = Generator(export, mode="auto", client=client, escalation=COUPLED_CLOUD, retry_interval_s=0.0)
    results = generator.generate(PROMPTS, GREEDY)
    detached = Generator(export).generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in results] == [r.token_ids for r in detached]
    for result in results:
        assert set(result.modes) == {"detached"} and result.fallbacks == 1
        assert result.escalated == GREEDY.max_new_tokens  # asked for the cloud every step, never sent
        assert "runs a different backbone" in result.fallback_reason
        assert result.fallback_reason.endswith("Answering every token on the device (detached).")
    assert client.requests == 1, "one handshake per client, and no token went up"


def test_a_matching_server_works_with_one_handshake_per_client(export, same_server) -> None:
    client = client_for(same_server)
    check = client.verify_backbone(export.manifest)
    assert check.matches and check.compared == (
        "base_fingerprint",
        f"{CLOUD_BACKBONE} sha256",
        f"{CLOUD_BACKBONE} external data",
    )
    generator = Generator(export, mode="coupled", client=client)
    first = generator.generate(PROMPTS[:1], GREEDY)[0]
    second = generator.generate(PROMPTS[:1], GREEDY)[0]
    assert first.token_ids == second.token_ids and set(first.modes) == {"coupled"}
    assert first.round_trips == second.round_trips == GREEDY.max_new_tokens + 1  # steps + sequence_end
    assert client.requests == 1 + 2 * first.round_trips  # the metadata, fetched once
    assert first.fallback_reason is None


def test_shadow_run_coupled_refuses_and_auto_reports_the_reason(toy_export, other_server) -> None:
    from click.testing import CliRunner

    from shadowpeft.runtime.run_cli import main

    base = [str(toy_export.export), "-p", "the color is red", "--no-chat", "--server", other_server, "--token", TOKEN]
    base += ["--max-new-tokens", "4", "--wire", "float32"]
    coupled = CliRunner().invoke(main, [*base, "--mode", "coupled"])
    assert coupled.exit_code == 1, coupled.output
    assert coupled.stderr.startswith(f"Error: The backbone server at {other_server} runs a different backbone")
    auto = CliRunner().invoke(main, [*base, "--mode", "auto", "--escalate-below", "1", "--json"])
    assert auto.exit_code == 0, auto.output
    summary = json.loads(auto.stdout.splitlines()[-1])
    assert summary["tokens_by_mode"] == {"detached": 4} and "runs a different backbone" in summary["fallback_reason"]
    text = CliRunner().invoke(main, [*base, "--mode", "auto", "--escalate-below", "1"])
    assert text.exit_code == 0 and "auto: answering on the device: The backbone server at" in text.stderr


def test_what_the_check_compares(export, other_export) -> None:
    ours = export.manifest
    graph = ours.graph(CLOUD_BACKBONE)
    published = {"base_fingerprint": ours.base_fingerprint, "graph_sha256": graph.sha256, "graph_external_data": {}}
    assert check_backbone(ours, {METADATA_KEY: published}, url="u").matches
    older = {"base_fingerprint": ours.base_fingerprint, "graph_sha256": graph.sha256}  # no external data published
    older_check = check_backbone(ours, {METADATA_KEY: older}, url="u")
    assert older_check.matches and older_check.compared == ("base_fingerprint", "cloud/backbone sha256")
    base = check_backbone(ours, {METADATA_KEY: {**published, "base_fingerprint": "sha256:" + "0" * 64}}, url="u")
    assert not base.matches and base.differences[0].startswith("the server's base_fingerprint is 'sha256:0000")
    weights = check_backbone(ours, {METADATA_KEY: {**published, "graph_external_data": {"w.bin": "ab"}}}, url="u")
    expected = "the server's cloud/backbone external data is {w.bin: 'ab'}, this export's is none"
    assert weights.differences == (expected,)
    for foreign in ({}, {METADATA_KEY: "?"}, {"name": "shadow-backbone", "inputs": []}):  # not shadow-serve
        check = check_backbone(ours, foreign, url="u")
        assert check.matches and not check.verified


def test_a_server_that_publishes_no_identity_passes_with_one_warning(export, caplog) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"name": "shadow-backbone", "inputs": [], "outputs": []})

    client = BackboneClient("http://triton", transport=httpx.MockTransport(handler))
    with caplog.at_level(logging.WARNING, logger="shadowpeft.runtime.client"):
        assert not client.verify_backbone(export.manifest).verified
        assert not client.verify_backbone(export.manifest).verified
    warnings = [r for r in caplog.records if "publishes no backbone identity" in r.getMessage()]
    assert len(warnings) == 1 and client.requests == 1

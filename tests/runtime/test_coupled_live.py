"""shadow-run's generation against a live shadow-serve on loopback: coupled tokens equal the coupled
graph and PyTorch attached; auto mode survives the server dying and coming back; coupled mode fails clearly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from shadowpeft.runtime.client import BackboneClient
from shadowpeft.runtime.errors import RuntimeGenerationError
from shadowpeft.runtime.export_dir import ExportDir, open_export
from shadowpeft.runtime.generate import GenerationResult, Generator
from shadowpeft.runtime.sampling import SamplingConfig
from shadowpeft.runtime.server import ServerConfig, create_app
from tests.runtime.conftest import serve_in_thread
from tests.runtime.test_generate import COUPLED_CLOUD, GREEDY, PROMPTS, graph_greedy, model, pytorch_greedy  # noqa: F401

TOKEN = "live-test-token-0123456789"


@contextlib.contextmanager
def serving(export: ExportDir, port: int = 0) -> Iterator[int]:
    """shadow-serve's app on 127.0.0.1:``port`` (0: any free port) in a thread; yields the port."""
    with serve_in_thread(create_app(export, ServerConfig(TOKEN)), port=port) as url:
        yield int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def export(toy_export):
    return open_export(toy_export.export, threads=1)


def client_for(port: int, **options) -> BackboneClient:
    return BackboneClient(f"http://127.0.0.1:{port}", token=TOKEN, dtype="float32", **options)


def test_coupled_over_loopback_equals_coupled_graph_and_pytorch_attached(export, model):  # noqa: F811
    with serving(export) as port:
        client = client_for(port, max_chunk_tokens=3)  # the 7-token prompt goes up in 3 chunks
        results = Generator(export, mode="coupled", client=client).generate(PROMPTS, GREEDY)
        stats = client.stats()["sequences"]
    expected = pytorch_greedy(model, PROMPTS, "attached").tolist()
    assert [r.token_ids for r in results] == expected == graph_greedy(export, PROMPTS, "coupled")
    assert all(r.modes == ["coupled"] * GREEDY.max_new_tokens for r in results)
    assert stats["active"] == 0, "sessions leaked"
    assert all(r.bytes_sent > 0 and r.bytes_received > 0 for r in results)


def test_auto_mode_falls_back_when_the_server_dies_and_returns_when_it_restarts(export, model):  # noqa: F811
    with serving(export) as port:
        pass  # reserve a port number that is free again now
    client = client_for(port, timeout=1.0, retries=0)
    generator = Generator(export, mode="auto", client=client, retry_interval_s=0.0, escalation=COUPLED_CLOUD)
    result = GenerationResult(PROMPTS[0])
    server = contextlib.ExitStack()
    server.enter_context(serving(export, port))
    for event in generator.stream(PROMPTS[0], SamplingConfig(max_new_tokens=9), result):
        if event.index == 2:
            server.close()  # killed mid-generation
        if event.index == 5:
            server.enter_context(serving(export, port))  # back on the same address
    server.close()
    assert result.modes == ["coupled"] * 3 + ["detached"] * 3 + ["coupled"] * 3
    assert result.fallbacks == 1
    expected = pytorch_greedy(model, [PROMPTS[0] + result.token_ids[:6]], "attached")[0].tolist()
    assert result.token_ids[6:] == expected[:3]  # the fresh session was re-prefilled with the whole history


def test_coupled_mode_stops_with_a_clear_error_when_the_server_dies(export):
    with serving(export) as port:
        client = client_for(port, timeout=1.0, retries=0)
        stream = Generator(export, mode="coupled", client=client).stream(PROMPTS[0], GREEDY)
        next(stream)
    with pytest.raises(RuntimeGenerationError, match="lost the backbone server"):
        list(stream)

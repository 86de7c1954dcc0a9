"""shadow-serve over gRPC (runtime/grpc_server.py, grpc_tensors.py, wire_grpc.py) against its HTTP twin.

One server per module serves HTTP and gRPC on one event loop (as ``shadow-serve --grpc-port``):
tritonclient's gRPC client gets health, metadata and config; an infer equals the HTTP endpoint's
for the same request, and one sequence continues across the two protocols (one session table);
auth, the token cap, an unknown model and a lost sequence give the HTTP messages under the mapped
status codes; BackboneClient and ``shadow-run --server grpc://`` give the HTTP tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("grpc", reason="gRPC needs grpcio: pip install -r requirements.txt (grpcio, tritonclient[grpc])")

import uvicorn  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from shadowpeft.runtime.admission import RequestLimits  # noqa: E402
from shadowpeft.runtime.client import BackboneClient  # noqa: E402
from shadowpeft.runtime.errors import ServerRejected, ServerUnavailable, SessionLost  # noqa: E402
from shadowpeft.runtime.export_dir import open_export  # noqa: E402
from shadowpeft.runtime.generate import Generator  # noqa: E402
from shadowpeft.runtime.grpc_server import GrpcOptions  # noqa: E402
from shadowpeft.runtime.grpc_tensors import decode_infer_request, encode_infer_request, grpc_modules  # noqa: E402
from shadowpeft.runtime.protocol import ProtocolError  # noqa: E402
from shadowpeft.runtime.server import ServerConfig, create_app, serve  # noqa: E402
from tests.runtime.conftest import serve_in_thread  # noqa: E402
from tests.runtime.test_generate import GREEDY, PROMPTS  # noqa: E402

TOKEN = "grpc-test-token-0123456789"
MODEL = "shadow-backbone"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@contextlib.contextmanager
def serving(export, **requests) -> Iterator[tuple[object, str, str]]:
    """(app, http URL, gRPC host:port) of a server with both protocols; ``requests`` go to RequestLimits."""
    app = create_app(export, ServerConfig(TOKEN, requests=RequestLimits(**requests)))
    with serve_in_thread(app, grpc_port=0) as url:
        yield app, url, f"127.0.0.1:{app.state.grpc_port}"


@pytest.fixture(scope="module")
def export(toy_export):
    return open_export(toy_export.export, threads=1)


@pytest.fixture(scope="module")
def live(export):
    with serving(export) as server:
        yield server


@pytest.fixture(scope="module")
def steps(export):
    """Token ids and their shadow states s0 from device/shadow: a real request's inputs."""
    ids = np.asarray([PROMPTS[0]], np.int64)
    spec = export.graph("device/shadow")
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    for item in spec.inputs:
        if item.name.startswith("past_key_values."):
            feeds[item.name] = np.zeros((1, item.shape[1], 0, item.shape[3]), np.float32)
    return ids, export.session("device/shadow").run(["shadow_states"], feeds)[0]


def triton_inputs(module, ids: np.ndarray, s0: np.ndarray) -> list:
    inputs = [
        module.InferInput("input_ids", list(ids.shape), "INT64"),
        module.InferInput("shadow_states", list(s0.shape), "FP16" if s0.dtype == np.float16 else "FP32"),
    ]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(s0)
    return inputs


def refusal(call) -> tuple[str, str]:
    """(status code name, message) of a tritonclient call that must fail."""
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()).removeprefix("StatusCode."), caught.value.message()


def test_tritonclient_grpc_reads_health_metadata_and_config(export, live) -> None:
    from tritonclient.grpc import InferenceServerClient

    client = InferenceServerClient(live[2])
    assert client.is_server_live() and client.is_server_ready()  # open, as /v2/health/* are
    assert client.get_server_metadata(headers=AUTH).name == "shadowpeft"
    metadata = client.get_model_metadata(MODEL, model_version="1", headers=AUTH, as_json=True)
    assert [i["name"] for i in metadata["inputs"]] == ["input_ids", "shadow_states"]
    assert metadata["outputs"][0]["shape"] == ["1", "-1", "32"]  # int64 fields as JSON strings
    assert client.is_model_ready(MODEL, headers=AUTH)
    config = client.get_model_config(MODEL, headers=AUTH).config
    identity = json.loads(config.parameters["shadowpeft"].string_value)
    assert identity["graph_sha256"] == export.graph("cloud/backbone").sha256 and config.max_batch_size == 0
    stats = client.get_inference_statistics(MODEL, headers=AUTH).model_stats[0]
    assert stats.name == MODEL


def test_an_infer_equals_the_http_endpoints_and_a_sequence_continues_across_protocols(live, steps) -> None:
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    ids, s0 = steps
    grpc_client = triton_grpc.InferenceServerClient(live[2])
    http_client = triton_http.InferenceServerClient(live[1].removeprefix("http://"))
    clients = ((grpc_client, triton_grpc), (http_client, triton_http))
    for dtype in (np.float32, np.float16):
        over_grpc = grpc_client.infer(
            MODEL, triton_inputs(triton_grpc, ids, s0.astype(dtype)), sequence_id=21, sequence_start=True,
            sequence_end=True, headers=AUTH,
        )  # fmt: skip
        over_http = http_client.infer(
            MODEL, triton_inputs(triton_http, ids, s0.astype(dtype)), sequence_id=22, sequence_start=True,
            sequence_end=True, headers=dict(AUTH),
        )  # fmt: skip
        hidden = over_grpc.as_numpy("hidden_states")
        assert hidden.dtype == dtype and np.array_equal(hidden, over_http.as_numpy("hidden_states"))
    rng = np.random.default_rng(0)  # a message over 64 KiB: converted in the thread pool
    long_ids, long_s0 = rng.integers(4, 200, (1, 500)), rng.standard_normal((1, 500, 32)).astype(np.float32)
    long = [hidden_of(c, m, long_ids, long_s0, sequence_id=23, start=True, end=True) for c, m in clients]
    assert np.array_equal(*long)
    whole = hidden_of(grpc_client, triton_grpc, ids, s0, sequence_id="whole", start=True, end=True)
    head = hidden_of(http_client, triton_http, ids[:, :4], s0[:, :4], sequence_id="split", start=True)
    tail = grpc_client.infer(  # the same sequence, continued over gRPC with the offset it is at
        MODEL, triton_inputs(triton_grpc, ids[:, 4:], s0[:, 4:]), sequence_id="split", sequence_end=True,
        parameters={"sequence_offset": 4}, headers=AUTH,
    )  # fmt: skip
    assert tail.get_response().parameters["sequence_length"].int64_param == ids.shape[1]
    joined = np.concatenate([head, tail.as_numpy("hidden_states")], axis=1)
    assert np.abs(joined - whole).max() <= 1e-5  # cached steps vs one pass, fp32: ~1e-6 apart


def hidden_of(client, module, ids, s0, *, sequence_id, start=False, end=False) -> np.ndarray:
    headers = dict(AUTH)  # tritonclient.http adds its own headers to the dict it gets
    result = client.infer(
        MODEL, triton_inputs(module, ids, s0), sequence_id=sequence_id, sequence_start=start, sequence_end=end,
        headers=headers,
    )  # fmt: skip
    return result.as_numpy("hidden_states")


def test_refusals_carry_the_http_messages_under_grpc_codes(export, steps) -> None:
    import tritonclient.grpc as triton_grpc

    ids, s0 = steps
    with serving(export, max_tokens=4) as (app, _, address):
        client = triton_grpc.InferenceServerClient(address)
        code, message = refusal(lambda: client.get_model_metadata(MODEL))
        assert code == "UNAUTHENTICATED" and message.startswith("This server needs a bearer token")
        code, message = refusal(lambda: client.get_model_metadata(MODEL, headers={"authorization": "Bearer x"}))
        assert code == "UNAUTHENTICATED" and message.startswith("The bearer token is wrong")
        code, message = refusal(lambda: client.get_model_metadata("nope", headers=AUTH))
        assert (code, message) == (
            "NOT_FOUND",
            "Unknown model 'nope'. This server serves 'shadow-backbone' (version 1).",
        )
        infer = client.infer
        code, message = refusal(
            lambda: infer("nope", triton_inputs(triton_grpc, ids, s0), sequence_id=1, headers=AUTH)
        )
        assert code == "NOT_FOUND"
        inputs = triton_inputs(triton_grpc, ids, s0)  # 7 tokens, 4 per request
        code, message = refusal(lambda: infer(MODEL, inputs, sequence_id=1, sequence_start=True, headers=AUTH))
        assert code == "RESOURCE_EXHAUSTED" and "(--max-tokens-per-request)" in message and "7 tokens" in message
        assert app.state.backbone.model_stats()["refused"]["tokens_per_request"] == 1
        inputs = triton_inputs(triton_grpc, ids[:, :2], s0[:, :2])
        code, message = refusal(lambda: infer(MODEL, inputs, sequence_id=2, headers=AUTH))  # never started
        assert code == "ABORTED" and "sequence_start" in message
        code, message = refusal(lambda: infer(MODEL, inputs, headers=AUTH))  # no sequence_id
        assert code == "INVALID_ARGUMENT" and "parameter 'sequence_id' must be" in message
        assert app.state.backbone.table.tokens() == 0


class RecordingContext:
    """The part of a grpc.aio servicer context that ``_Servicer.abort`` uses: it records the abort."""

    def __init__(self) -> None:
        self.aborted: tuple | None = None

    async def abort(self, code, details, trailing_metadata=()) -> None:
        self.aborted = (code.name, details, tuple(trailing_metadata))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ServerRejected("full", status=503, retry_after=1), ("UNAVAILABLE", "full", (("retry-after", "1"),))),
        (ServerRejected("graph failed", status=500), ("INTERNAL", "graph failed", ())),
        (ServerRejected("too many", status=413), ("RESOURCE_EXHAUSTED", "too many", ())),
        (SessionLost("re-prefill"), ("ABORTED", "re-prefill", ())),
        (ProtocolError("bad tensor"), ("INVALID_ARGUMENT", "bad tensor", ())),
    ],
)
def test_refusals_map_to_grpc_codes_with_retry_after_as_trailing_metadata(live, error, expected) -> None:
    import asyncio

    from shadowpeft.runtime.grpc_server import _Servicer

    context = RecordingContext()
    asyncio.run(_Servicer(live[0].state.backbone).abort(context, error))
    assert context.aborted == expected


def test_typed_contents_decode_like_raw_and_fp16_is_raw_only() -> None:
    _, pb, _ = grpc_modules()
    ids, s0 = np.asarray([[3, 4]], np.int64), np.asarray([[[0.5, -1.0], [2.0, 0.25]]], np.float32)
    raw = decode_infer_request(encode_infer_request({"input_ids": ids, "shadow_states": s0}, model_name=MODEL))
    typed = pb.ModelInferRequest(model_name=MODEL)
    typed.inputs.add(name="input_ids", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([3, 4])
    typed.inputs.add(name="shadow_states", datatype="FP32", shape=[1, 2, 2]).contents.fp32_contents.extend(
        s0.ravel().tolist()
    )
    typed.parameters["sequence_id"].uint64_param = 2**64 - 1
    decoded = decode_infer_request(typed)
    for name in ("input_ids", "shadow_states"):
        assert (
            np.array_equal(decoded.inputs[name], raw.inputs[name])
            and decoded.inputs[name].dtype == raw.inputs[name].dtype
        )
    assert decoded.parameters == {"sequence_id": 2**64 - 1}
    half = pb.ModelInferRequest(model_name=MODEL)
    half.inputs.add(name="shadow_states", datatype="FP16", shape=[1])
    with pytest.raises(ProtocolError, match="FP16 travels in raw_input_contents only"):
        decode_infer_request(half)


def test_backbone_client_over_grpc_equals_http_and_keeps_the_retry_semantics(export, live, steps) -> None:
    ids, s0 = steps
    results = {}
    for scheme, url in (("grpc", f"grpc://{live[2]}"), ("http", live[1])):
        with BackboneClient(url, token=TOKEN, dtype="float32", max_chunk_tokens=3) as client:
            assert client.ready() and client.verify_backbone(export.manifest).verified
            prefill = client.step(scheme, ids[:, :5], s0[:, :5], start=True)  # 2 chunks
            decode = client.step(scheme, ids[:, 5:], s0[:, 5:], start=False)
            client.rewind(scheme, 5)  # a rollback, as speculative mode sends after rejected drafts
            again = client.step(scheme, ids[:, 5:], s0[:, 5:], start=False)
            client.end(scheme)
            with pytest.raises(SessionLost):
                client.step(scheme, ids[:, :1], s0[:, :1], start=False)
            assert client.bytes_sent > 0 and client.bytes_received > 0
            results[scheme] = (prefill, decode, again)
    assert all(np.array_equal(g, h) for g, h in zip(results["grpc"], results["http"], strict=True))
    assert np.array_equal(results["grpc"][1], results["grpc"][2])
    with BackboneClient(f"grpc://{live[2]}", token="wrong-token-0123456789") as client:
        with pytest.raises(ServerRejected, match=r"\(gRPC UNAUTHENTICATED\): The bearer token is wrong") as caught:
            client.step(1, ids, s0, start=True)
        assert caught.value.status == 401
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with BackboneClient(f"grpc://127.0.0.1:{closed}", retries=2, backoff=0.0, timeout=2.0) as client:
        with pytest.raises(ServerUnavailable, match="did not answer gRPC Model(Metadata|Infer) .* after 3 attempt"):
            client.step(1, ids, s0, start=True)
        assert client.requests == 3


def test_coupled_and_speculative_generation_over_grpc_equal_http(export, live) -> None:
    tokens = {}
    for url in (f"grpc://{live[2]}", live[1]):
        for mode in ("coupled", "speculative"):
            client = BackboneClient(url, token=TOKEN, dtype="float32")
            tokens[url, mode] = [
                r.token_ids for r in Generator(export, mode=mode, client=client).generate(PROMPTS, GREEDY)
            ]
    assert len(set(map(str, tokens.values()))) == 1, tokens
    assert live[0].state.backbone.table.tokens() == 0, "sessions leaked"


def test_shadow_run_over_grpc_gives_the_http_tokens(toy_export, live) -> None:
    from shadowpeft.runtime.run_cli import main

    summaries = {}
    for url in (f"grpc://{live[2]}", live[1]):
        args = [str(toy_export.export), "-p", "the color is red", "--no-chat", "--server", url, "--token", TOKEN]
        cli = CliRunner().invoke(main, [*args, "--mode", "speculative", "--draft-tokens", "3", "--json"])
        assert cli.exit_code == 0, cli.output
        summaries[url.split(":")[0]] = json.loads(cli.output.splitlines()[-1])
    assert summaries["grpc"]["token_ids"] == summaries["http"]["token_ids"] and summaries["grpc"]["new_tokens"] > 0
    assert summaries["grpc"]["bytes_sent"] > 0


def test_shadow_serve_refuses_one_port_for_both_protocols(toy_export) -> None:
    from shadowpeft.runtime.serve_cli import main

    cli = CliRunner().invoke(main, [str(toy_export.export), "--no-auth", "--port", "8000", "--grpc-port", "8000"])
    assert cli.exit_code == 2 and "--grpc-port 8000 is also the HTTP --port" in cli.output


def test_shadow_serve_grpc_port_serves_without_torch_and_stops_cleanly(toy_export, steps) -> None:
    from tests.runtime.test_torch_free import BLOCKER

    ids, s0 = steps
    with socket.socket() as a, socket.socket() as b:  # two free ports
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        http_port, grpc_port = a.getsockname()[1], b.getsockname()[1]
    code = BLOCKER + "from shadowpeft.runtime.serve_cli import main\nmain()\n"
    args = [sys.executable, "-c", code, str(toy_export.export), "--port", str(http_port)]
    args += ["--grpc-port", str(grpc_port), "--log-level", "warning"]
    env = {**os.environ, "SHADOW_SERVE_TOKEN": TOKEN}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with BackboneClient(f"grpc://127.0.0.1:{grpc_port}", token=TOKEN, dtype="float32") as client:
            deadline = time.monotonic() + 60
            while not client.ready():
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "shadow-serve did not start within 60 s"
                time.sleep(0.1)
            hidden = client.step(9, ids, s0, start=True)
        with BackboneClient(f"http://127.0.0.1:{http_port}", token=TOKEN, dtype="float32") as client:
            assert np.array_equal(client.step(9, ids, s0, start=True), hidden)
            assert client.stats()["sequences"]["started"] == 2  # one table for both protocols
        process.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn stops, then the gRPC server, then click says Aborted!
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
    output = process.stdout.read()
    assert "blocked" not in output and "Traceback" not in output, output
    assert f"KServe v2 gRPC on 127.0.0.1:{grpc_port} (plaintext)" in output


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_grpc_serves_tls_with_the_https_certificate_and_grpcs_clients_verify_it(export, tmp_path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    app = create_app(export, ServerConfig(TOKEN))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    tls = GrpcOptions("127.0.0.1", 0, cert, key)
    thread = threading.Thread(target=asyncio.run, args=(serve(server, grpc=tls),), daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.01)
        code = (
            "import sys\nfrom shadowpeft.runtime.client import BackboneClient\n"
            f"with BackboneClient(sys.argv[1], token={TOKEN!r}, retries=0) as client:\n    print(client.ready())\n"
        )
        url = f"localhost:{app.state.grpc_port}"
        env = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(cert)}  # trust the test certificate
        run = [sys.executable, "-c", code]
        trusted = subprocess.run([*run, f"grpcs://{url}"], env=env, capture_output=True, text=True, timeout=60)
        assert trusted.stdout.strip() == "True", trusted.stderr
        plain = subprocess.run([*run, f"grpc://{url}"], env=env, capture_output=True, text=True, timeout=60)
        assert plain.stdout.strip() == "False", plain.stderr  # a plaintext client gets no answer from TLS
    finally:
        server.should_exit = True
        thread.join(10)

"""TLS (and mutual TLS) on gRPC and the metrics endpoint, bearer-token authentication, and OIP
sequence ids scoped to the caller's identity. Black-box: real servers on loopback, certificates
made at test time (tests/tls_support.py), clients unchanged (tritonclient) or ours.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from eager import TOL, Reference
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_support import server_config
from ports import free_ports
from tls_support import Pki, make_pki
from tritonclient.utils import InferenceServerException

from bench import perf_analyzer
from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.client import Client
from serving.security import TlsConfig, TokenTable
from serving.server import ServerThread

RNNSERVE = Path(sys.executable).with_name("rnnserve")
ALICE, BOB = secrets.token_urlsafe(24), secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# identity:token\nalice:{ALICE}\n\nbob:{BOB}\n")
    return path


@pytest.fixture(scope="module")
def tls_server(quick_store: Path, pki: Pki) -> Iterator[ServerThread]:
    tls = TlsConfig(pki.server_cert, pki.server_key)
    with ServerThread(replace(server_config(quick_store), tls=tls)) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(quick_store: Path, pki: Pki) -> Iterator[ServerThread]:
    tls = TlsConfig(pki.server_cert, pki.server_key, client_ca=pki.ca)
    with ServerThread(replace(server_config(quick_store), tls=tls)) as running:
        yield running


@pytest.fixture(scope="module")
def auth_server(quick_store: Path, token_file: Path) -> Iterator[ServerThread]:
    tokens = TokenTable.from_file(token_file)
    with ServerThread(replace(server_config(quick_store), auth_tokens=tokens)) as running:
        yield running


def metrics_url(server: ServerThread, scheme: str, path: str = "/metrics") -> str:
    assert server.server is not None
    return f"{scheme}://127.0.0.1:{server.server.metrics_port}{path}"


def https_get(url: str, pki: Pki, client_cert: bool = False) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()  # type: ignore[operator]
    return e.value.code()


def x_input(chunk: np.ndarray) -> triton.InferInput:
    x = triton.InferInput("x", [1, *chunk.shape], "FP32")
    x.set_data_from_numpy(chunk[None])
    return x


# ---- TLS ---------------------------------------------------------------------------------------


def test_our_client_lists_and_steps_over_tls(
    tls_server: ServerThread, pki: Pki, quick_store: Path
) -> None:
    x = np.random.default_rng(1).standard_normal((3, 1)).astype(np.float32)
    with Client(tls_server.address, tls_ca=pki.ca) as c, c.session("sum_sign_lstm") as s:
        assert {m.name for m in c.models()} >= {"sum_sign_lstm", "seq_lstm"}
        y = np.array([list(o.raw) for o in s.step(x).outputs], np.float32)
    np.testing.assert_allclose(y, Reference(quick_store).run("sum_sign_lstm", [x]), atol=TOL)


def test_tritonclient_with_ssl_runs_a_sequence_over_tls(
    tls_server: ServerThread, pki: Pki, quick_store: Path
) -> None:
    c = triton.InferenceServerClient(tls_server.address, ssl=True, root_certificates=str(pki.ca))
    chunk = np.random.default_rng(2).standard_normal((4, 10)).astype(np.float32)
    try:
        assert c.is_server_ready()
        y = c.infer("seq_lstm", [x_input(chunk)], sequence_id=5, sequence_start=True)
    finally:
        c.close()
    expected = Reference(quick_store).run("seq_lstm", [chunk])
    np.testing.assert_allclose(y.as_numpy("y")[0], expected, atol=TOL, rtol=TOL)


def test_a_plaintext_client_gets_nothing_from_a_tls_server(tls_server: ServerThread) -> None:
    with Client(tls_server.address, retries=0, timeout=5) as c:
        assert code_of(c.models) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_trusts_another_ca_refuses_the_server(
    tls_server: ServerThread, pki: Pki
) -> None:
    with Client(tls_server.address, tls_ca=pki.rogue_cert, timeout=5) as c:
        assert code_of(c.models) == grpc.StatusCode.UNAVAILABLE


def test_metrics_speak_https_only(tls_server: ServerThread, pki: Pki) -> None:
    status, body = https_get(metrics_url(tls_server, "https"), pki)
    assert status == 200 and "rnnserve_requests_total" in body
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(metrics_url(tls_server, "http"), timeout=10).read()


# ---- mutual TLS --------------------------------------------------------------------------------


def test_mutual_tls_refuses_a_client_without_a_certificate(
    mtls_server: ServerThread, pki: Pki
) -> None:
    with Client(mtls_server.address, tls_ca=pki.ca, timeout=5, retries=0) as c:
        assert code_of(c.models) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_certificate_of_another_ca(
    mtls_server: ServerThread, pki: Pki
) -> None:
    with Client(
        mtls_server.address, tls_ca=pki.ca, tls_cert=pki.rogue_cert, tls_key=pki.rogue_key,
        timeout=5, retries=0,
    ) as c:  # fmt: skip
        assert code_of(c.models) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_serves_clients_with_certificates(mtls_server: ServerThread, pki: Pki) -> None:
    with Client(
        mtls_server.address, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key
    ) as c:
        assert c.models()
    t = triton.InferenceServerClient(
        mtls_server.address, ssl=True, root_certificates=str(pki.ca),
        private_key=str(pki.client_key), certificate_chain=str(pki.client_cert),
    )  # fmt: skip
    try:
        assert t.is_server_live()
    finally:
        t.close()
    assert https_get(metrics_url(mtls_server, "https"), pki, client_cert=True)[0] == 200
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError, OSError)):
        https_get(metrics_url(mtls_server, "https"), pki, client_cert=False)


# ---- tokens ------------------------------------------------------------------------------------


def our_calls(channel: grpc.Channel, metadata: list[tuple[str, str]]) -> dict[str, object]:
    """One call of each kind on our API (unary, server stream, bidi stream)."""
    stub = pb_grpc.RnnServeStub(channel)
    step = pb.StepRequest(session_id="x")
    return {
        "ListModels": lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata),
        "Generate": lambda: list(
            stub.Generate(pb.GenerateRequest(session_id="x"), metadata=metadata)
        ),
        "Session": lambda: list(stub.Session(iter([step]), metadata=metadata)),
    }


@pytest.mark.parametrize(
    "metadata",
    [[], [("authorization", "Bearer not-a-known-token")], [("authorization", f"Basic {ALICE}")]],
    ids=["missing", "wrong", "not-bearer"],
)
def test_every_rpc_without_a_known_bearer_token_is_unauthenticated(
    auth_server: ServerThread, metadata: list[tuple[str, str]]
) -> None:
    with grpc.insecure_channel(auth_server.address) as channel:
        for name, call in our_calls(channel, metadata).items():
            assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED, name
        # the request is not even parsed: garbage bytes are refused for the token, not the bytes
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        assert code_of(lambda: raw(b"\xff\xff garbage", metadata=metadata)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    t = triton.InferenceServerClient(auth_server.address)
    try:
        with pytest.raises(InferenceServerException) as e:
            t.get_model_metadata("seq_lstm", headers=dict(metadata))
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        assert "bearer" in e.value.message().lower()
    finally:
        t.close()


def test_health_answers_without_a_token(auth_server: ServerThread) -> None:
    with grpc.insecure_channel(auth_server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_known_token_opens_both_apis(auth_server: ServerThread) -> None:
    with Client(auth_server.address, token=ALICE) as c, c.session("sum_sign_lstm") as s:
        assert c.models()
        assert s.step([[0.5]]).outputs
    t = triton.InferenceServerClient(auth_server.address)
    try:
        assert t.is_server_live(headers={"authorization": f"Bearer {BOB}"})
    finally:
        t.close()


def test_tokens_never_reach_the_logs_or_the_metrics(
    auth_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with Client(auth_server.address, token=ALICE) as c:
        c.models()
    guess = ALICE[:-1] + ("A" if ALICE[-1] != "A" else "B")  # one character off
    with Client(auth_server.address, token=guess, retries=0) as c:
        assert code_of(c.models) == grpc.StatusCode.UNAUTHENTICATED
    status, metrics = urllib.request.urlopen(metrics_url(auth_server, "http")).status, ""
    metrics = urllib.request.urlopen(metrics_url(auth_server, "http")).read().decode()
    assert status == 200
    assert 'rnnserve_requests_total{code="UNAUTHENTICATED",method="ListModels"}' in metrics
    for secret in (ALICE, BOB, guess, ALICE[:12]):
        assert secret not in caplog.text and secret not in metrics


def test_sequence_ids_are_scoped_to_the_callers_identity(
    auth_server: ServerThread, quick_store: Path
) -> None:
    """Bob's sequence 7 is not Alice's: he can neither step nor end hers, and his own 7 leaves
    her state alone (checked against the eager reference)."""
    first, bobs, second = np.random.default_rng(7).standard_normal((3, 3, 10)).astype(np.float32)
    alice = {"authorization": f"Bearer {ALICE}"}
    bob = {"authorization": f"Bearer {BOB}"}
    t = triton.InferenceServerClient(auth_server.address)
    try:
        t.infer("seq_lstm", [x_input(first)], sequence_id=7, sequence_start=True, headers=alice)
        with pytest.raises(InferenceServerException) as e:  # not open in Bob's namespace
            t.infer("seq_lstm", [x_input(bobs)], sequence_id=7, headers=bob)
        assert e.value.status() == "StatusCode.NOT_FOUND"
        t.infer(
            "seq_lstm", [x_input(bobs)], sequence_id=7, sequence_start=True,
            sequence_end=True, headers=bob,
        )  # fmt: skip
        y = t.infer("seq_lstm", [x_input(second)], sequence_id=7, headers=alice).as_numpy("y")
    finally:
        t.close()
    expected = Reference(quick_store).run("seq_lstm", [first, second])[3:]
    np.testing.assert_allclose(y[0], expected, atol=TOL, rtol=TOL)


def test_the_token_table_compares_every_token_and_refuses_bad_files(tmp_path: Path) -> None:
    table = TokenTable([("alice", ALICE), ("alice", BOB)])  # two tokens, one identity (rotation)
    assert table.identity_of(ALICE) == table.identity_of(BOB) == "alice"
    assert table.identity_of(ALICE + "x") is None and table.identity_of("") is None
    for text, words in [
        ("alice:short\n", "line 1: the token must be at least 16"),
        (f"# c\nno colon {ALICE}\n", "line 2: expected 'identity:token'"),
        (f"al ice:{ALICE}\n", "line 1: expected 'identity:token'"),
        (f"alice:{ALICE}\nbob:{ALICE}\n", "given twice"),
        ("# only a comment\n", "no tokens"),
    ]:
        path = tmp_path / "tokens"
        path.write_text(text)
        with pytest.raises(ValueError) as e:
            TokenTable.from_file(path)
        assert words in str(e.value)
        assert ALICE not in str(e.value)


# ---- `rnnserve serve` ---------------------------------------------------------------------------


def test_serve_takes_tls_and_tokens_from_its_environment(
    quick_store: Path, pki: Pki, token_file: Path, tmp_path: Path
) -> None:
    port, metrics_port = free_ports(2)
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "RNNSERVE_TLS_CERT": str(pki.server_cert),
        "RNNSERVE_TLS_KEY": str(pki.server_key),
        "RNNSERVE_AUTH_TOKEN_FILE": str(token_file),
        "RNNSERVE_TLS_CA": str(pki.ca),  # the health probe's trust, as in the container
    }
    serve = [str(RNNSERVE), "serve", "--store", str(quick_store), "--address", address]
    serve += ["--metrics-port", str(metrics_port)]
    with (tmp_path / "serve.log").open("w") as log:
        server = subprocess.Popen(serve, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            health = [str(RNNSERVE), "health", "--address", address]
            deadline = time.monotonic() + 120
            while subprocess.run(health, env=env, capture_output=True).returncode != 0:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "no SERVING over TLS within 120 s"
                time.sleep(0.5)
            with Client(address, tls_ca=pki.ca, token=BOB) as c:
                assert c.models()
            with Client(address, tls_ca=pki.ca, retries=0) as c:
                assert code_of(c.models) == grpc.StatusCode.UNAUTHENTICATED
            (tmp_path / "token").write_text(BOB + "\n")
            client = [str(RNNSERVE), "client", "--address", address, "--tls-ca", str(pki.ca)]
            listed = subprocess.run(
                [*client, "--token-file", str(tmp_path / "token"), "models"],
                capture_output=True, text=True, env=env, timeout=60,
            )  # fmt: skip
            assert listed.returncode == 0 and "seq_lstm" in listed.stdout, listed.stderr
            refused = subprocess.run([*client, "models"], capture_output=True, text=True, env=env)
            assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
            assert https_get(f"https://127.0.0.1:{metrics_port}/metrics", pki)[0] == 200
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    assert ALICE not in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--tls-cert", "cert.pem"], "--tls-key"),
        (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "TLS files"),
        (["--auth-token-file", "missing-tokens"], "cannot read the token file"),
    ],
)
def test_serve_refuses_a_broken_security_setup_at_start(
    quick_store: Path, flags: list[str], words: str, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    serve = [str(RNNSERVE), "serve", "--store", str(quick_store), "--address", f"127.0.0.1:{port}"]
    done = subprocess.run(
        [*serve, *flags], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert done.returncode == 2
    assert words in done.stderr


def test_perf_analyzer_runs_with_a_token_and_is_refused_without(auth_server: ServerThread) -> None:
    try:
        perf_analyzer.ensure()
    except perf_analyzer.PerfAnalyzerUnavailable as e:
        pytest.skip(f"perf_analyzer cannot run on this machine: {e}")
    header = ["-H", f"authorization:Bearer {ALICE}"]
    # one-step sequences (each request starts and ends its own): what is checked here is the
    # token. With 20-step ones a CI run once got "sequence 726 ... is not open" for a sequence
    # past the 724 perf_analyzer counted, every request the server counted having succeeded:
    # most likely perf_analyzer's own stop sending a step of a sequence it had not started;
    # not reproduced in 30 runs since
    with_token = perf_analyzer.run(
        auth_server.address, "seq_lstm", concurrency=2, sequence_length=1, extra=header
    )
    assert with_token.ok, with_token.output
    assert ALICE not in with_token.output
    without = perf_analyzer.run(auth_server.address, "seq_lstm", concurrency=2, sequence_length=1)
    assert without.returncode != 0 and without.request_count == 0

"""Moving a session: ExportSession / ImportSession, black-box over gRPC against real server
processes (native core). A session stepped on one server continues on a second one (another
deployment, its own memory store) exactly as the uninterrupted offline run (tests/eager.py); a
checkpoint restores; a move closes; every bad blob and call gets its own status.

The blob is read and forged here by an independent implementation of the format docs/api.md
describes (struct, zlib's CRC-32, hashlib's SHA-256), not by the server's code.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from eager import TOL, Reference
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from grpc_support import expect_error, manifest, random_chunk, raw, to_input
from lb_support import Replica
from redis_support import RedisProcess

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.client import Client

SECOND_MODELS = ["seq_lstm", "seq_gru", "elman", "char"]  # what the second deployment serves
LONG_TOL = 10 * TOL  # hundreds of time steps: the graph's and eager's rounding drift apart


# ---- the blob format, written out from docs/api.md ---------------------------------------------


@dataclass
class Blob:
    tensors: list[tuple[str, tuple[int, ...]]]
    model: str
    version: int
    next_index: int
    last: tuple[int, int, np.ndarray] | None  # (step_index, time steps, outputs)
    state: np.ndarray  # float32, the tensors' values in order

    def states(self) -> list[np.ndarray]:
        out, at = [], 0
        for _, shape in self.tensors:
            n = int(np.prod(shape))
            out.append(self.state[at : at + n].reshape(shape))
            at += n
        return out


def read_blob(blob: bytes) -> Blob:
    assert blob[:5] == b"RNSB\x01" and blob[5:8] == b"\0\0\0"
    assert struct.unpack_from("<Q", blob, 8)[0] == len(blob)
    assert hashlib.sha256(blob[:-32]).digest() == blob[-32:]
    at = 16

    def take(fmt: str) -> tuple:
        nonlocal at
        values = struct.unpack_from(fmt, blob, at)
        at += struct.calcsize(fmt)
        return values

    tensors = []
    for _ in range(take("<I")[0]):
        (n,) = take("<I")
        name = blob[at : at + n].decode()
        at += n
        (rank,) = take("<I")
        tensors.append((name, take(f"<{rank}I")))
    (n,) = take("<I")
    record = blob[at : at + n]
    assert at + n == len(blob) - 32
    return read_record(record, tensors)


def read_record(r: bytes, tensors: list[tuple[str, tuple[int, ...]]]) -> Blob:
    assert r[:4] == b"RNSS" and zlib.crc32(r[:-4]) == struct.unpack("<I", r[-4:])[0]
    assert r[4] in (1, 2) and r[5:8] == b"\0\0\0"
    next_index = int(r[8:24], 16)
    at = 24 if r[4] == 1 else 40  # format 2: the incarnation in 16 hex digits follows the index
    (n,) = struct.unpack_from("<I", r, at)
    model = r[at + 4 : at + 4 + n].decode()
    at += 4 + n
    version, has_last = struct.unpack_from("<IB", r, at)
    at += 5
    last = None
    if has_last:
        step_index, steps, count = struct.unpack_from("<QII", r, at)
        at += 16
        last = (step_index, steps, np.frombuffer(r, np.float32, count, at))
        at += 4 * count
    (count,) = struct.unpack_from("<I", r, at)
    state = np.frombuffer(r, np.float32, count, at + 4)
    assert at + 4 + 4 * count == len(r) - 4
    return Blob(tensors, model, version, next_index, last, state)


def write_blob(b: Blob, record_format: int = 2) -> bytes:
    record = b"RNSS%c\0\0\0" % record_format + b"%016x" % b.next_index
    if record_format == 2:
        record += b"%016x" % 0x5EED  # the incarnation: an import opens the session anew
    record += struct.pack("<I", len(b.model)) + b.model.encode() + struct.pack("<I", b.version)
    if b.last is None:
        record += b"\0"
    else:
        step_index, steps, y = b.last
        record += struct.pack("<BQII", 1, step_index, steps, y.size) + y.astype("<f4").tobytes()
    record += struct.pack("<I", b.state.size) + b.state.astype("<f4").tobytes()
    record += struct.pack("<I", zlib.crc32(record))
    body = struct.pack("<I", len(b.tensors))
    for name, shape in b.tensors:
        body += struct.pack("<I", len(name)) + name.encode()
        body += struct.pack(f"<I{len(shape)}I", len(shape), *shape)
    body += struct.pack("<I", len(record)) + record
    head = b"RNSB\x01\0\0\0" + struct.pack("<Q", 16 + len(body) + 32)
    return head + body + hashlib.sha256(head + body).digest()


def resealed(blob: bytes) -> bytes:
    """The blob with its SHA-256 recomputed (for a change that must fail a later check)."""
    return blob[:-32] + hashlib.sha256(blob[:-32]).digest()


# ---- servers ----------------------------------------------------------------------------------


def subset_store(store: Path, folder: Path, models: list[str]) -> Path:
    folder.mkdir()
    for name in models:
        (folder / name).symlink_to(store / name)
    return folder


@dataclass
class Server:
    replica: Replica
    channel: grpc.Channel
    api: pb_grpc.RnnServeStub

    @property
    def address(self) -> str:
        return self.replica.address


def start(store: Path, folder: Path, name: str, *flags: str, url: str = "memory") -> Server:
    replica = Replica(store, url, folder / f"{name}.log", *flags)
    replica.start()
    try:
        replica.wait_serving()
    except BaseException:
        replica.stop()
        raise
    channel = grpc.insecure_channel(replica.address)
    return Server(replica, channel, pb_grpc.RnnServeStub(channel))


def stop(server: Server) -> None:
    server.channel.close()
    server.replica.stop()


@pytest.fixture(scope="module")
def first(quick_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start(quick_store, tmp_path_factory.mktemp("first"), "first")
    yield server
    stop(server)


@pytest.fixture(scope="module")
def second(quick_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("second")
    server = start(subset_store(quick_store, folder / "store", SECOND_MODELS), folder, "second")
    yield server
    stop(server)


@pytest.fixture(scope="module")
def ref(quick_store: Path) -> Reference:
    return Reference(quick_store)


def chunks_for(store: Path, model: str, n: int, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    m = manifest(store, model)
    return [random_chunk(m, rng, int(t)) for t in rng.integers(1, 4, size=n)]


def step(server: Server, sid: str, index: int, chunk: np.ndarray) -> np.ndarray:
    request = pb.StepRequest(session_id=sid, step_index=index, input=to_input(chunk))
    return raw(server.api.Step(request, timeout=10))


def export(server: Server, sid: str, close: bool = False) -> pb.ExportSessionResponse:
    return server.api.ExportSession(
        pb.ExportSessionRequest(session_id=sid, close=close), timeout=10
    )


def import_(server: Server, blob: bytes, **fields: object) -> pb.ImportSessionResponse:
    return server.api.ImportSession(pb.ImportSessionRequest(blob=blob, **fields), timeout=10)


def eager_states(ref: Reference, model: str, chunks: list[np.ndarray]) -> list[np.ndarray]:
    """The eager model's states, (L, 1, H) each in manifest order, after every chunk."""
    x = torch.from_numpy(np.concatenate(chunks)[None])
    m = ref.model(model)
    with torch.inference_mode():
        return [s.numpy() for s in m.step(x, *m.init_states(1))[1:]]


def eager_trail(ref: Reference, model: str, chunks: list[np.ndarray]) -> list[list[np.ndarray]]:
    """The eager model's states after 0, 1, ..., len(chunks) chunks, fed one chunk at a time."""
    m = ref.model(model)
    states = m.init_states(1)
    trail = [[s.numpy() for s in states]]
    with torch.inference_mode():
        for c in chunks:
            states = m.step(torch.from_numpy(c[None]), *states)[1:]
            trail.append([s.numpy() for s in states])
    return trail


# ---- moving and checkpointing -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["seq_lstm", "elman", "char"])
def test_a_moved_session_continues_on_a_second_server_as_the_uninterrupted_run(
    first: Server, second: Server, ref: Reference, quick_store: Path, model: str
) -> None:
    chunks = chunks_for(quick_store, model, 7)
    with Client(first.address) as a, Client(second.address) as b:
        s = a.session(model)
        ys = [
            raw(s.step(tokens=c.tolist()) if c.dtype == np.int64 else s.step(c)) for c in chunks[:4]
        ]
        moved = a.export_session(s.id, close=True)
        assert (moved.model, moved.version, moved.next_step_index) == (model, 1, 4)
        t = b.import_session(moved.blob)
        assert t.id != s.id and t.next_index == 4 and t.info.model == model
        ys += [
            raw(t.step(tokens=c.tolist()) if c.dtype == np.int64 else t.step(c)) for c in chunks[4:]
        ]
        # a move: the old id is gone on the first server, as a closed session is
        details = expect_error(lambda: step(first, s.id, 4, chunks[4]), grpc.StatusCode.NOT_FOUND)
        assert details == f"unknown session '{s.id}' (never opened or closed)"
    np.testing.assert_allclose(np.concatenate(ys), ref.run(model, chunks), atol=TOL, rtol=0)


def test_the_blob_holds_the_eager_states_in_pytorch_layout(
    first: Server, ref: Reference, quick_store: Path
) -> None:
    chunks = chunks_for(quick_store, "seq_lstm", 3)
    sid = first.api.OpenSession(pb.OpenSessionRequest(model="seq_lstm")).session_id
    ys = [step(first, sid, i, c) for i, c in enumerate(chunks)]
    blob = read_blob(export(first, sid).blob)
    m = manifest(quick_store, "seq_lstm")
    assert [name for name, _ in blob.tensors] == [s.name for s in m.state]
    assert (blob.model, blob.version, blob.next_index) == ("seq_lstm", 1, 3)
    want = eager_states(ref, "seq_lstm", chunks)
    assert [shape for _, shape in blob.tensors] == [w.shape for w in want]  # (L*D, 1, H)
    for got, w in zip(blob.states(), want, strict=True):
        np.testing.assert_allclose(got, w, atol=TOL, rtol=0)
    assert blob.last is not None and blob.last[:2] == (2, len(chunks[2]))
    np.testing.assert_array_equal(blob.last[2].reshape(ys[2].shape), ys[2])


def test_a_checkpoint_keeps_the_session_and_restores_as_a_new_one(
    first: Server, ref: Reference, quick_store: Path
) -> None:
    chunks = chunks_for(quick_store, "seq_gru", 6)
    other = chunks_for(quick_store, "seq_gru", 6, seed=4)[3:]
    sid = first.api.OpenSession(pb.OpenSessionRequest(model="seq_gru")).session_id
    ys = [step(first, sid, i, c) for i, c in enumerate(chunks[:3])]
    checkpoint = export(first, sid).blob
    ys += [step(first, sid, i, c) for i, c in enumerate(chunks[3:], start=3)]  # lives on
    np.testing.assert_allclose(np.concatenate(ys), ref.run("seq_gru", chunks), atol=TOL, rtol=0)
    restored = import_(first, checkpoint)
    assert restored.session_id != sid and restored.next_step_index == 3
    zs = [step(first, restored.session_id, i, c) for i, c in enumerate(other, start=3)]
    want = ref.run("seq_gru", chunks[:3] + other)[sum(len(c) for c in chunks[:3]) :]
    np.testing.assert_allclose(np.concatenate(zs), want, atol=TOL, rtol=0)


def test_a_blob_exported_before_records_had_an_incarnation_imports(
    first: Server, second: Server, ref: Reference, quick_store: Path
) -> None:
    chunks = chunks_for(quick_store, "seq_lstm", 4)
    sid = first.api.OpenSession(pb.OpenSessionRequest(model="seq_lstm")).session_id
    ys = [step(first, sid, i, c) for i, c in enumerate(chunks[:2])]
    old = write_blob(read_blob(export(first, sid).blob), record_format=1)
    moved = import_(second, old).session_id
    ys += [step(second, moved, i, c) for i, c in enumerate(chunks[2:], start=2)]
    np.testing.assert_allclose(np.concatenate(ys), ref.run("seq_lstm", chunks), atol=TOL, rtol=0)


def test_an_imported_session_answers_a_retry_of_its_last_step(
    first: Server, second: Server, quick_store: Path
) -> None:
    chunks = chunks_for(quick_store, "seq_lstm", 2)
    sid = first.api.OpenSession(pb.OpenSessionRequest(model="seq_lstm")).session_id
    ys = [step(first, sid, i, c) for i, c in enumerate(chunks)]
    moved = import_(second, export(first, sid, close=True).blob)
    assert np.array_equal(step(second, moved.session_id, 1, chunks[1]), ys[1])  # from the cache


def test_generate_continues_from_the_imported_last_step(first: Server, second: Server) -> None:
    sid = first.api.OpenSession(pb.OpenSessionRequest(model="char")).session_id
    first.api.Step(pb.StepRequest(session_id=sid, step_index=0, input=pb.Input(text="def ")))
    moved = import_(second, export(first, sid).blob).session_id

    def generated(server: Server, session_id: str) -> str:
        request = pb.GenerateRequest(session_id=session_id, max_tokens=12, temperature=0)
        return "".join(r.text for r in server.api.Generate(request, timeout=10))

    assert generated(second, moved) == generated(first, sid)  # same state, same last output


def test_import_keeps_a_chosen_id_and_refuses_one_that_is_live(first: Server) -> None:
    sid = first.api.OpenSession(pb.OpenSessionRequest(model="seq_lstm")).session_id
    blob = export(first, sid).blob
    chosen = f"restored-{time.monotonic_ns()}"
    assert import_(first, blob, session_id=chosen).session_id == chosen
    for live in (chosen, sid):
        details = expect_error(
            lambda live=live: import_(first, blob, session_id=live), grpc.StatusCode.ALREADY_EXISTS
        )
        assert details == f"session '{live}' is already open"
    details = expect_error(
        lambda: import_(first, blob, session_id="oip:seq_lstm:7"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details == "session_id may not contain ':'"


class Background:
    """Steps one session through StepMany, 20 steps of it per message, so it is always mid-step
    with more queued; records which step_indexes were acknowledged."""

    def __init__(self, server: Server, sid: str, chunks: list[np.ndarray]) -> None:
        self.acknowledged: list[int] = []
        self.first_reply = threading.Event()
        self.done = threading.Event()
        requests = [
            pb.StepRequest(session_id=sid, step_index=i, input=to_input(c))
            for i, c in enumerate(chunks)
        ]
        messages = [
            pb.StepManyRequest(steps=requests[i : i + 20]) for i in range(0, len(requests), 20)
        ]
        self.thread = threading.Thread(target=self._run, args=(server, messages))
        self.thread.start()

    def _run(self, server: Server, messages: list[pb.StepManyRequest]) -> None:
        try:
            for reply in server.api.StepMany(iter(messages), timeout=60):
                self.acknowledged += [
                    r.reply.step_index for r in reply.results if r.HasField("reply")
                ]
                self.first_reply.set()
        finally:
            self.first_reply.set()
            self.done.set()

    def join(self) -> list[int]:
        self.thread.join(60)
        return self.acknowledged


def test_checkpoints_between_concurrent_steps_hold_whole_steps(
    first: Server, ref: Reference, quick_store: Path
) -> None:
    chunks = chunks_for(quick_store, "seq_lstm", 200)
    sid = first.api.OpenSession(pb.OpenSessionRequest(model="seq_lstm")).session_id
    steps = Background(first, sid, chunks)
    blobs = []
    while not steps.done.is_set():
        blobs.append(read_blob(export(first, sid).blob))
    assert len(steps.join()) == len(chunks)
    assert len({b.next_index for b in blobs}) > 2  # exports landed between many steps
    trail = eager_trail(ref, "seq_lstm", chunks)
    for b in blobs[:: max(1, len(blobs) // 50)]:
        for got, w in zip(b.states(), trail[b.next_index], strict=True):
            np.testing.assert_allclose(got, w, atol=LONG_TOL, rtol=0)


def test_a_move_during_concurrent_steps_keeps_every_acknowledged_step(
    first: Server, ref: Reference, quick_store: Path
) -> None:
    chunks = chunks_for(quick_store, "seq_lstm", 100)
    trail = eager_trail(ref, "seq_lstm", chunks)
    for _ in range(6):
        sid = first.api.OpenSession(pb.OpenSessionRequest(model="seq_lstm")).session_id
        steps = Background(first, sid, chunks)
        steps.first_reply.wait(30)
        blob = read_blob(export(first, sid, close=True).blob)
        acknowledged = steps.join()
        # every step answered OK is in the blob, and none after it was answered OK
        assert acknowledged == list(range(blob.next_index))
        assert 0 < blob.next_index < len(chunks)
        for got, w in zip(blob.states(), trail[blob.next_index], strict=True):
            np.testing.assert_allclose(got, w, atol=LONG_TOL, rtol=0)


# ---- bad calls ----------------------------------------------------------------------------------


def test_export_of_an_unknown_or_closed_session_is_not_found(first: Server) -> None:
    details = expect_error(lambda: export(first, "nope"), grpc.StatusCode.NOT_FOUND)
    assert details == "unknown session 'nope' (never opened or closed)"
    sid = first.api.OpenSession(pb.OpenSessionRequest(model="seq_lstm")).session_id
    first.api.CloseSession(pb.CloseSessionRequest(session_id=sid))
    for close in (False, True):
        details = expect_error(lambda c=close: export(first, sid, c), grpc.StatusCode.NOT_FOUND)
        assert details == f"unknown session '{sid}' (never opened or closed)"


def test_export_of_an_expired_session_is_not_found(quick_store: Path, tmp_path: Path) -> None:
    server = start(quick_store, tmp_path, "ttl", "--session-ttl", "0.5")
    try:
        sid = server.api.OpenSession(pb.OpenSessionRequest(model="seq_lstm")).session_id
        time.sleep(1.2)
        details = expect_error(lambda: export(server, sid), grpc.StatusCode.NOT_FOUND)
        assert details == f"session '{sid}' expired after 0.5 s idle; open a new one"
    finally:
        stop(server)


@pytest.fixture(scope="module")
def lstm_blob(first: Server, quick_store: Path) -> bytes:
    sid = first.api.OpenSession(pb.OpenSessionRequest(model="seq_lstm")).session_id
    for i, c in enumerate(chunks_for(quick_store, "seq_lstm", 2)):
        step(first, sid, i, c)
    return export(first, sid).blob


def test_a_truncated_blob_is_invalid(first: Server, lstm_blob: bytes) -> None:
    n = len(lstm_blob)
    details = expect_error(lambda: import_(first, lstm_blob[:-1]), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == f"the session blob is truncated: {n - 1} of its {n} bytes"
    details = expect_error(lambda: import_(first, lstm_blob[:20]), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == "the session blob is truncated: 20 bytes, shorter than any export"
    details = expect_error(lambda: import_(first, b""), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == "the session blob is truncated: 0 bytes, shorter than any export"


def test_a_blob_with_a_wrong_magic_or_format_version_is_invalid(
    first: Server, lstm_blob: bytes
) -> None:
    for wrong in (b"RNSS" + lstm_blob[4:], b"{'state': [1, 2]}" * 4):
        details = expect_error(lambda w=wrong: import_(first, w), grpc.StatusCode.INVALID_ARGUMENT)
        assert (
            details
            == 'the session blob is not an rnnserve session export (it does not start with "RNSB")'
        )
    later = resealed(lstm_blob[:4] + b"\x02" + lstm_blob[5:])
    details = expect_error(lambda: import_(first, later), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == "the session blob has format version 2; this server reads version 1"


def test_a_tampered_blob_fails_its_checksum(first: Server, lstm_blob: bytes) -> None:
    b = read_blob(lstm_blob)
    at = len(lstm_blob) - 32 - 8  # inside the state's floats
    tampered = lstm_blob[:at] + bytes([lstm_blob[at] ^ 0x40]) + lstm_blob[at + 1 :]
    details = expect_error(lambda: import_(first, tampered), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == "the session blob fails its SHA-256 checksum (corrupt or altered)"
    b.next_index += 1  # an internally consistent lie still has to agree with itself
    details = expect_error(lambda: import_(first, write_blob(b)), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == (
        "the session blob is malformed: its last reply answers step_index 1, "
        "its next step_index is 3"
    )
    b.next_index -= 1
    b.state = b.state.copy()
    b.state[0] = np.nan
    details = expect_error(lambda: import_(first, write_blob(b)), grpc.StatusCode.INVALID_ARGUMENT)
    assert details == "the session blob holds NaN or Inf in its state"


def test_a_blob_of_a_model_or_version_not_served_is_a_failed_precondition(
    first: Server, second: Server, lstm_blob: bytes
) -> None:
    sid = first.api.OpenSession(pb.OpenSessionRequest(model="sum_sign_lstm")).session_id
    foreign = export(first, sid).blob
    details = expect_error(lambda: import_(second, foreign), grpc.StatusCode.FAILED_PRECONDITION)
    assert details == (
        "the session blob holds a session of model 'sum_sign_lstm' version 1, which this server "
        "does not serve (unknown model 'sum_sign_lstm'; this server has: "
        + ", ".join(sorted(SECOND_MODELS))
        + ")"
    )
    b = read_blob(lstm_blob)
    b.version = 2
    details = expect_error(
        lambda: import_(second, write_blob(b)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details == (
        "the session blob holds a session of model 'seq_lstm' version 2, which this server "
        "does not serve (model 'seq_lstm' has no version 2; loaded: 1)"
    )


def test_a_blob_of_another_model_than_expected_is_a_failed_precondition(
    first: Server, lstm_blob: bytes
) -> None:
    details = expect_error(
        lambda: import_(first, lstm_blob, model="seq_gru"), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert details == (
        "the session blob holds a session of model 'seq_lstm' version 1; "
        "this call expects model 'seq_gru'"
    )
    details = expect_error(
        lambda: import_(first, lstm_blob, model="seq_lstm", version=2),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert details == (
        "the session blob holds a session of model 'seq_lstm' version 1; "
        "this call expects model 'seq_lstm' version 2"
    )
    assert import_(first, lstm_blob, model="seq_lstm", version=1).next_step_index == 2


def test_a_blob_whose_states_do_not_match_the_manifest_is_a_failed_precondition(
    first: Server, lstm_blob: bytes, quick_store: Path
) -> None:
    b = read_blob(lstm_blob)
    b.model = "seq_gru"  # states h and c, where seq_gru has h alone
    h = manifest(quick_store, "seq_gru").state[0]
    details = expect_error(
        lambda: import_(first, write_blob(b)), grpc.StatusCode.FAILED_PRECONDITION
    )
    shape = b.tensors[0][1]
    assert details == (
        f"the session blob's state tensors are 'h' ({shape[0]}, 1, {shape[2]}), "
        f"'c' ({shape[0]}, 1, {shape[2]}); seq_gru version 1 here has "
        f"'h' ({h.layers}, 1, {h.size})"
    )


def test_a_sealed_blob_listing_more_tensors_than_any_model_is_invalid(
    first: Server, lstm_blob: bytes
) -> None:
    """SHA-256 is no secret: a blob sealed by anyone listing 100,000 empty tensors is refused
    before they are read, not held in memory nor named in a multi-megabyte error."""
    b = read_blob(lstm_blob)
    b.tensors = [("t", (0,))] * 100_000
    b.state = np.zeros(0, np.float32)
    details = expect_error(lambda: import_(first, write_blob(b)), grpc.StatusCode.INVALID_ARGUMENT)
    assert "at most 64 tensors" in details and len(details) < 400, details[:400]
    b.tensors = [("n" * 300, (0,))]
    details = expect_error(lambda: import_(first, write_blob(b)), grpc.StatusCode.INVALID_ARGUMENT)
    assert "at most 64 tensors" in details, details


def error_info(call) -> tuple[str, dict[str, str]]:
    """The rich status's ErrorInfo: (reason, metadata)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    for detail in rpc_status.from_call(info.value).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            unpacked = error_details_pb2.ErrorInfo()
            detail.Unpack(unpacked)
            return unpacked.reason, dict(unpacked.metadata)
    raise AssertionError("no ErrorInfo detail")


def test_the_transfer_errors_carry_their_reasons(first: Server, lstm_blob: bytes) -> None:
    sid = import_(first, lstm_blob).session_id
    assert error_info(lambda: import_(first, lstm_blob, session_id=sid)) == ("SESSION_EXISTS", {})
    assert error_info(lambda: import_(first, lstm_blob, model="sine")) == ("MODEL_MISMATCH", {})
    reason = error_info(lambda: import_(first, lstm_blob[:-1]))
    assert reason == ("INVALID_INPUT", {"field": "blob"})


def test_a_blob_over_the_message_limit_is_refused_by_grpc(first: Server) -> None:
    huge = b"RNSB" + bytes(5 * 1024 * 1024)
    expect_error(lambda: import_(first, huge), grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_imports_count_against_the_session_capacity(
    quick_store: Path, tmp_path: Path, lstm_blob: bytes
) -> None:
    store = subset_store(quick_store, tmp_path / "store", ["seq_lstm"])
    server = start(store, tmp_path, "capacity", "--max-sessions", "1")
    try:
        assert import_(server, lstm_blob).next_step_index == 2
        details = expect_error(
            lambda: import_(server, lstm_blob), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert (
            details == "session capacity full (1 open sessions); close idle sessions or retry later"
        )
    finally:
        stop(server)


# ---- the shared store ---------------------------------------------------------------------------


def test_export_and_import_on_redis_replicas_see_the_shared_session(
    quick_store: Path, tmp_path: Path, ref: Reference
) -> None:
    redis = RedisProcess(tmp_path)
    redis.start()
    servers: list[Server] = []
    try:
        servers = [start(quick_store, tmp_path, f"r{i}", url=redis.url) for i in range(2)]
        a, b = servers
        chunks = chunks_for(quick_store, "seq_lstm", 6)
        sid = a.api.OpenSession(pb.OpenSessionRequest(model="seq_lstm")).session_id
        ys = [step(a, sid, i, c) for i, c in enumerate(chunks[:2])]
        ys += [step(b, sid, i, c) for i, c in enumerate(chunks[2:4], start=2)]
        moved = export(a, sid, close=True)  # a's copy is at index 2: it must read b's steps
        assert moved.next_step_index == 4
        expect_error(lambda: step(b, sid, 4, chunks[4]), grpc.StatusCode.NOT_FOUND)
        chosen = "moved-" + sid
        assert import_(b, moved.blob, session_id=chosen).next_step_index == 4
        details = expect_error(
            lambda: import_(a, moved.blob, session_id=chosen), grpc.StatusCode.ALREADY_EXISTS
        )
        assert details == f"session '{chosen}' is already open"
        ys += [step(a, chosen, i, c) for i, c in enumerate(chunks[4:], start=4)]
        redis.stop()  # an export must not hand out a copy it cannot check is the latest
        details = expect_error(lambda: export(a, chosen), grpc.StatusCode.UNAVAILABLE)
        assert details.startswith(f"session '{chosen}' could not be re-read from the shared")
    finally:
        for s in servers:
            stop(s)
        redis.stop()
    np.testing.assert_allclose(np.concatenate(ys), ref.run("seq_lstm", chunks), atol=TOL, rtol=0)

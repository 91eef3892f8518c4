"""Python client for rnnserve.v1.

    with Client("127.0.0.1:50051") as c, c.session("sine") as s:
        reply = s.step([[0.1]])          # features: [[f1..fF], ...] (T steps)
        s.step(text="hel")               # char models
        for g in s.generate(max_tokens=20, temperature=0.8, seed=1): ...

A ``Session`` numbers its steps itself and retries a step whose reply was lost (``retryable``)
with the same ``step_index``: the server answers a retry of the last step from
its cache without advancing the state, so a retry never double-steps. Given several addresses
(replicas sharing a Redis session store, or load balancers), a retry goes to the next one. Every
step carries its session id as ``x-session-id`` metadata, which a load balancer may hash on to keep
a session on one replica (a cache optimisation; any replica can serve it).

A session moves to another deployment, or is checkpointed, as a checksummed blob:

    blob = s.export(close=True)                      # close=False: a checkpoint; s lives on
    moved = Client("other:50051").import_session(blob)  # continues at s's next step_index

Gateways stepping many sessions of one model use the packed form of StepMany (NumPy in and out):

    ids = [c.session("seq_lstm").id for _ in range(64)]
    x = np.zeros((64, 1, 10), np.float32)  # (N, T, F); token models: int ids (N, T)
    r = c.step_block("seq_lstm", ids, x, step_indexes=[0] * 64)
    r.y, r.probabilities, r.index, r.errors   # (N, T, O), (N, T, K), (N, T), {position: Error}
    for r in c.step_blocks("seq_lstm", ((ids, x, [i] * 64) for i in range(1, 10))): ...
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

# A step is retried on these with the same step_index (the server answers a repeat once). CANCELLED
# is among them because gRPC 1.51's server cancels a call that arrives while it shuts down (a
# replica draining on SIGTERM), before anything ran.
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


class ReplyMismatch(Exception):
    """A reply that does not answer the request it came back for (another session or step_index,
    another number of entries), or a stream that ended with requests unanswered. rnnserve never
    sends one; a proxy can: nginx 1.22, answering 502 for a stream, was seen handing the client a
    zero-length message first. The step's real reply is lost, as with a retryable error: it may
    have run or not, and sending it again with the same step_index is answered once.
    ``unanswered``: a stream's requests still without their reply, oldest first."""

    def __init__(self, message: str, unanswered: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.unanswered = list(unanswered)


def answers(request: pb.StepRequest, reply: pb.StepResponse) -> bool:
    """Whether ``reply`` is the answer to ``request`` (its session, and its step_index if it named
    one): a reply is acknowledged only then, since a lost step is found only by the next one."""
    if not reply.session_id:
        return False  # every reply names its session
    if request.session_id and reply.session_id != request.session_id:
        return False  # (a request may leave its session to its stream)
    return not request.HasField("step_index") or reply.step_index == request.step_index


def retryable(error: grpc.RpcError) -> bool:
    """Whether a step that failed so may be sent again with the same step_index: its reply was
    lost on the way (or it never ran). A proxy (nginx) reports a stream its upstream replica cut
    while shutting down as INTERNAL 'Stream removed'."""
    code = error.code()
    return code in RETRYABLE or (
        code == grpc.StatusCode.INTERNAL and "Stream removed" in (error.details() or "")
    )


def make_input(
    values: Any = None, *, text: str | None = None, tokens: Sequence[int] | None = None
) -> pb.Input:
    """An ``Input`` from features (nested [[...]] or flat scalars), text or token ids."""
    if text is not None:
        return pb.Input(text=text)
    if tokens is not None:
        return pb.Input(tokens=pb.Tokens(ids=list(tokens)))
    if values is None:
        return pb.Input()
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim > 2:  # flattened, (2, 3, F) would silently become 6 steps
        raise ValueError(f"features must be (T, F) or flat, got shape {list(arr.shape)}")
    steps = arr.shape[0] if arr.ndim == 2 else 0
    return pb.Input(features=pb.Features(values=arr.reshape(-1).tolist(), steps=steps))


def pack_steps(
    model: str, session_ids: Sequence[str], x: Any, step_indexes: Sequence[int] | None = None
) -> pb.PackedSteps:
    """A ``PackedSteps`` block: ``x`` is float features (N, T, F) or integer token ids (N, T)
    for the N sessions in ``session_ids``; ``step_indexes`` (N) makes the block idempotent."""
    arr = np.asarray(x)
    n = len(session_ids)
    indexes = [] if step_indexes is None else np.asarray(step_indexes, np.uint64).tolist()
    block = pb.PackedSteps(model=model, session_ids=session_ids, step_indexes=indexes)
    if arr.dtype.kind in "iu":
        if arr.ndim != 2 or arr.shape[0] != n or not arr.shape[1]:
            raise ValueError(f"token ids must be shaped (N={n}, T>=1), got {list(arr.shape)}")
        block.steps = arr.shape[1]
        block.tokens.extend(arr.reshape(-1).tolist())
        return block
    if arr.ndim != 3 or arr.shape[0] != n or not arr.shape[1]:  # on the wire T=0 means 1
        raise ValueError(f"features must be shaped (N={n}, T>=1, F), got {list(arr.shape)}")
    block.steps = arr.shape[1]
    block.features = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    return block


@dataclass(frozen=True)
class PackedReply:
    """A ``PackedResults`` as arrays. Rows of failed entries are zeros; ``errors`` says which."""

    step_indexes: np.ndarray  # (N,) uint64: the index each entry's reply answers
    y: np.ndarray  # (N, T, O) float32: the head's outputs
    probabilities: np.ndarray | None  # (N, T, K) float32: classification / next_token models
    index: np.ndarray | None  # (N, T): the most likely class / token
    errors: dict[int, pb.Error]  # position in the block -> its error
    expires_at: float

    @classmethod
    def from_message(
        cls, r: pb.PackedResults, n: int, steps: int, step_indexes: Sequence[int] = ()
    ) -> PackedReply:
        """``n`` sessions of ``steps`` time steps each, as the block that was sent (and its
        ``step_indexes``, if it named them). ``ReplyMismatch``: the reply is not that block's."""
        failed = {e.position for e in r.errors}
        answered = [i for i in range(len(r.step_indexes)) if i not in failed]
        if len(r.step_indexes) != n or (
            len(step_indexes) and any(r.step_indexes[i] != step_indexes[i] for i in answered)
        ):
            raise ReplyMismatch(
                f"a packed block of {n} sessions at step_indexes {list(step_indexes)[:8]} got a "
                f"reply of {len(r.step_indexes)} entries at {list(r.step_indexes)[:8]}"
            )
        probabilities = index = None
        if r.probabilities:
            probabilities = _block(r.probabilities, n, steps)
            index = np.asarray(r.index, dtype=np.int64).reshape(n, steps)
        return cls(
            step_indexes=np.asarray(r.step_indexes, dtype=np.uint64),
            y=_block(r.raw, n, steps),
            probabilities=probabilities,
            index=index,
            errors={e.position: e.error for e in r.errors},
            expires_at=r.expires_at,
        )


def _block(buffer: bytes, n: int, steps: int) -> np.ndarray:
    """float32 little-endian bytes → (N, T, width)."""
    flat = np.frombuffer(buffer, dtype="<f4")
    width = flat.size // (n * steps) if n * steps else 0
    return flat.reshape(n, steps, width)


class Client:
    """``tls_ca`` (PEM bytes or a file) turns TLS on and is the root the server's certificate must
    chain to; ``tls_cert``/``tls_key`` are this client's own for mutual TLS; ``tls_server_name``
    is the name to check the certificate against when it is not the address's host; ``token`` is
    sent as ``authorization: Bearer <token>`` with every call."""

    def __init__(
        self,
        address: str | Sequence[str],
        timeout: float = 30.0,
        retries: int = 3,
        *,
        tls_ca: bytes | str | Path | None = None,
        tls_cert: bytes | str | Path | None = None,
        tls_key: bytes | str | Path | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        self.addresses = [address] if isinstance(address, str) else list(address)
        if not self.addresses:
            raise ValueError("Client needs at least one address")
        self.address = self.addresses[0]
        self.timeout = timeout
        self.retries = retries
        self._channel_args = (tls_ca, tls_cert, tls_key, tls_server_name, token)
        self._channels: dict[str, grpc.Channel] = {}
        self._use(self.address)

    def _use(self, address: str) -> None:
        if address not in self._channels:  # kept open: other threads may still be calling on it
            self._channels[address] = open_channel(address, *self._channel_args)
        self.address = address
        self.channel = self._channels[address]
        self.stub = pb_grpc.RnnServeStub(self.channel)

    def fail_over(self) -> None:
        """Move to the next address (after a call failed UNAVAILABLE); a no-op with one address."""
        at = (self.addresses.index(self.address) + 1) % len(self.addresses)
        self._use(self.addresses[at])

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    # models
    def models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)

    def model(self, name: str, version: int = 0) -> pb.ModelInfo:
        return self.stub.GetModel(
            pb.GetModelRequest(name=name, version=version), timeout=self.timeout
        )

    # sessions
    def session(self, model: str, version: int = 0) -> Session:
        """Opens a session; use as a context manager to close it at the end."""
        info = self.stub.OpenSession(
            pb.OpenSessionRequest(model=model, version=version), timeout=self.timeout
        )
        return Session(self, info)

    def export_session(self, session_id: str, *, close: bool = False) -> pb.ExportSessionResponse:
        """The session as a checksummed blob (``.blob``), taken between its steps; ``close=True``
        closes it in the same hold (a move: import the blob elsewhere). The reply also names its
        model, version and next step_index."""
        request = pb.ExportSessionRequest(session_id=session_id, close=close)
        return self.stub.ExportSession(request, timeout=self.timeout)

    def import_session(
        self, blob: bytes, *, session_id: str = "", model: str = "", version: int = 0
    ) -> Session:
        """A session from an exported blob, continuing at the blob's next step_index. It gets a
        new id unless ``session_id`` names one (not live here); ``model``/``version``, when given,
        must be the blob's (FAILED_PRECONDITION otherwise)."""
        request = pb.ImportSessionRequest(
            blob=blob, session_id=session_id, model=model, version=version
        )
        r = self.stub.ImportSession(request, timeout=self.timeout)
        info = pb.SessionInfo(
            session_id=r.session_id,
            model=r.model,
            version=r.version,
            expires_at=r.expires_at,
            next_step_index=r.next_step_index,
        )
        return Session(self, info)

    def predict(
        self, model: str, inputs: Iterable[pb.Input | Any], version: int = 0, top_k: int = 0
    ) -> pb.PredictResponse:
        """Whole sequences (stateless). Each input: a ``pb.Input``, a str (text) or features."""
        msgs = [_as_input(i) for i in inputs]
        request = pb.PredictRequest(model=model, version=version, inputs=msgs, top_k=top_k)
        return self.stub.Predict(request, timeout=self.timeout)

    def step_many(self, messages: Iterable[list[pb.StepRequest]]) -> Iterator[pb.StepManyResponse]:
        """The StepMany stream: each item is a list of StepRequests (many sessions) → one reply."""
        return self.stub.StepMany(pb.StepManyRequest(steps=m) for m in messages)

    def step_block(
        self,
        model: str,
        session_ids: Sequence[str],
        x: Any,
        step_indexes: Sequence[int] | None = None,
    ) -> PackedReply:
        """One packed StepMany block (see ``pack_steps``) on a stream of its own."""
        replies = self.step_blocks(model, [(session_ids, x, step_indexes)], self.timeout)
        try:
            return next(replies)
        finally:
            replies.close()

    def step_blocks(
        self,
        model: str,
        blocks: Iterable[tuple[Sequence[str], Any, Sequence[int] | None]],
        timeout: float | None = None,
    ) -> Iterator[PackedReply]:
        """Packed blocks of one model on one StepMany stream, replies in order. Each block is
        (session_ids, x, step_indexes or None); the iterable may be a generator fed as replies
        arrive. A message-level error ends the stream (``grpc.RpcError``); ``timeout`` bounds
        the whole stream (None: no deadline)."""
        sent: deque[tuple[int, int, list[int]]] = deque()  # (N, T, indexes) of each block sent

        def requests() -> Iterator[pb.StepManyRequest]:
            for session_ids, x, step_indexes in blocks:
                packed = pack_steps(model, session_ids, x, step_indexes)
                sent.append((len(session_ids), packed.steps, list(packed.step_indexes)))
                yield pb.StepManyRequest(packed=packed)

        call = self.stub.StepMany(requests(), timeout=timeout)
        try:
            for reply in call:
                if not sent:
                    raise ReplyMismatch("a packed reply came with no block waiting for one")
                yield PackedReply.from_message(reply.packed, *sent.popleft())
            if sent:
                raise ReplyMismatch(f"the stream ended with {len(sent)} blocks unanswered")
        finally:
            call.cancel()  # a no-op once the stream has ended; else the caller stopped early


class Session:
    def __init__(self, client: Client, info: pb.SessionInfo) -> None:
        self.client = client
        self.info = info
        self.id = info.session_id
        self.next_index = info.next_step_index

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, values: Any = None, *, text=None, tokens=None, top_k=0) -> pb.StepRequest:
        """The next StepRequest (numbered) without sending it; advances the local index."""
        req = pb.StepRequest(
            session_id=self.id,
            step_index=self.next_index,
            input=make_input(values, text=text, tokens=tokens),
            top_k=top_k,
        )
        self.next_index += 1
        return req

    def step(self, values: Any = None, *, text=None, tokens=None, top_k=0) -> pb.StepResponse:
        req = self.request(values, text=text, tokens=tokens, top_k=top_k)
        affinity = (("x-session-id", self.id),)
        mismatched = 0
        for attempt in range(self.client.retries + 1):
            try:
                reply = self.client.stub.Step(req, timeout=self.client.timeout, metadata=affinity)
            except grpc.RpcError as e:
                if not retryable(e):
                    self.next_index -= 1  # refused: the server did not advance either
                    raise
                if attempt == self.client.retries:
                    raise  # unknown whether it ran; the next step's error names the index
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    self.client.fail_over()
            else:
                if answers(req, reply):
                    return reply
                mismatched += 1
                if attempt == self.client.retries:  # unknown whether it ran, as above
                    raise ReplyMismatch(
                        f"step {req.step_index} of session {self.id!r} got a reply for session "
                        f"{reply.session_id!r} step {reply.step_index} (replies that answered "
                        f"another request: {mismatched} of {attempt + 1} tries)"
                    )
                self.client.fail_over()  # the path that mangled it may be this address's
            time.sleep(min(0.05 * 2**attempt, 1.0))
        raise AssertionError("unreachable")

    def stream(self, requests: Iterable[pb.StepRequest]) -> Iterator[pb.StepResponse]:
        """The bidi ``Session`` stream; build requests with ``request()``. Replies come in order,
        each checked against its request. ``ReplyMismatch`` ends the stream: open another and send
        its ``unanswered`` requests again, as after a cut stream."""
        sent: deque[pb.StepRequest] = deque()

        def recorded() -> Iterator[pb.StepRequest]:
            for request in requests:
                sent.append(request)
                yield request

        call = self.client.stub.Session(recorded(), metadata=(("x-session-id", self.id),))
        try:
            for reply in call:
                if not sent:
                    raise ReplyMismatch(f"session {self.id!r}: a reply came with no step waiting")
                if reply.session_id != self.id or not answers(sent[0], reply):
                    raise ReplyMismatch(
                        f"step {sent[0].step_index} of session {self.id!r} got a reply for "
                        f"session {reply.session_id!r} step {reply.step_index}",
                        sent,
                    )
                sent.popleft()
                yield reply
            if sent:
                raise ReplyMismatch(f"the stream ended with {len(sent)} steps unanswered", sent)
        finally:
            call.cancel()  # a no-op once the stream has ended; else the caller stopped early

    def generate(
        self,
        prompt: Any = None,
        *,
        max_tokens: int = 32,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
    ) -> Iterator[pb.GenerateResponse]:
        """Text (char models, prompt = str) or a forecast (regression, prompt = features)."""
        request = pb.GenerateRequest(
            session_id=self.id,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
        )
        if prompt is not None:
            request.prompt.CopyFrom(_as_input(prompt))
        for reply in self.client.stub.Generate(request, timeout=self.client.timeout):
            self.next_index = reply.step_index + 1
            yield reply

    def reset(self) -> pb.SessionInfo:
        self.info = self.client.stub.ResetSession(
            pb.ResetSessionRequest(session_id=self.id), timeout=self.client.timeout
        )
        self.next_index = 0
        return self.info

    def export(self, *, close: bool = False) -> bytes:
        """This session as a blob for ``Client.import_session`` (see ``Client.export_session``)."""
        return self.client.export_session(self.id, close=close).blob

    def close(self) -> None:
        try:
            self.client.stub.CloseSession(
                pb.CloseSessionRequest(session_id=self.id), timeout=self.client.timeout
            )
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:  # already expired or closed: fine
                raise


def open_channel(
    address: str,
    tls_ca: bytes | str | Path | None = None,
    tls_cert: bytes | str | Path | None = None,
    tls_key: bytes | str | Path | None = None,
    tls_server_name: str | None = None,
    token: str | None = None,
) -> grpc.Channel:
    """A plaintext or TLS channel; with ``token``, every call carries it as a bearer token."""
    if tls_ca is None:
        if tls_cert is not None or tls_key is not None:
            raise ValueError("a client certificate needs TLS: pass tls_ca too")
        channel = grpc.insecure_channel(address)
    else:
        credentials = grpc.ssl_channel_credentials(
            _pem(tls_ca), _pem(tls_key) if tls_key else None, _pem(tls_cert) if tls_cert else None
        )
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(address, credentials, options)
    if token is None:
        return channel
    return grpc.intercept_channel(channel, _BearerToken(token))


def _pem(value: bytes | str | Path) -> bytes:
    return value if isinstance(value, bytes) else Path(value).read_bytes()


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials,
            details.wait_for_ready, details.compression,
        )  # fmt: skip

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._with_token(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def _as_input(item: Any) -> pb.Input:
    if isinstance(item, pb.Input):
        return item
    if isinstance(item, str):
        return pb.Input(text=item)
    return make_input(item)

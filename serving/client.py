"""Python client for rnnserve.v1.

    with Client("127.0.0.1:50051") as c, c.session("sine") as s:
        reply = s.step([[0.1]])          # features: [[f1..fF], ...] (T steps)
        s.step(text="hel")               # char models
        for g in s.generate(max_tokens=20, temperature=0.8, seed=1): ...

A ``Session`` numbers its steps itself and retries a step whose reply was lost (UNAVAILABLE or
DEADLINE_EXCEEDED) with the same ``step_index``: the server answers a retry of the last step from
its cache without advancing the state, so a retry never double-steps.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


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
    steps = arr.shape[0] if arr.ndim == 2 else 0
    return pb.Input(features=pb.Features(values=arr.reshape(-1).tolist(), steps=steps))


class Client:
    def __init__(self, address: str, timeout: float = 30.0, retries: int = 3) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.RnnServeStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

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
        for attempt in range(self.client.retries + 1):
            try:
                return self.client.stub.Step(req, timeout=self.client.timeout)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    self.next_index -= 1  # refused: the server did not advance either
                    raise
                if attempt == self.client.retries:
                    raise  # unknown whether it ran; the next step's error names the index
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def stream(self, requests: Iterable[pb.StepRequest]) -> Iterator[pb.StepResponse]:
        """The bidi ``Session`` stream; build requests with ``request()``. Replies come in order."""
        return self.client.stub.Session(iter(requests))

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

    def close(self) -> None:
        try:
            self.client.stub.CloseSession(
                pb.CloseSessionRequest(session_id=self.id), timeout=self.client.timeout
            )
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:  # already expired or closed: fine
                raise


def _as_input(item: Any) -> pb.Input:
    if isinstance(item, pb.Input):
        return item
    if isinstance(item, str):
        return pb.Input(text=item)
    return make_input(item)

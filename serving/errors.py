"""Domain errors, and the one table that maps them onto gRPC status codes and HTTP statuses.

Core code raises these; transports translate them with ``grpc_status`` / ``http_status`` and never
invent codes of their own, so every API answers the same mistake the same way.
"""

from __future__ import annotations

import grpc


class RnnServeError(Exception):
    """Base of every error a client can cause or observe. ``str(e)`` is the client's message."""

    reason = "INTERNAL"  # a stable machine-readable word, sent as error detail / JSON "code"


class InvalidInput(RnnServeError):
    """Bad shape, dtype, NaN/Inf, unknown token, empty or over-long input, bad parameters."""

    reason = "INVALID_INPUT"

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field  # which request field is wrong (for BadRequest details)


class PayloadTooLarge(InvalidInput):
    reason = "PAYLOAD_TOO_LARGE"


class ModelNotFound(RnnServeError):
    reason = "MODEL_NOT_FOUND"


class VersionNotFound(RnnServeError):
    reason = "VERSION_NOT_FOUND"


class SessionNotFound(RnnServeError):
    reason = "SESSION_NOT_FOUND"


class SessionExpired(RnnServeError):
    """The session existed but idled past its TTL: distinct from never having existed."""

    reason = "SESSION_EXPIRED"


class SessionExists(RnnServeError):
    """ImportSession as a session id that is live."""

    reason = "SESSION_EXISTS"


class ModelMismatch(RnnServeError):
    """An imported session of a model, version or state shape this server does not serve."""

    reason = "MODEL_MISMATCH"


class NotStreamable(RnnServeError):
    """Stepping a model that needs whole sequences (bidirectional): use Predict."""

    reason = "NOT_STREAMABLE"


class StepOutOfOrder(RnnServeError):
    """A gap or a replay of an older step; carries the index the server expected."""

    reason = "STEP_OUT_OF_ORDER"

    def __init__(self, message: str, expected: int) -> None:
        super().__init__(message)
        self.expected = expected


class CapacityExhausted(RnnServeError):
    reason = "CAPACITY_EXHAUSTED"


class Unavailable(RnnServeError):
    """The server is shutting down or the model is not loaded yet; retry elsewhere or later."""

    reason = "UNAVAILABLE"


class ArtifactError(RnnServeError):
    """A corrupt, incomplete or checksum-mismatching artifact: refuse to load it."""

    reason = "ARTIFACT_ERROR"


# The table. Order matters: the first matching class wins, so subclasses come first.
_TABLE: list[tuple[type[RnnServeError], grpc.StatusCode, int]] = [
    (PayloadTooLarge, grpc.StatusCode.INVALID_ARGUMENT, 413),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND, 404),
    (VersionNotFound, grpc.StatusCode.NOT_FOUND, 404),
    (SessionNotFound, grpc.StatusCode.NOT_FOUND, 404),
    (SessionExpired, grpc.StatusCode.NOT_FOUND, 410),
    (SessionExists, grpc.StatusCode.ALREADY_EXISTS, 409),
    (NotStreamable, grpc.StatusCode.FAILED_PRECONDITION, 409),
    (ModelMismatch, grpc.StatusCode.FAILED_PRECONDITION, 409),
    (StepOutOfOrder, grpc.StatusCode.FAILED_PRECONDITION, 409),
    (CapacityExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, 503),
    (ArtifactError, grpc.StatusCode.INTERNAL, 500),
]


def _lookup(err: BaseException) -> tuple[grpc.StatusCode, int]:
    for cls, code, http in _TABLE:
        if isinstance(err, cls):
            return code, http
    return grpc.StatusCode.INTERNAL, 500


def grpc_status(err: BaseException) -> grpc.StatusCode:
    return _lookup(err)[0]


def http_status(err: BaseException) -> int:
    return _lookup(err)[1]


def to_json(err: BaseException) -> dict[str, object]:
    """The JSON body HTTP transports send for an error."""
    reason = err.reason if isinstance(err, RnnServeError) else "INTERNAL"
    body: dict[str, object] = {"error": str(err), "code": reason}
    if isinstance(err, InvalidInput) and err.field:
        body["field"] = err.field
    if isinstance(err, StepOutOfOrder):
        body["expected_step_index"] = err.expected
    return body

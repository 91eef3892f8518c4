"""TLS for the gRPC port and the metrics endpoint, and bearer-token authentication of RPCs.

TLS: ``TlsConfig`` holds PEM files (``--tls-cert``, ``--tls-key``, optional ``--tls-client-ca``
for mutual TLS); ``server_credentials()`` is for grpc, ``ssl_context()`` for the metrics HTTP
server. Files are read once, at start-up, so a bad file is a start-up error.

Authentication (``--auth-token-file``): every RPC but ``grpc.health.v1`` must carry the metadata
``authorization: Bearer <token>``; otherwise it ends with UNAUTHENTICATED before its request is
even parsed. The token file holds one ``identity:token`` per line (blank lines and ``#`` comments
ignored); an identity may have several tokens (rotation), a token belongs to one identity. A
token is compared with every known token in constant time (``hmac.compare_digest`` of SHA-256
digests, no early exit), and is never logged, counted or echoed: refusals name only the reason.

The handler of an authenticated RPC runs with ``current_identity()`` set to the token's identity;
the OIP servicer scopes Triton's client-chosen sequence ids to it (docs/oip.md).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

AUTH_METADATA = "authorization"
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)  # orchestrators probe without secrets
IDENTITY = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_TOKEN_LENGTH = 16
REFUSAL_LOG_INTERVAL_S = 10.0  # refusals are logged at most this often (they are also counted)

_identity: ContextVar[str | None] = ContextVar("rnnserve_identity", default=None)


def current_identity() -> str | None:
    """The authenticated caller of the RPC being handled; None when authentication is off."""
    return _identity.get()


def act_as(identity: str | None) -> None:
    """For the current task: the caller a transport that authenticates by itself (the native
    core, which hands bridged calls over with their identity) has established."""
    _identity.set(identity)


# ---- TLS --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsConfig:
    cert: Path  # PEM certificate chain of the server
    key: Path  # PEM private key
    client_ca: Path | None = None  # PEM CA bundle: clients must present a certificate it signed

    @classmethod
    def from_flags(cls, cert: str, key: str, client_ca: str) -> TlsConfig | None:
        """None when no flag is set; ValueError for a partial or unreadable setup."""
        if not (cert or key or client_ca):
            return None
        if not (cert and key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        config = cls(Path(cert), Path(key), Path(client_ca) if client_ca else None)
        config.ssl_context()  # refuse unreadable or mismatching files now, not at the first call
        return config

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"TLS files: {e}") from e
        return context


# ---- tokens -----------------------------------------------------------------------------------


class TokenTable:
    """Token digests → identities, matched in constant time."""

    def __init__(self, entries: Iterable[tuple[str, str]]) -> None:
        self._entries: list[tuple[bytes, str]] = []
        seen: set[bytes] = set()
        for identity, token in entries:
            digest = _digest(token)
            if digest in seen:
                raise ValueError(f"a token of {identity!r} is given twice")
            seen.add(digest)
            self._entries.append((digest, identity))
        if not self._entries:
            raise ValueError("no tokens: the token file has no 'identity:token' line")

    @classmethod
    def from_file(cls, path: Path) -> TokenTable:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the token file {path}: {e}") from e
        return cls(_parse_tokens(text, path))

    def digests(self) -> list[tuple[bytes, str]]:
        """(SHA-256 of a token, its identity) for every entry: what the native core matches."""
        return list(self._entries)

    @property
    def identities(self) -> set[str]:
        return {identity for _, identity in self._entries}

    def identity_of(self, token: str) -> str | None:
        digest, found = _digest(token), None
        for known, identity in self._entries:  # every entry, always: no early exit
            if hmac.compare_digest(digest, known):
                found = identity
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _parse_tokens(text: str, path: Path) -> list[tuple[str, str]]:
    """``identity:token`` lines; errors name the line, never its token."""
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        identity, sep, token = line.partition(":")
        where = f"{path}, line {number}"
        if not sep or not IDENTITY.fullmatch(identity):
            raise ValueError(
                f"{where}: expected 'identity:token' with an identity of 1-64 letters, digits, "
                "'.', '_' or '-'"
            )
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            raise ValueError(
                f"{where}: the token must be at least {MIN_TOKEN_LENGTH} characters, no spaces"
            )
        entries.append((identity, token))
    return entries


# ---- the interceptor --------------------------------------------------------------------------


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for an RPC without a known bearer token (health exempt); the handler of an
    authenticated one runs with ``current_identity()`` set. ``on_refused(method)`` counts refusals
    (the metrics' method label: the RPC's short name)."""

    def __init__(self, tokens: TokenTable, on_refused: Callable[[str], None] | None = None) -> None:
        self.tokens = tokens
        self.on_refused = on_refused or (lambda method: None)
        self._refused_since_log = 0
        self._logged_at = -float("inf")

    async def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        token, problem = bearer_token(details.invocation_metadata)
        identity = self.tokens.identity_of(token) if token else None
        if identity is None:
            self._refused(details.method, problem or "unknown token")
            return _refusing(handler, problem or "invalid bearer token")
        return _with_identity(handler, identity)

    def _refused(self, method: str, reason: str) -> None:
        """Counted each time; logged at most every REFUSAL_LOG_INTERVAL_S, with how many were
        refused since the last line (a client retrying a bad token would flood the log)."""
        self.on_refused(method.rsplit("/", 1)[-1])
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "refused %d unauthenticated RPC(s) since the last report; latest: %s (%s)",
                self._refused_since_log,
                method,
                reason,
            )
            self._refused_since_log, self._logged_at = 0, now


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> tuple[str | None, str | None]:
    """(token, None), or (None, why it is missing or malformed)."""
    values = [v for k, v in metadata or () if k == AUTH_METADATA]
    if not values:
        return None, f"missing credentials: send the metadata '{AUTH_METADATA}: Bearer <token>'"
    if len(values) > 1:
        return None, f"more than one '{AUTH_METADATA}' metadata entry"
    value = values[0] if isinstance(values[0], str) else ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, f"'{AUTH_METADATA}' metadata must be 'Bearer <token>'"
    return token.strip(), None


_BEHAVIORS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _kind(handler: grpc.RpcMethodHandler) -> str:
    return next(name for name in _BEHAVIORS if getattr(handler, name) is not None)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """The same kind of handler, answering UNAUTHENTICATED without parsing the request."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return handler._replace(**{_kind(handler): refuse}, request_deserializer=None)


def _with_identity(handler: grpc.RpcMethodHandler, identity: str) -> grpc.RpcMethodHandler:
    kind = _kind(handler)
    behavior = getattr(handler, kind)
    if inspect.isasyncgenfunction(behavior):

        async def streamed(request: Any, context: Any) -> Any:
            _identity.set(identity)  # the RPC's own task: nothing else sees it
            async for reply in behavior(request, context):
                yield reply

        return handler._replace(**{kind: streamed})

    async def called(request: Any, context: Any) -> Any:
        _identity.set(identity)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return handler._replace(**{kind: called})

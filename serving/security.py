"""TLS for the gRPC port and the metrics endpoint, and bearer-token authentication of RPCs.

TLS: ``TlsConfig`` holds PEM files (``--tls-cert``, ``--tls-key``, optional ``--tls-client-ca``
for mutual TLS), which the native core serves gRPC with; ``ssl_context()`` is for the metrics
HTTP server. Files are read once, at start-up, so a bad file is a start-up error.

Authentication (``--auth-token-file``): every RPC but ``grpc.health.v1`` must carry the metadata
``authorization: Bearer <token>``; otherwise the core ends it with UNAUTHENTICATED before its
request is even parsed. The token file holds one ``identity:token`` per line (blank lines and
``#`` comments ignored); an identity may have several tokens (rotation), a token belongs to one
identity. The core compares a token's SHA-256 digest with every known one in constant time (no
early exit), and never logs, counts or echoes it: refusals name only the reason.

``TokenTable.digests()`` is what the core compares against. A bridged RPC's Python handler runs
with ``current_identity()`` set to the caller's identity (``act_as``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import ssl
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

IDENTITY = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_TOKEN_LENGTH = 16

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

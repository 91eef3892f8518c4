"""``rnnserve health --address A [--model M]``: exit 0 iff grpc.health.v1 answers SERVING.

The container healthcheck: no downloaded grpc_health_probe, just our CLI. Without ``--model`` it
asks about the whole server (service ""); with it, about that model's name.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"  # as serving.server; not imported, to keep the probe light


def check(
    address: str, service: str = "", timeout: float = 3.0, tls: TlsClient | None = None
) -> str:
    """The status name (SERVING, NOT_SERVING, SERVICE_UNKNOWN, ...) or the RPC error's code."""
    with _channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@dataclass(frozen=True)
class TlsClient:
    """How the probe reaches a server started with --tls-cert: PEM files (mutual TLS: cert, key)."""

    ca: str
    cert: str = ""
    key: str = ""
    server_name: str = ""


def _channel(address: str, tls: TlsClient | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(_pem(tls.ca), _pem(tls.key), _pem(tls.cert))
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(address, credentials, options)


def _pem(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


# (flag, environment variable, help): the probe runs in the server's container, beside its setup
TLS_OPTIONS = [
    ("--tls-ca", "RNNSERVE_TLS_CA", "PEM CA the server's certificate chains to (turns TLS on)"),
    ("--tls-cert", "RNNSERVE_HEALTH_TLS_CERT", "PEM client certificate, for mutual TLS"),
    ("--tls-key", "RNNSERVE_HEALTH_TLS_KEY", "PEM key of --tls-cert"),
    ("--tls-server-name", "RNNSERVE_TLS_SERVER_NAME", "name the certificate must carry, "
     "when not the address's host"),
]  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("health", help="exit 0 iff the gRPC server (or a model) is SERVING")
    p.add_argument(
        "--address",
        default=os.environ.get("RNNSERVE_ADDRESS", DEFAULT_ADDRESS),
        help=f"server host:port [RNNSERVE_ADDRESS, {DEFAULT_ADDRESS}]",
    )
    p.add_argument("--model", default="", help="a model name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (%(default)s)")
    for flag, env, text in TLS_OPTIONS:
        p.add_argument(flag, default=os.environ.get(env, ""), help=f"{text} [{env}]")
    p.set_defaults(func=health_command)


def health_command(args: argparse.Namespace) -> int:
    tls = None
    if args.tls_ca:
        tls = TlsClient(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    try:
        status = check(args.address, args.model, args.timeout, tls)
    except OSError as e:  # an unreadable PEM file
        print(f"rnnserve health: {e}", file=sys.stderr)
        return 2
    what = f"model {args.model}" if args.model else "server"
    print(
        f"{what} at {args.address}: {status}",
        file=sys.stdout if status == "SERVING" else sys.stderr,
    )
    return 0 if status == "SERVING" else 1

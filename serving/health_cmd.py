"""``rnnserve health --address A [--model M]``: exit 0 iff grpc.health.v1 answers SERVING.

The container healthcheck: no downloaded grpc_health_probe, just our CLI. Without ``--model`` it
asks about the whole server (service ""); with it, about that model's name.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"  # as serving.server; not imported, to keep the probe light


def check(address: str, service: str = "", timeout: float = 3.0) -> str:
    """The status name (SERVING, NOT_SERVING, SERVICE_UNKNOWN, ...) or the RPC error's code."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("health", help="exit 0 iff the gRPC server (or a model) is SERVING")
    p.add_argument(
        "--address",
        default=os.environ.get("RNNSERVE_ADDRESS", DEFAULT_ADDRESS),
        help=f"server host:port [RNNSERVE_ADDRESS, {DEFAULT_ADDRESS}]",
    )
    p.add_argument("--model", default="", help="a model name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (%(default)s)")
    p.set_defaults(func=health_command)


def health_command(args: argparse.Namespace) -> int:
    status = check(args.address, args.model, args.timeout)
    what = f"model {args.model}" if args.model else "server"
    print(
        f"{what} at {args.address}: {status}",
        file=sys.stdout if status == "SERVING" else sys.stderr,
    )
    return 0 if status == "SERVING" else 1

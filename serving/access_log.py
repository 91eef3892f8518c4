"""One line per gRPC call: when it ended, the method, the model, the status and how long it took.

``rnnserve serve --access-log`` (or ``RNNSERVE_ACCESS_LOG=1``) turns it on; ``rnnserve up`` turns it
on unless given ``--no-access-log``. Each finished call writes one line to stderr::

    2026-12-04T20:31:07.123Z grpc /rnnserve.v1.RnnServe/Step model=sum_sign_lstm status=OK us=412

- the time is when the call ended, UTC, ISO 8601 with milliseconds;
- ``model`` is the model the request names (``model``, ``name``, ``model_name`` or a packed block's
  ``model``) or, for calls that name a session, that session's model; ``-`` when there is none
  (health, reflection, ListModels, an unknown session);
- ``status`` is the gRPC status code's name (``OK``, ``INVALID_ARGUMENT``, ``CANCELLED``, ...);
- ``us`` is the whole call in microseconds: a stream's from its start to its end.

The native core writes the line (``serving/core/src/call.cc``); this module holds the switch.
"""

from __future__ import annotations

import argparse
import os

ENV = "RNNSERVE_ACCESS_LOG"
FLAG = "--access-log"
MODEL_FIELDS = ("model", "name", "model_name")


def enabled(default: bool) -> bool:
    """The environment's say when it has one (1/true/yes/on or 0/false/no/off), else ``default``."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


def add_flag(parser: argparse.ArgumentParser, default: bool = False) -> None:
    """``--access-log/--no-access-log``; off unless ``default`` (``up``) or the environment."""
    on = enabled(default)
    parser.add_argument(
        FLAG,
        action=argparse.BooleanOptionalAction,
        default=on,
        help=f"one line per gRPC call on stderr: method, model, status, µs "
        f"[{ENV}, {'on' if on else 'off'}]",
    )

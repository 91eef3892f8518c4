"""``rnnserve``: one CLI, one subcommand per job.

Each subcommand lives in the module that does the work; that module exposes
``register(subparsers) -> None``, adding its parser with ``set_defaults(func=...)`` where ``func``
takes the parsed ``argparse.Namespace`` and returns an exit code. Only the chosen subcommand's
module is imported, so ``rnnserve serve`` never imports ``training`` (serving must not depend on
it) and ``rnnserve --help`` stays the only place that loads them all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module that registers it
COMMANDS: dict[str, str] = {
    "train": "training.cli",
    "export": "training.cli",
    "serve": "serving.server",
    "health": "serving.health_cmd",
    "client": "serving.client_cli",
    "archive": "serving.torchserve.archive",
    "torchserve": "serving.torchserve.control",
    "up": "serving.up",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnserve", description="Stateful serving of recurrent models (RNN, LSTM, GRU)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {COMMANDS[only]} if only in COMMANDS else dict.fromkeys(COMMANDS.values())
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def _chosen_command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_chosen_command(argv)).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

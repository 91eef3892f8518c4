"""Every flag and argument of every ``rnnserve`` subcommand has help text, and the help names the
default whenever there is one; usage errors exit 2 with a ``rnnserve …:`` prefix."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from serving.cli import build_parser

NO_DEFAULT = (None, False, "", [], argparse.SUPPRESS)


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share one parser
                yield from parsers(sub)


def documented(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    return [
        (f"{parser.prog} {'/'.join(a.option_strings) or a.dest}", a)
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]


ALL = [item for p in parsers(build_parser()) for item in documented(p)]


@pytest.mark.parametrize(("where", "action"), ALL, ids=[w for w, _ in ALL])
def test_every_flag_says_what_it_does_and_its_default(where: str, action: argparse.Action) -> None:
    assert action.help, f"{where}: no help text"
    if action.default in NO_DEFAULT or isinstance(action.default, list):
        return
    text = action.help % {**vars(action), "default": action.default}
    shown = {str(action.default)}
    if isinstance(action.default, bool):
        shown |= {"on", "off"}
    if isinstance(action.default, str) and action.option_strings == ["--address"]:
        shown.add("127.0.0.1:50051")  # RNNSERVE_ADDRESS may have set the default itself
    assert any(s in text for s in shown), f"{where}: help {text!r} does not name {action.default!r}"


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["serve", "--max-batch", "x"], "rnnserve serve: error: argument --max-batch"),
        (["client", "step", "--model", "sine"], "rnnserve client: step: give exactly one of"),
        (["torchserve", "call", "GET"], "rnnserve torchserve: call takes METHOD PATH"),
        (["up", "--grpc-port", "p"], "rnnserve up: error: argument --grpc-port"),
        (["client", "predict", "--model", "sine"], "rnnserve client: predict: give at least one"),
    ],
)
def test_usage_errors_exit_2_with_the_command_named(argv: list[str], prefix: str) -> None:
    """The client checks its flags before it needs a server; none listens on port 9 here."""
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "RNNSERVE_ADDRESS": "127.0.0.1:9"},
    )
    last = out.stderr.strip().splitlines()[-1]
    assert (out.returncode, last[: len(prefix)]) == (2, prefix), out.stderr

"""Every Python snippet in README.md and docs/*.md runs, so the docs cannot drift from the code.

A file's snippets run in order in one namespace (later ones use what earlier ones defined, as a
reader would), against a real server on a free loopback port: the documented address
``127.0.0.1:50051`` and store ``"model_store"`` are replaced by the test's. A snippet that must not
run is marked on the line before its fence with ``<!-- snippet: no-run (why) -->``; keep those
rare, and say why.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpc_support import server_config

from serving.server import ServerThread

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NO_RUN = re.compile(r"<!-- snippet: no-run \((.+)\) -->\s*$")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    code: str
    no_run: str  # why it must not run; "" = it runs


def snippets(path: Path) -> list[Snippet]:
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        why = NO_RUN.search(before)
        line = text.count("\n", 0, match.start()) + 1
        found.append(Snippet(path, line, match.group(1), why.group(1) if why else ""))
    return found


WITH_SNIPPETS = [p for p in DOCS if snippets(p)]


def test_the_docs_have_snippets_and_few_are_exempt() -> None:
    every = [s for p in DOCS for s in snippets(p)]
    assert len(every) >= 10  # the extraction found them (README, api.md, oip.md, operations.md)
    assert sum(bool(s.no_run) for s in every) <= 2, [s for s in every if s.no_run]


@pytest.fixture(scope="module")
def server(quick_store: Path) -> Iterator[tuple[str, Path]]:
    with ServerThread(server_config(quick_store)) as s:
        yield s.address, quick_store


@pytest.mark.parametrize("path", WITH_SNIPPETS, ids=[p.name for p in WITH_SNIPPETS])
def test_every_python_snippet_runs(path: Path, server: tuple[str, Path]) -> None:
    address, store = server
    namespace: dict[str, object] = {"__name__": f"doc_{path.stem}"}
    for snippet in snippets(path):
        if snippet.no_run:
            continue
        code = snippet.code.replace("127.0.0.1:50051", address)
        code = code.replace('"model_store"', repr(str(store)))
        try:
            exec(compile(code, f"{path.name}:{snippet.line}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"{path.relative_to(ROOT)} line {snippet.line}: {type(e).__name__}: {e}")
    client = namespace.get("c")
    if hasattr(client, "close"):
        client.close()  # type: ignore[union-attr]

"""What the bench's tests share: the real step graph of echo+model, with its calls recorded."""

from __future__ import annotations

from pathlib import Path

from bench import echo_server
from serving.manifest import load_manifest, resolve


class RecordingGraph(echo_server.StepGraph):
    """The real step graph, noting each call's (rows, T)."""

    def __init__(self, store: Path, name: str) -> None:
        version_dir = resolve(store, name)
        super().__init__(load_manifest(version_dir), version_dir)
        self.calls: list[tuple[int, int]] = []

    def run(self, rows: int, steps: int) -> None:
        self.calls.append((rows, steps))
        super().run(rows, steps)

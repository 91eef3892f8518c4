"""Shared test setup: markers by folder, and the quick-trained model store every suite reads.

``quick_store`` trains the whole zoo in ``--quick`` mode once, into
``.cache/quick_store/<hash of training/*.py + serving/manifest.py>``; later sessions (and other
pytest processes running at the same time, serialised by a file lock) reuse it instantly.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
CACHE = ROOT / ".cache" / "quick_store"
FOLDER_MARKS = ("unit", "integration", "e2e")
COMPLETE = ".complete"  # written last: a store without it is an interrupted run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """tests/unit/... is marked ``unit``, and so on: ``pytest -m unit`` picks a folder."""
    for item in items:
        try:
            folder = Path(str(item.path)).relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if folder in FOLDER_MARKS:
            item.add_marker(getattr(pytest.mark, folder))


def training_code_hash() -> str:
    """Changes whenever the code that decides the artifacts changes."""
    h = hashlib.sha256()
    for path in [*sorted((ROOT / "training").glob("*.py")), ROOT / "serving" / "manifest.py"]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_quick_store(folder: Path) -> None:
    from training.cli import main

    tmp = folder.with_name(f"{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    args = ["train", "--all", "--quick", "--store", str(tmp), "--no-progress"]
    status = main(args)
    if status not in (0, 1):  # 1 = a quality bar was missed: the bar tests report which one
        pytest.fail(f"training the quick zoo failed (exit {status}): rnnserve {' '.join(args)}")
    (tmp / COMPLETE).write_text("rnnserve train --all --quick\n")
    tmp.rename(folder)


@pytest.fixture(scope="session")
def quick_store() -> Iterator[Path]:
    """A model store with every zoo model quick-trained and exported (read-only: don't write)."""
    folder = CACHE / training_code_hash()
    if not (folder / COMPLETE).is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with (CACHE / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one trainer at a time across pytest processes
            if not (folder / COMPLETE).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                build_quick_store(folder)
    yield folder

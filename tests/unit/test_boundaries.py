"""The one architectural rule: serving loads artifacts, it never imports the training code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_serving_module_imports_training() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            m for m in _imported_modules(p) if m.split(".")[0] == "training"
        )
        for p in (ROOT / "serving").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_serving_runtime_loads_without_training_or_torch() -> None:
    """Importing the serving runtime pulls in neither training nor (for ONNX) torch."""
    modules = ["serving.manifest", "serving.codec", "serving.backends", "serving.errors"]
    modules += ["serving.server", "serving.engine", "serving.grpc_api", "serving.oip_api"]
    modules += ["serving.torchserve.handler"]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'torch'))\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_cli_imports_only_the_chosen_subcommand() -> None:
    from serving import cli

    code = (
        "import sys\nfrom serving import cli\ncli.build_parser('serve')\n"
        "print(any(m.split('.')[0] == 'training' for m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
    assert set(cli.COMMANDS) >= {"train", "export", "serve", "health", "archive", "torchserve"}

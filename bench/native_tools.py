"""The bench's C++ tools (bench/native): built on first use, then started like any server or client.

* ``echo_server``: rnnserve.v1 and the OIP on gRPC's C++ callback API, answering canned replies of
  the real server's shape (``write_canned`` serializes them from the store's manifest with the
  Python server's own encoders), without any model or session: the transport floor.
* ``load_client``: a closed-loop C++ load client for rnnserve.v1 (unary Step, Session streams,
  StepMany packed); ``parse_load`` reads its JSON report.

``ensure_built()`` runs ``cmake -S bench/native -B build/bench -G Ninja`` and ``cmake --build``
under a file lock (the machine is shared: one build at a time, the others wait and reuse it).

    python -m bench.native_tools          # build (or check) and print where the tools are
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "native"
BUILD = ROOT / "build" / "bench"
TOOLS = ("echo_server", "load_client")
LOAD_PATHS = ("unary", "stream", "packed")


class NativeToolsUnavailable(RuntimeError):
    """The C++ tools cannot be built here; the message names what is missing."""


# ---- building ---------------------------------------------------------------------------------


def missing_build_tools() -> list[str]:
    """What a build needs and this machine lacks (empty: it can build)."""
    missing = [p for p in ("cmake", "ninja", "protoc", "grpc_cpp_plugin", "pkg-config", "g++")
               if shutil.which(p) is None]  # fmt: skip
    if not missing and subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode != 0:
        missing.append("grpc++ (Debian: libgrpc++-dev)")
    return missing


def ensure_built(build: Path = BUILD) -> dict[str, Path]:
    """The tools' paths, built first when a source is newer than a binary (one build at a time)."""
    missing = missing_build_tools()
    if missing and not all((build / t).is_file() for t in TOOLS):
        raise NativeToolsUnavailable(f"cannot build bench/native: missing {', '.join(missing)}")
    if _stale(build):
        build.mkdir(parents=True, exist_ok=True)
        with _locked(build.parent / ".bench-native.lock"):
            if _stale(build):
                _build(build)
    return {t: build / t for t in TOOLS}


def _stale(build: Path) -> bool:
    sources = [*SOURCE.iterdir(), *(ROOT / "protos").rglob("*.proto")]
    newest = max(p.stat().st_mtime for p in sources)
    return any(not (build / t).is_file() or (build / t).stat().st_mtime < newest for t in TOOLS)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build(build: Path) -> None:
    steps = [
        ["cmake", "-S", str(SOURCE), "-B", str(build), "-G", "Ninja"],
        ["cmake", "--build", str(build)],
    ]
    for step in steps:
        done = subprocess.run(step, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
            raise NativeToolsUnavailable(f"{' '.join(step)} failed:\n" + "\n".join(tail))


# ---- the echo server's canned replies ---------------------------------------------------------


def write_canned(store: Path, model: str, folder: Path) -> Path:
    """The replies echo_server answers for ``model``, serialized into ``folder``: exactly what the
    Python server encodes for one session and one time step of zero outputs, and its OIP
    metadata and configuration."""
    from serving import oip_api
    from serving.backends import LoadedModel
    from serving.engine import EngineConfig
    from serving.manifest import load_manifest, resolve

    version_dir = resolve(store, model)
    m = load_manifest(version_dir)
    loaded = LoadedModel(manifest=m, backend=None, path=version_dir)  # type: ignore[arg-type]
    pb = oip_api.pb
    metadata = oip_api.model_metadata(loaded, [m.version])
    metadata.platform = "onnxruntime_onnx"
    config = pb.ModelConfigResponse(config=oip_api.model_config(loaded, EngineConfig(store=store)))
    config.config.platform, config.config.backend = "onnxruntime_onnx", "onnxruntime"
    y = np.zeros((1, 1, m.output.size), dtype=np.float32)  # (B, T, O)
    request = pb.ModelInferRequest(model_name=m.name)
    infer = oip_api.infer_response(request, m, y, dict.fromkeys(oip_api.output_names(m), 0))
    from bench.echo_server import canned_reply

    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "step_response.pb": canned_reply(m),
        "model_metadata.pb": metadata,
        "model_config.pb": config,
        "model_infer.pb": infer,
    }
    for name, message in files.items():
        (folder / name).write_bytes(message.SerializeToString())
    return folder


def echo_command(binary: Path, canned: Path, address: str = "127.0.0.1:0") -> list[str]:
    return [str(binary), "--canned", str(canned), "--address", address]


# ---- the load client --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    path: str
    sessions: int
    per_message: int
    steps_per_s: float
    msgs_per_s: float
    p50_us: float
    p99_us: float
    steps: int
    messages: int
    errors: int
    first_error: str

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.messages > 0


def load_command(
    binary: Path,
    target: str,
    model: str,
    features: int,
    path: str,
    sessions: int,
    *,
    per_message: int = 64,
    warmup: float = 0.5,
    duration: float = 2.0,
    channels: int = 2,
) -> list[str]:
    if path not in LOAD_PATHS:
        raise ValueError(f"path must be one of {', '.join(LOAD_PATHS)}, got {path!r}")
    return [
        str(binary), "--target", target, "--model", model, "--features", str(features),
        "--path", path, "--sessions", str(sessions), "--per-message", str(per_message),
        "--warmup", str(warmup), "--duration", str(duration), "--channels", str(channels),
    ]  # fmt: skip


def parse_load(output: str) -> LoadResult:
    """load_client's report: the last JSON line of its stdout (the first says it is ready).
    A report of an error (it could not open sessions, the server stopped answering) raises
    RuntimeError with load_client's words."""
    lines = [line for line in output.splitlines() if line.strip().startswith("{")]
    if not lines:
        raise RuntimeError(f"load_client printed no report: {output.strip()[-300:]!r}")
    report: dict[str, Any] = json.loads(lines[-1])
    if "error" in report:
        raise RuntimeError(f"load_client: {report['error']}")
    if "ready" in report:
        raise RuntimeError("load_client stopped after opening its sessions, before any report")
    fields = LoadResult.__dataclass_fields__
    return LoadResult(**{k: type_of(fields[k].type)(report[k]) for k in fields})


_TYPES = {"str": str, "int": int, "float": float}  # LoadResult's annotations, as strings


def type_of(annotation: str) -> type:
    return _TYPES[annotation]


def main() -> int:
    try:
        tools = ensure_built()
    except NativeToolsUnavailable as e:
        print(f"bench.native_tools: {e}", file=sys.stderr)
        return 2
    for name, path in tools.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

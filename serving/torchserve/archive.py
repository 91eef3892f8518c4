"""``rnnserve archive``: one TorchServe ``.mar`` per model, built from the model store.

A ``.mar`` carries the model version's ``manifest.json`` and every file it lists (the worker checks
their sha256 again when it loads them), our handler, and a ``model-config.yaml`` with TorchServe's
batching and worker settings plus a ``handler`` section our handler reads. A stamp inside the
archive records what it was built from, so an archive whose inputs have not changed is skipped.

Settings not given on the command line keep the value the existing archive was built with, so
``rnnserve archive --batch-size 1`` changes the batch size and nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
import threading
import zipfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from serving.errors import RnnServeError
from serving.manifest import MANIFEST_FILE, list_models, load_manifest, resolve, sha256_file

log = logging.getLogger("rnnserve.archive")

ARCHIVE_DIR = "torchserve"  # under the store: <store>/torchserve/<name>.mar
STAMP_FILE = "rnnserve-archive.json"
HANDLER_FILE = Path(__file__).with_name("handler.py")
# model_archiver stages files in tempfile.gettempdir()/<name>: pointing that at a private folder
# per build keeps two builds of one model from sharing it.
_TEMPDIR_LOCK = threading.Lock()


@dataclass(frozen=True)
class ArchiveSettings:
    batch_size: int = 32  # TorchServe batchSize: most requests one handler call serves
    max_batch_delay_ms: int = 5  # maxBatchDelay: how long a batch may wait to fill
    workers: int = 1  # minWorkers = maxWorkers: worker processes per model
    response_timeout_s: int = 60  # responseTimeout: a worker silent this long is restarted
    backend: str = "onnx"  # handler: onnx | torchscript
    threads: int = 1  # handler: intra-op threads per worker
    max_body_bytes: int = 1 << 20  # handler: larger bodies get 413

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "backend":
                if value not in ("onnx", "torchscript"):
                    raise ValueError(f"backend must be onnx or torchscript, got {value!r}")
            elif not isinstance(value, int) or value < (0 if f.name == "max_batch_delay_ms" else 1):
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")

    def model_config(self) -> dict[str, Any]:
        """model-config.yaml: TorchServe's own keys, then the section our handler reads."""
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
            "handler": {
                "backend": self.backend,
                "threads": self.threads,
                "max_body_bytes": self.max_body_bytes,
            },
        }


@dataclass(frozen=True)
class Built:
    name: str
    path: Path
    rebuilt: bool  # False when the archive was already up to date


def archive_dir(store: Path) -> Path:
    return Path(store) / ARCHIVE_DIR


def read_stamp(mar: Path) -> dict[str, Any] | None:
    """The stamp inside an existing archive, or None when there is no readable one."""
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read(STAMP_FILE))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def make_stamp(version_dir: Path, settings: ArchiveSettings) -> dict[str, Any]:
    """Everything the archive is built from: any change means a rebuild."""
    manifest = load_manifest(version_dir, verify=True)
    return {
        "model": manifest.name,
        "version": manifest.version,
        "manifest_sha256": sha256_file(version_dir / MANIFEST_FILE),
        "handler_sha256": hashlib.sha256(HANDLER_FILE.read_bytes()).hexdigest(),
        "settings": asdict(settings),
    }


def settings_for(mar: Path, overrides: dict[str, Any]) -> ArchiveSettings:
    """Defaults, then what the existing archive was built with, then explicit overrides."""
    stamp = read_stamp(mar) or {}
    known = {f.name for f in fields(ArchiveSettings)}
    previous = {k: v for k, v in stamp.get("settings", {}).items() if k in known}
    return replace(ArchiveSettings(**previous), **overrides)


def build_archive(
    store: Path, name: str, overrides: dict[str, Any] | None = None, force: bool = False
) -> Built:
    out = archive_dir(store)
    out.mkdir(parents=True, exist_ok=True)
    mar = out / f"{name}.mar"
    version_dir = resolve(store, name)
    stamp = make_stamp(version_dir, settings_for(mar, overrides or {}))
    if not force and read_stamp(mar) == stamp:
        log.info("%s: up to date (%s)", name, mar)
        return Built(name, mar, rebuilt=False)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{name}-") as stage:
        _package(version_dir, stamp, Path(stage))
        os.replace(Path(stage) / f"{name}.mar", mar)  # atomic: a reader never sees half an archive
    log.info("%s: built %s (v%s)", name, mar, stamp["version"])
    return Built(name, mar, rebuilt=True)


def _package(version_dir: Path, stamp: dict[str, Any], stage: Path) -> None:
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    settings = ArchiveSettings(**stamp["settings"])
    config_file = stage / "model-config.yaml"
    config_file.write_text(yaml.safe_dump(settings.model_config(), sort_keys=False))
    stamp_file = stage / STAMP_FILE
    stamp_file.write_text(json.dumps(stamp, indent=2, sort_keys=True))
    manifest = load_manifest(version_dir, verify=False)
    payload = [version_dir / MANIFEST_FILE, *(version_dir / f for f in manifest.files), stamp_file]
    config = ModelArchiverConfig(
        model_name=stamp["model"],
        handler=str(HANDLER_FILE),
        version=str(stamp["version"]),
        extra_files=",".join(str(p) for p in payload),
        export_path=str(stage),
        config_file=str(config_file),
        force=True,
    )
    scratch = stage / "scratch"
    scratch.mkdir()
    with _TEMPDIR_LOCK:
        saved, tempfile.tempdir = tempfile.tempdir, str(scratch)
        try:
            generate_model_archive(config)
        finally:
            tempfile.tempdir = saved


def build_archives(
    store: Path,
    names: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
) -> list[Built]:
    """One archive per model in the store (or per name given); up-to-date ones are skipped."""
    names = names or list_models(store)
    if not names:
        raise SystemExit(f"rnnserve archive: no models in {store}; train/export them first")
    return [build_archive(store, n, overrides, force) for n in names]


# ---- CLI --------------------------------------------------------------------------------------

_FLAGS = {  # flag → (settings field, help)
    "--batch-size": ("batch_size", "TorchServe batchSize (default 32)"),
    "--max-batch-delay": ("max_batch_delay_ms", "TorchServe maxBatchDelay in ms (default 5)"),
    "--workers": ("workers", "worker processes per model (default 1)"),
    "--response-timeout": ("response_timeout_s", "TorchServe responseTimeout in s (default 60)"),
    "--threads": ("threads", "intra-op threads per worker (default 1)"),
    "--max-body-bytes": ("max_body_bytes", "larger request bodies get 413 (default 1 MiB)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("archive", help="build TorchServe .mar archives into <store>/torchserve/")
    p.add_argument(
        "--store", type=Path, default=Path("model_store"), help="model store (%(default)s)"
    )
    p.add_argument("--model", action="append", dest="models", help="only this model (repeatable)")
    for flag, (dest, text) in _FLAGS.items():
        p.add_argument(flag, dest=dest, type=int, help=text)
    p.add_argument("--backend", choices=("onnx", "torchscript"), help="default onnx")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = [f.name for f in fields(ArchiveSettings)]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        built = build_archives(args.store, args.models, overrides, args.force)
    except (ValueError, RnnServeError) as e:
        raise SystemExit(f"rnnserve archive: {e}") from e
    fresh = sum(b.rebuilt for b in built)
    print(f"{fresh} built, {len(built) - fresh} up to date, in {archive_dir(args.store)}")
    return 0

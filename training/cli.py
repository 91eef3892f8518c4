"""``rnnserve train`` and ``rnnserve export`` (also ``python -m training``).

Every failure the user can cause ends as one line on stderr and a non-zero exit status, and never
leaves a half-written version folder behind (see ``training.export``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from serving.errors import RnnServeError
from serving.manifest import list_versions, resolve
from training import zoo
from training.export import Artifact, ExportError, export, load_checkpoint, writable_dir
from training.progress import Progress
from training.summary import write_summary
from training.train import TrainingError, train

EXIT_ERROR = 2  # bad input or a broken artifact
EXIT_BAR_MISSED = 1  # trained and exported, but a model missed its quality bar
MAX_SEED = 2**32 - 1  # NumPy's limit


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["lr=0.1", "epochs=3"]`` -> ``{"lr": 0.1, "epochs": 3}``, typed as ``zoo.Hyper`` says."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key] = zoo.hyper_value(key, value)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``export`` to a subparsers object (serving/cli.py's dispatch protocol)."""
    t = sub.add_parser("train", help="train models and export each into a new store version")
    t.add_argument("names", nargs="*", metavar="NAME", help=f"models: {', '.join(zoo.ZOO)}")
    t.add_argument("--all", action="store_true", help="the whole zoo")
    t.add_argument("--quick", action="store_true", help="small, fast runs with a lower bar")
    t.add_argument(
        "--store", type=Path, default=Path("model_store"), help="model store (%(default)s)"
    )
    t.add_argument(
        "--seed", type=int, default=0, help="one seed for data, init and shuffling (%(default)s)"
    )
    t.add_argument("--force", action="store_true", help="retrain models already in the store")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a hyperparameter, e.g. --set lr=0.001",
    )
    t.add_argument(
        "--no-progress",
        action="store_true",
        help="only one line per model (default: a bar per model on a terminal, else a line "
        "per epoch)",
    )
    t.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (%(default)s: these small models gain little from more)",
    )
    t.set_defaults(func=lambda args: guarded(train_command, args))
    e = sub.add_parser("export", help="re-export the latest version from its weights.pt")
    e.add_argument("name", metavar="NAME", help=f"the model: {', '.join(zoo.ZOO)}")
    e.add_argument(
        "--store", type=Path, default=Path("model_store"), help="model store (%(default)s)"
    )
    e.set_defaults(func=lambda args: guarded(export_command, args))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnnserve", description="train and export the model zoo")
    register(p.add_subparsers(dest="command", required=True))
    return p


def train_command(args: argparse.Namespace) -> int:
    if not args.all and not args.names:
        raise ValueError("name at least one model, or pass --all")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    names = list(zoo.ZOO) if args.all else list(dict.fromkeys(args.names))  # a repeat trains once
    overrides = parse_overrides(args.set)
    specs = [zoo.get(n).with_overrides(overrides, args.quick) for n in names]
    writable_dir(args.store)  # fail now, not after the first training run
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return train_specs(specs, args)
    finally:
        torch.set_num_threads(threads)  # the caller may be a test process that goes on


def train_specs(specs: list[zoo.ModelSpec], args: argparse.Namespace) -> int:
    todo = {s.name for s in specs if args.force or not list_versions(args.store, s.name)}
    run = Progress(
        [s for s in specs if s.name in todo], args.quick, sys.stdout, epochs=not args.no_progress
    )
    missed = []
    for k, spec in enumerate(specs, 1):
        tag = f"[{k}/{len(specs)}]"
        if spec.name not in todo:
            print(f"{tag} {spec.name}: already in {args.store} (--force retrains), skipped")
            continue
        began = time.perf_counter()
        with run.model(spec, tag) as on_epoch:
            trained = train(spec, seed=args.seed, quick=args.quick, on_epoch=on_epoch)
            folder = export(Artifact.from_trained(trained), args.store)
        m = trained.metrics
        verdict = "passed" if m["passed"] else "MISSED"
        print(
            f"{tag} {spec.name}: {spec.bar.metric} {m[spec.bar.metric]:.4g} ({m['bar']}: "
            f"{verdict}) -> {folder} in {time.perf_counter() - began:.1f} s; "
            f"{run.estimate.describe()}",
            flush=True,
        )
        if not m["passed"]:
            missed.append(spec.name)
    print(f"summary of {args.store}: {write_summary(args.store)}")
    if missed:
        print(f"error: quality bar missed by {', '.join(missed)}", file=sys.stderr)
        return EXIT_BAR_MISSED
    return 0


def export_command(args: argparse.Namespace) -> int:
    spec = zoo.get(args.name)
    if not list_versions(args.store, spec.name):
        raise ValueError(f"{spec.name} has no version in {args.store} to re-export; train it first")
    source = resolve(args.store, spec.name)
    folder = export(load_checkpoint(source, spec), args.store)
    print(f"{spec.name}: re-exported {source} -> {folder}")
    print(f"summary of {args.store}: {write_summary(args.store)}")
    return 0


def one_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split())


def guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; anything the user can cause becomes one line on stderr and exit 2."""
    try:
        return command(args)
    except (KeyError, ValueError, OSError, TrainingError, ExportError, RnnServeError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)

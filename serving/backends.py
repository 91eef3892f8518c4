"""Backends run a model's graphs: ONNX Runtime (the default, fastest here) or TorchScript.

Both take and return NumPy arrays in the manifest's layout, so the scheduler and the transports
never see which one runs. ``step`` is the stateful hot path; ``sequence`` serves padded batches.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from serving.errors import ArtifactError, NotStreamable
from serving.manifest import GraphSpec, Manifest, load_manifest, resolve

BackendKind = Literal["onnx", "torchscript"]
BACKENDS: tuple[BackendKind, ...] = ("onnx", "torchscript")


class Backend(Protocol):
    manifest: Manifest

    def step(self, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """x (B, T, F) float32 or (B, T) int64; states [(L, B, H)] → (y (B, T, O), new states)."""
        ...

    def sequence(self, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """x (B, T_max, ...) right-padded, lengths (B,) int64 → y (B, O)."""
        ...


class OnnxBackend:
    def __init__(self, manifest: Manifest, version_dir: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        self.manifest = manifest
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._graphs: dict[str, tuple[object, GraphSpec]] = {}
        # a Predict call's memory (rows × T_max intermediates) goes back to the system after
        # the call; without this ORT's arena keeps its largest call's memory for good
        self._sequence_run = ort.RunOptions()
        self._sequence_run.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        for kind, g in manifest.graphs.items():
            try:
                sess = ort.InferenceSession(
                    str(version_dir / g.onnx), opts, providers=["CPUExecutionProvider"]
                )
            except Exception as e:  # ORT raises its own types for corrupt graphs
                raise ArtifactError(f"{manifest.name}: cannot load {g.onnx}: {e}") from e
            self._graphs[kind] = (sess, g)

    def step(self, x, states):
        sess, g = self._graph("step")
        outs = sess.run(g.outputs, dict(zip(g.inputs, [x, *states], strict=True)))
        return outs[0], outs[1:]

    def sequence(self, x, lengths):
        sess, g = self._graph("sequence")
        return sess.run(g.outputs, {g.inputs[0]: x, g.inputs[1]: lengths}, self._sequence_run)[0]

    def _graph(self, kind: str):
        if kind not in self._graphs:
            raise NotStreamable(
                f"{self.manifest.name} is not streamable (it reads whole sequences): use Predict"
            )
        return self._graphs[kind]


class TorchScriptBackend:
    # torch's thread pool is process-wide; calls are serialized so threads settings hold.
    _lock = threading.Lock()

    def __init__(self, manifest: Manifest, version_dir: Path, threads: int = 1) -> None:
        import torch

        self._torch = torch
        torch.set_num_threads(threads)
        self.manifest = manifest
        self._modules: dict[str, object] = {}
        self._methods: dict[str, object] = {}
        for kind, g in manifest.graphs.items():
            if g.torchscript not in self._modules:
                try:
                    module = torch.jit.load(str(version_dir / g.torchscript), map_location="cpu")
                except Exception as e:
                    raise ArtifactError(f"{manifest.name}: cannot load {g.torchscript}: {e}") from e
                self._modules[g.torchscript] = module.eval()
            self._methods[kind] = getattr(self._modules[g.torchscript], g.method)

    def step(self, x, states):
        fn = self._method("step")
        t = self._torch
        with self._lock, t.inference_mode():
            outs = fn(t.from_numpy(x), *(t.from_numpy(s) for s in states))
        return outs[0].numpy(), [o.numpy() for o in outs[1:]]

    def sequence(self, x, lengths):
        fn = self._method("sequence")
        t = self._torch
        with self._lock, t.inference_mode():
            y = fn(t.from_numpy(x), t.from_numpy(lengths))
        return y.numpy()

    def _method(self, kind: str):
        if kind not in self._methods:
            raise NotStreamable(
                f"{self.manifest.name} is not streamable (it reads whole sequences): use Predict"
            )
        return self._methods[kind]


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    backend: Backend
    path: Path

    @property
    def key(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"


def make_backend(
    manifest: Manifest, version_dir: Path, kind: BackendKind = "onnx", threads: int = 1
) -> Backend:
    if kind == "onnx":
        return OnnxBackend(manifest, version_dir, threads)
    if kind == "torchscript":
        return TorchScriptBackend(manifest, version_dir, threads)
    raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")


def load_model(
    store: Path, name: str, version: int | None = None, kind: BackendKind = "onnx", threads: int = 1
) -> LoadedModel:
    """Resolve, verify checksums, and load one model version."""
    version_dir = resolve(Path(store), name, version)
    manifest = load_manifest(version_dir, verify=True)
    return LoadedModel(manifest, make_backend(manifest, version_dir, kind, threads), version_dir)


def initial_states(m: Manifest, batch: int) -> list[np.ndarray]:
    return [np.full(s.shape(batch), s.init, dtype=np.float32) for s in m.state]

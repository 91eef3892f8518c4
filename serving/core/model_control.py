"""Model versions without a restart (Triton's model control, and its poll mode).

A version that appears in the store is loaded while the server runs: its artifacts are verified
exactly as at start (``load_model``: every file's sha256 against the manifest), then it is added
to the engine (Predict, metadata) and to the core's model table (sessions, steps). New sessions
and stateless calls that name no version go to the newest ready version; a session stays on the
version it opened until it ends.

Unloading retires a version: it takes no new sessions or stateless calls, while its live sessions
keep stepping. The reaper frees a retired version (its scheduler, its backend) once the core
counts no session of it left in this process. A corrupt version is refused with the reason and
changes nothing; the reason stays visible in the repository index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.backends import LoadedModel, load_model
from serving.engine import Engine
from serving.errors import (
    ArtifactError,
    InvalidInput,
    ModelNotFound,
    RnnServeError,
    VersionNotFound,
)
from serving.manifest import list_models, list_versions

log = logging.getLogger(__name__)

REAP_EVERY_S = 0.5  # how soon a retired version is freed after its last session ends


@dataclass(frozen=True)
class VersionStatus:
    """One row of the repository index."""

    name: str
    version: int
    state: str  # "READY" or "UNAVAILABLE"
    reason: str  # why it is not ready ("" when it is)


class ModelControl:
    def __init__(
        self,
        engine: Engine,
        core: Any,
        register: Callable[[LoadedModel], None],
        poll_s: float = 0.0,
    ) -> None:
        self.engine, self.core, self._register = engine, core, register
        self.store = Path(engine.config.store)
        self.poll_s = poll_s
        self._lock = asyncio.Lock()  # one load, unload or poll at a time
        self._refused: dict[tuple[str, int], tuple[str, tuple]] = {}  # -> (reason, files seen)
        self._unloaded: set[tuple[str, int]] = set()  # unloaded on request: polls leave them
        self._task: asyncio.Task[None] | None = None

    # ---- the model-control calls --------------------------------------------------------------
    async def load(self, name: str, version: int | None = None) -> list[int]:
        """Load ``name``'s versions found in the store (or just ``version``); an unloaded one that
        is still in the store is made ready again. Without ``version``, a loaded version whose
        folder is gone is unloaded (as a Triton reload does). All or nothing: one version that
        fails verification refuses the whole call and nothing changes. Returns the versions
        loaded or made ready."""
        async with self._lock:
            wanted = self._in_store(name, version)
            await self._load_new(name, wanted)
            for v in wanted:
                self._unloaded.discard((name, v))
                if not self.engine.is_ready(name, v):
                    self._set_ready(name, v, True)
            if version is None:
                for v in self.engine.loaded_versions(name):
                    if v not in wanted and self.engine.is_ready(name, v):
                        self._set_ready(name, v, False)
            return wanted

    async def unload(self, name: str, version: int | None = None) -> list[int]:
        """Retire every ready version of ``name`` (or just ``version``): no new sessions or
        stateless calls; each is freed when its last session here ends. Returns the versions."""
        async with self._lock:
            loaded = self.engine.loaded_versions(name)
            if not loaded:
                raise ModelNotFound(f"model {name!r} is not loaded; loaded: {self._names()}")
            if version is not None and version not in loaded:
                have = ", ".join(map(str, loaded))
                raise VersionNotFound(
                    f"model {name!r} has no version {version} loaded; loaded: {have}"
                )
            chosen = [version] if version is not None else loaded
            for v in chosen:
                self._unloaded.add((name, v))
                if self.engine.is_ready(name, v):
                    self._set_ready(name, v, False)
            await self._reap()
            return chosen

    def index(self) -> list[VersionStatus]:
        """Every loaded version (READY, or UNAVAILABLE while unloading) and every version in the
        store that is not loaded (UNAVAILABLE: unloaded, or refused with the reason)."""
        rows: dict[tuple[str, int], VersionStatus] = {}
        for name in list_models(self.store):
            for v in list_versions(self.store, name):
                refused = self._refused.get((name, v))
                reason = (
                    refused[0]
                    if refused
                    else "unloaded"
                    if (name, v) in self._unloaded
                    else "not loaded"
                )
                rows[(name, v)] = VersionStatus(name, v, "UNAVAILABLE", reason)
        for name, v, ready, live in self.core.versions():
            reason = "" if ready else f"unloading: {live} live sessions"
            rows[(name, v)] = VersionStatus(name, v, "READY" if ready else "UNAVAILABLE", reason)
        return [rows[k] for k in sorted(rows)]

    # ---- background: free retired versions, poll the store -------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        next_poll = asyncio.get_running_loop().time() + self.poll_s
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            try:
                async with self._lock:
                    await self._reap()
                if self.poll_s and asyncio.get_running_loop().time() >= next_poll:
                    await self.poll()
                    next_poll = asyncio.get_running_loop().time() + self.poll_s
            except Exception:  # a folder that vanished mid-scan, say: the next turn tries again
                log.exception("model control: a background turn failed")

    async def poll(self) -> None:
        """One rescan (Triton's poll mode): load versions new in the store, unload the loaded
        ones whose folder is gone. Versions unloaded on request stay unloaded; a refused version
        is tried again only once its files change."""
        async with self._lock:
            on_disk = {name: list_versions(self.store, name) for name in list_models(self.store)}
            for name, versions in on_disk.items():
                new = [v for v in versions if self._worth_loading(name, v)]
                try:
                    await self._load_new(name, new)
                except RnnServeError as e:  # refused (recorded for the index), or gone meanwhile
                    log.error("model store poll: %s", e)
            for name in self.engine.model_names():
                for v in self.engine.loaded_versions(name):
                    if v not in on_disk.get(name, []) and self.engine.is_ready(name, v):
                        log.info("model store poll: %s v%d left the store; unloading it", name, v)
                        self._set_ready(name, v, False)

    # ---- helpers --------------------------------------------------------------------------------
    def _in_store(self, name: str, version: int | None) -> list[int]:
        # a client's name becomes a path only once the store is known to hold it ("../x", a
        # name too long for the file system)
        on_disk = list_versions(self.store, name) if name in list_models(self.store) else []
        if not on_disk:
            raise ModelNotFound(
                f"the model store {self.store} has no model {name!r} "
                f"(expected {self.store}/{name}/<version>/manifest.json)"
            )
        if version is None:
            return on_disk
        if version not in on_disk:
            have = ", ".join(map(str, on_disk))
            raise VersionNotFound(
                f"the model store has no {name} version {version}; it has: {have}"
            )
        return [version]

    async def _load_new(self, name: str, versions: list[int]) -> None:
        """Verify and load the versions not loaded yet, then register them all, or none."""
        fresh = [v for v in versions if v not in self.engine.loaded_versions(name)]
        loaded = []
        for v in fresh:
            try:
                loaded.append(await asyncio.to_thread(self._verified, name, v))
            except ArtifactError as e:
                self._refused[(name, v)] = (str(e), self._files(name, v))
                raise ArtifactError(
                    f"refusing to load {name} v{v}: {e}; nothing was loaded or unloaded"
                ) from e
        for lm in loaded:
            self._refused.pop((name, lm.manifest.version), None)
            self._register(lm)
            log.info("loaded %s from %s", lm.key, lm.path)

    def _verified(self, name: str, version: int) -> LoadedModel:
        """What start-up does for a version: every file's sha256, then the backend."""
        kind = self.engine.config.model_backends.get(name, self.engine.config.backend)
        lm = load_model(self.store, name, version, kind, self.engine.config.threads)  # type: ignore[arg-type]
        if (lm.manifest.name, lm.manifest.version) != (name, version):
            raise ArtifactError(
                f"{lm.path}: its manifest names {lm.manifest.name} v{lm.manifest.version}, "
                f"not {name} v{version} (the folder it is in)"
            )
        return lm

    def _worth_loading(self, name: str, version: int) -> bool:
        key = (name, version)
        if version in self.engine.loaded_versions(name) or key in self._unloaded:
            return False
        refused = self._refused.get(key)
        return refused is None or refused[1] != self._files(name, version)

    def _files(self, name: str, version: int) -> tuple:
        """What a refused version's files looked like: a copy still in progress changes it."""
        folder = self.store / name / str(version)
        try:
            stats = [(p.name, p.stat()) for p in sorted(folder.iterdir()) if p.is_file()]
        except OSError:  # the folder went away meanwhile
            return ()
        return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)

    def _set_ready(self, name: str, version: int, ready: bool) -> None:
        answer = self.core.set_ready(name, version, ready)
        if answer[0] != "ok":
            raise InvalidInput(answer[2], "version")
        self.engine.set_ready(name, version, ready)
        log.info("%s v%d is %s", name, version, "ready" if ready else "unloading")

    async def _reap(self) -> None:
        """Free every retired version with no session left here (the lock is held)."""
        for name in self.engine.model_names():
            for v in self.engine.loaded_versions(name):
                if self.engine.is_ready(name, v):
                    continue
                answer = await asyncio.to_thread(self.core.remove_model, name, v)
                if answer[0] == "ok" and answer[1] == 0:
                    await self.engine.remove(name, v)
                    log.info("freed %s v%d (its last session ended)", name, v)

    def _names(self) -> str:
        return ", ".join(self.engine.model_names())

"""``rnnserve torchserve start|stop``: the real TorchServe with every archive in the store.

``start`` builds missing or stale archives (when the store is writable), launches TorchServe's Java
frontend in its own session, and returns once every model's workers are READY. ``stop`` ends the
frontend and then anything left in its session, so no Java or Python worker outlives it.
``start --foreground`` is the container form: it replaces this process with the frontend (signals
reach Java directly) and never returns.

The frontend is launched the way TorchServe 0.12's own ``torchserve --start`` launches it, with
these differences: its pid file, temp files and worker sockets live in a run folder of their own
(so two stores never collide and a read-only store stays untouched), its logs go to
``<store>/torchserve/logs`` (the run folder's ``logs`` when the store is read-only, or
``--log-dir``), it runs in a new session (so ``stop`` finds every process it started), and the
models to load are named explicitly.

The management API (scale workers, unregister models) is not served on any TCP port: it listens
on a Unix socket in the run folder (``management_address=unix:management.sock``), which only this
user can open. ``management(store, method, path)`` calls it. ``--management-port P`` serves it on
127.0.0.1:P instead, for an operator who wants that; anyone on the host can then use it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from serving.errors import RnnServeError
from serving.manifest import list_models
from serving.torchserve.archive import archive_dir, build_archives

log = logging.getLogger("rnnserve.torchserve")

DEFAULT_CONFIG = Path(__file__).with_name("config.properties")
LOG_CONFIG = Path(__file__).with_name("log4j2.xml")  # TorchServe's, minus per-request lines
FRONTEND_CLASS = "org.pytorch.serve.ModelServer"
PID_FILE = "torchserve.pid"
UNIX = "unix:"  # TorchServe's scheme for a Unix-socket address (needs use_native_io=true)


@dataclass(frozen=True)
class Ports:
    """Ports given on the command line; None keeps the config file's value."""

    inference: int | None = None
    management: int | None = None
    metrics: int | None = None
    grpc_inference: int | None = None
    grpc_management: int | None = None


# ---- configuration ----------------------------------------------------------------------------


def load_properties(path: Path) -> dict[str, str]:
    from ts.model_server import load_properties as ts_load_properties  # TorchServe's own reader

    return ts_load_properties(str(path))


def effective_properties(
    config: Path | None, ports: Ports, enable_model_api: bool = False
) -> dict[str, str]:
    """Our defaults, laid over by --config key by key, then by the --*-port flags."""
    props = load_properties(DEFAULT_CONFIG)
    if config is not None:
        props.update(load_properties(config))
    for key, port in (
        ("inference_address", ports.inference),
        ("management_address", ports.management),
        ("metrics_address", ports.metrics),
    ):
        if port is not None:
            host = urlsplit(props[key]).hostname if not props[key].startswith(UNIX) else None
            props[key] = f"http://{host or '127.0.0.1'}:{port}"
    if ports.grpc_inference is not None:
        props["grpc_inference_port"] = str(ports.grpc_inference)
    if ports.grpc_management is not None:
        props["grpc_management_port"] = str(ports.grpc_management)
    if enable_model_api:
        props["enable_model_api"] = "true"
    return props


def write_properties(props: dict[str, str], path: Path) -> None:
    lines = [f"{k}={v}" for k, v in props.items() if k != "vmargs"]  # vmargs go on java's line
    path.write_text("# written by rnnserve torchserve start\n" + "\n".join(lines) + "\n")


def local_url(address: str) -> str:
    """A URL this host can call for a bind address (0.0.0.0 means any local interface); a
    ``unix:`` address stays as it is (``management`` knows how to call it)."""
    if address.startswith(UNIX):
        return address
    parts = urlsplit(address)
    host = "127.0.0.1" if parts.hostname in ("0.0.0.0", "::", None) else parts.hostname
    return f"{parts.scheme}://{host}:{parts.port}"


# ---- the run folder ---------------------------------------------------------------------------


def in_run_dir(address: str, run: Path) -> str:
    """A relative ``unix:`` socket path lies in the run folder: one per store's TorchServe."""
    if address.startswith(UNIX) and not address[len(UNIX) :].startswith("/"):
        return f"{UNIX}{run / address[len(UNIX) :]}"
    return address


def log_dir(store: Path, chosen: Path | None = None) -> Path:
    """Where TorchServe's logs go: ``--log-dir``, else beside the archives when the store is
    writable, else the run folder (a read-only store, as in the container)."""
    if chosen is not None:
        return chosen.resolve()
    out = archive_dir(store)
    if os.access(out if out.exists() else store, os.W_OK):
        return out / "logs"
    return run_dir(store) / "logs"


def run_dir(store: Path) -> Path:
    """Pid, logs, temp files and worker sockets, outside the (possibly read-only) store. Short,
    because worker sockets live here and Unix socket paths must stay under 108 bytes."""
    key = hashlib.sha256(str(Path(store).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"rnnserve-ts-{key}"


def running_frontend(store: Path) -> psutil.Process | None:
    """The frontend started for this store, if it is still alive."""
    try:
        pid = int((run_dir(store) / PID_FILE).read_text())
        proc = psutil.Process(pid)
        return proc if FRONTEND_CLASS in proc.cmdline() else None
    except (OSError, ValueError, psutil.Error):
        return None


# ---- start ------------------------------------------------------------------------------------


def archives_to_load(store: Path, only: list[str] | None) -> list[str]:
    """``name=name.mar`` for each model, building missing or stale archives when we may write."""
    out = archive_dir(store)
    writable = os.access(out if out.exists() else store, os.W_OK)
    names = only or list_models(store)
    if writable:
        build_archives(store, names)
    missing = [n for n in names if not (out / f"{n}.mar").is_file()]
    if missing or not names:
        raise SystemExit(
            f"rnnserve torchserve: no archive for {', '.join(missing) or 'any model'} in {out}; "
            f"run `rnnserve archive --store {store}`"
        )
    return [f"{n}={n}.mar" for n in names]


def java_command(props: dict[str, str], store: Path, models: list[str], run: Path) -> list[str]:
    import ts

    java_home = os.environ.get("JAVA_HOME")
    java = f"{java_home}/bin/java" if java_home else shutil.which("java")
    if not java:
        raise SystemExit("rnnserve torchserve: java not found; `make java` installs Java 17")
    ts_home = Path(ts.__file__).resolve().parent.parent
    config = run / "config.properties"
    write_properties(props, config)
    return [
        java,
        f"-Dmodel_server_home={ts_home}",
        f"-Dlog4j.configurationFile=file://{LOG_CONFIG}",
        *props.get("vmargs", "").split(),  # after ours: a vmargs -D wins
        f"-Djava.io.tmpdir={run / 'tmp'}",
        "-cp",
        f".:{ts_home / 'ts' / 'frontend'}/*",
        FRONTEND_CLASS,
        "--python",
        sys.executable,  # workers run with this Python, the one that has `serving` installed
        "-f",
        str(config),
        "-s",
        str(archive_dir(store)),
        "--no-config-snapshot",
        "--models",
        *models,
    ]


def prepare(store: Path, config: Path | None, ports: Ports, args: argparse.Namespace):
    if running_frontend(store) is not None:
        raise SystemExit(f"rnnserve torchserve: already running for {store}; stop it first")
    props = effective_properties(config, ports, args.enable_model_api)
    models = archives_to_load(store, args.models)
    run = run_dir(store)
    shutil.rmtree(run, ignore_errors=True)  # sockets and temp files of an earlier run
    for sub in ("logs", "tmp"):
        (run / sub).mkdir(parents=True)
    run.chmod(0o700)  # the management socket lives here: this user's alone
    props["management_address"] = in_run_dir(props["management_address"], run)
    logs = log_dir(store, getattr(args, "log_dir", None))
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LOG_LOCATION": str(logs), "METRICS_LOCATION": str(logs)}
    return props, models, run, env, java_command(props, store, models, run)


def start(
    store: Path, config: Path | None, ports: Ports, args: argparse.Namespace, timeout_s: float
) -> int:
    props, models, run, env, cmd = prepare(store, config, ports, args)
    logs = Path(env["LOG_LOCATION"])
    console = (logs / "console.log").open("wb")
    proc = subprocess.Popen(
        cmd, cwd=run, env=env, stdout=console, stderr=subprocess.STDOUT, start_new_session=True
    )
    console.close()  # the child holds its own copy
    (run / PID_FILE).write_text(str(proc.pid))
    names = [m.split("=", 1)[0] for m in models]
    try:
        wait_until_ready(local_url(props["management_address"]), names, proc, timeout_s)
    except BaseException:
        stop_session(proc.pid)
        proc.wait()
        print(tail(logs / "console.log"), file=sys.stderr)
        raise
    print(
        f"TorchServe ready: {len(names)} models on {local_url(props['inference_address'])} "
        f"(pid {proc.pid}, logs in {logs}, management API on "
        f"{local_url(props['management_address'])})",
        flush=True,
    )
    return 0


def start_foreground(store: Path, config: Path | None, ports: Ports, args) -> int:
    """Become the frontend: the container's main process, stopped by its signals."""
    _, _, run, env, cmd = prepare(store, config, ports, args)
    (run / PID_FILE).write_text(str(os.getpid()))  # exec keeps the pid
    os.chdir(run)
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)
    return 1  # not reached


def model_workers(management: str, name: str) -> list[dict]:
    status, body = call_management(management, "GET", f"/models/{name}")
    if status != 200:
        raise ValueError(f"GET /models/{name}: {status}")
    return json.loads(body)[0].get("workers", [])


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket: how this user reaches the management API."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def call_management(address: str, method: str, path: str, timeout: float = 5.0):
    """(status, body bytes) of one call to a management API at ``unix:/path`` or ``http://h:p``."""
    if address.startswith(UNIX):
        conn: http.client.HTTPConnection = UnixHTTPConnection(address[len(UNIX) :], timeout)
    else:
        parts = urlsplit(address)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def management(store: Path, method: str, path: str) -> tuple[int, str]:
    """Call the management API of the TorchServe running for ``store`` (its Unix socket), e.g.
    ``management(Path("/models"), "PUT", "/models/sine?min_worker=2")``."""
    status, body = call_management(default_management(store), method, path, timeout=60)
    return status, body.decode(errors="replace")


def call_command(store: Path, request: list[str]) -> int:
    if len(request) != 2:
        print("rnnserve torchserve: call takes METHOD PATH, e.g. call GET /models", file=sys.stderr)
        return 2
    try:
        status, body = management(store, request[0].upper(), request[1])
    except OSError as e:
        raise SystemExit(f"rnnserve torchserve: no management API for {store}: {e}") from e
    print(body)
    return 0 if status < 400 else 1


def default_management(store: Path) -> str:
    """The management address of a TorchServe started with our config for ``store``."""
    address = effective_properties(None, Ports())["management_address"]
    return local_url(in_run_dir(address, run_dir(Path(store).resolve())))


def wait_until_ready(
    management: str, names: list[str], proc: subprocess.Popen, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(names)
    while pending:
        if proc.poll() is not None:
            raise SystemExit(f"rnnserve torchserve: the frontend exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"rnnserve torchserve: not READY after {timeout_s:.0f} s: {pending}")
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError, IndexError):
            # raises until the management API is up
            pending = [n for n in pending if not _ready(model_workers(management, n))]
        time.sleep(0.25)
    log.info("every model READY: %s", ", ".join(names))


def _ready(workers: list[dict]) -> bool:
    return bool(workers) and all(w.get("status") == "READY" for w in workers)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---- stop -------------------------------------------------------------------------------------


def session_members(sid: int) -> list[psutil.Process]:
    """Every process in the frontend's session, orphans included (their parent may be gone)."""
    members = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                members.append(p)
        except (OSError, psutil.Error):
            continue
    return members


def stop_session(pid: int, grace_s: float = 30.0) -> None:
    """SIGTERM the frontend (its shutdown hook stops the workers), then end whatever is left in
    its session. ``pid`` leads the session: start used start_new_session (or exec'd into it)."""
    with contextlib.suppress(psutil.Error):
        frontend = psutil.Process(pid)
        frontend.terminate()
        try:
            frontend.wait(grace_s)
        except psutil.TimeoutExpired:
            frontend.kill()
    leftovers = [p for p in session_members(pid) if p.pid != os.getpid()]
    for p in leftovers:
        _quietly(p.terminate)
    _, alive = psutil.wait_procs(leftovers, timeout=5)
    for p in alive:
        _quietly(p.kill)
    psutil.wait_procs(alive, timeout=5)


def _quietly(action) -> None:
    with contextlib.suppress(psutil.Error):
        action()


def stop(store: Path) -> int:
    pid_file = run_dir(store) / PID_FILE
    frontend = running_frontend(store)
    if frontend is not None:
        stop_session(frontend.pid)
        print(f"TorchServe stopped (pid {frontend.pid})")
    elif pid_file.is_file():  # the frontend died: end workers it may have left behind
        orphans = [p for p in session_members(_read_pid(pid_file)) if _is_torchserve(p)]
        for p in orphans:
            _quietly(p.kill)
        psutil.wait_procs(orphans, timeout=5)
        print(f"TorchServe was not running for {store}; ended {len(orphans)} orphan process(es)")
    else:
        print(f"TorchServe is not running for {store}")
    pid_file.unlink(missing_ok=True)
    shutil.rmtree(run_dir(store) / "tmp", ignore_errors=True)  # extracted models and sockets
    return 0


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return -1


def _is_torchserve(p: psutil.Process) -> bool:
    try:
        line = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return FRONTEND_CLASS in line or "model_service_worker" in line


# ---- CLI --------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("torchserve", help="start or stop the real TorchServe with every archive")
    p.add_argument(
        "action",
        choices=("start", "stop", "call"),
        help="start: launch TorchServe, return once every model is READY; "
        "stop: end the TorchServe started for --store and all its workers; "
        "call METHOD PATH: one management API call (e.g. call GET /models)",
    )
    p.add_argument("request", nargs="*", help="call only: METHOD PATH")
    p.add_argument(
        "--store", type=Path, default=Path("model_store"), help="model store (%(default)s)"
    )
    p.add_argument(
        "--config",
        type=Path,
        help="config.properties laid over the defaults (serving/torchserve/config.properties)",
    )
    p.add_argument("--foreground", action="store_true", help="become TorchServe (containers)")
    p.add_argument("--model", action="append", dest="models", help="only this model (repeatable)")
    port = "port on the config's host (default: the config's, %s)"
    p.add_argument("--inference-port", type=int, help=port % "8080")
    p.add_argument(
        "--management-port",
        type=int,
        help="serve the management API on 127.0.0.1:PORT, open to anyone on the host (default: "
        "not on TCP; a Unix socket in the run folder, this user's only)",
    )
    p.add_argument("--metrics-port", type=int, help=port % "8082")
    p.add_argument("--grpc-inference-port", type=int, help=port % "7070")
    p.add_argument("--grpc-management-port", type=int, help=port % "7071")
    p.add_argument("--log-dir", type=Path, help="TorchServe's logs [<store>/torchserve/logs]")
    p.add_argument("--enable-model-api", action="store_true", help="allow (un)registering models")
    p.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for READY (%(default)s)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    store = args.store.resolve()
    if args.action == "stop":
        return stop(store)
    if args.action == "call":
        return call_command(store, args.request)
    ports = Ports(
        args.inference_port,
        args.management_port,
        args.metrics_port,
        args.grpc_inference_port,
        args.grpc_management_port,
    )
    if args.config is not None and not args.config.is_file():
        print(f"rnnserve torchserve: --config: no file {args.config}", file=sys.stderr)
        return 2
    if args.request:
        print(
            f"rnnserve torchserve: {args.action} takes no {' '.join(args.request)}", file=sys.stderr
        )
        return 2
    try:
        if args.foreground:
            return start_foreground(store, args.config, ports, args)
        return start(store, args.config, ports, args, args.timeout)
    except (RnnServeError, ValueError) as e:  # a broken artifact or setting: one line, not a trace
        raise SystemExit(f"rnnserve torchserve: {e}") from e

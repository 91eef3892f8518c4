"""Is a port free to listen on, and if not, who holds it? For the checks ``rnnserve serve`` and
``rnnserve up`` make before they load or start anything."""

from __future__ import annotations

import contextlib
import errno
import socket

import psutil


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` → (host, port); ValueError when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdecimal() or not host:
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def bind_error(host: str, port: int) -> OSError | None:
    """The error binding ``host:port`` would give now (None: free). SO_REUSEADDR as servers set
    it, so a port held only by connections closing in TIME_WAIT counts as free, as it is."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        return e
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
            except OSError as e:
                return e
    return None


def holder(port: int) -> str:
    """ " by pid N (command line)" for the process listening on ``port``, or "" when it cannot
    tell (another user's process: the kernel does not say whose it is)."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections("inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    return ""
                proc = psutil.Process(conn.pid)
                command = " ".join(proc.cmdline()) or proc.name()
                return f" by pid {conn.pid} ({_shortened(command)})"
    return ""


def taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, naming the holder when it can; None when free.
    Port 0 (any free port) is always free."""
    if port == 0:
        return None
    error = bind_error(host, port)
    if error is None:
        return None
    if getattr(error, "errno", None) == errno.EADDRINUSE:
        return f"port {port} is taken{holder(port)}"
    return f"cannot listen on {host}:{port}: {error.strerror or error}"


def _shortened(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"

"""Taking the daemon's endpoint: its lock file, and the checks that keep a daemon from binding over another.

No torch here: the command line runs :func:`refuse_served` before torch loads, so a second daemon on a served endpoint
is refused at once rather than after its model load and backend measurements (seconds; minutes with TensorRT).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import stat

import zmq

from upscaler_server.config import nobody_listens
from upscaler_server.errors import ConfigError
from upscaler_server.locks import held
from upscaler_server.protocol import Ping, encode

__all__ = ["claim", "ipc_path", "refuse_served", "release"]

_PING_MS = 500  # how long a daemon of a version without the lock file gets to answer the probe's ping


def ipc_path(endpoint: str) -> pathlib.Path | None:
    """The socket file of an ``ipc://`` endpoint; None for any other transport."""
    return pathlib.Path(endpoint.removeprefix("ipc://")) if endpoint.startswith("ipc://") else None


def refuse_served(endpoint: str) -> None:
    """ConfigError when another daemon serves ``endpoint`` now, or when binding it would fail or replace what is not a
    socket: a check before start-up's slow part. It takes nothing, so :func:`claim` checks again, under the lock."""
    path = ipc_path(endpoint)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        if path is None:
            _refuse_taken_address(ctx, endpoint)
            return
        if held(_lock_path(path)):  # not created: a daemon that then fails to start leaves nothing
            raise ConfigError(_already_served(endpoint))
        _check_socket_path(path)
        _refuse_live_socket(ctx, endpoint, path)
    finally:
        ctx.term()


def claim(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> int | None:
    """Before binding ``endpoint``: for ``ipc://``, the descriptor of its lock file, held for the daemon's life (give
    it to :func:`release`); None for other transports. ConfigError when another daemon holds it, or binding would
    replace a file, folder or link, or a socket some other process listens on."""
    path = ipc_path(endpoint)
    if path is None:
        return None
    lock_fd = _lock_endpoint(path, endpoint)
    try:
        _check_socket_path(path)
        _refuse_live_socket(ctx, endpoint, path)
    except ConfigError:
        release(endpoint, lock_fd)
        raise
    return lock_fd


def release(endpoint: str, lock_fd: int) -> None:
    """Unlink the lock file, then unlock: a daemon that opened the file just before the unlink sees it is gone once it
    gets the lock, and tries again on a new file (see :func:`_lock_endpoint`)."""
    path = ipc_path(endpoint)
    assert path is not None
    with contextlib.suppress(OSError):
        _lock_path(path).unlink()
    os.close(lock_fd)


def _already_served(endpoint: str) -> str:
    return f"another daemon already serves {endpoint}; stop it or pass another --endpoint"


def _check_socket_path(path: pathlib.Path) -> None:
    """Refuse to bind where binding would delete something that is not a socket (ZeroMQ unlinks the path first)."""
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not stat.S_ISSOCK(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "a file"
            raise ConfigError(f"{path} is {kind}, not a socket: binding would replace it; pass another --endpoint")


def _lock_path(socket_path: pathlib.Path) -> pathlib.Path:
    return socket_path.with_name(socket_path.name + ".lock")


def _lock_endpoint(socket_path: pathlib.Path, endpoint: str) -> int:
    """Hold an exclusive lock on ``<socket>.lock`` for the daemon's life and return its descriptor. Two daemons
    started at the same moment both found the socket free, both bound, and the second's bind replaced the first's
    socket file: the first served nobody for good. The kernel drops the lock when its holder dies (SIGKILL too), so
    a stale lock file never blocks a new daemon. ConfigError when another daemon holds it."""
    lock_path = _lock_path(socket_path)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open the endpoint's lock file {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(_already_served(endpoint)) from None
        if _same_file(fd, lock_path):
            return fd
        os.close(fd)  # its holder unlinked it on its way out after we opened it: that lock guards nothing now


def _same_file(fd: int, path: pathlib.Path) -> bool:
    try:
        on_disk, opened = path.lstat(), os.fstat(fd)
    except OSError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


def _refuse_live_socket(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, path: pathlib.Path) -> None:
    """ConfigError when a process listens on the socket file ``path``: binding would take the file over (libzmq
    unlinks it first) and this daemon's exit would delete it. A daemon of a version without the lock file answers a
    ping; any other program (a typo naming /run/docker.sock) does not."""
    if nobody_listens(endpoint) is not None:  # no file, or one a dead process left: binding replaces nothing live
        return
    if _ipc_in_use(ctx, endpoint):
        raise ConfigError(_already_served(endpoint))
    raise ConfigError(f"{path} is a socket that another program listens on (it does not answer as an upscaler "
                      "daemon): binding would take it over; pass another --endpoint")


def _ipc_in_use(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> bool:
    """True when a live daemon answers a ping on ``endpoint``, a socket file that something listens on."""
    probe = ctx.socket(zmq.DEALER)
    probe.linger = 0
    try:
        probe.connect(endpoint)
        probe.send(encode(Ping(req=0, sessions=[])))
        return bool(probe.poll(_PING_MS, zmq.POLLIN))
    finally:
        probe.close(linger=0)


def _refuse_taken_address(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
    """ConfigError when ``endpoint`` (tcp://) cannot be bound now: another daemon, or any program, listens on the
    port. The probe's socket is closed and its context terminated before start-up goes on, so the port is free
    again when the daemon binds it."""
    probe = ctx.socket(zmq.ROUTER)
    probe.setsockopt(zmq.IPV6, 1)  # as the daemon's socket: tcp://[::1]:PORT binds only with it
    try:
        probe.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot bind {endpoint}: {exc}") from exc
    finally:
        probe.close(linger=0)

"""Helpers for the upscaler daemon tests: run a daemon subprocess that is always stopped, raw sockets that never
hang, tiny checkpoints, and /dev/shm inspection. Imported by tests/test_server_*.py (not a conftest)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from upscaler_server import protocol
from upscaler_server.shm import segment_name

REPO = pathlib.Path(__file__).resolve().parents[1]
SHM_DIR = pathlib.Path("/dev/shm")
READY_TIMEOUT = 60.0  # a cold torch import on a loaded 2-core machine can take a while
STOP_TIMEOUT = 20.0


# one small network per student family: the export and edge-padding tests run all three in seconds
SMALL_DECODERS = {"rlfn_s": {"channels": 16}, "rfdn_s": {"channels": 16}, "pan_s": {"channels": 16, "up_channels": 8}}


def small_decoder(name: str) -> Any:
    """The SMALL_DECODERS network ``name``, randomly initialised with seed 0, in eval mode."""
    import torch

    import models

    torch.manual_seed(0)
    return models.build_model(name, **SMALL_DECODERS[name]).eval()


def make_checkpoint(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A small random rlfn_s student (16 channels) saved as a real checkpoint."""
    import torch

    import models

    torch.manual_seed(seed)
    return models.save_checkpoint(models.build_model("rlfn_s", scale=2, channels=16), path, role="student")


def shm_segments(pid: int | None = None) -> list[str]:
    """This user's daemon segments in /dev/shm, of daemon ``pid`` or of any daemon."""
    prefix = f"takdsr-{os.geteuid()}-" + (f"{pid}-" if pid is not None else "")
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix)) if SHM_DIR.is_dir() else []


def short_tmpdir() -> pathlib.Path:
    """A fresh short directory: ipc:// paths must stay under ~100 characters."""
    return pathlib.Path(tempfile.mkdtemp(prefix="ups-", dir="/tmp"))


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    endpoint: str
    log_path: pathlib.Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def segments(self) -> list[str]:
        return shm_segments(self.pid)


def spawn(args: Sequence[str], log_path: pathlib.Path) -> subprocess.Popen[bytes]:
    """``python -m upscaler_server ARGS`` with stdout and stderr in ``log_path`` (files never fill up and block).
    Under ``nohup pytest`` the daemon would inherit an ignored SIGHUP, which it keeps on purpose (nohup's meaning),
    and the SIGHUP test failed (from the coverage review): the daemon then starts with the default, as from a
    terminal. Only then: preexec_fn is not safe in a process with threads, and is avoided otherwise."""
    hangup_ignored = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "upscaler_server", *args], stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO,
                                preexec_fn=_default_hangup if hangup_ignored else None)


def _default_hangup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def wait_ready(daemon: Daemon, timeout: float = READY_TIMEOUT) -> None:
    """Wait until the daemon answers a ping; fail with its log if it exits or stays silent."""
    deadline = time.monotonic() + timeout
    with raw_socket(daemon.endpoint) as sock:
        while time.monotonic() < deadline:
            if daemon.proc.poll() is not None:
                pytest.fail(f"daemon exited with {daemon.proc.returncode} before it was ready:\n{daemon.log()}")
            sock.send(protocol.encode(protocol.Ping(req=1, sessions=[])))
            if sock.poll(250, zmq.POLLIN):
                sock.recv()
                return
    pytest.fail(f"daemon not ready after {timeout} s:\n{daemon.log()}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
    """Send ``sig`` and wait; SIGKILL after ``timeout`` (and fail). Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            pytest.fail(f"daemon {proc.pid} ignored signal {sig} for {timeout} s and was killed")
    return proc.returncode


@contextlib.contextmanager
def run_server(*args: str, endpoint: str | None = None, check_clean: bool = True) -> Iterator[Daemon]:
    """Start ``python -m upscaler_server ARGS`` on a private ipc endpoint and always stop it (SIGTERM).

    After a run without failure, the daemon must have exited 0 and left no segment in /dev/shm."""
    tmp = short_tmpdir()
    endpoint = endpoint or f"ipc://{tmp}/d.sock"
    daemon = Daemon(spawn(["--endpoint", endpoint, *args], tmp / "daemon.log"), endpoint, tmp / "daemon.log")
    failed = True
    try:
        wait_ready(daemon)
        yield daemon
        failed = False
    finally:
        status = stop(daemon.proc)
        left = daemon.segments()
        for name in left:  # never leave litter behind, even when failing
            (SHM_DIR / name).unlink(missing_ok=True)
        log = daemon.log()
        shutil.rmtree(tmp, ignore_errors=True)
        if check_clean and not failed:
            assert status == 0, f"daemon exited {status} on SIGTERM:\n{log}"
            assert not left, f"daemon left shared memory behind: {left}\n{log}"
            assert "Traceback" not in log and "leaked" not in log, f"daemon logged an internal error:\n{log}"


@dataclass
class ServedHere:
    """A daemon served by a thread of the test's own process (a test that reaches into its engine or state)."""

    server: Any  # upscaler_server.server.Server: imported on use, as it loads torch
    endpoint: str
    thread: threading.Thread


@contextlib.contextmanager
def serve_here(engine: Any, **settings: Any) -> Iterator[ServedHere]:
    """Serve ``engine`` with ``Config(**settings)`` on a private ipc endpoint from a thread of this process; asked to
    stop and joined on exit (an engine a test holds must be let go first: the stop waits for its frame)."""
    from upscaler_server.config import Config
    from upscaler_server.server import Server

    tmp = short_tmpdir()
    endpoint = f"ipc://{tmp}/d.sock"
    server = Server(Config(endpoint=endpoint, **settings), engine)
    served = ServedHere(server, endpoint, threading.Thread(target=server.serve))
    served.thread.start()
    try:
        yield served
    finally:
        served.server.request_stop()
        served.thread.join(30)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not served.thread.is_alive(), "the daemon's thread did not end"


@contextlib.contextmanager
def raw_socket(endpoint: str, routing_id: bytes | None = None) -> Iterator[zmq.Socket[bytes]]:
    """A DEALER socket (linger 0, with ``routing_id`` if given) on a private context, closed and terminated on
    exit."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.ipv6 = True  # a daemon on tcp://[::1]:PORT; IPv4 and ipc work either way
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


def exchange(sock: zmq.Socket[bytes], payload: bytes | list[bytes], timeout: float = 10.0) -> Any:
    """Send raw bytes (one frame, or a list of frames) and return the decoded last reply frame; fails instead of
    hanging."""
    if isinstance(payload, list):
        sock.send_multipart(payload)
    else:
        sock.send(payload)
    if not sock.poll(int(timeout * 1000), zmq.POLLIN):
        pytest.fail(f"no reply within {timeout} s to {payload!r:.80}")
    return msgpack.unpackb(sock.recv_multipart()[-1], raw=False)


def encode_request(**fields: Any) -> bytes:
    """A raw request map as msgpack, ``v`` added unless given."""
    return msgpack.packb({"v": protocol.VERSION, **fields}, use_bin_type=True)


def request(sock: zmq.Socket[bytes], **fields: Any) -> Any:
    """Build a raw request map (``v`` added unless given), exchange it and return the reply map."""
    return exchange(sock, encode_request(**fields))


class ArrayFrame:
    """An engine's CopiedFrame over plain arrays (the daemon's is a shared-memory slot), counting its copies."""

    def __init__(self, lr: np.ndarray, out_shape: tuple[int, ...]) -> None:
        self.lr = lr
        self.out = np.zeros(out_shape, np.uint8)
        self.height, self.width = lr.shape[:2]
        self.reads = self.writes = 0

    def read_into(self, lr: np.ndarray) -> None:
        np.copyto(lr, self.lr)
        self.reads += 1

    def write_from(self, out: np.ndarray) -> None:
        np.copyto(self.out, out)
        self.writes += 1


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, holding one row of data (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    one_row = zlib.compress(b"\x00" * (1 + width * 3))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", one_row) + chunk(b"IEND", b"")


FAKE_SESSION = 7
FAKE_FILL = 0x5A  # what the fake daemon's segments hold: a client that wrote into one changed it
FAKE_WELCOME = {"server": "fake/0", "instance": "f", "versions": [1], "model": "fake", "scale": 2, "device": "cpu",
                "precision": "uint8", "random_weights": False, "formats": ["RGB8"], "min_size": 1, "max_width": 64,
                "max_height": 64, "max_pixels": 4096, "max_slots": 64, "max_sessions": 1, "max_queue": 128,
                "lease_ms": 10000, "heartbeat_ms": 2500}


@contextlib.contextmanager
def fake_daemon(endpoint: str, slots: int, opened: dict[str, int] | None = None, short_input: bool = False,
                version: int = 1, mode: int = 0o600, owner: int | None = None, names: dict[str, str] | None = None
                ) -> Iterator[list[str]]:
    """A ROUTER that answers hello, open (with `slots` slots, over real segments of that size) and close by the
    book, and ignores submits; yields the types of the requests it got. ``opened`` overrides the opened reply's
    sizes (width, height, out_width, out_height: the segments follow them, modulo 2^64 as a C client computes them),
    ``short_input`` makes the input segment half the size the reply says, ``version`` is the replies' `v`. The
    segments have ``mode`` (0600, as the daemon makes them), belong to uid ``owner`` (None: this process's), hold
    FAKE_FILL bytes, and are named as a daemon of this process's uid and pid names session FAKE_SESSION's (the
    daemon's own segment_name: a client must accept what the daemon writes), or ``names[kind]`` for kind "in" and
    "out"."""
    seen: list[str] = []
    made: list[pathlib.Path] = []

    def segment(kind: str, width: int, height: int) -> dict[str, object]:
        row = width * 3
        slot_bytes = row * height % 2**64
        stride = (slot_bytes + 4095) // 4096 * 4096
        name = (names or {}).get(kind, segment_name(os.getpid(), FAKE_SESSION, kind))
        path = SHM_DIR / name.lstrip("/")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
        made.append(path)
        try:
            os.fchmod(fd, mode)  # whatever the umask
            if owner is not None:
                os.fchown(fd, owner, -1)
            os.write(fd, bytes([FAKE_FILL]) * (stride * slots // (2 if short_input and kind == "in" else 1)))
        finally:
            os.close(fd)
        return {"name": name, "size": stride * slots, "slot_stride": stride, "slot_bytes": slot_bytes,
                "row_stride": row}

    def answer(msg: dict[str, object]) -> dict[str, object] | None:
        head = {"v": version, "req": msg["req"]}
        if msg["type"] == "hello":
            return {**head, "type": "welcome", **FAKE_WELCOME}
        if msg["type"] == "open":
            w, h = int(msg["width"]), int(msg["height"])  # type: ignore[call-overload]
            sizes = {"width": w, "height": h, "out_width": 2 * w, "out_height": 2 * h, **(opened or {})}
            return {**head, "type": "opened", "session": FAKE_SESSION, **sizes, "format": msg["format"], "slots": slots,
                    "input": segment("in", sizes["width"], sizes["height"]),
                    "output": segment("out", sizes["out_width"], sizes["out_height"])}
        if msg["type"] == "close":
            return {**head, "type": "closed", "session": msg["session"]}
        return None

    def typed_answer(msg: dict[str, Any]) -> dict[str, Any] | None:
        seen.append(msg["type"])
        return answer(msg)

    try:
        with scripted_daemon(endpoint, typed_answer):
            yield seen
    finally:
        for path in made:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def scripted_daemon(endpoint: str, answer: Callable[[dict[str, Any]], dict[str, Any] | None]) -> Iterator[None]:
    """A ROUTER on ``endpoint``, served from a thread, that answers each request map with ``answer(request)``
    (None: no reply at all)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(endpoint)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if sock.poll(50, zmq.POLLIN):
                peer, payload = sock.recv_multipart()
                reply = answer(msgpack.unpackb(payload, raw=False))
                if reply is not None:
                    sock.send_multipart([peer, msgpack.packb(reply, use_bin_type=True)])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        sock.close(linger=0)
        ctx.term()


def foreign_segment_names(which: str) -> dict[str, str]:
    """Segment names an opened reply may not give for session FAKE_SESSION's rings."""
    pid = os.getpid()
    if which == "another application's":
        return {kind: f"/pytest-victim-{pid}-{kind}" for kind in ("in", "out")}
    if which == "another session's":
        return {kind: segment_name(pid, FAKE_SESSION + 1, kind) for kind in ("in", "out")}
    if which == "in and out swapped":
        return {"in": segment_name(pid, FAKE_SESSION, "out"), "out": segment_name(pid, FAKE_SESSION, "in")}
    return {kind: f"/takdsr-{os.geteuid() + 1}-{pid}-{FAKE_SESSION:08x}-{kind}" for kind in ("in", "out")}  # another's


FOREIGN_SEGMENTS = ["another application's", "another session's", "in and out swapped", "named for another uid"]


def untouched_segments(names: dict[str, str]) -> bool:
    """Whether the fake daemon's segments ``names`` still hold nothing but FAKE_FILL."""
    return all(set((SHM_DIR / name.lstrip("/")).read_bytes()) == {FAKE_FILL} for name in names.values())

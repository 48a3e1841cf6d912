"""How much one client that keeps resizing its own output segment delays another client's frames, for a daemon with
its default slot copies and for one with ``--map-slots``. Prints a table and writes JSON.

    python scripts/resize_stall.py --frames 30 --grow-mb 2048 --json resize_stall.json

Two sessions of the ``nearest`` backend at one size. The victim times ``submit`` -> ``done`` round trips, alone and
then while the other client loops fallocate(size + grow) and ftruncate(size) on its own output segment and submits
frames of its own (the protocol forbids resizing a segment; docs/protocol.md 6.1). A write that took the file's lock
(pwrite on tmpfs, as the daemon did before it copied with process_vm_writev) waited for each of those calls.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import zmq

from upscaler_server.bench import check_json_target, spawn_daemon
from upscaler_server.config import default_size_problem, parse_size
from upscaler_server.shm import SHM_DIR

MODES = {"default": [], "map-slots": ["--map-slots"]}


class _Peer:
    """One DEALER connection speaking raw msgpack, every wait bounded."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.connect(endpoint)
        self._req = 0

    def call(self, **fields: Any) -> dict[str, Any]:
        self._req += 1
        self._sock.send(msgpack.packb({"v": 1, "req": self._req, **fields}, use_bin_type=True))
        if not self._sock.poll(60_000, zmq.POLLIN):
            raise RuntimeError(f"no reply to {fields['type']} within 60 s")
        reply = msgpack.unpackb(self._sock.recv_multipart()[-1], raw=False)
        if reply["type"] == "error":
            raise RuntimeError(f"{fields['type']}: {reply['name']}: {reply['message']}")
        return reply

    def close(self) -> None:
        self._sock.close(linger=0)


def _round_trips_ms(peer: _Peer, session: int, frames: int) -> list[float]:
    times = []
    for frame in range(frames):
        start = time.perf_counter()
        peer.call(type="submit", session=session, slot=0, frame=frame)
        times.append((time.perf_counter() - start) * 1e3)
    return times


@contextmanager
def _resizing(peer: _Peer, opened: dict[str, Any], grow_bytes: int) -> Iterator[None]:
    """While inside: one thread grows and shrinks back the session's output segment, another submits its frames."""
    stop = threading.Event()
    failures: list[BaseException] = []
    path, size = SHM_DIR / opened["output"]["name"].lstrip("/"), opened["output"]["size"]

    def resize() -> None:  # never below the size: the resizer's own frames stay valid
        fd = os.open(path, os.O_RDWR)
        try:
            while not stop.is_set():
                os.posix_fallocate(fd, size, grow_bytes)
                os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def submit() -> None:
        while not stop.is_set():
            peer.call(type="submit", session=opened["session"], slot=0, frame=0)

    def recording(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # reported after the phase: a silent thread would void the measurement
                failures.append(exc)
                stop.set()
        return run

    threads = [threading.Thread(target=recording(resize)), threading.Thread(target=recording(submit))]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    if failures:
        raise RuntimeError(f"the resizing client failed: {failures[0]!r}") from failures[0]


def measure(mode: str, width: int, height: int, frames: int, grow_bytes: int) -> dict[str, Any]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with spawn_daemon(["--backend", "nearest", "--log-level", "WARNING", *MODES[mode]]) as endpoint:
        resizer, victim = _Peer(ctx, endpoint), _Peer(ctx, endpoint)
        try:
            opened = resizer.call(type="open", width=width, height=height, format="RGB8", slots=1)
            session = victim.call(type="open", width=width, height=height, format="RGB8", slots=1)["session"]
            alone = _round_trips_ms(victim, session, frames)
            with _resizing(resizer, opened, grow_bytes):
                resized = _round_trips_ms(victim, session, frames)
        finally:
            resizer.close()
            victim.close()
    ctx.term()
    return {"mode": mode, "alone_p50_ms": statistics.median(alone), "alone_max_ms": max(alone),
            "resizing_p50_ms": statistics.median(resized), "resizing_max_ms": max(resized)}


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _frame_size(text: str) -> tuple[int, int]:
    """--size: WxH within the spawned daemon's default limits (0x0 was refused by the daemon, after it had started)."""
    width, height = parse_size(text)
    if (problem := default_size_problem(width, height)) is not None:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return width, height


def check_before_measuring(json_path: pathlib.Path | None, grow_bytes: int) -> None:
    """ValueError for a --json that cannot be written or a --grow-mb that the shared-memory folder has no room for
    (the resizer would fail part-way through the first daemon's run)."""
    if json_path:
        check_json_target(json_path)
    shm = os.statvfs(SHM_DIR)
    free = shm.f_bavail * shm.f_frsize
    if grow_bytes > free:
        raise ValueError(f"--grow-mb {grow_bytes >> 20}: {SHM_DIR} has {free >> 20} MB free to grow a segment into")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_frame_size, default=(640, 360),
                        help="LR frame WxH of both sessions (default: 640x360)")
    parser.add_argument("--frames", type=_positive_int, default=30, help="victim round trips per phase (default: 30)")
    parser.add_argument("--grow-mb", type=_positive_int, default=2048,
                        help="how far the resizer grows its segment, MB (default: 2048)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args(argv)
    width, height = args.size
    try:
        check_before_measuring(args.json, args.grow_mb << 20)
        rows = [measure(mode, width, height, args.frames, args.grow_mb << 20) for mode in MODES]
    # RuntimeError: a daemon that did not start, a request it refused (a size out of its range), a failed resizer
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"victim round trips at {width}x{height}, {args.frames} frames per phase, resizer grows by {args.grow_mb} MB")
    print(f"{'daemon':>10} {'alone p50':>10} {'alone max':>10} {'resizing p50':>13} {'resizing max':>13}")
    for row in rows:
        print(f"{row['mode']:>10} {row['alone_p50_ms']:10.2f} {row['alone_max_ms']:10.2f} "
              f"{row['resizing_p50_ms']:13.2f} {row['resizing_max_ms']:13.2f}")
    if args.json:
        args.json.write_text(json.dumps({"size": f"{width}x{height}", "frames": args.frames,
                                         "grow_mb": args.grow_mb, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

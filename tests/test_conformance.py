"""Protocol conformance: the daemon driven through raw ZeroMQ messages built from docs/protocol.md alone.

Nothing of upscaler_server's protocol, client or shm modules is used: messages are msgpack maps packed here, shared
memory is read and written through /dev/shm (section 6.1). Section numbers below are those of docs/protocol.md.
"""

from __future__ import annotations

import itertools
import mmap
import os
import pathlib
import re
import signal
import stat
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from server_utils import REPO, Daemon, make_checkpoint, raw_socket, run_server

DOC = REPO / "docs" / "protocol.md"
SHM = pathlib.Path("/dev/shm")
LIMITS = {"max_width": 200, "max_height": 120, "max_pixels": 16000, "max_slots": 3, "max_sessions": 3,
          "max_queue": 8, "lease_ms": 1500}
ARGS = ["--device", "cpu", "--threads", "1", "--max-width", "200", "--max-height", "120", "--max-pixels", "16000",
        "--max-slots", "3", "--max-sessions", "3", "--max-queue", "8", "--lease-timeout", "1.5", "--max-shm-mb", "1"]
CHANNELS = {"RGB8": 3, "BGR8": 3, "RGBA8": 4, "BGRA8": 4}
HEADER = {"v", "type", "req"}
REPLY_KEYS = {
    "welcome": {"server", "instance", "versions", "model", "scale", "device", "precision", "random_weights", "formats",
                "min_size", "max_width", "max_height", "max_pixels", "max_slots", "max_sessions", "max_queue",
                "lease_ms", "heartbeat_ms"},
    "opened": {"session", "width", "height", "out_width", "out_height", "format", "slots", "input", "output"},
    "done": {"session", "slot", "frame", "timings"},
    "result": {"frame", "width", "height", "format", "pixels", "timings"},
    "closed": {"session"},
    "pong": {"sessions", "instance"},
    "statistics": {"instance", "uptime_ms", "sessions", "queued", "frames_done", "frames_failed", "frames_busy",
                   "recent_frames", "total_us_p50", "total_us_p99", "infer_us_p50", "infer_us_p99"},
    "error": {"code", "name", "message"},
}
SEGMENT_KEYS = {"name", "size", "slot_stride", "slot_bytes", "row_stride"}
TIMINGS_KEYS = {"queue_us", "copy_in_us", "infer_us", "copy_out_us", "total_us"}
# Error codes of section 7 and the test that triggers each from outside the daemon.
TRIGGERED = {1: "test_malformed", 2: "test_version", 3: "test_unknown_type", 4: "test_invalid_field",
             10: "test_session_lifecycle", 11: "test_slot_errors", 12: "test_slot_errors", 13: "test_size_limits",
             14: "test_size_limits", 15: "test_size_limits", 16: "test_resource_limits", 20: "test_busy",
             21: "test_shutdown_answers_queued_frames", 30: "test_truncated_segment"}
# Not triggerable from outside: INFERENCE_ERROR needs the engine to fail on a valid frame; INTERNAL needs a daemon bug.
NOT_TRIGGERABLE = {31, 99}


class Peer:
    """A DEALER socket speaking raw msgpack; every wait fails the test instead of hanging."""

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self.ids = itertools.count(1)
        self.opened: list[int] = []  # sessions this peer opened, closed after the test whatever its outcome

    def send(self, **fields: Any) -> int:
        """Send a request (v = 1 and a fresh req unless given); returns its req."""
        fields.setdefault("req", next(self.ids))
        self.send_raw(msgpack.packb({"v": 1, **fields}, use_bin_type=True))
        return fields["req"]

    def send_raw(self, payload: bytes | list[bytes]) -> None:
        if isinstance(payload, list):
            self.sock.send_multipart(payload)
        else:
            self.sock.send(payload)

    def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        if not self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            pytest.fail(f"no reply within {timeout} s")
        frames = self.sock.recv_multipart()
        assert len(frames) == 1, "section 1: a DEALER receives exactly one frame"
        reply = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
        _check_reply(reply)
        return reply

    def call(self, **fields: Any) -> dict[str, Any]:
        req = self.send(**fields)
        reply = self.recv()
        assert reply["req"] == req
        return reply

    def silent(self, timeout: float) -> bool:
        return not self.sock.poll(int(timeout * 1000), zmq.POLLIN)

    def close_opened(self) -> None:
        """Close what the test left open, so a failed test cannot spend the next test's session limit (replies,
        UNKNOWN_SESSION for sessions already gone, are read and not checked)."""
        pending = {self.send(type="close", session=sid) for sid in self.opened}
        deadline = time.monotonic() + 10.0
        while pending and self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
            pending.discard(msgpack.unpackb(self.sock.recv_multipart()[-1], raw=False).get("req"))


def _check_reply(reply: Any) -> None:
    """Section 4: a map with exactly the documented keys of its type; int/str/bin/map types as listed."""
    assert isinstance(reply, dict) and reply["v"] == 1 and isinstance(reply["req"], int)
    assert set(reply) == HEADER | REPLY_KEYS[reply["type"]], reply
    if reply["type"] == "error":
        assert isinstance(reply["message"], str) and 0 < len(reply["message"]) <= 1024
    if reply["type"] in ("done", "result"):
        assert set(reply["timings"]) == TIMINGS_KEYS and all(isinstance(v, int) for v in reply["timings"].values())
    if reply["type"] == "result":
        assert isinstance(reply["pixels"], bytes)  # msgpack bin, not str
    if reply["type"] == "opened":
        assert set(reply["input"]) == set(reply["output"]) == SEGMENT_KEYS
    if reply["type"] == "statistics":
        assert all(isinstance(v, int) and v >= 0 for k, v in reply.items() if k not in ("type", "instance"))
        assert reply["total_us_p50"] <= reply["total_us_p99"] and reply["infer_us_p50"] <= reply["infer_us_p99"]


def expect_error(reply: dict[str, Any], code: int, name: str, req: int | None = None) -> None:
    assert reply["type"] == "error", reply
    assert (reply["code"], reply["name"]) == (code, name), reply
    if req is not None:
        assert reply["req"] == req


# --- shared memory, per section 6 -------------------------------------------------------------------------------------


def _shm_path(segment: dict[str, Any]) -> pathlib.Path:
    return SHM / segment["name"].lstrip("/")


def write_slot(segment: dict[str, Any], slot: int, data: bytes) -> None:
    with open(_shm_path(segment), "r+b") as f, mmap.mmap(f.fileno(), segment["size"]) as mm:
        start = slot * segment["slot_stride"]
        mm[start:start + len(data)] = data


def read_slot(segment: dict[str, Any], slot: int) -> bytes:
    with open(_shm_path(segment), "r+b") as f, mmap.mmap(f.fileno(), segment["size"]) as mm:
        start = slot * segment["slot_stride"]
        return mm[start:start + segment["slot_bytes"]]


def frame(width: int, height: int, fmt: str, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, height * width * CHANNELS[fmt], dtype=np.uint8).tobytes()


# --- fixtures ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "student.safetensors")


@pytest.fixture(scope="module")
def daemon(checkpoint: pathlib.Path) -> Iterator[Daemon]:
    with run_server("--checkpoint", str(checkpoint), *ARGS) as d:
        yield d


@pytest.fixture
def peer(daemon: Daemon) -> Iterator[Peer]:
    with raw_socket(daemon.endpoint) as sock:
        peer = Peer(sock)
        yield peer
        peer.close_opened()


def open_session(peer: Peer, width: int, height: int, fmt: str = "RGB8", slots: int = 1) -> dict[str, Any]:
    reply = peer.call(type="open", width=width, height=height, format=fmt, slots=slots)
    assert reply["type"] == "opened", reply
    peer.opened.append(reply["session"])
    return reply


def process(peer: Peer, width: int, height: int, fmt: str, pixels: bytes) -> bytes:
    reply = peer.call(type="process", width=width, height=height, format=fmt, frame=7, pixels=pixels)
    assert reply["type"] == "result" and (reply["width"], reply["height"]) == (2 * width, 2 * height), reply
    return reply["pixels"]


# --- tests ------------------------------------------------------------------------------------------------------------


def test_every_documented_error_code_is_covered() -> None:
    rows = re.findall(r"^\| (\d+) \| `([A-Z_]+)` \|", DOC.read_text(), re.MULTILINE)
    documented = {int(code) for code, _ in rows}
    assert documented == set(TRIGGERED) | NOT_TRIGGERABLE, "section 7 changed: cover the new codes here"


def test_hello_welcome(peer: Peer, daemon: Daemon) -> None:
    reply = peer.call(type="hello", client="c" * 64)
    assert reply["type"] == "welcome"
    assert {k: reply[k] for k in LIMITS} == LIMITS and reply["heartbeat_ms"] == 375
    assert (reply["versions"], reply["scale"], reply["min_size"], reply["device"]) == ([1], 2, 15, "cpu")
    assert reply["precision"] == "fp32" and reply["random_weights"] is False
    assert sorted(reply["formats"]) == sorted(CHANNELS)
    assert all(isinstance(reply[k], str) for k in ("server", "instance", "model"))
    pong = peer.call(type="ping", sessions=[])
    assert pong["type"] == "pong" and pong["instance"] == reply["instance"] and pong["sessions"] == []


def test_doc_example_bytes(peer: Peer) -> None:
    """Section 9's exact bytes are valid msgpack of the maps shown and the daemon answers them."""
    hello = bytes.fromhex("84 a1 76 01 a4 74 79 70 65 a5 68 65 6c 6c 6f a3 72 65 71 01 a6 63 6c 69 65 6e 74 "
                          "a9 6d 79 2d 65 6e 67 69 6e 65")
    ping = bytes.fromhex("84 a1 76 01 a4 74 79 70 65 a4 70 69 6e 67 a3 72 65 71 02 a8 73 65 73 73 69 6f 6e 73 90")
    submit = bytes.fromhex("86 a1 76 01 a4 74 79 70 65 a6 73 75 62 6d 69 74 a3 72 65 71 07 a7 73 65 73 73 69 "
                           "6f 6e ce 12 34 56 78 a4 73 6c 6f 74 01 a5 66 72 61 6d 65 2a")
    assert (len(hello), len(ping), len(submit)) == (37, 29, 47)
    assert msgpack.packb({"v": 1, "type": "hello", "req": 1, "client": "my-engine"}) == hello
    assert msgpack.unpackb(submit) == {"v": 1, "type": "submit", "req": 7, "session": 305419896, "slot": 1,
                                       "frame": 42}
    for payload, kind, req in ((hello, "welcome", 1), (ping, "pong", 2)):
        peer.send_raw(payload)
        reply = peer.recv()
        assert (reply["type"], reply["req"]) == (kind, req)
    peer.send_raw(submit)
    expect_error(peer.recv(), 10, "UNKNOWN_SESSION", req=7)


def test_req_socket_framing(daemon: Daemon) -> None:
    """Section 1: a REQ socket's empty delimiter frame is accepted and echoed."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(daemon.endpoint)
        sock.send(msgpack.packb({"v": 1, "type": "ping", "req": 9, "sessions": []}))
        assert sock.poll(10000, zmq.POLLIN), "no reply to a REQ socket"
        assert msgpack.unpackb(sock.recv(), raw=False)["type"] == "pong"
        sock.send_multipart([b"x", b"y", b"z"])  # bad framing from a REQ socket: its MALFORMED must reach it too
        assert sock.poll(10000, zmq.POLLIN), "no reply to a REQ socket's malformed message"
        assert msgpack.unpackb(sock.recv(), raw=False)["name"] == "MALFORMED"
    finally:
        sock.close(linger=0)
        ctx.term()


def test_session_lifecycle(peer: Peer, daemon: Daemon) -> None:
    width, height, fmt, slots = 40, 30, "BGRA8", 2
    opened = open_session(peer, width, height, fmt, slots)
    sid = opened["session"]
    assert 1 <= sid <= 2**31 - 1
    assert (opened["width"], opened["height"], opened["out_width"], opened["out_height"]) == (40, 30, 80, 60)
    assert (opened["format"], opened["slots"]) == (fmt, slots)
    for kind, suffix, (w, h) in (("input", "in", (40, 30)), ("output", "out", (80, 60))):
        seg = opened[kind]
        assert seg["name"] == f"/takdsr-{os.geteuid()}-{daemon.pid}-{sid:08x}-{suffix}"
        assert seg["row_stride"] == w * 4 and seg["slot_bytes"] == h * w * 4
        assert seg["slot_stride"] == -(-seg["slot_bytes"] // 4096) * 4096 and seg["size"] == slots * seg["slot_stride"]
        info = _shm_path(seg).stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid() and info.st_size >= seg["size"]
    lr = frame(width, height, fmt, seed=1)
    write_slot(opened["input"], 1, lr)
    req = peer.send(type="submit", session=sid, slot=1, frame=2**64 - 1)
    done = peer.recv()
    assert done["type"] == "done" and (done["req"], done["session"], done["slot"], done["frame"]) == (
        req, sid, 1, 2**64 - 1)
    assert read_slot(opened["output"], 1) == process(peer, width, height, fmt, lr)
    closed = peer.call(type="close", session=sid)
    assert (closed["type"], closed["session"]) == ("closed", sid)
    assert not _shm_path(opened["input"]).exists() and not _shm_path(opened["output"]).exists()
    expect_error(peer.call(type="close", session=sid), 10, "UNKNOWN_SESSION")
    expect_error(peer.call(type="submit", session=sid, slot=0, frame=1), 10, "UNKNOWN_SESSION")
    expect_error(peer.call(type="submit", session=12345, slot=0, frame=1), 10, "UNKNOWN_SESSION")


def test_a_session_belongs_to_the_connection_that_opened_it(peer: Peer, daemon: Daemon) -> None:
    """Section 5.8: session ids are in the segments' names, so another connection may not submit to a session or
    close it; pings from anywhere are answered, and the owner's session stays usable."""
    sid = open_session(peer, 20, 16)["session"]
    with raw_socket(daemon.endpoint) as sock:
        other = Peer(sock)
        expect_error(other.call(type="submit", session=sid, slot=0, frame=1), 10, "UNKNOWN_SESSION")
        expect_error(other.call(type="close", session=sid), 10, "UNKNOWN_SESSION")
        assert other.call(type="ping", sessions=[sid])["sessions"] == [sid]
    assert peer.call(type="submit", session=sid, slot=0, frame=2)["type"] == "done"


def test_a_done_lost_with_a_closed_socket_is_recovered_by_submitting_again(daemon: Daemon) -> None:
    """Section 8, from a review that followed it to the letter: after a reconnect, a session that `pong` lists may
    have had its `done` sent while no socket was connected, and "keep waiting" waited for ever. Submitting the same
    slot again answers: here `done`, the frame computed again (`SLOT_IN_FLIGHT` while the old one still runs)."""
    routing_id = b"\x01" + os.urandom(15)
    with raw_socket(daemon.endpoint, routing_id) as sock:
        first = Peer(sock)
        sid = open_session(first, 20, 16)["session"]
        first.send(type="submit", session=sid, slot=0, frame=1)
    time.sleep(1.0)  # the frame is done, and its reply sent, while no socket has the routing id
    with raw_socket(daemon.endpoint, routing_id) as sock:
        again = Peer(sock)
        again.opened.append(sid)
        assert again.call(type="ping", sessions=[sid])["sessions"] == [sid]  # listed, the same instance
        assert again.silent(1.0), "the first done reached the new socket: section 8 says it is lost"
        reply = again.call(type="submit", session=sid, slot=0, frame=1)
        assert reply["type"] == "done" and (reply["session"], reply["slot"], reply["frame"]) == (sid, 0, 1), reply
        again.close_opened()


def test_truncated_segment(peer: Peer) -> None:
    """Section 6: a segment a client truncated (opened with O_TRUNC, or ftruncate()d) is refused with SHM_ERROR
    instead of killing the daemon with SIGBUS; once its size is back, the session works again."""
    opened = open_session(peer, 20, 16, slots=2)
    sid = opened["session"]
    for kind in ("input", "output"):
        fd = os.open(_shm_path(opened[kind]), os.O_RDWR | os.O_TRUNC)
        try:
            # to nothing, then short by one byte: the last slot's end is gone, the first slot is still whole
            for size in (0, opened[kind]["size"] - 1):
                os.ftruncate(fd, size)
                expect_error(peer.call(type="submit", session=sid, slot=1, frame=1), 30, "SHM_ERROR")
                assert peer.call(type="ping", sessions=[sid])["sessions"] == [sid]  # the daemon and session live on
            os.ftruncate(fd, opened[kind]["size"])
        finally:
            os.close(fd)
        assert peer.call(type="submit", session=sid, slot=1, frame=2)["type"] == "done"


def test_pixel_formats(peer: Peer) -> None:
    """Section 6.3: byte order per format, alpha bypasses the network (nearest neighbour)."""
    width, height = 18, 16
    rgba = np.frombuffer(frame(width, height, "RGBA8", seed=2), np.uint8).reshape(height, width, 4)
    order = {"RGB8": [0, 1, 2], "BGR8": [2, 1, 0], "RGBA8": [0, 1, 2, 3], "BGRA8": [2, 1, 0, 3]}
    reference = np.frombuffer(process(peer, width, height, "RGB8", rgba[..., :3].tobytes()), np.uint8)
    reference = reference.reshape(2 * height, 2 * width, 3)
    for fmt, idx in order.items():
        out = np.frombuffer(process(peer, width, height, fmt, rgba[..., idx].tobytes()), np.uint8)
        out = out.reshape(2 * height, 2 * width, len(idx))
        np.testing.assert_array_equal(out[..., idx[:3]] if fmt.startswith("B") else out[..., :3], reference)
        if len(idx) == 4:
            np.testing.assert_array_equal(out[..., 3], rgba[..., 3].repeat(2, axis=0).repeat(2, axis=1))


def test_pipelined_results_and_round_robin(peer: Peer) -> None:
    """Sections 1 and 5: replies are matched by req; one session's frames finish in order; sessions take turns."""
    sessions = [open_session(peer, 40, 30, "RGB8", 3) for _ in range(2)]
    peer.call(type="ping", sessions=[s["session"] for s in sessions])  # both warm-ups have been queued
    frames, sent = {}, {}
    for s in sessions:
        for slot in range(3):
            frames[1000 + len(frames)] = pixels = frame(40, 30, "RGB8", seed=10 * s["session"] % 97 + slot)
            write_slot(s["input"], slot, pixels)
    # Turns only show while both sessions have frames queued: a largest-size inline frame (~9 ms here, the 40x30
    # frames ~1 ms) keeps the worker busy while the six submits, sent back to back, queue up behind it.
    blocker = peer.send(type="process", width=200, height=80, format="RGB8", frame=1,
                        pixels=frame(200, 80, "RGB8", seed=0))
    for fid in frames:
        s, slot = sessions[(fid - 1000) // 3], (fid - 1000) % 3
        sent[peer.send(type="submit", session=s["session"], slot=slot, frame=fid)] = (s, slot, fid)
    order = []
    for _ in range(7):
        done = peer.recv()
        if done["req"] == blocker:
            assert done["type"] == "result", done
            continue
        s, slot, fid = sent.pop(done["req"])
        assert done["type"] == "done" and (done["session"], done["slot"], done["frame"]) == (s["session"], slot, fid)
        order.append((s["session"], fid))
    first, second = (s["session"] for s in sessions)
    assert [f for sid, f in order if sid == first] == sorted(f for sid, f in order if sid == first)
    position = [sid for sid, _ in order]
    assert position.index(second) < len(position) - 1 - position[::-1].index(first), order
    for s in sessions:
        for slot in range(3):
            fid = 1000 + 3 * sessions.index(s) + slot
            assert read_slot(s["output"], slot) == process(peer, 40, 30, "RGB8", frames[fid])
        assert peer.call(type="close", session=s["session"])["type"] == "closed"


def test_slot_errors(peer: Peer) -> None:
    opened = open_session(peer, 160, 100, "RGB8", 2)
    sid = opened["session"]
    expect_error(peer.call(type="submit", session=sid, slot=2, frame=1), 11, "SLOT_OUT_OF_RANGE")
    expect_error(peer.call(type="submit", session=sid, slot=64, frame=1), 4, "INVALID_FIELD")
    first = peer.send(type="submit", session=sid, slot=0, frame=1)
    second = peer.send(type="submit", session=sid, slot=0, frame=2)  # a 160x100 frame takes far longer than this
    replies = {r["req"]: r for r in (peer.recv(), peer.recv())}
    assert replies[first]["type"] == "done"
    expect_error(replies[second], 12, "SLOT_IN_FLIGHT")
    assert peer.call(type="submit", session=sid, slot=0, frame=3)["type"] == "done"  # free again after done
    assert peer.call(type="close", session=sid)["type"] == "closed"


@pytest.mark.parametrize("kind", ["open", "process"])
def test_size_limits(peer: Peer, kind: str) -> None:
    def ask(width: int, height: int, fmt: str = "RGB8") -> dict[str, Any]:
        if kind == "open":
            return peer.call(type="open", width=width, height=height, format=fmt, slots=1)
        pixels = bytes(width * height * CHANNELS.get(fmt, 3))
        return peer.call(type="process", width=width, height=height, format=fmt, frame=1, pixels=pixels)

    for width, height in ((201, 10), (10, 121), (161, 100)):  # max_width, max_height, max_pixels
        expect_error(ask(width, height), 13, "SIZE_TOO_LARGE")
    for width, height in ((14, 20), (20, 14)):
        expect_error(ask(width, height), 14, "SIZE_TOO_SMALL")
    expect_error(ask(20, 20, "YUV8"), 15, "UNSUPPORTED_FORMAT")
    for width, height in ((15, 15), (160, 100)):  # the limits themselves are accepted
        reply = ask(width, height)
        assert reply["type"] == ("opened" if kind == "open" else "result"), reply
        if kind == "open":
            assert peer.call(type="close", session=reply["session"])["type"] == "closed"


def test_resource_limits(peer: Peer) -> None:
    expect_error(peer.call(type="open", width=16, height=16, format="RGB8", slots=4), 16, "RESOURCE_LIMIT")
    small = [open_session(peer, 16, 16) for _ in range(3)]
    expect_error(peer.call(type="open", width=16, height=16, format="RGB8", slots=1), 16, "RESOURCE_LIMIT")
    for s in small:
        peer.call(type="close", session=s["session"])
    big = open_session(peer, 160, 100, "RGBA8", 3)  # 970752 of the 1 MiB shared-memory budget (--max-shm-mb 1)
    expect_error(peer.call(type="open", width=160, height=100, format="RGBA8", slots=1), 16, "RESOURCE_LIMIT")
    peer.call(type="close", session=big["session"])


def test_busy(peer: Peer) -> None:
    """Section 5: beyond max_queue waiting frames, process/submit get BUSY at once; every request gets one reply.
    Section 4, statistics: the frames done and refused are counted."""
    before = peer.call(type="stats")
    pixels = frame(160, 100, "RGB8", seed=3)
    reqs = {peer.send(type="process", width=160, height=100, format="RGB8", frame=i, pixels=pixels)
            for i in range(20)}
    kinds = []
    for _ in range(len(reqs)):
        reply = peer.recv(timeout=30)
        reqs.discard(reply["req"])
        kinds.append(reply["type"] if reply["type"] != "error" else reply["name"])
    assert not reqs and set(kinds) == {"result", "BUSY"} and kinds.count("result") >= LIMITS["max_queue"]
    assert peer.silent(0.2)
    after = peer.call(type="stats")
    assert after["frames_done"] - before["frames_done"] == kinds.count("result")
    assert after["frames_busy"] - before["frames_busy"] == kinds.count("BUSY")
    assert after["frames_failed"] == before["frames_failed"] and after["queued"] == 0
    assert after["recent_frames"] == min(1024, before["recent_frames"] + kinds.count("result"))
    assert after["uptime_ms"] >= before["uptime_ms"] and after["instance"] == before["instance"]


@pytest.mark.parametrize("payload", [
    b"\xc1",  # a byte msgpack never uses
    b"",
    msgpack.packb([1, "ping", 3]),  # not a map
    msgpack.packb({"v": 1, "type": "ping", "req": 5, "sessions": []}) + b"\x00",  # trailing bytes
    msgpack.packb({1: 1, "type": "ping", "req": 5, "sessions": []}),  # a key that is not a str
    msgpack.packb({"v": 1, b"type": "ping", "req": 5, "sessions": []}, use_bin_type=True),  # a bin key
    [b"extra", msgpack.packb({"v": 1, "type": "ping", "req": 5, "sessions": []})],  # two frames from a DEALER
    b"\x84" + b"".join(map(msgpack.packb, ["v", 1, "type", "ping", "req", 5, "sessions"]))
    + b"\x91" * 990 + b"\x90",  # arrays nested 990 deep: Python's recursion limit, were it walked recursively
    msgpack.packb({"v": 1, "type": "ping", "req": 5, "sessions": [[{}] * 1000] * 8}),  # thousands of empty maps
    [b"x"] * 5000,  # ZeroMQ bounds each frame, not their count: refused before any is copied out
], ids=["garbage", "empty", "array", "trailing", "int-key", "bin-key", "two-frames", "deep", "many-maps",
        "many-frames"])
def test_malformed(peer: Peer, payload: bytes | list[bytes]) -> None:
    peer.send_raw(payload)
    expect_error(peer.recv(), 1, "MALFORMED", req=0)


def test_version(peer: Peer) -> None:
    expect_error(peer.call(type="ping", sessions=[], v=2), 2, "VERSION_MISMATCH")
    expect_error(peer.call(type="ping", sessions=[], v=True), 4, "INVALID_FIELD")  # a bool is not an int
    req = next(peer.ids)
    peer.send_raw(msgpack.packb({"type": "ping", "req": req, "sessions": []}))
    expect_error(peer.recv(), 4, "INVALID_FIELD", req=req)


@pytest.mark.parametrize("kind", ["bogus", "welcome", "PING"])
def test_unknown_type(peer: Peer, kind: str) -> None:
    expect_error(peer.call(type=kind, sessions=[]), 3, "UNKNOWN_TYPE")


INVALID = {
    "unknown key": {"type": "ping", "sessions": [], "extra": 1},
    "missing key": {"type": "open", "width": 16, "height": 16, "format": "RGB8"},
    "missing type": {"sessions": []},
    "str for int": {"type": "open", "width": "16", "height": 16, "format": "RGB8", "slots": 1},
    "float for int": {"type": "open", "width": 16.0, "height": 16, "format": "RGB8", "slots": 1},
    "bool for int": {"type": "open", "width": True, "height": 16, "format": "RGB8", "slots": 1},
    "nil": {"type": "open", "width": None, "height": 16, "format": "RGB8", "slots": 1},
    "bin for str": {"type": "hello", "client": b"bin"},
    "str for bin": {"type": "process", "width": 16, "height": 16, "format": "RGB8", "frame": 1, "pixels": "x" * 768},
    "map for array": {"type": "ping", "sessions": {"a": 1}},
    "width 0": {"type": "open", "width": 0, "height": 16, "format": "RGB8", "slots": 1},
    "width 65536": {"type": "open", "width": 65536, "height": 16, "format": "RGB8", "slots": 1},
    "slots 0": {"type": "open", "width": 16, "height": 16, "format": "RGB8", "slots": 0},
    "slots 65": {"type": "open", "width": 16, "height": 16, "format": "RGB8", "slots": 65},
    "format empty": {"type": "open", "width": 16, "height": 16, "format": "", "slots": 1},
    "format 17 chars": {"type": "open", "width": 16, "height": 16, "format": "R" * 17, "slots": 1},
    "client 65 chars": {"type": "hello", "client": "c" * 65},
    "session 0": {"type": "close", "session": 0},
    "session 2^31": {"type": "close", "session": 2**31},
    "negative frame": {"type": "submit", "session": 1, "slot": 0, "frame": -1},
    "257 sessions": {"type": "ping", "sessions": list(range(1, 258))},
    "pixels too short": {"type": "process", "width": 16, "height": 16, "format": "RGB8", "frame": 1,
                         "pixels": bytes(767)},
    "pixels too long": {"type": "process", "width": 16, "height": 16, "format": "RGB8", "frame": 1,
                        "pixels": bytes(769)},
}


@pytest.mark.parametrize("fields", INVALID.values(), ids=INVALID.keys())
def test_invalid_field(peer: Peer, fields: dict[str, Any]) -> None:
    expect_error(peer.call(**fields), 4, "INVALID_FIELD")


def test_inline_pixels_of_the_wrong_length_are_named_with_the_size_needed(peer: Peer) -> None:
    """Section 4, process: pixels must be exactly height * width * channels bytes; the error says how many came and
    how many the frame needs (a client sending a padded or cropped buffer learns which), and the daemon serves on."""
    for sent, fmt in ((10, "RGB8"), (32 * 32 * 3, "RGBA8")):  # too few; an RGB frame sent as RGBA
        reply = peer.call(type="process", width=32, height=32, format=fmt, frame=1, pixels=bytes(sent))
        expect_error(reply, 4, "INVALID_FIELD")
        needed = 32 * 32 * CHANNELS[fmt]
        assert f"pixels has {sent} bytes; 32x32 {fmt} needs {needed}" in reply["message"], reply
    pixels = frame(32, 32, "RGB8", seed=6)
    assert len(process(peer, 32, 32, "RGB8", pixels)) == 64 * 64 * 3


@pytest.mark.parametrize("req", [-1, "7", 1.5])
def test_unreadable_req_is_answered_with_req_0(peer: Peer, req: Any) -> None:
    peer.send_raw(msgpack.packb({"v": 1, "type": "ping", "req": req, "sessions": []}))
    expect_error(peer.recv(), 4, "INVALID_FIELD", req=0)


def test_oversize_message_gets_no_reply(peer: Peer, daemon: Daemon) -> None:
    """Section 1: a message above max_pixels * 4 + 4096 bytes drops the connection without a reply."""
    limit = LIMITS["max_pixels"] * 4 + 4096
    peer.send(type="process", width=100, height=100, format="RGB8", frame=1, pixels=bytes(limit))
    assert peer.silent(1.0)
    with raw_socket(daemon.endpoint) as sock:
        assert Peer(sock).call(type="ping", sessions=[])["type"] == "pong"


def test_lease_expiry_and_renewal(peer: Peer) -> None:
    """Section 5.6: a session not named for lease_ms is closed and unlinked; ping renews a lease."""
    idle, kept = open_session(peer, 16, 16), open_session(peer, 16, 16)
    deadline = time.monotonic() + LIMITS["lease_ms"] / 1000 + 1.0
    while time.monotonic() < deadline:
        assert peer.call(type="ping", sessions=[kept["session"]])["sessions"] == [kept["session"]]
        time.sleep(0.3)
    pong = peer.call(type="ping", sessions=[idle["session"], kept["session"]])
    assert pong["sessions"] == [kept["session"]]
    assert not _shm_path(idle["input"]).exists() and not _shm_path(idle["output"]).exists()
    expect_error(peer.call(type="submit", session=idle["session"], slot=0, frame=1), 10, "UNKNOWN_SESSION")
    assert peer.call(type="close", session=kept["session"])["type"] == "closed"


def test_shutdown_answers_queued_frames(checkpoint: pathlib.Path) -> None:
    """Section 7, SHUTTING_DOWN: frames still queued when the daemon stops get this error."""
    args = ["--device", "cpu", "--threads", "1", "--max-width", "320", "--max-height", "200", "--max-queue", "16"]
    with run_server("--checkpoint", str(checkpoint), *args) as d, raw_socket(d.endpoint) as sock:
        peer = Peer(sock)
        pixels = frame(320, 200, "RGB8", seed=4)
        reqs = {peer.send(type="process", width=320, height=200, format="RGB8", frame=i, pixels=pixels)
                for i in range(10)}
        first = peer.recv(timeout=30)  # the daemon has read the whole burst by now
        d.proc.send_signal(signal.SIGTERM)
        replies = [first]
        while not peer.silent(3.0):
            replies.append(peer.recv())
        assert {r["req"] for r in replies} <= reqs
        assert any(r["type"] == "error" and r["name"] == "SHUTTING_DOWN" and r["code"] == 21 for r in replies)
        assert d.proc.wait(20) == 0

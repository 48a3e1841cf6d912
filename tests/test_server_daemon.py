"""One daemon (small random rlfn_s checkpoint, CPU, fp32) serves this whole module: results, errors, abuse."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
from collections.abc import Iterator

import cv2
import msgpack
import numpy as np
import pytest
import torch
import zmq

from upscaler_server import protocol
from upscaler_server.client import UpscalerClient
from upscaler_server.config import ENDPOINT_ENV, default_endpoint, runtime_dir
from upscaler_server.engine import Engine, create_engine
from upscaler_server.errors import ConfigError, ErrorCode, SessionError

from server_utils import REPO, Daemon, exchange, make_checkpoint, raw_socket, request, run_server

RNG = np.random.default_rng(11)
LIMITS = ["--max-width", "512", "--max-height", "512", "--max-pixels", "200000", "--max-slots", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "student.safetensors")


@pytest.fixture(scope="module")
def daemon(checkpoint: pathlib.Path) -> Iterator[Daemon]:
    with run_server("--checkpoint", str(checkpoint), "--device", "cpu", "--threads", "1", *LIMITS) as d:
        yield d


@pytest.fixture(scope="module")
def engine(checkpoint: pathlib.Path) -> Iterator[Engine]:
    threads = torch.get_num_threads()
    yield create_engine(checkpoint=checkpoint, device="cpu", precision="fp32", threads=1)
    torch.set_num_threads(threads)


@pytest.fixture
def client(daemon: Daemon) -> Iterator[UpscalerClient]:
    with UpscalerClient(daemon.endpoint, timeout=30, name="pytest") as c:
        yield c


def test_welcome_describes_the_daemon(client: UpscalerClient) -> None:
    info = client.info
    assert client.model.startswith("rlfn student") and (client.scale, client.device) == (2, "cpu")
    assert info.precision == "fp32" and not info.random_weights and info.min_size == 15
    assert info.versions == [protocol.VERSION] and set(info.formats) == set(protocol.PIXEL_FORMATS)
    assert (info.max_width, info.max_height, info.max_pixels, info.max_slots) == (512, 512, 200000, 4)


def test_daemon_cli_and_engine_are_bit_exact(client: UpscalerClient, engine: Engine, checkpoint: pathlib.Path,
                                             tmp_path: pathlib.Path) -> None:
    rgb = RNG.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    in_process = engine.run(rgb)
    np.testing.assert_array_equal(client.upscale(rgb), in_process)
    cv2.imwrite(str(tmp_path / "frame.png"), rgb[..., ::-1])
    cmd = [sys.executable, "-m", "upscaler_server.upscale", "--checkpoint", str(checkpoint), "--device", "cpu",
           "--threads", "1", str(tmp_path / "frame.png"), "-o", str(tmp_path / "out")]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=120).returncode == 0
    offline = cv2.imread(str(tmp_path / "out" / "frame.png"), cv2.IMREAD_UNCHANGED)[..., ::-1]
    np.testing.assert_array_equal(offline, in_process)


@pytest.mark.parametrize("fmt", ["RGBA8", "BGRA8", "BGR8"])
def test_pixel_formats_through_the_daemon(client: UpscalerClient, engine: Engine, fmt: str) -> None:
    frame = RNG.integers(0, 256, (17, 23, protocol.PIXEL_FORMATS[fmt].channels), dtype=np.uint8)
    np.testing.assert_array_equal(client.upscale(frame, fmt), engine.run(frame, fmt))


def test_pipelined_zero_copy_session(client: UpscalerClient, engine: Engine) -> None:
    session = client.open_session(40, 24, "RGBA8", slots=3)
    frames = [RNG.integers(0, 256, (24, 40, 4), dtype=np.uint8) for _ in range(3)]
    for slot, frame in enumerate(frames):
        session.input(slot)[...] = frame
        session.submit(slot, frame=100 + slot)
    assert session.in_flight == [0, 1, 2]
    for slot, frame in enumerate(frames):
        result = session.collect()
        assert (result.slot, result.frame) == (slot, 100 + slot)
        assert result.timings.total_us >= result.timings.infer_us > 0
        np.testing.assert_array_equal(result.output, engine.run(frame, "RGBA8"))
    for _ in range(2):  # a collected slot is free again, over and over
        session.submit(1)
        assert session.collect().slot == 1
    session.close()


def test_inline_pixels(client: UpscalerClient, engine: Engine) -> None:
    frame = RNG.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(client.upscale_inline(frame), engine.run(frame))


def test_close_removes_segments(client: UpscalerClient, daemon: Daemon) -> None:
    before = set(daemon.segments())
    session = client.open_session(32, 32, "RGB8", slots=2)
    created = set(daemon.segments()) - before
    assert len(created) == 2
    for name in created:
        assert (pathlib.Path("/dev/shm") / name).stat().st_mode & 0o777 == 0o600
    session.close()
    assert not set(daemon.segments()) & created


def _code(reply: dict[str, object]) -> str:
    assert reply["type"] == "error", reply
    return str(reply["name"])


def test_client_mistakes_get_error_replies(daemon: Daemon) -> None:
    with raw_socket(daemon.endpoint) as sock:
        opened = request(sock, type="open", req=1, width=400, height=400, format="RGB8", slots=2)
        assert opened["type"] == "opened" and opened["req"] == 1
        sid = opened["session"]
        assert _code(request(sock, type="submit", req=2, session=sid, slot=2, frame=0)) == "SLOT_OUT_OF_RANGE"
        assert _code(request(sock, type="submit", req=3, session=sid ^ 1, slot=0, frame=0)) == "UNKNOWN_SESSION"
        # Two submits of one slot back to back: the second arrives while the first is on the engine.
        sock.send(msgpack.packb({"v": 1, "type": "submit", "req": 4, "session": sid, "slot": 0, "frame": 1}))
        second = request(sock, type="submit", req=5, session=sid, slot=0, frame=2)
        assert _code(second) == "SLOT_IN_FLIGHT" and second["req"] == 5
        assert sock.poll(30000) and msgpack.unpackb(sock.recv())["type"] == "done"
        too_big = request(sock, type="open", req=6, width=512, height=400, format="RGB8", slots=1)
        assert _code(too_big) == "SIZE_TOO_LARGE"
        assert _code(request(sock, type="open", req=7, width=14, height=64, format="RGB8", slots=1)) == "SIZE_TOO_SMALL"
        assert _code(request(sock, type="open", req=8, width=64, height=64, format="YUV8", slots=1)) == \
            "UNSUPPORTED_FORMAT"
        assert _code(request(sock, type="open", req=9, width=64, height=64, format="RGB8", slots=5)) == "RESOURCE_LIMIT"
        assert _code(request(sock, type="hello", v=2, req=10, client="x")) == "VERSION_MISMATCH"
        short = request(sock, type="process", req=11, width=16, height=16, format="RGB8", frame=0, pixels=b"\0" * 10)
        assert _code(short) == "INVALID_FIELD"
        assert request(sock, type="close", req=12, session=sid)["type"] == "closed"
        assert _code(request(sock, type="submit", req=13, session=sid, slot=0, frame=0)) == "UNKNOWN_SESSION"
        assert _code(exchange(sock, [b"a", b"b", b"c"])) == "MALFORMED"


def test_req_socket_envelope(daemon: Daemon) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    sock.connect(daemon.endpoint)
    try:
        sock.send(protocol.encode(protocol.Ping(req=5, sessions=[])))
        assert sock.poll(10000)
        assert protocol.decode(sock.recv(), "reply") == protocol.Pong(req=5, sessions=[], instance=_instance(daemon))
    finally:
        sock.close(linger=0)
        ctx.term()


def _instance(daemon: Daemon) -> str:
    with raw_socket(daemon.endpoint) as sock:
        return str(request(sock, type="ping", req=1, sessions=[])["instance"])


def _malformed(i: int) -> bytes | list[bytes]:
    valid = protocol.encode(protocol.Open(req=i, width=32, height=32, format="RGB8", slots=1))
    kinds: list[bytes | list[bytes]] = [
        RNG.integers(0, 256, int(RNG.integers(1, 64)), dtype=np.uint8).tobytes(),
        valid[: int(RNG.integers(1, len(valid)))],
        msgpack.packb({"v": 1, "type": "open", "req": i, "width": "wide", "height": 1, "format": 1, "slots": []}),
        msgpack.packb({"v": 1, "type": "submit", "req": i, "session": -1, "slot": 2**64 - 1, "frame": 0}),
        msgpack.packb({"v": 1, "type": "ping", "req": i, "sessions": [[[[[]]]]]}),
        msgpack.packb([i, "open", {"width": 1}]),
        b"\x91" * 5000,  # deeply nested arrays
        msgpack.packb({"v": 1, "type": "process", "req": i, "width": 1, "height": 1, "format": "RGB8", "frame": 0,
                       "pixels": 3.5}),
        msgpack.packb({"v": 1, "type": "submit", "req": i, "session": 1, "slot": 0, "frame": 0, "x": None}),
        msgpack.packb({"v": None, "type": None, "req": None}),
        [b"", b"", b"extra frames"],
    ]
    return kinds[i % len(kinds)]


def test_a_thousand_malformed_messages_leave_the_daemon_serving(daemon: Daemon, engine: Engine) -> None:
    with raw_socket(daemon.endpoint) as sock:
        for i in range(1000):
            payload = _malformed(i)
            if isinstance(payload, list):
                sock.send_multipart(payload)
            else:
                sock.send(payload)
        replies = []
        while len(replies) < 1000 and sock.poll(10000):
            replies.append(msgpack.unpackb(sock.recv_multipart()[-1], raw=False))
    assert len(replies) == 1000, "every malformed message must get an error reply"
    assert {r["type"] for r in replies} == {"error"}
    assert {r["name"] for r in replies} <= {"MALFORMED", "INVALID_FIELD", "UNKNOWN_SESSION"}
    assert daemon.proc.poll() is None
    frame = RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    with UpscalerClient(daemon.endpoint, timeout=30) as client:
        np.testing.assert_array_equal(client.upscale(frame), engine.run(frame))


def test_two_clients_in_parallel_get_their_own_frames(daemon: Daemon, engine: Engine) -> None:
    frames = {who: [RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(4)] for who in ("a", "b")}
    expected = {who: [engine.run(f) for f in fs] for who, fs in frames.items()}
    got: dict[str, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def run(who: str) -> None:
        try:
            with UpscalerClient(daemon.endpoint, timeout=30, name=who) as client:
                got[who] = [client.upscale(f) for f in frames[who]]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(who,)) for who in frames]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for who in frames:
        for out, ref in zip(got[who], expected[who], strict=True):
            np.testing.assert_array_equal(out, ref)


def test_client_side_misuse_is_caught(client: UpscalerClient) -> None:
    session = client.open_session(16, 16, "RGB8", slots=1)
    with pytest.raises(SessionError) as info:
        session.submit(1)
    assert info.value.code == ErrorCode.SLOT_OUT_OF_RANGE
    with pytest.raises(SessionError, match="no frame in flight") as info:
        session.collect()
    assert info.value.code == ErrorCode.INTERNAL  # no slot was named: SLOT_OUT_OF_RANGE would mislead
    # a frame of the wrong shape is an argument wrong in itself: ValueError from the client and from a session alike
    with pytest.raises(ValueError, match="uint8 arrays"):
        client.upscale(np.zeros((16, 16, 2), np.uint8))
    for empty in ((0, 64, 3), (64, 0, 4)):  # were ProtocolError, as if the daemon had refused them
        with pytest.raises(ValueError, match="with H, W > 0"):
            client.upscale(np.zeros(empty, np.uint8))
    with pytest.raises(ValueError, match="does not match session"):
        session.upscale(np.zeros((16, 8, 3), np.uint8))


# --- the default endpoint's folder ----------------------------------------------------------------------------------


def test_a_runtime_dir_that_is_not_private_names_its_owner_and_mode(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: pathlib.Path) -> None:
    """It said only "must be a directory owned by uid N with mode 0700; remove it or set XDG_RUNTIME_DIR", also when
    another user had made it, whose folder this user cannot remove from sticky /tmp (from the security review).
    Another user is faked through os.geteuid (tests cannot switch users)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    folder = tmp_path / "takdsr"
    folder.mkdir(mode=0o700)
    folder.chmod(0o755)
    real = os.geteuid()
    with pytest.raises(ConfigError) as raised:
        default_endpoint()
    assert str(raised.value) == (f"{folder} must be a directory owned by uid {real} with mode 0700, but it is a "
                                 f"directory owned by uid {real} with mode 0755; remove it or set XDG_RUNTIME_DIR")
    folder.chmod(0o700)
    assert runtime_dir() == folder
    with monkeypatch.context() as patch, pytest.raises(ConfigError) as raised:
        patch.setattr(os, "geteuid", lambda: real + 1)
        runtime_dir()
    said = str(raised.value)
    assert said.startswith(f"{folder} must be a directory owned by uid {real + 1} with mode 0700, but it is a "
                           f"directory owned by uid {real} with mode 0700; another user made it and only they (or an "
                           "administrator) can remove it"), said
    assert "set XDG_RUNTIME_DIR to a private folder of yours, or $TAKDSR_UPSCALER_ENDPOINT" in said
    assert "remove it or" not in said
    folder.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    folder.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="but it is a symbolic link owned by uid"):
        runtime_dir()


def test_an_xdg_runtime_dir_that_does_not_exist_is_named(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: pathlib.Path) -> None:
    """$XDG_RUNTIME_DIR kept from another login (su, a tmux server) names a folder that is gone: the message said only
    "No such file or directory" of <it>/takdsr, a path nobody typed. Now it names the variable and the ways round it."""
    gone = tmp_path / "run-user-4242"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(gone))
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    with pytest.raises(ConfigError) as raised:
        default_endpoint()
    said = str(raised.value)
    assert said.startswith(f"cannot create the runtime directory {gone / 'takdsr'}: $XDG_RUNTIME_DIR ({gone}) does "
                           "not exist; unset it or set it to a folder of yours, or set $TAKDSR_UPSCALER_ENDPOINT"), said
    assert not gone.exists()  # nothing made for it
    gone.mkdir(mode=0o700)
    assert runtime_dir() == gone / "takdsr"


def test_a_long_xdg_runtime_dir_is_named_when_the_socket_path_would_be_too_long(monkeypatch: pytest.MonkeyPatch,
                                                                                 tmp_path: pathlib.Path) -> None:
    """A long $XDG_RUNTIME_DIR made the default socket path longer than a Unix socket's 107 bytes: the daemon said
    "an ipc path may be at most 107 bytes long...; choose a shorter one" of a path nobody chose, and the client "File
    name too long" (from the security review). Now both name the variable and the ways round it."""
    xdg = tmp_path / ("x" * 100)
    xdg.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    socket_path = xdg / "takdsr" / "upscaler.sock"
    expected = (f"the default socket path {socket_path} is {len(str(socket_path))} bytes long, more than a Unix "
                "socket's 107, because $XDG_RUNTIME_DIR is long: set $TAKDSR_UPSCALER_ENDPOINT to a shorter ipc:// "
                "path (or pass one with --endpoint), or use a shorter XDG_RUNTIME_DIR")
    for call in (default_endpoint, UpscalerClient):
        with pytest.raises(ConfigError) as raised:
            call()
        assert str(raised.value) == expected
    assert not (xdg / "takdsr").exists()  # nothing made for it
    daemon = subprocess.run([sys.executable, "-m", "upscaler_server", "--backend", "nearest"], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert daemon.returncode == 2 and expected in daemon.stderr, daemon.stderr


def test_the_protocol_doc_says_a_loopback_port_is_open_to_every_local_user() -> None:
    """Section 1 said only that anyone who reaches a tcp port can "open, use and close sessions": not that on a shared
    machine every local user reaches a loopback port, and others cannot close a session, which belongs to its
    connection (from the security review)."""
    section = (REPO / "docs" / "protocol.md").read_text().split("## 1. Transport")[1].split("## 2.")[0]
    assert "any local user can connect to a loopback port" in section
    assert "Only an `ipc://` endpoint in a 0700 folder is private to its user" in section
    assert "close sessions" not in section and "cannot submit to it or close it" in section

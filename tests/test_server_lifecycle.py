"""Daemon lifecycle, one daemon per test: signals, leases, stale segments, bad checkpoints, busy, restarts."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
import torch
import zmq

from upscaler_server import protocol
from upscaler_server.client import UpscalerClient
from upscaler_server.errors import (
    BusyError,
    ConfigError,
    ErrorCode,
    ServerUnavailableError,
    SessionError,
    SessionLostError,
    UpscalerError,
)

from server_utils import (
    REPO,
    SHM_DIR,
    STOP_TIMEOUT,
    Daemon,
    make_checkpoint,
    raw_socket,
    request,
    run_server,
    serve_here,
    shm_segments,
    short_tmpdir,
    spawn,
    stop,
    wait_ready,
)

RNG = np.random.default_rng(5)


@pytest.fixture
def short_dir() -> Iterator[pathlib.Path]:
    """A short private directory for ipc endpoints, removed afterwards."""
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _exit_of(args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run the daemon expecting it to refuse to start; its exit status and log."""
    tmp = short_tmpdir()
    try:
        proc = spawn(["--endpoint", f"ipc://{tmp}/d.sock", *args], tmp / "log")
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            pytest.fail(f"the daemon started although it should have refused: {args}")
        return proc.returncode, (tmp / "log").read_text()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_exits_zero_and_unlinks_everything(sig: int) -> None:
    with run_server("--backend", "nearest", check_clean=False) as daemon:
        client = UpscalerClient(daemon.endpoint, timeout=10)
        session = client.open_session(64, 48, "RGBA8", slots=3)
        session.input(0)[...] = 7
        session.submit(0)
        assert len(daemon.segments()) == 2
        status = stop(daemon.proc, sig)
        assert status == 0, daemon.log()
        assert daemon.segments() == []
        assert not pathlib.Path(daemon.endpoint[len("ipc://"):]).exists(), "ipc socket file left behind"
        assert not pathlib.Path(daemon.endpoint[len("ipc://"):] + ".lock").exists(), "endpoint lock file left behind"
        assert "stopped" in daemon.log()
        session.close(notify=False)
        client.close()


def test_second_signal_forces_a_clean_exit_during_a_frame() -> None:
    with run_server("--model", "rlfn_s", "--threads", "1", check_clean=False) as daemon, \
            UpscalerClient(daemon.endpoint, timeout=30) as client:
        session = client.open_session(1920, 1080, "RGB8", slots=1)
        session.submit(0)  # seconds on one CPU thread
        time.sleep(0.3)
        start = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        assert stop(daemon.proc) == 0, daemon.log()  # the second SIGTERM
        assert time.monotonic() - start < 2.0
        assert daemon.segments() == []
        assert "forced" in daemon.log()
        # the frame not waited for is answered, not left to the client's 30 s timeout and a ping nobody answers
        with pytest.raises(ServerUnavailableError, match="did not wait for this frame"):
            session.collect()
        assert time.monotonic() - start < 5.0
        session.close(notify=False)


def test_requests_sent_while_the_daemon_drains_get_shutting_down_not_silence() -> None:
    """Requests that reached the socket after the loop stopped (here: while the running frame drains) were dropped
    unread when the socket closed, and their clients waited out their whole timeouts (10 s for the C client)."""
    with run_server("--model", "rlfn_s", "--threads", "1", check_clean=False) as daemon, \
            UpscalerClient(daemon.endpoint, timeout=30) as client, raw_socket(daemon.endpoint) as sock:
        session = client.open_session(1920, 1080, "RGB8", slots=1)
        session.submit(0)  # seconds on one CPU thread: the drain waits for it
        time.sleep(0.3)
        daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        sock.send(protocol.encode(protocol.Ping(req=7, sessions=[])))
        assert sock.poll(5000, zmq.POLLIN), "no reply to a request sent during the drain"
        reply = protocol.decode(sock.recv(), "reply")
        assert isinstance(reply, protocol.Error) and reply.req == 7 and reply.name == "SHUTTING_DOWN", reply
        assert daemon.proc.wait(30) == 0, daemon.log()
        assert daemon.segments() == []
        session.close(notify=False)


def test_killed_client_is_cleaned_up_after_its_lease() -> None:
    with run_server("--model", "rlfn_s", "--threads", "1", "--lease-timeout", "1") as daemon:
        script = textwrap.dedent(f"""
            import sys, time
            from upscaler_server.client import UpscalerClient
            client = UpscalerClient({daemon.endpoint!r}, timeout=10)
            session = client.open_session(200, 150, "RGB8", slots=2)
            session.input(0)[...] = 128
            session.submit(0)          # killed while this frame is on the engine
            print("submitted", flush=True)
            time.sleep(60)
        """)
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "submitted"
            assert len(daemon.segments()) == 2
        finally:
            proc.kill()
            proc.wait(10)
        deadline = time.monotonic() + 15
        while daemon.segments() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemon.segments() == [], daemon.log()
        assert "lease expired" in daemon.log()
        with UpscalerClient(daemon.endpoint, timeout=30) as client:  # and it still serves
            assert client.upscale(np.zeros((16, 16, 3), np.uint8)).shape == (32, 32, 3)


def test_stale_segments_of_dead_daemons_are_removed_at_start() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    uid = os.geteuid()
    stale = [SHM_DIR / f"takdsr-{uid}-{dead.pid}-0000abcd-{kind}" for kind in ("in", "out")]
    alive = SHM_DIR / f"takdsr-{uid}-{os.getpid()}-0000abcd-in"  # this test process is alive: keep its segment
    for path in (*stale, alive):
        path.write_bytes(b"\0" * 4096)
    try:
        with run_server("--backend", "nearest") as daemon:
            assert not any(p.exists() for p in stale), daemon.log()
            assert alive.exists()
            assert "stale" in daemon.log()
    finally:
        for path in (*stale, alive):
            path.unlink(missing_ok=True)


def test_missing_checkpoint_stops_the_daemon(tmp_path: pathlib.Path) -> None:
    status, log = _exit_of(["--checkpoint", str(tmp_path / "absent.safetensors")])
    assert status == 3
    assert "absent.safetensors" in log and "not found" in log


def test_corrupt_checkpoint_stops_the_daemon(tmp_path: pathlib.Path) -> None:
    good = make_checkpoint(tmp_path / "good.safetensors")
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    status, log = _exit_of(["--checkpoint", str(bad)])
    assert status == 3
    assert "truncated.safetensors" in log and "cannot load checkpoint" in log


def test_missing_checkpoint_stops_the_daemon_and_says_what_to_do(tmp_path: pathlib.Path) -> None:
    status, log = _exit_of(["--checkpoint", str(tmp_path / "absent.safetensors")])
    assert status == 3
    assert "absent.safetensors not found" in log and "--checkpoint" in log and "--model" in log


def test_second_daemon_on_the_same_endpoint_refuses() -> None:
    with run_server("--backend", "nearest") as daemon:
        status, log = _exit_of(["--backend", "nearest", "--endpoint", daemon.endpoint])
        assert status == 2 and "already serves" in log
        assert "stopping" not in log and "stopped" not in log, "a daemon that never served has nothing to stop"
        with UpscalerClient(daemon.endpoint, timeout=10) as client:  # the first one still owns the endpoint
            client.ping()


def test_a_daemon_holding_the_endpoint_lock_is_never_bound_over(short_dir: pathlib.Path) -> None:
    """Two daemons started at one moment both found the socket free (the ping probe sees no socket file yet) and
    both bound: the second replaced the first's socket file, and the first served nobody. The lock file closes that
    window: while another process holds it, a daemon refuses before it binds."""
    socket_path = short_dir / "d.sock"
    with open(short_dir / "d.sock.lock", "w") as held:  # what a daemon that is still starting holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status, log = _exit_of(["--backend", "nearest", "--endpoint", f"ipc://{socket_path}"])
        assert status == 2 and "already serves" in log, log
        assert not socket_path.exists(), "bound although another daemon holds the endpoint"
        assert (short_dir / "d.sock.lock").exists(), "removed a lock file it did not hold"


def test_a_taken_endpoint_is_refused_before_the_model_loads(tmp_path: pathlib.Path, short_dir: pathlib.Path) -> None:
    """A second daemon loaded its model and measured its backends (27 s with --tune-sizes on this 2-core CPU) only to
    be refused at bind. The endpoint is checked first now: with a checkpoint that does not exist, the refusal is for
    the endpoint (2), not for the checkpoint (3)."""
    absent = ["--checkpoint", str(tmp_path / "absent.safetensors")]
    with run_server("--backend", "nearest") as daemon:
        status, log = _exit_of([*absent, "--endpoint", daemon.endpoint])
        assert status == 2 and "already serves" in log and "not found" not in log, log
    with open(short_dir / "d.sock.lock", "w") as held:  # a daemon still starting holds the lock, with no socket yet
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        status, log = _exit_of([*absent, "--endpoint", f"ipc://{short_dir}/d.sock"])
        assert status == 2 and "already serves" in log and "not found" not in log, log
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        endpoint = f"tcp://127.0.0.1:{holder.getsockname()[1]}"
        status, log = _exit_of([*absent, "--endpoint", endpoint])
        assert status == 2 and f"cannot bind {endpoint}: Address already in use" in log, log
        assert "not found" not in log, log


def test_a_daemon_that_cannot_start_leaves_nothing_at_its_endpoint(tmp_path: pathlib.Path,
                                                                    short_dir: pathlib.Path) -> None:
    """The early endpoint check takes nothing: no lock file, no socket file after a failed start."""
    status, log = _exit_of(["--checkpoint", str(tmp_path / "absent.safetensors"),
                            "--endpoint", f"ipc://{short_dir}/d.sock"])
    assert status == 3 and "not found" in log, log
    assert list(short_dir.iterdir()) == []


def test_the_early_tcp_check_leaves_the_port_free_for_the_daemon() -> None:
    """The check binds the port and lets it go; the daemon, which binds it a moment later, must still get it."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{free.getsockname()[1]}"
    with run_server("--backend", "nearest", endpoint=endpoint) as daemon, \
            UpscalerClient(daemon.endpoint, timeout=10, name="pytest") as client:
        client.ping()


def test_a_lock_file_left_by_a_killed_daemon_does_not_block_the_next(short_dir: pathlib.Path) -> None:
    endpoint = f"ipc://{short_dir}/d.sock"
    with run_server("--backend", "nearest", endpoint=endpoint, check_clean=False) as daemon:
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(STOP_TIMEOUT)
    assert (short_dir / "d.sock.lock").exists() and (short_dir / "d.sock").exists()  # what SIGKILL leaves
    with run_server("--backend", "nearest", endpoint=endpoint) as daemon, \
            UpscalerClient(daemon.endpoint, timeout=10) as client:
        client.ping()
    assert sorted(p.name for p in short_dir.iterdir()) == []


def test_busy_reply_when_the_queue_is_full() -> None:
    with run_server("--model", "rlfn_s", "--threads", "1", "--max-queue", "1") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=60) as client:
        session = client.open_session(160, 120, "RGB8", slots=4)
        for slot in range(4):
            session.submit(slot)
        outcomes = []
        for _ in range(4):
            try:
                session.collect()
                outcomes.append("done")
            except BusyError as exc:
                outcomes.append("busy")
                assert "queued" in str(exc)
        assert outcomes[0] == "done" and "busy" in outcomes, outcomes
        session.submit(0)  # busy slots are free again
        assert session.collect().slot == 0


def test_slow_frames_outlast_client_timeouts_without_resubmission(monkeypatch: pytest.MonkeyPatch) -> None:
    with run_server("--model", "rlfn_s", "--threads", "1") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=0.05, retries=200) as client:
        frame = np.zeros((150, 200, 3), np.uint8)
        session = client.open_session(200, 150, "RGB8", slots=1)
        reconnects = []
        # Closing the socket drops a reply already queued on it, so a live daemon's slow frame must be awaited as is.
        monkeypatch.setattr(client._link, "reconnect", lambda: reconnects.append(time.monotonic()))
        session.submit(0)
        assert session.collect().timings.infer_us > 50_000  # many timeouts elapsed, the same frame came back
        assert client.upscale_inline(frame).shape == (300, 400, 3)
        assert reconnects == []
        assert "Traceback" not in daemon.log()


def test_client_recovers_when_the_daemon_restarts(short_dir: pathlib.Path) -> None:
    endpoint = f"ipc://{short_dir}/d.sock"
    frame = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    expected = np.repeat(np.repeat(frame, 2, 0), 2, 1)
    with run_server("--backend", "nearest", endpoint=endpoint) as first:
        client = UpscalerClient(endpoint, timeout=5, retries=2)
        np.testing.assert_array_equal(client.upscale(frame), expected)
        old_instance = client.info.instance
    try:
        with run_server("--backend", "nearest", endpoint=endpoint) as second:
            assert second.pid != first.pid
            np.testing.assert_array_equal(client.upscale(frame), expected)  # its old session is gone: reopened
            assert client.info.instance != old_instance  # and the client said hello to the new daemon
    finally:
        client.close()


def test_a_frame_lost_with_a_killed_daemon_costs_no_timeout_once_it_is_restarted(short_dir: pathlib.Path) -> None:
    """A frame in flight when the daemon was killed (what a supervisor's Restart=on-failure restarts) stalled the next
    call a whole timeout once a new daemon listened: the client only looked whether anyone listened, and a new daemon
    never answers what was sent to the old one. The end of the connection now tells the client at once."""
    endpoint = f"ipc://{short_dir}/d.sock"
    frame = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    expected = np.repeat(np.repeat(frame, 2, 0), 2, 1)
    client: UpscalerClient | None = None
    try:
        with run_server("--backend", "nearest", endpoint=endpoint, check_clean=False) as first:
            client = UpscalerClient(endpoint, timeout=30, retries=1)
            np.testing.assert_array_equal(client.upscale(frame), expected)  # its auto session: one slot
            session = client.open_session(16, 16, "RGB8", slots=1)
            first.proc.send_signal(signal.SIGSTOP)  # neither frame is answered before the kill
            session.submit(0)
            threading.Timer(0.5, first.proc.kill).start()
            with pytest.raises(ServerUnavailableError):
                client.upscale(frame)  # the auto session's slot now holds a frame given up on
            first.proc.wait(10)
        with run_server("--backend", "nearest", endpoint=endpoint):  # nobody waited while no daemon listened
            start = time.monotonic()
            with pytest.raises(SessionLostError):
                session.collect()
            np.testing.assert_array_equal(client.upscale(frame), expected)  # waited for its slot's lost frame
            assert time.monotonic() - start < 10  # about 1 s; was 30 s for each
    finally:
        if client is not None:
            client.close()


def test_a_request_sent_after_an_unnoticed_restart_is_not_taken_for_lost(short_dir: pathlib.Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what was in flight when the connection ended is lost with it. An open sent to the restarted daemon before
    the client had looked was taken for lost too: the client reconnected and sent it again, and the daemon opened a
    session for each (the client closes the first when its late `opened` comes)."""
    endpoint = f"ipc://{short_dir}/d.sock"
    client: UpscalerClient | None = None
    try:
        with run_server("--backend", "nearest", endpoint=endpoint, check_clean=False) as first:
            client = UpscalerClient(endpoint, timeout=30, retries=1)
            first.proc.kill()
            first.proc.wait(10)
        with run_server("--backend", "nearest", endpoint=endpoint):
            reconnects: list[int] = []
            original_reconnect = client._link.reconnect
            monkeypatch.setattr(client._link, "reconnect", lambda: reconnects.append(1) or original_reconnect())
            session = client.open_session(16, 16, "RGB8", slots=1)  # held: a dropped one is closed at the next call
            assert reconnects == [] and client.stats().sessions == 1 and not session.closed
    finally:
        if client is not None:
            client.close()


def test_slow_frames_after_a_restart_are_awaited_not_lost(short_dir: pathlib.Path) -> None:
    """After a restart, a frame slower than the client's timeout still comes back: the client compares the ping's
    daemon with the new one, not with the one it first said hello to."""
    endpoint = f"ipc://{short_dir}/d.sock"
    small, large = np.zeros((16, 16, 3), np.uint8), np.zeros((150, 200, 3), np.uint8)
    with run_server("--model", "rlfn_s", "--threads", "1", endpoint=endpoint):
        client = UpscalerClient(endpoint, timeout=5, retries=2)
        client.upscale(small)
    try:
        with run_server("--model", "rlfn_s", "--threads", "1", endpoint=endpoint) as second:
            client.timeout, client.retries = 0.02, 500  # each 150x200 frame takes many timeouts on one thread
            for _ in range(2):
                assert client.upscale(large).shape == (300, 400, 3)
            assert "Traceback" not in second.log()
    finally:
        client.close()


def test_a_frame_given_up_on_keeps_its_slot_until_it_finishes() -> None:
    """collect() that times out leaves the frame running on the daemon: submitting its slot again gets the daemon's
    SLOT_IN_FLIGHT while it runs (the daemon decides, so a lost late reply cannot block the slot for good), the next
    upscale waits for it, and its late reply does not linger in the mailbox."""
    with run_server("--model", "rlfn_s", "--threads", "1") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=0.02, retries=0) as client:
        session = client.open_session(200, 150, "RGB8", slots=1)
        session.submit(0)
        with pytest.raises(ServerUnavailableError, match="got no reply"):
            session.collect()
        assert session.free_slot() is None  # no late reply yet: the client does not pick the slot by itself
        session.submit(0)
        client.timeout, client.retries = 30, 2
        with pytest.raises(SessionError, match="reply before submitting it again"):
            session.collect()
        assert session.upscale(np.zeros((150, 200, 3), np.uint8)).shape == (300, 400, 3)
        client.timeout, client.retries = 0.02, 0
        with pytest.raises(ServerUnavailableError):  # an inline frame given up on: its late result must not stay
            client.upscale_inline(np.zeros((150, 200, 3), np.uint8))
        time.sleep(1.0)
        client.ping()  # reads the late result off the socket: it must be dropped, not kept
        assert client._link._mailbox == {} and client._link._waiting == set()


def test_closed_sessions_and_clients_say_so() -> None:
    with run_server("--backend", "nearest") as daemon:
        client = UpscalerClient(daemon.endpoint, timeout=5)
        session = client.open_session(32, 24, "RGB8", slots=1)
        session.close()
        for call in (lambda: session.input(0), lambda: session.output(0), session.collect,
                     lambda: session.upscale(np.zeros((24, 32, 3), np.uint8))):  # fmt: skip
            with pytest.raises(SessionLostError, match="is closed") as info:  # what the daemon's reply raises
                call()
            assert info.value.code == ErrorCode.UNKNOWN_SESSION
        client.close()
        with pytest.raises(UpscalerError, match="UpscalerClient is closed") as info:
            client.ping()
        assert info.value.code == ErrorCode.INTERNAL  # the client's own error: no daemon reply has this code
        with pytest.raises(UpscalerError, match="UpscalerClient is closed"):
            client.upscale(np.zeros((24, 32, 3), np.uint8))


def test_a_bad_endpoint_is_a_clear_error_and_leaks_nothing() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(ConfigError, match="cannot connect to 'bogus'"):
            UpscalerClient("bogus")
    assert len(os.listdir("/proc/self/fd")) <= before + 1


def test_unreachable_daemon_raises_instead_of_hanging() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # free once closed: nobody listens there
    start = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="no reply"):
        UpscalerClient(f"tcp://127.0.0.1:{port}", timeout=0.2, retries=1)
    assert time.monotonic() - start < 5


def test_no_daemon_behind_an_ipc_path_is_reported_at_once(short_dir: pathlib.Path) -> None:
    """No socket file, or one a killed daemon left behind: said at once, not after every attempt's timeout (5 s x 2
    here, 10 s x 4 by default)."""
    stale = short_dir / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()  # the file stays, nobody listens: what SIGKILL leaves
    plain_file = short_dir / "passwd"  # was "left by a daemon that is no longer running" too
    plain_file.write_text("root:x:0:0\n")
    for path, why in ((short_dir / "nobody.sock", "does not exist"), (stale, "no longer running"),
                      (plain_file, "is not a socket: check the endpoint")):  # fmt: skip
        start = time.monotonic()
        with pytest.raises(ServerUnavailableError, match=f"no upscaler daemon at ipc://{path}: .*{why}"):
            UpscalerClient(f"ipc://{path}", timeout=5, retries=1)
        assert time.monotonic() - start < 5


@pytest.mark.parametrize("after", [0.3, 1.0])
def test_sigterm_during_start_up_still_exits_zero(short_dir: pathlib.Path, tmp_path: pathlib.Path,
                                                  after: float) -> None:
    """Stopped while torch is still loading. Cut short in the middle of its import, torch had not set its loggers up,
    and its exit handlers logged "FakeTensor cache stats" at INFO into the daemon's log."""
    proc = spawn(["--endpoint", f"ipc://{short_dir}/d.sock"], tmp_path / "log")
    time.sleep(after)  # torch is still loading
    assert stop(proc) == 0, (tmp_path / "log").read_text()
    assert shm_segments(proc.pid) == []
    log = (tmp_path / "log").read_text()
    assert " torch." not in log, log  # (a faster machine may have started already at 1 s: no torch line either)


def test_a_signal_during_slow_start_up_ends_it_before_anything_is_bound(short_dir: pathlib.Path,
                                                                          tmp_path: pathlib.Path) -> None:
    """--tune-sizes measures each size for a while (TensorRT builds take minutes): a stop asked for then must not wait
    for every size, nor bind the endpoint and log a ready line for a supervisor to believe."""
    sizes = ["96x64", "112x64", "128x64", "144x64", "160x64", "176x64", "192x64", "208x64"]
    log_path = tmp_path / "log"
    proc = spawn(["--endpoint", f"ipc://{short_dir}/d.sock", "--device", "cpu", "--threads", "1", "--backend", "auto",
                  "--auto-backends", "eager,onnxruntime", "--cache-dir", str(tmp_path / "cache"), "--tune-sizes",
                  *sizes], log_path)  # two candidates on any CPU: fp32 eager alone is not measured
    deadline = time.monotonic() + 120
    while "auto backend for" not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stop(proc, signal.SIGINT) == 0, log_path.read_text()
    log = log_path.read_text()
    assert "stopped during start-up (SIGINT): nothing was bound" in log
    assert log.count("auto backend for") < len(sizes), log
    assert "upscaler ready" not in log and "Traceback" not in log
    assert not (short_dir / "d.sock").exists() and not (short_dir / "d.sock.lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_after_the_shutdown_leaves_the_exit_status_zero(sig: int) -> None:
    """From the concurrency review: after "stopped" the interpreter still takes a moment to exit (torch's teardown),
    and Python puts the default handlers back for it, so a second Ctrl-C or `kill` then killed the daemon by that
    signal (143, 130), its work all done. Signals after "stopped" are sent until it exits."""
    with run_server("--backend", "nearest", check_clean=False) as daemon:
        daemon.proc.send_signal(sig)
        deadline = time.monotonic() + 20
        while "stopped" not in daemon.log() and time.monotonic() < deadline:
            time.sleep(0.005)
        while daemon.proc.poll() is None and time.monotonic() < deadline:
            daemon.proc.send_signal(sig)
            time.sleep(0.005)
        assert daemon.proc.wait(5) == 0, daemon.log()


def test_request_stop_after_serve_returned_writes_into_no_file(short_dir: pathlib.Path) -> None:
    """From the concurrency review: the wake-up pipe was closed at shutdown but its numbers kept, so a later
    request_stop() (a late signal, an embedding program's own stop) wrote a NUL byte into whatever file had been
    opened under that number since."""
    from upscaler_server.config import Config
    from upscaler_server.engine import NearestEngine
    from upscaler_server.server import Server

    server = Server(Config(endpoint=f"ipc://{short_dir}/d.sock"), NearestEngine())
    wake_w = server._wake_w
    threading.Timer(0.5, server.request_stop).start()  # served for real: bound, then stopped
    server.serve()
    reused = os.open(short_dir / "reused", os.O_RDWR | os.O_CREAT)
    try:
        if reused != wake_w:
            os.dup2(reused, wake_w)  # the number the pipe had, now a file of ours
        server.request_stop()
        assert (short_dir / "reused").read_bytes() == b""
    finally:
        os.close(reused)
        if reused != wake_w:
            os.close(wake_w)


def test_the_daemon_and_the_offline_cli_start_from_a_folder_holding_a_models_folder(short_dir: pathlib.Path) -> None:
    """From the operations review: `python -m` puts the working folder first on sys.path, so a `models` folder there
    ($HOME, where systemd runs user units) was imported instead of the project's, and the daemon failed to start
    with a traceback ("module 'models' has no attribute 'DEFAULT_STUDENT_PATH'"), over and over under
    Restart=on-failure."""
    (short_dir / "models").mkdir()
    (short_dir / "models" / "notes.txt").write_text("a user's own folder")
    cv2.imwrite(str(short_dir / "frame.png"), np.full((20, 24, 3), 90, np.uint8))
    offline = subprocess.run([sys.executable, "-m", "upscaler_server.upscale", "--device", "cpu", "--threads", "1",
                              "frame.png", "-o", "out"], cwd=short_dir, capture_output=True, text=True, timeout=120)
    assert offline.returncode == 0, offline.stderr
    assert cv2.imread(str(short_dir / "out" / "frame.png")).shape == (40, 48, 3)
    with open(short_dir / "log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "upscaler_server", "--threads", "1", "--endpoint",
                                 f"ipc://{short_dir}/d.sock"], stdout=log, stderr=subprocess.STDOUT, cwd=short_dir)
    daemon = Daemon(proc, f"ipc://{short_dir}/d.sock", short_dir / "log")
    try:
        wait_ready(daemon)
        assert "weights=" in daemon.log() and "RANDOM" not in daemon.log()  # the bundled student
    finally:
        assert stop(proc) == 0, daemon.log()


def test_a_stop_asked_for_before_serve_binds_nothing(short_dir: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    from upscaler_server.config import Config
    from upscaler_server.engine import NearestEngine
    from upscaler_server.server import Server

    server = Server(Config(endpoint=f"ipc://{short_dir}/d.sock"), NearestEngine())
    server.request_stop()  # a signal between the engine's set-up and serve()
    with caplog.at_level("INFO", logger="upscaler_server"):
        server.serve()
    assert [r.getMessage() for r in caplog.records] == ["stopped during start-up: nothing was bound"]
    assert list(short_dir.iterdir()) == []


def test_a_daemon_started_under_nohup_outlives_a_hang_up(short_dir: pathlib.Path) -> None:
    """SIGHUP stops the daemon as SIGTERM does, unless it was started with SIGHUP ignored (nohup): that asks for a
    daemon that outlives its terminal."""
    log_path = short_dir / "log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "upscaler_server", "--backend", "nearest", "--endpoint",
                                 f"ipc://{short_dir}/d.sock"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "upscaler ready" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)
        with UpscalerClient(f"ipc://{short_dir}/d.sock", timeout=10) as client:
            client.ping()
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0, log_path.read_text()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc/N/stat: /proc/N/task/*/children needs a kernel option)."""
    children = []
    for stat_file in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rpartition(")")[2].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat_file.parent.name))
    return children


def _ignored_signals(pid: int) -> int:
    """The SigIgn mask of ``pid`` (bit n-1 set: signal n ignored)."""
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)


def test_the_resource_tracker_outlives_a_hang_up_of_the_process_group() -> None:
    """A closed terminal sends SIGHUP to the whole group: the daemon stops cleanly, but the resource tracker (which
    unlinks the segments of a daemon killed later, e.g. by SIGKILL during its drain) must not die of it."""
    with run_server("--backend", "nearest") as daemon:
        trackers = [child for child in _children(daemon.pid)
                    if b"resource_tracker" in pathlib.Path(f"/proc/{child}/cmdline").read_bytes()]
        assert len(trackers) == 1, "the daemon starts its resource tracker before serving"
        assert _ignored_signals(trackers[0]) & (1 << (signal.SIGHUP - 1))


def test_a_client_that_never_reads_cannot_pile_up_results_in_the_daemon() -> None:
    """Inline results a client leaves unread are bounded per client (--max-unread-mb, docs/protocol.md section 1):
    120 inline 640x480 results (921,600 bytes each) for a socket that never reads: past 8 MiB unread the daemon
    answers BUSY instead of holding one more HR frame, and it still serves the client once it reads."""
    import msgpack
    import zmq

    frame = np.zeros((240, 320, 3), np.uint8).tobytes()
    with run_server("--backend", "nearest", "--max-unread-mb", "8") as daemon:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger, sock.rcvhwm, sock.rcvbuf = 0, 1, 4096  # a stalled reader: almost nothing buffered on our side
        sock.connect(daemon.endpoint)
        try:
            for req in range(1, 121):
                sock.send(msgpack.packb({"v": 1, "type": "process", "req": req, "width": 320, "height": 240,
                                         "format": "RGB8", "frame": req, "pixels": frame}))  # fmt: skip
                time.sleep(0.004)  # slower than the engine: the frame queue never fills
            time.sleep(1.0)
            kinds: list[str] = []
            busy_messages: list[str] = []
            while sock.poll(500, zmq.POLLIN):
                reply = msgpack.unpackb(sock.recv(), raw=False)
                kinds.append(reply.get("name", reply["type"]))
                if reply.get("name") == "BUSY":
                    busy_messages.append(reply["message"])
            assert len(kinds) == 120 and set(kinds) == {"result", "BUSY"}, kinds  # every request answered
            # how much is unread, to a tenth of a MiB: with a budget of 1 MiB it said "0 MiB ... are still unread"
            unread = re.match(r"(\d+\.\d) MiB of your earlier results are still unread", busy_messages[0])
            assert unread and 7.0 <= float(unread.group(1)) <= 8.0, busy_messages[0]
            assert kinds.count("result") <= 8 * 2**20 // 921_600 + 8, kinds.count("result")  # + the sockets' buffers
            sock.send(msgpack.packb({"v": 1, "type": "process", "req": 999, "width": 320, "height": 240,
                                     "format": "RGB8", "frame": 999, "pixels": frame}))  # fmt: skip
            assert sock.poll(5000, zmq.POLLIN) and msgpack.unpackb(sock.recv(), raw=False)["type"] == "result"
        finally:
            sock.close(linger=0)
            ctx.term()


def test_many_connections_that_never_read_share_one_bound() -> None:
    """The budget is per connection, so all of them together are bounded too (four budgets): 16 stalled sockets,
    10 inline 640x480 results each, --max-unread-mb 4: at most 16 MiB of results are held for them at a time
    (without the bound each socket would hold 4 MiB: 64 MiB)."""
    import msgpack
    import zmq

    frame = np.zeros((240, 320, 3), np.uint8).tobytes()
    with run_server("--backend", "nearest", "--max-unread-mb", "4") as daemon:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        socks = [ctx.socket(zmq.DEALER) for _ in range(16)]
        try:
            for sock in socks:
                sock.linger, sock.rcvhwm, sock.rcvbuf = 0, 1, 4096
                sock.connect(daemon.endpoint)
            for req in range(1, 11):
                for sock in socks:
                    sock.send(msgpack.packb({"v": 1, "type": "process", "req": req, "width": 320, "height": 240,
                                             "format": "RGB8", "frame": req, "pixels": frame}))  # fmt: skip
                    time.sleep(0.004)
            time.sleep(1.0)
            results = 0
            for sock in socks:
                kinds = []
                while sock.poll(300, zmq.POLLIN):
                    kinds.append(msgpack.unpackb(sock.recv(), raw=False).get("name", "result"))
                assert len(kinds) == 10 and set(kinds) <= {"result", "BUSY"}, kinds  # every request answered
                results += kinds.count("result")
            # 4 x 4 MiB of 921,600-byte results held by the daemon, plus what already left it: up to two results
            # per socket sit in the socket's buffers on our side (measured: 2), one more for timing
            assert results <= 4 * 4 * 2**20 // 921_600 + 3 * len(socks), results
        finally:
            for sock in socks:
                sock.close(linger=0)
            ctx.term()


@pytest.mark.parametrize("kind", ["file", "symlink", "folder"])
def test_an_endpoint_path_that_is_not_a_socket_is_left_alone(short_dir: pathlib.Path, kind: str) -> None:
    """ZeroMQ unlinks an ipc path before binding: a file (or a link, or a folder) there would be deleted."""
    path = short_dir / f"{kind}.sock"
    victim = short_dir / "victim.txt"
    victim.write_text("keep me")
    {"file": lambda: path.write_text("keep me"), "symlink": lambda: path.symlink_to(victim),
     "folder": lambda: path.mkdir()}[kind]()  # fmt: skip
    status, log = _exit_of(["--backend", "nearest", "--endpoint", f"ipc://{path}"])
    assert status == 2 and "not a socket: binding would replace it" in log, log
    assert path.is_symlink() if kind == "symlink" else path.exists()
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize(("endpoint", "message"), [
    ("ipc://@abstract", "must be a file path"), ("ipc://*", "must be a file path"),
    ("tcp://0.0.0.0:47311", "reachable from other hosts"), ("tcp://*:47311", "reachable from other hosts"),
])  # fmt: skip
def test_endpoints_without_access_control_are_refused(endpoint: str, message: str) -> None:
    status, log = _exit_of(["--backend", "nearest", "--endpoint", endpoint])
    assert status == 2 and message in log, log


def test_a_tcp_port_another_program_holds_is_refused_with_its_endpoint() -> None:
    """From the coverage review (no test reached it): the daemon names the endpoint it could not bind, exits 2 before
    it says it is ready, and leaves the port's holder alone."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        status, log = _exit_of(["--backend", "nearest", "--endpoint", f"tcp://127.0.0.1:{port}"])
        assert status == 2 and f"cannot bind tcp://127.0.0.1:{port}: Address already in use" in log, log
        assert "upscaler ready" not in log and "Traceback" not in log, log
        assert holder.getsockname()[1] == port


@pytest.mark.parametrize(("field", "largest"), [
    ("max_width", 65535), ("max_height", 65535), ("max_slots", 64), ("scale", 16), ("max_sessions", 1 << 20),
    ("max_queue", 1 << 20),
])  # fmt: skip
def test_settings_the_welcome_reply_cannot_carry_are_refused(field: str, largest: int) -> None:
    """The welcome reply's schema bounds these fields: a daemon must refuse to start past them, not fail later."""
    from upscaler_server.config import Config

    assert getattr(Config(endpoint="ipc:///tmp/x.sock", **{field: largest}), field) == largest
    for bad in (0, largest + 1):
        with pytest.raises(ConfigError, match="invalid settings"):
            Config(endpoint="ipc:///tmp/x.sock", **{field: bad})


def test_thread_counts_past_what_a_process_can_start_are_refused() -> None:
    """Only threads >= 0 was checked: torch.set_num_threads(50000) and a convolution segfault the process."""
    from upscaler_server.config import MAX_THREADS, Config

    assert Config(endpoint="ipc:///tmp/x.sock", threads=MAX_THREADS).threads == MAX_THREADS
    for bad in (-1, MAX_THREADS + 1):
        with pytest.raises(ConfigError, match=f"0 <= threads <= {MAX_THREADS}"):
            Config(endpoint="ipc:///tmp/x.sock", threads=bad)


def test_endpoint_shapes() -> None:
    from upscaler_server.config import Config

    assert Config(endpoint="ipc:///tmp/star*name.sock").endpoint.endswith("*name.sock")  # only "ipc://*" is a wildcard
    for endpoint in ("tcp://127.0.0.1", "tcp://5555", "tcp://127.0.0.1:port"):
        with pytest.raises(ConfigError, match="needs a host and a port"):
            Config(endpoint=endpoint)
    assert Config(endpoint="tcp://localhost:5555") and Config(endpoint="tcp://0.0.0.0:5555", allow_remote=True)
    longest = "ipc:///tmp/" + "x" * (107 - len("/tmp/"))  # a Unix socket's path: 107 bytes and its NUL
    assert Config(endpoint=longest)
    with pytest.raises(ConfigError, match="an ipc path may be at most 107 bytes long"):
        Config(endpoint=longest + "x")
    with pytest.raises(ConfigError, match="must start with ipc:// or tcp://"):
        Config(endpoint="udp://127.0.0.1:5555")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def _free_ipv6_endpoint() -> str:
    with socket.socket(socket.AF_INET6) as free:
        free.bind(("::1", 0))
        return f"tcp://[::1]:{free.getsockname()[1]}"


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_a_daemon_on_the_ipv6_loopback_serves() -> None:
    """tcp://[::1]:PORT passes the loopback check, so it must also bind and be reachable (ZeroMQ's IPV6 option)."""
    with run_server("--backend", "nearest", endpoint=_free_ipv6_endpoint()) as daemon, \
            UpscalerClient(daemon.endpoint, timeout=10, name="pytest") as client:
        assert client.upscale(np.zeros((16, 16, 3), np.uint8)).shape == (32, 32, 3)


@pytest.mark.parametrize("kind", ["ipc", "tcp6"])
def test_heartbeats_keep_an_idle_session_past_its_lease(kind: str) -> None:
    """The client's heartbeat thread pings from its own socket; it must reach the daemon on every endpoint kind
    (it once lacked the IPV6 option, so idle sessions on tcp://[::1] expired)."""
    if kind == "tcp6" and not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1)")
    endpoint = _free_ipv6_endpoint() if kind == "tcp6" else None
    with run_server("--backend", "nearest", "--lease-timeout", "0.6", endpoint=endpoint) as daemon, \
            UpscalerClient(daemon.endpoint, timeout=10, name="pytest") as client:
        session = client.open_session(16, 16, "RGB8", slots=1)
        time.sleep(2.0)  # over three leases without a request: only the pings keep it
        assert session.upscale(np.zeros((16, 16, 3), np.uint8)).shape == (32, 32, 3)
        assert "lease expired" not in daemon.log()


def test_the_heartbeat_follows_a_restarted_daemons_shorter_lease(short_dir: pathlib.Path) -> None:
    """From the concurrency review: the client said hello to a restarted daemon but its heartbeat kept the first
    daemon's period (2.5 s), so idle sessions on a daemon with a 1 s lease expired."""
    endpoint = f"ipc://{short_dir}/d.sock"
    frame = np.zeros((16, 16, 3), np.uint8)
    with run_server("--backend", "nearest", "--lease-timeout", "10", endpoint=endpoint):
        client = UpscalerClient(endpoint, timeout=5, retries=2, name="pytest")
        client.upscale(frame)
    try:
        with run_server("--backend", "nearest", "--lease-timeout", "0.6", endpoint=endpoint) as second:
            client.upscale(frame)  # its session is gone: reopened, after a hello to the new daemon
            assert client.info.heartbeat_ms < 600
            session = client.open_session(16, 16, "RGB8", slots=1)
            time.sleep(2.0)  # over three leases without a request: only the pings keep it
            assert session.upscale(frame).shape == (32, 32, 3)
            assert "lease expired" not in second.log()
    finally:
        client.close()


def test_the_heartbeat_keeps_more_sessions_than_one_ping_names(short_dir: pathlib.Path) -> None:
    """From the concurrency review: with more than 256 sessions (a ping's most) the heartbeat thread died of a
    ProtocolError, and every session expired; the ids now go in as many pings as they need."""
    with run_server("--backend", "nearest", "--lease-timeout", "0.6", "--max-sessions", "300") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=10, name="pytest") as client:
        sessions = [client.open_session(8, 8, "RGB8", slots=1) for _ in range(257)]
        time.sleep(2.0)
        for session in (sessions[0], sessions[-1]):
            assert session.upscale(np.zeros((8, 8, 3), np.uint8)).shape == (16, 16, 3)
        assert "lease expired" not in daemon.log()
        for session in sessions:
            session.close()


def test_the_client_does_not_hang_on_a_listener_that_never_accepts(short_dir: pathlib.Path) -> None:
    """A stopped daemon's socket with a full backlog: the client's probe gives up, then its attempts time out."""
    script = textwrap.dedent(f"""
        import socket
        from upscaler_server.client import UpscalerClient
        from upscaler_server.errors import ServerUnavailableError
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind("{short_dir}/full.sock")
        listener.listen(0)
        fillers = []
        while True:  # connect until the backlog is full
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            filler.setblocking(False)
            try:
                filler.connect("{short_dir}/full.sock")
            except BlockingIOError:
                break
            fillers.append(filler)
        try:
            UpscalerClient("ipc://{short_dir}/full.sock", timeout=0.5, retries=0)
        except ServerUnavailableError as exc:
            print("unavailable:", exc)
        """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "unavailable: no reply" in run.stdout, run.stdout + run.stderr


def test_an_ipc_socket_is_private_and_the_fd_limit_raised(short_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Mode 0600 from the moment it exists (a umask of 000 must not open a window), and the soft limit of open
    files raised to the hard one (libzmq aborts on EMFILE)."""
    endpoint = f"ipc://{short_dir}/private.sock"
    script = ("import os, resource, sys; os.umask(0); soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
              "from upscaler_server.__main__ import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", script, "--backend", "nearest", "--endpoint", endpoint],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=(tmp_path / "log").open("wb"))
    try:
        deadline = time.monotonic() + 60
        while not (short_dir / "private.sock").exists():
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "log").read_text()
            time.sleep(0.05)
        assert (short_dir / "private.sock").stat().st_mode & 0o777 == 0o600
        limits = (pathlib.Path(f"/proc/{proc.pid}/limits").read_text().split("Max open files")[1].split()[:2])
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert int(limits[0]) == (hard if hard != resource.RLIM_INFINITY else 1 << 16) and int(limits[0]) > 256
    finally:
        assert stop(proc) == 0


def test_sessions_leave_open_files_for_connections(short_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """From a walkthrough: with a low open-file limit the sessions took every descriptor, and the next connections
    made libzmq abort the daemon (SIGABRT). Sessions now stop short of a reserve kept for connections, and the
    start-up says when --max-sessions cannot fit the limit."""
    endpoint = f"ipc://{short_dir}/fds.sock"
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200)); "
              "from upscaler_server.__main__ import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", script, "--backend", "nearest", "--endpoint", endpoint],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=(tmp_path / "log").open("wb"))
    context = zmq.Context()
    connections: list[zmq.Socket[bytes]] = []
    try:
        wait_ready(Daemon(proc, endpoint, tmp_path / "log"))
        assert "--max-sessions 64 needs about" in (tmp_path / "log").read_text()
        with UpscalerClient(endpoint, name="pytest") as client:
            held, refusals = [], []  # held: a session dropped is closed, and its descriptors with it
            while not refusals:
                try:
                    held.append(client.open_session(16, 16, "RGB8", slots=1))
                except SessionError as exc:
                    refusals.append(exc)
                assert len(held) < 64, "every session of --max-sessions was opened under a limit of 200 open files"
            assert refusals[0].code is ErrorCode.RESOURCE_LIMIT and "keeps 64 for connections" in str(refusals[0])
            for _ in range(60):  # libzmq accepts each: one descriptor apiece
                connections.append(context.socket(zmq.DEALER))
                connections[-1].connect(endpoint)
            time.sleep(1)
            assert client.stats().sessions == len(held) and proc.poll() is None
    finally:
        for connection in connections:
            connection.close(0)
        context.term()
        assert stop(proc) == 0, (tmp_path / "log").read_text()


def test_invalid_settings_exit_2() -> None:
    status, log = _exit_of(["--backend", "nearest", "--max-queue", "0"])
    assert status == 2 and "invalid settings" in log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "auto", "--tune-sizes", "0x0"], "--tune-sizes 0x0 within 1..max_width"),
        (["--backend", "auto", "--max-width", "4000", "--tune-sizes", "64x64", "5000x100"],
         "--tune-sizes 5000x100 within 1..max_width"),
        # the engine's own check raised EngineError, which start-up did not catch: a traceback and exit 1
        (["--model", "rlfn_s", "--backend", "auto", "--auto-backends", "eager", "--threads", "1",
          "--tune-sizes", "10x10"], "--tune-sizes 10x10: input 10x10 is smaller than the model's minimum 15x15"),
        (["--scale", "3"], "upscales x2 (--scale is for --model; a checkpoint knows its own)"),  # served x2 before
        # it said "ready", then refused every frame: below the minimum, or over the limits
        (["--max-width", "14"], "--max-width 14: below the model's minimum input 15x15"),
        (["--max-height", "3", "--max-pixels", "224"], "--max-height 3, --max-pixels 224: below the model's minimum"),
    ],
    ids=["zero", "over-max-width", "below-the-model-minimum", "scale-of-the-bundled-student", "max-width-below-minimum",
         "max-height-and-pixels-below-minimum"],
)
def test_settings_no_frame_could_have_are_refused_at_start(
    args: list[str], message: str, tmp_path: pathlib.Path
) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")] if "auto" in args else []  # auto's measurements, not ~/.cache's
    status, log = _exit_of([*args, *cache])
    assert status == 2 and message in log and "Traceback" not in log, log


def test_a_tune_size_that_is_no_size_says_what_a_size_is() -> None:
    """It said "invalid parse_size value: 'abc'", naming a function of the daemon."""
    status, log = _exit_of(["--backend", "auto", "--tune-sizes", "abc"])
    assert status == 2 and "argument --tune-sizes: 'abc' is not WIDTHxHEIGHT, e.g. 640x360" in log, log


def test_an_engine_failing_at_start_up_is_one_log_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A backend failing while --tune-sizes are measured raises EngineError: a traceback before."""
    from upscaler_server import __main__ as daemon_main
    from upscaler_server import engine as engine_module
    from upscaler_server.errors import EngineError

    def failing_engine(config, on_tune=None):  # type: ignore[no-untyped-def]
        raise EngineError("onnxruntime failed on the 1920x1080 measurement")

    monkeypatch.setattr(engine_module, "build_engine", failing_engine)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the handlers would outlive this test
    tmp = short_tmpdir()
    try:
        assert daemon_main.main(["--endpoint", f"ipc://{tmp}/d.sock", "--backend", "nearest"]) == 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert "cannot start: onnxruntime failed on the 1920x1080 measurement" in caplog.text


@pytest.mark.parametrize("lease", ["0.0005", "nan", "inf", "1e20"])
def test_a_lease_welcome_cannot_carry_is_refused_at_start(lease: str) -> None:
    """The lease travels as an integer of milliseconds >= 1; a value outside that used to pass the settings and then
    break every hello (nan) or crash the daemon on the first one (0.0005, 1e20)."""
    status, log = _exit_of(["--backend", "nearest", "--lease-timeout", lease])
    assert status == 2 and "the lease timeout must be 0.001 to 86400 seconds" in log


def test_a_model_name_too_long_for_welcome_is_cut(tmp_path: pathlib.Path) -> None:
    """welcome.model holds at most 128 characters; a checkpoint whose stage name is longer still gets a welcome."""
    import models

    long_stage = "finetune_" + "x" * 150
    path = models.save_checkpoint(models.build_model("rlfn_s", channels=8), tmp_path / "long.safetensors",
                                  role="student", training={"stage": long_stage})  # fmt: skip
    with run_server("--checkpoint", str(path), "--device", "cpu", "--threads", "1") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=30) as client:
        assert len(client.model) == 128 and client.model.startswith("rlfn student 8ch x1 block (finetune_xxx")
        assert client.ping()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_daemon_serves_fp16_with_graphs(tmp_path: pathlib.Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "student.safetensors")
    frame = RNG.integers(0, 256, (72, 128, 4), dtype=np.uint8)
    with run_server("--checkpoint", str(checkpoint), "--device", "cuda", "--cuda-graphs") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=60) as client:
        assert client.device.startswith("cuda") and client.info.precision == "fp16"
        first, second = client.upscale(frame, "BGRA8"), client.upscale(frame, "BGRA8")
        np.testing.assert_array_equal(first, second)
        np.testing.assert_array_equal(first[..., 3], np.repeat(np.repeat(frame[..., 3], 2, 0), 2, 1))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "eager", "--tune-sizes", "64x64"], "--tune-sizes (--backend auto only)"),
        (["--backend", "eager", "--auto-backends", "onnxruntime"], "--auto-backends (--backend auto only)"),
        (["--backend", "nearest", "--precision", "fp32", "--pad-channels", "8", "--edge-pad", "4"],
         "--precision (the nearest backend runs no model), --pad-channels (the nearest backend runs no model), "
         "--edge-pad (the nearest backend runs no model)"),
        (["--device", "cpu", "--cuda-graphs", "--overlap"], "--cuda-graphs (CUDA only), --overlap (CUDA only)"),
        (["--backend", "compile", "--cache-dir", "/tmp"],
         "--cache-dir (the compile backend keeps no files: auto, onnxruntime, tensorrt do)"),
    ],
    ids=["tune-sizes", "auto-backends", "nearest-model-options", "cuda-options-on-cpu", "cache-dir-unused"],
)
def test_options_that_would_be_ignored_are_refused(args: list[str], message: str) -> None:
    """Each was dropped in silence: a daemon "tuned" for sizes it never measured, or "with" CUDA graphs on a CPU."""
    status, log = _exit_of(args)
    assert status == 2 and f"these options would be ignored: {message}; leave them out" in log, log


@pytest.mark.parametrize("port", ["99999", "0", "65536"])
def test_a_tcp_port_outside_1_to_65535_is_refused(port: str) -> None:
    """libzmq binds port 99999 as 34463 (modulo 65536), and port 0 as one nobody is told of."""
    status, log = _exit_of(["--backend", "nearest", "--endpoint", f"tcp://127.0.0.1:{port}"])
    assert status == 2 and "a tcp endpoint needs a host and a port 1..65535" in log, log


def test_an_endpoint_from_the_environment_is_named_as_such() -> None:
    env = {**os.environ, "TAKDSR_UPSCALER_ENDPOINT": "foo"}
    done = subprocess.run([sys.executable, "-m", "upscaler_server", "--backend", "nearest"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "$TAKDSR_UPSCALER_ENDPOINT: endpoint 'foo' must start with ipc:// or tcp://" in done.stderr


def test_a_socket_another_program_listens_on_is_left_alone(short_dir: pathlib.Path) -> None:
    """Binding took the file over (libzmq unlinks it first) and the daemon's exit deleted it: a typo naming another
    service's socket broke that service."""
    path = short_dir / "other.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        status, log = _exit_of(["--backend", "nearest", "--endpoint", f"ipc://{path}"])
        assert status == 2 and f"{path} is a socket that another program listens on" in log, log
        assert path.exists() and path.is_socket()


def test_an_unwritable_cache_is_a_setting_not_a_model_error(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("onnxruntime")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    status, log = _exit_of(["--backend", "onnxruntime", "--device", "cpu", "--cache-dir", str(not_a_folder)])
    assert status == 2 and f"cannot write the ONNX cache in {not_a_folder / 'onnx'}" in log, log
    assert "--cache-dir DIR or set $TAKDSR_CACHE_DIR" in log


def test_a_session_over_the_shared_memory_budget_is_told_what_would_fit() -> None:
    """--max-shm-mb 1: a ring of 160x100 RGBA8 takes 323,584 bytes per slot (input and output pages); a one-slot
    session was told to use fewer slots too."""
    with run_server("--backend", "nearest", "--max-shm-mb", "1") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=10) as client:
        with pytest.raises(UpscalerError, match=r"\(--max-shm-mb\); use fewer slots"):
            client.open_session(160, 100, "RGBA8", slots=4)
        with pytest.raises(UpscalerError, match="this frame size needs a daemon started with a larger --max-shm-mb"):
            client.open_session(400, 300, "RGBA8", slots=1)
        held = client.open_session(160, 100, "RGBA8", slots=3)
        with pytest.raises(UpscalerError, match="close other sessions, or start the daemon with a larger --max-shm-mb"):
            client.open_session(160, 100, "RGBA8", slots=1)
        held.close()


def _spawn_with_env(args: list[str], log_path: pathlib.Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "upscaler_server", *args], stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **env})


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_a_service_manager_is_told_when_the_endpoint_is_bound_and_when_it_stops(
        short_dir: pathlib.Path, abstract: bool) -> None:
    """systemd's Type=notify: READY=1 once the endpoint is bound (units ordered after the daemon start then, not when
    the process is forked), STOPPING=1 when a stop begins."""
    address = f"@takdsr-test-{os.getpid()}" if abstract else str(short_dir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + address[1:] if abstract else address)
        manager.settimeout(60)
        endpoint = short_dir / "d.sock"
        proc = _spawn_with_env(["--backend", "nearest", "--endpoint", f"ipc://{endpoint}"], short_dir / "log",
                               {"NOTIFY_SOCKET": address})
        try:
            ready = manager.recv(4096).decode().splitlines()
            assert ready[:2] == ["READY=1", f"MAINPID={proc.pid}"] and ready[2].startswith("STATUS=serving nearest")
            assert endpoint.is_socket()  # bound before READY=1
            UpscalerClient(f"ipc://{endpoint}", timeout=10).close()
        finally:
            status = stop(proc)
        assert status == 0, (short_dir / "log").read_text()
        assert manager.recv(4096).decode().splitlines()[0] == "STOPPING=1"


def test_a_service_manager_is_asked_for_time_before_each_backend_measured_at_start_up(
        short_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """--tune-sizes measures backends for minutes (TensorRT builds), past systemd's 90 s start timeout: the unit
    needed TimeoutStartSec=, or the start was cut short, counted a failure and restarted, again and again. Each
    measurement now extends the timeout (EXTEND_TIMEOUT_USEC) and says what it measures; a size first met while
    serving is the watchdog's business, and asks for nothing."""
    address = str(short_dir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(address)
        manager.settimeout(120)
        endpoint = short_dir / "d.sock"
        proc = _spawn_with_env(["--endpoint", f"ipc://{endpoint}", "--device", "cpu", "--threads", "1", "--backend",
                                "auto", "--auto-backends", "eager,onnxruntime", "--cache-dir", str(tmp_path / "cache"),
                                "--tune-sizes", "32x32", "48x32"], short_dir / "log", {"NOTIFY_SOCKET": address})
        try:
            messages = []
            while not messages or messages[-1][0] != "READY=1":
                messages.append(manager.recv(4096).decode().splitlines())
            steps = [lines[1] for lines in messages[:-1]]
            assert all(lines[0] == "EXTEND_TIMEOUT_USEC=600000000" for lines in messages[:-1]), messages
            count = int(steps[0].rpartition(" of ")[2])  # eager-fp32, onnxruntime-fp32, eager-bf16 where it runs
            assert count >= 2 and steps[0] == f"STATUS=starting: measuring backend eager-fp32 at 32x32, 1 of {count}"
            assert len(steps) == 2 * count and steps[-1].startswith("STATUS=starting: measuring backend ")
            assert steps[-1].endswith(f" at 48x32, {count} of {count}"), steps
            with UpscalerClient(f"ipc://{endpoint}", timeout=60) as client:
                client.upscale(np.zeros((32, 64, 3), np.uint8))  # measured now, while serving
            manager.settimeout(0.5)
            with pytest.raises(TimeoutError):
                manager.recv(4096)
        finally:
            status = stop(proc)
        assert status == 0, (short_dir / "log").read_text()
        assert "auto backend for 64x32 on cpu: " in (short_dir / "log").read_text()


def test_a_service_manager_that_cannot_be_told_does_not_stop_the_daemon(short_dir: pathlib.Path) -> None:
    env = {"NOTIFY_SOCKET": str(short_dir / "nobody")}
    proc = _spawn_with_env(["--backend", "nearest", "--endpoint", f"ipc://{short_dir}/d.sock"], short_dir / "log", env)
    try:
        deadline = time.monotonic() + 60
        while "upscaler ready" not in (short_dir / "log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (short_dir / "log").read_text()
            time.sleep(0.05)
        with UpscalerClient(f"ipc://{short_dir}/d.sock", timeout=10) as client:
            client.ping()
    finally:
        assert stop(proc) == 0
    log = (short_dir / "log").read_text()
    assert f"cannot notify the service manager at $NOTIFY_SOCKET={short_dir / 'nobody'}" in log


def test_the_watchdog_setting_is_read_as_systemd_sets_it(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from upscaler_server.service import watchdog_timeout

    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/nowhere")
    monkeypatch.setenv("WATCHDOG_USEC", "2500000")
    assert watchdog_timeout() == 2.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_timeout() == 2.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # a child that inherited its parent's variables
    assert watchdog_timeout() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert watchdog_timeout() is None  # nowhere to send the pings
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/nowhere")
    for bad in ("0", "-5", "1e6", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        with caplog.at_level("WARNING", logger="upscaler_server"):
            assert watchdog_timeout() is None
        assert f"ignoring $WATCHDOG_USEC={bad}: not a positive number of microseconds" in caplog.text
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_timeout() is None


def test_a_serving_daemon_tells_the_service_managers_watchdog_it_is_alive(short_dir: pathlib.Path) -> None:
    """systemd's WatchdogSec=: with $WATCHDOG_USEC set (0.4 s here) the daemon sends WATCHDOG=1 every half of it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(short_dir / "notify"))
        manager.settimeout(60)
        proc = _spawn_with_env(["--backend", "nearest", "--endpoint", f"ipc://{short_dir}/d.sock"], short_dir / "log",
                               {"NOTIFY_SOCKET": str(short_dir / "notify"), "WATCHDOG_USEC": "400000"})
        try:
            assert manager.recv(4096).decode().startswith("READY=1\n")
            manager.settimeout(5)  # ten times the period: a daemon that sent one and stopped fails here
            pings = [manager.recv(4096).decode() for _ in range(4)]
        finally:
            status = stop(proc)
        assert pings == ["WATCHDOG=1"] * 4
        assert status == 0, (short_dir / "log").read_text()


def test_an_engine_stuck_on_a_frame_stops_the_watchdog_pings(short_dir: pathlib.Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung engine (a GPU driver that never returns, say) left the daemon answering pings and queueing frames for
    ever: its socket is served by another thread. Now a frame running longer than the watchdog's timeout stops the
    WATCHDOG=1 pings, so systemd restarts the daemon; once the frame ends they come again."""
    from upscaler_server.engine import NearestEngine

    class Held(NearestEngine):
        def __init__(self) -> None:
            super().__init__(2)
            self.gate, self.running = threading.Event(), threading.Event()

        def upscale(self, lr, fmt, out):  # type: ignore[no-untyped-def]
            self.running.set()
            self.gate.wait(30)
            return super().upscale(lr, fmt, out)

    timeout_s = 0.3
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", str(int(timeout_s * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    engine = Held()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(short_dir / "notify"))
        manager.settimeout(10)
        with serve_here(engine) as daemon, raw_socket(daemon.endpoint) as sock:
            try:
                assert manager.recv(4096).decode().startswith("READY=1\n")
                assert manager.recv(4096) == b"WATCHDOG=1"  # idle: alive
                sock.send(protocol.encode(protocol.Process(req=1, width=8, height=8, format="RGB8", frame=1,
                                                           pixels=bytes(8 * 8 * 3))))
                assert engine.running.wait(10)
                time.sleep(timeout_s + 0.2)  # the frame has now run longer than the timeout
                manager.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    while True:
                        manager.recv(4096)  # pings sent before that
                manager.settimeout(4 * timeout_s)  # eight periods of a healthy daemon
                with pytest.raises(TimeoutError):
                    manager.recv(4096)
                engine.gate.set()
                manager.settimeout(10)
                assert manager.recv(4096) == b"WATCHDOG=1"  # the frame is done: alive again
                assert sock.poll(10_000, zmq.POLLIN)
                assert isinstance(protocol.decode(sock.recv(), "reply"), protocol.Result)
            finally:
                engine.gate.set()


def _zmtp_dealer(path: str) -> socket.socket:
    """A raw connection to the ipc socket ``path`` that says what libzmq's DEALER says first (ZMTP 3.0: the
    greeting with the NULL mechanism, then READY), so that what it sends next is read as messages."""
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(path)
    greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    peer.sendall(greeting + b"\x04" + bytes([len(ready)]) + ready)  # 0x04: a short command frame
    return peer


def test_one_connection_queues_a_bounded_number_of_messages_while_the_loop_is_busy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """From a hostile-client review: while the daemon's loop was busy (reserving a large session's pages), libzmq
    read up to 1000 messages of one connection into memory, so 30 MiB messages grew the daemon past a gigabyte. It
    now reads 8 (a session's slots) and then leaves the rest to the client's side until the loop catches up: here
    11 messages of 1 MiB went out before the client's sends blocked, against all 200 tried before."""
    from upscaler_server.engine import NearestEngine
    from upscaler_server.server import Server

    gate = threading.Event()
    read_requests = Server._read_requests

    def busy_loop(self: Server, router: zmq.Socket[bytes]) -> None:
        gate.wait(30)
        read_requests(self, router)

    monkeypatch.setattr(Server, "_read_requests", busy_loop)
    with serve_here(NearestEngine(2)) as daemon:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sender = ctx.socket(zmq.DEALER)
        sender.linger = 0
        sender.setsockopt(zmq.SNDHWM, 1)  # the client's own queue: one message
        sender.connect(daemon.endpoint)
        try:
            sent, last_sent = 0, time.monotonic()
            while time.monotonic() - last_sent < 1.5 and sent < 200:
                try:
                    sender.send(bytes(1 << 20), zmq.NOBLOCK)
                    sent, last_sent = sent + 1, time.monotonic()
                except zmq.Again:
                    time.sleep(0.01)
            assert sent <= 16, f"{sent} messages of 1 MiB taken while the loop was busy"
        finally:
            gate.set()
            sender.close(linger=0)
            ctx.term()


def test_a_connection_that_stops_midway_through_a_message_is_closed_after_a_lease() -> None:
    """From the second security review: a connection that declared a large message (up to the daemon's message
    limit, 31 MiB by default), sent part of it and went quiet was kept for ever, the part held in the daemon's
    memory; 16 of them grew it by about 500 MB. Now ZeroMQ's heartbeat closes a connection with neither traffic nor an
    answer to its PING for a lease (1 s here, the least). A client silent as long is kept: libzmq answers for it."""
    with run_server("--backend", "nearest", "--lease-timeout", "1") as daemon, raw_socket(daemon.endpoint) as idle:
        assert request(idle, type="hello", req=1, client="pytest")["type"] == "welcome"
        dropped = idle.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:  # closed whatever happens: the context's term() waits for every socket
            with _zmtp_dealer(daemon.endpoint.removeprefix("ipc://")) as stalled:
                stalled.sendall(b"\x02" + struct.pack(">Q", 1 << 20) + bytes(1 << 19))  # half of a 1 MiB message
                stalled.settimeout(10)
                start = time.monotonic()
                while stalled.recv(4096):  # the daemon's greeting, READY and PINGs, then the end of the stream
                    pass
                assert time.monotonic() - start < 8, "closed, but long after a lease and a ping"
            assert not dropped.poll(0), "the idle client's connection was closed too"
            assert request(idle, type="ping", req=2, sessions=[])["type"] == "pong"
        finally:
            idle.disable_monitor()
            dropped.close(linger=0)

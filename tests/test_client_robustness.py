"""The Python client under misuse and trouble: a daemon that stalls or dies mid-frame, a client dropped without
close(), used after fork or from two threads at once, interrupted (by a signal or by interrupt() from another
thread), or given a bad ``out=`` or timeout."""

from __future__ import annotations

import copy
import errno
import gc
import multiprocessing
import os
import pathlib
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

from upscaler_server import config
from upscaler_server.client import _AUTO_SESSIONS, UpscalerClient
from upscaler_server.client_session import Session, retry_busy
from upscaler_server.errors import (
    BusyError,
    ClientInterruptedError,
    ErrorCode,
    ServerUnavailableError,
    SessionError,
    SharedMemoryError,
    UpscalerError,
)
from upscaler_server.protocol import Message, Ping, Pong, Submit
from upscaler_server.shm import SHM_DIR, Ring, RingLayout
from upscaler_server.transport import Link

from server_utils import FOREIGN_SEGMENTS, fake_daemon, foreign_segment_names, run_server, stop, untouched_segments


def test_a_daemon_that_stalls_past_every_timeout_leaves_no_slot_blocked() -> None:
    """SIGSTOP for longer than the client waits: the frame is given up on. Checking the daemon used to reconnect
    the request socket, losing the late reply, and the slot then stayed busy for good; upscale() never worked again
    at that size although the daemon answered."""
    with run_server("--backend", "nearest") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=0.5, retries=1, name="pytest") as client:
        frame = np.zeros((16, 16, 3), np.uint8)
        assert client.upscale(frame).shape == (32, 32, 3)
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(ServerUnavailableError):
                client.upscale(frame)
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        assert client.upscale(frame).shape == (32, 32, 3)
        assert client.upscale(frame).shape == (32, 32, 3)  # and the next ones


def test_slots_given_up_on_are_free_again_after_a_request_reconnected_the_socket() -> None:
    """Frames given up on during a stall, then a request that timed out too (it reconnects the socket): their late
    replies went with the closed socket, and free_slot() said None and wait_slot() raised for the rest of the
    session, although the daemon was back and idle (found in a review)."""
    with run_server("--backend", "nearest") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=0.5, retries=1, heartbeat=False, name="pytest") as client:
        session = client.open_session(32, 20, "RGB8", slots=3)
        daemon.proc.send_signal(signal.SIGSTOP)  # before the frames: a fast backend answered one before the stop
        try:
            for slot in range(3):
                session.input(slot)[...] = slot
                session.submit(slot)
            for _ in range(3):
                with pytest.raises(ServerUnavailableError):
                    session.collect()
            with pytest.raises(ServerUnavailableError):
                client.ping()  # times out and reconnects the request socket
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        client.ping()
        time.sleep(0.5)  # the daemon finishes the three frames; whether their replies reach the new socket is luck
        assert sorted(session.free_slot() for _ in range(3)) == [0, 1, 2]
        for slot in range(3):
            session.wait_slot(slot)  # returns: nothing left to wait for
        frame = np.full((20, 32, 3), 9, np.uint8)
        start = time.monotonic()
        assert (session.upscale(frame) == 9).all()
        assert (client.upscale(frame) == 9).all() and time.monotonic() - start < 0.5


def test_session_upscale_refuses_to_drop_frames_the_caller_submitted() -> None:
    """upscale() collected and dropped the caller's frames in flight, then wrote its own result over one of theirs."""
    with run_server("--backend", "nearest") as daemon, UpscalerClient(daemon.endpoint, name="pytest") as client:
        session = client.open_session(16, 16, "RGB8", slots=2)
        session.input(0)[...] = 5
        frame_id = session.submit(0)
        with pytest.raises(SessionError, match="collect\\(\\) them before upscale") as refused:
            session.upscale(np.zeros((16, 16, 3), np.uint8))
        assert refused.value.code == ErrorCode.SLOT_IN_FLIGHT
        result = session.collect()
        assert result.frame == frame_id and (result.output == 5).all()
        assert (session.upscale(np.full((16, 16, 3), 7, np.uint8)) == 7).all()  # nothing in flight: fine


def test_a_read_only_out_is_refused_before_the_frame_is_sent() -> None:
    with run_server("--backend", "nearest") as daemon, UpscalerClient(daemon.endpoint, name="pytest") as client:
        frame = np.zeros((16, 16, 3), np.uint8)
        read_only = np.zeros((32, 32, 3), np.uint8)
        read_only.flags.writeable = False
        session = client.open_session(16, 16, "RGB8", slots=1)
        for call in (lambda: client.upscale(frame, out=read_only), lambda: session.upscale(frame, out=read_only)):
            with pytest.raises(ValueError, match="out is a read-only array"):
                call()
        assert session.in_flight == [] and session.free_slot() == 0


@pytest.mark.parametrize("pause", [0.0, 0.001], ids=["inside-a-call", "between-calls"])
def test_exiting_while_another_thread_uses_the_session_is_quiet(pause: float) -> None:
    """At exit the unclosed client was released under the thread polling its socket: a ZMQError traceback. Later,
    with the thread between two calls: the exit closed its socket all the same (ZMQError), or the session's exit
    finalizer gave the session up, and the thread's next call closed it at the daemon (SessionLostError)."""
    with run_server("--backend", "nearest") as daemon:
        script = f"""
import threading, time
from upscaler_server.client import UpscalerClient
client = UpscalerClient({daemon.endpoint!r}, name="pytest")
session = client.open_session(320, 180, "RGB8", slots=2)
def loop():
    while True:
        session.submit(0)
        session.collect()
        time.sleep({pause})
threading.Thread(target=loop, daemon=True).start()
time.sleep(0.5)
"""
        for _ in range(4):  # each exit is a race with the thread: a regression shows in about one exit in five
            run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
            assert run.returncode == 0 and run.stderr == "", run.stderr


def test_exiting_with_an_unclosed_session_and_its_views_alive_is_quiet() -> None:
    """The rings are left to the exit (not closed by a finalizer, for the sake of a thread still using them): their
    garbage collection at teardown, under the slot views, printed BufferError from SharedMemory.__del__."""
    with run_server("--backend", "nearest") as daemon:
        script = f"""
import numpy as np
from upscaler_server.client import UpscalerClient
client = UpscalerClient({daemon.endpoint!r}, name="pytest")
session = client.open_session(32, 16, "RGB8", slots=2)
views = [session.input(0), session.output(1)]
out = session.upscale(np.zeros((16, 32, 3), np.uint8))
"""
        run = subprocess.run([sys.executable, "-X", "dev", "-c", script], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 0, run.stderr
        assert "Exception ignored" not in run.stderr and "Error" not in run.stderr, run.stderr


def test_a_client_dropped_by_a_thread_that_outlives_the_main_thread_is_released() -> None:
    """Past the main thread's end a program's worker threads still run: a client one of them drops is released
    there as anywhere, not left to the process's end as at exit (what the exit rule first did)."""
    with run_server("--backend", "nearest") as daemon:
        script = f"""
import gc, threading, warnings
from upscaler_server.client import UpscalerClient
def worker():
    threading.main_thread().join()
    client = UpscalerClient({daemon.endpoint!r}, name="pytest")
    client.open_session(16, 16, "RGB8", slots=1)
    context = client._ctx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del client
        gc.collect()
    print("context closed:", context.closed)
threading.Thread(target=worker).start()
"""
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and run.stderr == "", run.stderr
        assert run.stdout == "context closed: True\n"


def test_a_dead_daemon_is_given_up_on_after_one_wait_and_the_frame_dropped() -> None:
    """SIGKILL: each collect() used to pay five timeouts and leave its frame queued, so every later call paid them
    again; closing paid one more second per session."""
    with run_server("--backend", "nearest", check_clean=False) as daemon:
        client = UpscalerClient(daemon.endpoint, timeout=1.0, retries=3, name="pytest")
        sessions = [client.open_session(16, 16, "RGB8", slots=2) for _ in range(4)]
        daemon.proc.kill()
        daemon.proc.wait(10)
        sessions[0].submit(0)
        start = time.monotonic()
        with pytest.raises(ServerUnavailableError):
            sessions[0].collect()
        assert time.monotonic() - start < 3.0 and sessions[0].in_flight == []
        start = time.monotonic()
        client.close()
        assert time.monotonic() - start < 2.0
        stop(daemon.proc)


def test_a_client_dropped_without_close_releases_itself_and_warns() -> None:
    """Its heartbeat thread held it alive: threads, sockets and the daemon's sessions stayed until the daemon's
    session limit shut out every client."""
    with run_server("--backend", "nearest", "--lease-timeout", "1") as daemon:
        before = threading.active_count()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            client = UpscalerClient(daemon.endpoint, timeout=5, name="pytest")
            client.open_session(16, 16, "RGB8", slots=1)
            del client
            gc.collect()
        assert any(issubclass(w.category, ResourceWarning) and "was not closed" in str(w.message) for w in caught)
        assert threading.active_count() == before  # the heartbeat thread ended
        deadline = time.monotonic() + 10
        while daemon.segments() and time.monotonic() < deadline:  # no heartbeat: the lease ends the session
            time.sleep(0.1)
        assert daemon.segments() == []


def test_a_dropped_client_is_released_at_once_not_by_the_garbage_collector() -> None:
    """The client held its sessions and each session its client: a cycle, so a client dropped without close() was
    only released by a garbage collection (which a program that allocates little may not run for a long time), and
    until then its heartbeat kept the daemon's sessions and segments alive. A session the caller still holds keeps
    its client."""
    with run_server("--backend", "nearest", "--lease-timeout", "1") as daemon:
        before = threading.active_count()
        gc.disable()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                client = UpscalerClient(daemon.endpoint, timeout=5, name="pytest")
                client.upscale(np.zeros((8, 8, 3), np.uint8))  # a session the client keeps for upscale()
                session = client.open_session(16, 16, "RGB8", slots=1)
                del client
                assert (session.upscale(np.full((16, 16, 3), 3, np.uint8)) == 3).all()  # its client lives on
                assert not caught
                del session
                assert any(issubclass(w.category, ResourceWarning) and "was not closed" in str(w.message)
                           for w in caught)
            assert threading.active_count() == before  # the heartbeat thread ended, no collection needed
        finally:
            gc.enable()
        deadline = time.monotonic() + 10
        while daemon.segments() and time.monotonic() < deadline:  # no heartbeat: the lease ends the sessions
            time.sleep(0.1)
        assert daemon.segments() == []


def test_sessions_the_caller_dropped_are_closed_on_the_daemon() -> None:
    """Once the client held its sessions weakly, a session dropped without close() (the one-liner
    ``client.open_session(...).upscale(frame)``) was never closed on the daemon: its segments stayed until the
    lease, even after client.close(), and the replies it awaited piled up in the client."""
    with run_server("--backend", "nearest", "--lease-timeout", "60") as daemon:
        for end in ("next request", "close"):
            client = UpscalerClient(daemon.endpoint, timeout=5, name="pytest")
            session = client.open_session(8, 8, "RGB8", slots=1)
            session.submit(0)
            client.open_session(8, 8, "RGB8", slots=1).upscale(np.zeros((8, 8, 3), np.uint8))  # used once
            del session  # dropped with a frame in flight
            assert len(daemon.segments()) == 4
            if end == "next request":
                client.ping()
            else:
                client.close()
            deadline = time.monotonic() + 5  # far below the lease: the client told the daemon
            while daemon.segments() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert daemon.segments() == [], end
            if end == "next request":
                client.ping()  # the late replies of the dropped sessions arrive and are dropped
                assert client._link._waiting == set() and client._link._mailbox == {}
                client.close()


def test_a_dropped_session_is_closed_by_the_next_frame_too() -> None:
    """Only requests (ping, open, inline, close) told the daemon of dropped sessions; frames go out as submits,
    so a render loop that only upscaled left a dropped session's segments until its lease (found in a review)."""
    frame = np.zeros((8, 8, 3), np.uint8)
    with run_server("--backend", "nearest", "--lease-timeout", "60") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=5, name="pytest") as client:
        client.upscale(frame)  # the client's own session for 8x8 frames: later frames of this size send submits only
        dropped = client.open_session(16, 8, "RGB8", slots=1)
        del dropped
        gc.collect()
        assert len(daemon.segments()) == 4
        client.upscale(frame)
        deadline = time.monotonic() + 5  # far below the lease: the client told the daemon
        while len(daemon.segments()) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(daemon.segments()) == 2 and client._orphans == []
        assert (client.upscale(frame) == 0).all()


def test_a_request_on_a_stalled_daemon_waits_timeout_times_attempts_once() -> None:
    """upscale_inline (a request that is not resent while the daemon answers pings) pinged the daemon for another
    whole timeout after each silent attempt: a stalled daemon cost twice the documented timeout x (retries + 1)."""
    frame = np.zeros((8, 8, 3), np.uint8)
    with run_server("--backend", "nearest") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=2, retries=1, heartbeat=False, name="pytest") as client:
        assert client.upscale_inline(frame).shape == (16, 16, 3)
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            for call in (client.ping, lambda: client.upscale_inline(frame)):
                start = time.monotonic()
                with pytest.raises(ServerUnavailableError, match="after 2 attempt"):
                    call()
                assert 3.9 < time.monotonic() - start < 6.5  # 2 s x 2 attempts; twice that before the fix
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        assert client.upscale_inline(frame).shape == (16, 16, 3)


def test_sessions_opened_for_an_open_given_up_on_are_closed() -> None:
    """From an integrator's review: with the daemon stopped (SIGSTOP), open_session() timed out and raised; once the
    daemon went on, it opened the session all the same, and nobody held it: its shared memory stayed until its lease
    ended. Its late `opened` reply now gets a Close. (With retries, an `open` whose reply the daemon sends while its
    routing id still names a socket the client closed to reconnect is lost on the way, and that session ends with
    its lease, as docs/protocol.md section 8 says: this test keeps to one socket, so that it can check every one.)"""
    with run_server("--backend", "nearest") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=0.5, retries=0, heartbeat=False, name="pytest") as client:
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(ServerUnavailableError):
                client.open_session(16, 16, "RGB8", slots=1)
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        client.timeout = 10.0
        # each request reads the late `opened`s that came before its reply and closes their sessions first, on the
        # same socket; asked again for a moment, well within the lease (10 s) that would end them anyway
        deadline = time.monotonic() + 3
        while client.stats().sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.stats().sessions == 0
        session = client.open_session(16, 16, "RGB8", slots=1)  # and a session the caller holds is left alone
        assert client.stats().sessions == 1 and session.upscale(np.zeros((16, 16, 3), np.uint8)).shape == (32, 32, 3)


@pytest.mark.parametrize("call", ["ping", "close"])
def test_many_dropped_sessions_and_no_daemon_never_hang_the_client(call: str) -> None:
    """Each dropped session's Close was a blocking send: with no daemon behind the socket, ZeroMQ queues 1000 and
    the next send waits for good, where interrupt() cannot reach it."""
    with run_server("--backend", "nearest", check_clean=False) as daemon:
        client = UpscalerClient(daemon.endpoint, timeout=1, retries=0, name="pytest")
        daemon.proc.kill()
        daemon.proc.wait(10)
        client._orphans.extend((1000 + i, []) for i in range(1100))  # as 1100 dropped sessions leave them
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                getattr(client, call)()
                outcome.append(None)
            except UpscalerError as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run, daemon=True)  # daemon: a hang must not keep pytest from exiting
        worker.start()
        worker.join(15)
        assert not worker.is_alive(), f"client.{call}() hung on the dropped sessions' Close messages"
        if call == "ping":
            assert isinstance(outcome[0], ServerUnavailableError)
            assert 0 < len(client._orphans) < 1100  # a few were sent ahead of the ping; the rest wait
            start = time.monotonic()
            client.close()
            assert time.monotonic() - start < 5
        assert client._orphans == [] and client.closed
        stop(daemon.proc)


def _use_after_fork(client: UpscalerClient, session: Session, answer: multiprocessing.Queue) -> None:
    """Each call's error in the child, or "no error": input() and output() returned views of the parent's slots."""
    for call in (client.ping, lambda: session.input(0), lambda: session.output(0)):
        try:
            call()
            answer.put("no error")
        except UpscalerError as exc:
            answer.put(str(exc))


# Python 3.12+ warns of any fork in a process with threads (the client's heartbeat): forking one is what is tested
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_client_used_after_fork_says_so_instead_of_hanging() -> None:
    with run_server("--backend", "nearest") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=2, retries=1, name="pytest") as client:
        context = multiprocessing.get_context("fork")
        answer = context.Queue()
        session = client.open_session(16, 16, "RGB8", slots=1)
        child = context.Process(target=_use_after_fork, args=(client, session, answer))
        child.start()
        child.join(30)
        if child.is_alive():  # the hang this test is about: end it, then fail
            child.kill()
            child.join(10)
        assert child.exitcode == 0
        for call in ("ping", "input", "output"):
            assert "created in another process" in answer.get(timeout=5), call
        assert client.ping() > 0  # the parent's client is untouched


def test_two_threads_on_one_client_get_an_error_not_a_crash() -> None:
    """Sharing a client could abort the process in libzmq or block a thread forever; now the second thread to use
    it while the first waits gets a clear UpscalerError."""
    with run_server("--model", "rlfn_s", "--threads", "1") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=30, name="pytest") as client:
        errors: list[str] = []
        big = np.zeros((360, 640, 3), np.uint8)  # long enough on this CPU for the second thread to arrive

        def work() -> None:
            try:
                client.upscale(big)
            except UpscalerError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=work) for _ in range(2)]
        for thread in threads:
            thread.start()
            time.sleep(0.2)
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads)
        assert errors and all("in use by another thread" in e for e in errors), errors
        assert client.upscale(np.zeros((16, 16, 3), np.uint8)).shape == (32, 32, 3)


def test_a_second_thread_is_refused_for_the_whole_of_an_upscale(monkeypatch: pytest.MonkeyPatch) -> None:
    """upscale() copies in, submits, collects and copies out; the guard covered one send or one wait at a time, so a
    second thread got in between them on the same session, took the first one's reply, and one of them returned the
    other's picture. The first thread is held right after its submit is sent."""
    submitted, go = threading.Event(), threading.Event()
    original_send = Link.send

    def send_then_hold(link: Link, msg: object) -> int:
        req = original_send(link, msg)
        if isinstance(msg, Submit) and threading.current_thread() is owner:
            submitted.set()
            go.wait(10)
        return req

    with run_server("--backend", "nearest") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=5, name="pytest") as client:
        client.upscale(np.zeros((16, 16, 3), np.uint8))  # the session for this size is open
        monkeypatch.setattr(Link, "send", send_then_hold)
        results: list[np.ndarray] = []
        owner = threading.Thread(target=lambda: results.append(client.upscale(np.full((16, 16, 3), 1, np.uint8))))
        owner.start()
        try:
            assert submitted.wait(10)
            with pytest.raises(UpscalerError, match="in use by another thread"):
                client.upscale(np.full((16, 16, 3), 2, np.uint8))
        finally:
            go.set()
            owner.join(10)
        assert len(results) == 1 and (results[0] == 1).all()
        assert (client.upscale(np.full((16, 16, 3), 2, np.uint8)) == 2).all()


def test_closing_many_sessions_on_a_stalled_daemon_waits_once() -> None:
    """close() waited up to a second for each session's Close in turn: six sessions, six seconds."""
    with run_server("--backend", "nearest") as daemon:
        client = UpscalerClient(daemon.endpoint, timeout=5, name="pytest")
        sessions = [client.open_session(16, 16, "RGB8", slots=1) for _ in range(6)]
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            client.close()
            took = time.monotonic() - start
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        assert took < 3.0 and client.closed and all(session.closed for session in sessions), took
        deadline = time.monotonic() + 30  # the late Closes, or the leases, end them on the daemon
        while daemon.segments() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemon.segments() == []


def test_bad_out_and_timeout_arguments_are_refused_before_anything_is_sent() -> None:
    with run_server("--backend", "nearest") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=5, name="pytest") as client:
        frame = np.zeros((16, 16, 3), np.uint8)
        with pytest.raises(ValueError, match="out must be a"):
            client.upscale(frame, out=np.zeros((32, 32, 3), np.float32))
        session = client.open_session(16, 16, "RGB8", slots=1)
        session.submit(0)
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
            session.collect(timeout=0)
        assert session.collect().slot == 0  # the frame was not given up on
        with pytest.raises(ValueError, match="unknown pixel format 'rgb8'"):
            client.upscale(frame, pixel_format="rgb8")
        with pytest.raises(TypeError, match="numpy arrays, got list"):
            client.upscale(frame.tolist())
        with pytest.raises(TypeError, match="numpy arrays, got list"):
            session.upscale(frame.tolist())
        with pytest.raises(TypeError, match="out must be a numpy array, got list"):
            session.upscale(frame, out=[])
        for timeout in (0, -1, float("nan"), float("inf")):  # they used to blame a running daemon for not answering
            with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
                UpscalerClient(daemon.endpoint, timeout=timeout)
        with pytest.raises(TypeError, match="timeout must be a number of seconds, got '5'"):
            UpscalerClient(daemon.endpoint, timeout="5")
        with pytest.raises(ValueError, match="retries must be an int >= 0"):
            UpscalerClient(daemon.endpoint, retries=-1)
        with UpscalerClient(daemon.endpoint, timeout=np.float32(5), retries=np.int64(2)) as numpy_numbers:
            assert numpy_numbers.retries == 2 and numpy_numbers.ping() > 0


def test_a_dropped_client_collected_on_its_heartbeat_thread_still_ends_it() -> None:
    """A client with a session is freed by the garbage collector, which may run on the heartbeat thread, even inside
    its Event.wait(): its finalizer then deadlocked there (setting the Event it waited on) or failed to join itself."""
    with run_server("--backend", "nearest", "--lease-timeout", "0.4") as daemon:  # heartbeats every 0.1 s
        before = threading.active_count()
        thresholds = gc.get_threshold()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            client = UpscalerClient(daemon.endpoint, timeout=5, name="pytest")
            client.upscale(np.zeros((8, 8, 3), np.uint8))  # a session and its heartbeat
            cycle: list[object] = [client]
            cycle.append(cycle)  # the caller's own cycle: only the garbage collector frees the client now
            gc.set_threshold(1, 1, 1)  # collect at nearly every allocation, so on whichever thread allocates
            try:
                del client, cycle
                deadline = time.monotonic() + 10
                while threading.active_count() > before and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                gc.set_threshold(*thresholds)
            gc.collect()
        assert threading.active_count() == before  # the heartbeat thread ended, wherever the collector ran


def test_close_from_another_thread_during_a_request_changes_nothing() -> None:
    """It used to detach the finalizer and clear the sessions before the guard raised: half-closed, leaked, and the
    owner's collect() crashed with IndexError."""
    with run_server("--model", "rlfn_s", "--threads", "1") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=30, name="pytest") as client:
        session = client.open_session(640, 360, "RGB8", slots=1)  # a frame long enough to close during it
        outcome: list[object] = []

        def owner() -> None:
            session.submit(0)
            outcome.append(session.collect())

        worker = threading.Thread(target=owner)
        worker.start()
        time.sleep(0.3)
        with pytest.raises(UpscalerError, match="in use by another thread"):
            client.close()
        worker.join(60)
        assert len(outcome) == 1 and not client.closed and not session.closed
        assert session.upscale(np.zeros((360, 640, 3), np.uint8)).shape == (720, 1280, 3)


def test_interrupt_ends_another_threads_wait_and_close_then_does_not_wait() -> None:
    """An application shutting down while its render thread waits on a stalled daemon: that wait could last the
    timeout times the retries (40 s by default), and close() from another thread is refused while it runs."""
    with run_server("--backend", "nearest") as daemon:
        client = UpscalerClient(daemon.endpoint, timeout=10, retries=3, name="pytest")
        session = client.open_session(16, 16, "RGB8", slots=1)
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            session.submit(0)
            raised: list[BaseException] = []
            waiter = threading.Thread(target=lambda: raised.extend(_raised(session.collect)))
            waiter.start()
            time.sleep(0.3)
            start = time.monotonic()
            client.interrupt()
            waiter.join(5)
            assert not waiter.is_alive() and time.monotonic() - start < 1.0
            assert len(raised) == 1 and isinstance(raised[0], ClientInterruptedError)
            start = time.monotonic()
            client.close()  # the daemon is still stopped: its lease ends the session
            assert time.monotonic() - start < 1.0 and client.closed
        finally:
            daemon.proc.send_signal(signal.SIGCONT)


def _raised(call) -> list[BaseException]:
    try:
        call()
    except BaseException as exc:  # the test inspects whatever it was
        return [exc]
    return []


def test_has_result_says_when_collect_would_not_wait() -> None:
    with run_server("--backend", "nearest") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=5, name="pytest") as client:
        session = client.open_session(16, 16, "RGB8", slots=2)
        assert not session.has_result()  # nothing in flight
        session.input(0)[...] = 5
        session.submit(0)
        start = time.monotonic()
        assert session.has_result(wait=10)  # returns when the reply lands, not after the wait
        assert time.monotonic() - start < 2.0
        assert session.has_result()  # the reply stays for collect()
        start = time.monotonic()
        result = session.collect()
        assert time.monotonic() - start < 0.05 and (result.output == 5).all()
        assert not session.has_result() and not session.has_result(wait=0.1)


def test_an_interrupted_client_closes_without_raising_or_leaking() -> None:
    """close() after interrupt() sent the session's Close anyway, which raised and left the rings mapped; an
    interrupt landing while close() waited on a stopped daemon left the client half-closed, its heartbeat running."""
    with run_server("--backend", "nearest") as daemon:
        client = UpscalerClient(daemon.endpoint, timeout=5, name="pytest")
        session = client.open_session(16, 16, "RGB8", slots=2)
        client.interrupt()
        session.close()  # the daemon is healthy: it is the interrupt that must not make this raise
        assert session.closed and session._inputs == [] and not session._release.alive
        client.close()
        assert client.closed

        before = threading.active_count()
        client = UpscalerClient(daemon.endpoint, timeout=5, name="pytest")
        client.open_session(16, 16, "RGB8", slots=2)
        daemon.proc.send_signal(signal.SIGSTOP)  # close() now waits on the session's Close
        try:
            timer = threading.Timer(0.3, client.interrupt)
            timer.start()
            client.close()
            timer.join()
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        assert client.closed and client._ctx.closed and threading.active_count() == before


def test_a_client_finds_a_killed_daemon_within_a_second_not_after_every_timeout() -> None:
    """README says a dead daemon is reported at once; only a new client did so. An existing one paid the timeout
    times the attempts: 40 s for ping() and open_session(), 10 s for a frame, with the default 10 s x 4."""
    with run_server("--backend", "nearest", check_clean=False) as daemon:
        client = UpscalerClient(daemon.endpoint, timeout=10, retries=3, name="pytest")
        no_retries = UpscalerClient(daemon.endpoint, timeout=10, retries=0, name="pytest")  # as the demo's link
        session = client.open_session(16, 16, "RGB8", slots=2)
        session.submit(0)  # in flight when the daemon dies
        session.collect()
        daemon.proc.send_signal(signal.SIGSTOP)  # frame 1 must not be answered before the kill (a fast daemon was)
        session.submit(1)
        daemon.proc.kill()
        daemon.proc.wait(10)
        calls = {"collect": session.collect, "ping": client.ping, "open_session": lambda: client.open_session(8, 8),
                 "upscale": lambda: client.upscale(np.zeros((20, 20, 3), np.uint8)),
                 "session.upscale": lambda: session.upscale(np.zeros((16, 16, 3), np.uint8))}  # fmt: skip
        for name, call in calls.items():
            start = time.monotonic()
            with pytest.raises(ServerUnavailableError, match="no longer running"):  # a frame's said "is it running?"
                call()
            assert time.monotonic() - start < 4.0, name  # about 1 s (a frame) or 2 s (a request); was 10 or 40 s
        with pytest.raises(ServerUnavailableError, match=r"no upscaler daemon at .*no longer running"):
            no_retries.ping()  # one attempt, and still the reason, not "no reply after 1 attempt"
        no_retries.close()
        client.close()
        stop(daemon.proc)


def test_an_inline_frame_over_the_daemons_limits_is_refused_before_it_is_sent() -> None:
    """Past the message size limit libzmq drops the connection without a reply: upscale_inline waited every
    attempt out, then blamed the daemon ("is it running?"); upscale() said what was wrong at once."""
    with run_server("--backend", "nearest", "--max-pixels", "10000") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=3, retries=1, name="pytest") as client:
        start = time.monotonic()
        with pytest.raises(SessionError, match=r"frame 200x100 exceeds the daemon's limits .*10000 pixels") as info:
            client.upscale_inline(np.zeros((100, 200, 4), np.uint8))
        assert info.value.code == ErrorCode.SIZE_TOO_LARGE and time.monotonic() - start < 1.0
        assert client.upscale_inline(np.zeros((50, 200, 4), np.uint8)).shape == (100, 400, 4)


def test_a_forked_child_leaving_a_with_block_exits_cleanly() -> None:
    """The child's __exit__ raised "created in another process": exit status 1 and a traceback, for a child that
    did nothing wrong; so did a session's close() in the child (found in a review). Requests in the child are still
    refused (test_a_client_used_after_fork_...)."""
    with run_server("--backend", "nearest") as daemon:
        script = ("import os, sys, warnings\nfrom upscaler_server.client import UpscalerClient\n"
                  # Python 3.12+ warns of any fork in a process with threads (the client's heartbeat)
                  "warnings.filterwarnings('ignore', 'This process .* is multi-threaded', DeprecationWarning)\n"
                  f"with UpscalerClient({daemon.endpoint!r}, name='pytest') as client:\n"
                  "    session = client.open_session(16, 16)\n"
                  "    pid = os.fork()\n"
                  "    if pid == 0:\n"
                  "        session.close()\n"  # the parent's rings: only marked closed, as client.close() does
                  "        sys.exit(0)\n"
                  "    _, status = os.waitpid(pid, 0)\n"
                  "print('child status', os.waitstatus_to_exitcode(status))\n")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "child status 0" in done.stdout, done.stderr
        assert done.stderr == "", done.stderr
        # a child that exits without a with block: the parent's client, still open, is not the child's to close
        # (the child's exit warned "an UpscalerClient ... was not closed; call close()")
        script = ("import os, sys, warnings\nfrom upscaler_server.client import UpscalerClient\n"
                  "warnings.filterwarnings('ignore', 'This process .* is multi-threaded', DeprecationWarning)\n"
                  f"client = UpscalerClient({daemon.endpoint!r}, name='pytest')\n"
                  "if os.fork() == 0:\n"
                  "    sys.exit(0)\n"
                  "os.wait()\n"
                  "client.close()\n")
        warned = [sys.executable, "-W", "default::ResourceWarning", "-c", script]  # the warning's category
        done = subprocess.run(warned, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "was not closed" not in done.stderr, done.stderr


def test_ctrl_c_right_after_a_reply_is_taken_does_not_lose_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt between taking the reply from the mailbox and dropping the frame from the queue lost the
    reply: the next call waited its whole timeout x attempts, then raised on a healthy daemon."""
    original_wait = Link.wait
    interrupts = [KeyboardInterrupt()]

    def wait_then_interrupt(link: Link, req: int, timeout: float) -> object:
        reply = original_wait(link, req, timeout)
        if reply is not None and interrupts:
            raise interrupts.pop()  # as a signal would, once the reply is taken
        return reply

    with run_server("--backend", "nearest") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=2, retries=1, name="pytest") as client:
        session = client.open_session(16, 16, "RGB8", slots=2)
        monkeypatch.setattr(Link, "wait", wait_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            session.upscale(np.full((16, 16, 3), 3, np.uint8))
        start = time.monotonic()
        assert (session.upscale(np.full((16, 16, 3), 5, np.uint8)) == 5).all()
        assert time.monotonic() - start < 1.0


def test_clients_and_sessions_refuse_to_be_copied_and_take_numpy_integers() -> None:
    """copy.copy() of a session shared its ring lists, so closing the copy broke the original (IndexError); of a
    client, its socket (ZMQError). np.int64 sizes, as frame.shape gives them, were refused as "not an integer"."""
    with run_server("--backend", "nearest") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=5, name="pytest") as client:
        session = client.open_session(np.int64(16), np.int64(8), "RGB8", slots=np.int32(2))
        for copier in (copy.copy, copy.deepcopy, pickle.dumps):
            for thing in (client, session):
                with pytest.raises(TypeError, match="cannot be copied or pickled"):
                    copier(thing)
        session.submit(np.int64(1))
        assert session.collect().slot == 1
        with pytest.raises(TypeError, match="slot must be an int, got '0'"):
            session.submit("0")
        assert session.output(np.int64(1)).shape == (16, 32, 3)  # 16 wide, 8 high, x2
        # the views check their slot as submit does (from the static review: input(1.5) raised a list's own
        # TypeError, input(True) returned slot 1's view)
        for slot in (1.5, True, "0"):
            for view in (session.input, session.output, session.submit):
                with pytest.raises(TypeError, match="slot must be an int"):
                    view(slot)
        with pytest.raises(SessionError, match=r"slot 2 is out of range \[0, 2\)"):
            session.input(2)
        # a bool is no int in the protocol: open_session(True, 8) opened a 1 px wide session, frame=True was sent
        bools = {"width": lambda: client.open_session(True, 8), "slots": lambda: client.open_session(8, 8, slots=False),
                 "frame": lambda: session.submit(0, frame=True)}  # fmt: skip
        for name, call in bools.items():
            with pytest.raises(TypeError, match=f"{name} must be an int, got"):
                call()
        with pytest.raises(ValueError, match="wait must be a number of seconds >= 0"):
            session.has_result(float("nan"))
        for wait in ("1", None):  # a TypeError, as collect's and the client's timeouts give
            with pytest.raises(TypeError, match="wait must be a number of seconds >= 0"):
                session.has_result(wait)
        # request's own retries/timeout are checked as the constructor's are (retries=-1 sent nothing and
        # reported "no reply after 0 attempt(s)"; timeout=0 gave up at once)
        ping = Ping(sessions=[])
        with pytest.raises(ValueError, match="retries must be an int >= 0"):
            client.request(ping, Pong, retries=-1)
        for timeout in (0, float("inf")):  # inf hung the caller forever on a stopped daemon
            with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
                client.request(ping, Pong, timeout=timeout)
        assert isinstance(client.request(ping, Pong, retries=0, timeout=5), Pong)
        with pytest.raises(ValueError, match="unknown pixel format ''"):
            client.upscale(np.zeros((8, 8, 3), np.uint8), pixel_format="")
        with pytest.raises(TypeError, match="endpoint must be a string or None and name a string"):
            UpscalerClient(5)
        session.close()
        for call in (session.free_slot, session.check_alive):
            with pytest.raises(SessionError, match="closed"):
                call()


class _RefusedSocket:
    """A socket.socket whose connect fails as one to another user's private socket does (root is never refused)."""

    def __init__(self, *args: object) -> None:
        pass

    def settimeout(self, timeout: float) -> None:
        pass

    def connect(self, path: str) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("how", ["faked", "real"])
def test_a_socket_this_user_may_not_connect_to_is_refused_at_once(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: pathlib.Path, how: str) -> None:
    """From the security review: the probe of an ipc socket ignored PermissionError (ZeroMQ does not report it), so
    a client pointed at another user's daemon waited every attempt's timeout (40 s) and then asked whether it was
    running. Tests cannot switch users: connect is made to fail as it would ("faked"); not as root, a socket of mode
    0000 refuses this user for real."""
    if how == "real" and os.geteuid() == 0:
        pytest.skip("root may connect to any socket")
    path = tmp_path / "d.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    mode = 0o600 if how == "faked" else 0
    path.chmod(mode)
    if how == "faked":
        monkeypatch.setattr(config, "socket", type("FakeSocketModule", (), {
            "socket": _RefusedSocket, "AF_UNIX": socket.AF_UNIX, "SOCK_STREAM": socket.SOCK_STREAM}))
    start = time.monotonic()
    try:
        with pytest.raises(ServerUnavailableError) as raised:
            UpscalerClient(f"ipc://{path}", timeout=2, retries=1)
    finally:
        listener.close()
    said = str(raised.value)
    assert time.monotonic() - start < 1.5, said
    assert (f"cannot use the upscaler daemon at ipc://{path}: permission denied on {path}: it belongs to uid "
            f"{os.geteuid()} (mode {mode:04o}) and this process runs as uid {os.geteuid()}; a daemon serves only its "
            "own user's clients") in said, said
    assert "is it running" not in said


def _count_submits(monkeypatch: pytest.MonkeyPatch) -> list[Submit]:
    """Every Submit the client sends from now on (a frame the daemon would compute), in a list that grows."""
    sent: list[Submit] = []
    original_send = Link.send

    def send(link: Link, msg: Message) -> int:
        if isinstance(msg, Submit):
            sent.append(msg)
        return original_send(link, msg)

    monkeypatch.setattr(Link, "send", send)
    return sent


def test_upscale_into_out_returns_out_holding_the_frame_and_a_wrong_shape_is_refused_unsent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """out= is filled and returned itself (no new array), for UpscalerClient.upscale and Session.upscale alike (no
    test ran that path). An out of the wrong shape is a ValueError before the frame is submitted: left to numpy, the
    error would come only after the daemon had computed the frame."""
    frame = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    expected = frame.repeat(2, 0).repeat(2, 1)  # the nearest backend's x2
    submits = _count_submits(monkeypatch)
    with run_server("--backend", "nearest") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=5, name="pytest") as client:
        session = client.open_session(20, 12, "RGB8", slots=2)
        for name, upscale in (("client", client.upscale), ("session", session.upscale)):
            buf = np.zeros((24, 40, 3), np.uint8)
            assert upscale(frame, out=buf) is buf, name
            assert np.array_equal(buf, expected), name
            sent = len(submits)
            for wrong in (np.zeros((40, 24, 3), np.uint8), np.zeros((24, 40, 4), np.uint8)):
                with pytest.raises(ValueError, match=r"out must be a \(24, 40, 3\) uint8 array"):
                    upscale(frame, out=wrong)
                assert not wrong.any(), name  # nothing written into it either
            assert len(submits) == sent, f"{name}: a frame was submitted for an out that was refused"
            buf = np.zeros((24, 40, 3), np.uint8)
            assert upscale(frame, out=buf) is buf and np.array_equal(buf, expected), name  # still works
        assert session.in_flight == [] and len(submits) == 4


def test_retry_busy_retries_busy_replies_and_re_raises_the_last_when_time_is_up() -> None:
    """Session.upscale and upscale_inline rely on it: a BUSY daemon (its queue full) is asked again after a short
    pause until it accepts, and a daemon that stays busy is reported as such (BusyError), not waited on forever nor
    given up on at the first BUSY."""
    calls: list[int] = []

    def busy_twice() -> str:
        calls.append(1)
        if len(calls) <= 2:
            raise BusyError("queue full")
        return "done"

    assert retry_busy(busy_twice, 5.0) == "done" and len(calls) == 3

    raised: list[BusyError] = []

    def always_busy() -> str:
        raised.append(BusyError(f"queue full {len(raised)}"))
        raise raised[-1]

    with pytest.raises(BusyError) as info:
        retry_busy(always_busy, 0.2)
    assert len(raised) > 1 and info.value is raised[-1]  # retried, then the last BusyError itself


def test_a_ring_the_client_cannot_attach_is_closed_on_the_daemon_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attaching the output ring failed after the daemon had opened the session: without a Close its segments stayed
    in /dev/shm until the lease ran out (10 s by default), and the input ring stayed mapped here. Both the explicit
    open_session() and upscale()'s own session are covered; once attaching works again, so does upscale()."""
    original_attach = Ring.attach
    refused: list[str] = []

    def attach(name: str, layout: RingLayout) -> Ring:
        if name.endswith("-out"):
            refused.append(name)
            raise SharedMemoryError(f"cannot attach shared memory {name}: refused by the test")
        return original_attach(name, layout)

    frame = np.full((16, 16, 3), 6, np.uint8)
    with run_server("--backend", "nearest") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=5, name="pytest") as client:
        monkeypatch.setattr(Ring, "attach", staticmethod(attach))
        for call in (lambda: client.open_session(16, 16, "RGB8", slots=2), lambda: client.upscale(frame)):
            with pytest.raises(SharedMemoryError, match="refused by the test") as info:
                call()
            assert daemon.segments() == [], f"the session of {refused[-1]} is still open on the daemon"
            input_name = refused[-1].removesuffix("-out") + "-in"
            with open("/proc/self/maps") as maps:  # unmapped at once, not when the garbage (the traceback) goes
                assert input_name.lstrip("/") not in maps.read(), "the input ring is still mapped"
            del info
        assert len(refused) == 2 and not any((SHM_DIR / name.lstrip("/")).exists() for name in refused)
        monkeypatch.undo()
        assert (client.upscale(frame) == 6).all()


def test_upscale_keeps_a_few_sessions_by_size_and_closes_the_ones_it_evicts() -> None:
    """upscale() opens a session per frame size it sees: a caller whose frame size keeps changing (a resized
    window) must not pile up sessions, and with them shared memory, on the daemon. The oldest is closed, on the
    daemon too, when a size past the last _AUTO_SESSIONS comes."""
    sizes = [(16 + 2 * i, 10 + i) for i in range(_AUTO_SESSIONS + 2)]  # (width, height), all distinct
    with run_server("--backend", "nearest") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=5, name="pytest") as client:
        segments: dict[tuple[int, int], set[str]] = {}
        sessions = {}
        for width, height in sizes:
            before = set(daemon.segments())
            frame = np.full((height, width, 3), width, np.uint8)
            assert (client.upscale(frame) == width).all()
            segments[width, height] = set(daemon.segments()) - before  # this size's session's two segments
            sessions[width, height] = client._auto[height, width, "RGB8"]
            assert len(client._auto) <= _AUTO_SESSIONS
        evicted, kept = sizes[:2], sizes[2:]
        assert all(len(segments[size]) == 2 for size in sizes), segments
        assert all(sessions[size].closed for size in evicted) and not any(sessions[size].closed for size in kept)
        assert set(daemon.segments()) == set().union(*(segments[size] for size in kept))
        width, height = kept[0]
        assert (client.upscale(np.full((height, width, 3), 1, np.uint8)) == 1).all()  # a kept size: no new session
        assert set(daemon.segments()) == set().union(*(segments[size] for size in kept))


def test_upscale_gives_up_its_older_sizes_sessions_when_the_daemon_has_no_room() -> None:
    """From a walkthrough: each client's upscale() kept up to 4 sessions, so 16 clients filled a daemon's 64 and the
    next was refused, told to "close unused sessions" it had never opened. A client now closes its own older sizes'
    sessions when the daemon is full, and the refusal says how many sessions the connection holds."""
    with run_server("--backend", "nearest", "--max-sessions", "3") as daemon, \
            UpscalerClient(daemon.endpoint, timeout=5, name="pytest") as client, \
            UpscalerClient(daemon.endpoint, timeout=5, name="other") as other:
        held = other.open_session(8, 8, "RGB8", slots=1)
        for width in (16, 18, 20):  # the third size finds the daemon full (3 sessions)
            assert (client.upscale(np.full((10, width, 3), width, np.uint8)) == width).all()
        assert [key[1] for key in client._auto] == [18, 20] and other.stats().sessions == 3
        with pytest.raises(SessionError, match=r"3 sessions are open \(1 of them on this connection\), the limit is 3; "
                                               r"close unused sessions \(a client library may hold some of its own"):
            other.open_session(8, 8, "RGB8", slots=1)
        held.close()


@pytest.mark.parametrize("which", FOREIGN_SEGMENTS)
def test_a_segment_the_daemon_would_not_name_so_is_refused(tmp_path: pathlib.Path, which: str) -> None:
    """From the second security review: the client mapped whatever segment of its user the opened reply named (if
    private, as the daemon's are), so a process answering in the daemon's place (one that took a tcp port first) had
    it write frames into another application's segment and return that one's bytes as the result. Now the name must
    be the one a daemon of this user gives this session's input or output (docs/protocol.md, section 6.1)."""
    endpoint = f"ipc://{tmp_path}/fake.sock"
    names = foreign_segment_names(which)
    said = (f"is named for uid {os.geteuid() + 1}, and this process runs as uid {os.geteuid()}"
            if which == "named for another uid" else f"the daemon named '{names['in']}' as session 7's input segment")
    with fake_daemon(endpoint, 2, names=names) as seen, UpscalerClient(endpoint, timeout=3, name="pytest") as client:
        with pytest.raises(SharedMemoryError, match=re.escape(said)):
            client.upscale(np.full((16, 16, 3), 1, np.uint8))
        assert untouched_segments(names)
    assert "submit" not in seen and seen[-1] == "close", seen

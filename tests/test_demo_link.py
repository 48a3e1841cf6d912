"""client_demo's daemon link: pipelined frames through shared memory, and reconnection after a daemon restart."""

from __future__ import annotations

import shutil
import signal
import time
from typing import Any

import numpy as np
import pytest

from client_demo.link import LinkState, UpscaleLink
from upscaler_server.client import Session

from server_utils import run_server, serve_here, short_tmpdir

LR = (32, 18)


def _round_trip(link: UpscaleLink, value: int, deadline: float = 45.0) -> np.ndarray:
    """Submit a flat frame of ``value`` whenever a slot is free until one comes back; return its output."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        slot = link.acquire()
        if slot is not None:
            link.input(slot)[...] = value
            link.submit(slot, value)
        for frame in link.poll(0.1):
            out = np.array(link.output(frame.slot))
            link.release(frame.slot)
            if frame.frame == value:
                return out
    pytest.fail(f"no frame came back within {deadline} s; link state {link.state}: {link.reason}")


def test_link_reconnects_to_a_restarted_daemon() -> None:
    folder = short_tmpdir()
    endpoint = f"ipc://{folder}/d.sock"
    link = UpscaleLink(endpoint, LR, scale=2, timeout=1.0)
    link.start()
    try:
        with run_server("--backend", "nearest", endpoint=endpoint):
            out = _round_trip(link, 7)
            assert out.shape == (LR[1] * 2, LR[0] * 2, 3) and (out == 7).all()
            assert link.ready and link.info is not None
            first = link.info.instance
        with run_server("--backend", "nearest", endpoint=endpoint):
            assert (_round_trip(link, 9) == 9).all()
            assert link.state is LinkState.READY and link.info.instance != first, "a new session on the new daemon"
    finally:
        link.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_link_refuses_a_scale_the_daemon_does_not_have() -> None:
    with run_server("--backend", "nearest", "--scale", "3") as daemon:
        link = UpscaleLink(daemon.endpoint, LR, scale=2, timeout=1.0)
        link.start()
        try:
            end = time.monotonic() + 30
            while link.state is LinkState.CONNECTING and time.monotonic() < end:
                link.poll(0.1)
            assert link.state is LinkState.FAILED and "--scale 3" in link.reason
        finally:
            link.close()


def _collect(link: UpscaleLink, count: int, deadline: float = 30.0) -> list:
    finished, end = [], time.monotonic() + deadline
    while len(finished) < count and time.monotonic() < end:
        for frame in link.poll(0.05):
            finished.append(frame)
            link.release(frame.slot)
    assert len(finished) == count, f"{len(finished)} of {count} frames came back; {link.state}: {link.reason}"
    return finished


def test_a_frame_rendered_while_the_daemon_works_is_sent_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frame 2 is submitted while frame 1 is still at the (here stopped) daemon: the worker used to block in
    collect() as soon as its queue was empty, so frame 2 waited in the demo and the daemon never had two frames.
    Frame 2's round trip counts from the render loop's submit, its wait in the demo's queue included."""
    in_flight_at_submit = []
    original_submit = Session.submit

    def counting_submit(self: Session, slot: int, frame: int | None = None) -> int:
        in_flight_at_submit.append(len(self.in_flight))
        return original_submit(self, slot, frame)

    monkeypatch.setattr(Session, "submit", counting_submit)
    with run_server("--backend", "nearest") as daemon:
        link = UpscaleLink(daemon.endpoint, LR, scale=2, timeout=10.0)
        link.start()
        try:
            _round_trip(link, 1)  # connected and warmed up
            in_flight_at_submit.clear()
            daemon.proc.send_signal(signal.SIGSTOP)
            try:
                first = link.acquire()
                link.submit(first, 2)
                time.sleep(0.3)  # the next frame renders
                second = link.acquire()
                link.submit(second, 3)
                time.sleep(0.5)
            finally:
                daemon.proc.send_signal(signal.SIGCONT)
            done = {frame.frame: frame for frame in _collect(link, 2)}
        finally:
            link.close()
    assert in_flight_at_submit == [0, 1]  # frame 3 went out while frame 2 was at the daemon
    assert done[3].round_trip >= 0.45 and done[2].round_trip >= 0.75
    assert all(frame.round_trip * 1e6 >= frame.timings.total_us for frame in done.values())


def test_closing_the_link_closes_its_session_on_the_daemon() -> None:
    """close() interrupted the worker at once, so its client never told the daemon: the session and its segments
    stayed until the lease expired (10 s by default), after every demo run."""
    with run_server("--backend", "nearest", "--lease-timeout", "60", "--log-level", "DEBUG") as daemon:
        link = UpscaleLink(daemon.endpoint, LR, scale=2, timeout=10.0)
        link.start()
        _round_trip(link, 1)
        assert daemon.segments()
        link.close()
        assert not link._worker.is_alive()
        assert daemon.segments() == [], "the session's segments outlived the demo's link"
        assert "closed by its client" in daemon.log()


def test_a_second_ctrl_c_during_close_still_ends_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Ctrl-C raised in close()'s wait for the worker skipped interrupting and joining it: the worker went
    on closing its client while the interpreter shut down, and printed a ZMQError traceback."""
    with run_server("--backend", "nearest") as daemon:
        link = UpscaleLink(daemon.endpoint, LR, scale=2, timeout=10.0)
        link.start()
        _round_trip(link, 1)
        worker, joins = link._worker, []
        real_join = type(worker).join

        def interrupted_join(self: object, timeout: float | None = None) -> None:
            joins.append(timeout)
            if len(joins) == 1:
                raise KeyboardInterrupt  # the second signal, during the grace wait
            real_join(worker, timeout)

        monkeypatch.setattr(type(worker), "join", interrupted_join)
        with pytest.raises(KeyboardInterrupt):
            link.close()
        assert not worker.is_alive() and len(joins) == 2


def test_closing_the_link_while_the_daemon_stalls_is_prompt() -> None:
    """The worker waits for a stalled daemon's frame up to the timeout several times over; closing used to give up
    on it after 2 s and leave it inside the client, whose sockets the interpreter then tore down under it at exit
    (a hang in zmq_ctx_term, or libzmq aborting the process)."""
    with run_server("--backend", "nearest") as daemon:
        link = UpscaleLink(daemon.endpoint, LR, scale=2, timeout=10.0)
        link.start()
        _round_trip(link, 1)
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            link.submit(link.acquire(), 2)
            time.sleep(0.5)  # the worker is now waiting for the frame
            start = time.monotonic()
            link.close()
            assert time.monotonic() - start < 1.5 and not link._worker.is_alive()
        finally:
            daemon.proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize(("stop_signal", "low", "high"), [(signal.SIGKILL, 0.5, 2.5), (signal.SIGSTOP, 1.8, 5.2)],
                         ids=["killed", "stopped"])
def test_a_lost_daemon_is_given_up_on_as_the_timeout_says(stop_signal: int, low: float, high: float) -> None:
    """--timeout 2: the daemon is pinged once a second while a frame waits; a dead one is found at the first ping
    (it used to wait for the timeout), a stopped one is waited for 2 s per ping. Waiting for the reply beside the job
    queue once added a whole timeout to both."""
    with run_server("--backend", "nearest", check_clean=False) as daemon:
        link = UpscaleLink(daemon.endpoint, LR, scale=2, timeout=2.0)
        link.start()
        try:
            _round_trip(link, 1)
            daemon.proc.send_signal(stop_signal)
            start = time.monotonic()
            link.submit(link.acquire(), 2)
            while link.state is LinkState.READY and time.monotonic() - start < 15:
                link.poll(0.05)
            elapsed = time.monotonic() - start
            assert link.state is LinkState.RETRYING and low < elapsed < high, (elapsed, link.reason)
            # a stopped daemon's reason named the new client's 0.5 s wait and asked whether the daemon runs
            why = "no longer running" if stop_signal == signal.SIGKILL else "no reply to a ping within 2 s nor to"
            assert why in link.reason, link.reason
        finally:
            if stop_signal == signal.SIGSTOP:
                daemon.proc.send_signal(signal.SIGCONT)
            link.close()


def test_a_sessions_first_frame_waits_out_the_daemons_warm_up_and_later_ones_do_not() -> None:
    """A daemon warms a session's size up before its first frame (auto measures its candidates, compile compiles):
    with the demo's --backend auto, a first run at 1280x720 on this CPU took 18 s, and the link gave frames up after
    twice --timeout (20 s), then reconnected into the same wait. Here the warm-up takes 3 s and --timeout is 0.5 s:
    the two frames sent during it come back (the second, sent behind the first, was given up as soon as the first was
    answered), and a frame that hangs after them is still given up after 1 s."""
    from upscaler_server.engine import NearestEngine

    class SlowEngine(NearestEngine):
        def prepare(self, height: int, width: int, fmt: Any) -> None:
            time.sleep(3.0)  # on the engine thread: the daemon answers pings meanwhile

        def upscale(self, lr: np.ndarray, fmt: Any, out: np.ndarray) -> Any:
            time.sleep(4.0 if lr[0, 0, 0] == 99 else 0.2)  # 99: a frame that hangs while the daemon answers pings
            return super().upscale(lr, fmt, out)

    with serve_here(SlowEngine(2)) as daemon:
        link = UpscaleLink(daemon.endpoint, LR, scale=2, timeout=0.5)
        link.start()
        try:
            start = time.monotonic()
            for frame in (1, 2):  # both sent during the warm-up; the second waits 0.2 s behind the first's answer
                slot = link.acquire()
                while slot is None:  # connecting
                    link.poll(0.05)
                    slot = link.acquire()
                link.input(slot)[...] = frame
                link.submit(slot, frame)
            assert sorted(frame.frame for frame in _collect(link, 2, deadline=20.0)) == [1, 2]
            assert time.monotonic() - start >= 3.0 and link.state is LinkState.READY and link.reason == ""
            slot = link.acquire()
            link.input(slot)[...] = 99
            link.submit(slot, 99)
            start = time.monotonic()
            while link.state is LinkState.READY and time.monotonic() - start < 10:
                link.poll(0.05)
            elapsed = time.monotonic() - start
            assert link.state is LinkState.RETRYING and "frame 99 got no reply" in link.reason, link.reason
            assert 0.9 < elapsed < 3.0, elapsed
        finally:
            link.close()

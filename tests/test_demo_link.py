"""client_demo's daemon link: pipelined frames through shared memory, and reconnection after a daemon restart."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from client_demo.link import LinkState, UpscaleLink

from server_utils import run_server, short_tmpdir

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

"""The daemon's activity log: events counted into one line a minute, failures of its own as warnings."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from upscaler_server.activity import Activity
from upscaler_server.client import UpscalerClient
from upscaler_server.errors import ErrorCode
from upscaler_server.protocol import Done, Error, Timings

from server_utils import REPO, run_server, stop

TIMINGS = Timings(queue_us=0, copy_in_us=0, infer_us=0, copy_out_us=0, total_us=0)


def _error(code: ErrorCode, message: str) -> Error:
    return Error(req=1, code=int(code), name=code.name, message=message)


def test_events_are_counted_into_one_line_a_period_and_failures_warned_of_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = [100.0]
    activity = Activity(every_s=60, clock=lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="upscaler_server"):
        for _ in range(3):
            activity.session_opened()
            activity.replied(Done(req=1, session=1, slot=0, frame=0, timings=TIMINGS))
            activity.replied(_error(ErrorCode.BUSY, "the queue is full"))
            activity.replied(_error(ErrorCode.INFERENCE_ERROR, "out of memory"))
        activity.session_ended()
        clock[0] += 59
        activity.report_if_due()  # not yet a minute: nothing written
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        clock[0] += 1
        activity.report_if_due()
        clock[0] += 120
        activity.report_if_due()  # nothing happened in this period: no line
        activity.replied(_error(ErrorCode.INFERENCE_ERROR, "out of memory again"))  # a new period warns again
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("WARNING", "a frame failed (INFERENCE_ERROR): out of memory (further ones in this minute are only counted)"),
        ("INFO", "activity in the last 60 s: 3 session(s) opened; 3 frame(s) done; 1 session(s) ended; error "
                 "replies: BUSY 3, INFERENCE_ERROR 3"),
        ("WARNING", "a frame failed (INFERENCE_ERROR): out of memory again (further ones in this minute are only "
                    "counted)"),
    ]


def test_a_client_opening_a_session_per_frame_does_not_flood_the_log() -> None:
    """From the operations review: a line per session opened and ended, about 2,400 lines a second from an open/close
    loop, and two a frame from a game whose resolution keeps changing (upscale() keeps 4 sessions); journald's
    default allowance then ran out in seconds and dropped the daemon's errors with the rest."""
    with run_server("--backend", "nearest", check_clean=False) as daemon, \
            UpscalerClient(daemon.endpoint, timeout=10, name="pytest") as client:
        for height in [8, 10, 12, 14, 16] * 20:  # five sizes round and round: a session opened and closed each frame
            client.upscale(np.zeros((height, 16, 3), np.uint8))
        client.close()
        assert stop(daemon.proc) == 0
        log = daemon.log()
    assert len(log.splitlines()) < 10, log
    summary = re.search(r"activity in the last \d+ s: (\d+) session\(s\) opened; (\d+) frame\(s\) done; (\d+) "
                        r"session\(s\) ended", log)
    assert summary is not None and [int(n) for n in summary.groups()] == [100, 100, 100], log


def test_the_version_and_the_limits_defaults_are_told() -> None:
    """From the operations review: no --version, no version in the ready line, and --help gave no default for the
    limits, the lease or the log level, which no document listed either."""
    from upscaler_server import __version__
    from upscaler_server.config import Config

    version = subprocess.run([sys.executable, "-m", "upscaler_server", "--version"], capture_output=True, text=True,
                             cwd=REPO, timeout=60)
    assert version.returncode == 0 and version.stdout == f"takdsr-upscaler {__version__}\n", version.stderr
    usage = subprocess.run([sys.executable, "-m", "upscaler_server", "--help"], capture_output=True, text=True,
                           cwd=REPO, timeout=60, env={**os.environ, "COLUMNS": "200"})
    defaults = Config(endpoint="ipc://unused")
    for option, value in (("--max-sessions", defaults.max_sessions), ("--max-queue", defaults.max_queue),
                          ("--lease-timeout", defaults.lease_timeout), ("--log-level", "INFO")):
        assert re.search(rf"{option} \S+\s+.*default {value}", usage.stdout), (option, usage.stdout)
    with run_server("--backend", "nearest") as daemon:
        assert re.search(rf"upscaler ready: .* version={re.escape(__version__)} pid={daemon.pid}\n", daemon.log())

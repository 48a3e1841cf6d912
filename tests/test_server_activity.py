"""The daemon's activity log (events counted into one line a minute, failures of its own as warnings) and its
statistics (the ``stats`` request: counts since the start and its latest frames' times)."""

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
from upscaler_server.protocol import RECENT_FRAMES_MAX, Done, Error, Pong, Result, Timings
from upscaler_server.stats import DaemonStats

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
        ("WARNING", "a request failed (INFERENCE_ERROR): out of memory (further ones in this minute are only counted)"),
        ("INFO", "activity in the last 60 s: 3 session(s) opened; 3 frame(s) done; 1 session(s) ended; error "
                 "replies: BUSY 3, INFERENCE_ERROR 3"),
        ("WARNING", "a request failed (INFERENCE_ERROR): out of memory again (further ones in this minute are only "
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


def _done(total_us: int, infer_us: int) -> Done:
    timings = Timings(queue_us=0, copy_in_us=0, infer_us=infer_us, copy_out_us=0, total_us=total_us)
    return Done(req=1, session=1, slot=0, frame=0, timings=timings)


def test_statistics_count_replies_by_kind_and_give_percentiles_of_the_latest_frames() -> None:
    clock = [50.0]
    stats = DaemonStats(clock=lambda: clock[0])
    empty = stats.statistics(3, "ab", sessions=0, queued=0)
    assert (empty.req, empty.uptime_ms, empty.frames_done, empty.recent_frames) == (3, 0, 0, 0)
    assert (empty.total_us_p50, empty.total_us_p99, empty.infer_us_p50, empty.infer_us_p99) == (0, 0, 0, 0)
    for total in np.random.default_rng(0).permutation(np.arange(1, 101)):  # 1..100 us in any order
        stats.replied(_done(int(total), int(total) * 10))
    for code in (ErrorCode.BUSY, ErrorCode.BUSY, ErrorCode.INFERENCE_ERROR, ErrorCode.SHM_ERROR, ErrorCode.INTERNAL,
                 ErrorCode.UNKNOWN_SESSION, ErrorCode.SHUTTING_DOWN):
        stats.replied(_error(code, "m"))
    stats.replied(Pong(req=1, sessions=[], instance="ab"))  # not a frame
    clock[0] += 2.5
    now = stats.statistics(7, "ab", sessions=2, queued=1)
    assert (now.req, now.instance, now.uptime_ms, now.sessions, now.queued) == (7, "ab", 2500, 2, 1)
    assert (now.frames_done, now.frames_failed, now.frames_busy, now.recent_frames) == (100, 3, 2, 100)
    # nearest rank: the 50th and the 99th of the 100 values, values that occurred
    assert (now.total_us_p50, now.total_us_p99, now.infer_us_p50, now.infer_us_p99) == (50, 99, 500, 990)
    stats.replied(Result(req=2, frame=0, width=2, height=1, format="RGB8", pixels=bytes(6),
                         timings=Timings(queue_us=0, copy_in_us=0, infer_us=1, copy_out_us=0, total_us=1)))
    assert stats.statistics(8, "ab", sessions=0, queued=0).frames_done == 101  # inline frames count as well


def test_statistics_times_are_of_the_latest_frames_only() -> None:
    stats = DaemonStats()
    for total in range(1, 501):
        stats.replied(_done(total, 0))
    for total in range(10_000, 10_000 + RECENT_FRAMES_MAX):  # these alone remain
        stats.replied(_done(total, 0))
    now = stats.statistics(1, "ab", sessions=0, queued=0)
    assert (now.frames_done, now.recent_frames) == (500 + RECENT_FRAMES_MAX, RECENT_FRAMES_MAX)
    assert now.total_us_p50 == 10_000 + RECENT_FRAMES_MAX // 2 - 1
    assert now.total_us_p99 == 10_000 + -(-RECENT_FRAMES_MAX * 99 // 100) - 1


def test_a_live_daemon_reports_its_sessions_frames_and_times() -> None:
    with run_server("--backend", "nearest") as daemon, UpscalerClient(daemon.endpoint, timeout=10) as client:
        before = client.stats()
        assert (before.sessions, before.queued, before.frames_done, before.recent_frames) == (0, 0, 0, 0)
        session = client.open_session(32, 16, "RGB8", slots=2)
        for _ in range(5):
            session.upscale(np.zeros((16, 32, 3), np.uint8))
        client.upscale_inline(np.zeros((16, 32, 3), np.uint8))
        after = client.stats()
        assert (after.sessions, after.queued, after.frames_done, after.recent_frames) == (1, 0, 6, 6)
        assert (after.frames_failed, after.frames_busy) == (0, 0)
        assert 0 < after.total_us_p50 <= after.total_us_p99
        assert after.infer_us_p50 <= after.total_us_p50 and after.infer_us_p99 <= after.total_us_p99
        assert after.uptime_ms >= before.uptime_ms and after.instance == before.instance
        session.close()
        assert client.stats().sessions == 0

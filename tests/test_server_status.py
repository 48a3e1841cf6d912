"""``python -m upscaler_server.status`` (``takdsr-status``): what a daemon serves and what it has done, or a clear
exit status when there is none."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from upscaler_server import status
from upscaler_server.client import UpscalerClient
from upscaler_server.errors import ErrorCode, ProtocolError
from upscaler_server.protocol import Statistics, Welcome

from server_utils import REPO, run_server, short_tmpdir

WELCOME = Welcome(server="takdsr-upscaler/9.9.9", instance="ab12", versions=[1], model="rlfn_s", scale=2,
                  device="cuda:0", precision="fp16", random_weights=True, formats=["RGB8"], min_size=15,
                  max_width=3840, max_height=2160, max_pixels=3840 * 2160, max_slots=8, max_sessions=64, max_queue=16,
                  lease_ms=10_000, heartbeat_ms=2500)


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "upscaler_server.status", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def test_a_live_daemon_is_described_in_lines_and_in_json() -> None:
    with run_server("--backend", "nearest", "--threads", "1") as daemon:
        with UpscalerClient(daemon.endpoint, timeout=10) as client:
            for _ in range(3):
                client.upscale(np.zeros((18, 32, 3), np.uint8))
        lines = _status("--endpoint", daemon.endpoint)
        as_json = _status("--endpoint", daemon.endpoint, "--json")
    assert lines.returncode == 0, lines.stderr
    assert f"daemon at {daemon.endpoint}: takdsr-upscaler/" in lines.stdout
    assert "model nearest, x2 on cpu (uint8)" in lines.stdout
    assert "0 session(s) open (at most 64), 0 frame(s) queued (BUSY at 16)" in lines.stdout
    assert "frames: 3 done, 0 failed, 0 refused BUSY" in lines.stdout
    assert "latest 3 frame(s): total p50 " in lines.stdout
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["endpoint"] == daemon.endpoint and report["welcome"]["model"] == "nearest"
    assert report["statistics"]["frames_done"] == 3 and report["statistics"]["recent_frames"] == 3
    assert "req" not in report["welcome"] and "req" not in report["statistics"]


def test_no_daemon_is_exit_1_and_a_bad_endpoint_exit_2() -> None:
    folder = short_tmpdir()
    try:
        missing = _status("--endpoint", f"ipc://{folder}/none.sock")
    finally:
        folder.rmdir()
    assert missing.returncode == 1 and "no upscaler daemon at" in missing.stderr, missing.stderr
    assert missing.stdout == ""
    bad = _status("--endpoint", "bogus")
    assert bad.returncode == 2 and "endpoints look like" in bad.stderr, bad.stderr
    assert _status("--timeout", "0").returncode == 2


def test_a_daemon_older_than_the_stats_request_is_still_described() -> None:
    class OldDaemonClient:
        def stats(self) -> Statistics:
            raise ProtocolError("unknown request type 'stats'", ErrorCode.UNKNOWN_TYPE)

    class BrokenDaemonClient:
        def stats(self) -> Statistics:
            raise ProtocolError("the reply broke the schema", ErrorCode.INVALID_FIELD)

    assert status.statistics_or_none(OldDaemonClient()) is None  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        status.statistics_or_none(BrokenDaemonClient())  # type: ignore[arg-type]
    text = status.describe("tcp://127.0.0.1:5555", WELCOME, None)
    assert text.splitlines() == [
        "daemon at tcp://127.0.0.1:5555: takdsr-upscaler/9.9.9, instance ab12",
        "model rlfn_s, x2 on cuda:0 (fp16) [RANDOM WEIGHTS: its output is noise]",
        "statistics: this daemon does not offer them (older than the stats request)",
    ]


def test_counts_and_times_are_written_for_a_reader() -> None:
    stats = Statistics(instance="ab12", uptime_ms=3 * 3600_000 + 2 * 60_000 + 59_000, sessions=2, queued=1,
                       frames_done=12, frames_failed=1, frames_busy=4, recent_frames=12, total_us_p50=8123,
                       total_us_p99=12_400, infer_us_p50=6900, infer_us_p99=10_015)
    assert status.describe("ipc:///x", WELCOME, stats).splitlines()[2:] == [
        "up 3 h 02 min; 2 session(s) open (at most 64), 1 frame(s) queued (BUSY at 16)",
        "frames: 12 done, 1 failed, 4 refused BUSY",
        "latest 12 frame(s): total p50 8.12 ms, p99 12.40 ms; model p50 6.90 ms, p99 10.02 ms",
    ]
    idle = Statistics(instance="ab12", uptime_ms=999, sessions=0, queued=0, frames_done=0, frames_failed=0,
                      frames_busy=0, recent_frames=0, total_us_p50=0, total_us_p99=0, infer_us_p50=0, infer_us_p99=0)
    assert "latest" not in status.describe("ipc:///x", WELCOME, idle)  # no frame yet: no times to give
    assert [status._duration(s) for s in (0.4, 59, 65, 3600, 86400 * 2 + 7 * 3600 + 5)] == [
        "0 s", "59 s", "1 min 05 s", "1 h 00 min", "2 d 07 h"]


def _statistics(instance: str = "ab12", **counts: int) -> Statistics:
    fields = dict(uptime_ms=1000, sessions=0, queued=0, frames_done=0, frames_failed=0, frames_busy=0,
                  recent_frames=0, total_us_p50=0, total_us_p99=0, infer_us_p50=0, infer_us_p99=0)
    return Statistics(instance=instance, **{**fields, **counts})


def test_an_interval_is_the_difference_of_two_replies_and_one_line() -> None:
    earlier = _statistics(frames_done=100, frames_failed=1, frames_busy=2)
    later = _statistics(frames_done=160, frames_failed=3, frames_busy=2, sessions=1, queued=2, recent_frames=160,
                        total_us_p50=2100, total_us_p99=3400, infer_us_p50=1200)
    span = status.interval(earlier, later, 0.5)
    assert (span.frames_done, span.frames_failed, span.frames_busy, span.frames_per_second) == (60, 2, 0, 120.0)
    line = status.describe_interval(span)
    assert re.fullmatch(r"\d\d:\d\d:\d\d  120\.0 frames/s, 2 failed, 0 refused BUSY; 1 session\(s\), 2 queued; "
                        r"latest 160: total p50 2\.10 ms, p99 3\.40 ms, model p50 1\.20 ms", line), line
    assert "latest" not in status.describe_interval(status.interval(earlier, _statistics(frames_done=100), 1.0))


def test_a_watch_ends_when_the_daemon_is_another_or_offers_no_statistics(capsys: pytest.CaptureFixture[str]) -> None:
    class RestartedDaemonClient:
        endpoint = "ipc:///x"

        def __init__(self) -> None:
            self.replies = [_statistics(frames_done=5), _statistics("cd34")]

        def stats(self) -> Statistics:
            return self.replies.pop(0)

    client = RestartedDaemonClient()
    assert status._watch(client, WELCOME, _statistics(), 0.01, None, False) == 1  # type: ignore[arg-type]
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and "frames/s, 0 failed" in out  # one interval: the first daemon's
    assert "restarted (instance ab12 is now cd34)" in err and not client.replies
    assert status._watch(client, WELCOME, None, 0.01, 3, False) == 1  # type: ignore[arg-type]
    assert "does not offer statistics to watch" in capsys.readouterr().err


def test_a_live_daemon_is_watched_in_json_lines_until_it_stops() -> None:
    """Every frame is counted in exactly one interval; Ctrl-C ends a watch with 0, a daemon that goes away with 1."""
    with run_server("--backend", "nearest", "--threads", "1") as daemon:
        sending = threading.Event()

        def send_frames() -> None:
            with UpscalerClient(daemon.endpoint, timeout=10) as client:
                while sending.is_set():
                    client.upscale(np.zeros((18, 32, 3), np.uint8))
                    time.sleep(0.005)

        sending.set()
        sender = threading.Thread(target=send_frames)
        sender.start()
        try:
            watched = _status("--endpoint", daemon.endpoint, "--watch", "0.2", "--count", "5", "--json")
        finally:
            sending.clear()
            sender.join()
        interrupted = subprocess.Popen([sys.executable, "-m", "upscaler_server.status", "--endpoint", daemon.endpoint,
                                        "--watch", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       cwd=REPO)
        _wait_for_lines(interrupted, 2)
        interrupted.send_signal(signal.SIGINT)
        assert interrupted.wait(timeout=30) == 0, interrupted.stderr.read() if interrupted.stderr else ""
        outlived = subprocess.Popen([sys.executable, "-m", "upscaler_server.status", "--endpoint", daemon.endpoint,
                                     "--watch", "0.1", "--timeout", "1"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=REPO)
        _wait_for_lines(outlived, 5)
    _, err = outlived.communicate(timeout=30)
    assert outlived.returncode == 1 and "takdsr-status: " in err, err
    assert watched.returncode == 0, watched.stderr
    first, *spans = [json.loads(line) for line in watched.stdout.splitlines()]
    assert len(spans) == 5 and first["welcome"]["model"] == "nearest"
    counted = first["statistics"]["frames_done"] + sum(span["frames_done"] for span in spans)
    assert counted == spans[-1]["statistics"]["frames_done"] and sum(span["frames_done"] for span in spans) > 0
    for span in spans:
        assert span["frames_per_second"] == pytest.approx(span["frames_done"] / span["seconds"])
        assert span["statistics"]["instance"] == first["welcome"]["instance"]
    assert _status("--count", "2").returncode == 2 and _status("--watch", "0").returncode == 2


def _wait_for_lines(process: subprocess.Popen[str], count: int) -> None:
    """Read ``count`` lines of ``process``'s output (a watch's header and intervals), failing if it ends first."""
    assert process.stdout is not None
    for _ in range(count):
        assert process.stdout.readline(), f"the watch ended early: {process.wait(timeout=30)}"

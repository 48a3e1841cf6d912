"""``python -m upscaler_server.status`` (``takdsr-status``): what a daemon serves and what it has done, or a clear
exit status when there is none."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO

import numpy as np
import pytest

from upscaler_server import status
from upscaler_server.client import UpscalerClient
from upscaler_server.errors import ErrorCode, ProtocolError
from upscaler_server.protocol import Statistics, Welcome

from server_utils import REPO, Daemon, run_server, short_tmpdir

WELCOME = Welcome(server="takdsr-upscaler/9.9.9", instance="ab12", versions=[1], model="rlfn_s", scale=2,
                  device="cuda:0", precision="fp16", random_weights=True, formats=["RGB8"], min_size=15,
                  max_width=3840, max_height=2160, max_pixels=3840 * 2160, max_slots=8, max_sessions=64, max_queue=16,
                  lease_ms=10_000, heartbeat_ms=2500)


def _status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "upscaler_server.status", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def _statistics(instance: str = "ab12", **counts: int) -> Statistics:
    fields = dict(uptime_ms=1000, sessions=0, queued=0, frames_done=0, frames_failed=0, frames_busy=0,
                  recent_frames=0, total_us_p50=0, total_us_p99=0, infer_us_p50=0, infer_us_p99=0)
    return Statistics(instance=instance, **{**fields, **counts})


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


def test_wait_asks_until_a_daemon_answers_and_gives_up_when_none_does() -> None:
    """A script that starts a daemon in the background and at once runs a client failed: the model takes seconds to
    load (found following the C client's README). `--wait` asks again until the daemon serves."""
    folder = short_tmpdir()
    endpoint = f"ipc://{folder}/d.sock"
    try:
        started = time.monotonic()
        none = _status("--endpoint", endpoint, "--wait", "0.7")
        took = time.monotonic() - started
        waiting = subprocess.Popen([sys.executable, "-m", "upscaler_server.status", "--endpoint", endpoint, "--wait",
                                    "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        time.sleep(1.0)  # it asks before the daemon exists
        assert waiting.poll() is None, waiting.communicate()
        with run_server("--backend", "nearest", "--threads", "1", endpoint=endpoint):
            out, err = waiting.communicate(timeout=60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert none.returncode == 1 and "no upscaler daemon at" in none.stderr and "(asked for 0.7 s)" in none.stderr
    assert took >= 0.5, f"gave up after {took:.2f} s"
    assert waiting.returncode == 0 and f"daemon at {endpoint}: takdsr-upscaler/" in out, err


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
    idle = _statistics(uptime_ms=999)
    assert "latest" not in status.describe("ipc:///x", WELCOME, idle)  # no frame yet: no times to give
    assert [status._duration(s) for s in (0.4, 59, 65, 3600, 86400 * 2 + 7 * 3600 + 5)] == [
        "0 s", "59 s", "1 min 05 s", "1 h 00 min", "2 d 07 h"]


def test_an_interval_is_the_difference_of_two_replies_and_one_line() -> None:
    earlier = _statistics(frames_done=100, frames_failed=1, frames_busy=2)
    later = _statistics(frames_done=160, frames_failed=3, frames_busy=2, sessions=1, queued=2, recent_frames=160,
                        total_us_p50=2100, total_us_p99=3400, infer_us_p50=1200)
    span = status.interval(earlier, later, 0.5)
    assert (span.frames_done, span.frames_failed, span.frames_busy, span.frames_per_second) == (60, 2, 0, 120.0)
    line = status.describe_interval(span)
    assert re.fullmatch(r"\d\d:\d\d:\d\d  120\.0 frames/s, 2 failed, 0 refused BUSY; 1 session\(s\), 2 queued; "
                        r"latest 160 frame\(s\): total p50 2\.10 ms, p99 3\.40 ms; model p50 1\.20 ms, p99 0\.00 ms",
                        line), line
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


@pytest.fixture(scope="module")
def watched() -> Iterator[Daemon]:
    with run_server("--backend", "nearest", "--threads", "1") as daemon:
        yield daemon


def test_a_watch_counts_every_frame_once_in_json_lines(watched: Daemon) -> None:
    """Each interval's counts are its two replies' difference, and the frames a client sent meanwhile all show."""
    sending, sent = threading.Event(), []

    def send_frames() -> None:
        with UpscalerClient(watched.endpoint, timeout=10) as client:
            while sending.is_set():
                client.upscale(np.zeros((18, 32, 3), np.uint8))
                sent.append(1)
                time.sleep(0.005)

    sending.set()
    sender = threading.Thread(target=send_frames)
    sender.start()
    try:
        run = _status("--endpoint", watched.endpoint, "--watch", "0.2", "--count", "5", "--json")
    finally:
        sending.clear()
        sender.join()
    assert run.returncode == 0, run.stderr
    first, *spans = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(spans) == 5 and first["welcome"]["model"] == "nearest"
    before = first["statistics"]
    for span in spans:
        now = span["statistics"]
        assert now["instance"] == first["welcome"]["instance"]
        assert [span[k] for k in ("frames_done", "frames_failed", "frames_busy")] == [
            now[k] - before[k] for k in ("frames_done", "frames_failed", "frames_busy")]
        assert span["frames_per_second"] == pytest.approx(span["frames_done"] / span["seconds"])
        assert 0.2 <= span["seconds"] < 5
        before = now
    assert 0 < spans[-1]["statistics"]["frames_done"] <= len(sent)  # frames of this client alone (a new daemon)
    assert sum(span["frames_done"] for span in spans) > 0


def test_ctrl_c_ends_a_watch_with_0_and_before_any_answer_with_130(watched: Daemon) -> None:
    """Ctrl-C is how a watch ends; before the daemon answered it is an interruption, as without --watch."""
    watch = _start_watch(watched.endpoint, "--json")
    lines = _Lines(watch)
    json.loads(lines.next())  # the daemon described: the watch has begun
    json.loads(lines.next())  # and one interval
    watch.send_signal(signal.SIGINT)
    assert watch.wait(timeout=30) == 0, lines.rest()
    os.kill(watched.pid, signal.SIGSTOP)  # a daemon that does not answer (yet)
    try:
        early = _start_watch(watched.endpoint, "--timeout", "30")
        time.sleep(1.0)
        early.send_signal(signal.SIGINT)
        said, _ = early.communicate(timeout=30)  # stderr is in stdout
    finally:
        os.kill(watched.pid, signal.SIGCONT)
    assert early.returncode == 130 and "takdsr-status: interrupted" in said, said


def test_a_watch_into_a_closed_pipe_ends_quietly(watched: Daemon) -> None:
    """`takdsr-status --watch 1 | head` is how a watch is sampled: no traceback when head has what it wanted."""
    command = (f"{shlex.quote(sys.executable)} -m upscaler_server.status --endpoint {watched.endpoint} "
               "--watch 0.05 --json | head -n 2 >/dev/null; echo ${PIPESTATUS[0]}")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.stdout == "141\n" and done.stderr == "", done


def test_a_watch_ends_with_1_when_the_daemon_goes_away() -> None:
    with run_server("--backend", "nearest", "--threads", "1") as daemon:
        watch = _start_watch(daemon.endpoint, "--json", "--timeout", "1")
        lines = _Lines(watch)
        json.loads(lines.next())
        json.loads(lines.next())
    assert watch.wait(timeout=30) == 1
    assert "takdsr-status: no upscaler daemon at" in lines.rest(), "the reason should be said"


def test_watch_arguments_out_of_range_are_usage_errors() -> None:
    for args in (["--count", "2"], ["--watch", "0"], ["--watch", "1e10"], ["--watch", "nan"], ["--watch", "x"],
                 ["--watch", "1", "--count", "0"], ["--timeout", "1e300"], ["--wait", "0"], ["--wait", "-1"]):
        run = _status(*args)
        assert run.returncode == 2 and "usage:" in run.stderr, (args, run.stderr)


def _start_watch(endpoint: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "upscaler_server.status", "--endpoint", endpoint, "--watch", "0.1",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


class _Lines:
    """A process's output read by a thread, so that waiting for a line can time out instead of hanging the suite."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert process.stdout is not None
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout: float = 30) -> str:
        line = self._lines.get(timeout=timeout)
        assert line is not None, "the watch ended early"
        return line

    def rest(self, timeout: float = 30) -> str:
        """What the process writes until it ends."""
        text = []
        while (line := self._lines.get(timeout=timeout)) is not None:
            text.append(line)
        return "".join(text)

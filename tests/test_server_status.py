"""``python -m upscaler_server.status`` (``takdsr-status``): what a daemon serves and what it has done, or a clear
exit status when there is none."""

from __future__ import annotations

import json
import subprocess
import sys

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

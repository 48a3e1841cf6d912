"""The daemon's frame queue (bounded, round-robin across sessions) and its engine worker, without sockets."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from upscaler_server.engine import NearestEngine
from upscaler_server.errors import BusyError, ErrorCode, UpscalerError
from upscaler_server.protocol import PIXEL_FORMATS
from upscaler_server.scheduler import FairQueue, Job, Worker

RGB = PIXEL_FORMATS["RGB8"]


def _job(frame: int, lr: np.ndarray | None = None) -> Job:
    """A frame job, or a warm-up without ``lr``."""
    out = None if lr is None else np.empty((lr.shape[0] * 2, lr.shape[1] * 2, lr.shape[2]), np.uint8)
    return Job([b"id"], req=frame, frame=frame, fmt=RGB, height=4, width=4, received=0.0, lr=lr, out=out,
               warmup=lr is None)


def test_sessions_are_served_round_robin() -> None:
    q = FairQueue(capacity=10)
    for frame in (1, 2, 3):
        q.put("a", _job(frame))
    q.put("b", _job(10))
    q.put("c", _job(20))
    q.put("b", _job(11))
    assert [q.get().frame for _ in range(6)] == [1, 10, 20, 2, 11, 3]  # type: ignore[union-attr]
    assert len(q) == 0


def test_capacity_counts_frames_not_warm_ups() -> None:
    frame = np.zeros((4, 4, 3), np.uint8)
    q = FairQueue(capacity=2)
    q.put("a", _job(0))  # warm-up
    q.put("a", _job(1, frame))
    q.put("b", _job(2, frame))
    with pytest.raises(BusyError) as info:
        q.put("a", _job(3, frame))
    assert info.value.code == ErrorCode.BUSY
    q.put("c", _job(4))  # warm-ups always fit
    assert len(q) == 2
    assert q.get().frame == 0  # type: ignore[union-attr]
    assert len(q) == 2


def test_drop_and_close() -> None:
    q = FairQueue(capacity=5)
    q.put("a", _job(1))
    q.put("a", _job(2))
    q.put("b", _job(3))
    assert [j.frame for j in q.drop("a")] == [1, 2]
    assert [j.frame for j in q.close()] == [3]
    assert q.get() is None
    with pytest.raises(UpscalerError) as info:
        q.put("a", _job(4))
    assert info.value.code == ErrorCode.SHUTTING_DOWN


def test_worker_runs_jobs_and_reports_failures() -> None:
    q = FairQueue(capacity=5)
    finished: list[Job] = []
    done = threading.Event()

    def on_finished(job: Job) -> None:
        finished.append(job)
        if len(finished) == 3:
            done.set()

    worker = Worker(NearestEngine(2), q, on_finished)
    worker.start()
    good = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    q.put("a", _job(1, good))
    q.put("a", _job(2))  # warm-up job: no pixels
    q.put("a", _job(3, np.zeros((4, 4, 4), np.uint8)))  # 4 channels for an RGB8 job: the engine refuses
    assert done.wait(10)
    q.close()
    worker.join(10)
    assert not worker.is_alive()
    ok, warm, bad = finished
    assert ok.error is None and ok.times is not None
    np.testing.assert_array_equal(ok.out, np.repeat(np.repeat(good, 2, 0), 2, 1))
    assert warm.warmup and warm.error is None
    assert bad.error is not None and bad.error[0] == ErrorCode.INFERENCE_ERROR

"""The daemon's frame queue (bounded, round-robin across sessions) and its engine worker, without sockets."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from upscaler_server.engine import NearestEngine, StageTimes
from upscaler_server.errors import BusyError, EngineError, ErrorCode, UpscalerError
from upscaler_server.protocol import PIXEL_FORMATS, PixelFormat
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


def test_a_full_queue_still_takes_the_first_frame_of_a_session_with_none_waiting() -> None:
    """From a walkthrough: a client with 24 frames in flight kept the queue full, and a 1-slot client won only the
    places it happened to find free (about 70 % of its share)."""
    frame = np.zeros((4, 4, 3), np.uint8)
    greedy, polite = [_job(n, frame) for n in (1, 2, 3)], [_job(n, frame) for n in (10, 11)]
    for job in greedy + polite:
        job.session = object()  # type: ignore[assignment]  (session frames: their pixels wait in their slots)
    q = FairQueue(capacity=2)
    q.put("greedy", greedy[0])
    q.put("greedy", greedy[1])
    with pytest.raises(BusyError):
        q.put("greedy", greedy[2])
    q.put("polite", polite[0])  # none of its own waits: admitted past the capacity
    with pytest.raises(BusyError):
        q.put("polite", polite[1])  # its second is not
    with pytest.raises(BusyError):
        q.put("inline", _job(20, frame))  # nor an inline frame, whose pixels the job itself holds
    assert len(q) == 3 and [q.get().frame for _ in range(3)] == [1, 10, 2]  # type: ignore[union-attr]


def test_drop_and_close() -> None:
    lr = np.zeros((4, 4, 3), np.uint8)
    q = FairQueue(capacity=5)
    q.put("a", _job(1, lr))
    q.put("a", _job(2, lr))
    q.put("b", _job(3, lr))
    assert [j.frame for j in q.drop("a")] == [1, 2]
    assert len(q) == 1  # the dropped frames free their places
    for frame in (5, 6, 7, 8):  # up to the capacity again
        q.put("c", _job(frame, lr))
    with pytest.raises(BusyError):
        q.put("c", _job(9, lr))
    assert [j.frame for j in q.close()] == [3, 5, 6, 7, 8]
    assert q.get() is None
    assert not q.wait()  # closed: returns at once
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


def test_get_never_blocks_and_wait_does_until_a_job_or_the_close() -> None:
    q = FairQueue(capacity=2)
    assert q.get() is None  # empty: returns at once
    waited: list[bool] = []
    waiter = threading.Thread(target=lambda: waited.append(q.wait()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # nothing queued yet
    q.put("a", _job(1))
    waiter.join(10)
    assert waited == [True]
    assert q.get().frame == 1  # type: ignore[union-attr]
    waiter = threading.Thread(target=lambda: waited.append(q.wait()))
    waiter.start()
    q.close()
    waiter.join(10)
    assert waited == [True, False]


class _TwoInFlight(NearestEngine):
    """Records when frames start and are waited for; the frame numbered ``fail_on`` fails when waited for."""

    max_in_flight = 2

    def __init__(self, fail_on: int = -1) -> None:
        super().__init__(2)
        self.log: list[tuple[str, int]] = []
        self.fail_on = fail_on

    def start(self, lr: np.ndarray, fmt: PixelFormat, out: np.ndarray) -> Callable[[], StageTimes]:
        frame = int(lr[0, 0, 0])
        self.log.append(("start", frame))

        def wait() -> StageTimes:
            self.log.append(("wait", frame))
            if frame == self.fail_on:
                raise EngineError("the device failed")
            return self.upscale(lr, fmt, out)

        return wait


def _run_worker(engine: NearestEngine, jobs: list[Job], expected: int) -> list[Job]:
    """Queue ``jobs`` before the worker starts, let it finish ``expected`` of them, close; the finished ones."""
    q, finished, done = FairQueue(capacity=10), [], threading.Event()

    def on_finished(job: Job) -> None:
        finished.append(job)
        if len(finished) == expected:
            done.set()

    for job in jobs:
        q.put("a", job)
    worker = Worker(engine, q, on_finished)
    worker.start()
    assert done.wait(10), f"only {len(finished)} of {expected} jobs finished"
    q.close()
    worker.join(10)
    assert not worker.is_alive()
    return finished


def _frame(number: int) -> np.ndarray:
    return np.full((4, 4, 3), number, np.uint8)


def test_worker_starts_the_next_frame_before_waiting_for_one() -> None:
    engine = _TwoInFlight()
    finished = _run_worker(engine, [_job(n, _frame(n)) for n in (1, 2, 3)], expected=3)
    assert engine.log == [("start", 1), ("start", 2), ("wait", 1), ("start", 3), ("wait", 2), ("wait", 3)]
    assert [job.frame for job in finished] == [1, 2, 3]  # replies in the order the frames were taken
    for job in finished:
        assert job.error is None and job.times is not None
        np.testing.assert_array_equal(job.out, np.repeat(np.repeat(job.lr, 2, 0), 2, 1))


def test_worker_finishes_a_lone_frame_without_waiting_for_another() -> None:
    engine = _TwoInFlight()
    (job,) = _run_worker(engine, [_job(7, _frame(7))], expected=1)  # nothing else is ever queued
    assert engine.log == [("start", 7), ("wait", 7)] and job.error is None


def test_worker_reports_a_frame_that_fails_when_waited_for_and_goes_on() -> None:
    engine = _TwoInFlight(fail_on=2)
    jobs = [_job(1, _frame(1)), _job(2, _frame(2)), _job(0), _job(3, _frame(3))]  # _job(0): a warm-up between
    finished = _run_worker(engine, jobs, expected=4)
    assert [job.frame for job in finished] == [1, 2, 0, 3]
    failed = finished[1]
    assert failed.error == (ErrorCode.INFERENCE_ERROR, "the device failed") and failed.times is None
    assert all(job.error is None for job in finished if job is not failed)


class _Held(NearestEngine):
    """Runs a frame only once ``gate`` is set: a frame the daemon's stop cannot wait for."""

    def __init__(self) -> None:
        super().__init__(2)
        self.gate = threading.Event()
        self.running = threading.Event()

    def upscale(self, lr: np.ndarray, fmt: PixelFormat, out: np.ndarray) -> StageTimes:
        self.running.set()
        self.gate.wait(30)
        return super().upscale(lr, fmt, out)


def test_an_abandoned_frame_is_returned_once_and_never_handed_back() -> None:
    """A stop that does not wait for the running frame answers it itself: abandon() gives it to the caller, and the
    worker, finishing it later, must not hand it back too (its client would get two replies to one request)."""
    engine, q, finished = _Held(), FairQueue(capacity=5), []
    worker = Worker(engine, q, finished.append)
    worker.start()
    running = _job(1, _frame(1))
    q.put("a", running)
    q.put("a", _job(2, _frame(2)))
    assert engine.running.wait(10)
    assert [job.frame for job in q.close()] == [2]  # the queued one goes back to the caller as before
    assert worker.abandon() == [running]
    assert worker.abandon() == []  # once only
    engine.gate.set()
    worker.join(10)
    assert not worker.is_alive()
    assert finished == []


def test_abandoning_a_worker_that_handed_everything_back_returns_nothing() -> None:
    engine, q, finished = _Held(), FairQueue(capacity=5), []
    engine.gate.set()
    worker = Worker(engine, q, finished.append)
    worker.start()
    q.put("a", _job(1, _frame(1)))
    q.put("a", _job(0))  # a warm-up
    deadline = time.monotonic() + 10
    while len(finished) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    q.close()
    worker.join(10)
    assert not worker.is_alive()
    assert worker.abandon() == []
    assert [job.frame for job in finished] == [1, 0]

"""Frame jobs, a bounded round-robin queue across sessions, and the engine's worker thread.

The transport thread puts jobs; one worker thread takes them, runs the engine and hands each finished job back
through a callback. Fairness: each session (or inline client) has its own FIFO and the worker serves the FIFOs in
turn, so one client with many slots in flight cannot starve another.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import numpy as np

from upscaler_server.engine import Engine, StageTimes
from upscaler_server.errors import BusyError, ErrorCode, UpscalerError
from upscaler_server.protocol import PixelFormat
from upscaler_server.sessions import Session
from upscaler_server.shm import SlotFrame

__all__ = ["FairQueue", "Job", "Worker"]

log = logging.getLogger("upscaler_server.scheduler")


@dataclass(eq=False)
class Job:
    """One frame (or a warm-up: no pixels, no reply) and where its reply goes."""

    envelope: list[bytes]  # ZeroMQ routing frames of the requester
    req: int
    frame: int
    fmt: PixelFormat
    height: int
    width: int
    received: float  # perf_counter() when the request arrived
    lr: np.ndarray | None = None  # (H, W, C) pixels: an inline frame's, or with --map-slots a view of the slot
    out: np.ndarray | None = None  # (sH, sW, C): where the result goes
    session: Session | None = None  # None: an inline (process) frame
    slot: int = 0
    slot_frame: SlotFrame | None = None  # a session frame's slots, which the kernel copies (the default)
    warmup: bool = False  # prepare the engine for this size and format; no pixels
    started: float = 0.0
    times: StageTimes | None = None
    error: tuple[ErrorCode, str] | None = None  # code and message only: a traceback would pin its buffers

    def drop_buffers(self) -> None:
        self.lr = self.out = None
        self.slot_frame = None


class FairQueue:
    """Queue of jobs keyed by session, bounded to ``capacity`` frames plus one of each session that has no other
    (warm-ups are not counted: they hold no pixels); :meth:`get` serves the keys round-robin. Thread-safe."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._fifos: collections.OrderedDict[Hashable, collections.deque[Job]] = collections.OrderedDict()
        self._count = 0  # frames queued, warm-ups excluded
        self._closed = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        """Frames waiting (warm-ups excluded)."""
        with self._cond:
            return self._count

    def put(self, key: Hashable, job: Job) -> None:
        """Queue ``job``; BusyError when ``capacity`` frames already wait, unless it is a session's frame and that
        session has none waiting. The round-robin then runs it after one frame of each other session; before, a
        greedier client that resubmits at once kept the queue full and won most of the places that came free (a
        1-slot client got about 70 % of its share). Still bounded: by the sessions (max_sessions), whose pixels wait in
        their own slots."""
        with self._cond:
            if self._closed:
                raise UpscalerError("the daemon is shutting down", ErrorCode.SHUTTING_DOWN)
            if self._count >= self._capacity and not job.warmup and not self._first_of_its_session(key, job):
                raise BusyError(f"{self._count} frames are queued (limit {self._capacity}); retry in a few ms or "
                                "keep fewer frames in flight")
            self._fifos.setdefault(key, collections.deque()).append(job)
            self._count += not job.warmup
            self._cond.notify()

    def _first_of_its_session(self, key: Hashable, job: Job) -> bool:
        """A session's frame while no other frame of that session waits (warm-ups aside)."""
        return job.session is not None and not any(not queued.warmup for queued in self._fifos.get(key, ()))

    def wait(self) -> bool:
        """Block until a job waits (True) or the queue is closed (False)."""
        with self._cond:
            while not self._fifos and not self._closed:
                self._cond.wait()
            return not self._closed

    def get(self) -> Job | None:
        """Next job, or None at once when none waits (always, once the queue is closed)."""
        with self._cond:
            if self._closed or not self._fifos:
                return None
            key, fifo = next(iter(self._fifos.items()))
            job = fifo.popleft()
            self._count -= not job.warmup
            if fifo:
                self._fifos.move_to_end(key)  # the next key gets the next turn
            else:
                del self._fifos[key]
            return job

    def drop(self, key: Hashable) -> list[Job]:
        """Remove and return the queued jobs of ``key`` (a session that ended)."""
        with self._cond:
            jobs = list(self._fifos.pop(key, ()))
            self._count -= sum(not job.warmup for job in jobs)
            return jobs

    def close(self) -> list[Job]:
        """Refuse new jobs, wake the worker, and return every job that was still queued."""
        with self._cond:
            self._closed = True
            jobs = [job for fifo in self._fifos.values() for job in fifo]
            self._fifos.clear()
            self._count = 0
            self._cond.notify_all()
            return jobs


class Worker(threading.Thread):
    """Runs the engine on queued jobs until the queue closes; ``finished`` gets each job back (any thread), in the
    order the jobs were taken. An engine with ``max_in_flight`` 2 gets the next frame while it works on one (CUDA:
    one frame's copies overlap the other's compute); with nothing else queued, the frame is finished at once."""

    def __init__(self, engine: Engine, queue: FairQueue, finished: Callable[[Job], None]) -> None:
        super().__init__(name="upscaler-engine", daemon=True)  # daemon: a forced stop must not wait for a frame
        self._engine = engine
        self._queue = queue
        self._finished = finished
        self._lock = threading.Lock()  # orders taking and handing back jobs against abandon()
        self._taken: list[Job] = []  # jobs taken from the queue and not handed back yet (at most max_in_flight)
        self._abandoned = False

    def abandon(self) -> list[Job]:
        """For a stop that will not wait for the running frames (forced, or the drain ran out), once the queue is
        closed: returns the jobs taken and not handed back yet, and from now on none is handed back, so the caller
        answers each of them itself, exactly once. Empty when the worker has ended."""
        with self._lock:
            self._abandoned = True
            taken, self._taken = self._taken, []
            return taken

    def busy_since(self) -> float | None:
        """``perf_counter()`` when the engine took up the oldest frame (or warm-up) it has not finished, or None when
        it has none: how long the engine has been on one job, for the service manager's watchdog."""
        with self._lock:
            return self._taken[0].started if self._taken else None

    def run(self) -> None:
        in_flight: collections.deque[tuple[Job, Callable[[], StageTimes] | None]] = collections.deque()
        while True:
            if not in_flight and not self._queue.wait():
                return  # closed, and every frame taken is finished
            job = self._take()  # None: nothing queued (with frames in flight), or a session's frames were dropped
            if job is not None:
                in_flight.append((job, self._start(job)))
            if in_flight and (job is None or len(in_flight) >= self._engine.max_in_flight):
                self._finish(*in_flight.popleft())
            del job  # the transport thread drops the job's buffers; hold none here

    def _take(self) -> Job | None:
        # taken and listed in one step, so abandon() never finds a job taken but not listed (it would get no answer)
        with self._lock:
            job = self._queue.get()
            if job is not None:
                job.started = time.perf_counter()
                self._taken.append(job)
            return job

    def _start(self, job: Job) -> Callable[[], StageTimes] | None:
        """Begin the job; returns what waits for its frame, or None when it is already done (or failed)."""
        with self._errors_into(job):
            if job.warmup:
                self._engine.prepare(job.height, job.width, job.fmt)
            elif job.slot_frame is not None:
                return self._engine.start_copied(job.slot_frame, job.fmt)
            else:
                assert job.lr is not None and job.out is not None
                if job.session is not None:  # --map-slots: views of the mapping; checked again, as the frame waited
                    job.session.check_segments()
                return self._engine.start(job.lr, job.fmt, job.out)
        return None

    def _finish(self, job: Job, wait: Callable[[], StageTimes] | None) -> None:
        if wait is not None:
            with self._errors_into(job):
                job.times = wait()
        with self._lock:
            if self._abandoned:  # answered already by whoever abandoned it
                return
            self._taken.remove(job)
            self._finished(job)

    @contextlib.contextmanager
    def _errors_into(self, job: Job) -> Iterator[None]:
        """An engine error becomes the job's error reply; the worker itself never dies of one."""
        try:
            yield
        except UpscalerError as exc:
            job.error = (exc.code, str(exc))
        except Exception as exc:  # a bug or an unexpected backend error must not kill the worker
            log.exception("engine failed on a %dx%d frame", job.width, job.height)
            job.error = (ErrorCode.INFERENCE_ERROR, f"inference failed: {type(exc).__name__}: {exc}")

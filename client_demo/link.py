"""The demo's connection to the upscaler daemon, driven from a worker thread so the render loop never waits on a socket.

The render loop (main thread) owns the session's slots: it takes a free slot, renders straight into the slot's
zero-copy shared-memory view, submits it and later gets a :class:`Finished` frame whose output it reads and releases.
The worker thread owns the :class:`UpscalerClient` (which is not thread-safe): it submits, collects in submission
order (``PIPELINE_DEPTH`` frames in flight: frame n+1 renders while frame n upscales), retries BUSY replies and,
when the daemon is gone or restarted, reconnects with exponential backoff. Checking a silent daemon blocks for up to
the client's timeout, which is why it runs here and not in the render loop.

Shared-memory views must not outlive the mapping, so after a lost connection the worker waits until the main thread
has dropped its views (a ``_Released`` message) before it closes the old session.
"""

from __future__ import annotations

import collections
import enum
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from upscaler_server.client import Session, UpscalerClient
from upscaler_server.config import nobody_listens
from upscaler_server.errors import (
    BusyError,
    ErrorCode,
    ServerUnavailableError,
    SessionError,
    SessionLostError,
    UpscalerError,
)
from upscaler_server.protocol import Timings, Welcome

__all__ = ["PIPELINE_DEPTH", "Finished", "LinkState", "UpscaleLink", "first_reply_limit"]

PIPELINE_DEPTH = 2  # frames in flight (and slots): one upscaling while the next renders
PIXEL_FORMAT = "RGB8"  # what scenes renders; the daemon maps other orders itself
CONNECT_TIMEOUT = 2.0  # s for the hello of a local daemon: a dead endpoint is noticed quickly
BACKOFF = (0.25, 4.0)  # s between reconnection attempts: first, largest (doubling in between)
BUSY_PAUSE = 0.005  # s before resubmitting a frame the daemon refused as BUSY
IDLE_POLL = 0.05  # s the worker waits for a job before checking for shutdown again
RESULT_POLL = 0.002  # s the worker waits for a frame's reply before looking for the next job again
CLOSE_GRACE = 0.5  # s close() lets the worker end by itself (closing its session) before interrupting its waits
LIVENESS = 1.0  # s between pings while a frame is out: a daemon that died or stopped is noticed this soon
WHY_PROBE = 0.5  # s a new client waits for a hello when a daemon did not answer a ping, to say why (_why_silent)
# s a session's frames may take, while the daemon answers pings, until its first one is answered: they wait behind
# the daemon's warm-up of the session's size (auto's measuring, compile's compilation: tens of seconds on a CPU)
FIRST_FRAME_GRACE = 120.0


class LinkState(enum.Enum):
    CONNECTING = "connecting"  # first attempt under way
    READY = "ready"  # session open: frames can be submitted
    RETRYING = "retrying"  # daemon unreachable or session lost; reconnecting with backoff
    FAILED = "failed"  # the daemon refused this stream (size, format, scale): retrying cannot help


@dataclass(frozen=True)
class Finished:
    """An upscaled frame; read ``UpscaleLink.output(slot)`` and then ``release(slot)``."""

    slot: int
    frame: int
    round_trip: float  # s from the render loop's submit to the daemon's done reaching the worker
    timings: Timings  # the daemon's own measurements


@dataclass(frozen=True)
class _Connected:
    epoch: int
    info: Welcome
    inputs: list[np.ndarray]
    outputs: list[np.ndarray]


@dataclass(frozen=True)
class _Lost:
    epoch: int
    reason: str
    retry_in: float | None  # None: the worker has given up (refused stream)
    session_lost: bool = False  # the daemon answered, but no longer knows the session (lease expired, restart)


@dataclass(frozen=True)
class _Done:
    epoch: int
    finished: Finished


@dataclass(frozen=True)
class _Job:
    epoch: int
    slot: int
    frame: int
    submitted: float  # time.perf_counter() of UpscaleLink.submit: the round trip counts the wait in the job queue


@dataclass(frozen=True)
class _Released:
    epoch: int


@dataclass
class _InFlight:
    """A frame the worker has submitted: its slot, its frame id, when the render loop submitted it (the round
    trip), when the worker sent it (how long the daemon has had it: the worker may have waited in between, stopped
    with the whole demo by Ctrl-Z), and when the daemon was last asked whether it is alive."""

    slot: int
    frame: int
    submitted: float
    sent: float
    checked: float


# Open errors that no retry can fix (others, such as RESOURCE_LIMIT, may clear up when other clients leave).
_REFUSALS = {ErrorCode.SIZE_TOO_LARGE, ErrorCode.SIZE_TOO_SMALL, ErrorCode.UNSUPPORTED_FORMAT}


class _Refused(Exception):
    """The daemon cannot serve this stream at all (wrong scale, size or format)."""


class _Worker(threading.Thread):
    def __init__(self, endpoint: str | None, size: tuple[int, int], scale: int, timeout: float,
                 jobs: queue.Queue[_Job | _Released], events: queue.Queue[_Connected | _Lost | _Done]) -> None:
        super().__init__(name="upscale-link", daemon=True)
        self._endpoint, self._size, self._scale, self._timeout = endpoint, size, scale, timeout
        self._jobs, self._events = jobs, events
        self._backoff = BACKOFF[0]
        self._client: UpscalerClient | None = None  # the connection's client, for interrupt()
        self.halt = threading.Event()

    def interrupt(self) -> None:
        """After ``halt`` is set: end a wait for the daemon now (a stalled or dead daemon's frame waits up to the
        timeout several times over). The worker then closes its client itself: ZeroMQ sockets are not thread-safe."""
        client = self._client
        if client is not None:
            client.interrupt()

    def run(self) -> None:
        epoch = 0
        while not self.halt.is_set():
            epoch += 1
            try:
                self._connection(epoch)
            except UpscalerError:
                pass  # reported by _connection; try again after the pause
            except Exception as exc:  # a bug here must not leave the demo waiting for a link that never comes
                self._events.put(_Lost(epoch, f"internal error in the upscaler link: {exc!r}", None))
                raise
            self.halt.wait(self._backoff)
            self._backoff = min(self._backoff * 2, BACKOFF[1])

    def _connection(self, epoch: int) -> None:
        """One connection: hello, open, serve until halted or an error, which is reported before the client is
        closed (the main thread must drop its views of the old rings first)."""
        client: UpscalerClient | None = None
        handed_out = False
        try:
            client = UpscalerClient(self._endpoint, timeout=min(self._timeout, CONNECT_TIMEOUT), retries=0,
                                    name="takdsr-demo")
            self._client = client  # before halt is read: close() either interrupts it or the check below sees halt
            if self.halt.is_set():
                return
            client.timeout, client.retries = self._timeout, 1
            session = self._open(client)
            self._events.put(_Connected(epoch, client.info, [session.input(i) for i in range(session.slots)],
                                        [session.output(i) for i in range(session.slots)]))
            handed_out, self._backoff = True, BACKOFF[0]
            self._serve(session, epoch)
        except _Refused as exc:
            self._events.put(_Lost(epoch, str(exc), None))
            self.halt.set()
        except UpscalerError as exc:
            self._events.put(_Lost(epoch, str(exc), self._backoff, isinstance(exc, SessionLostError)))
            raise
        finally:
            if handed_out and not self.halt.is_set():
                self._await_release(epoch)
            if client is not None:
                client.close()
            self._client = None

    def _open(self, client: UpscalerClient) -> Session:
        if client.scale != self._scale:
            raise _Refused(f"the daemon upscales x{client.scale} but the demo was asked for x{self._scale}; "
                           f"pass --scale {client.scale}")
        if client.info.max_slots < PIPELINE_DEPTH:  # RESOURCE_LIMIT, which no retry can fix for this daemon
            raise _Refused(f"the daemon allows {client.info.max_slots} frame(s) in flight per session and the demo "
                           f"keeps {PIPELINE_DEPTH}; start it with --max-slots {PIPELINE_DEPTH} or more")
        width, height = self._size
        try:
            return client.open_session(width, height, PIXEL_FORMAT, slots=PIPELINE_DEPTH)
        except SessionError as exc:
            if exc.code in _REFUSALS:
                raise _Refused(f"the daemon refused {width}x{height} {PIXEL_FORMAT} frames: {exc}") from exc
            raise

    def _serve(self, session: Session, epoch: int) -> None:
        """Submit jobs and collect their frames in order. The oldest frame's reply is waited for in short slices
        (a reply ends a slice at once), and the job queue is read between them, so frame n+1 reaches the daemon
        while it finishes frame n. A frame without a reply after ``timeout`` has the daemon checked (a dead or
        stalled one ends the connection), and after twice that it is given up, as collect() itself would; until the
        session's first frame is answered, after FIRST_FRAME_GRACE at least (the daemon's warm-up of the size comes
        first), and the frames sent meanwhile count their wait from that answer. While a frame waits, the daemon is
        pinged about once a second: one that died or was stopped ends the connection within about a second, not
        after the timeout."""
        sent: collections.deque[_InFlight] = collections.deque()  # in the session's order
        give_up_after = first_reply_limit(self._timeout)
        while not self.halt.is_set():
            if sent:
                full = len(sent) >= PIPELINE_DEPTH  # no job can come: wait longer per slice
                if session.has_result(IDLE_POLL if full else RESULT_POLL):
                    if self._collect(session, sent, epoch) and give_up_after > 2 * self._timeout:
                        give_up_after = 2 * self._timeout
                        _warm_up_over(sent, time.perf_counter())
                    continue
                self._check_overdue(session, sent[0], give_up_after)
                if full:
                    continue
            try:
                job = self._jobs.get_nowait() if sent else self._jobs.get(timeout=IDLE_POLL)
            except queue.Empty:
                continue
            if isinstance(job, _Job) and job.epoch == epoch:
                frame, now = session.submit(job.slot, job.frame), time.perf_counter()
                sent.append(_InFlight(job.slot, frame, job.submitted, now, now))

    def _collect(self, session: Session, sent: collections.deque[_InFlight], epoch: int) -> bool:
        """The oldest frame's reply; False when it was BUSY (the frame is submitted again)."""
        oldest = sent.popleft()
        try:
            result = session.collect()
        except BusyError:  # not accepted: the slot is free again, so submit it anew (now last in order)
            time.sleep(BUSY_PAUSE)
            session.submit(oldest.slot, oldest.frame)
            sent.append(oldest)
            return False
        finished = Finished(oldest.slot, oldest.frame, time.perf_counter() - oldest.submitted, result.timings)
        self._events.put(_Done(epoch, finished))
        return True

    def _check_overdue(self, session: Session, oldest: _InFlight, give_up_after: float) -> None:
        now = time.perf_counter()
        waited = now - oldest.sent
        if waited > give_up_after:
            raise ServerUnavailableError(f"frame {oldest.frame} got no reply in {waited:.1f} s although the daemon "
                                         "answers pings; is it overloaded? (a frame is given up after twice "
                                         "--timeout: raise it above one frame's upscale time)")
        if now - oldest.checked > min(LIVENESS, self._timeout):
            self._check_alive(session)
            oldest.checked = time.perf_counter()

    def _check_alive(self, session: Session) -> None:
        """session.check_alive(): raises for a daemon that is gone, stalled (no pong within the timeout) or that no
        longer knows the session. Its error says only that the daemon does not answer; a new client says why."""
        try:
            session.check_alive()
        except ServerUnavailableError as exc:
            raise ServerUnavailableError(self._why_silent(exc), exc.code) from exc

    def _why_silent(self, exc: ServerUnavailableError) -> str:
        """Why the daemon did not answer: none listens on an ipc endpoint any more (it exited, or died and left its
        socket file), or, when a new client's hello gets no answer within WHY_PROBE s either, it is silent (stopped,
        hung, overloaded, or gone from a tcp endpoint). The new client's own error named its WHY_PROBE s wait and
        asked whether the daemon runs, also of one that a SIGSTOP had stopped."""
        gone = nobody_listens(self._endpoint)
        if gone is not None:
            return f"the upscaler daemon stopped answering: no upscaler daemon at {self._endpoint}: {gone}"
        try:
            UpscalerClient(self._endpoint, timeout=WHY_PROBE, retries=0, heartbeat=False, name="takdsr-demo").close()
        except ServerUnavailableError:
            return (f"the upscaler daemon at {self._endpoint} stopped answering: no reply to a ping within "
                    f"{max(self._timeout, 1.0):g} s nor to a new connection within {WHY_PROBE:g} s (is it stopped, "
                    "hung or overloaded?)")
        return str(exc)  # a daemon answers again: a restarted one, which the reconnection finds

    def _await_release(self, epoch: int) -> None:
        """Wait (briefly) until the main thread has dropped its views of this connection's shared memory."""
        deadline = time.monotonic() + 2.0
        while not self.halt.is_set() and time.monotonic() < deadline:
            try:
                message = self._jobs.get(timeout=IDLE_POLL)
            except queue.Empty:
                continue
            if isinstance(message, _Released) and message.epoch == epoch:
                return


def first_reply_limit(timeout: float) -> float:
    """Seconds after which a session's frames are given up until its first one is answered (later: 2 x timeout)."""
    return max(2 * timeout, FIRST_FRAME_GRACE)


def _warm_up_over(sent: collections.deque[_InFlight], now: float) -> None:
    """The session's first frame is answered: the frames sent behind it waited for the warm-up too, and their own
    wait (given up after twice the timeout) begins now."""
    for frame in sent:
        frame.sent = max(frame.sent, now)


class UpscaleLink:
    """Main-thread side of the link: slot ownership, state for the HUD, and the worker thread.

    ``timeout`` is the seconds to wait for any reply before reconnecting; a frame is given up after about twice
    that (CPU inference of a large frame takes seconds, so keep it well above one frame's time)."""

    def __init__(self, endpoint: str | None, lr_size: tuple[int, int], scale: int, timeout: float) -> None:
        self.endpoint = endpoint
        self._jobs: queue.Queue[_Job | _Released] = queue.Queue()
        self._events: queue.Queue[_Connected | _Lost | _Done] = queue.Queue()
        self._worker = _Worker(endpoint, lr_size, scale, timeout, self._jobs, self._events)
        self.state = LinkState.CONNECTING
        self.reason = ""  # why the last connection ended
        # the last connection ended because the daemon, which answered, no longer knew the session; kept when the next
        # connection opens, which can happen within one poll() (the caller then sees `connection` change, not RETRYING)
        self.session_lost = False
        self.retry_at = 0.0  # time.monotonic() of the next attempt while RETRYING
        self.info: Welcome | None = None
        self._epoch = 0
        self._inputs: list[np.ndarray] = []
        self._outputs: list[np.ndarray] = []
        self._free: set[int] = set()
        self._in_flight: set[int] = set()
        self._progress = time.monotonic()  # last finished frame, or the submit that ended an idle spell

    def start(self) -> None:
        self._worker.start()

    def close(self, wait: float = 5.0) -> None:
        """Stop the worker; its client closes the session. Views of the slots become invalid. The worker ends within
        about 0.1 s of an interrupted wait, or after a connection attempt under way (CONNECT_TIMEOUT): it must be
        gone before the interpreter exits, or the client's sockets are torn down under it."""
        self._drop_views()
        self._drain()  # queued news may hold views too, and the worker is about to unmap
        self._worker.halt.set()
        try:
            if self._worker.is_alive():
                # a worker that sees halt closes its session with the daemon, which frees the segments at once; an
                # interrupted one cannot wait for that reply, and the daemon's lease frees them seconds later
                self._worker.join(CLOSE_GRACE)
        except KeyboardInterrupt:  # a second Ctrl-C: no waiting for the session's close, but the worker must end
            self._end_worker(wait)
            raise
        self._end_worker(wait)

    def _end_worker(self, wait: float) -> None:
        self._worker.interrupt()
        if self._worker.is_alive():
            self._worker.join(wait)
        self._drain()

    @property
    def ready(self) -> bool:
        return self.state is LinkState.READY

    @property
    def connection(self) -> int:
        """The number of the current (or last) connection: it grows with each new one, so frames submitted on an
        older number are lost with their session."""
        return self._epoch

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def acquire(self) -> int | None:
        """A free slot to render into (then :meth:`submit` it), or None when not connected or all are busy."""
        if not self.ready or not self._free:
            return None
        slot = min(self._free)
        self._free.discard(slot)
        return slot

    def input(self, slot: int) -> np.ndarray:
        """Zero-copy (height, width, 3) RGB view of input slot ``slot`` in shared memory, row 0 at the top."""
        return self._inputs[slot]

    def output(self, slot: int) -> np.ndarray:
        """Zero-copy (height*s, width*s, 3) view of output slot ``slot``; valid until the slot is released."""
        return self._outputs[slot]

    def waiting(self) -> float:
        """Seconds the oldest frame in flight has gone without news (0 when none is in flight)."""
        return time.monotonic() - self._progress if self._in_flight else 0.0

    def submit(self, slot: int, frame: int) -> None:
        if not self._in_flight:
            self._progress = time.monotonic()
        self._in_flight.add(slot)
        self._jobs.put(_Job(self._epoch, slot, frame, time.perf_counter()))

    def release(self, slot: int) -> None:
        """Give a finished slot back for the next frame."""
        if self.ready:
            self._free.add(slot)

    def poll(self, timeout: float = 0.0) -> list[Finished]:
        """Wait up to ``timeout`` s for news from the worker, apply all there is, and return the finished frames."""
        try:
            event = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            return []
        finished: list[Finished] = []
        while True:
            self._apply(event, finished)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return finished

    def _apply(self, event: _Connected | _Lost | _Done, finished: list[Finished]) -> None:
        if isinstance(event, _Connected):
            self._epoch, self.info, self.state, self.reason = event.epoch, event.info, LinkState.READY, ""
            self._inputs, self._outputs = event.inputs, event.outputs
            self._free, self._in_flight = set(range(len(event.inputs))), set()
        elif isinstance(event, _Lost):
            self._drop_views()
            finished.clear()  # their slots' views are gone
            self.reason, self.session_lost = event.reason, event.session_lost
            self.state = LinkState.FAILED if event.retry_in is None else LinkState.RETRYING
            self.retry_at = time.monotonic() + (event.retry_in or 0.0)
            self._jobs.put(_Released(event.epoch))
        elif event.epoch == self._epoch and self.ready:  # else a frame of a connection that is gone
            self._in_flight.discard(event.finished.slot)
            self._progress = time.monotonic()
            finished.append(event.finished)

    def _drain(self) -> None:
        while True:
            try:
                self._events.get_nowait()
            except queue.Empty:
                return

    def _drop_views(self) -> None:
        self._inputs, self._outputs = [], []
        self._free, self._in_flight = set(), set()

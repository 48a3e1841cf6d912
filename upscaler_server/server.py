"""The daemon's transport: a ZeroMQ ROUTER socket, message dispatch, sessions, leases and shutdown.

One thread (the caller of :meth:`Server.serve`) owns the socket and the sessions; a :class:`Worker` thread runs the
engine. Finished jobs come back through a queue plus a byte on a pipe that the socket poller also watches. Every
client mistake becomes an ``error`` reply and the loop carries on. Shutdown (after :meth:`Server.request_stop`, which
is safe to call from a signal handler): stop serving requests (queued frames, and requests that arrive meanwhile,
are answered SHUTTING_DOWN), finish the running frame unless forced or it outlasts the drain timeout (then it is
answered SHUTTING_DOWN too), close the socket (lingering 200 ms for those last replies), unlink all shared memory,
terminate the context.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import queue
import resource
import secrets
import stat
import time
from collections.abc import Callable

import numpy as np
import zmq

from upscaler_server import __version__
from upscaler_server.activity import Activity
from upscaler_server.config import Config
from upscaler_server.endpoint import claim, ipc_path, release
from upscaler_server.engine import Engine
from upscaler_server.errors import BusyError, ConfigError, ErrorCode, ProtocolError, SessionError, UpscalerError
from upscaler_server.protocol import (
    MODEL_NAME_MAX,
    PIXEL_FORMATS,
    VERSION,
    Close,
    Closed,
    Done,
    Error,
    Hello,
    Message,
    Open,
    Ping,
    Pong,
    Process,
    Result,
    Stats,
    Submit,
    Timings,
    Welcome,
    decode,
    encode,
)
from upscaler_server.scheduler import FairQueue, Job, Worker
from upscaler_server.service import notify, watchdog_timeout
from upscaler_server.sessions import (
    FDS_PER_SESSION,
    Session,
    SessionTable,
    check_frame_size,
    connection_reserve,
    open_files,
    pixel_format,
)
from upscaler_server.shm import SlotFrame, probe_kernel_copy, remove_stale_segments
from upscaler_server.stats import DaemonStats

__all__ = ["Server"]

log = logging.getLogger("upscaler_server")

_POLL_MS = 100  # longest wait before the loop checks flags and leases again
_BURST = 64  # messages read per poll round before finished frames get their turn
_UNREAD_MAX = 4096  # requests answered SHUTTING_DOWN at shutdown, at most (a flood must not hold the exit up)
_FAREWELL_MS = 200  # how long closing the socket may take to send the last replies (linger)
_ONE_FRAME = "a request is one frame (DEALER) or an empty delimiter frame and one frame (REQ)"
_HANDSHAKE_MS = 5000  # ZeroMQ's greeting must arrive within this after a connection opens
_PING_MS = 1000  # ZeroMQ PINGs each connection this often (libzmq answers them in its I/O thread)
_QUEUED_PER_CONNECTION = 8  # messages libzmq holds for one connection before it stops reading it (a session's slots)
_MIN_SILENCE_MS = 1000  # a connection silent for a lease, but at least this long, is closed
_FD_LIMIT = 1 << 16  # open files to ask for when the hard limit is unlimited
_IDLE_WORKER_S = 0.1  # how long a forced stop waits for an idle engine thread to see the queue closed
_ALL_CLIENTS_UNREAD = 4  # unread inline results of all clients together: this many times one client's budget


class Server:
    """Serves ``engine`` on ``config.endpoint`` until :meth:`request_stop`."""

    def __init__(self, config: Config, engine: Engine) -> None:
        _check_limits_admit_a_frame(config, engine.min_input_size)
        self.config = config
        self.engine = engine
        self.instance = secrets.token_hex(8)
        self._ctx = zmq.Context()
        self._router: zmq.Socket[bytes] | None = None
        self._endpoint_lock: int | None = None  # descriptor of the ipc endpoint's lock file while this daemon owns it
        self._sessions = SessionTable(config, engine.scale, engine.min_input_size)
        self._draining: set[Session] = set()  # ended sessions whose frame is still on the engine
        self._queue = FairQueue(config.max_queue)
        self._finished: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        self._pipe_closed = False
        self._activity = Activity()
        self._stats = DaemonStats()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._worker = Worker(engine, self._queue, self._on_finished)
        # inline results handed to ZeroMQ and not yet written to the client's socket, per client: (tracker, bytes)
        self._unread: dict[bytes, list[tuple[zmq.MessageTracker, int]]] = {}
        # inline frames accepted and not yet answered, per client: the bytes of their results, counted as unread
        # (else every frame accepted while the engine lagged passed the check: the bound held only by timing)
        self._reserved: collections.Counter[bytes] = collections.Counter()
        self._stopping = False
        self._forced = False
        self._handlers: dict[type[Message], Callable[[Message, list[bytes], float], Message | None]] = {
            Hello: self._on_hello, Open: self._on_open, Submit: self._on_submit, Process: self._on_process,
            Close: self._on_close, Ping: self._on_ping, Stats: self._on_stats,
        }

    # --- lifecycle ---------------------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to stop; a second call forces (the running frame is not awaited). Signal-handler safe."""
        self._forced = self._stopping
        self._stopping = True
        self._wake()

    def serve(self) -> None:
        """Bind, log the ready line, serve until stopped, then shut down in order. ConfigError if binding fails."""
        _raise_fd_limit()
        _warn_of_too_few_open_files(self.config.max_sessions)
        if not self.config.map_slots:
            probe_kernel_copy()
        removed = remove_stale_segments()
        if removed:
            log.info("removed %d stale shared-memory segment(s) of dead daemons: %s", len(removed), ", ".join(removed))
        try:
            if self._stopping:  # asked to stop while it started: no endpoint taken, no ready line for a supervisor
                log.info("stopped during start-up: nothing was bound")
                return
            self._router = self._bind()
            self._worker.start()
            log.info("upscaler ready: endpoint=%s model=%s scale=%d device=%s precision=%s weights=%s slots=%s "
                     "version=%s pid=%d",
                     self.config.endpoint, self.engine.name, self.engine.scale, self.engine.device,
                     self.engine.precision, self.engine.weights,
                     "mapped" if self.config.map_slots else "copied", __version__, os.getpid())
            notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS=serving {self.engine.name} on {self.config.endpoint}")
            self._loop(self._router)
        finally:
            self._shutdown()

    def _bind(self) -> zmq.Socket[bytes]:
        endpoint = self.config.endpoint
        self._endpoint_lock = claim(self._ctx, endpoint)
        router = self._ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client reconnecting with its routing id takes over
        router.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        # a connection that never sends ZeroMQ's greeting holds a descriptor: drop it after 5 s, not the default 30
        router.setsockopt(zmq.HANDSHAKE_IVL, _HANDSHAKE_MS)
        # a connection with neither traffic nor an answer to ZeroMQ's PING for a lease is closed: its sessions expire
        # at the same time anyway, and it may hold a message it stopped sending midway (up to MAXMSGSIZE of memory)
        router.setsockopt(zmq.HEARTBEAT_IVL, _PING_MS)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(_MIN_SILENCE_MS, round(self.config.lease_timeout * 1000)))
        # ZeroMQ queues up to RCVHWM messages per connection while the loop is busy (the fallocate of a large open):
        # 1000 by default, which let one connection of 30 MiB messages hold a gigabyte. Past the mark it stops
        # reading that connection until the loop catches up (nothing is dropped)
        router.setsockopt(zmq.RCVHWM, _QUEUED_PER_CONNECTION)
        router.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:PORT binds only with it; IPv4 addresses work either way
        umask = os.umask(0o177)  # the socket file is created with mode 0600: no moment where others may connect
        try:
            router.bind(endpoint)
        except zmq.ZMQError as exc:
            router.close(linger=0)
            raise ConfigError(f"cannot bind {endpoint}: {exc}") from exc
        finally:
            os.umask(umask)
        return router

    def _loop(self, router: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_reap = next_watchdog = 0.0
        watchdog_s = watchdog_timeout()
        while not self._stopping:
            events = dict(poller.poll(_POLL_MS))
            if router in events:
                self._read_requests(router)
            if self._wake_r in events:
                self._drain_wake()
            self._deliver_finished()
            now = time.monotonic()
            if now >= next_reap:
                self._reap(now)
                self._activity.report_if_due()
                next_reap = now + min(0.1, self.config.lease_timeout / 4)
            if watchdog_s is not None and now >= next_watchdog:
                self._tell_watchdog(watchdog_s)
                next_watchdog = now + watchdog_s / 2  # sd_watchdog_enabled(3): every half timeout

    def _tell_watchdog(self, timeout_s: float) -> None:
        """``WATCHDOG=1`` unless the engine has been on one frame (or warm-up) for longer than the watchdog's
        ``timeout_s``: a hung engine (a stuck GPU driver, say) then gets the daemon killed and restarted, though its
        socket still answers; this loop itself stuck sends nothing either."""
        busy_since = self._worker.busy_since()
        if busy_since is None or time.perf_counter() - busy_since <= timeout_s:
            notify("WATCHDOG=1")

    def _shutdown(self) -> None:
        served = self._router is not None  # else it never bound: nothing to tell of a stop
        if served:
            self._activity.report()  # the last period's counts
            log.info("stopping: %d session(s), %d queued frame(s)", len(self._sessions), len(self._queue))
            notify("STOPPING=1", "STATUS=stopping: finishing the running frame")
        for job in self._queue.close():
            self._release_job(job)
            if not job.warmup:
                self._reply(job.envelope, _error(job.req, ErrorCode.SHUTTING_DOWN, "the daemon is shutting down"))
        deadline = time.monotonic() + self.config.drain_timeout
        while self._worker.is_alive() and not self._forced and time.monotonic() < deadline:
            self._worker.join(0.05)
            if self._router is not None:  # answered as they come: the drain may take seconds
                self._refuse_unread(self._router)
        if self._worker.is_alive():  # forced: an idle worker ends as the queue closes; a busy one is left
            self._worker.join(_IDLE_WORKER_S)
        running = self._worker.abandon()  # empty when the worker ended: then every frame was handed back
        self._deliver_finished()
        for job in running:  # not waited for: its client hears so now, not after its whole timeout
            if self._wants_reply(job):
                self._reply(job.envelope, _error(job.req, ErrorCode.SHUTTING_DOWN,
                                                 "the daemon is shutting down and did not wait for this frame"))
        worker_done = not self._worker.is_alive()
        if self._router is not None:
            self._refuse_unread(self._router)
            self._close_router(self._router)
        self._release_endpoint_lock()
        for session in self._sessions.all():
            self._sessions.remove(session.id)
            self._draining.add(session)
        for session in self._draining:
            session.unlink()
            if worker_done:
                session.release()
        self._draining.clear()
        if worker_done:  # a running worker may still use the engine and the pipe: leave them to process exit
            self.engine.close()
            self._pipe_closed = True  # a later request_stop() must not write into whatever file reuses the number
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._ctx.term()
        if served:
            log.info("stopped" if worker_done else "stopped without waiting for the running frame (forced)")

    @property
    def worker_running(self) -> bool:
        """True after a forced stop left the engine thread busy: the process must exit without finalisation
        (``os._exit``), since tearing down the interpreter under a running torch kernel aborts."""
        return self._worker.is_alive()

    def _refuse_unread(self, router: zmq.Socket[bytes]) -> None:
        """Requests that reach the socket after the loop stopped (during the drain, or just before the socket closes)
        get SHUTTING_DOWN: closing the socket would drop them unread, and their clients would wait out their
        timeouts."""
        for _ in range(_UNREAD_MAX):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            envelope = [f.bytes for f in frames[:-1]]
            if not _well_formed(envelope):
                continue  # junk: the MALFORMED answer is for a daemon that stays
            try:
                req = decode(frames[-1].buffer, "request", max_bin=self.config.max_message_bytes).req
            except ProtocolError as exc:
                req = exc.req
            self._reply(envelope, _error(req, ErrorCode.SHUTTING_DOWN, "the daemon is shutting down"))

    def _close_router(self, router: zmq.Socket[bytes]) -> None:
        router.close(linger=_FAREWELL_MS)  # the SHUTTING_DOWN replies just sent still go out
        path = ipc_path(self.config.endpoint)
        if path is not None:  # libzmq leaves the socket file behind
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()

    def _release_endpoint_lock(self) -> None:
        if self._endpoint_lock is not None:
            release(self.config.endpoint, self._endpoint_lock)
            self._endpoint_lock = None

    def _wake(self) -> None:
        if self._pipe_closed:  # served and shut down: nothing to wake
            return
        with contextlib.suppress(OSError):  # a full pipe already guarantees a wake-up
            os.write(self._wake_w, b"\0")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # --- requests ----------------------------------------------------------------------------------------------------

    def _read_requests(self, router: zmq.Socket[bytes]) -> None:
        for _ in range(_BURST):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) > 3:  # routing id, [empty delimiter,] request: more is junk, never copied out
                delimiter = [b""] if len(frames[1]) == 0 else []  # a REQ socket reads a reply only after its own
                self._reply([frames[0].bytes, *delimiter], _error(0, ErrorCode.MALFORMED, _ONE_FRAME))
                continue
            self._handle([f.bytes for f in frames[:-1]], frames[-1].buffer)

    def _handle(self, envelope: list[bytes], payload: memoryview) -> None:
        received = time.perf_counter()
        if not _well_formed(envelope):
            self._reply(envelope[:1], _error(0, ErrorCode.MALFORMED, _ONE_FRAME))
            return
        req = 0
        try:
            msg = decode(payload, "request", max_bin=self.config.max_message_bytes)
            req = msg.req
            reply = self._handlers[type(msg)](msg, envelope, received)
        except ProtocolError as exc:
            reply = _error(exc.req, exc.code, str(exc))
        except UpscalerError as exc:
            reply = _error(req, exc.code, str(exc))
        except Exception as exc:  # a daemon bug: report it, keep serving
            log.exception("internal error on a request from %s", envelope[0].hex()[:8])
            reply = _error(req, ErrorCode.INTERNAL, f"internal error ({type(exc).__name__}); see the daemon log")
        if reply is not None:
            self._reply(envelope, reply)

    def _on_hello(self, msg: Message, envelope: list[bytes], received: float) -> Message:
        assert isinstance(msg, Hello)
        log.debug("hello from %r (%s)", msg.client, envelope[0].hex()[:8])  # a hello flood must not flood the log
        cfg, eng = self.config, self.engine
        return Welcome(req=msg.req, server=f"takdsr-upscaler/{__version__}", instance=self.instance,
                       versions=[VERSION], model=eng.name[:MODEL_NAME_MAX], scale=eng.scale, device=eng.device,
                       precision=eng.precision, random_weights=eng.random_weights, formats=sorted(PIXEL_FORMATS),
                       min_size=eng.min_input_size, max_width=cfg.max_width, max_height=cfg.max_height,
                       max_pixels=cfg.max_pixels, max_slots=cfg.max_slots, max_sessions=cfg.max_sessions,
                       max_queue=cfg.max_queue, lease_ms=max(1, int(cfg.lease_timeout * 1000)),
                       heartbeat_ms=max(1, int(cfg.lease_timeout * 1000 / 4)))

    def _on_open(self, msg: Message, envelope: list[bytes], received: float) -> Message:
        assert isinstance(msg, Open)
        session = self._sessions.open(msg, envelope[0])
        # Warm-up runs ahead of the session's first frame, off the transport thread.
        self._queue.put(session.id, Job(envelope, msg.req, 0, session.fmt, msg.height, msg.width, received,
                                        session=session, warmup=True))
        session.pending += 1
        self._activity.session_opened()  # one line a minute counts them (activity.py): a line each flooded the log
        log.debug("session %d opened by %s: %dx%d %s, %d slot(s)", session.id, session.client, msg.width, msg.height,
                  msg.format, msg.slots)
        return session.opened(msg.req)

    def _on_submit(self, msg: Message, envelope: list[bytes], received: float) -> None:
        assert isinstance(msg, Submit)
        session = self._sessions.get(msg.session, owner=envelope[0])
        session.touch()
        if msg.slot >= session.slots:
            raise SessionError(f"slot {msg.slot} is out of range: session {session.id} has {session.slots} slot(s)",
                                ErrorCode.SLOT_OUT_OF_RANGE)
        if msg.slot in session.in_flight:
            raise SessionError(f"slot {msg.slot} of session {session.id} is still in flight; wait for its done "
                                "reply before submitting it again", ErrorCode.SLOT_IN_FLIGHT)
        session.check_segments()  # the copies would notice it too; this error comes before the frame is queued
        job = Job(envelope, msg.req, msg.frame, session.fmt, session.height, session.width, received,
                  session=session, slot=msg.slot)
        if self.config.map_slots:
            job.lr, job.out = session.input.slot(msg.slot), session.output.slot(msg.slot)
        else:
            job.slot_frame = SlotFrame(session.input, session.output, msg.slot)
        self._queue.put(session.id, job)
        session.in_flight.add(msg.slot)
        session.pending += 1

    def _on_process(self, msg: Message, envelope: list[bytes], received: float) -> None:
        assert isinstance(msg, Process)
        fmt = pixel_format(msg.format)
        check_frame_size(self.config, self.engine.min_input_size, msg.width, msg.height)
        expected = msg.width * msg.height * fmt.channels
        if len(msg.pixels) != expected:
            raise ProtocolError(f"pixels has {len(msg.pixels)} bytes; {msg.width}x{msg.height} {fmt.name} needs "
                                f"{expected}", ErrorCode.INVALID_FIELD, msg.req)
        out_shape = self.engine.output_shape(msg.height, msg.width, fmt)
        self._check_unread(envelope[0], math.prod(out_shape))
        lr = np.frombuffer(msg.pixels, np.uint8).reshape(msg.height, msg.width, fmt.channels)
        out = np.empty(out_shape, np.uint8)
        job = Job(envelope, msg.req, msg.frame, fmt, msg.height, msg.width, received, lr=lr, out=out)
        self._queue.put(("inline", envelope[0]), job)
        self._reserved[envelope[0]] += out.nbytes  # until _release_job (_inline_bytes)

    def _check_unread(self, client: bytes, result_bytes: int) -> None:
        """BUSY while the client's earlier inline results still wait in ZeroMQ's queue beyond the budget: each is a
        whole HR frame, so a client that sends and never reads would otherwise grow the daemon without bound."""
        pending = [(tracker, size) for tracker, size in self._unread.pop(client, []) if not tracker.done]
        unread = sum(size for _, size in pending) + self._reserved[client]
        if pending:
            self._unread[client] = pending
        if unread + result_bytes > max(self.config.max_unread_bytes, 2 * result_bytes):
            raise BusyError(f"{_mib(unread)} of your earlier results are still unread; read them, then retry")
        # and all clients together: each connection has its own budget, so many connections could still pile up
        everyone = sum(size for sent in self._unread.values() for tracker, size in sent if not tracker.done)
        everyone += sum(self._reserved.values())
        if everyone + result_bytes > max(_ALL_CLIENTS_UNREAD * self.config.max_unread_bytes, 2 * result_bytes):
            raise BusyError(f"{_mib(everyone)} of results are still unread by this daemon's clients; retry later")

    def _on_close(self, msg: Message, envelope: list[bytes], received: float) -> Message:
        assert isinstance(msg, Close)
        self._end_session(self._sessions.get(msg.session, owner=envelope[0]), "closed by its client")
        return Closed(req=msg.req, session=msg.session)

    def _on_ping(self, msg: Message, envelope: list[bytes], received: float) -> Message:
        assert isinstance(msg, Ping)
        alive = [s for s in dict.fromkeys(msg.sessions) if s in self._sessions]
        now = time.monotonic()
        for session_id in alive:
            self._sessions.get(session_id).touch(now)
        return Pong(req=msg.req, sessions=alive, instance=self.instance)

    def _on_stats(self, msg: Message, envelope: list[bytes], received: float) -> Message:
        return self._stats.statistics(msg.req, self.instance, sessions=len(self._sessions), queued=len(self._queue))

    # --- sessions and finished frames --------------------------------------------------------------------------------

    def _end_session(self, session: Session, reason: str, level: int = logging.DEBUG) -> None:
        """``level``: of its log line; a lease that expired (a client gone without a word) is worth INFO."""
        self._sessions.remove(session.id)
        for job in self._queue.drop(session.id):
            self._release_job(job)
        self._activity.session_ended()
        log.log(level, "session %d ended: %s", session.id, reason)
        if session.pending == 0:
            self._release_session(session)
        else:
            self._draining.add(session)

    def _release_session(self, session: Session) -> None:
        """Unmap an ended session none of whose frames is queued or running; with it the engine's staging arrays
        (an LR and an HR frame) of its size, unless another open session has that size. Not earlier: a frame the
        engine thread has just taken up would build them again for no one."""
        session.release()
        size = (session.height, session.width, session.fmt.name)
        if all((other.height, other.width, other.fmt.name) != size for other in self._sessions.all()):
            self.engine.release(session.height, session.width, session.fmt)

    def _reap(self, now: float) -> None:
        for session in self._sessions.expired(now):
            self._end_session(session, f"lease expired (no message for {self.config.lease_timeout:g} s)", logging.INFO)
        for client, sent in list(self._unread.items()):  # forget clients whose results are all written out
            if all(tracker.done for tracker, _ in sent):
                del self._unread[client]

    def _release_job(self, job: Job) -> None:
        """Forget a job that will never run or whose result was delivered; unmap its session if it was the last."""
        if job.session is None:  # an inline frame: its result is answered now, or never will be
            client = job.envelope[0]
            self._reserved[client] -= self._inline_bytes(job)
            if self._reserved[client] <= 0:
                del self._reserved[client]
        job.drop_buffers()
        session = job.session
        if session is None:
            return
        session.pending -= 1
        session.touch()  # the lease runs from the last finished frame: a slow frame never expires its session
        if not job.warmup:
            session.in_flight.discard(job.slot)
        if session.ended and session.pending == 0 and session in self._draining:
            self._draining.discard(session)
            self._release_session(session)

    def _inline_bytes(self, job: Job) -> int:
        """The size of an inline frame's result, from its request (its buffers may be gone by now)."""
        return math.prod(self.engine.output_shape(job.height, job.width, job.fmt))

    def _on_finished(self, job: Job) -> None:
        """Worker thread: hand the job to the transport thread."""
        self._finished.put(job)
        self._wake()

    def _deliver_finished(self) -> None:
        while True:
            try:
                job = self._finished.get_nowait()
            except queue.Empty:
                return
            if job.warmup and job.error is not None:
                log.warning("warm-up failed for %dx%d %s: %s", job.width, job.height, job.fmt.name, job.error[1])
            reply = self._result_reply(job) if self._wants_reply(job) else None
            self._release_job(job)
            if reply is not None:
                self._reply(job.envelope, reply)

    @staticmethod
    def _wants_reply(job: Job) -> bool:
        """A warm-up has no requester, and a frame of an ended session none that waits for it."""
        return not job.warmup and not (job.session is not None and job.session.ended)

    def _result_reply(self, job: Job) -> Message:
        if job.error is not None:
            return _error(job.req, job.error[0], job.error[1])
        times = job.times
        assert times is not None
        timings = Timings(queue_us=_us(job.started - job.received), copy_in_us=_us(times.copy_in),
                          infer_us=_us(times.infer), copy_out_us=_us(times.copy_out),
                          total_us=_us(time.perf_counter() - job.received))
        if job.session is not None:
            return Done(req=job.req, session=job.session.id, slot=job.slot, frame=job.frame, timings=timings)
        assert job.out is not None
        return Result(req=job.req, frame=job.frame, width=job.out.shape[1], height=job.out.shape[0],
                      format=job.fmt.name, pixels=memoryview(job.out).cast("B"), timings=timings)

    def _reply(self, envelope: list[bytes], reply: Message) -> None:
        if self._router is None or self._router.closed:
            return
        self._activity.replied(reply)
        self._stats.replied(reply)
        try:
            payload = encode(reply)
        except ProtocolError as exc:  # a daemon bug (a reply outside the schema): say so, keep serving
            log.exception("cannot encode a %s reply", type(reply).__name__)
            message = f"internal error: the reply broke the schema ({exc})"
            payload = encode(_error(reply.req, ErrorCode.INTERNAL, message))
        try:
            if isinstance(reply, Result):  # tracked: ZeroMQ marks it done once written out (or dropped)
                tracker = self._router.send_multipart([*envelope, payload], zmq.NOBLOCK, copy=False, track=True)
                self._unread.setdefault(envelope[0], []).append((tracker, len(payload)))
            else:
                self._router.send_multipart([*envelope, payload], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone or its queue full: its loss, never block the daemon
            log.debug("reply to %s dropped: %s", envelope[0].hex()[:8], exc)


def _check_limits_admit_a_frame(config: Config, min_side: int) -> None:
    """ConfigError when the size limits leave no frame the model can take: such a daemon said "ready" and refused
    every frame, the small ones as below the model's minimum and the others as over the limits."""
    too_small = [f"--{flag} {value}" for flag, value in (("max-width", config.max_width),
                                                         ("max-height", config.max_height)) if value < min_side]
    if config.max_pixels < min_side * min_side:
        too_small.append(f"--max-pixels {config.max_pixels}")
    if too_small:
        raise ConfigError(f"{', '.join(too_small)}: below the model's minimum input {min_side}x{min_side}, so no "
                          "frame could be upscaled; raise the limit")


def _well_formed(envelope: list[bytes]) -> bool:
    """A DEALER's routing id alone, or a REQ's routing id and its empty delimiter frame."""
    return len(envelope) == 1 or (len(envelope) == 2 and envelope[1] == b"")


def _error(req: int, code: ErrorCode, message: str) -> Error:
    return Error(req=req, code=int(code), name=code.name, message=message[:1024])


def _mib(size: int) -> str:
    """A byte count in MiB for an error message, one decimal: a budget of 1 MiB said "0 MiB" of it was unread."""
    return f"{size / 2**20:.1f} MiB"


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1e6))


def _warn_of_too_few_open_files(max_sessions: int) -> None:
    """Said at start: --max-sessions sessions need more descriptors than the limit leaves, so the later ones will be
    refused (RESOURCE_LIMIT), although the daemon accepts them by its settings."""
    if (counts := open_files()) is None:
        return
    open_now, soft = counts
    room = (soft - open_now - connection_reserve(soft)) // FDS_PER_SESSION
    if room < max_sessions:
        log.warning("--max-sessions %d needs about %d open files (%d a session, %d kept for connections), but the "
                    "limit is %d: sessions past about %d will be refused; raise it (ulimit -n, LimitNOFILE= in a "
                    "systemd unit) or lower --max-sessions", max_sessions,
                    open_now + max_sessions * FDS_PER_SESSION + connection_reserve(soft), FDS_PER_SESSION,
                    connection_reserve(soft), soft, max(room, 0))


def _raise_fd_limit() -> None:
    """Soft limit of open files up to the hard one: each connection costs the daemon a descriptor, and libzmq aborts
    the process when it cannot accept one (EMFILE) instead of refusing that connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, _FD_LIMIT)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))

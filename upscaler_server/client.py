"""Client library of the upscaler daemon. numpy, pyzmq and msgpack only: importing it never loads torch.

Simple use::

    with UpscalerClient() as client:            # connects, says hello (client.info: model, scale, device, limits)
        hr = client.upscale(lr)                  # (H, W, 3|4) uint8 -> (H*s, W*s, 3|4) uint8

Pipelined, zero-copy use (render straight into shared memory)::

    session = client.open_session(1280, 720, "BGRA8", slots=3)
    session.input(0)[...] = frame               # or render into this view
    session.submit(0)
    result = session.collect()                   # oldest submitted frame first; result.output is a view

Reliability follows the ZeroMQ guide's Lazy Pirate pattern: a request without a reply within ``timeout`` closes the
socket, reconnects (same routing id) and retries up to ``retries`` times. Frames are the exception: while the daemon
answers a ping, the client keeps its socket and waits for the slow frame's reply, since resending would compute the
frame twice and closing the socket would drop a reply already queued on it. A background thread sends heartbeats
that keep this client's sessions alive while the caller is busy; whether the daemon is alive is asked on a throwaway
socket, never by reconnecting one that may hold a late reply. A ``collect()`` that gives up leaves its frame running
on the daemon: the slot counts as busy until the late reply comes (``Session.wait_slot`` waits for it) or is lost
with a socket that a timed-out request reconnected, and submitting it again asks the daemon, which answers
``SLOT_IN_FLIGHT`` while it still runs the old frame (``Session.upscale`` retries that like ``BUSY``). When the
daemon restarts, the client says hello to the new one (``info`` follows) and ``upscale()`` reopens its session.

One client per thread and per process: a second thread using it (or one of its sessions) while a call is under
way, or a forked child, gets an UpscalerError saying so, when the call starts. A client dropped without ``close()``
releases itself at once (its sessions refer to it only where the caller holds them) with a ResourceWarning; the
daemon then ends its sessions when their lease runs out (``close()`` ends them at once). An ``open_session`` given
up on may still open a session once the daemon goes on: its late reply is answered with a Close.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import operator
import os
import threading
import time
import warnings
import weakref
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import zmq

from upscaler_server.client_session import (
    FrameResult,
    Session,
    exclusive,
    expect_reply,
    int_argument,
    positive_timeout,
    require_array,
    retry_busy,
)
from upscaler_server.config import default_endpoint, nobody_listens, unreachable
from upscaler_server.errors import (
    ClientInterruptedError,
    ErrorCode,
    ServerUnavailableError,
    SessionError,
    SessionLostError,
    UpscalerError,
)
from upscaler_server.protocol import (
    PIXEL_FORMATS,
    Close,
    Closed,
    Hello,
    Message,
    Open,
    Opened,
    Ping,
    Pong,
    Process,
    Result,
    Statistics,
    Stats,
    Welcome,
    decode,
    encode,
)
from upscaler_server.transport import REPLY_MAX_BYTES, Heartbeat, Link, dealer, readable

__all__ = ["FrameResult", "Session", "UpscalerClient"]

M = TypeVar("M", bound=Message)
_AUTO_SESSIONS = 4  # sessions upscale() keeps open for recently seen frame sizes
_LIMIT_CODES = (ErrorCode.RESOURCE_LIMIT, ErrorCode.SHM_ERROR)  # an open that closing another session may let through
_CLOSES_PER_REQUEST = 64  # Close messages of dropped sessions sent ahead of one request


def _release_unclosed(link: Link, ctx: zmq.Context[zmq.Socket[bytes]], heartbeat: Heartbeat | None,
                      endpoint: str) -> None:
    """What close() would release, for a client that was dropped (or still open at exit) without it."""
    if os.getpid() != link.owner_pid:  # a forked child's copy: the client and its sockets are the parent's
        return
    warnings.warn(f"an UpscalerClient of {endpoint} was not closed; call close() or use it in a with block",
                  ResourceWarning, stacklevel=2)
    if heartbeat is not None and threading.current_thread() is heartbeat:
        heartbeat.release_at_end = (link, ctx)  # it can neither join itself nor set the Event it may be waiting on
        return
    if heartbeat is not None:
        heartbeat.stop()
    # Not under another thread inside a call on the socket, nor at exit, where a daemon thread may make its next call
    # at any moment: closing the socket under that thread is undefined behaviour in libzmq (a traceback in that
    # thread at best). The socket then goes with that thread's last reference, or with the process.
    if not link.idle() or _exiting():
        return
    link.close()
    if not ctx.closed:
        ctx.term()


def _exiting() -> bool:
    """Whether the interpreter is exiting (its atexit hooks run): the main thread has ended and no other thread
    that it waits for is alive (a program's worker threads may go on after the main thread, and are not exiting)."""
    main = threading.main_thread()
    return not main.is_alive() and not any(thread.is_alive() and not thread.daemon for thread in threading.enumerate()
                                           if thread is not main)


class UpscalerClient:
    """Connection to the daemon; a context manager that closes its sessions on exit. One client per thread: a
    second thread using it at the same time gets an UpscalerError (and so does a forked child)."""

    def __init__(self, endpoint: str | None = None, *, timeout: float | None = 10.0, retries: int = 3,
                 name: str = "python-client", heartbeat: bool = True) -> None:
        """Connect and say hello. ``timeout``: seconds per attempt; raises ServerUnavailableError after
        ``retries`` + 1 silent attempts, or at once when an ``ipc://`` endpoint has no socket file or a stale one, or
        one this process may not connect to (another user's daemon)."""
        self.timeout = positive_timeout(timeout, 10.0)
        self.retries = _retry_count(retries)
        if not isinstance(endpoint, (str, type(None))) or not isinstance(name, str):
            raise TypeError(f"endpoint must be a string or None and name a string, got {type(endpoint).__name__} "
                            f"and {type(name).__name__}")
        self.closed = False
        self._name = name[:64]
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._lock = threading.Lock()  # guards _sessions against the heartbeat thread
        # weak: a session the caller dropped is ended by the daemon's lease, and one the caller holds refers to this
        # client, so a strong reference back would make a cycle only the garbage collector frees (and until it runs,
        # a client dropped without close() would keep its heartbeat, and with it the daemon's sessions, alive)
        self._sessions: weakref.WeakValueDictionary[int, Session] = weakref.WeakValueDictionary()
        self._orphans: list[tuple[int, list[int]]] = []  # (id, awaited requests) of sessions dropped without close()
        self._auto: collections.OrderedDict[tuple[int, int, str], Session] = collections.OrderedDict()
        self._frames = itertools.count(1)
        self._heartbeat: Heartbeat | None = None
        endpoint = endpoint or default_endpoint()
        found = unreachable(endpoint)
        if found is not None:
            self._ctx.term()
            kind, why = found
            raise ServerUnavailableError(f"cannot use the upscaler daemon at {endpoint}: {why}" if kind == "denied"
                                         else f"no upscaler daemon at {endpoint}: {why}; start one with python -m "
                                         "upscaler_server")
        try:
            self._link = Link(self._ctx, endpoint)
        except BaseException:
            self._ctx.term()
            raise
        try:
            self.info: Welcome = self.request(Hello(client=self._name), Welcome)
        except BaseException:
            self._link.close()
            self._ctx.term()
            raise
        if heartbeat:
            self._heartbeat = Heartbeat(self._ctx, self._link.endpoint, self.info.heartbeat_ms / 1000,
                                         weakref.WeakMethod(self._session_ids))
            self._heartbeat.start()
        # a client dropped without close(): its heartbeat stops (the daemon's leases then end its sessions) and its
        # sockets are released, with a ResourceWarning
        self._finalizer = weakref.finalize(self, _release_unclosed, self._link, self._ctx, self._heartbeat, endpoint)

    # --- properties and lifecycle ------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._link.endpoint

    @property
    def model(self) -> str:
        return self.info.model

    @property
    def scale(self) -> int:
        return self.info.scale

    @property
    def device(self) -> str:
        return self.info.device

    def __enter__(self) -> UpscalerClient:
        return self

    def __reduce__(self) -> Any:
        raise TypeError("an UpscalerClient cannot be copied or pickled (it owns a socket and its sessions' shared "
                        "memory): create one per process or thread")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close every session (briefly waiting for the daemon), stop heartbeats and release the sockets."""
        if self.closed:
            return
        if os.getpid() != self._link.owner_pid:  # a forked child: the sockets and segments are the parent's
            self.closed = True
            self._finalizer.detach()
            return
        with self._link._owned():  # another thread in a request: raise before anything is changed
            self._finalizer.detach()
            # no daemon, or interrupted (nothing may wait now): telling the daemon of each session is no use; their
            # leases end them
            gone = self._link.interrupted.is_set() or nobody_listens(self.endpoint) is not None
            sessions = list(self._sessions.values())
            for session in sessions:
                session.close(notify=False)
            dropped = self._reap_orphans(notify=False)
            if not gone:
                self._tell_closed([session.id for session in sessions] + dropped)
            self.closed = True
            if self._heartbeat is not None:
                self._heartbeat.stop()
                self._heartbeat = None
            self._link.close()
        if not self._ctx.closed:
            self._ctx.term()

    def _reap_orphans(self, notify: bool) -> list[int]:
        """Forget the replies awaited by sessions the caller dropped without close(), and with ``notify`` tell the
        daemon they are closed (not waiting for its answers, which are dropped when they come); returns their
        ids. Without this their segments stayed until the daemon's lease, and their replies piled up here. Sessions
        opened for an `open` given up on (a late `opened`) are closed the same way."""
        dropped: list[int] = []
        self._orphans.extend((session_id, []) for session_id in self._link.unclaimed_sessions)  # late `opened`s
        self._link.unclaimed_sessions.clear()
        # a few per request: Closes queued for a daemon that is gone must leave room in ZeroMQ's queue for the
        # request itself (a request that fails reconnects, which empties the queue)
        while self._orphans and not (notify and len(dropped) >= _CLOSES_PER_REQUEST):
            session_id, reqs = self._orphans.pop()
            for req in reqs:
                self._link.forget(req)
            if notify:
                req = self._link.send_courtesy(Close(session=session_id))
                if req is None:  # the queue is full: nothing takes messages now; a later request tries again
                    self._orphans.append((session_id, []))
                    break
                self._link.forget(req)  # its answer is dropped when it comes
            dropped.append(session_id)
        return dropped

    def _tell_closed(self, session_ids: list[int]) -> None:
        """Tell the daemon these sessions are closed: every Close sent at once, the replies awaited together for at
        most a second, so a slow daemon costs one wait, not one per session. One that stays silent (or an interrupt)
        leaves them to the daemon's leases."""
        reqs: list[int] = []
        try:
            for session_id in session_ids:
                req = self._link.send_courtesy(Close(session=session_id))
                if req is None:  # ZeroMQ's queue is full: no daemon takes them; the rest end by lease
                    break
                reqs.append(req)
            deadline = time.monotonic() + min(self.timeout, 1.0)
            for req in reqs:
                self._link.wait(req, max(0.0, deadline - time.monotonic()))  # an error reply (already gone) is fine
        except ClientInterruptedError:
            pass
        finally:
            for req in reqs:
                self._link.forget(req)

    def interrupt(self) -> None:
        """Thread-safe: the call this client is waiting in (in another thread: a collect, a request) raises
        ClientInterruptedError within about 50 ms, and so does every later wait; then close the client (from the
        thread that used it, once its call has returned), which no longer waits for the daemon. For an application
        that shuts down while its render thread waits for a frame of a stalled daemon."""
        self._link.interrupted.set()

    def _session_ids(self) -> list[int]:
        with self._lock:
            return list(self._sessions)

    # --- requests ----------------------------------------------------------------------------------------------------

    @exclusive
    def request(self, msg: Message, expect: type[M], retries: int | None = None, timeout: float | None = None,
                idempotent: bool = True) -> M:
        """Send ``msg`` and return its reply of type ``expect``; an ``error`` reply raises the matching
        UpscalerError subclass. Lazy Pirate: after ``timeout`` s of silence, reconnect (same routing id) and resend,
        except that a non-``idempotent`` request is only resent when the daemon stops answering or restarted; while
        the same daemon answers a ping on this socket, its late reply is awaited on it instead (a slow frame must not
        be computed twice, and reconnecting could drop the reply: a closed socket loses what it had queued)."""
        if self.closed:
            raise UpscalerError("this UpscalerClient is closed; create a new one")
        self._reap_orphans(notify=True)
        retries = self.retries if retries is None else _retry_count(retries)
        timeout = positive_timeout(timeout, self.timeout)
        req: int | None = None
        gone: str | None = None  # why no daemon listens, once found
        attempts = 0  # waits of `timeout` s: a silent probe of a non-idempotent request is one too
        try:
            while attempts <= retries:
                if req is None:
                    req = self._link.send(msg)
                reply = self._link.wait(req, timeout)
                attempts += 1
                if reply is not None:
                    req = None  # answered: nothing to forget
                    return expect_reply(reply, expect)
                found_gone = gone is not None
                gone = nobody_listens(self.endpoint)
                if (gone is not None and found_gone) or attempts > retries:  # twice: no daemon, not a restarting one
                    break
                # else one more attempt (it too ends within a second, if no daemon listens by then)
                if not idempotent and gone is None:
                    pong = self._probe([], max(timeout, 1.0))  # a busy machine may answer a ping slowly
                    if pong is not None and self._same_instance(pong.instance):
                        continue  # alive and slow: wait on for the late reply on this socket
                    attempts += pong is None  # the silent probe took an attempt's wait
                self._link.reconnect()
                self._link.forget(req)
                req = None
        finally:
            if req is not None:  # given up on (or interrupted): drop its reply when it comes, never keep it
                self._link.forget(req)
        if gone is not None:
            raise ServerUnavailableError(f"no upscaler daemon at {self.endpoint}: {gone}; start one with python -m "
                                         "upscaler_server")
        raise ServerUnavailableError(f"no reply from the upscaler daemon at {self.endpoint} after {retries + 1} "
                                     f"attempt(s) of {timeout:g} s; is it running (python -m upscaler_server)?")

    def _same_instance(self, instance: str) -> bool:
        """Whether ``instance`` is the daemon that said hello; if not, it restarted: say hello to the new one, so
        ``info`` (limits, model, instance) describes the daemon that now answers."""
        if instance == self.info.instance:
            return True
        self.info = self.request(Hello(client=self._name), Welcome)
        if self._heartbeat is not None:  # the new daemon's lease may be shorter
            self._heartbeat.retime(self.info.heartbeat_ms / 1000)
        return False

    def _probe(self, sessions: list[int], timeout: float) -> Pong | None:
        """The daemon's pong to a ping about ``sessions`` on a throwaway socket, or None if it stays silent (or no
        daemon listens on an ipc endpoint). The request socket is left alone: reconnecting it would drop replies
        queued on it, such as a slow frame's."""
        if nobody_listens(self.endpoint) is not None:
            return None
        with contextlib.closing(dealer(self._ctx, self.endpoint)) as sock:
            sock.send(encode(Ping(req=1, sessions=sessions)))
            if not readable(sock, timeout, self._link.interrupted):
                return None
            reply = decode(sock.recv(), "reply", max_bin=REPLY_MAX_BYTES)
        return reply if isinstance(reply, Pong) else None

    def ping(self) -> float:
        """Round-trip time of a ping, seconds."""
        start = time.perf_counter()
        self.request(Ping(sessions=[]), Pong)
        return time.perf_counter() - start

    def stats(self) -> Statistics:
        """What the daemon has done since it started (frames done, failed, refused BUSY), what it holds now (sessions,
        queued frames) and the median and 99th percentile of its latest frames' times (docs/protocol.md, ``stats``).
        A daemon older than the request answers UNKNOWN_TYPE, raised as ProtocolError."""
        return self.request(Stats(), Statistics)

    def open_session(self, width: int, height: int, pixel_format: str = "RGB8", slots: int = 3) -> Session:
        """Open a session for ``width`` x ``height`` frames in ``pixel_format`` with ``slots`` frames in flight."""
        return self._open_session(width, height, pixel_format, slots, held_by_client=False)

    @exclusive
    def _open_session(self, width: int, height: int, pixel_format: str, slots: int, held_by_client: bool) -> Session:
        width, height = int_argument(width, "width"), int_argument(height, "height")
        slots = int_argument(slots, "slots")
        opened = self.request(Open(width=width, height=height, format=pixel_format, slots=slots), Opened)
        try:
            session = Session(self, opened, held_by_client=held_by_client)
        except Exception:
            with contextlib.suppress(UpscalerError):  # the segments failed us; the lease cleans up otherwise
                self.request(Close(session=opened.session), Closed, retries=0)
            raise
        with self._lock:
            self._sessions[session.id] = session
        return session

    def _forget(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)
        for key, cached in list(self._auto.items()):
            if cached is session:
                del self._auto[key]

    def next_frame_id(self) -> int:
        return next(self._frames)

    # --- one-call upscaling ------------------------------------------------------------------------------------------

    @exclusive
    def upscale(self, frame: np.ndarray, pixel_format: str | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Upscale one (H, W, 3|4) uint8 frame through shared memory; returns ``out`` or a new (H*s, W*s, C) array.
        ``pixel_format`` defaults to RGB8 / RGBA8 by channel count (say "BGRA8" or "BGR8" for those orders)."""
        fmt = _format_of(frame, pixel_format)
        key = (frame.shape[0], frame.shape[1], fmt)
        for attempt in range(2):
            session = self._auto_session(key)
            try:
                return session.upscale(frame, out)
            except SessionLostError:  # daemon restarted or lease expired: reopen once
                session.close(notify=False)
                if attempt:
                    raise
                self._same_instance(self.request(Ping(sessions=[]), Pong).instance)  # hello anew if it restarted
        raise AssertionError("unreachable")

    def _auto_session(self, key: tuple[int, int, str]) -> Session:
        if key in self._auto:
            self._auto.move_to_end(key)
            return self._auto[key]
        if len(self._auto) >= _AUTO_SESSIONS:
            self._auto.popitem(last=False)[1].close()
        while True:
            try:
                session = self._open_session(key[1], key[0], key[2], 1, held_by_client=True)
                break
            except UpscalerError as exc:
                # the daemon's session, memory or open-file limit: this client's other frame sizes give theirs up
                # first (each client held up to 4 sessions, and 16 clients filled a daemon's 64)
                if exc.code not in _LIMIT_CODES or not self._auto:
                    raise
                self._auto.popitem(last=False)[1].close()
        self._auto[key] = session
        return session

    @exclusive
    def upscale_inline(self, frame: np.ndarray, pixel_format: str | None = None) -> np.ndarray:
        """Upscale with the pixels inside the messages (no shared memory): for remote or sandboxed clients. The
        result is a read-only view of the reply's bytes (no copy); ``np.array(result)`` gives a writable one."""
        fmt = _format_of(frame, pixel_format)
        height, width = frame.shape[:2]
        limits = self.info
        if width > limits.max_width or height > limits.max_height or width * height > limits.max_pixels:
            # over the message size limit libzmq drops the connection without a reply: every attempt would time out
            raise SessionError(f"frame {width}x{height} exceeds the daemon's limits {limits.max_width}x"
                               f"{limits.max_height}, {limits.max_pixels} pixels", ErrorCode.SIZE_TOO_LARGE)
        msg = Process(width=width, height=height, format=fmt, frame=self.next_frame_id(),
                      pixels=memoryview(np.ascontiguousarray(frame)).cast("B"))
        result = retry_busy(lambda: self.request(msg, Result, idempotent=False), self.timeout)
        return np.frombuffer(result.pixels, np.uint8).reshape(result.height, result.width, -1)


def _retry_count(retries: int) -> int:
    """``retries`` as an int >= 0 (numpy integers too)."""
    try:
        count = operator.index(retries)
    except TypeError:
        raise TypeError(f"retries must be an int >= 0, got {retries!r}") from None
    if isinstance(retries, bool) or count < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    return count


def _format_of(frame: np.ndarray, pixel_format: str | None) -> str:
    require_array(frame, "frames must be numpy arrays")
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] not in (3, 4) or frame.size == 0:
        raise ValueError(f"frames must be (H, W, 3|4) uint8 arrays with H, W > 0, got {frame.shape} {frame.dtype}")
    fmt = ("RGB8" if frame.shape[2] == 3 else "RGBA8") if pixel_format is None else pixel_format
    if fmt not in PIXEL_FORMATS:
        raise ValueError(f"unknown pixel format {fmt!r}; known: {', '.join(PIXEL_FORMATS)}")
    if PIXEL_FORMATS[fmt].channels != frame.shape[2]:
        raise ValueError(f"pixel format {fmt!r} does not fit a {frame.shape[2]}-channel frame")
    return fmt

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
releases itself at once (its sessions refer to it only where the caller holds them) with a ResourceWarning.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import numbers
import operator
import os
import secrets
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast

import numpy as np
import zmq

from upscaler_server.config import default_endpoint, nobody_listens, unreachable
from upscaler_server.errors import (
    BusyError,
    ClientInterruptedError,
    ConfigError,
    ErrorCode,
    ProtocolError,
    ServerUnavailableError,
    SessionError,
    SessionLostError,
    UpscalerError,
    error_for_code,
)
from upscaler_server.protocol import (
    PIXEL_FORMATS,
    Close,
    Closed,
    Done,
    Error,
    Hello,
    Message,
    Open,
    Opened,
    Ping,
    Pong,
    Process,
    Result,
    Submit,
    Timings,
    Welcome,
    decode,
    encode,
)
from upscaler_server.shm import Ring, RingLayout

__all__ = ["FrameResult", "Session", "UpscalerClient"]

M = TypeVar("M", bound=Message)
F = TypeVar("F", bound=Callable[..., Any])
_REPLY_MAX_BYTES = 1 << 31  # inline results carry a whole output frame
_AUTO_SESSIONS = 4  # sessions upscale() keeps open for recently seen frame sizes
_CLOSES_PER_REQUEST = 64  # Close messages of dropped sessions sent ahead of one request


@dataclass(frozen=True)
class FrameResult:
    """A finished frame. ``output`` is a zero-copy view of the output slot: valid until that slot is resubmitted."""

    session: int
    slot: int
    frame: int
    timings: Timings
    output: np.ndarray


_INTERRUPT_SLICE_S = 0.05  # waits poll in slices this long, so interrupt() from another thread is seen soon
_LIVENESS_S = 1.0  # a longer wait looks this often whether an ipc daemon is still there (one connect() each time)


class _Link:
    """A DEALER socket with a fixed routing id, a mailbox of replies keyed by request id, and reconnect."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self._ctx = ctx
        self.endpoint = endpoint
        self.owner_pid = os.getpid()
        # held while a thread sends or waits: a second thread at the same time gets an error, not a stolen reply,
        # a recv() that blocks forever or an aborted process (ZeroMQ sockets are not thread-safe)
        self._in_use = threading.RLock()
        self._routing_id = b"\x01" + secrets.token_bytes(15)  # ids starting with a zero byte are reserved
        self._socket = self._connect()
        self._ids = itertools.count(1)
        self._mailbox: dict[int, Message] = {}
        self._waiting: set[int] = set()
        # awaited replies that were not in yet when reconnect() closed the socket they would have come on: they are
        # lost, unless the daemon sends them after the new socket has connected (same routing id, ROUTER_HANDOVER)
        self._cut_off: set[int] = set()
        self.interrupted = threading.Event()  # set by UpscalerClient.interrupt(), from any thread

    def _connect(self) -> zmq.Socket[bytes]:
        try:
            return _dealer(self._ctx, self.endpoint, self._routing_id)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot connect to {self.endpoint!r}: {exc} (endpoints look like "
                              "ipc:///path/to/socket or tcp://127.0.0.1:5555)") from None

    def reconnect(self) -> None:
        with self._owned():
            self._cut_off |= self._waiting - self._mailbox.keys()
            self._socket.close(linger=0)
            self._socket = self._connect()

    @contextlib.contextmanager
    def _owned(self) -> Iterator[None]:
        """Raise UpscalerError when the socket is used after a fork or by two threads at once."""
        if os.getpid() != self.owner_pid:
            raise UpscalerError("this UpscalerClient was created in another process (before a fork): create a new "
                                "one in this process")
        if not self._in_use.acquire(blocking=False):
            raise UpscalerError("this UpscalerClient is in use by another thread: use one client per thread")
        try:
            yield
        finally:
            self._in_use.release()

    def send(self, msg: Message) -> int:
        """Send ``msg`` with a fresh request id (or its own, if set) and return the id."""
        with self._owned():
            if msg.req == 0:
                msg = dataclasses.replace(msg, req=next(self._ids))
            self._waiting.add(msg.req)
            self._socket.send(encode(msg))
            return msg.req

    def send_courtesy(self, msg: Message) -> int | None:
        """Send ``msg`` only if ZeroMQ can queue it now; the request id, or None when not sent. For Close messages
        that need no answer: with no daemon behind the socket, past its queue of 1000 a plain send blocks for good,
        where interrupt() cannot reach it, and the daemon's leases end those sessions anyway."""
        with self._owned():
            msg = dataclasses.replace(msg, req=next(self._ids))
            try:
                self._socket.send(encode(msg), zmq.NOBLOCK)
            except zmq.Again:
                return None
            self._waiting.add(msg.req)
            return msg.req

    def wait(self, req: int, timeout: float) -> Message | None:
        """The reply to ``req``, or None after ``timeout`` seconds (sooner when an ipc daemon is found gone); other
        awaited replies go to the mailbox."""
        with self._owned():  # re-entrant: arrived() takes the same guard
            if not self.arrived(req, timeout):
                return None
            self._waiting.discard(req)
            return self._mailbox.pop(req)

    def arrived(self, req: int, timeout: float = 0.0) -> bool:
        """Whether the reply to ``req`` is here, waiting up to ``timeout`` s for it (0: what the socket holds is read
        now); unlike wait(), the reply stays in the mailbox."""
        with self._owned():
            deadline = time.monotonic() + timeout
            while req not in self._mailbox:
                left = deadline - time.monotonic()
                if _readable(self._socket, min(left, _LIVENESS_S), self.interrupted):
                    self._receive()
                elif left <= _LIVENESS_S or nobody_listens(self.endpoint) is not None:
                    return False  # the timeout, or a daemon that died: no use waiting out the rest
            return True

    def _receive(self) -> None:
        reply = decode(self._socket.recv(), "reply", max_bin=_REPLY_MAX_BYTES)
        if reply.req in self._waiting:  # anything else answers a request given up on
            self._mailbox[reply.req] = reply
            self._cut_off.discard(reply.req)

    def forget(self, req: int) -> None:
        self._waiting.discard(req)
        self._cut_off.discard(req)
        self._mailbox.pop(req, None)

    def cut_off(self, req: int) -> bool:
        """Whether the awaited reply to ``req`` may have been lost with a socket that reconnect() closed."""
        return req in self._cut_off

    def take(self, req: int) -> Message | None:
        """The reply to ``req`` if it has arrived (read from the socket now, without waiting), else None."""
        return self.wait(req, 0.0) if req in self._waiting or req in self._mailbox else None

    def close(self) -> None:
        self._socket.close(linger=0)

    def idle(self) -> bool:
        """Whether no other thread is inside a call on this socket now."""
        if not self._in_use.acquire(blocking=False):
            return False
        self._in_use.release()
        return True


def _exclusive(method: F) -> F:
    """Hold the client's socket guard for the whole call, not only around each message: upscale() or collect() is
    several sends and waits on shared state (a slot, the queue of frames in flight), and a second thread slipping in
    between them took the first one's reply and gave it the wrong picture. The guard is re-entrant."""

    @functools.wraps(method)
    def guarded(self: UpscalerClient | Session, *args: Any, **kwargs: Any) -> Any:
        with self._link._owned():
            return method(self, *args, **kwargs)

    return cast(F, guarded)


def _readable(sock: zmq.Socket[bytes], timeout: float, interrupted: threading.Event) -> bool:
    """Whether ``sock`` has a message within ``timeout`` s (at once: what has arrived, when it is <= 0). Polls in
    slices and raises ClientInterruptedError once ``interrupted`` is set: a wait may last a whole timeout times the
    retries, and an application shutting down must not wait that long for the thread inside it."""
    deadline = time.monotonic() + timeout
    while True:
        if interrupted.is_set():
            raise ClientInterruptedError("interrupted by UpscalerClient.interrupt() from another thread; close the "
                                         "client")
        left = deadline - time.monotonic()
        if sock.poll(max(0, int(min(left, _INTERRUPT_SLICE_S) * 1000)), zmq.POLLIN):
            return True
        if left <= _INTERRUPT_SLICE_S:
            return False


def _release_unclosed(link: _Link, ctx: zmq.Context[zmq.Socket[bytes]], heartbeat: _Heartbeat | None,
                      endpoint: str) -> None:
    """What close() would release, for a client that was dropped (or still open at exit) without it."""
    warnings.warn(f"an UpscalerClient of {endpoint} was not closed; call close() or use it in a with block",
                  ResourceWarning, stacklevel=2)
    if heartbeat is not None and threading.current_thread() is heartbeat:
        heartbeat.release_at_end = (link, ctx)  # it can neither join itself nor set the Event it may be waiting on
        return
    if heartbeat is not None:
        heartbeat.stop()
    if not link.idle():  # at exit, with a daemon thread still inside a call: closing its socket under it is
        return  # undefined behaviour in libzmq (a traceback in that thread at best); the process exit frees both
    link.close()
    if not ctx.closed:
        ctx.term()


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, routing_id: bytes | None = None) -> zmq.Socket[bytes]:
    """A DEALER connected to the daemon, set up alike for requests and heartbeats (ZMQError if it cannot connect)."""
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.linger = 0
        if routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.setsockopt(zmq.IPV6, 1)  # a daemon on tcp://[::1]:PORT; IPv4 addresses work either way
        sock.connect(endpoint)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock


class _Heartbeat(threading.Thread):
    """Pings the daemon every ``interval`` seconds with the ids of the open sessions, on its own socket."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, interval: float,
                 sessions: weakref.WeakMethod[Callable[[], list[int]]]) -> None:
        super().__init__(name="upscaler-heartbeat", daemon=True)
        self._ctx, self._endpoint, self._interval, self._sessions = ctx, endpoint, interval, sessions
        self._halt = threading.Event()
        # Set (a plain assignment) by a dropped client's finalizer when it runs on this thread, where the garbage
        # collector may call it even inside _halt.wait(): this thread releases the link and context as it ends.
        self.release_at_end: tuple[_Link, zmq.Context[zmq.Socket[bytes]]] | None = None

    def run(self) -> None:
        sock = _dealer(self._ctx, self._endpoint)  # the link connected to the same endpoint: this cannot fail
        try:
            while not self._halt.wait(self._interval) and self.release_at_end is None:
                session_ids = self._sessions()  # weak: a client dropped without close() must not live on here
                if session_ids is None:
                    break
                ids = session_ids()
                del session_ids
                if ids:
                    with contextlib.suppress(zmq.Again):  # daemon unreachable and our queue full: next period
                        sock.send(encode(Ping(sessions=ids)), zmq.NOBLOCK)
                while sock.poll(0, zmq.POLLIN):
                    sock.recv()  # pongs only prove liveness; a lost session surfaces on its next submit
        except zmq.ZMQError:
            pass  # context terminated under us: the client is closing
        finally:
            sock.close(linger=0)
            if self.release_at_end is not None:
                link, ctx = self.release_at_end
                link.close()
                ctx.term()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class UpscalerClient:
    """Connection to the daemon; a context manager that closes its sessions on exit. One client per thread: a
    second thread using it at the same time gets an UpscalerError (and so does a forked child)."""

    def __init__(self, endpoint: str | None = None, *, timeout: float | None = 10.0, retries: int = 3,
                 name: str = "python-client", heartbeat: bool = True) -> None:
        """Connect and say hello. ``timeout``: seconds per attempt; raises ServerUnavailableError after
        ``retries`` + 1 silent attempts, or at once when an ``ipc://`` endpoint has no socket file or a stale one, or
        one this process may not connect to (another user's daemon)."""
        self.timeout = _positive_timeout(timeout, 10.0)
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
        self._heartbeat: _Heartbeat | None = None
        endpoint = endpoint or default_endpoint()
        found = unreachable(endpoint)
        if found is not None:
            self._ctx.term()
            kind, why = found
            raise ServerUnavailableError(f"cannot use the upscaler daemon at {endpoint}: {why}" if kind == "denied"
                                         else f"no upscaler daemon at {endpoint}: {why}; start one with python -m "
                                         "upscaler_server")
        try:
            self._link = _Link(self._ctx, endpoint)
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
            self._heartbeat = _Heartbeat(self._ctx, self._link.endpoint, self.info.heartbeat_ms / 1000,
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
        ids. Without this their segments stayed until the daemon's lease, and their replies piled up here."""
        dropped: list[int] = []
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

    @_exclusive
    def request(self, msg: Message, expect: type[M], retries: int | None = None, timeout: float | None = None,
                idempotent: bool = True) -> M:
        """Send ``msg`` and return its reply of type ``expect``; an ``error`` reply raises the matching
        UpscalerError subclass. Lazy Pirate: after ``timeout`` s of silence, reconnect (same routing id) and resend,
        except that a non-``idempotent`` request is only resent when the daemon stops answering or restarted; while
        the same daemon answers a ping on this socket, its late reply is awaited on it instead (a slow frame must not
        be computed twice, and reconnecting could drop the reply: a closed socket loses what it had queued)."""
        if self.closed:
            raise UpscalerError("this UpscalerClient is closed; create a new one", ErrorCode.UNKNOWN_SESSION)
        self._reap_orphans(notify=True)
        retries = self.retries if retries is None else _retry_count(retries)
        timeout = _positive_timeout(timeout, self.timeout)
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
                    return _expect(reply, expect)
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
        return False

    def _probe(self, sessions: list[int], timeout: float) -> Pong | None:
        """The daemon's pong to a ping about ``sessions`` on a throwaway socket, or None if it stays silent (or no
        daemon listens on an ipc endpoint). The request socket is left alone: reconnecting it would drop replies
        queued on it, such as a slow frame's."""
        if nobody_listens(self.endpoint) is not None:
            return None
        with contextlib.closing(_dealer(self._ctx, self.endpoint)) as sock:
            sock.send(encode(Ping(req=1, sessions=sessions)))
            if not _readable(sock, timeout, self._link.interrupted):
                return None
            reply = decode(sock.recv(), "reply", max_bin=_REPLY_MAX_BYTES)
        return reply if isinstance(reply, Pong) else None

    def ping(self) -> float:
        """Round-trip time of a ping, seconds."""
        start = time.perf_counter()
        self.request(Ping(sessions=[]), Pong)
        return time.perf_counter() - start

    def open_session(self, width: int, height: int, pixel_format: str = "RGB8", slots: int = 3) -> Session:
        """Open a session for ``width`` x ``height`` frames in ``pixel_format`` with ``slots`` frames in flight."""
        return self._open_session(width, height, pixel_format, slots, held_by_client=False)

    @_exclusive
    def _open_session(self, width: int, height: int, pixel_format: str, slots: int, held_by_client: bool) -> Session:
        # numpy integers too (a frame's shape often comes as np.int64); TypeError for anything that is no integer
        width, height, slots = operator.index(width), operator.index(height), operator.index(slots)
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

    @_exclusive
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
        session = self._open_session(key[1], key[0], key[2], 1, held_by_client=True)
        self._auto[key] = session
        return session

    @_exclusive
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
        result = _retry_busy(lambda: self.request(msg, Result, idempotent=False), self.timeout)
        return np.frombuffer(result.pixels, np.uint8).reshape(result.height, result.width, -1)


class Session:
    """A daemon session: input and output rings in shared memory, frames submitted by slot."""

    def __init__(self, client: UpscalerClient, opened: Opened, *, held_by_client: bool = False) -> None:
        """``held_by_client``: a session the client keeps for upscale(), which refers to the client weakly (the
        client holds it: a strong reference back would be a cycle). One given to the caller keeps its client alive."""
        self._client_ref = weakref.ref(client)
        self._owner = None if held_by_client else client
        self.instance = client.info.instance  # the daemon it was opened on, as far as the client knows
        self.id = opened.session
        self.width, self.height = opened.width, opened.height
        self.out_width, self.out_height = opened.out_width, opened.out_height
        self.pixel_format = opened.format
        self.slots = opened.slots
        channels = PIXEL_FORMATS[opened.format].channels
        lay_in = RingLayout(opened.width, opened.height, channels, opened.slots)
        lay_out = RingLayout(opened.out_width, opened.out_height, channels, opened.slots)
        lay_in.check(opened.input)
        lay_out.check(opened.output)
        self._in = Ring.attach(opened.input.name, lay_in)
        try:
            self._out = Ring.attach(opened.output.name, lay_out)
        except Exception:
            self._in.close()
            raise
        self._inputs = [self._in.slot(i) for i in range(self.slots)]
        self._outputs = [self._out.slot(i) for i in range(self.slots)]
        self._outstanding: collections.deque[tuple[int, int, int]] = collections.deque()  # (req, slot, frame)
        # slot -> req of a frame whose collect() timed out: the daemon still has the slot until that reply comes
        self._abandoned: dict[int, int] = {}
        self._own_frames: set[int] = set()  # reqs of the frames upscale() submitted itself (the rest are the caller's)
        # a session dropped without close(): its rings are unmapped (or left to the views still alive), and the
        # client is left its id and awaited replies, to tell the daemon and forget them (_reap_orphans)
        self._release = weakref.finalize(self, _orphan, client._orphans, self.id, self._outstanding, self._abandoned,
                                         self._in, self._out)
        self._next_slot = 0
        self.closed = False

    def __reduce__(self) -> Any:
        raise TypeError("a Session cannot be copied or pickled (it maps its client's shared memory): open one per "
                        "client")

    @property
    def _client(self) -> UpscalerClient:
        client = self._client_ref()
        if client is None:  # only a session held by its client refers to it weakly, and then both go together
            raise UpscalerError(f"the UpscalerClient of session {self.id} is gone", ErrorCode.UNKNOWN_SESSION)
        return client

    @property
    def _link(self) -> _Link:
        return self._client._link

    def _check_open(self) -> None:
        if self.closed:
            raise SessionError(f"session {self.id} is closed", ErrorCode.UNKNOWN_SESSION)

    def input(self, slot: int) -> np.ndarray:
        """Writable (height, width, channels) view of input slot ``slot``: put the frame here, then submit."""
        self._check_open()
        slot = self._check_slot(slot)
        return self._inputs[slot]

    def output(self, slot: int) -> np.ndarray:
        """(out_height, out_width, channels) view of output slot ``slot``; read it after its frame is collected."""
        self._check_open()
        slot = self._check_slot(slot)
        return self._outputs[slot]

    def _check_slot(self, slot: int) -> int:
        """``slot`` as an int (numpy integers too) in [0, slots); TypeError for 1.5 or True (a list index would take
        True as slot 1), SessionError SLOT_OUT_OF_RANGE for one out of range."""
        if isinstance(slot, bool):
            raise TypeError(f"slot must be an int, got {slot!r}")
        try:
            index = operator.index(slot)
        except TypeError:
            raise TypeError(f"slot must be an int, got {slot!r}") from None
        if not 0 <= index < self.slots:
            raise SessionError(f"slot {index} is out of range [0, {self.slots})", ErrorCode.SLOT_OUT_OF_RANGE)
        return index

    @property
    def in_flight(self) -> list[int]:
        """Slots submitted and not collected yet, oldest first."""
        return [slot for _, slot, _ in self._outstanding]

    @_exclusive
    def has_result(self, wait: float = 0.0) -> bool:
        """Whether :meth:`collect` would return at once: the daemon's reply for the oldest frame in flight has
        arrived, waiting up to ``wait`` s for it (it returns as soon as the reply lands; False when no frame is in
        flight). Lets a loop keep several frames in flight, doing other work between short waits; such a loop
        checks the daemon itself (:meth:`check_alive`) when a frame takes too long."""
        self._check_open()
        if isinstance(wait, bool) or not isinstance(wait, numbers.Real):
            raise TypeError(f"wait must be a number of seconds >= 0, got {wait!r}")
        if not wait >= 0:  # NaN is not >= 0
            raise ValueError(f"wait must be a number of seconds >= 0, got {wait!r}")
        return bool(self._outstanding) and self._client._link.arrived(self._outstanding[0][0], float(wait))

    def _still_running(self, slot: int) -> bool:
        """Whether ``slot`` holds a frame given up on by collect() that the daemon has not finished yet."""
        req = self._abandoned.get(slot)
        if req is None:
            return False
        link = self._client._link
        if link.take(req) is None and not link.cut_off(req):
            return True
        # its late reply came (the daemon is done with the slot), or it was lost when a request reconnected the
        # socket: then nothing will tell, and the daemon decides at the next submit (SLOT_IN_FLIGHT while it runs)
        link.forget(req)
        del self._abandoned[slot]
        return False

    @_exclusive
    def free_slot(self) -> int | None:
        """A slot not in flight (round-robin), or None when all are."""
        self._check_open()
        busy = set(self.in_flight) | {slot for slot in list(self._abandoned) if self._still_running(slot)}
        for i in range(self.slots):
            slot = (self._next_slot + i) % self.slots
            if slot not in busy:
                self._next_slot = slot + 1
                return slot
        return None

    @_exclusive
    def submit(self, slot: int, frame: int | None = None) -> int:
        """Ask the daemon to upscale input slot ``slot`` into output slot ``slot``; returns the frame id.
        Does not wait: :meth:`collect` returns results in submission order."""
        self._check_open()
        slot = self._check_slot(slot)
        if slot in self.in_flight:
            raise SessionError(f"slot {slot} is still in flight; collect it first", ErrorCode.SLOT_IN_FLIGHT)
        # A slot whose frame collect() gave up on may be submitted again: if the daemon still runs that frame, this
        # one's reply is SLOT_IN_FLIGHT; if the old reply was lost, the daemon's answer frees the slot for good.
        frame = self._client.next_frame_id() if frame is None else operator.index(frame)
        # frames go out here, not through request(): a render loop that only submits would otherwise never tell the
        # daemon of the sessions it dropped, whose segments then stayed until their lease
        self._client._reap_orphans(notify=True)
        req = self._client._link.send(Submit(session=self.id, slot=slot, frame=frame))
        self._outstanding.append((req, slot, frame))
        return frame

    @_exclusive
    def collect(self, timeout: float | None = None) -> FrameResult:
        """Wait for the oldest submitted frame. Raises BusyError if the daemon refused it (resubmit later),
        SessionLostError if the session is gone, ServerUnavailableError if the daemon stays silent. ``timeout``
        (default: the client's) is per attempt: after each silent one the daemon is pinged, and while it answers
        (slow, not gone) the wait goes on, up to the client's ``retries`` + 1 attempts."""
        self._check_open()
        if not self._outstanding:
            raise SessionError(f"session {self.id} has no frame in flight", ErrorCode.SLOT_OUT_OF_RANGE)
        req, slot, frame = self._outstanding[0]
        link, timeout = self._client._link, _positive_timeout(timeout, self._client.timeout)
        for _ in range(self._client.retries + 1):
            if link.arrived(req, timeout):
                # an interrupt (Ctrl-C) between taking the reply and dropping the frame from the queue lost the reply
                # and stalled the next call a whole timeout: the frame leaves the queue first
                self._outstanding.popleft()
                done = _expect(link.take(req), Done)  # an error reply raises (SLOT_IN_FLIGHT: the old frame runs)
                stale = self._abandoned.pop(slot, None)  # a newer frame of the slot is done: the old one is over
                if stale is not None:
                    link.forget(stale)
                return FrameResult(self.id, slot, frame, done.timings, self._outputs[slot])
            try:
                self.check_alive()  # keeps the request socket while the daemon answers: the late reply comes there
            except ServerUnavailableError:
                break  # no daemon: waiting longer is no use
        self._outstanding.popleft()
        self._abandoned[slot] = req  # the daemon holds the slot until it answers; the reply frees it
        raise ServerUnavailableError(f"frame {frame} of session {self.id} got no reply; is the daemon running, or "
                                     "overloaded?")

    @_exclusive
    def wait_slot(self, slot: int, timeout: float | None = None) -> None:
        """Wait until the daemon has finished a frame of ``slot`` whose collect() timed out (no-op otherwise);
        ServerUnavailableError if it is still running after ``timeout`` (default: the client's). Returns at once when
        that frame's reply was lost with a socket a timed-out request reconnected: nothing can say when it ends, and
        a submit of the slot is answered SLOT_IN_FLIGHT while the daemon still runs it."""
        if not self._still_running(slot):  # none given up on, its reply is here, or it was lost with a socket
            return
        if self._client._link.wait(self._abandoned[slot], _positive_timeout(timeout, self._client.timeout)) is None:
            raise ServerUnavailableError(f"slot {slot} of session {self.id} still runs a frame given up on")
        del self._abandoned[slot]

    def _forget_replies(self) -> None:
        """Stop awaiting every reply of this session (it is lost or closed), so none lingers in the mailbox."""
        for req in [req for req, _, _ in self._outstanding] + list(self._abandoned.values()):
            self._client._link.forget(req)
        self._outstanding.clear()
        self._abandoned.clear()

    @_exclusive
    def check_alive(self) -> None:
        """Return if the daemon that has this session answers a ping (it is slow, not gone), asked on a throwaway
        socket within the client's timeout; ServerUnavailableError if none does, SessionLostError if it restarted or
        dropped the session."""
        self._check_open()
        pong = self._client._probe([self.id], max(self._client.timeout, 1.0))  # a busy machine answers slowly
        if pong is None:
            raise ServerUnavailableError(f"the upscaler daemon at {self._client.endpoint} does not answer")
        if pong.instance != self.instance:
            self._client._same_instance(pong.instance)  # a restart: the client says hello to the new daemon
        if pong.instance != self.instance or self.id not in pong.sessions:
            self._forget_replies()
            raise SessionLostError(f"session {self.id} is gone (daemon restarted or lease expired)")

    @_exclusive
    def upscale(self, frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Copy ``frame`` into a free slot, upscale it and copy the result into ``out`` (default: a new array);
        BUSY replies are retried for up to the client's timeout."""
        self._check_open()
        _require_array(frame, "frames must be numpy arrays")
        if frame.shape != self._inputs[0].shape or frame.dtype != np.uint8:
            raise SessionError(f"frame {frame.shape} {frame.dtype} does not match session {self.id}: "
                               f"{self._inputs[0].shape} uint8", ErrorCode.INVALID_FIELD)
        if out is not None:
            _require_array(out, "out must be a numpy array")
        if out is not None and (out.shape != self._outputs[0].shape or out.dtype != np.uint8):
            raise ValueError(f"out must be a {self._outputs[0].shape} uint8 array, got {out.shape} {out.dtype}")
        _require_writable(out)
        if any(req not in self._own_frames for req, _, _ in self._outstanding):
            raise SessionError(f"session {self.id} has frames submitted and not collected: collect() them before "
                               "upscale(), which would take and drop their results", ErrorCode.SLOT_IN_FLIGHT)
        while self._outstanding:  # left by an upscale() that was interrupted (Ctrl-C): their results are nobody's
            self._own_frames.discard(self._outstanding[0][0])
            self.collect()
        slot = self.free_slot()
        if slot is None:  # every slot runs a frame an earlier call gave up on: wait for the oldest's late reply
            slot = next(iter(self._abandoned))
            with contextlib.suppress(ServerUnavailableError):  # that reply may be lost: the daemon decides below
                self.wait_slot(slot)
        np.copyto(self._inputs[slot], frame)

        def attempt() -> FrameResult:
            self.submit(slot)
            req = self._outstanding[-1][0]
            self._own_frames.add(req)
            try:
                return self.collect()
            except SessionError as exc:  # a frame given up on before a reconnect (its reply lost) still runs
                if exc.code != ErrorCode.SLOT_IN_FLIGHT:
                    raise
                raise BusyError(f"slot {slot} of session {self.id} still runs a frame given up on") from exc
            finally:
                if all(req != queued for queued, _, _ in self._outstanding):
                    self._own_frames.discard(req)

        result = _retry_busy(attempt, self._client.timeout).output
        if out is None:
            return np.array(result)
        np.copyto(out, result)
        return out

    def close(self, notify: bool = True) -> None:
        """Close the session (the daemon frees its memory) and unmap the rings; views taken earlier stay valid
        only while they are referenced. ``notify=False`` skips telling the daemon (it already forgot us)."""
        if self.closed:
            return
        if os.getpid() != self._link.owner_pid:  # a forked child: the session is the parent's, as client.close() says
            self.closed = True  # this process's mappings go when the session does (its finalizer), as if dropped
            return
        with self._client._link._owned():  # another thread in a request: raise before anything is changed
            self._close(notify)

    def _close(self, notify: bool) -> None:
        self.closed = True
        self._client._forget(self)
        self._forget_replies()
        if notify and not self._client.closed and not self._client._link.interrupted.is_set():
            # Gone already, or the daemon is down (or the client interrupted while this waits): its lease or its
            # restart cleans up. The rings are unmapped below in every case.
            with contextlib.suppress(ServerUnavailableError, SessionError, ProtocolError, ClientInterruptedError):
                self._client.request(Close(session=self.id), Closed, retries=0, timeout=min(self._client.timeout, 1))
        self._inputs.clear()
        self._outputs.clear()
        self._release.detach()
        _close_rings(self._in, self._out)


def _orphan(orphans: list[tuple[int, list[int]]], session_id: int, outstanding: collections.deque[tuple[int, int, int]],
            abandoned: dict[int, int], *rings: Ring) -> None:
    """A session dropped without close(): unmap its rings, and leave its id and the requests it still awaited for
    its client to close and forget. No lock is taken: the garbage collector may run this on any thread, even while
    that thread holds the client's locks (list.append is atomic)."""
    orphans.append((session_id, [req for req, _, _ in outstanding] + list(abandoned.values())))
    _close_rings(*rings)


def _close_rings(*rings: Ring) -> None:
    for ring in rings:
        ring.close()


def _expect(reply: Message, expect: type[M]) -> M:
    if isinstance(reply, Error):
        raise error_for_code(reply.code, reply.message)
    if not isinstance(reply, expect):
        raise ProtocolError(f"expected a {expect.TYPE} reply, got {reply.TYPE}", ErrorCode.MALFORMED)
    return reply


def _retry_busy(call: Callable[[], Any], timeout: float) -> Any:
    """``call()``, retried with a growing pause while the daemon answers BUSY, for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            return call()
        except BusyError:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _positive_timeout(timeout: float | None, default: float) -> float:
    """``timeout``, or ``default`` for None. Waits here are liveness limits (a silent daemon is checked, then given
    up on), not polls: 0 would give up on a frame at once, so it is refused."""
    if timeout is None:
        return default
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds (None: the client's {default:g} s), got {timeout}")
    return float(timeout)


def _retry_count(retries: int) -> int:
    """``retries`` as an int >= 0 (numpy integers too)."""
    try:
        count = operator.index(retries)
    except TypeError:
        raise TypeError(f"retries must be an int >= 0, got {retries!r}") from None
    if isinstance(retries, bool) or count < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    return count


def _require_writable(out: np.ndarray | None) -> None:
    """Checked before the frame is sent: numpy's own error came only after the daemon had computed it."""
    if out is not None and not out.flags.writeable:
        raise ValueError("out is a read-only array: pass a writable one, or none for a new array")


def _require_array(value: Any, rule: str) -> None:
    """TypeError saying ``rule`` for anything but a numpy array (a list used to fail deep inside with an
    AttributeError)."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{rule}, got {type(value).__name__}")


def _format_of(frame: np.ndarray, pixel_format: str | None) -> str:
    _require_array(frame, "frames must be numpy arrays")
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] not in (3, 4):
        raise ValueError(f"frames must be (H, W, 3|4) uint8 arrays, got {frame.shape} {frame.dtype}")
    fmt = ("RGB8" if frame.shape[2] == 3 else "RGBA8") if pixel_format is None else pixel_format
    if fmt not in PIXEL_FORMATS:
        raise ValueError(f"unknown pixel format {fmt!r}; known: {', '.join(PIXEL_FORMATS)}")
    if PIXEL_FORMATS[fmt].channels != frame.shape[2]:
        raise ValueError(f"pixel format {fmt!r} does not fit a {frame.shape[2]}-channel frame")
    return fmt


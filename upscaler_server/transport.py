"""The client's ZeroMQ transport: the request socket (:class:`Link`: a DEALER with a fixed routing id, a mailbox of
replies keyed by request id, reconnect and the one-thread guard), the heartbeat thread, and the sliced polls that
``UpscalerClient.interrupt()`` cuts short.

Apart from ``client.py`` (requests, upscaling) and ``client_session.py`` (sessions) so that sockets and poll timeouts
sit in one place, as the daemon's do in ``server.py``. Private to the client library, which re-exports nothing from
here; pyzmq and msgpack only: importing it never loads torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

from upscaler_server.config import nobody_listens
from upscaler_server.errors import ClientInterruptedError, ConfigError, UpscalerError
from upscaler_server.protocol import PING_SESSIONS_MAX, Message, Opened, Ping, decode, encode

__all__ = ["REPLY_MAX_BYTES", "Heartbeat", "Link", "dealer", "readable"]

REPLY_MAX_BYTES = 1 << 31  # inline results carry a whole output frame
_INTERRUPT_SLICE_S = 0.05  # waits poll in slices this long, so interrupt() from another thread is seen soon
_LIVENESS_S = 1.0  # a longer wait looks this often whether an ipc daemon is still there (one connect() each time)


class Link:
    """A DEALER socket with a fixed routing id, a mailbox of replies keyed by request id, and reconnect."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self._ctx = ctx
        self.endpoint = endpoint
        self.owner_pid = os.getpid()
        # held while a thread sends or waits: a second thread at the same time gets an error, not a stolen reply,
        # a recv() that blocks forever or an aborted process (ZeroMQ sockets are not thread-safe)
        self._in_use = threading.RLock()
        self._routing_id = b"\x01" + secrets.token_bytes(15)  # ids starting with a zero byte are reserved
        self._socket, self._ends = self._connect()
        self._ids = itertools.count(1)
        self._mailbox: dict[int, Message] = {}
        self._waiting: set[int] = set()
        # awaited replies that were not in yet when reconnect() closed the socket they would have come on: they are
        # lost, unless the daemon sends them after the new socket has connected (same routing id, ROUTER_HANDOVER)
        self._cut_off: set[int] = set()
        # awaited replies whose connection ended before they came (a daemon killed, maybe restarted since): the
        # next wait for one returns at once, so that the caller asks who answers now (a restarted daemon never
        # answers what was sent to the old one, and a wait for it lasted a whole timeout)
        self._unanswered: set[int] = set()
        # sessions the daemon opened for an `open` given up on (its `opened` came late, or the request was resent):
        # nobody holds them, and the client closes them (each held shared memory until its lease ended)
        self.unclaimed_sessions: list[int] = []
        self.interrupted = threading.Event()  # set by UpscalerClient.interrupt(), from any thread

    def _connect(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        """The request socket, and the socket on which libzmq reports its connections' ends (a monitor)."""
        try:
            sock = dealer(self._ctx, self.endpoint, self._routing_id)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot connect to {self.endpoint!r}: {exc} (endpoints look like "
                              "ipc:///path/to/socket or tcp://127.0.0.1:5555)") from None
        return sock, sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    def reconnect(self) -> None:
        with self._owned():
            self._cut_off |= self._waiting - self._mailbox.keys()
            self._close_sockets()
            self._socket, self._ends = self._connect()

    def _close_sockets(self) -> None:
        self._socket.disable_monitor()
        self._ends.close(linger=0)
        self._socket.close(linger=0)

    def _note_ended_connections(self) -> None:
        """When a connection to the daemon has ended, the replies still awaited were lost with it: what it sent
        before it ended is read first (libzmq queues it before it reports the end)."""
        ended = False
        while self._ends.poll(0, zmq.POLLIN):
            ended |= recv_monitor_message(self._ends)["event"] == zmq.EVENT_DISCONNECTED
        if not ended:
            return
        while self._socket.poll(0, zmq.POLLIN):
            self._receive()
        lost = self._waiting - self._mailbox.keys()
        self._cut_off |= lost
        self._unanswered |= lost

    @contextlib.contextmanager
    def _owned(self) -> Iterator[None]:
        """Raise UpscalerError when the socket is used after a fork or by two threads at once."""
        self.check_process()
        if not self._in_use.acquire(blocking=False):
            raise UpscalerError("this UpscalerClient is in use by another thread: use one client per thread")
        try:
            yield
        finally:
            self._in_use.release()

    def check_process(self) -> None:
        """Raise UpscalerError in a process forked after the client was created: its sockets and shared memory are
        the parent's."""
        if os.getpid() != self.owner_pid:
            raise UpscalerError("this UpscalerClient was created in another process (before a fork): create a new "
                                "one in this process")

    def send(self, msg: Message) -> int:
        """Send ``msg`` with a fresh request id (or its own, if set) and return the id."""
        with self._owned():
            self._note_ended_connections()  # before: a connection that ended earlier did not lose this request
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
            while True:
                self._note_ended_connections()
                if req in self._mailbox:
                    return True
                if req in self._unanswered:  # once: a caller that finds the same daemon answering waits again
                    self._unanswered.discard(req)
                    return False
                left = deadline - time.monotonic()
                if readable(self._socket, min(left, _LIVENESS_S), self.interrupted):
                    self._receive()
                elif left <= _LIVENESS_S or nobody_listens(self.endpoint) is not None:
                    return False  # the timeout, or a daemon that died: no use waiting out the rest

    def _receive(self) -> None:
        reply = decode(self._socket.recv(), "reply", max_bin=REPLY_MAX_BYTES)
        if reply.req in self._waiting:  # anything else answers a request given up on
            self._mailbox[reply.req] = reply
            self._cut_off.discard(reply.req)
            self._unanswered.discard(reply.req)
        elif isinstance(reply, Opened):
            self.unclaimed_sessions.append(reply.session)

    def forget(self, req: int) -> None:
        self._waiting.discard(req)
        self._cut_off.discard(req)
        self._unanswered.discard(req)
        self._mailbox.pop(req, None)

    def cut_off(self, req: int) -> bool:
        """Whether the awaited reply to ``req`` may have been lost with a socket that reconnect() closed."""
        return req in self._cut_off

    def take(self, req: int) -> Message | None:
        """The reply to ``req`` if it has arrived (read from the socket now, without waiting), else None."""
        return self.wait(req, 0.0) if req in self._waiting or req in self._mailbox else None

    def close(self) -> None:
        self._close_sockets()

    def idle(self) -> bool:
        """Whether no other thread is inside a call on this socket now."""
        if not self._in_use.acquire(blocking=False):
            return False
        self._in_use.release()
        return True


def readable(sock: zmq.Socket[bytes], timeout: float, interrupted: threading.Event) -> bool:
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


def dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, routing_id: bytes | None = None) -> zmq.Socket[bytes]:
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


class Heartbeat(threading.Thread):
    """Pings the daemon every ``interval`` seconds with the ids of the open sessions, on its own socket."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, interval: float,
                 sessions: weakref.WeakMethod[Callable[[], list[int]]]) -> None:
        super().__init__(name="upscaler-heartbeat", daemon=True)
        self._ctx, self._endpoint, self._sessions = ctx, endpoint, sessions
        self._interval = interval
        self._wake = threading.Event()  # set by retime() and stop()
        self._stopped = False
        # Set (a plain assignment) by a dropped client's finalizer when it runs on this thread, where the garbage
        # collector may call it even inside _wake.wait(): this thread releases the link and context as it ends.
        self.release_at_end: tuple[Link, zmq.Context[zmq.Socket[bytes]]] | None = None

    def run(self) -> None:
        sock = dealer(self._ctx, self._endpoint)  # the link connected to the same endpoint: this cannot fail
        try:
            while True:
                self._wake.wait(self._interval)
                self._wake.clear()  # before the checks: a stop() from now on ends the next wait at once
                if self._stopped or self.release_at_end is not None:
                    break
                session_ids = self._sessions()  # weak: a client dropped without close() must not live on here
                if session_ids is None:
                    break
                ids = session_ids()
                del session_ids
                for start in range(0, len(ids), PING_SESSIONS_MAX):  # a ping names at most that many
                    with contextlib.suppress(zmq.Again):  # daemon unreachable and our queue full: next period
                        sock.send(encode(Ping(sessions=ids[start:start + PING_SESSIONS_MAX])), zmq.NOBLOCK)
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

    def retime(self, interval: float) -> None:
        """Ping every ``interval`` seconds from now on, starting at once (a restarted daemon with a shorter lease
        must hear of the sessions opened on it before the old period runs out)."""
        self._interval = interval
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self.join(timeout=5)

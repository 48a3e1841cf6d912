"""The client's sessions: :class:`Session` (input and output rings in shared memory, frames submitted by slot and
collected in submission order) and :class:`FrameResult`, with the checks and retries they share with
``UpscalerClient``.

Apart from ``client.py`` only to keep files short: import both from :mod:`upscaler_server.client`, which re-exports
them (not to be confused with the daemon's ``sessions.py``). A session talks to the daemon through its client, which
this module names for type checking alone, so there is no import cycle. Never imports torch.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import numbers
import operator
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np

from upscaler_server.config import nobody_listens
from upscaler_server.errors import (
    BusyError,
    ClientInterruptedError,
    ErrorCode,
    ProtocolError,
    ServerUnavailableError,
    SessionError,
    SessionLostError,
    UpscalerError,
    error_for_code,
)
from upscaler_server.protocol import PIXEL_FORMATS, Close, Closed, Done, Error, Message, Opened, Submit, Timings
from upscaler_server.shm import Ring, RingLayout, check_segment_name

if TYPE_CHECKING:
    from upscaler_server.client import UpscalerClient
    from upscaler_server.transport import Link

# FrameResult and Session are the public ones (re-exported by upscaler_server.client); the helpers are shared with
# client.py, which this module cannot import at run time
__all__ = [
    "FrameResult",
    "Session",
    "exclusive",
    "expect_reply",
    "int_argument",
    "positive_timeout",
    "require_array",
    "retry_busy",
]

M = TypeVar("M", bound=Message)
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class FrameResult:
    """A finished frame. ``output`` is a zero-copy view of the output slot: valid until that slot is resubmitted."""

    session: int
    slot: int
    frame: int
    timings: Timings
    output: np.ndarray


def exclusive(method: F) -> F:
    """Hold the client's socket guard for the whole call, not only around each message: upscale() or collect() is
    several sends and waits on shared state (a slot, the queue of frames in flight), and a second thread slipping in
    between them took the first one's reply and gave it the wrong picture. The guard is re-entrant."""

    @functools.wraps(method)
    def guarded(self: UpscalerClient | Session, *args: Any, **kwargs: Any) -> Any:
        with self._link._owned():
            return method(self, *args, **kwargs)

    return cast(F, guarded)


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
        check_segment_name(opened.input.name, opened.session, "in")
        check_segment_name(opened.output.name, opened.session, "out")
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
        # not at exit: a daemon thread may still be using the session, which would then find itself closed (the
        # exit unmaps the rings anyway; their leases end the daemon's sessions, as for a client that was killed)
        self._release.atexit = False
        self._next_slot = 0
        self.closed = False

    def __reduce__(self) -> Any:
        raise TypeError("a Session cannot be copied or pickled (it maps its client's shared memory): open one per "
                        "client")

    @property
    def _client(self) -> UpscalerClient:
        client = self._client_ref()
        if client is None:  # only a session held by its client refers to it weakly, and then both go together
            raise UpscalerError(f"the UpscalerClient of session {self.id} is gone")
        return client

    @property
    def _link(self) -> Link:
        return self._client._link

    def _check_open(self) -> None:
        if self.closed:  # what the daemon's UNKNOWN_SESSION reply would raise
            raise SessionLostError(f"session {self.id} is closed", ErrorCode.UNKNOWN_SESSION)
        self._link.check_process()  # input() and output(), which hold no guard: a forked child wrote the parent's slots

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
        """``slot`` as an int in [0, slots) (int_argument), SessionError SLOT_OUT_OF_RANGE for one out of range."""
        index = int_argument(slot, "slot")
        if not 0 <= index < self.slots:
            raise SessionError(f"slot {index} is out of range [0, {self.slots})", ErrorCode.SLOT_OUT_OF_RANGE)
        return index

    @property
    def in_flight(self) -> list[int]:
        """Slots submitted and not collected yet, oldest first."""
        return [slot for _, slot, _ in self._outstanding]

    @exclusive
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

    @exclusive
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

    @exclusive
    def submit(self, slot: int, frame: int | None = None) -> int:
        """Ask the daemon to upscale input slot ``slot`` into output slot ``slot``; returns the frame id.
        Does not wait: :meth:`collect` returns results in submission order."""
        self._check_open()
        slot = self._check_slot(slot)
        if slot in self.in_flight:
            raise SessionError(f"slot {slot} is still in flight; collect it first", ErrorCode.SLOT_IN_FLIGHT)
        # A slot whose frame collect() gave up on may be submitted again: if the daemon still runs that frame, this
        # one's reply is SLOT_IN_FLIGHT; if the old reply was lost, the daemon's answer frees the slot for good.
        frame = self._client.next_frame_id() if frame is None else int_argument(frame, "frame")
        # frames go out here, not through request(): a render loop that only submits would otherwise never tell the
        # daemon of the sessions it dropped, whose segments then stayed until their lease
        self._client._reap_orphans(notify=True)
        req = self._client._link.send(Submit(session=self.id, slot=slot, frame=frame))
        self._outstanding.append((req, slot, frame))
        return frame

    @exclusive
    def collect(self, timeout: float | None = None) -> FrameResult:
        """Wait for the oldest submitted frame. Raises BusyError if the daemon refused it (resubmit later),
        SessionLostError if the session is gone, ServerUnavailableError if the daemon stays silent, and also when a
        live daemon's frame takes longer than ``timeout`` x (``retries`` + 1): ``timeout`` (default: the client's)
        is per attempt; after each silent one the daemon is pinged, and while it answers (slow, not gone) the wait
        goes on, up to the client's ``retries`` + 1 attempts. Give a slow device a timeout that covers a frame."""
        self._check_open()
        if not self._outstanding:
            # no daemon error fits (no slot was named): the code is INTERNAL, as for the client's other own errors
            raise SessionError(f"session {self.id} has no frame in flight: submit() one first", ErrorCode.INTERNAL)
        req, slot, frame = self._outstanding[0]
        link, timeout = self._client._link, positive_timeout(timeout, self._client.timeout)
        why = "is the daemon running, or overloaded?"
        for _ in range(self._client.retries + 1):
            if link.arrived(req, timeout):
                # an interrupt (Ctrl-C) between taking the reply and dropping the frame from the queue lost the reply
                # and stalled the next call a whole timeout: the frame leaves the queue first
                self._outstanding.popleft()
                done = expect_reply(link.take(req), Done)  # an error reply raises (SLOT_IN_FLIGHT: the old frame runs)
                stale = self._abandoned.pop(slot, None)  # a newer frame of the slot is done: the old one is over
                if stale is not None:
                    link.forget(stale)
                return FrameResult(self.id, slot, frame, done.timings, self._outputs[slot])
            try:
                self.check_alive()  # keeps the request socket while the daemon answers: the late reply comes there
            except ServerUnavailableError as exc:
                why = str(exc)
                break  # no daemon: waiting longer is no use
        self._outstanding.popleft()
        self._abandoned[slot] = req  # the daemon holds the slot until it answers; the reply frees it
        raise ServerUnavailableError(f"frame {frame} of session {self.id} got no reply; {why}")

    @exclusive
    def wait_slot(self, slot: int, timeout: float | None = None) -> None:
        """Wait until the daemon has finished a frame of ``slot`` whose collect() timed out (no-op otherwise);
        ServerUnavailableError if it is still running after ``timeout`` (default: the client's). Returns at once when
        that frame's reply was lost with a socket a timed-out request reconnected: nothing can say when it ends, and
        a submit of the slot is answered SLOT_IN_FLIGHT while the daemon still runs it."""
        if not self._still_running(slot):  # none given up on, its reply is here, or it was lost with a socket
            return
        if self._client._link.wait(self._abandoned[slot], positive_timeout(timeout, self._client.timeout)) is None:
            raise ServerUnavailableError(f"slot {slot} of session {self.id} still runs a frame given up on")
        del self._abandoned[slot]

    def _forget_replies(self) -> None:
        """Stop awaiting every reply of this session (it is lost or closed), so none lingers in the mailbox."""
        for req in [req for req, _, _ in self._outstanding] + list(self._abandoned.values()):
            self._client._link.forget(req)
        self._outstanding.clear()
        self._abandoned.clear()

    @exclusive
    def check_alive(self) -> None:
        """Return if the daemon that has this session answers a ping (it is slow, not gone), asked on a throwaway
        socket within the client's timeout; ServerUnavailableError if none does, SessionLostError if it restarted or
        dropped the session."""
        self._check_open()
        pong = self._client._probe([self.id], max(self._client.timeout, 1.0))  # a busy machine answers slowly
        if pong is None:
            gone = nobody_listens(self._client.endpoint)
            raise ServerUnavailableError(f"no upscaler daemon at {self._client.endpoint}: {gone}" if gone else
                                         f"the upscaler daemon at {self._client.endpoint} does not answer")
        if pong.instance != self.instance:
            self._client._same_instance(pong.instance)  # a restart: the client says hello to the new daemon
        if pong.instance != self.instance or self.id not in pong.sessions:
            self._forget_replies()
            raise SessionLostError(f"session {self.id} is gone (daemon restarted or lease expired)")

    @exclusive
    def upscale(self, frame: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Copy ``frame`` into a free slot, upscale it and copy the result into ``out`` (default: a new array);
        BUSY replies are retried for up to the client's timeout."""
        self._check_open()
        require_array(frame, "frames must be numpy arrays")
        if frame.shape != self._inputs[0].shape or frame.dtype != np.uint8:
            raise ValueError(f"frame {frame.shape} {frame.dtype} does not match session {self.id}: "
                             f"{self._inputs[0].shape} uint8")
        if out is not None:
            require_array(out, "out must be a numpy array")
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

        result = retry_busy(attempt, self._client.timeout).output
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


def expect_reply(reply: Message, expect: type[M]) -> M:
    if isinstance(reply, Error):
        raise error_for_code(reply.code, reply.message)
    if not isinstance(reply, expect):
        raise ProtocolError(f"expected a {expect.TYPE} reply, got {reply.TYPE}", ErrorCode.MALFORMED)
    return reply


def retry_busy(call: Callable[[], Any], timeout: float) -> Any:
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


def positive_timeout(timeout: float | None, default: float) -> float:
    """``timeout``, or ``default`` for None. Waits here are liveness limits (a silent daemon is checked, then given
    up on), not polls: 0 would give up on a frame at once, so it is refused."""
    if timeout is None:
        return default
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
    if not 0 < timeout < math.inf:  # inf would hang the caller on a stopped (SIGSTOP) daemon, never checked
        raise ValueError(f"timeout must be a finite number of seconds > 0 (None: the client's {default:g} s), "
                         f"got {timeout}")
    return float(timeout)


def int_argument(value: Any, name: str) -> int:
    """``value`` as an int (numpy integers too: a frame's shape often comes as np.int64); TypeError for 1.5 or True,
    which operator.index takes as 1 (the protocol takes no bool for an int: a width of True opened a 1 px session)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def _require_writable(out: np.ndarray | None) -> None:
    """Checked before the frame is sent: numpy's own error came only after the daemon had computed it."""
    if out is not None and not out.flags.writeable:
        raise ValueError("out is a read-only array: pass a writable one, or none for a new array")


def require_array(value: Any, rule: str) -> None:
    """TypeError saying ``rule`` for anything but a numpy array (a list used to fail deep inside with an
    AttributeError)."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{rule}, got {type(value).__name__}")

"""Sessions: a frame size, pixel format and two shared-memory rings (input, output) with leases.

The daemon's transport thread alone touches a :class:`SessionTable`. A session's segments are unlinked as soon as it
ends (close, lease expiry, shutdown); they are unmapped once the engine no longer works on one of its frames.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import time
from dataclasses import dataclass, field

from upscaler_server.config import Config
from upscaler_server.errors import ErrorCode, SessionError
from upscaler_server.protocol import PIXEL_FORMATS, SESSION_MAX, Open, Opened, PixelFormat
from upscaler_server.shm import Ring, RingLayout, segment_name

__all__ = ["FDS_PER_SESSION", "Session", "SessionTable", "check_frame_size", "connection_reserve", "open_files",
           "open_files_shortage", "pixel_format"]

log = logging.getLogger("upscaler_server.sessions")


@dataclass(eq=False)
class Session:
    """One client's frame stream; ``in_flight`` holds submitted slots whose frame is not done yet."""

    id: int
    fmt: PixelFormat
    width: int
    height: int
    slots: int
    scale: int
    input: Ring
    output: Ring
    owner: bytes  # routing id of the connection that opened it: only that connection may submit to it or close it
    last_seen: float = field(default_factory=time.monotonic)
    in_flight: set[int] = field(default_factory=set)
    pending: int = 0  # jobs accepted and not completed by the engine (queued or running)
    ended: bool = False

    @property
    def client(self) -> str:
        """Short identity of the owner, for logs."""
        return self.owner.hex()[:8]

    @property
    def shm_bytes(self) -> int:
        return self.input.layout.size + self.output.layout.size

    def touch(self, now: float | None = None) -> None:
        self.last_seen = time.monotonic() if now is None else now

    def opened(self, req: int) -> Opened:
        return Opened(req=req, session=self.id, width=self.width, height=self.height,
                      out_width=self.width * self.scale, out_height=self.height * self.scale, format=self.fmt.name,
                      slots=self.slots, input=self.input.layout.segment(self.input.name),
                      output=self.output.layout.segment(self.output.name))

    def check_segments(self) -> None:
        """SharedMemoryError if a client truncated either segment (see Ring.check_intact)."""
        for ring in (self.input, self.output):
            ring.check_intact()

    def unlink(self) -> None:
        for ring in (self.input, self.output):
            ring.unlink()

    def release(self) -> None:
        """Unmap both rings (after :meth:`unlink`); views still held elsewhere keep their mapping alive."""
        for ring in (self.input, self.output):
            if not ring.close():
                log.debug("session %d: %s still has live views; unmapped when they go", self.id, ring.name)


def pixel_format(name: str) -> PixelFormat:
    if name not in PIXEL_FORMATS:
        raise SessionError(f"pixel format {name!r} is not supported; use one of {sorted(PIXEL_FORMATS)}",
                           ErrorCode.UNSUPPORTED_FORMAT)
    return PIXEL_FORMATS[name]


def check_frame_size(config: Config, min_size: int, width: int, height: int) -> None:
    """Raise SIZE_TOO_LARGE / SIZE_TOO_SMALL for frames outside the daemon's limits."""
    if width > config.max_width or height > config.max_height or width * height > config.max_pixels:
        raise SessionError(f"frame {width}x{height} exceeds the limits {config.max_width}x{config.max_height}, "
                           f"{config.max_pixels} pixels (daemon options --max-width/--max-height/--max-pixels)",
                           ErrorCode.SIZE_TOO_LARGE)
    if width < min_size or height < min_size:
        raise SessionError(f"frame {width}x{height} is below the model's minimum {min_size}x{min_size}",
                           ErrorCode.SIZE_TOO_SMALL)


def _shm_advice(used: int, needed: int, slots: int, budget: int) -> str:
    """What would let a session that does not fit the shared-memory budget open: fewer slots only when one slot fits
    (a one-slot session was told to use fewer)."""
    if slots > 1 and used + needed // slots <= budget:  # each ring is slots equal strides
        return "use fewer slots"
    if used:
        return "close other sessions, or start the daemon with a larger --max-shm-mb"
    return "this frame size needs a daemon started with a larger --max-shm-mb"


FDS_PER_SESSION = 4  # two segments, each with its descriptor and the one its mapping holds


def connection_reserve(limit: int) -> int:
    """Open files kept free of sessions for new connections: libzmq aborts the daemon (SIGABRT) when it cannot accept
    one, instead of refusing it, and sessions could otherwise take every descriptor."""
    return max(64, limit // 8)


def open_files() -> tuple[int, int] | None:
    """(descriptors open now, the soft limit); None where that cannot be told (no /proc, an unlimited limit)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        return None
    return None if soft == resource.RLIM_INFINITY else (open_now, soft)


def open_files_shortage() -> str | None:
    """Why one more session would eat into the descriptors kept for connections; None when it fits, or where this
    cannot be told."""
    if (counts := open_files()) is None:
        return None
    open_now, soft = counts
    if open_now + FDS_PER_SESSION + connection_reserve(soft) <= soft:
        return None
    return (f"the daemon holds {open_now} open files of its limit of {soft}, and keeps "
            f"{connection_reserve(soft)} for connections; close unused sessions, or give the daemon a higher limit "
            "(ulimit -n, or LimitNOFILE= in its systemd unit)")


class SessionTable:
    """Open sessions of this daemon, their limits and leases."""

    def __init__(self, config: Config, scale: int, min_size: int) -> None:
        self._config = config
        self._scale = scale
        self._min_size = min_size
        self._sessions: dict[int, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def get(self, session_id: int, owner: bytes | None = None) -> Session:
        """The open session ``session_id``; with ``owner``, only if that connection opened it (session ids are no
        secret: they are in the segments' names)."""
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionError(f"session {session_id} is not open (closed, lease expired or daemon restarted); "
                               "open a new one", ErrorCode.UNKNOWN_SESSION)
        if owner is not None and owner != session.owner:
            raise SessionError(f"session {session_id} was opened on another connection; a session is used and "
                               "closed through the connection (routing id) that opened it", ErrorCode.UNKNOWN_SESSION)
        return session

    def open(self, msg: Open, owner: bytes) -> Session:
        """Validate ``msg`` against the limits, create the rings and register the session."""
        fmt = pixel_format(msg.format)
        check_frame_size(self._config, self._min_size, msg.width, msg.height)
        if msg.slots > self._config.max_slots:
            raise SessionError(f"{msg.slots} slots asked, at most {self._config.max_slots}", ErrorCode.RESOURCE_LIMIT)
        if len(self._sessions) >= self._config.max_sessions:
            own = sum(1 for session in self._sessions.values() if session.owner == owner)
            raise SessionError(f"{len(self._sessions)} sessions are open ({own} of them on this connection), the limit "
                               f"is {self._config.max_sessions}; close unused sessions (a client library may hold "
                               "some of its own: the Python client's upscale() keeps one per recent frame size, up "
                               "to 4, until the client is closed)", ErrorCode.RESOURCE_LIMIT)
        if (shortage := open_files_shortage()) is not None:
            raise SessionError(shortage, ErrorCode.RESOURCE_LIMIT)
        lay_in = RingLayout(msg.width, msg.height, fmt.channels, msg.slots)
        lay_out = RingLayout(msg.width * self._scale, msg.height * self._scale, fmt.channels, msg.slots)
        used = sum(s.shm_bytes for s in self._sessions.values())
        needed, budget = lay_in.size + lay_out.size, self._config.max_shm_bytes
        if used + needed > budget:
            raise SessionError(f"the session needs {needed} bytes of shared memory, {budget - used} remain "
                               f"(--max-shm-mb); {_shm_advice(used, needed, msg.slots, budget)}",
                               ErrorCode.RESOURCE_LIMIT)
        session_id = self._new_id()
        ring_in = Ring.create(segment_name(os.getpid(), session_id, "in"), lay_in)
        try:
            ring_out = Ring.create(segment_name(os.getpid(), session_id, "out"), lay_out)
        except Exception:
            ring_in.unlink()
            ring_in.close()
            raise
        session = Session(session_id, fmt, msg.width, msg.height, msg.slots, self._scale, ring_in, ring_out, owner)
        self._sessions[session_id] = session
        return session

    def remove(self, session_id: int) -> Session:
        """Forget the session and unlink its segments; the caller unmaps it once no frame of it is running."""
        session = self._sessions.pop(session_id)
        session.ended = True
        session.unlink()
        return session

    def expired(self, now: float) -> list[Session]:
        """Sessions idle for longer than the lease; those with frames queued or running are not idle."""
        limit = now - self._config.lease_timeout
        return [s for s in self._sessions.values() if s.last_seen < limit and s.pending == 0]

    def _new_id(self) -> int:
        while True:
            candidate = secrets.randbelow(SESSION_MAX) + 1  # random: a stale client id rarely hits a new session
            if candidate not in self._sessions:
                return candidate

"""Error hierarchy and wire error codes of the upscaler daemon and its client.

Every exception carries an :class:`ErrorCode`; the daemon turns any :class:`UpscalerError` raised while handling a
message into an ``error`` reply with that code and carries on. The client turns an ``error`` reply back into the
matching exception class with :func:`error_for_code`. This module imports nothing heavy (no torch, no zmq).

The client's own errors, raised before anything is sent, follow one rule: an argument wrong in itself (its type, a
frame's shape or dtype, a negative timeout) is a TypeError or ValueError, as in the rest of Python; a request the
daemon would refuse (a closed session, a slot out of range or in flight) raises what the daemon's reply would, with
its code; everything else the client raises itself (no reply, a closed or interrupted client, one used by two
threads, collect() with nothing in flight) has the code INTERNAL, which no reply of the daemon's shares but for a bug.
"""

from __future__ import annotations

import enum

__all__ = [
    "DAEMON_FAILURES",
    "BusyError",
    "ClientInterruptedError",
    "ConfigError",
    "EngineError",
    "ErrorCode",
    "ModelLoadError",
    "ProtocolError",
    "ServerUnavailableError",
    "SessionError",
    "SessionLostError",
    "SharedMemoryError",
    "UpscalerError",
    "error_for_code",
]


class ErrorCode(enum.IntEnum):
    """Error codes carried in ``error`` replies (docs/protocol.md, "Error codes")."""

    MALFORMED = 1  # not msgpack, not a map, bad framing
    VERSION_MISMATCH = 2  # "v" is not a version the daemon speaks
    UNKNOWN_TYPE = 3  # "type" names no request
    INVALID_FIELD = 4  # a key is missing, unknown, of the wrong type or out of range
    UNKNOWN_SESSION = 10  # no open session has this id (closed, expired or never opened)
    SLOT_OUT_OF_RANGE = 11  # slot >= the session's slot count
    SLOT_IN_FLIGHT = 12  # the slot was submitted and its frame is not done yet
    SIZE_TOO_LARGE = 13  # frame larger than the daemon's limits
    SIZE_TOO_SMALL = 14  # frame smaller than the model's minimum input size
    UNSUPPORTED_FORMAT = 15  # pixel format the daemon does not know
    RESOURCE_LIMIT = 16  # too many sessions or slots, or the shared-memory budget is spent
    BUSY = 20  # the frame queue is full: retry later
    SHUTTING_DOWN = 21  # the daemon is stopping
    SHM_ERROR = 30  # shared memory could not be created or used
    INFERENCE_ERROR = 31  # the engine failed on this frame
    INTERNAL = 99  # a bug in the daemon (and the client's own errors that no reply matches: module docstring)


# the daemon's own failures, not the client's: an operator wants to hear of these
DAEMON_FAILURES = frozenset({ErrorCode.SHM_ERROR, ErrorCode.INFERENCE_ERROR, ErrorCode.INTERNAL})


class UpscalerError(Exception):
    """Base class of every error this package raises on purpose."""

    default_code = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = ErrorCode(code) if code is not None else self.default_code


class ProtocolError(UpscalerError):
    """A message that breaks the schema; ``req`` is the request id when it could be read (else 0)."""

    default_code = ErrorCode.MALFORMED

    def __init__(self, message: str, code: ErrorCode | None = None, req: int = 0) -> None:
        super().__init__(message, code)
        self.req = req


class SessionError(UpscalerError):
    """A request that names a session, slot or frame size the daemon cannot serve."""

    default_code = ErrorCode.UNKNOWN_SESSION


class SessionLostError(SessionError):
    """Client side: the daemon no longer knows the session (restart or lease expiry); open a new one."""


class BusyError(UpscalerError):
    """The daemon's frame queue is full; the frame was not accepted. Retry after a short wait."""

    default_code = ErrorCode.BUSY


class SharedMemoryError(UpscalerError):
    """A shared-memory segment could not be created, attached, sized or removed."""

    default_code = ErrorCode.SHM_ERROR


class ModelLoadError(UpscalerError):
    """The checkpoint is missing, corrupt or unusable; the daemon cannot start."""

    default_code = ErrorCode.INTERNAL


class EngineError(UpscalerError):
    """The inference engine failed on a frame or could not be set up."""

    default_code = ErrorCode.INFERENCE_ERROR


class ConfigError(UpscalerError):
    """Invalid daemon settings (device, precision, endpoint, limits)."""

    default_code = ErrorCode.INTERNAL


class ServerUnavailableError(UpscalerError):
    """Client side: no reply from the daemon after every retry (is it running? right endpoint?), or its
    ``SHUTTING_DOWN`` reply (the code says which)."""

    default_code = ErrorCode.INTERNAL


class ClientInterruptedError(UpscalerError):
    """Client side: another thread called ``UpscalerClient.interrupt()``; close the client."""

    default_code = ErrorCode.INTERNAL


_CLASS_BY_CODE: dict[ErrorCode, type[UpscalerError]] = {
    ErrorCode.MALFORMED: ProtocolError,
    ErrorCode.VERSION_MISMATCH: ProtocolError,
    ErrorCode.UNKNOWN_TYPE: ProtocolError,
    ErrorCode.INVALID_FIELD: ProtocolError,
    ErrorCode.UNKNOWN_SESSION: SessionLostError,
    ErrorCode.SLOT_OUT_OF_RANGE: SessionError,
    ErrorCode.SLOT_IN_FLIGHT: SessionError,
    ErrorCode.SIZE_TOO_LARGE: SessionError,
    ErrorCode.SIZE_TOO_SMALL: SessionError,
    ErrorCode.UNSUPPORTED_FORMAT: SessionError,
    ErrorCode.RESOURCE_LIMIT: SessionError,
    ErrorCode.BUSY: BusyError,
    ErrorCode.SHM_ERROR: SharedMemoryError,
    ErrorCode.INFERENCE_ERROR: EngineError,
    ErrorCode.SHUTTING_DOWN: ServerUnavailableError,  # the daemon is stopping: like one that does not answer
}


def error_for_code(code: int, message: str) -> UpscalerError:
    """The exception a client raises for an ``error`` reply with ``code`` (unknown codes map to INTERNAL)."""
    try:
        known = ErrorCode(code)
    except ValueError:
        return UpscalerError(f"[code {code}] {message}", ErrorCode.INTERNAL)
    return _CLASS_BY_CODE.get(known, UpscalerError)(message, known)

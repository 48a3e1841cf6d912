"""Wire schema of the upscaler daemon: message types, their fields, msgpack encoding and validation.

The schema alone: no sockets, no shared memory, no torch. docs/protocol.md is the normative description for
non-Python clients; this module is its executable form. Every message is one msgpack map with the header keys
``v`` (protocol version), ``type`` and ``req`` (request id, echoed in the reply) plus the fields of its type.
Requests flow client -> daemon, replies daemon -> client. Unknown or missing keys, wrong types and out-of-range values
raise :class:`ProtocolError` with :attr:`ErrorCode.INVALID_FIELD`.
"""

from __future__ import annotations

import functools
import itertools
import typing
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import msgpack

from upscaler_server.errors import ErrorCode, ProtocolError

__all__ = [
    "MODEL_NAME_MAX",
    "PIXEL_FORMATS",
    "RECENT_FRAMES_MAX",
    "VERSION",
    "Close",
    "Closed",
    "Done",
    "Error",
    "ErrorCode",
    "Hello",
    "Message",
    "Open",
    "Opened",
    "Ping",
    "PixelFormat",
    "Pong",
    "Process",
    "ProtocolError",
    "Reply",
    "Request",
    "Result",
    "Segment",
    "Statistics",
    "Stats",
    "Submit",
    "Timings",
    "Welcome",
    "decode",
    "encode",
]

VERSION = 1
U64_MAX = 2**64 - 1
SESSION_MAX = 2**31 - 1
DIM_MAX = 65535
SLOTS_MAX = 64
SCALE_MAX = 16  # welcome.scale
COUNT_MAX = 1 << 20  # welcome.max_sessions and max_queue
PING_SESSIONS_MAX = 256
RECENT_FRAMES_MAX = 1024  # statistics: the latest frames whose times make the percentiles
MODEL_NAME_MAX = 128  # characters of welcome.model
MAX_CONTAINERS = 64  # maps and arrays in one message, all depths together (welcome and opened have 3)
# msgpack decodes bin as bytes; senders may pass any buffer (a client hands over its frame's memoryview, no copy)
Binary = bytes | bytearray | memoryview

# Control messages are tiny; only `process`/`result` carry pixels, bounded by the caller (the daemon's limits).
CONTROL_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class PixelFormat:
    """Byte layout of one pixel: ``channels`` bytes; ``rgb`` gives the byte index of R, G and B; ``alpha`` of A."""

    name: str
    channels: int
    rgb: tuple[int, int, int]
    alpha: int | None


PIXEL_FORMATS: dict[str, PixelFormat] = {
    "RGB8": PixelFormat("RGB8", 3, (0, 1, 2), None),
    "BGR8": PixelFormat("BGR8", 3, (2, 1, 0), None),
    "RGBA8": PixelFormat("RGBA8", 4, (0, 1, 2), 3),
    "BGRA8": PixelFormat("BGRA8", 4, (2, 1, 0), 3),
}


# --- field checks ----------------------------------------------------------------------------------------------------


class _Check:
    """Validates one field value; ``wire`` turns a Python value into its msgpack form."""

    def check(self, name: str, value: Any) -> Any:
        raise NotImplementedError

    def wire(self, value: Any) -> Any:
        return value


def _invalid(name: str, expected: str, value: Any) -> ProtocolError:
    return ProtocolError(f"field {name!r} must be {expected}, got {brief(value)}", ErrorCode.INVALID_FIELD)


def brief(value: Any, limit: int = 80, depth: int = 2) -> str:
    """A short text for a value a client sent, made without printing all of it: repr() of a message-sized bin
    inside an array, or used as a map key, took the daemon's message thread 0.2 s and 250 MB before it was cut."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, msgpack.ExtType):
        return f"<ext type {value.code}, {len(value.data)} bytes>"
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    more = ", ..." if isinstance(value, (list, tuple, dict)) and len(value) > 3 else ""  # three items are shown
    if isinstance(value, dict):
        if depth == 0:
            return f"<map of {len(value)}>"
        pairs = [f"{brief(k, 20, 0)}: {brief(v, 20, depth - 1)}" for k, v in itertools.islice(value.items(), 3)]
        return "{" + ", ".join(pairs) + more + "}"
    if isinstance(value, (list, tuple)):
        if depth == 0:
            return f"<array of {len(value)}>"
        return "[" + ", ".join(brief(v, 20, depth - 1) for v in value[:3]) + more + "]"
    return repr(value)[:limit]  # numbers, None, booleans, timestamps: short


@dataclass(frozen=True)
class _Int(_Check):
    lo: int
    hi: int

    def check(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not self.lo <= value <= self.hi:
            raise _invalid(name, f"an integer in [{self.lo}, {self.hi}]", value)
        return value


@dataclass(frozen=True)
class _Str(_Check):
    max_len: int
    min_len: int = 0

    def check(self, name: str, value: Any) -> str:
        if not isinstance(value, str) or not self.min_len <= len(value) <= self.max_len:
            raise _invalid(name, f"a string of {self.min_len} to {self.max_len} characters", value)
        return value


@dataclass(frozen=True)
class _Bool(_Check):
    def check(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _invalid(name, "a boolean", value)
        return value


@dataclass(frozen=True)
class _Bin(_Check):
    max_len: int

    def check(self, name: str, value: Any) -> Binary:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise _invalid(name, "binary data (msgpack bin)", value)
        if memoryview(value).nbytes > self.max_len:
            raise _invalid(name, f"at most {self.max_len} bytes", value)
        return value


@dataclass(frozen=True)
class _List(_Check):
    item: _Check
    max_items: int

    def check(self, name: str, value: Any) -> list[Any]:
        if not isinstance(value, list) or len(value) > self.max_items:
            raise _invalid(name, f"an array of at most {self.max_items} items", value)
        return [self.item.check(f"{name}[{i}]", v) for i, v in enumerate(value)]


@dataclass(frozen=True)
class _Map(_Check):
    cls: type

    def check(self, name: str, value: Any) -> Any:
        if isinstance(value, self.cls):  # encoding: re-check the instance's fields
            _fields_to_wire(value)
            return value
        if not isinstance(value, dict):
            raise _invalid(name, "a map", value)
        return self.cls(**_check_fields(self.cls, value, prefix=f"{name}."))

    def wire(self, value: Any) -> dict[str, Any]:
        return _fields_to_wire(value)


U64 = Annotated[int, _Int(0, U64_MAX)]
Dim = Annotated[int, _Int(1, DIM_MAX)]
SessionId = Annotated[int, _Int(1, SESSION_MAX)]
SlotIndex = Annotated[int, _Int(0, SLOTS_MAX - 1)]
FormatName = Annotated[str, _Str(16, 1)]


@functools.cache
def _specs(cls: type) -> dict[str, _Check]:
    """The checks of ``cls``'s fields, from their ``Annotated[type, check]`` hints."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {name: hint.__metadata__[0] for name, hint in hints.items() if typing.get_origin(hint) is Annotated}


def _check_fields(cls: type, raw: dict[Any, Any], prefix: str = "") -> dict[str, Any]:
    specs = _specs(cls)
    unknown = sorted(str(k) for k in raw if k not in specs)
    if unknown:
        raise ProtocolError(f"unknown key(s) {brief(unknown)} in {prefix or cls.__name__}", ErrorCode.INVALID_FIELD)
    missing = sorted(k for k in specs if k not in raw)
    if missing:
        raise ProtocolError(f"missing key(s) {missing} in {prefix or cls.__name__}", ErrorCode.INVALID_FIELD)
    return {k: check.check(prefix + k, raw[k]) for k, check in specs.items()}


def _fields_to_wire(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, check in _specs(type(obj)).items():
        value = check.check(name, getattr(obj, name))
        out[name] = [check.item.wire(v) for v in value] if isinstance(check, _List) else check.wire(value)
    return out


# --- nested maps -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Timings:
    """Per-frame timings in microseconds, measured by the daemon."""

    queue_us: U64  # accepted -> the engine starts on it
    copy_in_us: U64  # input slot -> device tensor (including uint8 -> float)
    infer_us: U64  # model forward
    copy_out_us: U64  # device tensor -> output slot (including float -> uint8)
    total_us: U64  # request received -> reply sent


@dataclass(frozen=True, kw_only=True)
class Segment:
    """One shared-memory ring: ``slots`` frames, slot i at byte offset i * slot_stride, rows top first."""

    name: Annotated[str, _Str(200, 2)]  # POSIX shm name with its leading "/", for shm_open()
    size: Annotated[int, _Int(1, U64_MAX)]  # segment size in bytes (= slots * slot_stride)
    slot_stride: Annotated[int, _Int(1, U64_MAX)]  # bytes from one slot's start to the next's (multiple of 4096)
    slot_bytes: Annotated[int, _Int(1, U64_MAX)]  # bytes of pixels in a slot (= height * row_stride)
    row_stride: Annotated[int, _Int(1, U64_MAX)]  # bytes per row (= width * channels, no padding)


# --- messages --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Message:
    """Header shared by every message; ``TYPE`` is the wire name in the ``type`` key."""

    TYPE: ClassVar[str] = ""
    req: U64 = 0


@dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """Client greeting; answered by :class:`Welcome`. Optional: any request may come first."""

    TYPE: ClassVar[str] = "hello"
    client: Annotated[str, _Str(64)]  # free-form client name for the daemon's log


@dataclass(frozen=True, kw_only=True)
class Open(Message):
    """Open a session: the daemon creates its input and output rings; answered by :class:`Opened`."""

    TYPE: ClassVar[str] = "open"
    width: Dim  # low-resolution frame width in pixels
    height: Dim  # low-resolution frame height in pixels
    format: FormatName  # a key of PIXEL_FORMATS
    slots: Annotated[int, _Int(1, SLOTS_MAX)]  # frames that can be in flight at once


@dataclass(frozen=True, kw_only=True)
class Submit(Message):
    """Upscale input slot ``slot`` of a session into output slot ``slot``; answered by :class:`Done` when finished."""

    TYPE: ClassVar[str] = "submit"
    session: SessionId
    slot: SlotIndex
    frame: U64  # client's frame id, echoed in Done


@dataclass(frozen=True, kw_only=True)
class Process(Message):
    """Upscale pixels carried in the message itself (no shared memory); answered by :class:`Result`."""

    TYPE: ClassVar[str] = "process"
    width: Dim
    height: Dim
    format: FormatName
    frame: U64
    pixels: Annotated[Binary, _Bin(U64_MAX)]  # height * width * channels bytes, rows top first, no padding


@dataclass(frozen=True, kw_only=True)
class Close(Message):
    """Close a session; the daemon removes its segments. Answered by :class:`Closed`."""

    TYPE: ClassVar[str] = "close"
    session: SessionId


@dataclass(frozen=True, kw_only=True)
class Ping(Message):
    """Heartbeat: renews the lease of every listed session. Answered by :class:`Pong`."""

    TYPE: ClassVar[str] = "ping"
    sessions: Annotated[list[int], _List(_Int(1, SESSION_MAX), PING_SESSIONS_MAX)]


@dataclass(frozen=True, kw_only=True)
class Stats(Message):
    """Ask what the daemon has done and how long its latest frames took; answered by :class:`Statistics`. Renews no
    lease."""

    TYPE: ClassVar[str] = "stats"


@dataclass(frozen=True, kw_only=True)
class Welcome(Message):
    """Daemon capabilities and limits."""

    TYPE: ClassVar[str] = "welcome"
    server: Annotated[str, _Str(64)]  # daemon name and version
    instance: Annotated[str, _Str(64)]  # changes every time a daemon starts: a client can tell a restart
    versions: Annotated[list[int], _List(_Int(1, 65535), 16)]  # protocol versions spoken
    model: Annotated[str, _Str(MODEL_NAME_MAX)]  # architecture name
    scale: Annotated[int, _Int(1, SCALE_MAX)]  # output size = input size * scale
    device: Annotated[str, _Str(64)]  # e.g. "cpu", "cuda:0"
    precision: Annotated[str, _Str(16)]  # "fp32", "fp16", "bf16"
    random_weights: Annotated[bool, _Bool()]  # true: benchmarking model with random init, output is noise
    formats: Annotated[list[str], _List(_Str(16, 1), 16)]  # pixel formats accepted
    min_size: Annotated[int, _Int(1, DIM_MAX)]  # smallest width and height accepted
    max_width: Dim
    max_height: Dim
    max_pixels: Annotated[int, _Int(1, U64_MAX)]  # largest width * height accepted
    max_slots: Annotated[int, _Int(1, SLOTS_MAX)]
    max_sessions: Annotated[int, _Int(1, COUNT_MAX)]
    max_queue: Annotated[int, _Int(1, COUNT_MAX)]  # frames waiting for the engine before BUSY
    lease_ms: Annotated[int, _Int(1, U64_MAX)]  # a session with no message for this long is closed
    heartbeat_ms: Annotated[int, _Int(1, U64_MAX)]  # suggested ping period


@dataclass(frozen=True, kw_only=True)
class Opened(Message):
    TYPE: ClassVar[str] = "opened"
    session: SessionId
    width: Dim
    height: Dim
    out_width: Annotated[int, _Int(1, U64_MAX)]
    out_height: Annotated[int, _Int(1, U64_MAX)]
    format: FormatName
    slots: Annotated[int, _Int(1, SLOTS_MAX)]
    input: Annotated[Segment, _Map(Segment)]
    output: Annotated[Segment, _Map(Segment)]


@dataclass(frozen=True, kw_only=True)
class Done(Message):
    TYPE: ClassVar[str] = "done"
    session: SessionId
    slot: SlotIndex
    frame: U64
    timings: Annotated[Timings, _Map(Timings)]


@dataclass(frozen=True, kw_only=True)
class Result(Message):
    TYPE: ClassVar[str] = "result"
    frame: U64
    width: Annotated[int, _Int(1, U64_MAX)]  # output width
    height: Annotated[int, _Int(1, U64_MAX)]  # output height
    format: FormatName
    pixels: Annotated[Binary, _Bin(U64_MAX)]
    timings: Annotated[Timings, _Map(Timings)]


@dataclass(frozen=True, kw_only=True)
class Closed(Message):
    TYPE: ClassVar[str] = "closed"
    session: SessionId


@dataclass(frozen=True, kw_only=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    sessions: Annotated[list[int], _List(_Int(1, SESSION_MAX), PING_SESSIONS_MAX)]  # listed sessions still open
    instance: Annotated[str, _Str(64)]


@dataclass(frozen=True, kw_only=True)
class Statistics(Message):
    """Counts since the daemon started, and percentiles of its latest frames' times (0 while it has done none)."""

    TYPE: ClassVar[str] = "statistics"
    instance: Annotated[str, _Str(64)]  # as in welcome
    uptime_ms: U64  # since the daemon's start-up finished (its model loaded)
    sessions: Annotated[int, _Int(0, COUNT_MAX)]  # open now
    queued: Annotated[int, _Int(0, COUNT_MAX)]  # frames waiting for the engine now
    frames_done: U64  # done and result replies
    frames_failed: U64  # INFERENCE_ERROR, INTERNAL and SHM_ERROR replies (SHM_ERROR: an open's, too)
    frames_busy: U64  # frames refused because the queue was full: BUSY replies
    recent_frames: Annotated[int, _Int(0, RECENT_FRAMES_MAX)]  # the latest frames done, that the percentiles are of
    total_us_p50: U64  # request received -> reply sent (timings.total_us), median
    total_us_p99: U64
    infer_us_p50: U64  # model forward (timings.infer_us), median
    infer_us_p99: U64


@dataclass(frozen=True, kw_only=True)
class Error(Message):
    TYPE: ClassVar[str] = "error"
    code: Annotated[int, _Int(0, 65535)]
    name: Annotated[str, _Str(64)]  # ErrorCode name, e.g. "BUSY"
    message: Annotated[str, _Str(1024)]  # human-readable, says what to do


Request = Hello | Open | Submit | Process | Close | Ping | Stats
Reply = Welcome | Opened | Done | Result | Closed | Pong | Statistics | Error
REQUESTS: dict[str, type[Message]] = {c.TYPE: c for c in (Hello, Open, Submit, Process, Close, Ping, Stats)}
REPLIES: dict[str, type[Message]] = {c.TYPE: c for c in (Welcome, Opened, Done, Result, Closed, Pong, Statistics,
                                                         Error)}


# --- encode / decode -------------------------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """msgpack bytes of ``msg`` (validated first: a bad value raises ProtocolError instead of reaching the wire)."""
    body = {"v": VERSION, "type": msg.TYPE, **_fields_to_wire(msg)}
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes, side: Literal["request", "reply"] = "request", max_bin: int = CONTROL_MAX_BYTES) -> Any:
    """The message in ``data``: a Request (``side="request"``) or Reply. Raises ProtocolError with the right code."""
    raw = _unpack(data, max_bin)
    req = raw.get("req")
    req = req if isinstance(req, int) and not isinstance(req, bool) and 0 <= req <= U64_MAX else 0
    try:
        version = raw.get("v")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ProtocolError(f"key 'v' must be the protocol version integer {VERSION}", ErrorCode.INVALID_FIELD)
        if version != VERSION:
            raise ProtocolError(_version_mismatch(version, side), ErrorCode.VERSION_MISMATCH)
        cls = _message_class(raw.get("type"), side)
        fields = {k: v for k, v in raw.items() if k not in ("v", "type")}
        return cls(**_check_fields(cls, fields))
    except ProtocolError as exc:
        exc.req = req
        raise


def _version_mismatch(version: int, side: Literal["request", "reply"]) -> str:
    """Whose version is not whose: a daemon reads requests, a client replies (a newer daemon's reply said "this
    daemon speaks 1" to the client that spoke 1)."""
    if side == "request":
        return f"protocol version {version} is not supported; this daemon speaks {VERSION}"
    return (f"the daemon answered in protocol version {version}; this client speaks {VERSION}: use a client of the "
            "daemon's version")


def _unpack(data: bytes, max_bin: int) -> dict[Any, Any]:
    limits = {"max_bin_len": max_bin, "max_str_len": 4096, "max_array_len": 1024, "max_map_len": 64}
    containers = itertools.count(1)

    def counted(value: Any) -> Any:
        # a few dozen maps and arrays at most in any message: without a bound, megabytes of one-byte empty maps
        # would cost the daemon gigabytes and seconds (and deep nesting Python's recursion)
        if next(containers) > MAX_CONTAINERS:
            raise ProtocolError(f"message holds more than {MAX_CONTAINERS} maps and arrays")
        return value

    def map_of_str_keys(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
        for key, _ in pairs:  # strict_map_key still lets bin (bytes) keys through
            if not isinstance(key, str):
                raise ProtocolError(f"map keys must be msgpack str, got {type(key).__name__} {brief(key)}")
        as_dict = dict(pairs)
        if len(as_dict) != len(pairs):  # decoders differ on which copy wins (msgpack-python: the last); refuse both
            repeated = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
            raise ProtocolError(f"map repeats the key(s) {brief(repeated)}")
        return counted(as_dict)

    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, list_hook=counted,
                              object_pairs_hook=map_of_str_keys, **limits)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises half a dozen types for garbage; all mean the same to a client
        raise ProtocolError(f"message is not valid msgpack ({type(exc).__name__}: {exc})"[:300]) from exc
    if not isinstance(raw, dict):
        raise ProtocolError(f"message must be a msgpack map, got {type(raw).__name__}")
    return raw


def _message_class(kind: Any, side: str) -> type[Message]:
    table = REQUESTS if side == "request" else REPLIES
    if not isinstance(kind, str):
        raise ProtocolError("key 'type' must be a string naming the message type", ErrorCode.INVALID_FIELD)
    if kind not in table:
        raise ProtocolError(f"unknown {side} type {kind[:40]!r}; expected one of {sorted(table)}",
                            ErrorCode.UNKNOWN_TYPE)
    return table[kind]

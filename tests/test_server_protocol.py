"""The wire schema without sockets: round trips, validation of every field kind, error codes, and the doc."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys

import msgpack
import pytest

from upscaler_server import protocol as p
from upscaler_server.errors import (
    BusyError,
    ErrorCode,
    ProtocolError,
    SessionError,
    SessionLostError,
    SharedMemoryError,
    UpscalerError,
    error_for_code,
)

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "protocol.md"

SEG = p.Segment(name="/takdsr-0-1-00000001-in", size=8192, slot_stride=4096, slot_bytes=36, row_stride=12)
TIMINGS = p.Timings(queue_us=1, copy_in_us=2, infer_us=3, copy_out_us=4, total_us=10)
EXAMPLES: list[p.Message] = [
    p.Hello(req=1, client="engine"),
    p.Open(req=2, width=1280, height=720, format="BGRA8", slots=3),
    p.Submit(req=3, session=7, slot=2, frame=2**64 - 1),
    p.Process(req=4, width=2, height=1, format="RGB8", frame=0, pixels=b"\x00\x01\x02\x03\x04\x05"),
    p.Close(req=5, session=7),
    p.Ping(req=6, sessions=[7, 8]),
    p.Stats(req=8),
    p.Welcome(req=1, server="takdsr-upscaler/0.2.0", instance="ab", versions=[1], model="rlfn", scale=2,
              device="cpu", precision="fp32", random_weights=False, formats=["RGB8"], min_size=15, max_width=3840,
              max_height=2160, max_pixels=3840 * 2160, max_slots=8, max_sessions=64, max_queue=16, lease_ms=10000,
              heartbeat_ms=2500),
    p.Opened(req=2, session=7, width=4, height=3, out_width=8, out_height=6, format="RGB8", slots=2, input=SEG,
             output=dataclasses.replace(SEG, name="/x-out", slot_bytes=144, row_stride=24)),
    p.Done(req=3, session=7, slot=2, frame=9, timings=TIMINGS),
    p.Result(req=4, frame=0, width=4, height=2, format="RGB8", pixels=bytes(24), timings=TIMINGS),
    p.Closed(req=5, session=7),
    p.Pong(req=6, sessions=[7], instance="ab"),
    p.Statistics(req=8, instance="ab", uptime_ms=12345, sessions=2, queued=1, frames_done=2**40, frames_failed=3,
                 frames_busy=4, recent_frames=1024, total_us_p50=900, total_us_p99=4000, infer_us_p50=700,
                 infer_us_p99=3000),
    p.Error(req=7, code=20, name="BUSY", message="queue full"),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg: p.Message) -> None:
    side = "request" if msg.TYPE in p.REQUESTS else "reply"
    data = p.encode(msg)
    assert p.decode(data, side, max_bin=1 << 20) == msg
    raw = msgpack.unpackb(data, raw=False)
    assert raw["v"] == p.VERSION and raw["type"] == msg.TYPE and raw["req"] == msg.req


def test_every_type_has_an_example() -> None:
    assert {m.TYPE for m in EXAMPLES} == set(p.REQUESTS) | set(p.REPLIES)


def _raw(**overrides: object) -> bytes:
    body = {"v": 1, "type": "open", "req": 11, "width": 64, "height": 32, "format": "RGB8", "slots": 2}
    body.update(overrides)
    return msgpack.packb({k: v for k, v in body.items() if v is not _DROP}, use_bin_type=True)


_DROP = object()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", ErrorCode.MALFORMED),
        (b"\xc1", ErrorCode.MALFORMED),  # never-used msgpack byte
        (b"not msgpack at all", ErrorCode.MALFORMED),
        (msgpack.packb([1, 2, 3]), ErrorCode.MALFORMED),  # not a map
        (msgpack.packb({1: 2}), ErrorCode.MALFORMED),  # non-string key
        (_raw()[:-3], ErrorCode.MALFORMED),  # truncated
        (_raw(v=2), ErrorCode.VERSION_MISMATCH),
        (_raw(v="1"), ErrorCode.INVALID_FIELD),
        (_raw(v=_DROP), ErrorCode.INVALID_FIELD),
        (_raw(type="welcome"), ErrorCode.UNKNOWN_TYPE),  # a reply type is no request
        (_raw(type="launch"), ErrorCode.UNKNOWN_TYPE),
        (_raw(type=5), ErrorCode.INVALID_FIELD),
        (_raw(width="64"), ErrorCode.INVALID_FIELD),  # int field, string value
        (_raw(width=True), ErrorCode.INVALID_FIELD),  # bool is not an int
        (_raw(width=64.0), ErrorCode.INVALID_FIELD),  # float is not an int
        (_raw(width=0), ErrorCode.INVALID_FIELD),  # below range
        (_raw(width=70000), ErrorCode.INVALID_FIELD),  # above range
        (_raw(slots=65), ErrorCode.INVALID_FIELD),
        (_raw(req=-1), ErrorCode.INVALID_FIELD),
        (_raw(format=b"RGB8"), ErrorCode.INVALID_FIELD),  # bin where str is due
        (_raw(format=""), ErrorCode.INVALID_FIELD),  # too short
        (_raw(format="X" * 17), ErrorCode.INVALID_FIELD),  # too long
        (_raw(height=_DROP), ErrorCode.INVALID_FIELD),  # missing key
        (_raw(extra=1), ErrorCode.INVALID_FIELD),  # unknown key
    ],
)
def test_decode_rejects(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        p.decode(data)
    assert info.value.code == code


def test_a_version_mismatch_names_whose_version_is_whose() -> None:
    """From the upgrade review: a newer daemon's reply told the client "this daemon speaks 1", the client's own
    version, as if the daemon were the older one."""
    with pytest.raises(ProtocolError, match="protocol version 2 is not supported; this daemon speaks 1"):
        p.decode(_raw(v=2))
    reply = msgpack.packb({"v": 2, "type": "pong", "req": 3, "sessions": []})
    with pytest.raises(ProtocolError, match="the daemon answered in protocol version 2; this client speaks 1") as info:
        p.decode(reply, side="reply")
    assert info.value.code == ErrorCode.VERSION_MISMATCH


def _map_with_pairs(pairs: list[tuple[str, object]]) -> bytes:
    """A msgpack map written pair by pair, so a key can appear twice (packb of a dict cannot do that)."""
    assert len(pairs) < 16  # fixmap
    return bytes([0x80 | len(pairs)]) + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)


def test_decode_refuses_a_map_that_repeats_a_key() -> None:
    # msgpack-python keeps the last copy, other decoders the first: the daemon must not pick one for the client
    base = [("v", 1), ("type", "ping"), ("req", 8), ("sessions", [])]
    assert isinstance(p.decode(_map_with_pairs(base)), p.Ping)
    for repeated in (("req", 9), ("v", 2), ("sessions", [1])):
        with pytest.raises(ProtocolError, match=f"repeats the key.*{repeated[0]}") as info:
            p.decode(_map_with_pairs([*base, repeated]))
        assert info.value.code == ErrorCode.MALFORMED


def test_decode_rejects_other_field_kinds() -> None:
    def code_of(body: dict[str, object], side: str = "request") -> ErrorCode:
        with pytest.raises(ProtocolError) as info:
            p.decode(msgpack.packb({"v": 1, "req": 1, **body}, use_bin_type=True), side, max_bin=1 << 20)  # type: ignore[arg-type]
        return info.value.code

    process = {"type": "process", "width": 1, "height": 1, "format": "RGB8", "frame": 0}
    assert code_of({**process, "pixels": "abc"}) == ErrorCode.INVALID_FIELD  # str where bin is due
    assert code_of({"type": "ping", "sessions": 7}) == ErrorCode.INVALID_FIELD  # scalar where array is due
    assert code_of({"type": "ping", "sessions": [1, "2"]}) == ErrorCode.INVALID_FIELD  # bad array item
    assert code_of({"type": "ping", "sessions": list(range(1, 258))}) == ErrorCode.INVALID_FIELD  # one too many
    at_limit = p.decode(msgpack.packb({"v": 1, "req": 1, "type": "ping", "sessions": list(range(1, 257))}))
    assert isinstance(at_limit, p.Ping) and len(at_limit.sessions) == 256
    done = {"type": "done", "session": 1, "slot": 0, "frame": 0}
    assert code_of({**done, "timings": [1, 2]}, "reply") == ErrorCode.INVALID_FIELD  # array where map is due
    assert code_of({**done, "timings": {"queue_us": 1}}, "reply") == ErrorCode.INVALID_FIELD  # nested key missing
    welcome = msgpack.unpackb(p.encode(next(m for m in EXAMPLES if isinstance(m, p.Welcome))), raw=False)
    assert code_of({**welcome, "random_weights": 1}, "reply") == ErrorCode.INVALID_FIELD  # int where bool is due


def test_error_messages_describe_large_values_without_printing_them() -> None:
    """A message-sized bin inside an array, or as a map key, was printed whole (repr) before the message was cut:
    0.2 s and 250 MB of the daemon's only message thread per message."""
    big = bytes(1 << 20)
    with pytest.raises(ProtocolError, match=r"got \[<1048576 bytes>\]$") as caught:
        p.decode(msgpack.packb({"v": 1, "type": "open", "req": 5, "width": [big], "height": 1, "format": "RGB8",
                                "slots": 1}, use_bin_type=True), "request", max_bin=1 << 21)
    assert caught.value.code is ErrorCode.INVALID_FIELD
    with pytest.raises(ProtocolError, match=r"map keys must be msgpack str, got bytes <1048576 bytes>$"):
        p.decode(msgpack.packb({big: 1}, use_bin_type=True), "request", max_bin=1 << 21)
    assert p.brief({"a": [1, 2, 3, 4], "b": "x" * 100}) == "{'a': [1, 2, 3, ...], 'b': 'xxxxxxxxxxxxxxxxxxxx'...}"
    assert p.brief(msgpack.ExtType(5, big)) == "<ext type 5, 1048576 bytes>"
    with pytest.raises(ProtocolError, match=r"unknown key\(s\) \['aaaaaaaaaaaaaaaaaaaa'\.\.\., 'b'\]") as caught:
        p.decode(msgpack.packb({"v": 1, "type": "ping", "req": 1, "sessions": [], "a" * 4000: 1, "b": 2}), "request")
    assert len(str(caught.value)) < 120


def test_strings_at_their_length_limits_round_trip() -> None:
    """An empty client name is allowed (minimum 0); so are a 1-character and a 64-character one."""
    for client in ("", "c", "c" * 64):
        assert p.decode(p.encode(p.Hello(req=1, client=client))) == p.Hello(req=1, client=client)


def test_decode_keeps_request_id_for_error_replies() -> None:
    with pytest.raises(ProtocolError) as info:
        p.decode(_raw(width=-5, req=4242))
    assert info.value.req == 4242


def test_bin_limit() -> None:
    data = p.encode(p.Process(req=1, width=100, height=100, format="RGB8", frame=0, pixels=bytes(30000)))
    p.decode(data, max_bin=30000)
    with pytest.raises(ProtocolError):
        p.decode(data, max_bin=29999)


def test_encode_validates() -> None:
    with pytest.raises(ProtocolError):
        p.encode(p.Open(req=1, width=0, height=1, format="RGB8", slots=1))
    with pytest.raises(ProtocolError):
        p.encode(p.Submit(req=-1, session=1, slot=0, frame=0))


def test_error_classes_by_code() -> None:
    assert isinstance(error_for_code(20, "x"), BusyError)
    assert isinstance(error_for_code(10, "x"), SessionLostError)
    assert isinstance(error_for_code(12, "x"), SessionError)
    assert isinstance(error_for_code(30, "x"), SharedMemoryError)
    assert isinstance(error_for_code(4, "x"), ProtocolError)
    unknown = error_for_code(12345, "x")
    assert type(unknown) is UpscalerError and unknown.code == ErrorCode.INTERNAL
    for code in ErrorCode:
        assert error_for_code(int(code), "m").code == code


def test_doc_lists_every_code_type_and_key() -> None:
    doc = DOC.read_text()
    for code in ErrorCode:
        assert f"| {int(code)} | `{code.name}` |" in doc, f"docs/protocol.md misses error code {code.name}"
    for name, cls in {**p.REQUESTS, **p.REPLIES}.items():
        assert f"`{name}`" in doc, f"docs/protocol.md misses message type {name}"
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in doc, f"docs/protocol.md misses key {f.name} of {name}"
    for nested in (p.Segment, p.Timings):
        for f in dataclasses.fields(nested):
            assert f"`{f.name}`" in doc
    for fmt in p.PIXEL_FORMATS:
        assert f"`{fmt}`" in doc


@pytest.mark.parametrize("module", ["client", "client_session", "transport", "protocol", "shm", "errors",
                                    "config", "status"])
def test_client_side_never_imports_torch(module: str) -> None:
    code = f"import sys, upscaler_server.{module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=DOC.parents[1]).returncode == 0, \
        f"importing upscaler_server.{module} loaded torch"

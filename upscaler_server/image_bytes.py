"""Damage a decoder would not report cleanly, found in an image file's bytes before it is decoded.

libpng prints its refusal of a damaged PNG to stderr itself ("libpng error: IHDR: CRC error", "IDAT: CRC error",
"PNG input buffer is incomplete"), beside the caller's own error, and libjpeg decodes a truncated JPEG to grey rows
with only a warning. The offline CLI and training look here first, so such a file is refused in one clear line.
Standard library only: training imports it (docs/architecture.md); :func:`opencv_log_silenced` imports OpenCV
when it is called.
"""

import contextlib
import struct
import zlib
from collections.abc import Iterator

__all__ = ["damage", "opencv_log_silenced"]

_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"  # the start- and end-of-image markers
_PNG_START = b"\x89PNG\r\n\x1a\n"  # the signature; the IHDR chunk (length 13) must follow it
_PNG_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}  # colour type -> bit depths


def damage(data: bytes | memoryview) -> str | None:
    """What is wrong with a PNG's chunks or a JPEG's end ("a damaged PNG (its IDAT chunk fails its CRC)", "a
    truncated JPEG (no end-of-image marker)"), for ``data``, a whole file's bytes; None for anything else."""
    view = memoryview(data).cast("B")
    if bytes(view[:2]) == _JPEG_START and not _jpeg_complete(view):
        return "a truncated JPEG (no end-of-image marker)"
    if bytes(view[:8]) == _PNG_START and (problem := _png_problem(view)):
        return f"a damaged PNG ({problem})"
    return None


def _png_problem(data: memoryview) -> str | None:
    """What is wrong with a PNG file's chunks (``data``: the whole file, signature included); None when nothing is.
    Checked: the first chunk is a valid IHDR, every critical chunk (IHDR, PLTE, IDAT) is whole and passes its CRC,
    and the file reaches its IEND. Left to libpng: an ancillary chunk or the IEND failing its CRC (it warns; the
    pixels are fine) and compressed data that is wrong under a valid CRC (only a program that wrote it so makes
    that)."""
    offset = len(_PNG_START)
    while offset + 12 <= len(data):  # length (4), type (4), data (length), CRC (4)
        length = int.from_bytes(data[offset : offset + 4], "big")
        kind = bytes(data[offset + 4 : offset + 8])
        end = offset + 12 + length
        if offset == len(_PNG_START) and (problem := _ihdr_problem(kind, bytes(data[offset : offset + 25]))):
            return problem
        if end > len(data):
            return f"cut short in its {kind.decode('latin-1')} chunk"
        critical = not kind[0] & 0x20 and kind != b"IEND"  # upper-case first letter; IEND holds no data to damage
        if critical and zlib.crc32(data[offset + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return f"its {kind.decode('latin-1')} chunk fails its CRC"
        if kind == b"IEND":
            return None
        offset = end
    if offset == len(_PNG_START):
        return "no IHDR header: truncated, or not written as a PNG"
    return "cut short: no IEND chunk"


def _ihdr_problem(kind: bytes, chunk: bytes) -> str | None:
    """What is wrong with a PNG's first chunk (``chunk``: its 25 bytes), which must be a valid IHDR; None if not."""
    if kind != b"IHDR" or len(chunk) < 25 or chunk[:4] != b"\x00\x00\x00\x0d":
        return "no IHDR header: truncated, or not written as a PNG"
    if zlib.crc32(chunk[4:21]) != int.from_bytes(chunk[21:25], "big"):
        return "its IHDR header fails its CRC"
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunk[8:21])
    sizes_valid = 0 < width < 2**31 and 0 < height < 2**31
    if not sizes_valid or depth not in _PNG_DEPTHS.get(colour, ()) or compression or filtering or interlace > 1:
        return "invalid IHDR header values"
    return None


def _jpeg_complete(data: memoryview) -> bool:
    """Whether a JPEG file's bytes end with its end-of-image marker (trailing zero padding allowed)."""
    return bytes(data[-4096:]).rstrip(b"\x00").endswith(_JPEG_END)


@contextlib.contextmanager
def opencv_log_silenced() -> Iterator[None]:
    """OpenCV's own log lines off while it decodes one file ("[ERROR] ... Unexpected end of input stream" for a cut
    BMP, TIFF_Error lines for a cut TIFF, "[ WARN] ... PNG input buffer is incomplete"): a file it cannot decode is
    named by the caller's own error, and these lines came beside it. Decodes are never threaded in the callers, so
    the global level is restored safely."""
    import cv2  # here, not above: importing this module stays standard library only

    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)

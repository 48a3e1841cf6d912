"""OpenCV's decode limit for the offline CLI and for training: import this module before cv2 loads.

A header may declare far more pixels than its file holds (a 420 KB PNG of 12000x12000 decodes to 432 MB). OpenCV reads
``OPENCV_IO_MAX_IMAGE_PIXELS`` once, when it loads, and then refuses such a file from its header, before decoding it.
Only the offline CLI and training decode files a user hands them, so only they import this module: the client library
leaves OpenCV's limit alone in the applications that import it. A value the user set wins, in OpenCV's own form (a
whole number, or one followed by KB or MB), written back as plain digits: OpenCV aborts the process as it loads (exit
134) on blanks around the number and on numbers past 2^64 - 1, which are forgiven here. Any other value would abort it
too, so the default is used, with a warning. Standard library only: training imports it (docs/architecture.md).
"""

import os
import re
import sys

__all__ = ["DEFAULT_DECODE_LIMIT", "decode_limit"]

DEFAULT_DECODE_LIMIT = 1 << 26  # 8K x 8K pixels
_UNITS = {"": 1, "KB": 1 << 10, "MB": 1 << 20}  # OpenCV's suffixes (KB, Kb, kb, MB, Mb, mb)
_LARGEST = (1 << 63) - 1  # far past any image; std::stoull throws past 2^64 - 1


def _pixels(given: str) -> int | None:
    """The limit ``given`` sets, as OpenCV reads it (blanks forgiven, clamped below 2^63), or None where OpenCV would
    abort."""
    found = re.fullmatch(r"\s*(\d+)\s*(KB|Kb|kb|MB|Mb|mb)?\s*", given)
    if found is None:
        return None
    digits = found[1].lstrip("0") or "0"
    if len(digits) > len(str(_LARGEST)):  # int() refuses past 4,300 digits, and anything this long is past _LARGEST
        return _LARGEST
    return min(int(digits) * _UNITS[(found[2] or "").upper()], _LARGEST)


_given = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")
_limit = DEFAULT_DECODE_LIMIT if _given is None else _pixels(_given)
if _limit is None:
    print(f"warning: OPENCV_IO_MAX_IMAGE_PIXELS={_given!r} is not a number of pixels (digits, optionally followed by "
          f"KB or MB); using {DEFAULT_DECODE_LIMIT}", file=sys.stderr)
    _limit = DEFAULT_DECODE_LIMIT
os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(_limit)


def decode_limit() -> int:
    """The most pixels OpenCV decodes in this process: the limit this module set before cv2 loaded."""
    return _limit

"""OpenCV's decode limit for the offline CLI: import this module before cv2 loads.

A header may declare far more pixels than its file holds (a 420 KB PNG of 12000x12000 decodes to 432 MB). OpenCV reads
``OPENCV_IO_MAX_IMAGE_PIXELS`` once, when it loads, and then refuses such a file from its header, before decoding it.
Only the offline CLI decodes files a user hands it, so only it imports this module: the client library leaves
OpenCV's limit alone in the applications that import it. A value the user set wins, unless it is no whole number:
OpenCV then aborts the process as it loads (std::invalid_argument from stoull, exit 134), so the default is used,
with a warning.
"""

import os
import re
import sys

DEFAULT_DECODE_LIMIT = 1 << 26  # 8K x 8K pixels, as in training
_given = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")
if _given is not None and not re.fullmatch(r"\s*\d+\s*", _given):
    print(f"warning: OPENCV_IO_MAX_IMAGE_PIXELS={_given!r} is not a whole number of pixels; using "
          f"{DEFAULT_DECODE_LIMIT}", file=sys.stderr)
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(DEFAULT_DECODE_LIMIT)
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_DECODE_LIMIT))

__all__ = ["DEFAULT_DECODE_LIMIT", "decode_limit"]


def decode_limit() -> int:
    """The most pixels OpenCV decodes in this process (the variable as it was when cv2 loaded, after this module)."""
    try:
        return int(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"])
    except (KeyError, ValueError):  # unset since, or not a number: OpenCV then keeps its own default
        return DEFAULT_DECODE_LIMIT

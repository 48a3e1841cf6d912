"""Real-time upscaling daemon, its client library and tools.

Importing the package (or :mod:`upscaler_server.client`) loads no torch: the client side is numpy, pyzmq and msgpack
only. The daemon (``python -m upscaler_server``) loads the engine, which imports torch and ``models``.
"""

import os

__version__ = "0.1.0"

# A header may declare far more pixels than its file holds (a 420 KB PNG of 12000x12000 decodes to 432 MB); OpenCV
# reads this limit once, when it loads, and refuses such a file from its header. Set before any module of the
# package imports cv2 (the offline CLI decodes user files); a value the user set wins. 8K x 8K, as in training.
IMAGE_DECODE_MAX_PIXELS = 1 << 26
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(IMAGE_DECODE_MAX_PIXELS))

__all__ = ["__version__"]

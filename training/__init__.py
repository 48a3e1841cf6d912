"""Training of the TAKDSR teacher, assistant and student models."""

import os

# 8K x 8K: a larger image is no rendered frame but a decompression bomb (a 48 KB PNG can declare 20000x20000), which
# would cost GBs per decode and per DataLoader worker's frame cache (training.data.images refuses it).
MAX_IMAGE_PIXELS = 1 << 26

# OpenCV reads this once, when it is loaded: set before any module of this package imports cv2, it makes OpenCV
# refuse such a bomb from its header instead of decoding it first; a value the user set wins.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))

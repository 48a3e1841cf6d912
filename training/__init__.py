"""Training of the TAKDSR teacher, assistant and student models."""

import os

# OpenCV reads this once, when it is loaded: set before any module of this package imports cv2, it makes OpenCV
# refuse a decompression bomb from its header instead of decoding it (GBs) for images.py to refuse afterwards.
# Equal to training.data.images.MAX_PIXELS (a test keeps them equal); a value the user set wins.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 26))

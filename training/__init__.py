"""Training of the TAKDSR teacher, assistant and student models."""

# OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when it is loaded: set before any module of this package imports cv2, it
# makes OpenCV refuse a decompression bomb from its header instead of decoding it first. A value the user set wins,
# unless OpenCV would abort on it (then the default, with a warning). Standard library only (docs/architecture.md).
from upscaler_server.decode_limit import DEFAULT_DECODE_LIMIT

# 8K x 8K: a larger image is no rendered frame but a decompression bomb (a 48 KB PNG can declare 20000x20000), which
# would cost GBs per decode and per DataLoader worker's frame cache (training.data.images refuses it).
MAX_IMAGE_PIXELS = DEFAULT_DECODE_LIMIT

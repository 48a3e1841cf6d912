"""What every backend shares: its settings, the accuracy tolerance, the cache folder, availability checks."""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import shutil
import stat
from dataclasses import dataclass

import torch

from upscaler_server.config import BACKEND_CHOICES

__all__ = ["BACKENDS", "CACHE_ENV", "TOLERANCE", "Settings", "Tolerance", "cache_dir", "cpu_bf16", "read_private",
           "replace_private", "unavailable"]

log = logging.getLogger("upscaler_server.backends")

BACKENDS = BACKEND_CHOICES
CACHE_ENV = "TAKDSR_CACHE_DIR"  # overrides $XDG_CACHE_HOME/takdsr (~/.cache/takdsr)


@dataclass(frozen=True)
class Settings:
    """What every backend is built from, besides the network."""

    name: str  # model description for logs and the welcome message
    device: str  # "cpu" or "cuda:N", already resolved
    precision: str  # auto, fp32, fp16 or bf16, as asked
    weights: str | None  # checkpoint path, None for random weights
    threads: int  # CPU intra-op threads; 0: the usable cores
    cuda_graphs: bool  # eager/compile on CUDA: one graph per resolution
    cache_dir: pathlib.Path  # auto's measurements, exported ONNX files, TensorRT engines
    # SHA-256 of the checkpoint (or of random weights) with --pad-channels and --edge-pad: keys every cached file
    model_hash: str
    overlap: bool = False  # eager/compile on CUDA: two frames in flight on separate copy and compute streams


@dataclass(frozen=True)
class Tolerance:
    """How far a backend's uint8 output may be from fp32 eager's on the same frame."""

    max_levels: int  # largest absolute difference of one 8-bit value
    min_psnr: float  # dB, over all values (identical outputs: infinite)


TOLERANCE = Tolerance(max_levels=2, min_psnr=50.0)


def cache_dir(override: pathlib.Path | None = None) -> pathlib.Path:
    """``override``, else $TAKDSR_CACHE_DIR, else $XDG_CACHE_HOME/takdsr, else ~/.cache/takdsr (not created)."""
    if override is not None:
        return pathlib.Path(override)
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "takdsr"


def cpu_bf16() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX) that oneDNN uses."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch
        return False


def unavailable(backend: str, device: str, precision: str) -> str | None:
    """Why ``backend`` cannot run at ``precision`` on ``device`` here, or None when it can."""
    cuda = device.startswith("cuda")
    # the single-precision backends first: "runs fp32 only" holds on any machine, the CPU's bf16 flag aside
    if backend == "onnxruntime":
        return _onnxruntime_missing(cuda, precision)
    if backend == "tensorrt":
        if not cuda:
            return "TensorRT needs CUDA"
        if precision not in ("fp16", "auto"):
            return "the tensorrt backend builds fp16 engines only"
        if importlib.util.find_spec("tensorrt") is None:
            return "the tensorrt package is not installed (pip install tensorrt)"
        return None
    if precision == "bf16" and not cuda and not cpu_bf16():
        return "this CPU has no bf16 instructions (avx512_bf16 / amx_bf16)"
    if precision == "fp16" and not cuda:
        return "fp16 needs CUDA"
    if backend == "compile" and not cuda and not (shutil.which("gcc") or shutil.which("cc")):
        return "torch.compile on CPU needs a C++ compiler (gcc)"
    if backend == "compile" and cuda and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton"
    return None


def _onnxruntime_missing(cuda: bool, precision: str) -> str | None:
    if precision not in ("fp32", "auto"):
        return "the onnxruntime backend runs fp32 only"
    if any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnx", "onnxscript")):
        return "needs onnxruntime, onnx and onnxscript (pip install 'takdsr-upscaler[export]' onnxruntime)"
    import onnxruntime

    if cuda and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "this onnxruntime build has no CUDA provider (pip install onnxruntime-gpu)"
    return None


def read_private(path: pathlib.Path) -> tuple[bytes | None, str]:
    """The bytes of the cached file ``path`` and "" when it is a regular file that this user owns and no other user
    may write; else None and why not ("" when there is no file). A cache folder shared between users let another
    one put a file under the name this process looks for (an export of another network, served without a word). The
    checks are made on the open file, so they hold for the bytes read."""
    try:  # no link followed (it would lead wherever its maker chose); nonblocking: a FIFO there must not hang us
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"it cannot be opened ({exc.strerror or exc}; a symbolic link is never followed)"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, "it is not a regular file"
        if info.st_uid != os.geteuid():
            return None, (f"it belongs to another user (uid {info.st_uid}, this process runs as {os.geteuid()}); "
                          "a cache folder should be private to one user")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None, f"other users may write it (mode {stat.S_IMODE(info.st_mode):o})"
        with open(fd, "rb", closefd=False) as file:
            return file.read(), ""
    except OSError as exc:
        return None, f"it cannot be read ({exc.strerror or exc})"
    finally:
        os.close(fd)


def replace_private(tmp: pathlib.Path, path: pathlib.Path) -> None:
    """Move the finished ``tmp`` onto ``path`` (atomic: a concurrent daemon never reads half a file), readable and
    writable by this user alone; a warning when it cannot (the caller holds the bytes and uses them this run)."""
    try:
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as exc:  # e.g. another user's file in a sticky folder: it cannot be replaced
        log.warning("cannot store %s in the cache (%s); it is used for this run only, so the next start makes it "
                    "again", path, exc.strerror or exc)

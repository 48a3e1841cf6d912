"""What every backend shares: its settings, the accuracy tolerance, the cache folder, availability checks."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
from dataclasses import dataclass

import torch

from upscaler_server.config import BACKEND_CHOICES

__all__ = ["BACKENDS", "CACHE_ENV", "TOLERANCE", "Settings", "Tolerance", "cache_dir", "cpu_bf16", "unavailable"]

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
    if precision == "bf16" and not cuda and not cpu_bf16():
        return "this CPU has no bf16 instructions (avx512_bf16 / amx_bf16)"
    if precision == "fp16" and not cuda:
        return "fp16 needs CUDA"
    if backend == "compile" and not cuda and not (shutil.which("gcc") or shutil.which("cc")):
        return "torch.compile on CPU needs a C++ compiler (gcc)"
    if backend == "compile" and cuda and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton"
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


def _onnxruntime_missing(cuda: bool, precision: str) -> str | None:
    if precision not in ("fp32", "auto"):
        return "the onnxruntime backend runs fp32 only"
    if any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnx", "onnxscript")):
        return "needs onnxruntime, onnx and onnxscript (pip install 'takdsr-upscaler[export]' onnxruntime)"
    import onnxruntime

    if cuda and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "this onnxruntime build has no CUDA provider (pip install onnxruntime-gpu)"
    return None

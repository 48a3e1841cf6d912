"""The host's resources the engines share: CPU cores, the device and precision names, and process memory.

Apart from the engines because every backend (and the benchmark) resolves the same names the same way, and because
the memory bounds are process-wide: torch's and oneDNN's kernel caches and glibc's heap belong to the process, not
to one engine.
"""

from __future__ import annotations

import ctypes
import os
import time

import torch

from upscaler_server.errors import ConfigError

__all__ = ["bound_cpu_kernel_caches", "resolve_device", "resolve_precision", "return_freed_memory", "trim_heap",
           "usable_cores"]

_TRIM_EVERY_S = 10.0  # at most this often, freed heap memory goes back to the system when a frame size is released
# CPU convolution kernels kept per cache: torch's (ideep's LRU of oneDNN primitives) and oneDNN's own. The 1-block
# student builds 8-9 per new frame size at game sizes (2-3 below ~64 px), so ~30 such sizes stay cached.
# With both libraries' default, 1,024, a process that had seen 776 frame sizes kept 81 MB more than one seeing four;
# with 256, 22 MB (scripts/memory_per_size.py, docs/performance.md). A size's kernels rebuilt cost a few ms once.
_ONEDNN_KERNELS = 256


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which a container or taskset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str) -> str:
    """"auto", "cpu", "cuda" or "cuda:N" -> "cpu" or "cuda:N" (also when given an already resolved name)."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index or "0").isdigit():
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but torch sees no CUDA device; use --device cpu or auto")
    if int(index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: torch sees only {torch.cuda.device_count()} CUDA device(s)")
    return f"cuda:{int(index or 0)}"


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if precision == "fp16" and device == "cpu":
        raise ConfigError("fp16 needs CUDA; use --precision fp32 or bf16 on CPU")
    if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use --precision fp16")
    return precision


_last_trim = -_TRIM_EVERY_S


def bound_cpu_kernel_caches() -> None:
    """Cap both per-shape kernel caches at _ONEDNN_KERNELS, where the user has not set them (LRU_CACHE_CAPACITY:
    torch's, ONEDNN_PRIMITIVE_CACHE_CAPACITY: oneDNN's). Each library reads its variable when it builds its first
    kernel, so this works only before the process's first CPU convolution (the daemon, the offline CLI and the
    benchmarks create their engine first); later it changes nothing."""
    for variable in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(variable, str(_ONEDNN_KERNELS))


def return_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim; a no-op elsewhere). Each new frame size
    leaves torch's CPU convolutions' scratch memory freed but kept by the allocator: a client resizing all the time
    (dynamic resolution) grew the daemon by ~0.2 MB per size, 487 MB after 1,500 sizes where 360 MB was in use.
    About 5 ms on such a heap, so at most every _TRIM_EVERY_S."""
    global _last_trim
    now = time.monotonic()
    if now - _last_trim < _TRIM_EVERY_S:
        return
    _last_trim = now
    trim_heap()


def trim_heap() -> bool:
    """Hand all of the heap's freed pages back to the system now (glibc's malloc_trim); False where there is no
    such call (another C library), which changes nothing."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
    return trim is not None

"""Inference time of a model on one input size: median and p90 of repeated forward passes."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from models import Teacher

__all__ = ["measure_latency", "usable_cores"]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for the block, then put back: training sets them process-wide, so
    a timing taken after a stage would otherwise run on whatever that stage left."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def measure_latency(
    model: nn.Module, lr_width: int, lr_height: int, device: torch.device, *, repeats: int = 5, warmup: int = 1,
    threads: int = 0,
) -> dict[str, Any]:
    """Milliseconds per forward pass for an LR frame of lr_width x lr_height: a decoder reads that frame,
    a teacher the matching HR image (recorded as "input"). Channels-last fp32; CUDA timings synchronised. On the
    CPU with ``threads`` torch threads (0: every usable core), recorded as "threads"."""
    count = threads or usable_cores()
    with _torch_threads(count):
        timing = _timed(model, lr_width, lr_height, device, repeats, warmup)
    return {**timing, "device": str(device), "threads": count if device.type == "cpu" else None}


def _timed(model: nn.Module, lr_width: int, lr_height: int, device: torch.device, repeats: int,
           warmup: int) -> dict[str, Any]:
    factor = model.scale if isinstance(model, Teacher) else 1
    width, height = lr_width * factor, lr_height * factor
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, height, width, device=device).contiguous(memory_format=torch.channels_last)
    times = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    # inclusive: interpolate between the measured times, never extrapolate past the slowest (few repeats)
    quantiles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {
        "median_ms": statistics.median(times),
        "p90_ms": quantiles[-1],
        "repeats": repeats,
        "input": f"{width}x{height}",
    }

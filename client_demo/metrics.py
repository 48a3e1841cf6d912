"""The demo's own measurements: PSNR of 8-bit frames, latency percentiles and a one-second rolling window."""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable

import numpy as np

__all__ = ["PSNR_CAP_DB", "RollingWindow", "percentiles", "psnr"]

PSNR_CAP_DB = 100.0  # reported for identical frames, where PSNR is infinite (JSON has no infinity)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images of the same shape (peak 255), capped at PSNR_CAP_DB."""
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs images of one shape, got {a.shape} and {b.shape}")
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(diff * diff))
    return PSNR_CAP_DB if mse == 0.0 else min(PSNR_CAP_DB, 10.0 * math.log10(255.0**2 / mse))


def percentiles(values: Iterable[float], qs: Iterable[int] = (50, 90, 99)) -> dict[str, float | None]:
    """{"p50": ..., "p90": ..., "p99": ...} of ``values`` (None for each when there are none)."""
    data = np.asarray(list(values), np.float64)
    return {f"p{q}": (float(np.percentile(data, q)) if data.size else None) for q in qs}


class RollingWindow:
    """Values with their time stamps, keeping those of the last ``seconds`` (the HUD's "over the last second")."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds
        self._items: collections.deque[tuple[float, float]] = collections.deque()

    def add(self, now: float, value: float) -> None:
        self._items.append((now, value))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._items and self._items[0][0] < now - self.seconds:
            self._items.popleft()

    def count(self, now: float) -> int:
        self._trim(now)
        return len(self._items)

    def median(self, now: float) -> float | None:
        """Median of the values of the last ``seconds``, None when there are none."""
        self._trim(now)
        return float(np.median([v for _, v in self._items])) if self._items else None

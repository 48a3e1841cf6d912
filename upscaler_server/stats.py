"""What the daemon has done since it started, for the ``stats`` request: counts of frames done, failed and refused,
and the times of its latest frames.

The activity log (:mod:`upscaler_server.activity`) says the same per minute for a reader of the journal; these are
for a program that watches the daemon (a game's overlay, a monitoring agent), asked when it wants them.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Sequence

from upscaler_server.errors import DAEMON_FAILURES, ErrorCode
from upscaler_server.protocol import RECENT_FRAMES_MAX, Done, Error, Message, Result, Statistics

__all__ = ["DaemonStats"]


class DaemonStats:
    """Counts every reply the daemon sends; keeps ``timings.total_us`` and ``timings.infer_us`` of the latest
    ``RECENT_FRAMES_MAX`` frames done."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._done = self._failed = self._busy = 0
        # (total_us, infer_us) of the latest frames done, oldest first
        self._recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=RECENT_FRAMES_MAX)

    def replied(self, reply: Message) -> None:
        if isinstance(reply, (Done, Result)):
            self._done += 1
            self._recent.append((reply.timings.total_us, reply.timings.infer_us))
        elif isinstance(reply, Error) and reply.code in DAEMON_FAILURES:
            self._failed += 1
        elif isinstance(reply, Error) and reply.code == ErrorCode.BUSY:
            self._busy += 1

    def statistics(self, req: int, instance: str, sessions: int, queued: int) -> Statistics:
        """The reply to a ``stats`` request; ``sessions`` open and frames ``queued`` are the server's, now."""
        total_us = sorted(total for total, _ in self._recent)
        infer_us = sorted(infer for _, infer in self._recent)
        return Statistics(req=req, instance=instance, uptime_ms=int((self._clock() - self._started) * 1000),
                          sessions=sessions, queued=queued, frames_done=self._done, frames_failed=self._failed,
                          frames_busy=self._busy, recent_frames=len(self._recent),
                          total_us_p50=_percentile(total_us, 50), total_us_p99=_percentile(total_us, 99),
                          infer_us_p50=_percentile(infer_us, 50), infer_us_p99=_percentile(infer_us, 99))


def _percentile(ascending: Sequence[int], percent: int) -> int:
    """Nearest-rank percentile: the smallest value with at least ``percent`` % of the values at or below it; 0 for
    none. A value that occurred, never an interpolation between two frames."""
    if not ascending:
        return 0
    return ascending[math.ceil(len(ascending) * percent / 100) - 1]

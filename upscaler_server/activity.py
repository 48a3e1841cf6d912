"""What the daemon did, for its log: counted, and written as one line a minute instead of one line per event.

A line per session opened and closed let one client flood the log: a loop of open and close wrote about 2,400 lines
a second, and a game whose resolution kept changing two lines a frame (the Python client's ``upscale()`` opens a
session per new size). That spends journald's default allowance (10,000 messages in 30 s) in seconds, after which it
drops the unit's errors too. Frames that failed and clients that were refused, on the other hand, were not logged.

Now every reply and every session counts, and :meth:`Activity.report_if_due` writes one INFO line a minute when
anything happened (``activity in the last 60 s: 12 session(s) opened, ...``). A frame the daemon itself failed
(``INFERENCE_ERROR``, ``INTERNAL``, or ``SHM_ERROR``: /dev/shm full, or a client's truncated segment) is also a
WARNING with its message, the first of each code in a minute, so an operator sees failures at
``--log-level WARNING`` too; the rest are counted.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

from upscaler_server.errors import DAEMON_FAILURES
from upscaler_server.protocol import Done, Error, Message, Result

__all__ = ["REPORT_EVERY_S", "Activity"]

log = logging.getLogger("upscaler_server")

REPORT_EVERY_S = 60.0


class Activity:
    """Counts of one reporting period: sessions opened and ended, frames done, and error replies by code name."""

    def __init__(self, every_s: float = REPORT_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._every_s, self._clock = every_s, clock
        self._since = clock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._errors: collections.Counter[str] = collections.Counter()

    def session_opened(self) -> None:
        self._counts["session(s) opened"] += 1

    def session_ended(self) -> None:
        self._counts["session(s) ended"] += 1

    def replied(self, reply: Message) -> None:
        """Count a reply the daemon sends; the first failure of the daemon's own per code and period is a warning
        ("a request": an open's SHM_ERROR was called a frame's)."""
        if isinstance(reply, (Done, Result)):
            self._counts["frame(s) done"] += 1
        elif isinstance(reply, Error):
            if reply.code in DAEMON_FAILURES and not self._errors[reply.name]:
                log.warning("a request failed (%s): %s (further ones in this minute are only counted)", reply.name,
                            reply.message)
            self._errors[reply.name] += 1

    def report_if_due(self) -> None:
        if self._clock() - self._since >= self._every_s:
            self.report()

    def report(self) -> None:
        """Write the period's line, if anything happened, and start a new period."""
        now = self._clock()
        if self._counts or self._errors:
            parts = [f"{count} {what}" for what, count in self._counts.items()]
            if self._errors:
                parts.append("error replies: " + ", ".join(f"{name} {n}" for name, n in self._errors.most_common()))
            log.info("activity in the last %.0f s: %s", now - self._since, "; ".join(parts))
        self._since = now
        self._counts.clear()
        self._errors.clear()

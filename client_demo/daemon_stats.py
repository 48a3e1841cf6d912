"""The daemon's own account at the end of a demo run: its ``statistics`` reply (docs/protocol.md, ``stats``).

Its counts are the daemon's since it started, every client's frames included: a daemon the demo started
(--spawn-server) served this run alone, an external one may have served others too. They add what the demo cannot
see from its replies: frames the daemon refused as BUSY (the demo sends them again) or failed, and its own times.
"""

from __future__ import annotations

from client_demo.link import UpscaleLink
from upscaler_server.client import UpscalerClient
from upscaler_server.errors import UpscalerError
from upscaler_server.protocol import Statistics
from upscaler_server.status import latest_times, statistics_or_none

__all__ = ["STATS_TIMEOUT", "daemon_statistics", "describe_statistics", "served_statistics"]

STATS_TIMEOUT = 2.0  # s for the hello and the stats reply of a local daemon that served the run a moment ago


def daemon_statistics(endpoint: str, instance: str) -> Statistics | None:
    """The statistics of the daemon at ``endpoint``; None when none answers within STATS_TIMEOUT, when it is not the
    daemon ``instance`` that served the run (restarted since: its counts would be of another run), or when it is older
    than the ``stats`` request."""
    try:
        with UpscalerClient(endpoint, timeout=STATS_TIMEOUT, retries=0, name="takdsr-demo", heartbeat=False) as client:
            stats = statistics_or_none(client)
    except UpscalerError:
        return None
    return stats if stats is not None and stats.instance == instance else None


def served_statistics(link: UpscaleLink) -> Statistics | None:
    """The statistics of the daemon ``link`` is connected to; None when it is not (the daemon is gone, or never
    answered: no wait for it), and as :func:`daemon_statistics` says."""
    if not link.ready or link.endpoint is None or link.info is None:
        return None
    return daemon_statistics(link.endpoint, link.info.instance)


def describe_statistics(stats: Statistics) -> str:
    """One line for the end of a run: the daemon's counts and, when it has done frames, their times."""
    line = (f"the daemon since it started: {stats.frames_done} frame(s) done, {stats.frames_failed} "
            f"failed, {stats.frames_busy} refused BUSY (sent again)")
    return f"{line}; {latest_times(stats)}" if stats.recent_frames else line

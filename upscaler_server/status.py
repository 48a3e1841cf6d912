"""``python -m upscaler_server.status`` (console script ``takdsr-status``): whether a daemon answers at an endpoint,
what it serves, and what it has done since it started (its ``welcome`` and ``statistics`` replies).

Exit status 0 when the daemon answered, 1 when none did (or it broke the protocol), 2 for bad arguments (an
endpoint that is none included), 130 after Ctrl-C: a health check for a script or a supervisor. It opens no
session, and needs neither torch nor a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from upscaler_server.client import UpscalerClient
from upscaler_server.config import cli_prog
from upscaler_server.console import add_version_option, escape_unprintable_names, ignore_the_working_folder
from upscaler_server.errors import ConfigError, ErrorCode, ProtocolError, UpscalerError
from upscaler_server.protocol import Statistics, Welcome

__all__ = ["describe", "main", "reply_fields", "statistics_or_none"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=cli_prog("upscaler_server.status", "takdsr-status"),
                                description="Ask the upscaler daemon what it serves and what it has done.")
    add_version_option(p)
    p.add_argument("--endpoint", default=None,
                   help="the daemon's endpoint (default: $TAKDSR_UPSCALER_ENDPOINT, else the per-user ipc socket)")
    p.add_argument("--timeout", type=_seconds, default=2.0, help="seconds to wait for the daemon (default: 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines for a reader")
    return p


def _seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a number of seconds > 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    escape_unprintable_names()
    ignore_the_working_folder()
    args = _parser().parse_args(argv)
    try:
        with UpscalerClient(args.endpoint, timeout=args.timeout, retries=0, name="takdsr-status",
                            heartbeat=False) as client:
            endpoint, info, stats = client.endpoint, client.info, statistics_or_none(client)
    except ConfigError as exc:  # an endpoint that is none
        print(f"takdsr-status: {exc}", file=sys.stderr)
        return 2
    except UpscalerError as exc:  # no daemon (ServerUnavailableError), or one that broke the protocol
        print(f"takdsr-status: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("takdsr-status: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"endpoint": endpoint, "welcome": reply_fields(info),
                          "statistics": None if stats is None else reply_fields(stats)}, indent=2))
    else:
        print(describe(endpoint, info, stats))
    return 0


def statistics_or_none(client: UpscalerClient) -> Statistics | None:
    """The daemon's statistics; None from a daemon older than the ``stats`` request."""
    try:
        return client.stats()
    except ProtocolError as exc:
        if exc.code != ErrorCode.UNKNOWN_TYPE:
            raise
        return None


def reply_fields(reply: Welcome | Statistics) -> dict[str, Any]:
    """A reply's fields for JSON, without the request number it answered."""
    return {key: value for key, value in dataclasses.asdict(reply).items() if key != "req"}


def describe(endpoint: str, info: Welcome, stats: Statistics | None) -> str:
    """Lines for a reader: the daemon, its model, and (when it offers them) its counts and latest frames' times."""
    lines = [f"daemon at {endpoint}: {info.server}, instance {info.instance}",
             f"model {info.model}, x{info.scale} on {info.device} ({info.precision})"
             + (" [RANDOM WEIGHTS: its output is noise]" if info.random_weights else "")]
    if stats is None:
        lines.append("statistics: this daemon does not offer them (older than the stats request)")
        return "\n".join(lines)
    lines += [f"up {_duration(stats.uptime_ms / 1000)}; {stats.sessions} session(s) open (at most {info.max_sessions}),"
              f" {stats.queued} frame(s) queued (BUSY at {info.max_queue})",
              f"frames: {stats.frames_done} done, {stats.frames_failed} failed, {stats.frames_busy} refused BUSY"]
    if stats.recent_frames:
        lines.append(f"latest {stats.recent_frames} frame(s): total p50 {stats.total_us_p50 / 1000:.2f} ms, "
                     f"p99 {stats.total_us_p99 / 1000:.2f} ms; model p50 {stats.infer_us_p50 / 1000:.2f} ms, "
                     f"p99 {stats.infer_us_p99 / 1000:.2f} ms")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    """``12 s``, ``4 min 05 s``, ``3 h 02 min``, ``2 d 07 h``."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours:02d} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


if __name__ == "__main__":
    sys.exit(main())

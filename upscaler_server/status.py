"""``python -m upscaler_server.status`` (console script ``takdsr-status``): whether a daemon answers at an endpoint,
what it serves, and what it has done since it started (its ``welcome`` and ``statistics`` replies).

Exit status 0 when the daemon answered, 1 when none did (or it broke the protocol), 2 for bad arguments (an
endpoint that is none included), 130 after Ctrl-C, 141 when the reader closed the pipe (``| head``): a health check
for a script or a supervisor. It opens no session, and needs neither torch nor a GPU.

With ``--wait SECONDS`` it asks again until a daemon answers, for up to SECONDS: a script that has just started
one waits with it until the daemon serves (its model loads in seconds).

With ``--watch SECONDS`` it then asks again every SECONDS and prints a line each time (with ``--json``, one JSON
object per line): the frames per second done over that interval, the failures and BUSY refusals in it, and the
daemon's state now. It ends after ``--count`` intervals, or with status 0 at Ctrl-C (how a watch is ended), or with 1
when the daemon stops answering or is another one (restarted: its counts start again).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from upscaler_server.client import UpscalerClient
from upscaler_server.config import cli_prog
from upscaler_server.console import (
    add_version_option,
    drop_stdout,
    escape_unprintable_names,
    ignore_the_working_folder,
)
from upscaler_server.errors import ConfigError, ErrorCode, ProtocolError, ServerUnavailableError, UpscalerError
from upscaler_server.protocol import Statistics, Welcome

__all__ = ["Interval", "describe", "describe_interval", "interval", "latest_times", "main", "reply_fields",
           "statistics_or_none"]

MAX_SECONDS = 86400  # --timeout, --wait and --watch: a day
_WAIT_PAUSE_S = 0.2  # --wait: between attempts (one at a missing socket file fails at once)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=cli_prog("upscaler_server.status", "takdsr-status"),
                                description="Ask the upscaler daemon what it serves and what it has done.",
                                epilog="exit status: 0 answered, 1 no daemon answers (or it broke the protocol), 2 an "
                                "endpoint that is none, 130 interrupted, 141 the output pipe was closed")
    add_version_option(p)
    p.add_argument("--endpoint", default=None,
                   help="the daemon's endpoint (default: $TAKDSR_UPSCALER_ENDPOINT, else the per-user ipc socket)")
    p.add_argument("--timeout", type=_seconds, default=2.0, help="seconds to wait for the daemon (default: 2)")
    p.add_argument("--wait", type=_seconds, metavar="SECONDS",
                   help="ask again until a daemon answers, for up to SECONDS (a script that has just started one); "
                   "exit 1 if none has by then")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines for a reader")
    p.add_argument("--watch", type=_seconds, metavar="SECONDS",
                   help="then ask again every SECONDS and print the frames per second, failures and BUSY refusals of "
                   "each interval, until Ctrl-C (exit 0) or the daemon stops answering (exit 1)")
    p.add_argument("--count", type=_positive_count, metavar="N", help="with --watch: stop after N intervals")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_SECONDS:  # nan and inf fail too; beyond a day, time.sleep overflows somewhere
        raise argparse.ArgumentTypeError(f"a number of seconds > 0 and at most {MAX_SECONDS}, got {text}")
    return value


def _positive_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a count >= 1, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    escape_unprintable_names()
    ignore_the_working_folder()
    parser = _parser()
    args = parser.parse_args(argv)
    if args.count is not None and args.watch is None:
        parser.error("--count needs --watch")
    try:
        with _connect(args.endpoint, args.timeout, args.wait) as client:
            endpoint, info, stats = client.endpoint, client.info, statistics_or_none(client)
            _print_once(endpoint, info, stats, args.json, one_line=args.watch is not None)
            if args.watch is not None:
                return _watch(client, info, stats, args.watch, args.count, args.json)
    except ConfigError as exc:  # an endpoint that is none
        print(f"takdsr-status: {exc}", file=sys.stderr)
        return 2
    except UpscalerError as exc:  # no daemon (ServerUnavailableError), or one that broke the protocol
        print(f"takdsr-status: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the daemon answered (a watch that has begun ends with 0)
        print("takdsr-status: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `| head` closed the pipe: what it read is the answer, not an error to trace
        drop_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a command the pipe ended
    return 0


def _connect(endpoint: str | None, timeout: float, wait: float | None) -> UpscalerClient:
    """A client of the daemon at ``endpoint``; with ``wait``, tries again every 0.2 s for that long while none answers
    (no socket file yet, a daemon still loading its model, or one stopping before a restart)."""
    deadline = time.monotonic() + (wait or 0.0)
    while True:
        try:
            return UpscalerClient(endpoint, timeout=timeout, retries=0, name="takdsr-status", heartbeat=False)
        except ServerUnavailableError as exc:
            if time.monotonic() + _WAIT_PAUSE_S > deadline:
                raise exc if wait is None else ServerUnavailableError(f"{exc} (asked for {wait:g} s)") from None
            time.sleep(_WAIT_PAUSE_S)


def _print_once(endpoint: str, info: Welcome, stats: Statistics | None, as_json: bool, one_line: bool) -> None:
    """The daemon and its counts; as JSON on one line when the watch's JSON lines follow."""
    if as_json:
        report = {"endpoint": endpoint, "welcome": reply_fields(info),
                  "statistics": None if stats is None else reply_fields(stats)}
        print(json.dumps(report, indent=None if one_line else 2), flush=True)
    else:
        print(describe(endpoint, info, stats), flush=True)


@dataclass(frozen=True)
class Interval:
    """What a daemon did between two of its statistics replies, ``seconds`` apart."""

    seconds: float
    frames_done: int
    frames_failed: int
    frames_busy: int
    now: Statistics  # the later reply: sessions, queue and the latest frames' times

    @property
    def frames_per_second(self) -> float:
        return self.frames_done / self.seconds if self.seconds > 0 else 0.0


def interval(earlier: Statistics, later: Statistics, seconds: float) -> Interval:
    """The counts of ``later`` less those of ``earlier`` (of the same daemon instance)."""
    return Interval(seconds, later.frames_done - earlier.frames_done, later.frames_failed - earlier.frames_failed,
                    later.frames_busy - earlier.frames_busy, later)


def _watch(client: UpscalerClient, info: Welcome, first: Statistics | None, every: float, count: int | None,
           as_json: bool) -> int:
    """Ask every ``every`` seconds and print each interval, ``count`` times (None: until Ctrl-C, status 0); the exit
    status."""
    if first is None:
        print("takdsr-status: this daemon does not offer statistics to watch (older than the stats request)",
              file=sys.stderr)
        return 1
    try:
        return _watch_intervals(client, info, first, every, count, as_json)
    except KeyboardInterrupt:  # the way a watch is ended
        return 0


def _watch_intervals(client: UpscalerClient, info: Welcome, first: Statistics, every: float, count: int | None,
                     as_json: bool) -> int:
    earlier, asked = first, time.monotonic()
    printed = 0
    while count is None or printed < count:
        time.sleep(max(0.0, asked + every - time.monotonic()))
        later = client.stats()
        now = time.monotonic()  # the rate is over the time between the replies, a slow one included
        if later.instance != info.instance:
            print(f"takdsr-status: the daemon at {client.endpoint} restarted (instance {info.instance} is now "
                  f"{later.instance}); its counts started again", file=sys.stderr)
            return 1
        span = interval(earlier, later, now - asked)
        print(_interval_json(span) if as_json else describe_interval(span), flush=True)
        earlier, asked, printed = later, now, printed + 1
    return 0


def describe_interval(span: Interval) -> str:
    """One line: the interval's frame rate, failures and refusals, then the daemon's state and latest times."""
    now = span.now
    line = (f"{time.strftime('%H:%M:%S')}  {span.frames_per_second:.1f} frames/s, {span.frames_failed} failed, "
            f"{span.frames_busy} refused BUSY; {now.sessions} session(s), {now.queued} queued")
    return f"{line}; {latest_times(now)}" if now.recent_frames else line


def _interval_json(span: Interval) -> str:
    return json.dumps({"time": time.time(), "seconds": span.seconds, "frames_done": span.frames_done,
                       "frames_failed": span.frames_failed, "frames_busy": span.frames_busy,
                       "frames_per_second": span.frames_per_second, "statistics": reply_fields(span.now)})


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
        lines.append(latest_times(stats))
    return "\n".join(lines)


def latest_times(stats: Statistics) -> str:
    """The percentiles of the daemon's latest frames (it has done at least one), whole and model alone."""
    return (f"latest {stats.recent_frames} frame(s): total p50 {stats.total_us_p50 / 1000:.2f} ms, "
            f"p99 {stats.total_us_p99 / 1000:.2f} ms; model p50 {stats.infer_us_p50 / 1000:.2f} ms, "
            f"p99 {stats.infer_us_p99 / 1000:.2f} ms")


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

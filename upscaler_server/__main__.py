"""``python -m upscaler_server`` / ``upscaler-server``: command line -> Config -> engine -> Server.

Exit status: 0 after SIGTERM, SIGINT or SIGHUP (a second signal forces a stop without waiting for the running frame;
during start-up, the first one ends the process before anything is bound),
1 when the engine cannot be set up (a backend failing while --tune-sizes are measured), 2 for invalid settings or an
endpoint already served, 3 when the model cannot be loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import sys
from collections.abc import Sequence
from multiprocessing import resource_tracker
from types import FrameType
from typing import TYPE_CHECKING

from upscaler_server.config import (
    CHECKPOINT_HELP,
    SCALE_HELP,
    Config,
    add_backend_arguments,
    cli_prog,
    default_endpoint,
)
from upscaler_server.console import add_version_option, escape_unprintable_names, ignore_the_working_folder
from upscaler_server.endpoint import refuse_served
from upscaler_server.errors import ConfigError, EngineError, ModelLoadError
from upscaler_server.service import still_starting

if TYPE_CHECKING:
    from upscaler_server.server import Server

__all__ = ["main"]

log = logging.getLogger("upscaler_server")

EXIT_ENGINE = 1  # the engine could not be set up (a backend failing while --tune-sizes are measured)
EXIT_CONFIG = 2
EXIT_MODEL = 3
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _parser() -> argparse.ArgumentParser:
    defaults = Config(endpoint="ipc://unused")
    p = argparse.ArgumentParser(prog=cli_prog("upscaler_server", "upscaler-server"),
                                description="Real-time neural upscaling daemon (ZeroMQ control messages, pixels in "
                                "shared memory; see docs/protocol.md).",
                                epilog=f"exit status: 0 stopped by SIGTERM, SIGINT or SIGHUP, {EXIT_ENGINE} the engine "
                                f"could not be set up, {EXIT_CONFIG} invalid settings or an endpoint already served, "
                                f"{EXIT_MODEL} the model cannot be loaded")
    add_version_option(p)
    p.add_argument("--endpoint", help="ipc://PATH or tcp://127.0.0.1:PORT (default: $TAKDSR_UPSCALER_ENDPOINT or "
                   "ipc://$XDG_RUNTIME_DIR/takdsr/upscaler.sock, else ipc:///tmp/takdsr-$UID/upscaler.sock)")
    p.add_argument("--allow-remote", action="store_true", help="allow a tcp:// endpoint on a non-loopback address "
                   "(anyone who reaches it can use the daemon: trusted networks only)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=pathlib.Path, help=CHECKPOINT_HELP)
    src.add_argument("--model", help="run this registered model with RANDOM weights (benchmarks and tests only)")
    add_backend_arguments(p, defaults.backend)
    p.add_argument("--scale", type=int, help=SCALE_HELP)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default=defaults.device, help="default %(default)s")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default=defaults.precision,
                   help="auto (default): fp16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads (0: all usable cores)")
    p.add_argument("--cuda-graphs", action="store_true", help="capture a CUDA graph per resolution")
    p.add_argument("--overlap", action="store_true", help="CUDA, eager/compile: keep two frames in flight so one "
                   "frame's copies overlap the next one's compute (needs clients with several slots in flight)")
    p.add_argument("--map-slots", action="store_true", help="read and write frames through the shared-memory "
                   "mapping instead of having the kernel copy them: faster (docs/performance.md, Transport), but a "
                   "client that shrinks a segment while its frame is copied (or empties it and fills /dev/shm) kills "
                   "the daemon with SIGBUS; for trusted clients chasing the last milliseconds (docs/protocol.md 6.1)")
    p.add_argument("--max-width", type=int, default=defaults.max_width,
                   help="largest input width (default %(default)s)")
    p.add_argument("--max-height", type=int, default=defaults.max_height,
                   help="largest input height (default %(default)s)")
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                   help="largest input width*height (default %(default)s)")
    p.add_argument("--max-slots", type=int, default=defaults.max_slots,
                   help="most slots per session (default %(default)s)")
    p.add_argument("--max-sessions", type=int, default=defaults.max_sessions,
                   help="most open sessions (default %(default)s)")
    p.add_argument("--max-shm-mb", type=int, default=defaults.max_shm_bytes >> 20,
                   help="shared memory all sessions may hold, MiB (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue,
                   help="frames waiting for the engine before clients get BUSY (default %(default)s)")
    p.add_argument("--max-unread-mb", type=int, default=defaults.max_unread_bytes >> 20,
                   help="inline results a client may leave unread, MiB, before its next process gets BUSY "
                        "(at least two of that frame's results are always allowed; all clients together: four times "
                        "this; default %(default)s)")
    p.add_argument("--lease-timeout", type=float, default=defaults.lease_timeout,
                   help="seconds without a message before a session is closed and its memory freed (default "
                        "%(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="default %(default)s, which the ready line needs; DEBUG adds a line per session")
    return p


def _config(args: argparse.Namespace) -> Config:
    return Config(endpoint=args.endpoint or default_endpoint(), allow_remote=args.allow_remote,
                  checkpoint=args.checkpoint, model=args.model,
                  backend=args.backend, scale=args.scale, device=args.device, precision=args.precision,
                  threads=args.threads, cuda_graphs=args.cuda_graphs, overlap=args.overlap, map_slots=args.map_slots,
                  pad_channels=args.pad_channels, edge_pad=args.edge_pad, cache_dir=args.cache_dir,
                  auto_backends=tuple(args.auto_backends), tune_sizes=tuple(args.tune_sizes), max_width=args.max_width,
                  max_height=args.max_height, max_pixels=args.max_pixels, max_slots=args.max_slots,
                  max_sessions=args.max_sessions, max_shm_bytes=args.max_shm_mb << 20, max_queue=args.max_queue,
                  max_unread_bytes=args.max_unread_mb << 20,
                  lease_timeout=args.lease_timeout)


class _StopDuringStartUp(BaseException):
    """A stop signal while the daemon starts (torch import, model load, --tune-sizes measurements, TensorRT builds:
    seconds to minutes): start-up is abandoned at once, as nothing is bound or shared yet. A BaseException, so that
    start-up code catching Exception cannot swallow it."""


class _Signals:
    """SIGTERM, SIGINT and SIGHUP (a closed terminal or SSH session) handlers, installed before the slow start-up.
    Until :meth:`attach`, a signal abandons start-up (:class:`_StopDuringStartUp`); after it, a signal only sets the
    server's flags and wakes its loop."""

    def __init__(self) -> None:
        self.server: Server | None = None
        hangups_ignored = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # started under nohup: keep it so
        _start_resource_tracker_ignoring_hangups()
        for signum in _STOP_SIGNALS:
            if not (signum == signal.SIGHUP and hangups_ignored):
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.server is None:
            raise _StopDuringStartUp(signum)
        self.server.request_stop()  # flags and a wake-up byte only; the loop does the work

    def attach(self, server: Server) -> None:
        self.server = server


def _start_resource_tracker_ignoring_hangups() -> None:
    """Start Python's resource tracker (it unlinks this daemon's segments if the daemon is killed) with SIGHUP ignored,
    a disposition kept across exec: a hang-up reaches the whole process group, and the tracker, which ignores only
    SIGINT and SIGTERM, died of it, so a daemon killed later left its segments behind."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.signal(signal.SIGHUP, previous)


def _start(args: argparse.Namespace, signals: _Signals) -> Server | int:
    """Config -> engine -> Server, attached to ``signals``; the exit status when it cannot start."""
    try:
        config = _config(args)
        refuse_served(config.endpoint)  # before torch, the model load and the backend measurements (seconds to minutes)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    from upscaler_server.engine import build_engine  # torch loads here, after argument errors are reported
    from upscaler_server.server import Server

    try:
        server = Server(config, build_engine(config, on_tune=still_starting))
    except ModelLoadError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_MODEL
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    except EngineError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_ENGINE
    signals.attach(server)
    return server


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (``upscaler-server``); returns the exit status."""
    escape_unprintable_names()  # before anything prints, argparse's errors included: a name may not be UTF-8
    ignore_the_working_folder()  # before `models` loads: a service runs wherever its supervisor starts it
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # torch sets its loggers up (WARNING, or what TORCH_LOGS asks) at the end of its import; a stop signal during that
    # import cut it short, and its exit handlers then logged statistics at INFO into the daemon's log
    logging.getLogger("torch").setLevel(logging.WARNING)
    try:
        signals = _Signals()
        started = _start(args, signals)
    except _StopDuringStartUp as stop:
        log.info("stopped during start-up (%s): nothing was bound", signal.Signals(stop.args[0]).name)
        return 0
    if isinstance(started, int):
        return started
    server = started
    try:
        server.serve()
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    finally:  # all is released: a stop signal now (a second Ctrl-C) must not kill the exit, whose teardown takes a
        for signum in _STOP_SIGNALS:  # moment, by the default action Python puts back before it (status 143, 130)
            signal.signal(signum, signal.SIG_IGN)
    if server.worker_running:  # forced stop: sockets and shared memory are already released
        logging.shutdown()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m client_demo`` (``takdsr-demo``): command line -> DemoConfig -> (spawned daemon) -> window or headless.

Exit status: 0 done; 1 unexpected error; 2 invalid arguments or a stream the daemon refuses; 3 headless: the upscaler
could not be reached or stopped answering; 4 --spawn-server: the daemon could not start (its log is printed);
5 no window could be opened; 130 interrupted (Ctrl-C, SIGTERM, SIGHUP).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import pathlib
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from types import FrameType

from safetensors import safe_open

import scenes
from client_demo.config import (
    CHECKPOINT_METADATA_KEY,
    DEFAULT_AUTO_BACKENDS,
    EXIT_INTERRUPTED,
    EXIT_NO_WINDOW,
    EXIT_SPAWN,
    EXIT_USAGE,
    NATIVE_STUDENT_FILE,
    DaemonWatch,
    DemoConfig,
)
from client_demo.controls import VIEWS
from client_demo.headless import DEFAULT_OUT, InterruptReported, OutputFolder, OutputFolderError, run_headless
from client_demo.link import UpscaleLink
from client_demo.spawn import DaemonStartError, SpawnedDaemon
from upscaler_server.config import BACKEND_CHOICES, check_endpoint, cli_prog, default_endpoint, parse_auto_backends
from upscaler_server.console import add_version_option, escape_unprintable_names
from upscaler_server.errors import ConfigError
from upscaler_server.files import FolderError, check_writable

__all__ = ["main", "parse_args"]


def _utf8_path(text: str) -> pathlib.Path:
    """A path OpenCV can write under: its PNG and MP4 writers crash the process on a name that is not UTF-8. Not an
    empty one, which pathlib reads as the current folder (`--out ""` wrote the frames into the checkout)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; name a folder or file")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8; choose a folder name that is") from None
    return pathlib.Path(text)


def _endpoint(text: str) -> str:
    """The forms the daemon binds (upscaler_server.config.check_endpoint; a remote host too): anything else could
    never be reached, and would be reported as an unreachable daemon (status 3) instead of a mistyped argument."""
    try:
        check_endpoint(text, allow_remote=True)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (e.g. ipc:///path/to/socket or tcp://127.0.0.1:PORT)") from None
    return text


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x360, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"width and height must be positive, got {text!r}")
    return width, height


def _parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(prog=cli_prog("client_demo", "takdsr-demo"),
                                description="Live demo of the TAKDSR upscaler: a game scene "
                                "rendered at low resolution, upscaled by the daemon, beside bilinear scaling and a "
                                "native high-resolution render. See docs/demo.md.",
                                epilog="exit status: 0 done, 1 unexpected error, 2 invalid arguments or a stream the "
                                "daemon refuses, 3 headless: the upscaler could not be reached or stopped answering, "
                                "4 --spawn-server: the daemon could not start, 5 no window could be opened, 130 "
                                "interrupted")
    add_version_option(p)
    p.add_argument("--endpoint", type=_endpoint,
                   help="daemon endpoint (default: the client's default, or the spawned daemon's)")
    p.add_argument("--spawn-server", action="store_true", help="start a daemon for this run and stop it at exit")
    p.add_argument("--checkpoint", type=pathlib.Path, help="student checkpoint for --spawn-server: a file or a "
                   "bundled name such as rlfn_s_takdsr_x2 (default: the bundled student trained on natively "
                   "rendered LR, as the demo renders it)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device of the --spawn-server daemon "
                   "(default: auto)")
    p.add_argument("--backend", choices=[c for c in BACKEND_CHOICES if c != "nearest"],
                   help="--backend of the --spawn-server daemon (default: auto, which picks the faster of what "
                   "--auto-backends names within 2 levels / 50 dB of fp32 eager, measured before the first frame of a "
                   "size and cached; docs/performance.md)")
    p.add_argument("--auto-backends", type=parse_auto_backends, metavar="B1,B2",
                   help="what the --spawn-server daemon's --backend auto may pick from (default: "
                   f"{','.join(DEFAULT_AUTO_BACKENDS)}: fp32, or bf16 on a CPU with bf16 instructions, fp16 on CUDA; "
                   "compile's candidates cost tens of seconds of compilation on a CPU)")
    p.add_argument("--scene", choices=scenes.PRESETS, default=d.scene, help="scene preset (default: %(default)s)")
    p.add_argument("--lr", type=_size, default=d.lr_size, metavar="WxH",
                   help=f"rendered (low-resolution) size (default: {d.lr_size[0]}x{d.lr_size[1]})")
    p.add_argument("--scale", type=int, help="upscale factor, the daemon's (default: the scale of the --spawn-server "
                   f"checkpoint, else {d.scale})")
    p.add_argument("--view", choices=VIEWS, default=d.view, help="what is shown / written (default: %(default)s)")
    p.add_argument("--compare", choices=["bilinear", "native"], default=d.compare,
                   help="right half of the split view (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="seconds a ping of the daemon may go unanswered (a ping waits at least 1 s whatever this "
                   "is; the daemon is pinged about once a second while a frame waits); a frame is given up, and the "
                   "daemon reconnected, after twice that although the daemon answers (a session's first frames: "
                   "after 120 s at least, as they wait for the daemon's warm-up of their size); keep it above one "
                   "frame's upscale time (default: %(default)s)")
    p.add_argument("--start", type=float, default=d.start,
                   help="seconds on the camera path of the first frame (default: %(default)s)")
    p.add_argument("--out", type=_utf8_path, help="headless: output folder (default: demo_out); "
                   "window: screenshot folder (default: the current one)")
    g = p.add_argument_group("headless mode")
    g.add_argument("--headless", action="store_true", help="no window: write PNGs, an MP4 and stats.json")
    # the modes' own options default to None here, so that one given for the other mode is refused, not ignored
    g.add_argument("--frames", type=int, help=f"frames to render (default: {d.frames})")
    g.add_argument("--fps", type=float, help=f"camera-path clock and MP4 frame rate (default: {d.fps})")
    w = p.add_argument_group("window mode")
    w.add_argument("--max-fps", type=float, help=f"frame-rate cap of the window loop (default: {d.max_fps})")
    w.add_argument("--screenshot-after", type=int, metavar="N", help="save a screenshot after N frames")
    w.add_argument("--exit-after", type=int, metavar="N", help="quit after N frames")
    return p


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """DemoConfig from the command line; exits with status 2 (argparse) on invalid arguments."""
    p = _parser()
    a = p.parse_args(argv)
    daemon_options = (a.checkpoint, a.device, a.backend, a.auto_backends)
    if any(option is not None for option in daemon_options) and not a.spawn_server:
        p.error("--checkpoint, --device, --backend and --auto-backends configure the daemon that --spawn-server "
                "starts")
    backend = a.backend or DemoConfig.backend
    if a.auto_backends is not None and backend != "auto":
        p.error(f"--auto-backends narrows --backend auto, not --backend {backend}")
    if a.auto_backends == []:  # the daemon's empty list means every available backend, compile's too
        p.error("--auto-backends names at least one backend or label, e.g. eager,onnxruntime")
    _refuse_the_other_modes_options(p, a)
    a.frames = DemoConfig.frames if a.frames is None else a.frames
    a.fps = DemoConfig.fps if a.fps is None else a.fps
    a.max_fps = DemoConfig.max_fps if a.max_fps is None else a.max_fps
    for flag, value in (("--scale", a.scale), ("--frames", a.frames)):
        if value is not None and value < 1:
            p.error(f"{flag} must be positive, got {value}")
    for flag, value in (("--exit-after", a.exit_after), ("--screenshot-after", a.screenshot_after)):
        if value is not None and value < 1:
            p.error(f"{flag} counts frames: at least 1, got {value}")
    if a.exit_after is not None and a.screenshot_after is not None and a.screenshot_after > a.exit_after:
        p.error(f"--screenshot-after {a.screenshot_after} comes after --exit-after {a.exit_after}: no screenshot would "
                "be taken")
    # inf or nan passes `<= 0`: an MP4 writer at inf fps spins forever, a nan clock fails mid-run
    for flag, value, low, high in (("--fps", a.fps, 0.1, 1000.0), ("--max-fps", a.max_fps, 0.1, 1000.0),
                                   ("--timeout", a.timeout, 0.01, 3600.0), ("--start", a.start, -1e6, 1e6)):
        if not low <= value <= high:
            p.error(f"{flag} must be a number from {low:g} to {high:g}, got {value}")
    if a.out is not None and a.out.exists() and not a.out.is_dir():
        p.error(f"--out {a.out} is a file, not a folder")
    served = _native_student() if a.spawn_server else None  # the file the spawned daemon will load
    if a.checkpoint is not None:
        served = a.checkpoint if a.checkpoint.is_file() else _bundled_path(a.checkpoint)
        if served is None:
            p.error(f"--checkpoint {a.checkpoint} is not a file or the name of a bundled checkpoint")
    served_scale = _checkpoint_scale(served) if served is not None else None
    scale = a.scale
    if scale is None:  # the spawned daemon's: an x3 checkpoint without --scale 3 was refused as "asked for x2"
        scale = served_scale or DemoConfig.scale
    elif served is not None and served_scale is not None and scale != served_scale:  # before the daemon starts
        p.error(f"--scale {scale}, but the --spawn-server checkpoint {served.name} upscales x{served_scale}: leave "
                f"--scale out, or pass --scale {served_scale}")
    return DemoConfig(endpoint=a.endpoint, spawn_server=a.spawn_server, checkpoint=a.checkpoint,
                      device=a.device or "auto", backend=backend,
                      auto_backends=DEFAULT_AUTO_BACKENDS if a.auto_backends is None else tuple(a.auto_backends),
                      scene=a.scene, lr_size=a.lr, scale=scale, view=a.view, compare=a.compare, timeout=a.timeout,
                      out=a.out, headless=a.headless, frames=a.frames, fps=a.fps, start=a.start,
                      max_fps=a.max_fps, screenshot_after=a.screenshot_after, exit_after=a.exit_after)


def _refuse_the_other_modes_options(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """A headless option in window mode, or a window option with --headless, did nothing at all (exit 0): refused,
    as --checkpoint without --spawn-server is."""
    headless = {"--frames": a.frames, "--fps": a.fps}
    window = {"--max-fps": a.max_fps, "--screenshot-after": a.screenshot_after, "--exit-after": a.exit_after}
    given = [flag for flag, value in (window if a.headless else headless).items() if value is not None]
    if given:
        mode = "--headless runs" if not a.headless else "the window (runs without --headless)"
        p.error(f"{', '.join(given)} would be ignored: {'they are' if len(given) > 1 else 'it is'} for {mode}")


class _Signals:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal or a lost SSH session) set a flag that the loops check (they
    then clean up); a second signal interrupts at once. Later ones are only counted: the clean-up that the
    interruption runs (stats.json, stopping the spawned daemon, its temporary folder) must not be cut short in turn."""

    def __init__(self) -> None:
        self.requested = 0
        self._holding = False  # inside held(): the "at once" interruption waits for the block's end
        self._interrupt_held = False
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested += 1
        if self.requested == 2:
            if self._holding:
                self._interrupt_held = True
            else:
                raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A block the second signal does not cut in two (a headless frame's PNG, video frame and stats record):
        its KeyboardInterrupt is raised once the block has run. A block that fails ends with its own error."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._interrupt_held:
            self._interrupt_held = False
            raise KeyboardInterrupt

    def __call__(self) -> bool:
        return self.requested > 0

    def at_once(self) -> bool:
        """Whether a second signal asked to stop at once (its KeyboardInterrupt may have been spent elsewhere)."""
        return self.requested >= 2


def _run(cfg: DemoConfig, endpoint: str | None, watch: DaemonWatch, stop: _Signals, folder: OutputFolder | None,
         started: float) -> int:
    """The window, or with ``folder`` (held by this run) headless; ``started`` is the demo's start (stats.json)."""
    # the default resolved here, not in the client: stats.json names the endpoint it used ($TAKDSR_UPSCALER_ENDPOINT)
    try:
        endpoint = endpoint or default_endpoint()
    except ConfigError as exc:  # a $TAKDSR_UPSCALER_ENDPOINT that is no endpoint: a mistyped setting, as --endpoint
        print(f"client_demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    link = UpscaleLink(endpoint, cfg.lr_size, cfg.scale, cfg.timeout)
    link.start()  # connects while the renderer warms up
    try:
        if folder is not None:
            return run_headless(cfg, link, watch, stop, folder, started, stop.held)
        from client_demo.window import run_window  # importable: _window_unavailable checked it

        return run_window(cfg, link, watch, stop)
    finally:
        link.close()


def _screenshot_folder_problem(cfg: DemoConfig) -> str | None:
    """Why the window's screenshots could not be written into --out (or, with --screenshot-after, the current
    folder): it was found at the first screenshot, after the daemon had started and frames had run. A screenshot
    asked for by a key alone is reported when it fails, and the demo goes on."""
    if cfg.out is None and cfg.screenshot_after is None:
        return None
    folder = (cfg.out or pathlib.Path.cwd()).absolute()
    existing = next(p for p in [folder, *folder.parents] if p.exists())  # the screenshot makes the rest
    try:
        check_writable(existing)
    except FolderError as exc:
        option = "--out" if cfg.out is not None else "--screenshot-after (into the current folder, without --out)"
        return f"{option}: no screenshot could be saved: {exc}"
    return None


def _window_unavailable() -> int | None:
    """EXIT_NO_WINDOW, said why, when window mode cannot run here (glfw or imgui missing, no display); else None."""
    try:
        from client_demo.window import NO_WINDOW_MESSAGE, display_problem  # glfw and imgui: window mode only
    except ModuleNotFoundError as exc:
        if exc.name not in ("imgui_bundle", "glfw"):
            raise
        print(f"client_demo: window mode needs {exc.name} (pip install imgui-bundle glfw); or use --headless",
              file=sys.stderr)
        return EXIT_NO_WINDOW
    problem = display_problem()
    if problem is not None:
        print(f"{NO_WINDOW_MESSAGE} ({problem})", file=sys.stderr)
        return EXIT_NO_WINDOW
    return None


def _weights_dir() -> pathlib.Path | None:
    """The bundled checkpoints' folder, found without importing `models`, which would import torch into the demo
    (tests/test_demo_headless.py)."""
    spec = importlib.util.find_spec("models")
    return None if spec is None or spec.origin is None else pathlib.Path(spec.origin).parent / "weights"


def _bundled_path(checkpoint: pathlib.Path) -> pathlib.Path | None:
    """The bundled file the daemon takes ``checkpoint`` for, or None: models.names_bundled's rule (a bare name, or
    models/weights/NAME relative to a checkout), repeated here because importing `models` imports torch."""
    weights = _weights_dir()
    named = checkpoint.parent == pathlib.Path(".") or (checkpoint.parts[-3:-1] == ("models", "weights")
                                                        and not checkpoint.is_absolute())
    file_name = f"{checkpoint.name.removesuffix('.safetensors')}.safetensors"
    found = weights / file_name if named and weights is not None else None
    return found if found is not None and found.is_file() else None


def _checkpoint_scale(path: pathlib.Path) -> int | None:
    """The scale a checkpoint's metadata declares, read without torch (safetensors' header only); None when it cannot
    be read: the daemon then says what is wrong with the file."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            scale = json.loads((handle.metadata() or {})[CHECKPOINT_METADATA_KEY])["scale"]
    except Exception:  # any unreadable or foreign file: not this function's to report
        return None
    return scale if isinstance(scale, int) and not isinstance(scale, bool) and scale >= 1 else None


def _native_student() -> pathlib.Path | None:
    """The demo renders its LR frames natively (aliased), which the student trained on native LR upscales
    better than the bicubic-trained default (docs/ablations.md); None: the daemon's own default."""
    weights = _weights_dir()
    path = weights / NATIVE_STUDENT_FILE if weights is not None else None
    return path if path is not None and path.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (``takdsr-demo``); returns the exit status."""
    started = time.perf_counter()  # stats.json's wall_s: the spawned daemon's start-up included
    escape_unprintable_names()  # before anything prints, argparse's errors included: a name may not be UTF-8
    cfg = parse_args(argv)
    if not cfg.headless and (problem := _screenshot_folder_problem(cfg)) is not None:
        print(f"client_demo: {problem}", file=sys.stderr)
        return EXIT_USAGE
    stop = _Signals()
    try:
        if not cfg.headless:
            missing = _window_unavailable()  # before a daemon is started for nothing
            return missing if missing is not None else _with_daemon(cfg, stop, None, started)
        try:  # before the daemon starts: a second demo writing into the same folder is refused at once
            folder = OutputFolder(cfg.out or DEFAULT_OUT)
        except OutputFolderError as exc:
            print(f"client_demo: {exc}", file=sys.stderr)
            return EXIT_USAGE
        with folder:
            return _with_daemon(cfg, stop, folder, started)
    except KeyboardInterrupt as exc:
        if not isinstance(exc, InterruptReported):
            print("client_demo: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _with_daemon(cfg: DemoConfig, stop: _Signals, folder: OutputFolder | None, started: float) -> int:
    """The run against ``--endpoint``, or against a daemon of its own (--spawn-server), stopped in every case."""
    if not cfg.spawn_server:
        return _run(cfg, cfg.endpoint, lambda: None, stop, folder, started)
    with SpawnedDaemon(cfg.checkpoint or _native_student(), cfg.device, cfg.endpoint, stop.at_once,
                       backend=cfg.backend, auto_backends=cfg.auto_backends) as daemon:
        print(f"client_demo: starting the upscaler daemon ({daemon.endpoint}) ...", file=sys.stderr)
        try:
            daemon.start(stop)
        except DaemonStartError as exc:
            print(f"client_demo: {exc}", file=sys.stderr)
            return EXIT_SPAWN
        print(f"client_demo: upscaler daemon ready (pid {daemon.pid})", file=sys.stderr)
        status = _run(cfg, daemon.endpoint, daemon.gone, stop, folder, started)
        for line in daemon.auto_backend_lines():  # the HUD and stats.json say only "auto"; its log goes with it
            print(f"client_demo: from the daemon's log: {line}", file=sys.stderr)
        return status

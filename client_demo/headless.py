"""Headless mode: render through EGL (no window), upscale through the daemon, and write what the window would show.

Outputs in the ``--out`` folder: ``frames/NNNNN.png`` (the chosen view at HR), ``demo.mp4`` (the same frames, mp4v)
and ``stats.json`` (sizes, upscaler, fps, round-trip percentiles and, per frame, the PSNR of SR and of bilinear
against the supersampled (aliasing-free) HR render of the same frame). A run that ends early still writes
stats.json, with ``"completed": false`` and the reason. The folder is locked for the run (:class:`OutputFolder`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

import scenes
from client_demo.config import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NO_WINDOW,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    SR_CAPTION,
    DaemonWatch,
    DemoConfig,
)
from client_demo.daemon_stats import describe_statistics, served_statistics
from client_demo.frames import FrameSizeError, GpuFrames
from client_demo.link import PIPELINE_DEPTH, Finished, LinkState, UpscaleLink
from client_demo.metrics import percentiles, psnr
from upscaler_server.files import replace_whole
from upscaler_server.protocol import Statistics
from upscaler_server.status import reply_fields

__all__ = ["DEFAULT_OUT", "FRAMES_DIR", "LOCK_NAME", "STATS_NAME", "VIDEO_NAME", "InterruptReported", "OutputFolder",
           "OutputFolderError", "caption", "run_headless"]

DEFAULT_OUT = pathlib.Path("demo_out")
FRAMES_DIR = "frames"
VIDEO_NAME = "demo.mp4"
STATS_NAME = "stats.json"
# Hidden, and never removed: a lock file unlinked while a second run opens it would give each run its own lock.
LOCK_NAME = ".takdsr-demo.lock"
# What stats.json says from the moment the earlier run's outputs are cleared until this run writes its own: a run
# killed outright (SIGKILL, a power cut) leaves this, never the earlier run's "completed": true beside new frames.
UNFINISHED = "the run did not finish: it is still running, or it was killed before it could write its stats"
INTERRUPTED_AT_ONCE = "interrupted at once (a second Ctrl-C or signal)"  # stats.json's error then
# A block that an interrupting signal waits for (client_demo.cli's _Signals.held); the default holds nothing.
SignalHold = Callable[[], AbstractContextManager[None]]
WAIT_SLICE = 0.1  # s per wait for the upscaler, between checks for Ctrl-C and a dead daemon
# The progress bar's words until the first frame is back: it waits behind the daemon's warm-up of the size (auto's
# measuring, compile's compilation), which can take tens of seconds on a CPU.
FIRST_FRAME_NOTE = "waiting for the first frame (the daemon prepares this size)"
BAR_REFRESH = 1.0  # s between redraws of the progress bar while no frame comes back (its elapsed time moves on)


class InterruptReported(KeyboardInterrupt):
    """A second signal's interruption, once the run has said how far it got (the caller adds no line of its own:
    "client_demo: interrupted" came after "interrupted at once ...")."""


class OutputFolderError(Exception):
    """``--out`` cannot be used: it cannot be written, or another demo writes into it (exit status 2)."""


class OutputFolder:
    """The ``--out`` folder, held for one run by an exclusive lock on a hidden file in it, so that a second demo
    writing into the same folder is refused instead of mixing its frames with ours. The kernel drops the lock when
    this process ends, however it ends (even SIGKILL): a crashed run never blocks the next one. Nothing in the
    folder is deleted here; that waits until the run has passed its other checks (run_headless)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        # the folders this run creates, deepest first: removed again by release() if the run writes nothing there
        self._made = [folder for folder in [path, *path.parents] if not os.path.lexists(folder)]
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._lock = open(path / LOCK_NAME, "a+")  # noqa: SIM115 - held (and the lock with it) until release()
        except OSError as exc:
            raise OutputFolderError(f"cannot write into {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.seek(0)
            holder = self._lock.read().strip()
            self._lock.close()
            if not isinstance(exc, BlockingIOError):
                raise OutputFolderError(f"cannot lock {path / LOCK_NAME}: {exc.strerror or exc}") from None
            raise OutputFolderError(f"another demo{f' (pid {holder})' if holder else ''} is writing into {path}; "
                                    "wait for it to end or pass another --out") from None
        self._lock.truncate(0)  # the holder's pid, for the message above
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()

    def release(self) -> None:
        """Unlock. A folder this run created and left holding only the lock file (no daemon reached, none started)
        is removed again, with the parents it created: a failed first run left `--out` and its lock behind. The
        lock file goes while it is still locked; in a folder that existed before, it stays (see LOCK_NAME)."""
        try:
            if self._made and _holds_only_the_lock(self.path):
                (self.path / LOCK_NAME).unlink(missing_ok=True)
                for folder in self._made:
                    with contextlib.suppress(OSError):  # not empty: someone wrote there meanwhile
                        folder.rmdir()
        finally:
            self._lock.close()

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holds_only_the_lock(folder: pathlib.Path) -> bool:
    try:
        return [entry.name for entry in folder.iterdir()] == [LOCK_NAME]
    except OSError:  # removed or unreadable meanwhile: nothing to tidy
        return False


class _Stopped(Exception):
    """The run cannot go on; ``status`` is the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class FrameRecord:
    """One frame's entry in stats.json."""

    index: int
    t: float  # s on the camera path
    render_ms: float  # LR render + read-back into shared memory
    round_trip_ms: float  # submit -> done, seen by the client
    infer_ms: float  # the network alone, measured by the daemon
    psnr_sr_db: float  # upscaled vs the supersampled HR render
    psnr_bilinear_db: float  # GPU bilinear vs the supersampled HR render


class _Outputs:
    """PNG frames and the MP4 of the chosen view."""

    def __init__(self, out: pathlib.Path, size: tuple[int, int], fps: float) -> None:
        self.frames_dir = out / FRAMES_DIR
        self.video_path = out / VIDEO_NAME
        self._size, self._fps = size, fps
        self._video: cv2.VideoWriter | None = None  # opened with the first frame: a run that never gets one

    def make_folder(self) -> None:
        self.frames_dir.mkdir(parents=True, exist_ok=True)

    def clear_earlier(self) -> None:
        """Delete an earlier run's frames (a longer run's would stay beside ours) and video (a run that never gets a
        frame leaves no unplayable file, nor the older video)."""
        for old_frame in self.frames_dir.glob("[0-9][0-9][0-9][0-9][0-9].png"):
            old_frame.unlink()
        self.video_path.unlink(missing_ok=True)

    def write(self, index: int, rgb: np.ndarray) -> None:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        if not cv2.imwrite(str(self.frames_dir / f"{index:05d}.png"), bgr):
            raise OSError(f"cannot write a PNG into {self.frames_dir}")
        if self._video is None:
            self._video = cv2.VideoWriter(str(self.video_path), cv2.VideoWriter_fourcc(*"mp4v"), self._fps,
                                          self._size)
            if not self._video.isOpened():
                raise OSError(f"OpenCV cannot write {self.video_path} (mp4v)")
        self._video.write(bgr)

    @property
    def wrote_video(self) -> bool:
        return self._video is not None

    def close(self) -> None:
        if self._video is not None:
            self._video.release()


def caption(rgb: np.ndarray, text: str, x: int, end: int) -> None:
    """Write ``text`` on a dark box at the bottom of ``rgb`` (H, W, 3) from column ``x``, in place; left out when it
    would reach column ``end`` (the edge of the half it names) or the frame is too low for it."""
    font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1
    (width, height), baseline = cv2.getTextSize(text, font, scale, thickness)
    bottom = rgb.shape[0] - 8
    if x + width + 4 >= end or bottom - height - 6 < 0:
        return
    cv2.rectangle(rgb, (x - 4, bottom - height - 6), (x + width + 4, bottom + baseline - 2), (0, 0, 0), cv2.FILLED)
    cv2.putText(rgb, text, (x, bottom - 2), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)


class _HeadlessRun:
    def __init__(self, cfg: DemoConfig, gpu: GpuFrames, link: UpscaleLink, outputs: _Outputs,
                 watch: DaemonWatch, should_stop: Callable[[], bool], hold_signals: SignalHold) -> None:
        self.cfg, self.gpu, self.link, self.outputs = cfg, gpu, link, outputs
        self.watch, self.should_stop, self.hold_signals = watch, should_stop, hold_signals
        self.records: list[FrameRecord] = []
        self.done_times: list[float] = []
        self.reopened = 0  # sessions opened anew after the daemon ended ours (_reopen)
        self._pending: dict[int, tuple[int, float, float]] = {}  # slot -> (index, t, render_ms)
        self._connection = 0  # the link's connection the frames in _pending were sent on
        self._progress_since_reopen = True
        self._bar: tqdm | None = None  # the progress bar while execute() runs

    def connect(self) -> None:
        """Warm the renderer up and wait for the daemon's session: a daemon that cannot be reached or refuses this
        stream (_Stopped) must leave an earlier run's outputs as they were, so this runs before they are deleted."""
        self._warm_up()
        while not self.link.ready:
            self._check("connecting")
            self.link.poll(WAIT_SLICE)
        self._connection = self.link.connection

    def execute(self) -> None:
        """Render, upscale and write every frame (after connect), with a progress bar when stderr is a terminal
        (disable=None: none in a log or a pipe), which it clears when the run ends."""
        with tqdm(total=self.cfg.frames, desc="client_demo", unit="frame", disable=None, leave=False,
                  dynamic_ncols=True, postfix=FIRST_FRAME_NOTE) as self._bar:
            for index in range(self.cfg.frames):
                slot = self.link.acquire()
                while slot is None:  # both slots in flight: finish the older frame while the newer one upscales
                    self._finish(self._next_finished())
                    slot = self.link.acquire()
                self._submit(slot, index)
            while self._pending:  # not link.in_flight: frames of a session that ended are sent again (_reopen)
                self._finish(self._next_finished())

    def _warm_up(self) -> None:
        """Pay the renderer's one-off costs (textures, shaders, shadow maps) before anything is timed."""
        self.gpu.render_lr(0, self.cfg.scene, self.cfg.start)
        self.gpu.render_native(self.cfg.scene, self.cfg.start)

    def _next_finished(self) -> list[Finished]:
        redrawn = time.monotonic()
        while True:
            self._check("upscaling")
            finished = self.link.poll(WAIT_SLICE)
            if finished:
                return finished
            if self._bar is not None and time.monotonic() - redrawn > BAR_REFRESH:
                self._bar.refresh()  # its elapsed time, while a frame is awaited (a daemon's warm-up: seconds)
                redrawn = time.monotonic()

    def _check(self, doing: str) -> None:
        """Stop on Ctrl-C, a dead spawned daemon or a lost upscaler; reopen a session that the daemon ended."""
        self._check_stop(doing)
        # a new connection that opened within one poll() (the main thread was busy longer than the worker's wait for
        # it) shows no RETRYING: the changed connection number says that the frames in flight were lost all the same
        reconnected = self.link.ready and self.link.connection != self._connection
        if self.link.state is LinkState.RETRYING or reconnected:
            if not self.link.session_lost:
                why = self.link.reason or "the connection was lost (and opened again) with frames in flight"
                raise _Stopped(f"upscaler unavailable while {doing}: {why}", EXIT_UNAVAILABLE)
            if not self._progress_since_reopen:
                raise _Stopped(f"the upscaler daemon ended this demo's session again before a frame came back while "
                               f"{doing}: {self.link.reason}", EXIT_UNAVAILABLE)
            self._reopen(doing)

    def _check_stop(self, doing: str) -> None:
        # the dead spawned daemon first: the link, which then loses its connection too, knows less about why
        if self.should_stop():
            raise _Stopped("interrupted", EXIT_INTERRUPTED)
        gone = self.watch()
        if gone:
            raise _Stopped(f"the spawned upscaler daemon {gone} while {doing}", EXIT_UNAVAILABLE)
        if self.link.state is LinkState.FAILED:
            raise _Stopped(f"the upscaler cannot serve this stream: {self.link.reason}", EXIT_USAGE)

    def _reopen(self, doing: str) -> None:
        """The daemon ended this demo's session although it still answers: the session's lease expired while the
        demo sent nothing (paused by Ctrl-Z, say, for longer than the lease). The link opens a new session on the
        same daemon by itself; the frames lost with the old one are rendered and sent again (the camera's clock is
        fixed, so they come out the same and none is missing from the outputs)."""
        lost = sorted(self._pending.values())
        self._pending.clear()
        instance = self.link.info.instance if self.link.info else None
        while not self.link.ready:
            self._check_stop(doing)
            if not self.link.session_lost:  # the new connection failed: the daemon is gone after all
                raise _Stopped(f"upscaler unavailable while {doing}: {self.link.reason}", EXIT_UNAVAILABLE)
            self.link.poll(WAIT_SLICE)
        if self.link.info is None or self.link.info.instance != instance:  # another model, maybe: not one run
            raise _Stopped(f"the upscaler daemon restarted while {doing}", EXIT_UNAVAILABLE)
        self.reopened += 1
        self._connection = self.link.connection
        self._progress_since_reopen = False
        for index, _, _ in lost:
            slot = self.link.acquire()
            assert slot is not None, "a new session has a free slot for each frame in flight"
            self._submit(slot, index)

    def _submit(self, slot: int, index: int) -> None:
        t = self.cfg.start + index / self.cfg.fps
        start = time.perf_counter()
        self.gpu.render_lr(slot, self.cfg.scene, t)
        self.gpu.read_lr(slot, self.link.input(slot))
        self._pending[slot] = (index, t, (time.perf_counter() - start) * 1e3)
        self.link.submit(slot, index)

    def _finish(self, finished: list[Finished]) -> None:
        for frame in finished:
            self._finish_one(frame)

    def _finish_one(self, frame: Finished) -> None:
        index, t, render_ms = self._pending.pop(frame.slot)
        gpu, cfg = self.gpu, self.cfg
        sr = self.link.output(frame.slot)
        gpu.upload_sr(sr)
        bilinear = gpu.compose("bilinear", lr=frame.slot)
        gpu.render_native(cfg.scene, t)
        native = gpu.native_pixels()
        reference = gpu.reference_pixels(cfg.scene, t)
        shown = {"sr": sr, "bilinear": bilinear, "native": native}.get(cfg.view)
        if shown is None:  # the split view: say which half is which, as the window does
            shown = np.ascontiguousarray(gpu.compose("sr", cfg.compare, 0.5, frame.slot))
            middle = shown.shape[1] // 2
            caption(shown, SR_CAPTION, 8, middle)
            caption(shown, cfg.compare, middle + 8, shown.shape[1])
        record = FrameRecord(index, t, render_ms, frame.round_trip * 1e3, frame.timings.infer_us / 1e3,
                             psnr(sr, reference), psnr(bilinear, reference))
        with self.hold_signals():  # "at once" must not leave a PNG that stats.json does not count
            self.outputs.write(index, shown)
            self.records.append(record)
        self.link.release(frame.slot)
        self.done_times.append(time.perf_counter())
        self._progress_since_reopen = True
        if self._bar is not None:
            if len(self.records) == 1:  # the first frame is back: the warm-up is over
                self._bar.set_postfix_str("", refresh=False)
            self._bar.update(1)


def run_headless(cfg: DemoConfig, link: UpscaleLink, watch: DaemonWatch, should_stop: Callable[[], bool],
                 folder: OutputFolder, started: float, hold_signals: SignalHold = contextlib.nullcontext) -> int:
    """Render ``cfg.frames`` frames into ``folder`` (held by this run); returns the exit status (see
    client_demo.config). ``started``: the demo's time.perf_counter() at start, for stats.json's wall_s;
    ``hold_signals``: a block that an interrupting signal waits for (each frame's files and record)."""
    renderer = scenes.SceneRenderer()  # its own EGL context, released with it
    try:  # before anything in the folder is deleted: an --lr this OpenGL cannot draw, or no EGL, changes nothing
        gpu = GpuFrames(renderer, cfg.lr_size, cfg.scale, lr_targets=PIPELINE_DEPTH, reference=True)
    except scenes.HeadlessContextError as exc:  # no EGL here: one clear line, as window mode gives for no display
        renderer.release()
        print(f"client_demo: {exc}", file=sys.stderr)
        return EXIT_NO_WINDOW
    except FrameSizeError as exc:
        renderer.release()
        print(f"client_demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _render(cfg, link, gpu, watch, should_stop, hold_signals, folder.path, started)
    finally:
        gpu.release()
        renderer.release()


def _render(cfg: DemoConfig, link: UpscaleLink, gpu: GpuFrames, watch: DaemonWatch, should_stop: Callable[[], bool],
            hold_signals: SignalHold, out: pathlib.Path, started: float) -> int:
    outputs = _Outputs(out, cfg.hr_size, cfg.fps)
    run = _HeadlessRun(cfg, gpu, link, outputs, watch, should_stop, hold_signals)
    try:
        run.connect()
    except _Stopped as exc:  # unreachable, refused or interrupted: nothing of an earlier run was touched
        print(f"client_demo: {exc}; nothing in {out} was changed", file=sys.stderr)
        return exc.status
    try:
        # stats.json first: the earlier run's "completed": true must not outlive its frames, whatever ends this run
        _save_stats(out, _stats(cfg, link, run, time.perf_counter() - started, UNFINISHED, None))
        outputs.clear_earlier()
        outputs.make_folder()
    except OSError as exc:  # not writable: before anything is rendered
        print(f"client_demo: cannot write into {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    status, error = EXIT_ERROR, "ended by an unexpected error (see the traceback)"  # unless set below
    daemon: Statistics | None = None  # asked for once every frame is done: a run cut short ends without waiting
    try:
        run.execute()
        status, error = EXIT_OK, None
        daemon = served_statistics(link)
    except _Stopped as exc:
        status, error = exc.status, str(exc)
    except OSError as exc:  # a full disk, a folder removed mid-run: stats.json still says how far it got
        status, error = EXIT_ERROR, f"cannot write the outputs: {exc}"
    except KeyboardInterrupt:  # a second signal: no more frames, but the files written so far are described
        error = INTERRUPTED_AT_ONCE
        raise
    finally:
        try:
            stats, saved = _close_outputs(cfg, link, run, started, error, daemon, out)
        except KeyboardInterrupt:  # the second signal came during this: once more (later ones are only counted)
            stats, saved = _close_outputs(cfg, link, run, started, error, daemon, out)
            _report(out, stats, saved, daemon)
            raise InterruptReported from None
        if error == INTERRUPTED_AT_ONCE:  # how far it got (the "wrote N/M frames" line), before the interrupt goes on
            _report(out, stats, saved, daemon)
            raise InterruptReported from None  # replaces the KeyboardInterrupt under way
    if not saved:
        status = status or EXIT_ERROR
    _report(out, stats, saved, daemon)
    return status


def _close_outputs(cfg: DemoConfig, link: UpscaleLink, run: _HeadlessRun, started: float, error: str | None,
                   daemon: Statistics | None, out: pathlib.Path) -> tuple[dict[str, Any], bool]:
    """Finish the MP4 and write the final stats.json; the stats and whether they could be written."""
    run.outputs.close()
    stats = _stats(cfg, link, run, time.perf_counter() - started, error, daemon)
    return stats, _try_save_stats(out, stats)


def _save_stats(out: pathlib.Path, stats: dict[str, Any]) -> None:
    """Write stats.json whole or not at all: a run killed mid-write must not leave half a file behind."""
    replace_whole(out / STATS_NAME, json.dumps(stats, indent=2) + "\n")


def _try_save_stats(out: pathlib.Path, stats: dict[str, Any]) -> bool:
    try:
        _save_stats(out, stats)
    except OSError as exc:
        print(f"client_demo: cannot write {out / STATS_NAME}: {exc.strerror or exc}", file=sys.stderr)
        return False
    return True


def _stats(cfg: DemoConfig, link: UpscaleLink, run: _HeadlessRun, wall: float, error: str | None,
           daemon: Statistics | None) -> dict[str, Any]:
    records, done = run.records, run.done_times
    # Steady state: from the first finished frame to the last (the first pays the daemon's per-size warm-up).
    fps = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else None
    info = link.info
    psnr_sr = [r.psnr_sr_db for r in records]
    psnr_bilinear = [r.psnr_bilinear_db for r in records]
    return {
        "completed": error is None,
        "error": error,
        "scene": cfg.scene,
        "view": cfg.view,
        "compare": cfg.compare,
        "frames": len(records),
        "frames_requested": cfg.frames,
        "clock_fps": cfg.fps,
        "start_time_s": cfg.start,
        "lr_size": list(cfg.lr_size),
        "hr_size": list(cfg.hr_size),
        "scale": cfg.scale,
        "upscaler": {
            "endpoint": link.endpoint,
            "server": info.server if info else None,
            "model": info.model if info else None,
            "device": info.device if info else None,
            "precision": info.precision if info else None,
            "random_weights": info.random_weights if info else None,
        },
        "wall_s": wall,
        "fps": fps,
        "sessions_reopened": run.reopened,
        "round_trip_ms": _summary(r.round_trip_ms for r in records),
        "infer_ms": _summary(r.infer_ms for r in records),
        "render_ms": _summary(r.render_ms for r in records),
        "psnr_db": {
            "sr_mean": float(np.mean(psnr_sr)) if records else None,
            "bilinear_mean": float(np.mean(psnr_bilinear)) if records else None,
            "sr_minus_bilinear": float(np.mean(psnr_sr) - np.mean(psnr_bilinear)) if records else None,
        },
        "daemon_statistics": None if daemon is None else reply_fields(daemon),
        "outputs": {"frames_dir": FRAMES_DIR, "video": VIDEO_NAME if run.outputs.wrote_video else None},
        "per_frame": [asdict(r) for r in records],
    }


def _summary(values: Any) -> dict[str, float | None]:
    data = list(values)
    return {**percentiles(data), "mean": float(np.mean(data)) if data else None}


def _report(out: pathlib.Path, stats: dict[str, Any], saved: bool, daemon: Statistics | None) -> None:
    rtt, quality = stats["round_trip_ms"], stats["psnr_db"]
    line = f"wrote {stats['frames']}/{stats['frames_requested']} frames to {out}"
    if stats["frames"]:
        fps = f"{stats['fps']:.2f}" if stats["fps"] else "n/a"
        line += (f": {fps} fps, upscale round trip p50 {rtt['p50']:.1f} ms, PSNR vs the supersampled render: "
                 f"SR {quality['sr_mean']:.2f} dB, bilinear {quality['bilinear_mean']:.2f} dB")
    print(line)
    if daemon is not None:
        print(describe_statistics(daemon))
    if stats["error"]:
        said = " (stats.json says completed: false)" if saved else ""  # only if it could be written
        print(f"client_demo: {stats['error']}{said}", file=sys.stderr)

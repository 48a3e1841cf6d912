"""Headless mode: render through EGL (no window), upscale through the daemon, and write what the window would show.

Outputs in the ``--out`` folder: ``frames/NNNNN.png`` (the chosen view at HR), ``demo.mp4`` (the same frames, mp4v)
and ``stats.json`` (sizes, upscaler, fps, round-trip percentiles and, per frame, the PSNR of SR and of bilinear
against the supersampled (aliasing-free) HR render of the same frame). A run that ends early still writes
stats.json, with ``"completed": false`` and the reason.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

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
from client_demo.frames import FrameSizeError, GpuFrames
from client_demo.link import PIPELINE_DEPTH, Finished, LinkState, UpscaleLink
from client_demo.metrics import percentiles, psnr

__all__ = ["DEFAULT_OUT", "FRAMES_DIR", "STATS_NAME", "VIDEO_NAME", "caption", "run_headless"]

DEFAULT_OUT = pathlib.Path("demo_out")
FRAMES_DIR = "frames"
VIDEO_NAME = "demo.mp4"
STATS_NAME = "stats.json"
WAIT_SLICE = 0.1  # s per wait for the upscaler, between checks for Ctrl-C and a dead daemon


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
        self.frames_dir.mkdir(parents=True, exist_ok=True)
        for old_frame in self.frames_dir.glob("[0-9][0-9][0-9][0-9][0-9].png"):  # a longer earlier run's
            old_frame.unlink()
        self.video_path = out / VIDEO_NAME
        self._size, self._fps = size, fps
        self._video: cv2.VideoWriter | None = None  # opened with the first frame: a run that never gets one
        self.video_path.unlink(missing_ok=True)  # leaves no unplayable file (nor an older run's video)

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
                 watch: DaemonWatch, should_stop: Callable[[], bool]) -> None:
        self.cfg, self.gpu, self.link, self.outputs = cfg, gpu, link, outputs
        self.watch, self.should_stop = watch, should_stop
        self.records: list[FrameRecord] = []
        self.done_times: list[float] = []
        self._pending: dict[int, tuple[int, float, float]] = {}  # slot -> (index, t, render_ms)

    def execute(self) -> None:
        self._warm_up()
        while not self.link.ready:
            self._check("connecting")
            self.link.poll(WAIT_SLICE)
        for index in range(self.cfg.frames):
            slot = self.link.acquire()
            while slot is None:  # both slots in flight: finish the older frame while the newer one upscales
                self._finish(self._next_finished())
                slot = self.link.acquire()
            self._submit(slot, index)
        while self.link.in_flight:
            self._finish(self._next_finished())

    def _warm_up(self) -> None:
        """Pay the renderer's one-off costs (textures, shaders, shadow maps) before anything is timed."""
        self.gpu.render_lr(0, self.cfg.scene, self.cfg.start)
        self.gpu.render_native(self.cfg.scene, self.cfg.start)

    def _next_finished(self) -> list[Finished]:
        while True:
            self._check("upscaling")
            finished = self.link.poll(WAIT_SLICE)
            if finished:
                return finished

    def _check(self, doing: str) -> None:
        """Stop on Ctrl-C, a lost upscaler or a dead spawned daemon."""
        if self.should_stop():
            raise _Stopped("interrupted", EXIT_INTERRUPTED)
        if self.link.state is LinkState.FAILED:
            raise _Stopped(f"the upscaler cannot serve this stream: {self.link.reason}", EXIT_USAGE)
        if self.link.state is LinkState.RETRYING:
            raise _Stopped(f"upscaler unavailable while {doing}: {self.link.reason}", EXIT_UNAVAILABLE)
        gone = self.watch()
        if gone:
            raise _Stopped(f"the spawned upscaler daemon {gone} while {doing}", EXIT_UNAVAILABLE)

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
        self.outputs.write(index, shown)
        self.records.append(FrameRecord(index, t, render_ms, frame.round_trip * 1e3, frame.timings.infer_us / 1e3,
                                        psnr(sr, reference), psnr(bilinear, reference)))
        self.link.release(frame.slot)
        self.done_times.append(time.perf_counter())


def run_headless(cfg: DemoConfig, link: UpscaleLink, watch: DaemonWatch, should_stop: Callable[[], bool]) -> int:
    """Render ``cfg.frames`` frames into ``cfg.out``; returns the exit status (see client_demo.config)."""
    out = cfg.out or DEFAULT_OUT
    try:
        outputs = _Outputs(out, cfg.hr_size, cfg.fps)
    except OSError as exc:  # not a folder, or not writable: before anything is rendered
        print(f"client_demo: cannot write into {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    renderer = scenes.SceneRenderer()  # its own EGL context, released with it
    try:
        gpu = GpuFrames(renderer, cfg.lr_size, cfg.scale, lr_targets=PIPELINE_DEPTH)
    except scenes.HeadlessContextError as exc:  # no EGL here: one clear line, as window mode gives for no display
        renderer.release()
        print(f"client_demo: {exc}", file=sys.stderr)
        return EXIT_NO_WINDOW
    except FrameSizeError as exc:
        renderer.release()
        print(f"client_demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    run = _HeadlessRun(cfg, gpu, link, outputs, watch, should_stop)
    started = time.perf_counter()
    status, error = EXIT_OK, None
    try:
        run.execute()
    except _Stopped as exc:
        status, error = exc.status, str(exc)
    except OSError as exc:  # a full disk, a folder removed mid-run: stats.json still says how far it got
        status, error = EXIT_ERROR, f"cannot write the outputs: {exc}"
    finally:
        outputs.close()
        gpu.release()
        renderer.release()
    stats = _stats(cfg, link, run, time.perf_counter() - started, error)
    try:
        (out / STATS_NAME).write_text(json.dumps(stats, indent=2) + "\n")
    except OSError as exc:
        print(f"client_demo: cannot write {out / STATS_NAME}: {exc.strerror or exc}", file=sys.stderr)
        status = status or EXIT_ERROR
    _report(out, stats)
    return status


def _stats(cfg: DemoConfig, link: UpscaleLink, run: _HeadlessRun, wall: float, error: str | None) -> dict[str, Any]:
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
        "round_trip_ms": _summary(r.round_trip_ms for r in records),
        "infer_ms": _summary(r.infer_ms for r in records),
        "render_ms": _summary(r.render_ms for r in records),
        "psnr_db": {
            "sr_mean": float(np.mean(psnr_sr)) if records else None,
            "bilinear_mean": float(np.mean(psnr_bilinear)) if records else None,
            "sr_minus_bilinear": float(np.mean(psnr_sr) - np.mean(psnr_bilinear)) if records else None,
        },
        "outputs": {"frames_dir": FRAMES_DIR, "video": VIDEO_NAME if run.outputs.wrote_video else None},
        "per_frame": [asdict(r) for r in records],
    }


def _summary(values: Any) -> dict[str, float | None]:
    data = list(values)
    return {**percentiles(data), "mean": float(np.mean(data)) if data else None}


def _report(out: pathlib.Path, stats: dict[str, Any]) -> None:
    rtt, quality = stats["round_trip_ms"], stats["psnr_db"]
    line = f"wrote {stats['frames']}/{stats['frames_requested']} frames to {out}"
    if stats["frames"]:
        fps = f"{stats['fps']:.2f}" if stats["fps"] else "n/a"
        line += (f": {fps} fps, upscale round trip p50 {rtt['p50']:.1f} ms, PSNR vs the supersampled render: "
                 f"SR {quality['sr_mean']:.2f} dB, bilinear {quality['bilinear_mean']:.2f} dB")
    print(line)
    if stats["error"]:
        print(f"client_demo: {stats['error']} (stats.json says completed: false)", file=sys.stderr)

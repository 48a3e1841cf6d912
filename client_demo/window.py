"""Window mode: a glfw window whose OpenGL context renders the scene, shows the upscaled frames and the HUD.

Order matters: the glfw window (GLX) is created before any OpenGL context of our own, and the scene renderer borrows
the window's context (an EGL context created first crashes Mesa; docs/scenes.md). The loop never waits on the
daemon for longer than the rest of its frame budget: the link's worker thread does the waiting, and while the
upscaler is unavailable the window shows bilinear scaling with a message.
"""

from __future__ import annotations

from imgui_bundle import imgui  # before glfw: it points the glfw package at imgui-bundle's libglfw (one per process)

# isort: split
import ctypes
import math
import pathlib
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import glfw
import moderngl
import numpy as np

import scenes
from client_demo.config import (
    EXIT_INTERRUPTED,
    EXIT_NO_WINDOW,
    EXIT_OK,
    EXIT_USAGE,
    SR_CAPTION,
    DaemonWatch,
    DemoConfig,
)
from client_demo.controls import LOOK_SPEED, MOUSE_LOOK, CameraRig, ViewState
from client_demo.daemon_stats import describe_statistics, served_statistics
from client_demo.frames import FrameSizeError, GpuFrames, letterbox, read_rgb
from client_demo.hud import Hud, HudInfo
from client_demo.link import PIPELINE_DEPTH, Finished, LinkState, UpscaleLink, first_reply_limit
from client_demo.metrics import RollingWindow

__all__ = ["run_window", "window_size"]

SHOWN = PIPELINE_DEPTH  # LR target holding the LR of the upscaled frame on screen (its slot is reused meanwhile)
LIVE = PIPELINE_DEPTH + 1  # LR target rendered when no slot is free but the view needs a current LR frame
DIVIDER_GRAB = 6.0  # px either side of the split divider that start dragging it
MAX_DT = 0.1  # s: a longer frame (start-up, a stall) advances the camera path by no more than this
STALL = 2.0  # s without an upscaled frame (at least) before the window shows bilinear and says it is waiting
MIN_WINDOW_WIDTH = 1280  # the window opens at least this wide (the picture is scaled to fit, aspect kept)
MIN_WINDOW_SIDE = 320  # nor narrower or lower than this, whatever its shape (the ~370 px HUD may cover it: H hides it)
_MOVE_KEYS = {imgui.Key.w: (1, 0, 0), imgui.Key.s: (-1, 0, 0), imgui.Key.d: (0, 1, 0), imgui.Key.a: (0, -1, 0),
              imgui.Key.e: (0, 0, 1), imgui.Key.q: (0, 0, -1)}
_LOOK_KEYS = {imgui.Key.left_arrow: (1, 0), imgui.Key.right_arrow: (-1, 0), imgui.Key.up_arrow: (0, 1),
              imgui.Key.down_arrow: (0, -1)}


@dataclass(frozen=True)
class _Pose:
    """What a submitted frame shows, so the views of that frame can be rebuilt when it comes back."""

    preset: str
    t: float
    camera: scenes.Camera


class _WindowDemo:
    def __init__(self, cfg: DemoConfig, window: glfw._GLFWwindow, ctx: moderngl.Context, link: UpscaleLink,
                 watch: DaemonWatch) -> None:
        self.cfg, self.window, self.ctx, self.link, self.watch = cfg, window, ctx, link, watch
        self.renderer = scenes.SceneRenderer(ctx)
        try:
            self.gpu = GpuFrames(self.renderer, cfg.lr_size, cfg.scale, lr_targets=PIPELINE_DEPTH + 2)
        except FrameSizeError:
            self.renderer.release()
            raise
        self.hud = Hud(ctypes.cast(window, ctypes.c_void_p).value or 0)
        self.rig = CameraRig(cfg.scene, t=cfg.start)
        self.ui = ViewState(view=cfg.view, compare=cfg.compare)
        self.frames = self.upscaled = 0
        self._pending: dict[int, _Pose] = {}  # slot -> pose of the frame in flight there
        self._shown: _Pose | None = None  # pose of the upscaled frame on screen
        self._native_of: _Pose | None = None  # pose the native target was last rendered for
        self._live = LIVE
        self._sr_ok = False  # upscaled frames can be shown this frame (see _frame)
        self._why_not_sr = ""  # the status when _sr_ok was decided: the banner's reason when it is False
        self._titled = cfg.scene  # the preset the window's title names
        self._drag: str | None = None  # "divider" or "look" while the left button is held
        self._drawing_s = 0.0  # recent time from the link's poll to the swap (compose, HUD, swap): see _frame
        self._viewport = (0, 0, *cfg.hr_size)
        self._times = {name: RollingWindow() for name in ("frame", "render", "round_trip", "infer")}

    def close(self) -> None:
        self.hud.close()
        self.gpu.release()
        self.renderer.release()

    def run(self, should_stop: Callable[[], bool]) -> int:
        began = last = time.perf_counter()
        while not (glfw.window_should_close(self.window) or should_stop()):
            start = time.perf_counter()
            deadline = start + 1.0 / self.cfg.max_fps
            if self.frames > 1:  # start - last is the previous frame's time; frame 0's is the renderer's start-up
                self._times["frame"].add(start, (start - last) * 1e3)
                self.hud.frame_ms.append((start - last) * 1e3)
            elif self.frames == 1:
                began = start
            self._frame(min(start - last, MAX_DT), deadline)
            last = start
            self.frames += 1
            if self.cfg.exit_after is not None and self.frames >= self.cfg.exit_after:
                break
            time.sleep(max(0.0, deadline - time.perf_counter()))
        interrupted = should_stop()
        self._summary(time.perf_counter() - began, ask_daemon=not interrupted)
        return EXIT_INTERRUPTED if interrupted else EXIT_OK

    def _summary(self, seconds: float, ask_daemon: bool) -> None:
        """The run's counts; the daemon's too, unless a signal stopped the run (which then ends without waiting) or
        the spawned daemon is gone, which is said: the window went on without it, and the summary said nothing."""
        rtt = float(np.median(self.hud.round_trip_ms)) if self.hud.round_trip_ms else None
        rate = f" in {seconds:.1f} s ({(self.frames - 1) / seconds:.1f} fps)" if seconds > 0 and self.frames > 1 else ""
        print(f"client_demo: {self.frames} frames shown{rate}, {self.upscaled} upscaled"
              + (f" (round trip p50 {rtt:.1f} ms)" if rtt is not None else ""))
        gone = self.watch()
        if gone:
            print(f"client_demo: the spawned upscaler daemon {gone} during the run: the frames after that were "
                  "shown without upscaling", file=sys.stderr)
        elif self.upscaled == 0 and self.frames > 0:  # "0 upscaled" alone: the banner's reason went with the window
            status, detail, _ = self._status()
            print(f"client_demo: no frame was upscaled; the upscaler's state at the end: {status}"
                  + (f" ({detail})" if detail else ""), file=sys.stderr)
        daemon = served_statistics(self.link) if ask_daemon and not gone else None
        if daemon is not None:
            print(f"client_demo: {describe_statistics(daemon)}")

    def _frame(self, dt: float, deadline: float) -> None:
        glfw.poll_events()
        if self._minimised():  # nothing to draw or click
            self._show(self.link.poll(max(0.0, deadline - time.perf_counter())))  # frames in flight still come back
            return
        self.hud.new_frame()
        shot = self._input(dt)
        self.rig.advance(dt)
        pose = _Pose(self.rig.preset, self.rig.t, self.rig.pose())
        if pose.preset != self._titled:
            glfw.set_window_title(self.window, f"TAKDSR upscaler demo - {pose.preset}")
            self._titled = pose.preset
        # frames that came back while the last frame drew or slept: their slots are free for this frame's LR
        self._show(self.link.poll())
        # decided once a frame: what is rendered and what is drawn must agree, and the banner says why at that time
        self._sr_ok = self._sr_available()
        self._why_not_sr = "" if self._sr_ok else self._status()[0]
        self._feed(pose)
        self._show(self.link.poll(poll_timeout(deadline, time.perf_counter(), self._drawing_s)))
        drawing_from = time.perf_counter()
        self._compose(pose)
        self._overlay()
        if self.ui.show_hud:
            shot = self.hud.draw(self._info(), self.ui, self.rig) or shot
        self.hud.render()
        if shot or self.frames + 1 == self.cfg.screenshot_after:
            self._screenshot()
        glfw.swap_buffers(self.window)
        self._drawing_s = smoothed(self._drawing_s, time.perf_counter() - drawing_from)

    def _minimised(self) -> bool:
        """Iconified (X11 keeps the framebuffer's size then, so a minimised demo rendered and upscaled on), or a
        framebuffer of 0x0 (other platforms)."""
        return bool(glfw.get_window_attrib(self.window, glfw.ICONIFIED)) or 0 in glfw.get_framebuffer_size(self.window)

    # --- input ---------------------------------------------------------------------------------------------------

    def _input(self, dt: float) -> bool:
        """Keys and mouse (unless the HUD has them); returns True when a screenshot was asked for."""
        io = imgui.get_io()
        shot = imgui.is_key_pressed(imgui.Key.f12, False)
        # an open popup (the view or scene list) takes the keys: Esc closes it rather than quitting the demo
        if io.want_capture_keyboard or imgui.is_popup_open("", imgui.PopupFlags_.any_popup_id):
            return shot
        actions = {imgui.Key.escape: lambda: glfw.set_window_should_close(self.window, True),
                   imgui.Key.v: self.ui.cycle_view, imgui.Key.c: self.ui.toggle_compare,
                   imgui.Key.p: self.rig.toggle_pause, imgui.Key.r: self.rig.back_to_path,
                   imgui.Key.h: self.ui.toggle_hud}
        for key, action in actions.items():
            if imgui.is_key_pressed(key, False):
                action()
        self.rig.move(*_held(_MOVE_KEYS, 3), dt=dt, fast=imgui.is_key_down(imgui.Key.left_shift))
        yaw, pitch = _held(_LOOK_KEYS, 2)
        self.rig.look(yaw * LOOK_SPEED * dt, pitch * LOOK_SPEED * dt)
        self._mouse(io)
        return shot

    def _mouse(self, io: imgui.IO) -> None:
        if not imgui.is_mouse_down(imgui.MouseButton_.left):
            self._drag = None
            return
        x, _, w, _ = self._viewport_in_window()
        if w <= 0:  # no picture to point at
            return
        if self._drag is None:
            if io.want_capture_mouse:
                return
            near = self.ui.view == "split" and abs(io.mouse_pos.x - (x + self.ui.split * w)) < DIVIDER_GRAB
            self._drag = "divider" if near else "look"
        if self._drag == "divider":
            self.ui.split = min(1.0, max(0.0, (io.mouse_pos.x - x) / w))
        else:
            self.rig.look(-io.mouse_delta.x * MOUSE_LOOK, -io.mouse_delta.y * MOUSE_LOOK)

    def _viewport_in_window(self) -> tuple[float, float, float, float]:
        """The picture's viewport in window coordinates (top-left origin), which imgui's mouse uses."""
        fb_w, fb_h = glfw.get_framebuffer_size(self.window)
        win_w, win_h = glfw.get_window_size(self.window)
        sx, sy = win_w / max(fb_w, 1), win_h / max(fb_h, 1)
        x, y, w, h = self._viewport
        return x * sx, (fb_h - y - h) * sy, w * sx, h * sy

    # --- frames --------------------------------------------------------------------------------------------------

    def _sr_available(self) -> bool:
        return self.link.ready and self._shown is not None and not self.watch() and not self._stalled()

    def _stalled(self) -> bool:
        """No upscaled frame for longer than STALL, and than three of the recent round trips (a slow CPU daemon is
        not stalled): the scene then goes on moving in bilinear instead of freezing on the last upscaled frame."""
        typical = float(np.median(self.hud.round_trip_ms)) / 1e3 if self.hud.round_trip_ms else 0.0
        return self.link.waiting() > max(STALL, 3 * typical)

    def _feed(self, pose: _Pose) -> None:
        """Render this frame's LR into a free slot and submit it; else render it for the views that need it. The
        bilinear and native views show no SR, and submit nothing: a daemon on the same CPU took its time from the
        renderer for frames nobody saw."""
        if not self.link.ready:  # frames in flight are lost; a stale SR frame must not reappear on reconnection
            self._pending.clear()
            self._shown = None
        slot = None if self.ui.view in ("bilinear", "native") else self.link.acquire()
        if slot is None:
            if self.ui.view == "bilinear" or (self.ui.view != "native" and not self._sr_ok):
                self.gpu.render_lr(LIVE, pose.preset, pose.t, pose.camera)
                self._live = LIVE
            return
        start = time.perf_counter()
        self.gpu.render_lr(slot, pose.preset, pose.t, pose.camera)
        self.gpu.read_lr(slot, self.link.input(slot))
        self._times["render"].add(start, (time.perf_counter() - start) * 1e3)
        self.link.submit(slot, self.frames)
        self._pending[slot], self._live = pose, slot

    def _show(self, finished: list[Finished]) -> None:
        """Put the newest finished frame on screen (its SR, and its LR for the split view); free every slot."""
        now = time.perf_counter()
        for frame in finished:
            pose = self._pending.pop(frame.slot, None)
            if frame is finished[-1] and pose is not None:
                self.gpu.copy_lr(frame.slot, SHOWN)
                self.gpu.upload_sr(self.link.output(frame.slot))
                self._shown = pose
            self.link.release(frame.slot)
            self.upscaled += 1
            self._times["round_trip"].add(now, frame.round_trip * 1e3)
            self._times["infer"].add(now, frame.timings.infer_us / 1e3)
            self.hud.round_trip_ms.append(frame.round_trip * 1e3)

    def _compose(self, pose: _Pose) -> None:
        fb_w, fb_h = glfw.get_framebuffer_size(self.window)
        screen = self.ctx.screen
        screen.use()
        screen.viewport = (0, 0, fb_w, fb_h)
        screen.clear(0.0, 0.0, 0.0, 1.0)
        self._viewport = vp = letterbox(fb_w, fb_h, *self.cfg.hr_size)
        view = self.ui.view
        if view == "native":
            self._render_native(pose)
            self.gpu.draw(screen, vp, "native")
        elif view == "bilinear" or not self._sr_ok:
            self.gpu.draw(screen, vp, "bilinear", lr=self._live)
        elif view == "sr":
            self.gpu.draw(screen, vp, "sr")
        else:
            if self.ui.compare == "native" and self._shown is not None:
                self._render_native(self._shown)
            self.gpu.draw(screen, vp, "sr", self.ui.compare, self.ui.split, lr=SHOWN)

    def _render_native(self, pose: _Pose) -> None:
        if pose != self._native_of:  # a paused or unchanged frame is not rendered again
            self.gpu.render_native(pose.preset, pose.t, pose.camera)
            self._native_of = pose

    def _overlay(self) -> None:
        """Captions of the split halves, or a banner when upscaled frames cannot be shown."""
        if self.ui.view in ("sr", "split") and not self._sr_ok:
            # a daemon known to be gone says so, rather than "waiting" until the link's timeout notices it
            stalled = self.link.ready and self._stalled() and not self.watch()
            self.hud.banner((self._waiting_for() if stalled else self._why_not_sr) + " - showing bilinear")
            return
        if self.ui.view == "split":  # captions at the bottom, clear of the HUD, each kept inside its half
            x, y, w, h = self._viewport_in_window()
            divider = self.ui.split * w
            if divider > self.hud.text_width(SR_CAPTION) + 24:
                self.hud.label(x + 8, y + h - 24, SR_CAPTION)
            if w - divider > self.hud.text_width(self.ui.compare) + 24:
                self.hud.label(x + divider + 8, y + h - 24, self.ui.compare)

    def _waiting_for(self) -> str:
        """The banner's words for overdue frames. A connection's first frame waits behind the daemon's warm-up of
        its size (auto's measuring, compile's compilation: tens of seconds on a CPU), which is not a stall."""
        waited = self.link.waiting()
        if self._shown is None:
            return f"waiting for the upscaler's first frame: {waited:.0f} s (the daemon prepares this size)"
        return f"waiting for the upscaler: no frame for {waited:.0f} s"

    # --- HUD -----------------------------------------------------------------------------------------------------

    def _status(self) -> tuple[str, str, bool]:
        """(short status, detail, healthy) of the upscaler."""
        gone, link = self.watch(), self.link
        if gone:
            return "upscaler daemon stopped", f"the spawned daemon {gone}", False
        if link.state is LinkState.READY and self._stalled() and self._shown is None:  # the daemon's warm-up
            return (f"connected - waiting for the first frame ({link.waiting():.0f} s)",
                    f"a new size is prepared first; given up after {first_reply_limit(self.cfg.timeout):.0f} s", True)
        if link.state is LinkState.READY and self._stalled():  # as the banner says: frames are overdue
            return f"connected - no frame for {link.waiting():.0f} s", "the daemon may be stalled or overloaded", False
        if link.state is LinkState.READY:
            return ("connected" if self._shown else "connected - waiting for the first frame"), "", True
        if link.state is LinkState.CONNECTING:
            return "connecting to the upscaler...", "", False
        if link.state is LinkState.FAILED:
            return "upscaler refused the stream", link.reason, False
        wait = link.retry_at - time.monotonic()
        if wait <= 0:  # the attempt is under way (a hello waits up to its timeout)
            return "upscaler unavailable - reconnecting...", link.reason, False
        return f"upscaler unavailable - retrying in {math.ceil(wait)} s", link.reason, False

    def _info(self) -> HudInfo:
        now, times, info = time.perf_counter(), self._times, self.link.info
        status, detail, ok = self._status()
        model = f"{info.model} x{info.scale} ({info.device}, {info.precision})" if info else "-"
        return HudInfo(fps=times["frame"].count(now), upscaled_fps=times["round_trip"].count(now),
                       render_ms=times["render"].median(now), round_trip_ms=times["round_trip"].median(now),
                       infer_ms=times["infer"].median(now), model=model,
                       random_weights=bool(info and info.random_weights), lr_size=self.cfg.lr_size,
                       hr_size=self.cfg.hr_size, status=status, detail=detail, status_ok=ok)

    def _screenshot(self) -> None:
        """PNG of the whole window as shown (picture and HUD) into --out or the current folder."""
        fb_w, fb_h = glfw.get_framebuffer_size(self.window)
        self.ctx.screen.viewport = (0, 0, fb_w, fb_h)
        pixels = read_rgb(self.ctx.screen)
        folder = self.cfg.out or pathlib.Path.cwd()
        path = folder / f"takdsr-demo-{time.strftime('%Y%m%d-%H%M%S')}-{self.frames:05d}.png"
        try:  # a screenshot that cannot be written is reported; the demo goes on
            folder.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(path), pixels[..., ::-1]):
                raise OSError("OpenCV could not write it")
        except (OSError, cv2.error) as exc:
            print(f"client_demo: no screenshot: cannot write {path}: {exc}", file=sys.stderr)
            return
        print(f"client_demo: screenshot {path}")


def _held(keys: dict[imgui.Key, tuple[int, ...]], size: int) -> list[int]:
    """Sum of the direction vectors of the keys held down."""
    total = [0] * size
    for key, vector in keys.items():
        if imgui.is_key_down(key):
            total = [a + b for a, b in zip(total, vector, strict=True)]
    return total


def poll_timeout(deadline: float, now: float, drawing_s: float) -> float:
    """How long a frame may wait for an upscaled frame: the rest of its budget less what drawing takes after the
    wait. Waiting to the deadline put the drawing on top of the budget: 11 fps at --max-fps 15 while no upscaled
    frame came back (daemon gone, refused or slow)."""
    return max(0.0, deadline - now - drawing_s)


def smoothed(previous: float, sample: float, weight: float = 0.2) -> float:
    """An exponential moving average of ``sample``s (the first one taken whole): steady, yet it follows a resize."""
    return sample if previous == 0.0 else previous + weight * (sample - previous)


def window_size(hr_size: tuple[int, int], screen: tuple[int, int] | None) -> tuple[int, int]:
    """The HR picture magnified by a whole factor until it is at least MIN_WINDOW_WIDTH wide, as far as the screen
    allows: a small HR size (the CPU default, 640x360) would leave the HUD covering most of the picture. A picture
    larger than the screen gets the largest window of its shape that fits (it is letterboxed into the window), and
    no side is below MIN_WINDOW_SIDE, so a thin picture still leaves room for the HUD."""
    width, height = hr_size
    factor = -(-MIN_WINDOW_WIDTH // width)
    if screen is None:
        size = (width * factor, height * factor)
    elif min(factor, screen[0] // width, screen[1] // height) >= 1:
        fit = min(factor, screen[0] // width, screen[1] // height)
        size = (width * fit, height * fit)
    else:
        shrink = min(screen[0] / width, screen[1] / height)
        size = (int(width * shrink), int(height * shrink))
    width, height = (max(side, MIN_WINDOW_SIDE) for side in size)
    return (width, height) if screen is None else (min(width, screen[0]), min(height, screen[1]))


def _screen_size() -> tuple[int, int] | None:
    monitor = glfw.get_primary_monitor()
    mode = glfw.get_video_mode(monitor) if monitor else None
    return (mode.size.width, mode.size.height) if mode else None


NO_WINDOW_MESSAGE = ("client_demo: cannot open an OpenGL 3.3 window (no display reachable through DISPLAY or "
                     "WAYLAND_DISPLAY?); use --headless without a display")


def display_problem() -> str | None:
    """Why glfw cannot reach a display (its own words), or None when it can. Checked before a daemon is spawned,
    which takes seconds to start and was stopped again at once when no window could open."""
    with warnings.catch_warnings():  # glfw's error callback warns; the reason goes into our one message instead
        warnings.simplefilter("ignore", glfw.GLFWError)
        if glfw.init():
            glfw.terminate()
            return None
        _, description = glfw.get_error()
    return description.decode(errors="replace") if description else "glfw could not initialise"


def _open_window(cfg: DemoConfig) -> glfw._GLFWwindow | None:
    if not glfw.init():
        return None
    glfw.window_hint(glfw.CONTEXT_VERSION_MAJOR, 3)
    glfw.window_hint(glfw.CONTEXT_VERSION_MINOR, 3)
    glfw.window_hint(glfw.OPENGL_PROFILE, glfw.OPENGL_CORE_PROFILE)
    glfw.window_hint(glfw.OPENGL_FORWARD_COMPAT, True)
    size = window_size(cfg.hr_size, _screen_size())
    window = glfw.create_window(*size, f"TAKDSR upscaler demo - {cfg.scene}", None, None)
    if not window:
        glfw.terminate()
        return None
    # below a few hundred pixels ImGui pushes the HUD off the window and never brings it back when it grows again
    glfw.set_window_size_limits(window, MIN_WINDOW_SIDE, MIN_WINDOW_SIDE, glfw.DONT_CARE, glfw.DONT_CARE)
    glfw.make_context_current(window)
    glfw.swap_interval(0)  # the loop paces itself (--max-fps); vsync would add waits we do not measure
    return window


def run_window(cfg: DemoConfig, link: UpscaleLink, watch: DaemonWatch, should_stop: Callable[[], bool]) -> int:
    """Open the window and run until Esc, closing it, --exit-after or a signal; returns the exit status."""
    window = _open_window(cfg)
    if window is None:
        print(NO_WINDOW_MESSAGE, file=sys.stderr)
        return EXIT_NO_WINDOW
    try:
        try:
            demo = _WindowDemo(cfg, window, moderngl.create_context(), link, watch)
        except FrameSizeError as exc:
            print(f"client_demo: {exc}", file=sys.stderr)
            return EXIT_USAGE
        try:
            return demo.run(should_stop)
        finally:
            demo.close()
    finally:
        glfw.destroy_window(window)
        glfw.terminate()

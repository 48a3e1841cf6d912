"""The window's HUD and controls, built with Dear ImGui (imgui-bundle) and an ImPlot frame-time graph.

imgui-bundle's C++ GLFW and OpenGL3 backends draw into whatever framebuffer is bound and restore the GL state they
change, so they run beside moderngl on the same context. They need the same libglfw as the ``glfw`` package, which
imgui-bundle arranges when it is imported first (see window.py).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from imgui_bundle import ImVec2, ImVec4, imgui, implot

import scenes
from client_demo.controls import VIEWS, CameraRig, ViewState

__all__ = ["Hud", "HudInfo", "banner_top"]

HISTORY = 240  # frames in the frame-time graph
_BANNER_PAD_X, _BANNER_PAD_Y = 12, 8  # px of the banner's dark box around its text
_WRAP = 360  # px from the HUD's left edge where long lines wrap: about the width of its other lines
_GOOD = ImVec4(0.45, 0.9, 0.45, 1.0)
_BAD = ImVec4(1.0, 0.45, 0.35, 1.0)
_KEYS = (
    "WASD move, Q/E down/up, Shift faster",
    "arrows or left-drag: look (drag the divider to move it)",
    "V view   C split: bilinear/native   P pause",
    "R back to the camera path   H hide HUD",
    "F12 screenshot   Esc quit",
)


@dataclass
class HudInfo:
    """Numbers and words the HUD shows this frame."""

    fps: float  # window frames in the last second
    upscaled_fps: float  # upscaled frames received in the last second
    render_ms: float | None  # LR render + read-back, p50 over the last second
    round_trip_ms: float | None  # upscale round trip, p50 over the last second
    infer_ms: float | None  # the daemon's network time, p50 over the last second
    model: str  # e.g. "rlfn x2 (cpu, fp32)"
    random_weights: bool
    lr_size: tuple[int, int]
    hr_size: tuple[int, int]
    status: str  # one line on the upscaler's state
    detail: str  # why, when something is wrong (may be long)
    status_ok: bool


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


class Hud:
    """Dear ImGui context, backends and the HUD window; call new_frame, draw, render once per frame."""

    def __init__(self, window_address: int) -> None:
        imgui.create_context()
        implot.create_context()
        imgui.get_io().set_ini_filename(None)  # a demo should not leave imgui.ini in the user's folder
        imgui.style_colors_dark()
        imgui.backends.glfw_init_for_opengl(window_address, True)
        imgui.backends.opengl3_init("#version 330")
        self.frame_ms: collections.deque[float] = collections.deque(maxlen=HISTORY)
        self.round_trip_ms: collections.deque[float] = collections.deque(maxlen=HISTORY)
        # (left, top, right, bottom) of the HUD window in this frame and the last (None: not drawn, it is hidden)
        self._hud_rect: tuple[float, float, float, float] | None = None
        self._last_hud_rect: tuple[float, float, float, float] | None = None

    def new_frame(self) -> None:
        # the banner is drawn before the HUD each frame: it keeps clear of where the HUD was in the last one
        self._last_hud_rect, self._hud_rect = self._hud_rect, None
        imgui.backends.opengl3_new_frame()
        imgui.backends.glfw_new_frame()
        imgui.new_frame()

    def draw(self, info: HudInfo, ui: ViewState, rig: CameraRig) -> bool:
        """The HUD window; returns True when its screenshot button was pressed."""
        imgui.set_next_window_pos(ImVec2(8, 8), imgui.Cond_.first_use_ever)
        imgui.set_next_window_bg_alpha(0.75)
        imgui.begin("TAKDSR upscaler", None, imgui.WindowFlags_.always_auto_resize)
        _keep_title_bar_inside()
        self._numbers(info)
        self._controls(ui, rig)
        self._graph()
        shot = imgui.button("Screenshot (F12)")
        if imgui.collapsing_header("Keys"):
            for line in _KEYS:
                imgui.text(line)
        pos, size = imgui.get_window_pos(), imgui.get_window_size()
        self._hud_rect = (pos.x, pos.y, pos.x + size.x, pos.y + size.y)
        imgui.end()
        return shot

    def _numbers(self, info: HudInfo) -> None:
        imgui.text_colored(_GOOD if info.status_ok else _BAD, info.status)
        if info.detail:
            imgui.push_text_wrap_pos(_WRAP)
            imgui.text_wrapped(info.detail)
            imgui.pop_text_wrap_pos()
        imgui.text(f"{info.fps:5.1f} fps   upscaled {info.upscaled_fps:5.1f} fps")
        imgui.text(f"render {_ms(info.render_ms)}   upscale round trip p50 {_ms(info.round_trip_ms)}")
        imgui.text(f"inference {_ms(info.infer_ms)}")
        # wrapped: one line, "model rlfn student 52ch x1 block (student_native) x2 (cpu, fp32)", made the HUD about
        # 600 px wide, over half of the split view's SR half and past the edge of a small window
        imgui.push_text_wrap_pos(_WRAP)
        imgui.text_wrapped(f"model {info.model}")
        imgui.pop_text_wrap_pos()
        if info.random_weights:
            imgui.text_colored(_BAD, "random weights: the upscaled image is noise")
        (lw, lh), (hw, hh) = info.lr_size, info.hr_size
        imgui.text(f"LR {lw}x{lh} -> HR {hw}x{hh}")

    def _controls(self, ui: ViewState, rig: CameraRig) -> None:
        ui.view = _choice("view", VIEWS, ui.view)
        if ui.view == "split":
            if imgui.radio_button("SR | bilinear", ui.compare == "bilinear"):
                ui.compare = "bilinear"
            imgui.same_line()
            if imgui.radio_button("SR | native", ui.compare == "native"):
                ui.compare = "native"
        preset = _choice("scene", scenes.PRESETS, rig.preset)
        if preset != rig.preset:
            rig.set_preset(preset)
        _, rig.paused = imgui.checkbox("pause (P)", rig.paused)
        imgui.same_line()
        imgui.text("camera: free" if rig.free is not None else f"camera: path t={rig.t:.1f} s")

    def _graph(self) -> None:
        if not self.frame_ms:
            return
        flags = implot.Flags_.no_menus | implot.Flags_.no_box_select | implot.Flags_.no_mouse_text
        if implot.begin_plot("##frame times", ImVec2(320, 110), flags):
            implot.setup_axes("", "ms", implot.AxisFlags_.no_tick_labels, implot.AxisFlags_.auto_fit)
            implot.setup_axis_limits(implot.ImAxis_.x1, 0, HISTORY, implot.Cond_.always)
            implot.plot_line("frame", np.asarray(self.frame_ms, np.float32))
            if self.round_trip_ms:
                implot.plot_line("upscale round trip", np.asarray(self.round_trip_ms, np.float32))
            implot.end_plot()

    def banner(self, text: str) -> None:
        """A message across the middle of the window (e.g. the upscaler is unavailable), below the HUD when the HUD
        reaches the middle."""
        size = imgui.get_io().display_size
        text_size = imgui.calc_text_size(text)
        x = (size.x - text_size.x) / 2
        y = banner_top(size.y, (x - _BANNER_PAD_X, x + text_size.x + _BANNER_PAD_X), text_size.y, self._last_hud_rect)
        pos = ImVec2(x, y)
        draw = imgui.get_foreground_draw_list()
        draw.add_rect_filled(ImVec2(x - _BANNER_PAD_X, y - _BANNER_PAD_Y),
                             ImVec2(x + text_size.x + _BANNER_PAD_X, y + text_size.y + _BANNER_PAD_Y),
                             imgui.get_color_u32(ImVec4(0.0, 0.0, 0.0, 0.7)))
        draw.add_text(pos, imgui.get_color_u32(_BAD), text)

    def text_width(self, text: str) -> float:
        """Width in pixels of ``text`` in the HUD's font (to keep a caption inside the half it names)."""
        return float(imgui.calc_text_size(text).x)

    def label(self, x: float, y: float, text: str) -> None:
        """A small caption at window position (x, y), e.g. naming each half of the split view."""
        draw = imgui.get_foreground_draw_list()
        size = imgui.calc_text_size(text)
        draw.add_rect_filled(ImVec2(x - 4, y - 2), ImVec2(x + size.x + 4, y + size.y + 2),
                             imgui.get_color_u32(ImVec4(0.0, 0.0, 0.0, 0.6)))
        draw.add_text(ImVec2(x, y), imgui.get_color_u32(ImVec4(1.0, 1.0, 1.0, 1.0)), text)

    def render(self) -> None:
        imgui.render()
        imgui.backends.opengl3_render_draw_data(imgui.get_draw_data())

    def close(self) -> None:
        imgui.backends.opengl3_shutdown()
        imgui.backends.glfw_shutdown()
        implot.destroy_context()
        imgui.destroy_context()


def _choice(label: str, items: Sequence[str], current: str) -> str:
    """A drop-down list of ``items``; the one picked, else ``current``. Esc closes the open list: Dear ImGui closes a
    popup on Esc only with keyboard navigation on, which would take the movement keys from the demo whenever the
    HUD has focus. The window ignores keys while a list is open, so that Esc does not quit the demo as well."""
    chosen = current
    if imgui.begin_combo(label, current):
        if imgui.is_key_pressed(imgui.Key.escape, False):
            imgui.close_current_popup()
        for item in items:
            if imgui.selectable(item, item == current)[0]:
                chosen = item
        imgui.end_combo()
    return chosen


def banner_top(window_height: float, span: tuple[float, float], text_height: float,
               hud: tuple[float, float, float, float] | None) -> float:
    """The top of the banner's text: the window's middle, or just below the HUD (``hud``: left, top, right, bottom)
    when the banner's box (``span``: its left and right, _BANNER_PAD_Y above and below the text) would cover it there
    and the window has room below it. A centred banner covered the HUD's bottom rows (its "Keys" header)."""
    middle = window_height / 2 - text_height / 2
    if hud is None:
        return middle
    left, top, right, bottom = hud
    pad = _BANNER_PAD_Y
    covers = span[0] < right and span[1] > left and middle - pad < bottom and middle + text_height + pad > top
    below = bottom + 2 * pad  # the box's top edge clear of the HUD by pad
    return below if covers and below + text_height + pad <= window_height else middle


def _keep_title_bar_inside() -> None:
    """ImGui pushes the HUD to negative positions while the window is a few pixels small and leaves it there when the
    window grows again, its title bar (the handle to drag it by) off screen. Call between begin() and end()."""
    pos = imgui.get_window_pos()
    if pos.x < 0 or pos.y < 0:
        imgui.set_window_pos(ImVec2(max(pos.x, 0.0), max(pos.y, 0.0)))

"""Window-mode state that input changes: the camera rig (the preset's path or a free fly camera) and the view
settings. Pure Python: the keys and mouse are read by the window module, which calls these."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import scenes

__all__ = ["VIEWS", "CameraRig", "ViewState"]

VIEWS = ("split", "sr", "bilinear", "native")
MOVE_SPEED = 4.0  # m/s; the presets are tens of metres across
FAST_FACTOR = 4.0  # with Shift
LOOK_SPEED = 1.5  # rad/s with the arrow keys
MOUSE_LOOK = 0.004  # rad per pixel of mouse drag
PITCH_LIMIT = 1.45  # rad: stop short of straight up or down, where yaw degenerates


@dataclass
class ViewState:
    """What the window shows; changed by keys and by the HUD."""

    view: str = "split"
    compare: str = "bilinear"  # the right half of the split view: "bilinear" or "native"
    split: float = 0.5  # divider position, 0..1 of the picture's width
    show_hud: bool = True

    def cycle_view(self) -> None:
        self.view = VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)]

    def toggle_compare(self) -> None:
        self.compare = "native" if self.compare == "bilinear" else "bilinear"

    def toggle_hud(self) -> None:
        self.show_hud = not self.show_hud


@dataclass
class CameraRig:
    """The preset's looping camera path at time ``t`` until the user moves; then a free camera from that pose."""

    preset: str
    t: float = 0.0
    paused: bool = False
    free: scenes.Camera | None = None

    def advance(self, dt: float) -> None:
        """Move along the path (the path's time stops while paused)."""
        if not self.paused:
            self.t += dt

    def toggle_pause(self) -> None:
        self.paused = not self.paused

    def pose(self) -> scenes.Camera:
        return self.free if self.free is not None else scenes.camera_at(self.preset, self.t)

    def back_to_path(self) -> None:
        self.free = None

    def set_preset(self, preset: str) -> None:
        self.preset, self.free = preset, None

    def move(self, forward: float, right: float, up: float, dt: float, fast: bool = False) -> None:
        """Fly by (forward, right, up) in units of MOVE_SPEED * dt, relative to the view's heading (not pitch)."""
        if forward == right == up == 0:
            return
        cam = self.pose()
        step = MOVE_SPEED * dt * (FAST_FACTOR if fast else 1.0)
        # Heading vectors for yaw (0 looks down -z, positive turns left): forward (-sin, 0, -cos), right (cos, 0, -sin).
        sin, cos = math.sin(cam.yaw), math.cos(cam.yaw)
        x, y, z = cam.position
        position = (x + step * (-sin * forward + cos * right), y + step * up, z + step * (-cos * forward - sin * right))
        self.free = dataclasses.replace(cam, position=position)

    def look(self, yaw: float, pitch: float) -> None:
        """Turn by ``yaw`` (positive: left) and ``pitch`` (positive: up) radians."""
        if yaw == pitch == 0:
            return
        cam = self.pose()
        new_pitch = min(PITCH_LIMIT, max(-PITCH_LIMIT, cam.pitch + pitch))
        self.free = dataclasses.replace(cam, yaw=cam.yaw + yaw, pitch=new_pitch)

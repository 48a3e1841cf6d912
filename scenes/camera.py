"""The camera description shared by the presets and the demo, and the matrices built from it.

Conventions: right-handed, y up, metres. Yaw 0 looks down -z and positive yaw turns left; positive pitch
looks up. Matrices are numpy float64 (4, 4) acting on column vectors (``clip = proj @ view @ p``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class Camera:
    """A pinhole camera. Only this and the image aspect ratio decide the view, so LR and HR frames match."""

    position: Vec3
    yaw: float
    pitch: float
    fov_y_degrees: float = 60.0

    def __post_init__(self) -> None:
        # a NaN or infinite value rendered a flat colour without a word, a field of view of 0 divided by zero
        if len(self.position) != 3 or not all(math.isfinite(v) for v in (*self.position, self.yaw, self.pitch)):
            raise ValueError(f"a camera needs a finite 3D position, yaw and pitch, got {self}")
        if not 0 < self.fov_y_degrees < 180:
            raise ValueError(f"a camera's field of view must lie strictly between 0 and 180 degrees, got "
                             f"{self.fov_y_degrees}")

    def forward(self) -> np.ndarray:
        """Unit view direction."""
        cp = math.cos(self.pitch)
        return np.array([-math.sin(self.yaw) * cp, math.sin(self.pitch), -math.cos(self.yaw) * cp])


def look_at(position: Vec3, target: Vec3, fov_y_degrees: float = 60.0) -> Camera:
    """A camera at ``position`` looking towards ``target``."""
    d = np.subtract(target, position, dtype=np.float64)
    d /= np.linalg.norm(d)
    yaw = math.atan2(-d[0], -d[2])
    pitch = math.asin(float(np.clip(d[1], -1.0, 1.0)))
    return Camera(tuple(float(c) for c in position), yaw, pitch, fov_y_degrees)


def view_matrix(camera: Camera) -> np.ndarray:
    """World -> eye space."""
    eye = np.asarray(camera.position, np.float64)
    f = camera.forward()
    r = np.array([math.cos(camera.yaw), 0.0, -math.sin(camera.yaw)])  # forward x up, already unit length
    u = np.cross(r, f)
    return np.array(
        [
            [*r, -r @ eye],
            [*u, -u @ eye],
            [*(-f), f @ eye],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def perspective(fov_y_degrees: float, aspect: float, near: float, far: float) -> np.ndarray:
    """OpenGL perspective projection (clip z in [-w, w])."""
    f = 1.0 / math.tan(math.radians(fov_y_degrees) / 2.0)
    return np.array(
        [
            [f / aspect, 0.0, 0.0, 0.0],
            [0.0, f, 0.0, 0.0],
            [0.0, 0.0, (far + near) / (near - far), 2.0 * far * near / (near - far)],
            [0.0, 0.0, -1.0, 0.0],
        ]
    )


def orthographic(left: float, right: float, bottom: float, top: float, near: float, far: float) -> np.ndarray:
    """OpenGL orthographic projection, used for the sun's shadow map."""
    return np.array(
        [
            [2.0 / (right - left), 0.0, 0.0, -(right + left) / (right - left)],
            [0.0, 2.0 / (top - bottom), 0.0, -(top + bottom) / (top - bottom)],
            [0.0, 0.0, -2.0 / (far - near), -(far + near) / (far - near)],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def loop_phase(t: float, period: float) -> float:
    """Angle in [0, 2 pi) of time ``t`` on a loop of ``period`` seconds; paths built from it repeat exactly."""
    return 2.0 * math.pi * ((t / period) % 1.0)

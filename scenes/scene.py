"""Scene description: materials, instanced batches, lighting environment, and a builder the presets fill.

A scene is static: only the camera moves with time, so the sun's shadow map can be rendered once per preset.
An instance row is 24 float32: the model matrix column-major (16), tint rgb + texture layer (4), and a uv
rectangle (offset xy, scale xy) that selects part of the layer, e.g. one word of the sign atlas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from scenes.camera import Vec3
from scenes.textures import layer_index

INSTANCE_FLOATS = 24
FULL_UV = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class Material:
    """Shading parameters shared by one batch of instances."""

    specular: float = 0.15  # Blinn-Phong strength, multiplied by the texture's alpha (specular mask)
    shininess: float = 24.0  # Blinn-Phong exponent
    reflect: float = 0.0  # strength of the sky reflection (Fresnel-weighted, masked like specular)
    emissive: float = 0.0  # texture colour added unlit (signs, lamps, jump pads)
    alpha_cut: float = 0.0  # > 0: alpha-tested and double-sided (foliage, fences, grating)
    box_uv: float = 0.0  # > 0: world-scaled box mapping with this many repeats per metre, else mesh uv
    double_sided: bool = False  # draw back faces too (cards)
    casts_shadow: bool = True


@dataclass(frozen=True)
class Batch:
    """One instanced draw: a unit mesh, a material and (N, INSTANCE_FLOATS) instance rows."""

    mesh: str
    material: Material
    instances: np.ndarray


@dataclass(frozen=True)
class Environment:
    """Sun, sky, fog and the world box the shadow map must cover."""

    sun_direction: Vec3  # towards the sun; normalised by the renderer
    sun_colour: Vec3  # linear radiance
    sky_top: Vec3  # linear colours of the sky gradient
    sky_horizon: Vec3
    ground: Vec3  # colour of the lower hemisphere, for ambient light and reflections
    ambient: float  # scale of hemisphere ambient light
    fog_density: float  # per metre, exponential
    exposure: float
    shadow_min: Vec3  # world-space box of everything that casts or receives shadows
    shadow_max: Vec3
    cloud_cover: float = 0.4
    near: float = 0.1
    far: float = 400.0


@dataclass(frozen=True)
class Scene:
    batches: tuple[Batch, ...]
    environment: Environment


def trs(
    positions: ArrayLike,
    scales: ArrayLike,
    yaw: ArrayLike = 0.0,
    pitch: ArrayLike = 0.0,
    roll: ArrayLike = 0.0,
) -> np.ndarray:
    """(N, 4, 4) matrices translate @ rot_y(yaw) @ rot_x(pitch) @ rot_z(roll) @ scale; positions (N, 3) or (3,),
    scales (N, 3), (3,) or one number, angles (N,) or one number (radians)."""
    p = np.atleast_2d(np.asarray(positions, np.float64))
    n = len(p)
    s = np.broadcast_to(np.asarray(scales, np.float64), (n, 3))
    cy, sy = np.cos(np.broadcast_to(yaw, n)), np.sin(np.broadcast_to(yaw, n))
    cx, sx = np.cos(np.broadcast_to(pitch, n)), np.sin(np.broadcast_to(pitch, n))
    cz, sz = np.cos(np.broadcast_to(roll, n)), np.sin(np.broadcast_to(roll, n))
    zero, one = np.zeros(n), np.ones(n)
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(n, 3, 3)
    rx = np.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(n, 3, 3)
    rz = np.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(n, 3, 3)
    m = np.zeros((n, 4, 4))
    m[:, :3, :3] = ry @ rx @ rz * s[:, None, :]
    m[:, :3, 3] = p
    m[:, 3, 3] = 1.0
    return m


def segments(starts: np.ndarray, ends: np.ndarray, radius: float) -> np.ndarray:
    """(N, 4, 4) matrices that stretch a unit solid's y axis from each start to each end (wires, branches)."""
    a, b = np.atleast_2d(np.asarray(starts, np.float64)), np.atleast_2d(np.asarray(ends, np.float64))
    axis = b - a
    unit = axis / np.linalg.norm(axis, axis=1, keepdims=True)
    helper = np.where(np.abs(unit[:, 1:2]) > 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    side = np.cross(helper, unit)
    side /= np.linalg.norm(side, axis=1, keepdims=True)
    other = np.cross(side, unit)  # (side, unit, other) right-handed, so culling keeps the outside
    m = np.zeros((len(a), 4, 4))
    m[:, :3, 0], m[:, :3, 1], m[:, :3, 2] = side * radius * 2, axis, other * radius * 2
    m[:, :3, 3] = a
    m[:, 3, 3] = 1.0
    return m


def catenary(start: Vec3, end: Vec3, sag: float, pieces: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end points of ``pieces`` straight pieces approximating a hanging wire."""
    s = np.linspace(0.0, 1.0, pieces + 1)[:, None]
    points = np.asarray(start) + (np.asarray(end) - np.asarray(start)) * s
    points[:, 1] -= sag * 4.0 * s[:, 0] * (1.0 - s[:, 0])
    return points[:-1], points[1:]


class SceneBuilder:
    """Collects instances per (mesh, material) so each pair becomes a single instanced draw."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, Material], list[np.ndarray]] = {}

    def add(
        self,
        mesh: str,
        material: Material,
        texture: str,
        matrices: np.ndarray,
        tint: Sequence[float] | np.ndarray = (1.0, 1.0, 1.0),
        uv: Sequence[float] | np.ndarray = FULL_UV,
    ) -> None:
        """Add instances; ``tint`` and ``uv`` are per instance (N, 3) / (N, 4) or shared."""
        m = np.asarray(matrices, np.float64).reshape(-1, 4, 4)
        n = len(m)
        rows = np.empty((n, INSTANCE_FLOATS), np.float32)
        rows[:, :16] = m.transpose(0, 2, 1).reshape(n, 16)  # GLSL wants column-major
        rows[:, 16:19] = np.broadcast_to(np.asarray(tint, np.float32), (n, 3))
        rows[:, 19] = layer_index(texture)
        rows[:, 20:24] = np.broadcast_to(np.asarray(uv, np.float32), (n, 4))
        self._rows.setdefault((mesh, material), []).append(rows)

    def box(self, material: Material, texture: str, lo: Vec3, hi: Vec3, tint: Sequence[float] = (1, 1, 1)) -> None:
        """An axis-aligned box between two corners (walls, kerbs, furniture)."""
        lo_a, hi_a = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        centre = ((lo_a[0] + hi_a[0]) / 2, lo_a[1], (lo_a[2] + hi_a[2]) / 2)
        self.add("cube", material, texture, trs(centre, hi_a - lo_a), tint)

    def build(self, environment: Environment) -> Scene:
        batches = tuple(
            Batch(mesh, material, np.ascontiguousarray(np.concatenate(rows)))
            for (mesh, material), rows in self._rows.items()
        )
        return Scene(batches, environment)

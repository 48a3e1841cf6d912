"""A stylised dusk arena: sharp edges, high-frequency patterns (bricks, tiles, checkers, hazard stripes),
chain-link fences, grating catwalks and sagging cables, lit by a low orange sun.

A stepped central platform with a polar checkerboard; eight pillars carry a grating catwalk; brick walls with
fences on top close a 28 m ring; crates, cover walls and glowing jump pads fill the outer ring.
"""

from __future__ import annotations

import math

import numpy as np

from scenes.camera import Camera, Vec3, look_at, loop_phase
from scenes.presets.common import GLOW, MATTE, PAINT, SATIN, WIREFRAME, hanging_wires
from scenes.scene import Environment, Material, Scene, SceneBuilder, trs
from scenes.textures import TEXTURE_SIZE
from scenes.textures_urban import SIGN_WORDS, sign_uv

_FLOOR = Material(specular=0.6, shininess=60.0, reflect=0.1, box_uv=0.25)
_BRICK = Material(specular=0.1, shininess=16.0, box_uv=0.5)
_METAL = Material(specular=0.9, shininess=60.0, reflect=0.2, box_uv=0.5)
_GRATING = Material(specular=0.6, shininess=40.0, alpha_cut=0.5, double_sided=True, box_uv=1.0)
_WALL_R = 28.0
_PILLAR_R = 16.0
_PERIOD = 24.0


def _beam(
    b: SceneBuilder,
    material: Material,
    texture: str,
    p: Vec3,
    q: Vec3,
    size: tuple[float, float],
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> None:
    """A horizontal box of (width, height) cross-section from p to q (its bottom at p's height)."""
    d = np.subtract(q, p)
    yaw = math.atan2(-d[2], d[0])
    mid = ((p[0] + q[0]) / 2, p[1], (p[2] + q[2]) / 2)
    b.add("cube", material, texture, trs(mid, (float(np.hypot(d[0], d[2])), size[1], size[0]), yaw), tint)


def _up(height: float) -> np.ndarray:
    return np.array([0.0, height, 0.0])


def _ring(radius: float, count: int, offset: float = 0.0) -> np.ndarray:
    a = 2 * np.pi * (np.arange(count) + offset) / count
    return np.stack([radius * np.cos(a), np.zeros(count), radius * np.sin(a)], 1)


def _floor_and_platform(b: SceneBuilder) -> None:
    b.add("plane", _FLOOR, "arena_panel", trs((0, 0, 0), (200, 1, 200)), (0.8, 0.85, 0.95))
    b.add("cylinder", SATIN, "hazard", trs((0, 0, 0), (15.4, 0.9, 15.4)), uv=(0, 0, 24, 1))
    b.add("cylinder", PAINT, "checker", trs((0, 0, 0), (14.0, 1.0, 14.0)), uv=(0, 0, 6, 2))
    for k in range(4):
        a = k * math.pi / 2
        for step in range(5):
            r = 7.9 + 0.45 * step
            centre = (r * math.cos(a), 0.0, r * math.sin(a))
            b.add("cube", _FLOOR, "tiles", trs(centre, (0.45, 0.8 - 0.18 * step, 3.0), -a), (0.9, 0.9, 1.0))


def _walls(b: SceneBuilder) -> None:
    """Sixteen brick wall segments with coping, fence panels and posts on top, and glowing banners."""
    corners = _ring(_WALL_R / math.cos(math.pi / 16), 16, 0.5)
    for i in range(16):
        p, q = corners[i], corners[(i + 1) % 16]
        _beam(b, _BRICK, "bricks", tuple(p), tuple(q), (1.2, 7.0), (0.95, 0.85, 0.8))
        _beam(b, _METAL, "metal", (p[0], 7.0, p[2]), (q[0], 7.0, q[2]), (1.5, 0.3))
        length = float(np.hypot(*(q - p)[[0, 2]]))
        mid = (p + q) / 2
        yaw = math.atan2(-(q - p)[2], (q - p)[0])
        b.add(
            "card",
            WIREFRAME,
            "chainlink",
            trs((mid[0], 7.3, mid[2]), (length, 3.0, 1.0), yaw),
            uv=(0, 0, length / 2.0, 1.5),
        )
    posts = corners + _up(7.3)
    b.add("pole", SATIN, "metal", trs(posts, (0.14, 3.2, 0.14)), (0.5, 0.5, 0.55))
    for k, angle in enumerate(np.arange(4) * math.pi / 2 + math.pi / 4):
        inner = _WALL_R * math.cos(math.pi / 16) - 0.62
        position = (inner * math.cos(angle), 4.8, inner * math.sin(angle))
        yaw = math.atan2(-math.cos(angle), -math.sin(angle))
        word = SIGN_WORDS.index("ARENA" if k % 2 == 0 else "FRAG ZONE")
        b.add("card", GLOW, "signs", trs(position, (9.0, 0.9, 1.0), yaw), uv=sign_uv(word, TEXTURE_SIZE))


def _pillars_and_catwalk(b: SceneBuilder) -> None:
    """Pillars with glowing bands, a grating catwalk ring with railings between them, and cables overhead."""
    pillars = _ring(_PILLAR_R, 8, 0.5)
    b.add("cube", _METAL, "metal", trs(pillars, (1.6, 10.0, 1.6)), (0.75, 0.78, 0.85))
    bands = np.concatenate([pillars + _up(h) for h in (2.5, 6.5, 9.6)])
    b.add("cube", GLOW, "white", trs(bands, (1.7, 0.12, 1.7)), (0.2, 0.9, 1.0))
    for i in range(8):
        p, q = pillars[i] + _up(5.0), pillars[(i + 1) % 8] + _up(5.0)
        _beam(b, _GRATING, "grating", tuple(p), tuple(q), (2.0, 0.08), (0.55, 0.55, 0.6))
        normal = np.array([p[0] + q[0], 0.0, p[2] + q[2]])
        normal /= np.linalg.norm(normal)
        for side in (-0.95, 0.95):
            for h in (0.55, 1.05):
                a, c = p + normal * side + _up(h), q + normal * side + _up(h)
                _beam(b, SATIN, "white", tuple(a), tuple(c), (0.05, 0.05), (0.9, 0.75, 0.1))
        along = np.linspace(0.0, 1.0, 10)[:, None]
        rail_posts = np.concatenate([p + (q - p) * along + normal * side for side in (-0.95, 0.95)])
        b.add("cube", SATIN, "white", trs(rail_posts + _up(0.05), (0.05, 1.05, 0.05)), (0.9, 0.75, 0.1))
    tops = [tuple(p + _up(10.0)) for p in pillars]
    across = [(tops[i], tops[(i + 4) % 8]) for i in range(4)]
    outward = [(tops[i], tuple(p * (_WALL_R - 0.6) / _PILLAR_R + _up(7.2))) for i, p in enumerate(pillars)]
    hanging_wires(b, across, 2.5, 0.025)
    hanging_wires(b, outward + [(tops[i], tops[(i + 1) % 8]) for i in range(8)], 0.8, 0.02)


def _clutter(b: SceneBuilder, rng: np.random.Generator) -> None:
    """Crate stacks and low brick cover walls in the outer ring; jump pads between the pillars."""
    for i in range(10):
        angle = 2 * np.pi * (i + rng.uniform(0.2, 0.8)) / 10
        r = rng.uniform(19.0, 25.0)
        x, z = r * math.cos(angle), r * math.sin(angle)
        yaw = rng.uniform(0, np.pi)
        b.add("cube", MATTE, "crate", trs((x, 0, z), (1.5, 1.5, 1.5), yaw))
        if rng.random() < 0.6:
            b.add("cube", MATTE, "crate", trs((x + 0.2, 1.5, z - 0.1), (1.2, 1.2, 1.2), yaw + 0.4))
        ca = angle + np.pi / 10
        cover = (r * math.cos(ca), 0.0, r * math.sin(ca))
        b.add("cube", _BRICK, "bricks", trs(cover, (3.2, 1.2, 0.5), -ca), (0.75, 0.8, 0.9))
    pads = _ring(21.5, 4, 0.25)
    b.add("cylinder", SATIN, "hazard", trs(pads, (3.2, 0.12, 3.2)), uv=(0, 0, 12, 1))
    b.add("cylinder", GLOW, "arena_panel", trs(pads, (2.4, 0.16, 2.4)), (0.4, 1.0, 0.3))


def build() -> Scene:
    rng = np.random.default_rng(31337)
    b = SceneBuilder()
    _floor_and_platform(b)
    _walls(b)
    _pillars_and_catwalk(b)
    _clutter(b, rng)
    env = Environment(
        sun_direction=(-0.55, 0.42, 0.45),
        sun_colour=(3.6, 2.4, 1.5),
        sky_top=(0.1, 0.12, 0.35),
        sky_horizon=(0.95, 0.52, 0.38),
        ground=(0.22, 0.16, 0.2),
        ambient=0.6,
        fog_density=0.006,
        exposure=1.2,
        shadow_min=(-31.0, -1.0, -31.0),
        shadow_max=(31.0, 13.0, 31.0),
        cloud_cover=0.55,
    )
    return b.build(env)


def camera(t: float) -> Camera:
    """Runs laps inside the pillar ring, looking ahead and swinging between the centre and the walls."""
    ph = loop_phase(t, _PERIOD)
    radius = 12.0 + 1.5 * math.sin(3 * ph)
    position = (radius * math.cos(ph), 3.0 + 0.8 * math.sin(2 * ph), radius * math.sin(ph))
    look = ph + math.pi / 2 - 0.3 + 0.7 * math.sin(2 * ph + 0.4)
    target = (position[0] + 10 * math.cos(look), 2.0 + 1.5 * math.sin(3 * ph), position[2] + 10 * math.sin(look))
    return look_at(position, target, 70.0)

"""Walled garden on a summer afternoon: alpha-tested grass and leaves, thin branches, a picket fence.

A gazebo stands in the middle of two crossing cobbled paths, ringed by a low hedge; flower beds, a pond and
rocks fill the lawn, a ring of trees and a white picket fence close it, and a dense tree line stands beyond.
"""

from __future__ import annotations

import math

import numpy as np

from scenes.camera import Camera, look_at, loop_phase
from scenes.presets.common import CHROME, FOLIAGE, GLOW, MATTE, SATIN, lamp_post, tree
from scenes.scene import Environment, Material, Scene, SceneBuilder, segments, trs

_LAWN = Material(specular=0.05, shininess=8.0, box_uv=0.25)
_PATH = Material(specular=0.2, shininess=24.0, box_uv=0.5)
_HEDGE = Material(specular=0.05, shininess=8.0, box_uv=0.6)
_WATER = Material(specular=1.5, shininess=300.0, reflect=1.0)
_PERIOD = 60.0
_FENCE = 34.0  # half side of the square picket fence
_POND = (13.0, -12.0, 4.5)  # x, z, radius


def _ground(b: SceneBuilder) -> None:
    b.add("plane", _LAWN, "grass_ground", trs((0, 0, 0), (160, 1, 160)))
    for yaw in (0.0, math.pi / 2):
        b.add("plane", _PATH, "cobble", trs((0, 0.01, 0), (3.0, 1, 2 * _FENCE), yaw))
    x, z, r = _POND
    b.add("cylinder", MATTE, "rock", trs((x, -0.2, z), (2 * r + 0.6, 0.28, 2 * r + 0.6)), (0.7, 0.68, 0.6))
    b.add("cylinder", _WATER, "white", trs((x, -0.1, z), (2 * r, 0.2, 2 * r)), (0.05, 0.09, 0.08))
    angles = np.linspace(0, 2 * np.pi, 28, endpoint=False)
    stones = np.stack([x + (r + 0.3) * np.cos(angles), np.full_like(angles, -0.15), z + (r + 0.3) * np.sin(angles)], 1)
    b.add("sphere", MATTE, "rock", trs(stones, (0.9, 0.45, 0.7), angles), (0.8, 0.78, 0.72))


def _gazebo(b: SceneBuilder) -> None:
    b.add("cylinder", SATIN, "parquet", trs((0, 0, 0), (7.0, 0.3, 7.0)), uv=(0, 0, 6, 1))
    angles = np.arange(9) * np.pi / 4 + np.pi / 8
    pillars = np.stack([3.1 * np.cos(angles), np.full(9, 0.3), 3.1 * np.sin(angles)], 1)
    b.add("cylinder", SATIN, "white", trs(pillars[:8], (0.26, 3.0, 0.26)), (0.9, 0.9, 0.86))
    b.add("cylinder", SATIN, "white", trs((0, 3.3, 0), (7.0, 0.3, 7.0)), (0.9, 0.9, 0.86))
    b.add("cone", MATTE, "roof", trs((0, 3.6, 0), (8.0, 2.6, 8.0)), uv=(0, 0, 8, 2))
    b.add("sphere", CHROME, "white", trs((0, 6.1, 0), (0.5, 0.5, 0.5)), (0.9, 0.75, 0.4))
    a, c = pillars[:-1], pillars[1:]
    for height in (0.45, 0.9):
        lift = np.array([0.0, height, 0.0])
        b.add("cube", SATIN, "white", segments(a + lift, c + lift, 0.04), (0.92, 0.92, 0.88))
    along = np.linspace(0.1, 0.9, 7)[None, :, None]
    feet = (a[:, None] + (c - a)[:, None] * along).reshape(-1, 3)
    b.add("cube", SATIN, "white", trs(feet, (0.05, 0.9, 0.05)), (0.92, 0.92, 0.88))


def _hedge(b: SceneBuilder, x: tuple[float, float], z: tuple[float, float], height: float) -> None:
    b.box(_HEDGE, "hedge", (min(x), 0.0, min(z)), (max(x), height, max(z)))


def _hedges(b: SceneBuilder) -> None:
    """A square ring around the gazebo with gaps for the paths, and long hedges along the outer paths."""
    for sx in (-1, 1):
        for sz in (-1, 1):
            _hedge(b, (sx * 2.2, sx * 6.45), (sz * 5.55, sz * 6.45), 1.1)
            _hedge(b, (sx * 5.55, sx * 6.45), (sz * 2.2, sz * 5.55), 1.1)
            _hedge(b, (sx * 21.0, sx * 32.0), (sz * 2.0, sz * 2.8), 1.4)
            _hedge(b, (sx * 2.0, sx * 2.8), (sz * 21.0, sz * 32.0), 1.4)


def _lawn_cover(b: SceneBuilder, rng: np.random.Generator) -> None:
    """Grass clumps everywhere except paths, gazebo and pond; flower beds in each quadrant; rocks."""
    points = rng.uniform(-_FENCE + 0.5, _FENCE - 0.5, (9000, 2))
    px, pz = points[:, 0], points[:, 1]
    on_path = (np.abs(px) < 1.9) | (np.abs(pz) < 1.9) | (np.hypot(px, pz) < 3.8)
    in_pond = np.hypot(px - _POND[0], pz - _POND[1]) < _POND[2] + 0.9
    keep = points[~on_path & ~in_pond][:4200]
    n = len(keep)
    positions = np.stack([keep[:, 0], np.zeros(n), keep[:, 1]], 1)
    sizes = rng.uniform(0.5, 0.9, (n, 1)) * (1.0, rng.uniform(0.5, 0.8), 1.0)
    tint = rng.uniform(0.75, 1.15, (n, 1)) * (1.0, 1.0, 0.9)
    b.add("cross", FOLIAGE, "grass_blades", trs(positions, sizes, rng.uniform(0, np.pi, n)), tint)
    beds = [(-10.0, -9.0), (-10.0, 10.0), (9.0, 9.0), (-16.0, 0.0 + 4.0)]
    flowers = np.concatenate([rng.normal((bx, 0, bz), (1.8, 0, 1.2), (90, 3)) for bx, bz in beds])
    b.add("cross", FOLIAGE, "flowers", trs(flowers, (0.55, 0.5, 0.55), rng.uniform(0, np.pi, len(flowers))))
    rocks = np.stack([rng.uniform(-30, 30, 30), np.full(30, -0.2), rng.uniform(-30, 30, 30)], 1)
    rocks = rocks[(np.abs(rocks[:, 0]) > 3) & (np.abs(rocks[:, 2]) > 3)]
    b.add(
        "sphere",
        MATTE,
        "rock",
        trs(rocks, rng.uniform(0.4, 1.3, (len(rocks), 1)) * (1.2, 0.6, 1.0), rng.uniform(0, np.pi, len(rocks))),
    )


def _fence(b: SceneBuilder) -> None:
    """White pickets every 0.2 m on all four sides: a regular high-frequency pattern at distance."""
    pickets, rails = [], []
    along = np.arange(-_FENCE, _FENCE, 0.2)
    for fixed in (-_FENCE, _FENCE):
        pickets += [(s, 0.0, fixed, 0.0) for s in along] + [(fixed, 0.0, s, math.pi / 2) for s in along]
        for h in (0.35, 0.85):
            rails += [(0.0, h, fixed + 0.04, 0.0), (fixed + 0.04, h, 0.0, math.pi / 2)]
    p = np.array(pickets)
    b.add("cube", MATTE, "concrete", trs(p[:, :3], (0.09, 1.1, 0.03), p[:, 3]), (1.5, 1.5, 1.45))
    r = np.array(rails)
    b.add("cube", MATTE, "concrete", trs(r[:, :3], (2 * _FENCE, 0.08, 0.04), r[:, 3]), (1.5, 1.5, 1.45))


def _trees(b: SceneBuilder, rng: np.random.Generator) -> None:
    """Detailed trees inside the fence (off the camera's orbit), simple tall ones as a backdrop outside."""
    for i in range(14):
        angle = 2 * np.pi * (i + rng.uniform(0.2, 0.8)) / 14
        radius = rng.uniform(21.0, 30.0)
        x, z = radius * math.cos(angle), radius * math.sin(angle)
        if min(abs(x), abs(z)) < 3.5:
            continue
        tree(b, rng, (x, 0.0, z), rng.uniform(5.0, 8.0), rng.uniform(2.0, 3.0), branches=8)
    for i in range(40):
        angle = 2 * np.pi * (i + rng.uniform(0.0, 0.8)) / 40
        radius = rng.uniform(38.0, 48.0)
        tree(
            b,
            rng,
            (radius * math.cos(angle), 0.0, radius * math.sin(angle)),
            rng.uniform(9.0, 13.0),
            rng.uniform(3.5, 5.0),
            branches=5,
        )


def _props(b: SceneBuilder) -> None:
    for x, z in ((2.5, 7.8), (-2.5, -7.8), (7.8, -2.5), (-7.8, 2.5), (2.5, 24.0), (-24.0, -2.5)):
        top = lamp_post(b, (x, 0.0, z), 3.2, (0.0, 0.15, 0.0))
        b.add("sphere", GLOW, "white", trs((top[0], top[1] - 0.1, top[2]), (0.35, 0.35, 0.35)), (1.0, 0.9, 0.7))
    for x, z, yaw in ((3.0, 8.5, math.pi / 2), (-3.0, -8.5, -math.pi / 2)):
        slats = trs(
            [(x + dx, 0.45 + 0.01 * i, z) for i, dx in enumerate(np.linspace(-0.25, 0.25, 5))],
            (0.08, 0.04, 1.8),
            yaw + math.pi / 2,
        )
        b.add("cube", SATIN, "wood", slats)
        b.add("cube", SATIN, "metal", trs([(x, 0.0, z - 0.8), (x, 0.0, z + 0.8)], (0.6, 0.45, 0.06)), (0.2,) * 3)


def build() -> Scene:
    rng = np.random.default_rng(77)
    b = SceneBuilder()
    _ground(b)
    _gazebo(b)
    _hedges(b)
    _lawn_cover(b, rng)
    _fence(b)
    _trees(b, rng)
    _props(b)
    env = Environment(
        sun_direction=(-0.45, 0.72, 0.35),
        sun_colour=(3.2, 3.0, 2.6),
        sky_top=(0.18, 0.38, 0.78),
        sky_horizon=(0.7, 0.8, 0.9),
        ground=(0.2, 0.25, 0.12),
        ambient=0.5,
        fog_density=0.004,
        exposure=1.0,
        shadow_min=(-52.0, -1.0, -52.0),
        shadow_max=(52.0, 18.0, 52.0),
        cloud_cover=0.5,
    )
    return b.build(env)


def camera(t: float) -> Camera:
    """Strolls round the gazebo between the hedge ring and the trees, looking across the garden."""
    ph = loop_phase(t, _PERIOD)
    radius = 13.0 + 4.0 * math.sin(2 * ph)
    position = (radius * math.cos(ph), 1.6 + 0.5 * math.sin(3 * ph + 1.0), radius * math.sin(ph))
    look = ph + 1.9 + 0.5 * math.sin(ph * 2 + 0.5)
    target = (position[0] + 8 * math.cos(look), 0.9, position[2] + 8 * math.sin(look))
    return look_at(position, target, 60.0)

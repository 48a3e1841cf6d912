"""City street at golden hour: facades with windows, shops with neon signs, parked cars, lamps and wires.

The street runs along z (x in [-6, 6] is road, pavements to |x| = 10); buildings line both sides and close
both ends, so the camera never looks into emptiness.
"""

from __future__ import annotations

import math

import numpy as np

from scenes.camera import Camera, loop_phase
from scenes.presets.common import CARD, CHROME, GLASS, GLOW, MATTE, PAINT, SATIN, hanging_wires, lamp_post, tree
from scenes.scene import Environment, Material, Scene, SceneBuilder, trs
from scenes.textures import TEXTURE_SIZE
from scenes.textures_urban import SIGN_WORDS, sign_uv

_FACADE = Material(specular=1.0, shininess=100.0, reflect=0.6, box_uv=0.25)
_SHOP = Material(specular=1.0, shininess=100.0, reflect=0.5, box_uv=0.25)
_STONE = Material(specular=0.1, shininess=16.0, box_uv=0.5)
_ROAD = Material(specular=0.3, shininess=30.0, box_uv=1.0 / 12.0)
_GRATING = Material(specular=0.6, shininess=40.0, alpha_cut=0.5, double_sided=True, box_uv=1.0)
_HALF_LENGTH = 100.0
_PERIOD = 48.0


def _street(b: SceneBuilder) -> None:
    b.add("plane", _STONE, "asphalt", trs((0, -0.01, 0), (400, 1, 400)))
    b.add("plane", _ROAD, "road", trs((0, 0, 0), (12, 1, 2 * _HALF_LENGTH + 20)), uv=(0.5, 0, 1, 1))
    for side in (-1, 1):
        x0, x1 = sorted((6.0 * side, 10.0 * side))
        b.box(_STONE, "pavers", (x0, 0, -_HALF_LENGTH - 10), (x1, 0.15, _HALF_LENGTH + 10))
    stripes = trs([(x, 0.003, 0) for x in np.arange(-5.0, 5.5, 1.0)], (0.5, 1.0, 4.0))
    b.add("plane", MATTE, "white", stripes, (0.85, 0.85, 0.82))


def _building(b: SceneBuilder, rng: np.random.Generator, side: int, z0: float, width: float) -> None:
    """Shop floor with a neon sign, storeys of a random facade, a cornice and rooftop clutter."""
    depth = rng.uniform(12.0, 20.0)
    x_in, x_out = 10.0 * side, (10.0 + depth) * side
    lo, hi = min(x_in, x_out), max(x_in, x_out)
    storeys = int(rng.integers(2, 10))
    top = 4.15 + 4.0 * storeys
    facade = ("facade_brick", "facade_concrete", "facade_glass")[int(rng.integers(3))]
    tint = rng.uniform(0.8, 1.1, 3)
    b.box(_SHOP, "shopfront", (lo, 0.15, z0), (hi, 4.15, z0 + width), rng.uniform(0.75, 1.05, 3))
    b.box(_FACADE, facade, (lo + 0.01, 4.15, z0), (hi - 0.01, top, z0 + width), tint)
    b.box(_STONE, "concrete", (lo - 0.25, 4.15, z0 - 0.1), (hi + 0.25, 4.5, z0 + width + 0.1), (0.9, 0.88, 0.82))
    b.box(_STONE, "concrete", (lo - 0.2, top, z0 - 0.1), (hi + 0.2, top + 0.6, z0 + width + 0.1), tint * 0.8)
    face = x_in - 0.03 * side
    yaw = -math.pi / 2 * side
    word = int(rng.integers(len(SIGN_WORDS) - 2))
    sign = trs((face, 3.32, z0 + width / 2), (min(width - 1.0, 5.0), 0.62, 1.0), yaw)
    b.add("card", GLOW, "signs", sign, uv=sign_uv(word, TEXTURE_SIZE))
    if rng.random() < 0.5:
        blade = trs((x_in - 1.3 * side, 6.0 + rng.uniform(0, 4), z0 + 1.0), (2.4, 0.42, 1.0), 0.0, roll=0.0)
        b.add("card", GLOW, "signs", blade, uv=sign_uv(int(rng.integers(len(SIGN_WORDS) - 2)), TEXTURE_SIZE))
    else:
        awning = trs((x_in - 0.8 * side, 2.9, z0 + width / 2), (1.6, 0.12, width * 0.8), 0.0, 0.0, -0.25 * side)
        b.add("cube", MATTE, "awning", awning, rng.uniform(0.4, 1.0, 3))
    if facade == "facade_brick" and storeys > 3:
        _fire_escape(b, face, side, z0 + width / 2, storeys)
    _roof_clutter(b, rng, (lo + hi) / 2, top + 0.6, z0 + width / 2)


def _fire_escape(b: SceneBuilder, face: float, side: int, zc: float, storeys: int) -> None:
    """Grating landings with railings on every storey: dense thin geometry in front of the facade."""
    for level in range(1, storeys):
        y = 4.15 + 4.0 * level
        x0, x1 = sorted((face, face - 1.2 * side))
        b.box(_GRATING, "grating", (x0, y, zc - 2.0), (x1, y + 0.05, zc + 2.0), (0.3, 0.3, 0.32))
        rail = face - 1.2 * side
        posts = trs([(rail, y, zc + dz) for dz in np.linspace(-2.0, 2.0, 9)], (0.04, 1.0, 0.04))
        b.add("cube", SATIN, "white", posts, (0.12, 0.12, 0.13))
        bars = trs([(rail, y + h, zc) for h in (0.5, 0.98)], (0.04, 0.04, 4.0))
        b.add("cube", SATIN, "white", bars, (0.12, 0.12, 0.13))


def _roof_clutter(b: SceneBuilder, rng: np.random.Generator, xc: float, y: float, zc: float) -> None:
    if rng.random() < 0.6:
        b.add("cylinder", MATTE, "crate", trs((xc, y + 2.0, zc), (2.4, 2.6, 2.4)), uv=(0, 0, 4, 1))
        b.add("cone", MATTE, "roof", trs((xc, y + 4.6, zc), (2.6, 0.9, 2.6)), uv=(0, 0, 6, 1))
        legs = trs([(xc + dx, y, zc + dz) for dx in (-1, 1) for dz in (-1, 1)], (0.12, 2.0, 0.12))
        b.add("cube", SATIN, "metal", legs)
    antennas = trs([(xc + rng.uniform(-4, 4), y, zc + rng.uniform(-3, 3)) for _ in range(3)], (0.05, 4.0, 0.05))
    b.add("pole", SATIN, "metal", antennas, (0.4, 0.4, 0.42))
    b.add("cube", SATIN, "metal", trs((xc + rng.uniform(-3, 3), y, zc), (2.0, 1.2, 1.5)))


def _buildings(b: SceneBuilder, rng: np.random.Generator) -> None:
    for side in (-1, 1):
        z = -_HALF_LENGTH - 10.0
        while z < _HALF_LENGTH + 10.0:
            width = float(rng.choice([8.0, 12.0, 16.0]))
            _building(b, rng, side, z, width)
            z += width + (4.0 if rng.random() < 0.15 else 0.0)
    for end in (-1, 1):
        z0 = end * (_HALF_LENGTH + 10.0)
        b.box(_FACADE, "facade_glass", (-40, 0, min(z0, z0 + 12 * end)), (40, 60, max(z0, z0 + 12 * end)))


def _cars(b: SceneBuilder, rng: np.random.Generator) -> None:
    for side in (-1, 1):
        for z in np.arange(-_HALF_LENGTH + 5, _HALF_LENGTH - 5, 9.0):
            if rng.random() < 0.35 or abs(z) < 8:
                continue
            x = 4.6 * side
            colour = rng.choice(
                [
                    [0.6, 0.05, 0.05],
                    [0.05, 0.1, 0.4],
                    [0.8, 0.8, 0.78],
                    [0.05, 0.05, 0.05],
                    [0.3, 0.45, 0.35],
                    [0.75, 0.55, 0.1],
                ]
            )
            _car(b, x, z, colour)


def _car(b: SceneBuilder, x: float, z: float, colour: np.ndarray) -> None:
    """Body, glass cabin with a painted roof, bumpers, wheels, head and tail lights; the front faces +z."""
    b.add("cube", PAINT, "white", trs((x, 0.35, z), (1.8, 0.7, 4.3)), colour)
    b.add("cube", GLASS, "white", trs((x, 1.05, z - 0.25), (1.6, 0.55, 2.2)), (0.04, 0.05, 0.06))
    b.add("cube", PAINT, "white", trs((x, 1.6, z - 0.3), (1.5, 0.06, 1.9)), colour)
    bumpers = trs([(x, 0.3, z + dz) for dz in (-2.18, 2.18)], (1.85, 0.22, 0.12))
    b.add("cube", SATIN, "white", bumpers, (0.08, 0.08, 0.09))
    wheels = [(x + dx, 0.33, z + dz) for dx in (-0.85, 0.85) for dz in (-1.4, 1.4)]
    b.add("cylinder", MATTE, "white", trs(wheels, (0.66, 0.24, 0.66), 0.0, 0.0, math.pi / 2), (0.04,) * 3)
    heads = trs([(x + dx, 0.72, z + 2.16) for dx in (-0.6, 0.6)], (0.3, 0.1, 0.02))
    b.add("cube", GLOW, "white", heads, (1.0, 0.9, 0.7))
    tails = trs([(x + dx, 0.72, z - 2.16) for dx in (-0.65, 0.65)], (0.25, 0.12, 0.02))
    b.add("cube", GLOW, "white", tails, (0.8, 0.05, 0.03))


def _street_furniture(b: SceneBuilder, rng: np.random.Generator) -> None:
    """Lamps every 15 m with cables across and along the street, trees, bins, bollards, a traffic light."""
    tops: dict[int, list[tuple[float, float, float]]] = {-1: [], 1: []}
    for side in (-1, 1):
        for z in np.arange(-_HALF_LENGTH, _HALF_LENGTH + 1, 15.0):
            tops[side].append(lamp_post(b, (7.0 * side, 0.15, float(z)), 6.5, (-1.6 * side, 0.3, 0.0)))
        for z in np.arange(-_HALF_LENGTH + 7.5, _HALF_LENGTH, 30.0):
            tree(b, rng, (8.3 * side, 0.15, float(z)), rng.uniform(5.0, 7.0), 1.8, branches=6)
        bins = trs([(8.9 * side, 0.15, z) for z in np.arange(-_HALF_LENGTH + 3, _HALF_LENGTH, 22.0)], (0.6, 1.0, 0.6))
        b.add("cylinder", SATIN, "metal", bins, (0.2, 0.3, 0.22))
        bollards = trs([(6.3 * side, 0.15, z) for z in np.arange(-6.0, 7.0, 1.5)], (0.2, 0.9, 0.2))
        b.add("cylinder", CHROME, "white", bollards, (0.5, 0.5, 0.52))
    across = [(tops[-1][i], tops[1][i]) for i in range(len(tops[1]))]
    along = [(tops[s][i], tops[s][i + 1]) for s in (-1, 1) for i in range(len(tops[s]) - 1)]
    raised = [((a[0], a[1] - 0.5, a[2]), (c[0], c[1] - 0.5, c[2])) for a, c in along]
    hanging_wires(b, across, 0.6, 0.012)
    hanging_wires(b, along + raised, 0.35, 0.012)
    b.add("pole", SATIN, "metal", trs((6.4, 0.15, 8.0), (0.18, 4.2, 0.18)), (0.15, 0.15, 0.15))
    b.add("cube", MATTE, "white", trs((6.4, 3.0, 7.9), (0.35, 1.0, 0.35)), (0.05, 0.05, 0.05))
    lamps = trs([(6.4, 3.15 + 0.3 * i, 7.72) for i in range(3)], (0.2, 0.2, 1.0), math.pi)
    b.add("card", GLOW, "white", lamps[:1], (1.0, 0.1, 0.05))
    b.add("card", CARD, "white", lamps[1:], (0.15, 0.12, 0.05))


def build() -> Scene:
    rng = np.random.default_rng(2024)
    b = SceneBuilder()
    _street(b)
    _buildings(b, rng)
    _cars(b, rng)
    _street_furniture(b, rng)
    env = Environment(
        sun_direction=(0.25, 0.75, 0.6),
        sun_colour=(3.4, 2.7, 2.0),
        sky_top=(0.16, 0.3, 0.62),
        sky_horizon=(0.85, 0.72, 0.6),
        ground=(0.28, 0.24, 0.2),
        ambient=0.5,
        fog_density=0.0035,
        exposure=1.1,
        shadow_min=(-40.0, 0.0, -_HALF_LENGTH - 25.0),
        shadow_max=(40.0, 46.0, _HALF_LENGTH + 25.0),
    )
    return b.build(env)


def camera(t: float) -> Camera:
    """Drives up and down the street, weaving between lanes and glancing at the shopfronts."""
    ph = loop_phase(t, _PERIOD)
    position = (2.8 * math.sin(2 * ph + 1.0), 2.0 + 0.8 * math.sin(3 * ph), 75.0 * math.sin(ph))
    yaw = 0.55 * math.sin(2 * ph + 0.3)
    pitch = 0.04 + 0.08 * math.sin(3 * ph + 0.7)
    return Camera(position, yaw, pitch, 62.0)

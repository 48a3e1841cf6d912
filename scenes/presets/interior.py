"""A grand library hall: marble checker floor, wallpaper and panelling, furniture, glossy objects.

Sunlight enters through three tall windows in the +x wall and a slatted skylight, so the floor carries
window-bar and beam shadows. Bookshelves, chair slats, spindles and a chandelier add fine detail.
"""

from __future__ import annotations

import math

import numpy as np

from scenes.camera import Camera, look_at, loop_phase
from scenes.presets.common import CARD, CHROME, FOLIAGE, GLOW, MATTE, PAINT, SATIN
from scenes.scene import Environment, Material, Scene, SceneBuilder, segments, trs

_FLOOR = Material(specular=1.2, shininess=120.0, reflect=0.15, box_uv=0.25)
_WALL = Material(specular=0.1, shininess=16.0, box_uv=0.4)
_PANEL = Material(specular=0.5, shininess=48.0, box_uv=0.8)
_GLOSSY = Material(specular=1.2, shininess=120.0, reflect=0.5)
_FABRIC = Material(specular=0.05, shininess=8.0, box_uv=2.0)
_HALF_X, _HALF_Z, _HEIGHT = 12.0, 8.0, 6.0
_PERIOD = 50.0


def _shell(b: SceneBuilder) -> None:
    """Floor, walls (the +x wall with three window openings), wainscot, cornice and the skylight beams."""
    hx, hz, h = _HALF_X, _HALF_Z, _HEIGHT
    b.box(_FLOOR, "checker", (-hx, -0.1, -hz), (hx, 0.0, hz))
    b.add("plane", MATTE, "grass_ground", trs((0, -0.2, 0), (200, 1, 200)), (0.8, 0.8, 0.8))
    b.box(_WALL, "wallpaper", (-hx - 0.3, 0, -hz - 0.3), (hx, h, -hz))
    b.box(_WALL, "wallpaper", (-hx - 0.3, 0, hz), (hx, h, hz + 0.3))
    b.box(_WALL, "wallpaper", (-hx - 0.3, 0, -hz), (-hx, h, hz))
    edges = [-hz, -5.6, -3.6, -1.0, 1.0, 3.6, 5.6, hz]  # window openings between pairs 1-2, 3-4, 5-6
    for i in range(0, len(edges) - 1, 2):
        b.box(_WALL, "wallpaper", (hx, 0, edges[i]), (hx + 0.3, h, edges[i + 1]))
    for i in range(1, len(edges) - 1, 2):
        b.box(_WALL, "wallpaper", (hx, 0, edges[i]), (hx + 0.3, 0.9, edges[i + 1]))
        b.box(_WALL, "wallpaper", (hx, 4.6, edges[i]), (hx + 0.3, h, edges[i + 1]))
        _window_bars(b, hx + 0.15, edges[i], edges[i + 1])
    for lo, hi in (
        ((-hx, 0, -hz), (hx, 1.2, -hz + 0.06)),
        ((-hx, 0, hz - 0.06), (hx, 1.2, hz)),
        ((-hx, 0, -hz), (-hx + 0.06, 1.2, hz)),
    ):
        b.box(_PANEL, "wood", lo, hi, (0.8, 0.6, 0.45))
    b.box(_PANEL, "wood", (-hx - 0.3, h, -hz - 0.3), (hx + 0.3, h + 0.3, -hz + 0.5))
    b.box(_PANEL, "wood", (-hx - 0.3, h, hz - 0.5), (hx + 0.3, h + 0.3, hz + 0.3))
    beams = trs([(x, h, 0) for x in np.arange(-hx + 0.6, hx, 1.2)], (0.22, 0.45, 2 * hz))
    b.add("cube", SATIN, "wood", beams, (0.7, 0.55, 0.45))
    b.add("cube", SATIN, "wood", trs([(0, h + 0.45, z) for z in (-3.0, 3.0)], (2 * hx, 0.2, 0.2)), (0.6, 0.5, 0.4))


def _window_bars(b: SceneBuilder, x: float, z0: float, z1: float) -> None:
    """Mullions and transoms: they throw a grid of shadows across the floor."""
    uprights = trs([(x, 0.9, z) for z in np.linspace(z0, z1, 5)[1:-1]], (0.08, 3.7, 0.08))
    transoms = trs([(x, y, (z0 + z1) / 2) for y in (1.8, 2.75, 3.7)], (0.08, 0.08, z1 - z0))
    b.add("cube", PAINT, "white", np.concatenate([uprights, transoms]), (0.9, 0.9, 0.88))


def _bookshelves(b: SceneBuilder, rng: np.random.Generator) -> None:
    for x in np.arange(-10.2, 10.3, 2.55):
        b.box(SATIN, "wood", (x - 1.2, 0.0, -_HALF_Z), (x + 1.2, 3.2, -_HALF_Z + 0.5), (0.6, 0.42, 0.3))
        rows = trs([(x, y, -_HALF_Z + 0.51) for y in (0.1, 1.6)], (2.2, 1.45, 1.0))
        # u scale 1.5 keeps the books' proportions on a 2.2 x 1.45 card; a random u offset varies the spines.
        b.add("card", CARD, "books", rows, uv=[(rng.uniform(0.0, 1.0), 0.0, 1.5, 1.0) for _ in range(2)])


def _dining(b: SceneBuilder) -> None:
    """A long table with slat-backed chairs, plates, candlesticks, chrome spheres and vases."""
    b.box(_GLOSSY, "wood", (-3.2, 0.72, -0.9), (3.2, 0.8, 0.9), (0.7, 0.45, 0.3))
    legs = trs([(x, 0, z) for x in (-3.0, 3.0) for z in (-0.75, 0.75)], (0.1, 0.72, 0.1))
    b.add("cube", SATIN, "wood", legs, (0.5, 0.32, 0.2))
    for x in np.linspace(-2.6, 2.6, 5):
        for side in (-1, 1):
            _chair(b, x, side * 1.25, side)
    dishes = [(x, 0.8, z) for x in np.linspace(-2.6, 2.6, 5) for z in (-0.55, 0.55)]
    b.add("cylinder", _GLOSSY, "white", trs(dishes, (0.34, 0.02, 0.34)), (0.95, 0.95, 0.92))
    b.add("pole", CHROME, "white", trs([(x, 0.8, 0) for x in (-1.4, 1.4)], (0.05, 0.45, 0.05)), (0.9, 0.75, 0.4))
    b.add(
        "sphere", CHROME, "white", trs([(x, 0.8, 0.0) for x in (-2.4, 0.0, 2.4)], (0.32, 0.32, 0.32)), (0.85, 0.85, 0.9)
    )
    vases = trs([(x, 0.8, 0.0) for x in (-0.7, 0.7)], (0.22, 0.5, 0.22))
    b.add("sphere", PAINT, "white", vases, np.array([[0.1, 0.2, 0.6], [0.6, 0.1, 0.15]]))


def _chair(b: SceneBuilder, x: float, z: float, facing: int) -> None:
    """Seat, four legs, two back posts and three slats; ``facing`` is the z side the backrest is on."""
    b.box(SATIN, "wood", (x - 0.24, 0.44, z - 0.24), (x + 0.24, 0.5, z + 0.24), (0.55, 0.35, 0.22))
    legs = trs([(x + dx, 0.0, z + dz) for dx in (-0.2, 0.2) for dz in (-0.2, 0.2)], (0.05, 0.44, 0.05))
    back_z = z + 0.21 * facing
    posts = trs([(x + dx, 0.5, back_z) for dx in (-0.2, 0.2)], (0.05, 0.55, 0.05))
    slats = trs([(x, 0.62 + 0.15 * i, back_z) for i in range(3)], (0.4, 0.06, 0.03))
    b.add("cube", SATIN, "wood", np.concatenate([legs, posts, slats]), (0.55, 0.35, 0.22))


def _lounge(b: SceneBuilder) -> None:
    """Sofas on a rug by the far wall, a coffee table, paintings, pot plants, a fireplace."""
    b.add("plane", MATTE, "rug", trs((-6.0, 0.005, 4.2), (5.0, 1.0, 3.4)))
    for x, colour in ((-7.8, (0.5, 0.12, 0.12)), (-4.2, (0.12, 0.3, 0.2))):
        b.box(_FABRIC, "fabric", (x - 1.0, 0.0, 6.4), (x + 1.0, 0.45, 7.4), colour)
        b.box(_FABRIC, "fabric", (x - 1.0, 0.45, 7.1), (x + 1.0, 1.05, 7.4), colour)
    b.box(_GLOSSY, "wood", (-6.8, 0.38, 3.5), (-5.2, 0.44, 4.6), (0.4, 0.25, 0.15))
    b.add("cube", SATIN, "wood", trs([(x, 0, z) for x in (-6.7, -5.3) for z in (3.6, 4.5)], (0.06, 0.38, 0.06)))
    for k, x in enumerate((-8.0, -3.0, 2.0, 7.0)):
        quadrant = (0.5 * (k % 2), 0.5 * (1 - k // 2), 0.5, 0.5)
        b.add("card", CARD, "paintings", trs((x, 2.1, _HALF_Z - 0.05), (1.8, 1.5, 1.0), math.pi), uv=quadrant)
    for x, z in ((-11.0, -7.0), (11.0, 7.0), (-11.0, 7.0), (11.0, -7.0)):
        b.add("cylinder", SATIN, "rock", trs((x, 0, z), (0.6, 0.55, 0.6)), (0.75, 0.4, 0.25))
        b.add("cross", FOLIAGE, "leaves", trs([(x, 0.4, z), (x, 0.9, z)], (1.3, 1.2, 1.3), (0.3, 1.2)))
    b.box(_PANEL, "bricks", (-_HALF_X, 0, -1.5), (-_HALF_X + 0.6, 1.6, 1.5), (0.9, 0.8, 0.75))
    b.box(MATTE, "white", (-_HALF_X + 0.59, 0.1, -0.8), (-_HALF_X + 0.62, 1.0, 0.8), (0.04, 0.03, 0.02))
    flames = trs([(-_HALF_X + 0.4, 0.1, z) for z in (-0.35, 0.0, 0.35)], (0.3, 0.6, 0.3))
    b.add("cone", GLOW, "white", flames, (1.0, 0.45, 0.1))
    b.box(_GLOSSY, "checker", (-_HALF_X, 1.6, -1.8), (-_HALF_X + 0.75, 1.72, 1.8), (0.9, 0.9, 0.9))


def _columns_and_chandelier(b: SceneBuilder) -> None:
    columns = [(x, 0, z) for x in (-8.0, -4.0, 4.0, 8.0) for z in (-5.2, 5.2)]
    b.add("cylinder", _GLOSSY, "rock", trs(columns, (0.55, _HEIGHT, 0.55)), (1.2, 1.18, 1.1), uv=(0, 0, 1, 4))
    b.add("cube", _GLOSSY, "checker", trs([(x, 0, z) for x, _, z in columns], (0.8, 0.3, 0.8)))
    ring = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    tips = np.stack([1.1 * np.cos(ring), np.full(12, 3.4), 1.1 * np.sin(ring)], 1)
    b.add("pole", CHROME, "white", segments(np.tile([0.0, 3.2, 0.0], (12, 1)), tips, 0.015), (0.9, 0.75, 0.4))
    b.add(
        "pole", CHROME, "white", segments(np.array([[0, 3.2, 0]]), np.array([[0, _HEIGHT, 0]]), 0.02), (0.9, 0.75, 0.4)
    )
    b.add("sphere", GLOW, "white", trs(tips, (0.12, 0.16, 0.12)), (1.0, 0.85, 0.6))


def build() -> Scene:
    rng = np.random.default_rng(5)
    b = SceneBuilder()
    _shell(b)
    _bookshelves(b, rng)
    _dining(b)
    _lounge(b)
    _columns_and_chandelier(b)
    env = Environment(
        sun_direction=(0.62, 0.62, 0.3),
        sun_colour=(3.6, 3.2, 2.6),
        sky_top=(0.3, 0.45, 0.75),
        sky_horizon=(0.75, 0.78, 0.8),
        ground=(0.3, 0.22, 0.15),
        ambient=0.45,
        fog_density=0.002,
        exposure=1.3,
        shadow_min=(-_HALF_X - 1.0, -0.2, -_HALF_Z - 1.0),
        shadow_max=(_HALF_X + 1.0, _HEIGHT + 1.0, _HALF_Z + 1.0),
        cloud_cover=0.3,
    )
    return b.build(env)


def camera(t: float) -> Camera:
    """Walks an ellipse round the table, between the columns, looking across the hall."""
    ph = loop_phase(t, _PERIOD)
    position = (7.0 * math.cos(ph), 1.65 + 0.25 * math.sin(2 * ph), 3.9 * math.sin(ph))
    target = (3.5 * math.cos(ph + 2.4), 1.0 + 0.4 * math.sin(3 * ph), 3.5 * math.sin(ph + 2.4))
    return look_at(position, target, 65.0)

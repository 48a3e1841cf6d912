"""Procedural textures for built environments: streets, facades, signs, metal, fences.

Each generator takes (size, rng) and returns (size, size, 4) float32 in [0, 1], row 0 at the top. For opaque
materials alpha is a specular/reflection mask (glass 1, brick ~0); for alpha-tested ones it is coverage.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from scenes.patterns import (
    blend,
    cell_grid,
    fbm,
    paint,
    rgba,
    smoothstep,
    text_mask,
    uv_grid,
    value_noise,
)

Generator = Callable[[int, np.random.Generator], np.ndarray]

# One word per row of the sign atlas; the presets pick a row with the instance uv rectangle.
SIGN_WORDS = ("HOTEL", "PIZZA", "CAFE 24", "BOOKS", "RAMEN", "PHARMACY", "ARCADE", "GARAGE", "ARENA", "FRAG ZONE")
_SIGN_COLOURS = ((1.0, 0.3, 0.3), (1.0, 0.8, 0.2), (0.3, 1.0, 0.6), (0.4, 0.7, 1.0), (1.0, 0.5, 0.9))


def sign_uv(row: int, size: int) -> tuple[float, float, float, float]:
    """Instance uv rectangle (offset u, v, scale u, v) of one word of the sign atlas (v grows upwards)."""
    row_h = size // len(SIGN_WORDS)
    return 0.0, 1.0 - (row + 1) * row_h / size, 1.0, row_h / size


def _white(size: int, rng: np.random.Generator) -> np.ndarray:
    return np.ones((size, size, 4), np.float32)


def _concrete(size: int, rng: np.random.Generator) -> np.ndarray:
    n = fbm(size, 4, 6, rng)
    pits = value_noise(size, 128, rng) > 0.93
    grey = 0.52 + 0.22 * (n - 0.5) - 0.12 * pits
    return rgba(grey[..., None] * np.array([1.0, 0.98, 0.94], np.float32), 0.05)


def _asphalt_rgb(size: int, rng: np.random.Generator) -> np.ndarray:
    n = fbm(size, 8, 5, rng)
    grain = rng.random((size, size), dtype=np.float32)
    grey = 0.15 + 0.10 * n + 0.07 * (grain > 0.94) + 0.03 * grain
    return grey[..., None] * np.array([1.0, 1.0, 1.04], np.float32)


def _asphalt(size: int, rng: np.random.Generator) -> np.ndarray:
    return rgba(_asphalt_rgb(size, rng), 0.2)


def _road(size: int, rng: np.random.Generator) -> np.ndarray:
    """Road across u (both edges inside the tile), running along v: edge lines, dashed centre, tyre tracks."""
    rgb = _asphalt_rgb(size, rng)
    u, v = uv_grid(size)
    wear = smoothstep(0.25, 0.6, fbm(size, 16, 4, rng))
    for lane in (0.28, 0.72):
        rgb *= 1.0 - 0.25 * np.exp(-(((u - lane) / 0.04) ** 2))[..., None]
    edges = (np.abs(u - 0.07) < 0.01) | (np.abs(u - 0.93) < 0.01)
    dashes = (np.abs(u - 0.5) < 0.008) & ((v * 2) % 1.0 < 0.5)
    paint(rgb, edges & (wear > 0.1), blend((0.5, 0.5, 0.5), (0.92, 0.92, 0.9), wear))
    paint(rgb, dashes & (wear > 0.1), blend((0.5, 0.45, 0.3), (0.95, 0.75, 0.15), wear))
    return rgba(rgb, 0.25)


def _pavers(size: int, rng: np.random.Generator) -> np.ndarray:
    cells = cell_grid(size, 4, 8, stagger=0.5)
    tint = rng.uniform(0.8, 1.1, cells.ids.max() + 1).astype(np.float32)[cells.ids]
    n = fbm(size, 8, 4, rng)
    rgb = (0.55 + 0.15 * n)[..., None] * np.array([0.95, 0.9, 0.85], np.float32) * tint[..., None]
    bevel = smoothstep(1.0, 5.0, cells.edge)
    rgb *= (0.35 + 0.65 * bevel)[..., None]
    return rgba(rgb, 0.1 * bevel)


def brick_rgb(size: int, rng: np.random.Generator, cols: int, rows: int) -> np.ndarray:
    """Running-bond bricks with per-brick colour, bevelled edges and light mortar."""
    cells = cell_grid(size, cols, rows, stagger=0.5)
    palette = np.array([[0.62, 0.27, 0.18], [0.55, 0.22, 0.16], [0.7, 0.35, 0.22], [0.48, 0.2, 0.17]], np.float32)
    pick = rng.integers(0, len(palette), cells.ids.max() + 1)[cells.ids]
    shade = rng.uniform(0.8, 1.15, cells.ids.max() + 1).astype(np.float32)[cells.ids]
    n = fbm(size, 16, 4, rng)
    rgb = palette[pick] * (shade * (0.8 + 0.4 * n))[..., None]
    mortar = 1.0 - smoothstep(0.6, 1.8, cells.edge)
    return blend(rgb, np.array([0.72, 0.7, 0.66], np.float32) * (0.8 + 0.3 * n[..., None]), mortar)


def _bricks(size: int, rng: np.random.Generator) -> np.ndarray:
    return rgba(brick_rgb(size, rng, 8, 24), 0.05)


def _window(rgb: np.ndarray, alpha: np.ndarray, box: tuple[int, int, int, int], lit: bool) -> None:
    """A framed four-pane window with a stone sill, drawn in place; glass gets full specular mask."""
    x0, y0, x1, y1 = box
    rgb[y0 - 10 : y1 + 12, x0 - 8 : x1 + 8] = (0.78, 0.75, 0.68)
    rgb[y0:y1, x0:x1] = (0.92, 0.92, 0.9)
    gx0, gy0, gx1, gy1 = x0 + 6, y0 + 6, x1 - 6, y1 - 6
    rows = np.linspace(0.0, 1.0, gy1 - gy0, dtype=np.float32)[:, None, None]
    glass = (0.05, 0.08, 0.12) + rows * np.array([0.15, 0.2, 0.28], np.float32)
    if lit:
        glass = (0.95, 0.72, 0.35) - rows * np.array([0.3, 0.25, 0.15], np.float32)
    rgb[gy0:gy1, gx0:gx1] = glass
    alpha[gy0:gy1, gx0:gx1] = 1.0
    mx, my = (gx0 + gx1) // 2, (gy0 + gy1) // 2
    rgb[gy0:gy1, mx - 3 : mx + 3] = (0.92, 0.92, 0.9)
    rgb[my - 3 : my + 3, gx0:gx1] = (0.92, 0.92, 0.9)
    alpha[gy0:gy1, mx - 3 : mx + 3] = 0.0
    alpha[my - 3 : my + 3, gx0:gx1] = 0.0


def _facade_brick(size: int, rng: np.random.Generator) -> np.ndarray:
    """One storey, two windows wide (the tile is 4 m when box-mapped at 0.25 repeats per metre)."""
    rgb = brick_rgb(size, rng, 16, 48)
    alpha = np.full((size, size), 0.04, np.float32)
    s = size / 512
    for i, lit in enumerate((False, True)):
        x0 = int((i * 256 + 70) * s)
        _window(rgb, alpha, (x0, int(120 * s), x0 + int(116 * s), int(400 * s)), lit)
    return rgba(rgb, alpha)


def _facade_concrete(size: int, rng: np.random.Generator) -> np.ndarray:
    """Concrete panels with a ribbon window band and dark mullions every 32 pixels."""
    base = _concrete(size, rng)[..., :3]
    u, v = uv_grid(size)
    seams = (np.abs((u * 4) % 1.0 - 0.5) > 0.495) | (np.abs((v * 2) % 1.0 - 0.5) > 0.495)
    rgb = base * np.where(seams, 0.55, 1.0)[..., None]
    band = (v > 0.36) & (v < 0.68)
    reflection = blend((0.55, 0.65, 0.75), (0.12, 0.16, 0.22), smoothstep(0.36, 0.68, v))
    reflection *= 0.8 + 0.4 * value_noise(size, (4, 1), rng)[..., None]
    paint(rgb, band, reflection)
    mullions = band & ((u * 16) % 1.0 < 0.12)
    paint(rgb, mullions, (0.18, 0.18, 0.2))
    return rgba(rgb, np.where(band & ~mullions, 1.0, 0.05))


def _facade_glass(size: int, rng: np.random.Generator) -> np.ndarray:
    """Curtain wall: 4 x 4 tinted panes, some with blinds, behind thin aluminium mullions."""
    cells = cell_grid(size, 4, 4)
    _, v = uv_grid(size)
    tint = rng.uniform(0.7, 1.2, (cells.ids.max() + 1, 3)).astype(np.float32) * (0.1, 0.17, 0.22)
    rgb = tint[cells.ids] * (1.3 - 0.6 * cells.v)[..., None]
    blinds = (rng.random(cells.ids.max() + 1) < 0.35)[cells.ids] & ((v * 96) % 1.0 < 0.45) & (cells.v > 0.1)
    paint(rgb, blinds, (0.75, 0.73, 0.68))
    frame = cells.edge < 3.0
    paint(rgb, frame, (0.62, 0.64, 0.66))
    return rgba(rgb, np.where(frame | blinds, 0.3, 1.0))


def _shopfront(size: int, rng: np.random.Generator) -> np.ndarray:
    """A shop: header band, display window with goods, a glazed door and a kick plate."""
    s = size / 512
    rgb = np.broadcast_to(np.array([0.2, 0.2, 0.22], np.float32), (size, size, 3)).copy()
    alpha = np.full((size, size), 0.2, np.float32)
    rgb[: int(110 * s)] = (0.85, 0.83, 0.78)
    rgb[int(100 * s) : int(110 * s)] = (0.15, 0.15, 0.15)
    glass_y0, glass_y1 = int(140 * s), int(450 * s)
    for x0, x1 in ((int(30 * s), int(330 * s)), (int(370 * s), int(480 * s))):
        rows = np.linspace(0.0, 1.0, glass_y1 - glass_y0, dtype=np.float32)[:, None, None]
        rgb[glass_y0:glass_y1, x0:x1] = (0.35, 0.4, 0.45) - rows * np.array([0.25, 0.27, 0.3], np.float32)
        alpha[glass_y0:glass_y1, x0:x1] = 1.0
    for _ in range(14):
        w, h = rng.integers(int(16 * s), int(50 * s), 2)
        x = rng.integers(int(40 * s), int(320 * s) - w)
        y = glass_y1 - h - rng.integers(0, int(120 * s))
        rgb[y : y + h, x : x + w] = rng.uniform(0.2, 0.95, 3)
        alpha[y : y + h, x : x + w] = 0.5
    rgb[int(450 * s) :] = (0.5, 0.5, 0.52)
    return rgba(rgb, alpha)


def _signs(size: int, rng: np.random.Generator) -> np.ndarray:
    """An atlas of neon shop signs, one word per 1/8 of the height, readable left to right."""
    row_h = size // len(SIGN_WORDS)
    rgb = np.zeros((size, size, 3), np.float32)
    for row, word in enumerate(SIGN_WORDS):
        y0 = row * row_h
        colour = np.array(_SIGN_COLOURS[row % len(_SIGN_COLOURS)], np.float32)
        rgb[y0 : y0 + row_h] = 0.06
        rgb[y0 + 3 : y0 + 5, 4:-4] = colour * 0.6
        rgb[y0 + row_h - 5 : y0 + row_h - 3, 4:-4] = colour * 0.6
        scale = max(1, min((row_h - 16) // 7, (size - 24) // (6 * len(word))))
        mask = text_mask(word, scale)
        top, left = y0 + (row_h - mask.shape[0]) // 2, (size - mask.shape[1]) // 2
        paint(rgb[top : top + mask.shape[0], left : left + mask.shape[1]], mask, colour)
    return rgba(rgb, 0.6)


def _awning(size: int, rng: np.random.Generator) -> np.ndarray:
    u, _ = uv_grid(size)
    stripes = np.where((u * 8) % 1.0 < 0.5, 1.0, 0.35)
    n = 0.85 + 0.15 * fbm(size, 8, 3, rng)
    return rgba((stripes * n)[..., None] * np.ones(3, np.float32), 0.1)


def _metal(size: int, rng: np.random.Generator) -> np.ndarray:
    """Brushed panels with dark seams and rivet rows."""
    u, _ = uv_grid(size)
    brushed = value_noise(size, (4, 256), rng)
    grey = 0.48 + 0.14 * brushed + 0.08 * fbm(size, 4, 3, rng)
    cells = cell_grid(size, 2, 2)
    grey *= 0.3 + 0.7 * smoothstep(1.0, 3.0, cells.edge)
    rivet = np.hypot(((u * 16) % 1.0 - 0.5) * size / 16, cells.v * size / 2 - 10) < 3.0
    grey = np.where(rivet, 0.8, grey)
    return rgba(grey[..., None] * np.array([0.95, 0.97, 1.0], np.float32), 0.75)


def _hazard(size: int, rng: np.random.Generator) -> np.ndarray:
    u, v = uv_grid(size)
    stripe = ((u + v) * 4) % 1.0 < 0.5
    rgb = np.where(stripe[..., None], np.float32([0.95, 0.72, 0.05]), np.float32([0.06, 0.06, 0.06]))
    wear = smoothstep(0.6, 0.8, fbm(size, 8, 5, rng))
    return rgba(blend(rgb, (0.45, 0.43, 0.4), wear), 0.3)


def _chainlink(size: int, rng: np.random.Generator) -> np.ndarray:
    """Diamond wire mesh (alpha-tested): wires a couple of pixels wide at a 32-pixel pitch."""
    u, v = uv_grid(size)
    period = 16
    a, b = (u + v) * period, (u - v) * period
    dist = np.minimum(np.abs(a - np.round(a)), np.abs(b - np.round(b))) * size / period / np.sqrt(2)
    wire = dist < 1.4
    grey = 0.62 + 0.2 * value_noise(size, 32, rng)
    return rgba(grey[..., None] * np.ones(3, np.float32), wire.astype(np.float32))


def _grating(size: int, rng: np.random.Generator) -> np.ndarray:
    """Walkway grating (alpha-tested): square holes between bars."""
    cells = cell_grid(size, 16, 16)
    bars = cells.edge < 4.0
    grey = (0.35 + 0.2 * fbm(size, 8, 3, rng)) * (0.7 + 0.3 * smoothstep(0.0, 4.0, cells.edge))
    return rgba(grey[..., None] * np.array([0.9, 0.92, 1.0], np.float32), bars.astype(np.float32))


def wood_rgb(size: int, rng: np.random.Generator, light: tuple[float, float, float]) -> np.ndarray:
    """Wood grain running along u: rings from stretched noise."""
    rings = (value_noise(size, (2, 24), rng) * 10.0 + value_noise(size, (8, 64), rng)) % 1.0
    grain = smoothstep(0.2, 0.9, rings) * (0.85 + 0.15 * value_noise(size, (32, 256), rng))
    light_c = np.array(light, np.float32)
    return blend(light_c, light_c * 0.55, grain)


def _crate(size: int, rng: np.random.Generator) -> np.ndarray:
    """Wooden crate face: planks, a frame and a diagonal brace."""
    u, v = uv_grid(size)
    rgb = wood_rgb(size, rng, (0.72, 0.52, 0.3))
    gaps = ((v * 5) % 1.0) < 0.03
    rgb[gaps] *= 0.3
    frame = (np.minimum(np.minimum(u, 1 - u), np.minimum(v, 1 - v)) < 0.09) | (np.abs(u - v) < 0.07)
    paint(rgb, frame, wood_rgb(size, rng, (0.62, 0.42, 0.24)))
    border = np.abs(np.minimum(np.minimum(u, 1 - u), np.minimum(v, 1 - v)) - 0.09) < 0.004
    rgb[border] *= 0.4
    return rgba(rgb, 0.1)


def _arena_panel(size: int, rng: np.random.Generator) -> np.ndarray:
    """Sci-fi floor/wall panels: big bevelled plates, fine inset grid, small status lights."""
    big = cell_grid(size, 2, 2)
    small = cell_grid(size, 8, 8)
    n = fbm(size, 8, 4, rng)
    grey = (0.42 + 0.12 * n) * (0.35 + 0.65 * smoothstep(1.0, 5.0, big.edge))
    grey = np.where(small.edge < 1.2, grey * 0.6, grey)
    rgb = grey[..., None] * np.array([0.9, 0.95, 1.0], np.float32)
    lights = (np.abs(big.u - 0.5) < 0.06) & (np.abs(big.v - 0.1) < 0.015)
    paint(rgb, lights, (0.2, 0.9, 1.0))
    return rgba(rgb, 0.6 * smoothstep(1.0, 5.0, big.edge))


GENERATORS: dict[str, Generator] = {
    "white": _white,
    "concrete": _concrete,
    "asphalt": _asphalt,
    "road": _road,
    "pavers": _pavers,
    "bricks": _bricks,
    "facade_brick": _facade_brick,
    "facade_concrete": _facade_concrete,
    "facade_glass": _facade_glass,
    "shopfront": _shopfront,
    "signs": _signs,
    "awning": _awning,
    "metal": _metal,
    "hazard": _hazard,
    "chainlink": _chainlink,
    "grating": _grating,
    "crate": _crate,
    "arena_panel": _arena_panel,
}

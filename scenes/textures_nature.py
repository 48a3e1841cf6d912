"""Procedural textures for gardens and interiors: foliage cards, bark, stone, floors, wallpaper, books.

Same contract as ``textures_urban``: (size, rng) -> (size, size, 4) float32, alpha a specular mask for opaque
materials and coverage for the alpha-tested foliage cards.
"""

from __future__ import annotations

import numpy as np

from scenes.patterns import (
    blend,
    cell_grid,
    fbm,
    paint,
    rgba,
    smoothstep,
    stamp_ellipses,
    uv_grid,
    value_noise,
    voronoi,
)
from scenes.textures_urban import Generator, wood_rgb


def _tiles(size: int, rng: np.random.Generator) -> np.ndarray:
    """Glossy ceramic tiles: cream field with a diagonal terracotta pattern and grey grout."""
    cells = cell_grid(size, 8, 8)
    row, col = cells.ids // 8, cells.ids % 8
    accent = ((row + col) % 4 == 0)[..., None]
    rgb = np.where(accent, np.float32([0.62, 0.3, 0.2]), np.float32([0.88, 0.84, 0.74]))
    rgb = rgb * (0.92 + 0.1 * fbm(size, 16, 3, rng))[..., None]
    grout = cells.edge < 2.0
    paint(rgb, grout, (0.45, 0.44, 0.42))
    return rgba(rgb, np.where(grout, 0.05, 0.9))


def _checker(size: int, rng: np.random.Generator) -> np.ndarray:
    """Black and white marble checkerboard with veins."""
    u, v = uv_grid(size)
    cells = cell_grid(size, 4, 4)
    dark = ((cells.ids // 4 + cells.ids % 4) % 2 == 1)[..., None]
    warp = fbm(size, 4, 5, rng)
    veins = smoothstep(0.9, 0.99, np.abs(np.sin((u + v + warp * 1.5) * 14.0)))
    white = blend((0.92, 0.9, 0.86), (0.55, 0.55, 0.58), veins)
    black = blend((0.07, 0.07, 0.08), (0.5, 0.48, 0.45), veins)
    rgb = np.where(dark, black, white)
    rgb[cells.edge < 1.0] *= 0.5
    return rgba(rgb, 0.85)


def _parquet(size: int, rng: np.random.Generator) -> np.ndarray:
    """Staggered oak planks with thin dark joints."""
    cells = cell_grid(size, 2, 16, stagger=0.37)
    rgb = wood_rgb(size, rng, (0.7, 0.48, 0.27))
    tone = rng.uniform(0.75, 1.15, cells.ids.max() + 1).astype(np.float32)[cells.ids]
    rgb *= tone[..., None]
    rgb[cells.edge < 1.0] *= 0.35
    return rgba(rgb, 0.55)


def _wallpaper(size: int, rng: np.random.Generator) -> np.ndarray:
    """Muted green wallpaper: paired pinstripes and a lattice of small gold diamonds."""
    u, v = uv_grid(size)
    rgb = np.broadcast_to(np.float32([0.3, 0.42, 0.36]), (size, size, 3)).copy()
    rgb *= (0.9 + 0.1 * fbm(size, 8, 3, rng))[..., None]
    stripe = np.abs((u * 8) % 1.0 - 0.5)
    paint(rgb, (stripe > 0.44) & (stripe < 0.47), (0.78, 0.7, 0.45))
    du, dv = np.abs((u * 8) % 1.0 - 0.5), np.abs((v * 8 + 0.5) % 1.0 - 0.5)
    paint(rgb, du + dv < 0.14, (0.82, 0.72, 0.4))
    paint(rgb, (du + dv < 0.06), (0.3, 0.42, 0.36))
    return rgba(rgb, 0.1)


def _wood(size: int, rng: np.random.Generator) -> np.ndarray:
    return rgba(wood_rgb(size, rng, (0.55, 0.34, 0.18)), 0.45)


def _rug(size: int, rng: np.random.Generator) -> np.ndarray:
    """Persian-style rug: nested borders, a central medallion and a small repeated motif."""
    u, v = uv_grid(size)
    border = np.minimum(np.minimum(u, 1 - u), np.minimum(v, 1 - v))
    diamond = np.abs(u - 0.5) + np.abs(v - 0.5)
    motif = np.abs(np.sin(u * np.pi * 24)) * np.abs(np.sin(v * np.pi * 24))
    rgb = blend((0.55, 0.1, 0.1), (0.8, 0.6, 0.35), smoothstep(0.55, 0.7, motif))
    paint(rgb, diamond < 0.3, blend((0.1, 0.15, 0.35), (0.85, 0.75, 0.5), smoothstep(0.5, 0.7, motif)))
    paint(rgb, np.abs(diamond - 0.3) < 0.012, (0.9, 0.8, 0.55))
    paint(rgb, border < 0.1, (0.12, 0.16, 0.36))
    paint(rgb, (np.abs(border - 0.05) < 0.01) | (np.abs(border - 0.1) < 0.006), (0.88, 0.78, 0.5))
    rgb *= (0.8 + 0.25 * value_noise(size, 128, rng))[..., None]
    return rgba(rgb, 0.02)


def _books(size: int, rng: np.random.Generator) -> np.ndarray:
    """Two shelves of book spines with gilt bands, on a dark shelf interior."""
    rgb = np.full((size, size, 3), 0.06, np.float32)
    palette = np.float32(
        [
            [0.5, 0.1, 0.1],
            [0.1, 0.2, 0.45],
            [0.12, 0.35, 0.2],
            [0.6, 0.5, 0.3],
            [0.2, 0.15, 0.1],
            [0.75, 0.7, 0.6],
            [0.35, 0.1, 0.35],
        ]
    )
    row_h = size // 2
    for shelf in range(2):
        floor = (shelf + 1) * row_h - size // 20
        rgb[floor : (shelf + 1) * row_h] = (0.45, 0.3, 0.17)
        x = 2
        while x < size - 4:
            w, h = int(rng.integers(size // 50, size // 17)), int(rng.integers(row_h * 6 // 10, row_h * 9 // 10))
            colour = palette[rng.integers(len(palette))] * rng.uniform(0.7, 1.2)
            rgb[floor - h : floor, x : x + w - 1] = colour
            for band in (floor - h + h // 10, floor - h // 8):
                rgb[band : band + max(1, h // 40), x : x + w - 1] = (0.85, 0.7, 0.3)
            x += w
    return rgba(rgb, 0.15)


def _paintings(size: int, rng: np.random.Generator) -> np.ndarray:
    """A 2 x 2 atlas of framed paintings: landscape, grid abstract, rings, colour field."""
    u, v = uv_grid(size)
    cu, cv = (u * 2) % 1.0, (v * 2) % 1.0
    which = (v * 2).astype(int) * 2 + (u * 2).astype(int)
    hills = cv > 0.55 + 0.1 * np.sin(cu * 9.0) + 0.05 * np.sin(cu * 23.0)
    landscape = np.where(
        hills[..., None],
        blend((0.25, 0.45, 0.2), (0.1, 0.25, 0.1), cv),
        blend((0.95, 0.75, 0.45), (0.35, 0.55, 0.85), 1.0 - cv),
    )
    grid = (np.abs((cu * 5) % 1.0 - 0.5) > 0.45) | (np.abs((cv * 4) % 1.0 - 0.5) > 0.45)
    blocks = np.float32([[0.9, 0.1, 0.1], [0.95, 0.85, 0.1], [0.1, 0.2, 0.7], [0.92, 0.92, 0.9]])
    abstract = blocks[((cu * 5).astype(int) * 7 + (cv * 4).astype(int) * 3) % 4]
    abstract[grid] = 0.05
    ring_mask = (np.sin(np.hypot(cu - 0.5, cv - 0.5) * 60.0) > 0).astype(np.float32)
    rings = blend((0.9, 0.4, 0.1), (0.1, 0.3, 0.5), ring_mask)
    field = blend((0.7, 0.2, 0.3), (0.2, 0.1, 0.4), fbm(size, 4, 5, rng))
    rgb = np.select([which[..., None] == k for k in range(4)], [landscape, abstract, rings, field])
    frame = np.minimum(np.minimum(cu, 1 - cu), np.minimum(cv, 1 - cv)) < 0.07
    paint(rgb, frame, blend((0.55, 0.4, 0.12), (0.9, 0.75, 0.35), np.abs(np.sin(cu * 80.0 + cv * 80.0))))
    return rgba(rgb.astype(np.float32), np.where(frame, 0.8, 0.2))


def _grass_ground(size: int, rng: np.random.Generator) -> np.ndarray:
    patches = fbm(size, 4, 5, rng)
    streaks = value_noise(size, (128, 32), rng)
    rgb = blend((0.22, 0.38, 0.1), (0.36, 0.5, 0.16), patches)
    rgb *= (0.75 + 0.45 * streaks)[..., None]
    paint(rgb, value_noise(size, 96, rng) > 0.9, (0.3, 0.3, 0.14))
    return rgba(rgb, 0.05)


def _grass_blades(size: int, rng: np.random.Generator) -> np.ndarray:
    """Alpha-tested card of ~70 tapered, curved blades rooted at the bottom edge."""
    image = np.zeros((size, size, 4), np.float32)
    u, v = uv_grid(size)
    height = 1.0 - v
    for _ in range(70):
        root, tall, lean = rng.uniform(0.08, 0.92), rng.uniform(0.45, 0.97), rng.uniform(-0.25, 0.25)
        t = height / tall
        centre = root + lean * t**2
        width = 0.012 * (1.0 - t) + 0.0015
        blade = (t < 1.0) & (np.abs(u - centre) < width)
        colour = blend((0.12, 0.25, 0.05), np.float32(rng.uniform([0.35, 0.55, 0.1], [0.55, 0.75, 0.25])), t)
        paint(image[..., :3], blade, colour)
        image[..., 3][blade] = 1.0
    return image


def _foliage(size: int, rng: np.random.Generator, count: int, spread: float, background: bool) -> np.ndarray:
    """Scattered leaf ellipses in a rounded cluster; with ``background`` the card is opaque dark green."""
    image = np.zeros((size, size, 4), np.float32)
    if background:
        image[...] = (0.06, 0.14, 0.04, 1.0)
    radius = np.sqrt(rng.random(count)) * spread * size
    theta = rng.uniform(0, 2 * np.pi, count)
    centres = np.stack([size / 2 + radius * np.cos(theta), size / 2 + radius * np.sin(theta)], axis=1)
    if background:
        centres = rng.random((count, 2)) * size
    lengths = rng.uniform(0.018, 0.035, count) * size
    radii = np.stack([lengths, lengths * rng.uniform(0.3, 0.5, count)], axis=1)
    colours = rng.uniform([0.12, 0.3, 0.05], [0.35, 0.55, 0.15], (count, 3)) * rng.uniform(0.6, 1.1, (count, 1))
    stamp_ellipses(image, centres, radii, rng.uniform(0, np.pi, count), colours)
    return image


def _leaves(size: int, rng: np.random.Generator) -> np.ndarray:
    return _foliage(size, rng, 700, 0.44, background=False)


def _hedge(size: int, rng: np.random.Generator) -> np.ndarray:
    image = _foliage(size, rng, 1600, 0.5, background=True)
    image[..., 3] = 0.15
    return image


def _flowers(size: int, rng: np.random.Generator) -> np.ndarray:
    """Alpha-tested card: thin stems topped with five-petal blossoms in a few colours."""
    image = np.zeros((size, size, 4), np.float32)
    u, v = uv_grid(size)
    palette = np.float32([[0.95, 0.95, 0.9], [0.95, 0.8, 0.15], [0.9, 0.35, 0.6], [0.55, 0.35, 0.85]])
    for _ in range(14):
        x, top = rng.uniform(0.1, 0.9), rng.uniform(0.15, 0.6)
        stem = (np.abs(u - x) < 0.004) & (v > top)
        paint(image, stem, (0.15, 0.35, 0.08, 1.0))
        petals = np.array([[x * size + 9 * np.cos(a), top * size + 9 * np.sin(a)] for a in np.arange(5) * 1.2566])
        colour = palette[rng.integers(len(palette))]
        stamp_ellipses(image, petals, np.full((5, 2), (8.0, 5.0)), np.arange(5) * 1.2566, np.tile(colour, (5, 1)))
        centre = np.float32([[x * size, top * size]])
        stamp_ellipses(image, centre, np.float32([[4, 4]]), np.zeros(1), np.float32([[0.9, 0.7, 0.1]]))
    return image


def _bark(size: int, rng: np.random.Generator) -> np.ndarray:
    """Vertical plates separated by dark wandering fissures."""
    u, _ = uv_grid(size)
    warp = value_noise(size, (6, 3), rng) * 1.2 + value_noise(size, (16, 8), rng) * 0.3
    plates = smoothstep(0.05, 0.45, np.abs(np.sin((u * 9.0 + warp) * np.pi)))
    rgb = blend((0.1, 0.08, 0.06), (0.42, 0.35, 0.28), plates * (0.6 + 0.4 * fbm(size, 8, 4, rng)))
    return rgba(rgb, 0.05)


def stone_rgb(size: int, rng: np.random.Generator, cells: int, gap: float) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi stones with bevelled edges; returns (colour, stone mask in [0, 1])."""
    f1, f2, ids = voronoi(size, cells, rng)
    stone = smoothstep(gap, gap + 0.12, f2 - f1)
    hue = rng.uniform(0.96, 1.04, (cells * cells, 3)) * rng.uniform(0.65, 1.1, (cells * cells, 1))
    tone = hue.astype(np.float32) * (0.58, 0.55, 0.5)
    rgb = tone[ids] * (0.75 + 0.35 * fbm(size, 16, 3, rng))[..., None]
    return blend((0.12, 0.1, 0.08), rgb, stone), stone


def _cobble(size: int, rng: np.random.Generator) -> np.ndarray:
    rgb, stone = stone_rgb(size, rng, 10, 0.04)
    return rgba(rgb, 0.25 * stone)


def _rock(size: int, rng: np.random.Generator) -> np.ndarray:
    n = fbm(size, 4, 6, rng)
    ridged = 1.0 - np.abs(fbm(size, 8, 4, rng) * 2.0 - 1.0)
    grey = 0.38 + 0.35 * n - 0.25 * smoothstep(0.9, 0.98, ridged)
    return rgba(grey[..., None] * np.float32([1.0, 0.97, 0.92]), 0.1)


def _roof(size: int, rng: np.random.Generator) -> np.ndarray:
    """Overlapping scalloped shingles, shaded darker towards their upper edge."""
    cells = cell_grid(size, 16, 16, stagger=0.5)
    scallop = np.hypot(cells.u - 0.5, (cells.v - 0.25) * 0.7) < 0.58
    shade = rng.uniform(0.75, 1.1, cells.ids.max() + 1).astype(np.float32)[cells.ids] * (0.45 + 0.55 * cells.v)
    rgb = np.float32([0.55, 0.25, 0.18]) * shade[..., None]
    rgb[~scallop] *= 0.45
    return rgba(rgb, 0.2)


def _fabric(size: int, rng: np.random.Generator) -> np.ndarray:
    """Tight basket weave: alternating warp and weft threads."""
    u, v = uv_grid(size)
    warp = np.sin(u * np.pi * 128) * np.sign(np.sin(v * np.pi * 32))
    tone = 0.75 + 0.25 * warp * np.sign(np.sin(u * np.pi * 32))
    return rgba((tone * (0.9 + 0.1 * fbm(size, 8, 3, rng)))[..., None] * np.ones(3, np.float32), 0.05)


GENERATORS: dict[str, Generator] = {
    "tiles": _tiles,
    "checker": _checker,
    "parquet": _parquet,
    "wallpaper": _wallpaper,
    "wood": _wood,
    "rug": _rug,
    "books": _books,
    "paintings": _paintings,
    "grass_ground": _grass_ground,
    "grass_blades": _grass_blades,
    "leaves": _leaves,
    "hedge": _hedge,
    "flowers": _flowers,
    "bark": _bark,
    "cobble": _cobble,
    "rock": _rock,
    "roof": _roof,
    "fabric": _fabric,
}

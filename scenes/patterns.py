"""Deterministic numpy building blocks for procedural textures.

Everything here works on square float32 images of side ``size`` with pixel centres at ``(i + 0.5) / size``;
noise and cell patterns wrap around so that the textures built from them tile without seams.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

Colour = tuple[float, float, float]

# Classic 5x7 font: five column bytes per glyph, bit 0 is the top row.
_FONT = {
    "A": "7C1211127C",
    "B": "7F49494936",
    "C": "3E41414122",
    "D": "7F4141221C",
    "E": "7F49494941",
    "F": "7F09090901",
    "G": "3E4149497A",
    "H": "7F0808087F",
    "I": "00417F4100",
    "J": "2040413F01",
    "K": "7F08142241",
    "L": "7F40404040",
    "M": "7F020C027F",
    "N": "7F0408107F",
    "O": "3E4141413E",
    "P": "7F09090906",
    "Q": "3E4151215E",
    "R": "7F09192946",
    "S": "4649494931",
    "T": "01017F0101",
    "U": "3F4040403F",
    "V": "1F2040201F",
    "W": "3F4038403F",
    "X": "6314081463",
    "Y": "0708700807",
    "Z": "6151494543",
    "0": "3E5149453E",
    "1": "00427F4000",
    "2": "4261514946",
    "3": "2141454B31",
    "4": "1814127F10",
    "5": "2745454539",
    "6": "3C4A494930",
    "7": "0171090503",
    "8": "3649494936",
    "9": "064949291E",
    " ": "0000000000",
    "-": "0808080808",
    "!": "00005F0000",
    "&": "3649552250",
}


def rng_for(name: str) -> np.random.Generator:
    """A generator seeded from a name; crc32 because ``hash(str)`` is salted per process."""
    return np.random.default_rng(zlib.crc32(name.encode()))


def coords(size: int) -> np.ndarray:
    """Pixel-centre coordinates in [0, 1)."""
    return ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)


def uv_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) images: u grows to the right, v grows downwards (row index)."""
    c = coords(size)
    return np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size))


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def value_noise(size: int, cells: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Tileable smooth value noise in [0, 1]; ``cells`` may be (across, down) for stretched noise."""
    cx, cy = (cells, cells) if isinstance(cells, int) else cells
    grid = rng.random((cy, cx), dtype=np.float32)
    x, y = coords(size) * cx, coords(size) * cy
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = smoothstep(0.0, 1.0, x - x0), smoothstep(0.0, 1.0, y - y0)
    x0, y0 = x0 % cx, y0 % cy
    x1, y1 = (x0 + 1) % cx, (y0 + 1) % cy
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return (top * (1 - fy)[:, None] + bottom * fy[:, None]).astype(np.float32)


def fbm(size: int, cells: int, octaves: int, rng: np.random.Generator, gain: float = 0.5) -> np.ndarray:
    """Fractal sum of value-noise octaves, normalised to [0, 1]."""
    total = np.zeros((size, size), np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        total += amplitude * value_noise(size, cells * 2**octave, rng)
        norm += amplitude
        amplitude *= gain
    return total / norm


@dataclass(frozen=True)
class Cells:
    """A grid of rectangular cells: id per pixel, local (u, v) in [0, 1) and distance to the cell edge in pixels."""

    ids: np.ndarray
    u: np.ndarray
    v: np.ndarray
    edge: np.ndarray


def cell_grid(size: int, cols: int, rows: int, stagger: float = 0.0) -> Cells:
    """Rows of cells, every other row shifted by ``stagger`` of a cell (running bond for bricks)."""
    u, v = uv_grid(size)
    y = v * rows
    row = np.floor(y)
    x = u * cols + (row % 2) * stagger
    col = np.floor(x) % cols
    fu, fv = x - np.floor(x), y - row
    edge = np.minimum(np.minimum(fu, 1 - fu) * size / cols, np.minimum(fv, 1 - fv) * size / rows)
    return Cells((row * cols + col).astype(np.int64), fu, fv, edge)


def voronoi(size: int, cells: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tileable jittered-grid Voronoi: (nearest distance, second distance, nearest id), distances in cells."""
    jitter = rng.random((cells, cells, 2), dtype=np.float32) * 0.8 + 0.1
    u, v = uv_grid(size)
    x, y = u * cells, v * cells
    ix, iy = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    f1 = np.full((size, size), 9.0, np.float32)
    f2 = np.full((size, size), 9.0, np.float32)
    ids = np.zeros((size, size), np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            nx, ny = (ix + dx) % cells, (iy + dy) % cells
            px, py = ix + dx + jitter[ny, nx, 0], iy + dy + jitter[ny, nx, 1]
            d = np.hypot(x - px, y - py)
            closer = d < f1
            f2 = np.where(closer, f1, np.minimum(f2, d))
            ids = np.where(closer, ny * cells + nx, ids)
            f1 = np.minimum(f1, d)
    return f1, f2, ids


def text_mask(text: str, scale: int) -> np.ndarray:
    """Boolean pixels of ``text`` in the 5x7 font, each font pixel ``scale`` x ``scale``; unknown chars are blank."""
    columns = []
    for char in text.upper():
        code = _FONT.get(char, _FONT[" "])
        for i in range(5):
            byte = int(code[2 * i : 2 * i + 2], 16)
            columns.append([(byte >> bit) & 1 for bit in range(7)])
        columns.append([0] * 7)
    glyphs = np.array(columns[:-1], dtype=bool).T
    return np.kron(glyphs, np.ones((scale, scale), dtype=bool))


def paint(image: np.ndarray, mask: np.ndarray, colour: Colour | np.ndarray) -> None:
    """Set ``image`` (H, W, C) to ``colour`` where ``mask``; ``colour`` may be per pixel."""
    image[mask] = np.asarray(colour, np.float32) if np.ndim(colour) == 1 else colour[mask]


def blend(a: Colour | np.ndarray, b: Colour | np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel mix of two colours (or colour images) by weight image ``t``."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a + (b - a) * t[..., None]


def stamp_ellipses(
    image: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    angles: np.ndarray,
    colours: np.ndarray,
) -> None:
    """Draw filled rotated ellipses into an RGBA image (alpha set to 1), clipped to the image."""
    size = image.shape[0]
    for (cx, cy), (ra, rb), angle, colour in zip(centres, radii, angles, colours, strict=True):
        r = int(np.ceil(max(ra, rb))) + 1
        x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, size)
        y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, size)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        dx, dy = xx - cx, yy - cy
        c, s = np.cos(angle), np.sin(angle)
        inside = ((dx * c + dy * s) / ra) ** 2 + ((-dx * s + dy * c) / rb) ** 2 <= 1.0
        region = image[y0:y1, x0:x1]
        region[inside] = np.append(colour, 1.0)


def rgba(rgb: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    """Stack colour (H, W, 3) and alpha (H, W) or a constant into (H, W, 4), clipped to [0, 1]."""
    a = np.broadcast_to(np.asarray(alpha, np.float32), rgb.shape[:2])
    return np.clip(np.concatenate([rgb, a[..., None]], axis=-1), 0.0, 1.0).astype(np.float32)

"""Materials and props shared by several presets (trees, lamp posts, hanging wires)."""

from __future__ import annotations

import numpy as np

from scenes.camera import Vec3
from scenes.scene import Material, SceneBuilder, catenary, segments, trs

MATTE = Material(specular=0.1, shininess=16.0)
SATIN = Material(specular=0.5, shininess=48.0, reflect=0.15)
PAINT = Material(specular=1.0, shininess=90.0, reflect=0.4)
CHROME = Material(specular=1.5, shininess=200.0, reflect=1.0)
GLASS = Material(specular=1.5, shininess=160.0, reflect=0.85)
FOLIAGE = Material(specular=0.08, shininess=12.0, alpha_cut=0.5, double_sided=True)
WIREFRAME = Material(specular=0.6, shininess=40.0, alpha_cut=0.5, double_sided=True)  # fences, grating
GLOW = Material(specular=0.0, emissive=2.2, double_sided=True)
CARD = Material(specular=0.2, shininess=24.0, double_sided=True)


def tree(
    builder: SceneBuilder,
    rng: np.random.Generator,
    base: Vec3,
    height: float,
    crown: float,
    branches: int = 7,
) -> None:
    """A trunk, thin branches radiating from its upper half, and alpha-tested leaf clusters at their tips."""
    bx, by, bz = base
    trunk_r = 0.06 * height**0.8
    builder.add("cylinder", MATTE, "bark", trs((bx, by, bz), (trunk_r * 2, height, trunk_r * 2)), uv=(0, 0, 2, 3))
    starts, ends = [], []
    for i in range(branches):
        angle = 2 * np.pi * (i + rng.random() * 0.6) / branches
        y = by + height * rng.uniform(0.55, 0.95)
        reach = crown * rng.uniform(0.6, 1.0)
        start = np.array([bx, y, bz])
        end = start + reach * np.array([np.cos(angle), rng.uniform(0.3, 0.7), np.sin(angle)])
        starts.append(start)
        ends.append(end)
    starts_a, ends_a = np.array(starts), np.array(ends)
    builder.add("pole", MATTE, "bark", segments(starts_a, ends_a, trunk_r * 0.35))
    twig_ends = ends_a + rng.normal(0.0, crown * 0.25, ends_a.shape) + np.array([0.0, crown * 0.2, 0.0])
    builder.add("pole", MATTE, "bark", segments(ends_a, twig_ends, trunk_r * 0.15))
    crown_centre = np.array([bx, by + height, bz])
    clusters = np.concatenate([ends_a, twig_ends, crown_centre + rng.normal(0, crown * 0.35, (branches, 3))])
    sizes = rng.uniform(0.9, 1.4, len(clusters))[:, None] * crown
    tints = rng.uniform(0.8, 1.15, (len(clusters), 3)) * (1.0, rng.uniform(0.9, 1.1), 0.9)
    centred = clusters - sizes * (0.0, 0.5, 0.0)
    tilt = rng.uniform(-0.4, 0.4, len(clusters))
    builder.add("cross", FOLIAGE, "leaves", trs(centred, sizes, rng.uniform(0, np.pi, len(clusters)), tilt), tints)


def hanging_wires(builder: SceneBuilder, pairs: list[tuple[Vec3, Vec3]], sag: float, radius: float) -> None:
    """Thin dark cables (a few pixels or less on screen: a deliberate aliasing source)."""
    starts, ends = [], []
    for a, b in pairs:
        s, e = catenary(a, b, sag, 8)
        starts.append(s)
        ends.append(e)
    builder.add("pole", SATIN, "white", segments(np.concatenate(starts), np.concatenate(ends), radius), (0.05,) * 3)


def lamp_post(builder: SceneBuilder, base: Vec3, height: float, arm: Vec3) -> Vec3:
    """A dark metal post with an arm and a glowing head; returns the top of the post (for wires)."""
    x, y, z = base
    top = (x, y + height, z)
    builder.add("pole", SATIN, "metal", trs(base, (0.16, height, 0.16)), (0.25, 0.27, 0.3))
    head = (x + arm[0], y + height + arm[1], z + arm[2])
    builder.add("pole", SATIN, "metal", segments(np.array([top]), np.array([head]), 0.05), (0.25, 0.27, 0.3))
    builder.add("cube", MATTE, "metal", trs((head[0], head[1] - 0.18, head[2]), (0.5, 0.18, 0.3)), (0.2,) * 3)
    builder.add("cube", GLOW, "white", trs((head[0], head[1] - 0.2, head[2]), (0.42, 0.03, 0.24)), (1.0, 0.85, 0.6))
    return top

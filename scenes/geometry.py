"""Unit meshes that every scene is instanced from.

Each mesh is a non-indexed triangle list, float32 (N, 8): position xyz, normal xyz, uv. Solids stand on the
origin (y from 0 to 1, x and z in [-0.5, 0.5]) so that instance scale is simply width, height and depth.
Side faces map u to the viewer's right and v up, so text on them reads correctly from outside.
"""

from __future__ import annotations

from functools import cache

import numpy as np

_UP = np.array([0.0, 1.0, 0.0])


def _quad(corner: np.ndarray, u_axis: np.ndarray, v_axis: np.ndarray) -> np.ndarray:
    """Two triangles spanning ``corner + [0, 1] u_axis + [0, 1] v_axis``, facing ``u_axis x v_axis``."""
    normal = np.cross(u_axis, v_axis)
    normal /= np.linalg.norm(normal)
    p = [corner, corner + u_axis, corner + u_axis + v_axis, corner + v_axis]
    uv = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]
    return np.array([[*p[i], *normal, *uv[i]] for i in (0, 1, 2, 0, 2, 3)], np.float32)


def _cube() -> np.ndarray:
    faces = []
    for n in ([1, 0, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1]):
        n = np.array(n, np.float64)
        u = np.cross(_UP, n)
        faces.append(_quad(n * 0.5 - u * 0.5, u, _UP))
    faces.append(_quad(np.array([-0.5, 1.0, 0.5]), np.array([1.0, 0, 0]), np.array([0, 0, -1.0])))
    faces.append(_quad(np.array([-0.5, 0.0, -0.5]), np.array([1.0, 0, 0]), np.array([0, 0, 1.0])))
    return np.concatenate(faces)


def _plane() -> np.ndarray:
    """Horizontal unit square at y = 0 facing up."""
    return _quad(np.array([-0.5, 0.0, 0.5]), np.array([1.0, 0, 0]), np.array([0, 0, -1.0]))


def _card() -> np.ndarray:
    """Vertical unit square in the xy plane facing +z, bottom edge on the ground (signs, paintings, cards)."""
    return _quad(np.array([-0.5, 0.0, 0.0]), np.array([1.0, 0, 0]), _UP.copy())


def _cross() -> np.ndarray:
    """Three vertical cards 60 degrees apart (grass, bushes, leaf clusters); drawn double-sided."""
    parts = []
    for angle in (0.0, np.pi / 3, 2 * np.pi / 3):
        u = np.array([np.cos(angle), 0.0, -np.sin(angle)])
        parts.append(_quad(-0.5 * u, u, _UP.copy()))
    return np.concatenate(parts)


def _revolve(profile: list[tuple[float, float]], segments: int) -> np.ndarray:
    """Surface of revolution about y of a (radius, height) polyline, smooth normals, u around, v along."""
    rows = []
    for i in range(segments):
        a0, a1 = 2 * np.pi * i / segments, 2 * np.pi * (i + 1) / segments
        for j in range(len(profile) - 1):
            (r0, y0), (r1, y1) = profile[j], profile[j + 1]
            slope = np.array([r0 - r1, y1 - y0])  # outward normal of the profile segment in (r, y)
            slope /= np.linalg.norm(slope)
            quad = []
            for a, r, y, v in ((a0, r0, y0, j), (a1, r0, y0, j), (a1, r1, y1, j + 1), (a0, r1, y1, j + 1)):
                c, s = np.cos(a), -np.sin(a)
                n = (slope[1] * c, slope[0], slope[1] * s)
                quad.append([r * c, y, r * s, *n, a / (2 * np.pi), v / (len(profile) - 1)])
            rows.extend(quad[k] for k in (0, 2, 1, 0, 3, 2))
    return _orient(np.array(rows, np.float32))


def _orient(tris: np.ndarray) -> np.ndarray:
    """Flip triangles whose winding disagrees with their vertex normals, so back-face culling is safe."""
    t = tris.reshape(-1, 3, 8).copy()
    geometric = np.cross(t[:, 1, :3] - t[:, 0, :3], t[:, 2, :3] - t[:, 0, :3])
    flip = np.einsum("ij,ij->i", geometric, t[:, :, 3:6].sum(axis=1)) < 0
    t[flip] = t[flip][:, [0, 2, 1]]
    return t.reshape(-1, 8)


def _cylinder(segments: int = 16) -> np.ndarray:
    side = _revolve([(0.5, 0.0), (0.5, 1.0)], segments)
    caps = _revolve([(0.5, 1.0), (0.0, 1.0)], segments), _revolve([(0.0, 0.0), (0.5, 0.0)], segments)
    return np.concatenate([side, *caps])


def _sphere(segments: int = 20, rings: int = 12) -> np.ndarray:
    """Sphere of diameter 1 resting on the ground (centre at y = 0.5)."""
    angles = np.linspace(np.pi, 0.0, rings + 1)
    return _revolve([(0.5 * np.sin(a), 0.5 + 0.5 * np.cos(a)) for a in angles], segments)


def _cone(segments: int = 16) -> np.ndarray:
    return np.concatenate([_revolve([(0.5, 0.0), (0.0, 1.0)], segments), _revolve([(0.0, 0.0), (0.5, 0.0)], segments)])


@cache
def meshes() -> dict[str, np.ndarray]:
    """All unit meshes by name (built once; read-only)."""
    built = {
        "cube": _cube(),
        "plane": _plane(),
        "card": _card(),
        "cross": _cross(),
        "cylinder": _cylinder(),
        "pole": _cylinder(6),
        "sphere": _sphere(),
        "cone": _cone(),
    }
    for mesh in built.values():
        mesh.flags.writeable = False
    return built

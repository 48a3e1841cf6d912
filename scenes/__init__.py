"""Procedural game-like scenes rendered with moderngl: training frames for the upscaler and the demo's input.

Imports only numpy and moderngl (never torch) and creates no OpenGL context at import time.

    import scenes
    frame = scenes.render("city", t=1.5, width=640, height=360)          # native LR, (360, 640, 3) uint8
    truth = scenes.render("city", t=1.5, width=1280, height=720, supersample=2)  # anti-aliased HR

See docs/scenes.md for the presets, the determinism guarantee and how a window's context is shared.
"""

from __future__ import annotations

import numpy as np

from scenes.camera import Camera
from scenes.presets import PRESETS, camera_at
from scenes.renderer import HeadlessContextError, SceneRenderer, create_headless_context

__all__ = ["PRESETS", "Camera", "HeadlessContextError", "SceneRenderer", "camera_at", "create_headless_context",
           "render"]

_shared: SceneRenderer | None = None


def render(
    preset: str,
    t: float,
    width: int,
    height: int,
    *,
    supersample: int = 1,
    camera: Camera | None = None,
) -> np.ndarray:
    """Render with one process-wide headless renderer, created on first use (see ``SceneRenderer.render``)."""
    global _shared
    if _shared is None:
        _shared = SceneRenderer()
    return _shared.render(preset, t, width, height, supersample=supersample, camera=camera)

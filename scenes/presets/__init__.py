"""The preset registry: each preset module provides ``build() -> Scene`` and ``camera(t) -> Camera``."""

from __future__ import annotations

import math
from functools import cache
from types import ModuleType

from scenes.camera import Camera
from scenes.presets import arena, city, garden, interior
from scenes.scene import Scene

_MODULES: dict[str, ModuleType] = {"city": city, "garden": garden, "interior": interior, "arena": arena}
PRESETS: tuple[str, ...] = tuple(_MODULES)


def check_preset(preset: str) -> None:
    """Raise ValueError for a name that is not a preset."""
    if preset not in _MODULES:
        raise ValueError(f"unknown scene preset {preset!r}; choose one of {', '.join(PRESETS)}")


@cache
def build_scene(preset: str) -> Scene:
    """The preset's static scene, built once per process (it is deterministic, seeded per preset)."""
    check_preset(preset)
    return _MODULES[preset].build()


def camera_at(preset: str, t: float) -> Camera:
    """The preset's camera at ``t`` seconds on its looping path."""
    check_preset(preset)
    if not math.isfinite(t):
        raise ValueError(f"time t must be a finite number of seconds, got {t!r}")
    return _MODULES[preset].camera(float(t))

"""The texture array shared by all presets: every procedural layer, generated once per process.

All layers have the same size so that they fit one ``sampler2DArray``; a material picks its layer by index, so
one draw call can mix textures across instances.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from scenes import textures_nature, textures_urban
from scenes.patterns import rng_for

TEXTURE_SIZE = 512
_GENERATORS = {**textures_urban.GENERATORS, **textures_nature.GENERATORS}
LAYERS: tuple[str, ...] = tuple(_GENERATORS)


def layer_index(name: str) -> int:
    """Index of a named layer in the texture array."""
    try:
        return LAYERS.index(name)
    except ValueError:
        raise ValueError(f"unknown texture {name!r}; known textures: {', '.join(LAYERS)}") from None


@cache
def texture_stack(size: int = TEXTURE_SIZE) -> np.ndarray:
    """(layers, size, size, 4) uint8 RGBA, row 0 at the top of each image; cached because it takes ~a second."""
    layers = [_GENERATORS[name](size, rng_for(name)) for name in LAYERS]
    stack = np.rint(np.stack(layers) * 255.0).astype(np.uint8)
    stack.flags.writeable = False
    return stack

"""Seeded patch augmentations, applied identically to an HR patch and its LR patch.

The paper lists flips, rotations and "RGB alpha blending" without details. Our reading (docs/data.md):
- flips and 90-degree rotations: exact pixel permutations, so they commute with the HR/LR alignment;
- colour-channel permutation ("RGB"): one of the 6 orders of R, G, B;
- alpha blending: `a * x1 + (1 - a) * x2` of the patch with a second patch of the same source. For a bicubic LR
  the blend is done on the HRs and the LR is degraded afterwards (degrade is not linear: it rounds); for a native
  LR both LRs are blended with the same `a` and rounded back to 8-bit levels, as a rendered LR frame would be.

Parameters are drawn from a numpy Generator, so a patch's augmentation is a pure function of its seed.
"""

from dataclasses import dataclass

import numpy as np
import torch

from training.data.degrade import quantize_8bit

__all__ = ["AugmentConfig", "AugmentParams", "apply_geometry", "blend", "sample_augment"]


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run, and how often."""

    flip: bool = True  # horizontal and vertical flips, each with probability 0.5
    rotate: bool = True  # rotation by k * 90 degrees, k uniform in {0, 1, 2, 3}
    channel_permute_p: float = 0.5  # probability of a random (non-identity) order of R, G, B
    blend_p: float = 0.2  # probability of alpha blending with a second patch of the same source
    blend_alpha: tuple[float, float] = (0.3, 0.7)  # `a` uniform in this range; near 0 or 1 it would be a no-op

    def __post_init__(self) -> None:
        for name in ("channel_permute_p", "blend_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.augment.{name} must be in [0, 1], got {getattr(self, name)}")
        low, high = self.blend_alpha
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"data.augment.blend_alpha must be 0 <= low <= high <= 1, got {self.blend_alpha}")


NO_AUGMENT = AugmentConfig(flip=False, rotate=False, channel_permute_p=0.0, blend_p=0.0)

_PERMUTATIONS = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


@dataclass(frozen=True)
class AugmentParams:
    """The drawn augmentation of one patch. `blend_alpha` is None when the patch is not blended."""

    hflip: bool = False
    vflip: bool = False
    rot90: int = 0
    channels: tuple[int, int, int] = (0, 1, 2)
    blend_alpha: float | None = None


def sample_augment(cfg: AugmentConfig, rng: np.random.Generator) -> AugmentParams:
    """Draw one patch's augmentation. Always draws the same number of values, whatever `cfg` enables, so that
    switching one augmentation off leaves the others (and the crops drawn after) unchanged."""
    u = rng.random(4)
    perm = _PERMUTATIONS[int(rng.integers(len(_PERMUTATIONS)))]
    rot = int(rng.integers(4))
    alpha = float(rng.uniform(*cfg.blend_alpha))
    return AugmentParams(
        hflip=cfg.flip and bool(u[0] < 0.5),
        vflip=cfg.flip and bool(u[1] < 0.5),
        rot90=rot if cfg.rotate else 0,
        channels=perm if u[2] < cfg.channel_permute_p else (0, 1, 2),
        blend_alpha=alpha if u[3] < cfg.blend_p else None,
    )


def apply_geometry(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Flips, rotation and channel order of a (3, H, W) patch; the same params give aligned HR and LR results."""
    if params.hflip:
        x = torch.flip(x, dims=(-1,))
    if params.vflip:
        x = torch.flip(x, dims=(-2,))
    if params.rot90:
        x = torch.rot90(x, params.rot90, dims=(-2, -1))  # square patches keep their shape
    if params.channels != (0, 1, 2):
        x = x[list(params.channels)]
    return x.contiguous()


def blend(x1: torch.Tensor, x2: torch.Tensor, alpha: float, *, quantize: bool) -> torch.Tensor:
    """`alpha * x1 + (1 - alpha) * x2`; `quantize` rounds to 8-bit levels (for an LR that must stay one)."""
    mixed = alpha * x1 + (1.0 - alpha) * x2
    return quantize_8bit(mixed) if quantize else mixed

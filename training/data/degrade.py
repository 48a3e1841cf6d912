"""The project's canonical LR synthesis: antialiased bicubic down-sampling stored as 8 bits.

TAKDSR (like PISR) defines the LR input X as the bicubic down-sampling of the HR frame Y, stored as an 8-bit
image. Every LR made from an HR in this project (training patches, evaluation frames, the teacher's imitation
target) goes through `degrade`, so that a model never sees two slightly different kinds of "bicubic".
"""

import torch
import torch.nn.functional as F

# The one 8-bit rounding of the project (the teacher's CF' uses it too); its straight-through
# gradient is irrelevant here, where nothing needs a gradient.
from models import quantize_8bit

__all__ = ["degrade", "downscale_bicubic", "quantize_8bit"]


def _check_hr(hr: torch.Tensor, scale: int) -> None:
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if not torch.is_floating_point(hr):
        raise ValueError(f"hr must be a float tensor in [0, 1], got dtype {hr.dtype}; convert uint8 with x / 255")
    if hr.dim() not in (3, 4) or hr.shape[-3] != 3:
        raise ValueError(f"hr must be (3, H, W) or (B, 3, H, W), got shape {tuple(hr.shape)}")
    height, width = hr.shape[-2:]
    if height % scale or width % scale:
        raise ValueError(f"hr size {width}x{height} is not a multiple of scale {scale}; crop it first")


def downscale_bicubic(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Antialiased bicubic down-sampling by an integer factor, unclamped and unrounded.

    PyTorch's antialiased bicubic is a separable Keys cubic (a = -0.5) stretched by `scale`, with weights
    renormalised where the kernel leaves the image. `size=` rather than `scale_factor=1/scale` keeps the
    ratio exact (1/3 is not representable).
    """
    _check_hr(hr, scale)
    batched = hr if hr.dim() == 4 else hr.unsqueeze(0)  # (3, H, W) -> (1, 3, H, W)
    height, width = batched.shape[-2:]
    lr = F.interpolate(
        batched, size=(height // scale, width // scale), mode="bicubic", antialias=True, align_corners=False
    )  # (B, 3, H/s, W/s)
    return lr if hr.dim() == 4 else lr.squeeze(0)


def degrade(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """LR frame as an engine would store it: bicubic (antialiased) down-sampling, clamped, rounded to 8 bits.

    hr: (3, H, W) or (B, 3, H, W) float in [0, 1], H and W multiples of `scale`.
    Returns the same layout with H/scale, W/scale and the same dtype; every value is k/255.
    """
    return quantize_8bit(downscale_bicubic(hr, scale))

"""The teacher's encoder and its 8-bit discretisation (TAKDSR, Yoon et al., IEEE Access 2023, Eq. 1-3;
building on PISR, Lee et al., ECCV 2020).

The encoder sees the HR image and writes a "compact feature" (CF) with the size and channel count
of the LR image. Our layout (the paper leaves it open beyond "strided convolutions with skip
connections"):

    head   conv5x5 3->C, PReLU                       (B, 3, H, W)   -> (B, C, H, W)
    down   conv5x5 C->C stride s, PReLU              (B, C, H, W)   -> (B, C, H/s, W/s)
    body   conv3x3 C->C, PReLU, + down  (skip)       (B, C, H/s, W/s)
    tail   conv3x3 C->12, PReLU, conv3x3 12->3       (B, C, H/s, W/s) -> (B, 3, H/s, W/s)
    CF     tail + avgpool_s(HR)         (skip)

The global skip through an s x s average pool makes the CF start out as a plain downscaled image,
so the imitation loss |X - CF'| is small from the first step and the encoder only learns what to add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LEVELS", "CompactEncoder", "EncoderConfig", "quantize_8bit"]

LEVELS = 255  # an 8-bit image has LEVELS + 1 values: k / 255 for k in 0..255


class _Quantize8Bit(torch.autograd.Function):
    """Forward: round(clip(x, 0, 1) * 255) / 255. Backward: identity inside [0, 1], zero outside."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.round(x.clamp(0.0, 1.0) * LEVELS) / LEVELS

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        inside = (x >= 0.0) & (x <= 1.0)
        return grad_output * inside.to(grad_output.dtype)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Discretise to the 256 levels of an 8-bit image with a straight-through gradient."""
    return _Quantize8Bit.apply(x)


@dataclass(frozen=True)
class EncoderConfig:
    channels: int = 56  # width of the encoder's hidden layers (PISR: 56)
    scale: int = 2  # stride of the down-sampling conv = the decoder's upscaling factor
    discrete: bool = True  # True: TAKDSR's 8-bit CF'; False: PISR's continuous CF (the PISR' baseline)


class CompactEncoder(nn.Module):
    """HR image (B, 3, H, W) -> compact feature CF (B, 3, H/s, W/s); H and W multiples of s."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        width, scale = config.channels, config.scale
        self.head = nn.Sequential(nn.Conv2d(3, width, 5, padding=2), nn.PReLU(width))
        self.down = nn.Sequential(nn.Conv2d(width, width, 5, stride=scale, padding=2), nn.PReLU(width))
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.PReLU(width))
        self.tail = nn.Sequential(
            nn.Conv2d(width, 12, 3, padding=1), nn.PReLU(12), nn.Conv2d(12, 3, 3, padding=1)
        )

    def forward(self, hr: torch.Tensor) -> torch.Tensor:
        scale = self.config.scale
        if hr.shape[-2] % scale or hr.shape[-1] % scale:
            raise ValueError(f"HR size {tuple(hr.shape[-2:])} is not a multiple of the scale {scale}")
        down = self.down(self.head(hr))  # (B, C, H/s, W/s)
        residual = self.tail(self.body(down) + down)  # (B, 3, H/s, W/s)
        return residual + F.avg_pool2d(hr, scale)

    def decoder_input(self, cf: torch.Tensor) -> torch.Tensor:
        """CF' as the decoder reads it: 8-bit levels (TAKDSR) or the raw CF (PISR')."""
        return quantize_8bit(cf) if self.config.discrete else cf

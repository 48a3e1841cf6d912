"""PAN: Pixel Attention Network (Zhao et al., "Efficient Image Super-Resolution Using Pixel
Attention", ECCV Workshops 2020; official code zhaohengyuan1/PAN).

Layout, layer for layer as the official network (40/24 channels x 16 blocks = 261,403 parameters at
x2, 272,419 at x4): conv3x3 -> N x SCPA -> conv3x3 + long skip -> upsampling at HR by nearest
interpolation + conv3x3 + pixel attention + conv3x3 (twice at x4) -> conv3x3 to RGB, plus a bilinear
upscale of the input as a global residual.
SCPA = self-calibrated block with pixel attention: two 1x1 halves, one plain 3x3 branch, one
pixel-attention-conv branch, concatenated, 1x1, residual add. LeakyReLU(0.2) throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import SRDecoder, conv

__all__ = ["PAN", "SCPA", "PAConv", "PANConfig", "PixelAttention"]


@dataclass(frozen=True)
class PANConfig:
    channels: int = 40  # feature width at LR
    up_channels: int = 24  # feature width of the HR upsampling path
    blocks: int = 16  # number of SCPA blocks (teacher 16, TA 8, student 1)
    scale: int = 2  # upscaling factor: 2, 3 or 4


class PixelAttention(nn.Module):
    """x * sigmoid(conv1x1(x))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class PAConv(nn.Module):
    """Pixel-attention convolution: conv3x3(x) gated by sigmoid(conv1x1(x)), then conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.k2 = nn.Conv2d(channels, channels, 1)
        self.k3 = conv(channels, channels, 3, bias=False)
        self.k4 = conv(channels, channels, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k4(self.k3(x) * torch.sigmoid(self.k2(x)))


class SCPA(nn.Module):
    """Self-Calibrated convolution with Pixel Attention (reduction 2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1_a = nn.Conv2d(channels, half, 1, bias=False)
        self.conv1_b = nn.Conv2d(channels, half, 1, bias=False)
        self.k1 = conv(half, half, 3, bias=False)
        self.pa_conv = PAConv(half)
        self.conv3 = nn.Conv2d(half * 2, channels, 1, bias=False)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch_a = self.act(self.k1(self.act(self.conv1_a(x))))
        branch_b = self.act(self.pa_conv(self.act(self.conv1_b(x))))
        return self.conv3(torch.cat([branch_a, branch_b], dim=1)) + x


class _UpStage(nn.Module):
    """Nearest upscale by `factor`, conv3x3, pixel attention, conv3x3 (each followed by LeakyReLU)."""

    def __init__(self, in_channels: int, channels: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.upconv = conv(in_channels, channels, 3)
        self.att = PixelAttention(channels)
        self.hrconv = conv(channels, channels, 3)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.upconv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))
        return self.act(self.hrconv(self.act(self.att(x))))


class PAN(SRDecoder):
    family = "pan"

    def __init__(self, config: PANConfig) -> None:
        super().__init__(config)
        if config.scale not in (2, 3, 4):
            raise ValueError(f"PAN supports scales 2, 3 and 4, not {config.scale}")
        self.conv_first = conv(3, config.channels, 3)
        self.blocks = nn.ModuleList(SCPA(config.channels) for _ in range(config.blocks))
        self.trunk_conv = conv(config.channels, config.channels, 3)
        # x4 is two x2 stages, as in the official code; x2 and x3 are one stage.
        factors = [2, 2] if config.scale == 4 else [config.scale]
        widths = [config.channels] + [config.up_channels] * len(factors)
        self.up_stages = nn.ModuleList(_UpStage(widths[i], config.up_channels, f) for i, f in enumerate(factors))
        self.conv_last = conv(config.up_channels, 3, 3)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.conv_first(x)  # (B, 3, h, w) -> (B, C, h, w)
        deep = shallow
        for block in self.blocks:
            deep = block(deep)
        return self.trunk_conv(deep) + shallow

    def reconstruct(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hr = features
        for stage in self.up_stages:
            hr = stage(hr)  # (B, C, h, w) -> (B, U, h*s, w*s) after the last stage
        base = F.interpolate(x, scale_factor=self.config.scale, mode="bilinear", align_corners=False)
        return self.conv_last(hr) + base

"""RLFN: Residual Local Feature Network (Kong et al., "Residual Local Feature Network for
Efficient Super-Resolution", CVPR Workshops 2022; official code bytedance/RLFN).

Layout, layer for layer as the official network (52 channels x 6 blocks = 526,856 parameters at x2):
conv3x3 -> N x RLFB -> conv3x3 + long skip -> conv3x3 to 3*s*s channels -> PixelShuffle.
RLFB = three conv3x3 + LeakyReLU(0.05), residual add, conv1x1, ESA (16 channels).

Difference from the official code: values are in [0, 1] (the official code feeds 0-255).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .base import SRDecoder, conv, pixel_shuffle_upsampler

__all__ = ["ESA", "RLFB", "RLFN", "RLFNConfig"]

# ESA's stride-2 conv (no padding) then 7x7/3 max-pool need at least 15 input pixels per side.
ESA_MIN_INPUT = 15


@dataclass(frozen=True)
class RLFNConfig:
    channels: int = 52  # feature width of every block (RLFN: 52, RLFN-S: 48)
    blocks: int = 6  # number of RLFB blocks (teacher 6, TA 3, student 1)
    scale: int = 2  # upscaling factor: 2, 3 or 4
    esa_channels: int = 16  # width inside the ESA attention


class ESA(nn.Module):
    """Enhanced Spatial Attention, RLFN's light version: a mask computed at 1/6 resolution."""

    def __init__(self, esa_channels: int, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, esa_channels, 1)
        self.conv_f = nn.Conv2d(esa_channels, esa_channels, 1)
        self.conv2 = nn.Conv2d(esa_channels, esa_channels, 3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(esa_channels, esa_channels, 3, padding=1)
        self.conv4 = nn.Conv2d(esa_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.conv1(x)  # (B, f, H, W)
        pooled = F.max_pool2d(self.conv2(reduced), kernel_size=7, stride=3)  # (B, f, ~H/6, ~W/6)
        context = F.interpolate(self.conv3(pooled), size=x.shape[-2:], mode="bilinear", align_corners=False)
        mask = torch.sigmoid(self.conv4(context + self.conv_f(reduced)))  # (B, C, H, W)
        return x * mask


class RLFB(nn.Module):
    """Residual Local Feature Block."""

    def __init__(self, channels: int, esa_channels: int) -> None:
        super().__init__()
        self.c1_r = conv(channels, channels, 3)
        self.c2_r = conv(channels, channels, 3)
        self.c3_r = conv(channels, channels, 3)
        self.c5 = conv(channels, channels, 1)
        self.esa = ESA(esa_channels, channels)
        self.act = nn.LeakyReLU(0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.c1_r(x))
        out = self.act(self.c2_r(out))
        out = self.act(self.c3_r(out))
        return self.esa(self.c5(out + x))


class RLFN(SRDecoder):
    family = "rlfn"
    min_input_size = ESA_MIN_INPUT

    def __init__(self, config: RLFNConfig) -> None:
        super().__init__(config)
        self.conv_1 = conv(3, config.channels, 3)
        self.blocks = nn.ModuleList(RLFB(config.channels, config.esa_channels) for _ in range(config.blocks))
        self.conv_2 = conv(config.channels, config.channels, 3)
        self.upsampler = pixel_shuffle_upsampler(config.channels, config.scale)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.conv_1(x)  # (B, 3, h, w) -> (B, C, h, w)
        deep = shallow
        for block in self.blocks:
            deep = block(deep)
        return self.conv_2(deep) + shallow

    def reconstruct(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.upsampler(features)  # (B, C, h, w) -> (B, 3, h*s, w*s)

    def widened(self, multiple: int) -> RLFN:
        """The same function with the feature width rounded up to a multiple of ``multiple`` (e.g. 52 -> 56 for
        fp16 tensor-core convolutions, which want channel counts divisible by 8). The extra channels have zero
        weights and biases, so they stay zero through every layer: LeakyReLU(0) = 0, the residual adds add zeros,
        and ESA's mask (sigmoid(0) = 0.5) multiplies a zero. Only the summation order of the convolutions can
        change the last bits of the output."""
        width = -(-self.config.channels // multiple) * multiple
        wide = RLFN(replace(self.config, channels=width)).to(next(self.parameters()).device)
        sources = self.state_dict()
        padded = {}
        for name, target in wide.state_dict().items():
            source = sources[name]  # same rank; a dimension of `channels` grows to `width`
            padded[name] = torch.zeros_like(target)
            padded[name][tuple(slice(0, size) for size in source.shape)] = source
        wide.load_state_dict(padded)
        return wide

"""RFDN: Residual Feature Distillation Network (Liu et al., "Residual Feature Distillation Network
for Lightweight Image Super-Resolution", ECCV Workshops 2020; official code njulj/RFDN).

Layout, layer for layer as the official network (48 ch x 6 blocks = 566,364 and 50 ch x 4 blocks =
417,212 parameters at x2): conv3x3 -> N x RFDB -> concat of all block outputs -> conv1x1 +
LeakyReLU(0.05) -> conv3x3 + long skip -> conv3x3 to 3*s*s channels -> PixelShuffle.
RFDB = three (1x1 distillation conv, 3x3 shallow residual conv) steps and a last 3x3 conv, the four
distilled halves concatenated, conv1x1, ESA (channels/4 wide).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import SRDecoder, conv, pixel_shuffle_upsampler
from .rlfn import ESA_MIN_INPUT

__all__ = ["RFDB", "RFDN", "RFDNESA", "RFDNConfig"]


@dataclass(frozen=True)
class RFDNConfig:
    channels: int = 48  # feature width (the official AIM 2020 model: 50 x 4 blocks)
    blocks: int = 6  # number of RFDB blocks (teacher 6, TA 3, student 1)
    scale: int = 2  # upscaling factor: 2, 3 or 4


class RFDNESA(nn.Module):
    """Enhanced Spatial Attention as in RFDN: a deeper context branch than RLFN's."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = channels // 4
        self.conv1 = nn.Conv2d(channels, inner, 1)
        self.conv_f = nn.Conv2d(inner, inner, 1)
        self.conv_max = nn.Conv2d(inner, inner, 3, padding=1)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(inner, inner, 3, padding=1)
        self.conv3_ = nn.Conv2d(inner, inner, 3, padding=1)
        self.conv4 = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.conv1(x)  # (B, C/4, H, W)
        pooled = F.max_pool2d(self.conv2(reduced), kernel_size=7, stride=3)  # (B, C/4, ~H/6, ~W/6)
        context = F.relu(self.conv_max(pooled))
        context = self.conv3_(F.relu(self.conv3(context)))
        context = F.interpolate(context, size=x.shape[-2:], mode="bilinear", align_corners=False)
        mask = torch.sigmoid(self.conv4(context + self.conv_f(reduced)))  # (B, C, H, W)
        return x * mask


class RFDB(nn.Module):
    """Residual Feature Distillation Block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        distilled = channels // 2
        self.c1_d = conv(channels, distilled, 1)
        self.c1_r = conv(channels, channels, 3)
        self.c2_d = conv(channels, distilled, 1)
        self.c2_r = conv(channels, channels, 3)
        self.c3_d = conv(channels, distilled, 1)
        self.c3_r = conv(channels, channels, 3)
        self.c4 = conv(channels, distilled, 3)
        self.c5 = conv(distilled * 4, channels, 1)
        self.esa = RFDNESA(channels)
        self.act = nn.LeakyReLU(0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distilled_1 = self.act(self.c1_d(x))
        remaining_1 = self.act(self.c1_r(x) + x)
        distilled_2 = self.act(self.c2_d(remaining_1))
        remaining_2 = self.act(self.c2_r(remaining_1) + remaining_1)
        distilled_3 = self.act(self.c3_d(remaining_2))
        remaining_3 = self.act(self.c3_r(remaining_2) + remaining_2)
        distilled_4 = self.act(self.c4(remaining_3))
        fused = torch.cat([distilled_1, distilled_2, distilled_3, distilled_4], dim=1)  # (B, 2C, H, W)
        return self.esa(self.c5(fused))


class RFDN(SRDecoder):
    family = "rfdn"
    min_input_size = ESA_MIN_INPUT

    def __init__(self, config: RFDNConfig) -> None:
        super().__init__(config)
        self.fea_conv = conv(3, config.channels, 3)
        self.blocks = nn.ModuleList(RFDB(config.channels) for _ in range(config.blocks))
        # The official `c`: fuses the concatenated outputs of every block, so its input width
        # depends on the block count (see adapt_teacher_tensor).
        self.fuse = nn.Sequential(conv(config.channels * config.blocks, config.channels, 1), nn.LeakyReLU(0.05))
        self.lr_conv = conv(config.channels, config.channels, 3)
        self.upsampler = pixel_shuffle_upsampler(config.channels, config.scale)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.fea_conv(x)  # (B, 3, h, w) -> (B, C, h, w)
        block_outputs = []
        deep = shallow
        for block in self.blocks:
            deep = block(deep)
            block_outputs.append(deep)
        fused = self.fuse(torch.cat(block_outputs, dim=1))  # (B, C*N, h, w) -> (B, C, h, w)
        return self.lr_conv(fused) + shallow

    def reconstruct(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.upsampler(features)  # (B, C, h, w) -> (B, 3, h*s, w*s)

    def adapt_teacher_tensor(self, name: str, teacher_tensor: torch.Tensor) -> torch.Tensor:
        # The fusion conv reads C channels per block; the kept (first) blocks own the first slices.
        if name == "fuse.0.weight":
            return teacher_tensor[:, : self.config.channels * self.config.blocks]
        return teacher_tensor

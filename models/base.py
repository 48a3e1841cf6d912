"""What every super-resolution decoder in this package shares.

A decoder maps an LR image to an HR image in two halves: ``extract_features`` (the LR-sized
feature map after the residual blocks, used for feature distillation) and ``reconstruct``
(the upsampler). Teacher, TA and student of one family differ only in ``blocks``, so their
feature maps have the same shape and their shared tensors can be copied between them.

Values are floats in [0, 1], RGB, NCHW, everywhere in the project.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["SRDecoder", "conv", "pixel_shuffle_upsampler"]


def conv(in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = True) -> nn.Conv2d:
    """A 'same'-padded convolution, the building brick of all three official code bases."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=bias)


def pixel_shuffle_upsampler(channels: int, scale: int, out_channels: int = 3) -> nn.Sequential:
    """conv3x3 to out*s*s channels, then PixelShuffle: (B, C, H, W) -> (B, out, H*s, W*s)."""
    return nn.Sequential(conv(channels, out_channels * scale * scale, 3), nn.PixelShuffle(scale))


class SRDecoder(nn.Module):
    """Base class: LR image (B, 3, h, w) -> HR image (B, 3, h*s, w*s), plus the distillation feature.

    Subclasses set ``family`` and ``min_input_size`` and implement ``extract_features`` and
    ``reconstruct``. The decoder's blocks live in an ``nn.ModuleList`` (``self.blocks`` in the three of the paper):
    ``models.teacher.init_from_teacher`` copies every tensor a smaller decoder of the family has by its name, so
    blocks numbered by position keep the teacher's first ones.
    """

    family: ClassVar[str]
    # Smallest LR height/width the network accepts (ESA's strided conv + 7x7 pooling need 15).
    min_input_size: ClassVar[int] = 1

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def scale(self) -> int:
        return int(self.config.scale)

    def arch_args(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this network through ``models.build_model``."""
        return asdict(self.config)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, C, h, w): the feature after the blocks, before the upsampler."""
        raise NotImplementedError

    def reconstruct(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features and the (B, 3, h, w) input -> (B, 3, h*s, w*s) image."""
        raise NotImplementedError

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.extract_features(x)
        return self.reconstruct(features, x), features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(self.extract_features(x), x)

    def adapt_teacher_tensor(self, name: str, teacher_tensor: torch.Tensor) -> torch.Tensor:
        """Map a teacher's tensor onto this (smaller) network's tensor of the same name.

        Same-shaped tensors are copied as they are; families whose non-block layers depend on
        the block count (RFDN's fusion conv) override this to take the matching slice.
        """
        return teacher_tensor

"""The TAKDSR teacher (encoder + full decoder) and the initialisation of smaller decoders from it.

The teacher reads the HR image Y, encodes it into the LR-sized compact feature CF, discretises it to
CF' and decodes CF' back to Y_T (paper Eq. 1-3). The TA and the student are decoders of the same
family and width with fewer blocks; ``init_from_teacher`` copies every tensor they share with the
teacher's decoder, keeping the teacher's FIRST ``blocks`` blocks (block i of the small network
starts as block i of the teacher, so the path conv -> blocks -> conv -> upsampler stays the one the
teacher trained) and dropping the rest.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn

from .base import SRDecoder
from .encoder import CompactEncoder

__all__ = ["Teacher", "TeacherOutput", "init_from_teacher", "min_lr_size"]


class TeacherOutput(NamedTuple):
    image: torch.Tensor  # Y_T: (B, 3, H, W)
    cf: torch.Tensor  # the encoder's raw compact feature: (B, 3, H/s, W/s)
    cf_prime: torch.Tensor  # CF', what the decoder read: 8-bit levels, or CF itself when continuous
    features: torch.Tensor  # f_T: the decoder's feature before the upsampler, (B, C, H/s, W/s)


class Teacher(nn.Module):
    """Encoder + full decoder. ``forward(hr)`` returns a ``TeacherOutput``."""

    min_input_size: int

    def __init__(self, encoder: CompactEncoder, decoder: SRDecoder) -> None:
        super().__init__()
        if encoder.config.scale != decoder.scale:
            raise ValueError(f"encoder scale {encoder.config.scale} != decoder scale {decoder.scale}")
        self.encoder = encoder
        self.decoder = decoder
        # The teacher reads HR images; its decoder then needs an LR-sized CF of at least its minimum.
        self.min_input_size = decoder.min_input_size * decoder.scale

    @property
    def scale(self) -> int:
        return self.decoder.scale

    @property
    def discrete(self) -> bool:
        return self.encoder.config.discrete

    def arch_args(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this teacher through ``models.build_model``."""
        return {
            **self.decoder.arch_args(),
            "encoder_channels": self.encoder.config.channels,
            "discrete": self.encoder.config.discrete,
        }

    def forward(self, hr: torch.Tensor) -> TeacherOutput:
        cf = self.encoder(hr)
        cf_prime = self.encoder.decoder_input(cf)
        image, features = self.decoder.forward_with_features(cf_prime)
        return TeacherOutput(image, cf, cf_prime, features)


def min_lr_size(model: nn.Module) -> int:
    """The smallest LR height and width a model works at: a decoder's own minimum; a teacher's decoder's (the
    teacher reads an HR image `scale` times that)."""
    return int((model.decoder if isinstance(model, Teacher) else model).min_input_size)


def init_from_teacher(teacher: Teacher | SRDecoder, blocks: int) -> SRDecoder:
    """A decoder like the teacher's but with ``blocks`` blocks, every shared tensor copied.

    Kept: the head conv, the first ``blocks`` blocks, the post-block conv(s) and the upsampler
    (for RFDN the fusion conv's input slices of the kept blocks). Dropped: the later blocks.
    """
    source = teacher.decoder if isinstance(teacher, Teacher) else teacher
    if not 1 <= blocks <= source.config.blocks:
        raise ValueError(f"blocks must be in 1..{source.config.blocks}, got {blocks}")
    small = type(source)(replace(source.config, blocks=blocks))
    teacher_state = source.state_dict()
    with torch.no_grad():
        for name, tensor in small.state_dict().items():
            adapted = small.adapt_teacher_tensor(name, teacher_state[name])
            if adapted.shape != tensor.shape:  # copy_ said only "the size of tensor a (8) must match ... (32)"
                raise ValueError(
                    f"{type(small).__name__}: the teacher's {name} is {tuple(adapted.shape)}, a {blocks}-block "
                    f"decoder's {tuple(tensor.shape)}: a layer outside the blocks whose shape follows the block "
                    "count needs adapt_teacher_tensor (docs/architecture.md, Adding a backbone)")
            tensor.copy_(adapted)
    return small

"""Parameter and compute counts, measured with ``torch.utils.flop_counter`` on meta tensors.

FlopCounterMode counts the matrix work (convolutions, matmuls) as 2 FLOPs per multiply-accumulate;
elementwise work (activations, attention masks, interpolation) is not counted, as is usual for
SR papers. Running on the meta device costs no memory or time, even at 4K.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_macs", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, height: int, width: int) -> int:
    """FLOPs of one forward pass on a (1, 3, height, width) input (the image the model reads)."""
    meta_model = _meta_copy(model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model(torch.empty(1, 3, height, width, device="meta"))
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, height: int, width: int) -> int:
    return count_flops(model, height, width) // 2


def _meta_copy(model: nn.Module) -> nn.Module:
    # A structural copy with no storage: to(meta) on a deepcopy keeps the caller's model untouched.
    return copy.deepcopy(model).to("meta").eval()

"""The 8-bit discretisation of the compact feature: exact levels forward, straight-through backward."""

from __future__ import annotations

import torch

from models import quantize_8bit


def test_forward_values_lie_exactly_on_the_256_levels() -> None:
    x = torch.linspace(-0.5, 1.5, 10_001)
    q = quantize_8bit(x)
    levels = torch.arange(256, dtype=torch.float32) / 255
    assert torch.isin(q, levels).all()
    assert q.min() == 0.0 and q.max() == 1.0


def test_forward_is_round_of_clip() -> None:
    x = torch.rand(4, 3, 8, 8) * 1.4 - 0.2
    expected = torch.round(x.clamp(0, 1) * 255) / 255
    assert torch.equal(quantize_8bit(x), expected)


def test_gradient_is_one_inside_and_zero_outside_the_range() -> None:
    x = torch.tensor([-0.3, -1e-4, 0.0, 0.2, 0.5004, 0.999, 1.0, 1.0001, 2.0], requires_grad=True)
    upstream = torch.arange(1.0, 10.0)
    quantize_8bit(x).backward(upstream)
    inside = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(x.grad, upstream * inside)

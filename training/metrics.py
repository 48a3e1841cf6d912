"""PSNR and SSIM as SR papers report them: on 8-bit images, RGB or Y (BT.601), with a border of
`scale` pixels shaved; SSIM with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03.

Inputs are float tensors in [0, 1], (3, H, W); both are first rounded to the 256 levels, as the
images a user sees would be.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["image_metrics", "psnr", "quantize", "ssim", "to_y"]

# ITU-R BT.601 luma for [0, 255] RGB, giving Y in [16, 235] (MATLAB's rgb2ycbcr, the SR convention).
_Y_WEIGHTS = (65.481, 128.553, 24.966)


def quantize(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> the 0..255 levels as float64 (clamped, rounded)."""
    return torch.round(image.detach().to(torch.float64).clamp(0, 1) * 255)


def to_y(image_255: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 255] -> (1, H, W) Y in [16, 235]."""
    weights = torch.tensor(_Y_WEIGHTS, dtype=image_255.dtype, device=image_255.device).view(3, 1, 1)
    return 16.0 + (image_255 * weights).sum(dim=0, keepdim=True) / 255.0


def _prepare(sr: torch.Tensor, hr: torch.Tensor, shave: int, y_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if sr.shape != hr.shape or sr.dim() != 3 or sr.shape[0] != 3:
        raise ValueError(f"expected two (3, H, W) images of one size, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    a, b = quantize(sr), quantize(hr)
    if y_only:
        a, b = to_y(a), to_y(b)
    if shave:
        a, b = a[:, shave:-shave, shave:-shave], b[:, shave:-shave, shave:-shave]
    return a, b


def psnr(sr: torch.Tensor, hr: torch.Tensor, *, shave: int = 0, y_only: bool = False) -> float:
    a, b = _prepare(sr, hr, shave, y_only)
    mse = torch.mean((a - b) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel_1d /= kernel_1d.sum()
    return torch.outer(kernel_1d, kernel_1d).view(1, 1, size, size)


def ssim(sr: torch.Tensor, hr: torch.Tensor, *, shave: int = 0, y_only: bool = False) -> float:
    """Mean SSIM over the valid (unpadded) window positions, averaged over channels."""
    a, b = _prepare(sr, hr, shave, y_only)
    window = _gaussian_window().to(a.device)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a, b = a.unsqueeze(1), b.unsqueeze(1)  # (C, 1, H, W): one SSIM map per channel
    mu_a, mu_b = F.conv2d(a, window), F.conv2d(b, window)
    var_a = F.conv2d(a * a, window) - mu_a**2
    var_b = F.conv2d(b * b, window) - mu_b**2
    cov = F.conv2d(a * b, window) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean().item()


def image_metrics(sr: torch.Tensor, hr: torch.Tensor, scale: int) -> dict[str, float]:
    """The four numbers of the report for one image: PSNR and SSIM on RGB and on Y."""
    return {
        "psnr_rgb": psnr(sr, hr, shave=scale),
        "ssim_rgb": ssim(sr, hr, shave=scale),
        "psnr_y": psnr(sr, hr, shave=scale, y_only=True),
        "ssim_y": ssim(sr, hr, shave=scale, y_only=True),
    }

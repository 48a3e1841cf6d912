"""PSNR and SSIM as SR papers report them: on 8-bit images, RGB or Y (BT.601), with a border of
`scale` pixels shaved; SSIM with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03.

Inputs are float tensors in [0, 1], (3, H, W); both are first rounded to the 256 levels, as the
images a user sees would be.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

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


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(coords**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _blur(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """(H, W) float64 -> the 11x11 Gaussian window's mean at every valid (unpadded) position.
    OpenCV's separable filter is exact in float64 and ~20x faster than a float64 conv2d here; the
    border mode does not matter because the border rows are cropped away."""
    radius = len(kernel) // 2
    full = cv2.sepFilter2D(x, cv2.CV_64F, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    return full[radius:-radius, radius:-radius]


def ssim(sr: torch.Tensor, hr: torch.Tensor, *, shave: int = 0, y_only: bool = False) -> float:
    """Mean SSIM over the valid (unpadded) window positions, averaged over channels."""
    a_all, b_all = (t.cpu().numpy() for t in _prepare(sr, hr, shave, y_only))
    kernel = _gaussian_1d()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    means = []
    for a, b in zip(a_all, b_all, strict=True):  # one SSIM map per channel
        mu_a, mu_b = _blur(a, kernel), _blur(b, kernel)
        var_a = _blur(a * a, kernel) - mu_a**2
        var_b = _blur(b * b, kernel) - mu_b**2
        cov = _blur(a * b, kernel) - mu_a * mu_b
        ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        means.append(ssim_map.mean())
    return float(np.mean(means))


def image_metrics(sr: torch.Tensor, hr: torch.Tensor, scale: int) -> dict[str, float]:
    """The four numbers of the report for one image: PSNR and SSIM on RGB and on Y."""
    return {
        "psnr_rgb": psnr(sr, hr, shave=scale),
        "ssim_rgb": ssim(sr, hr, shave=scale),
        "psnr_y": psnr(sr, hr, shave=scale, y_only=True),
        "ssim_y": ssim(sr, hr, shave=scale, y_only=True),
    }

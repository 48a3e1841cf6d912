"""PSNR/SSIM against scikit-image's independent implementations with matching settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from training.metrics import image_metrics, psnr, ssim, to_y


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hr = torch.rand(3, 40, 52, generator=generator)
    sr = (hr + 0.05 * torch.randn(3, 40, 52, generator=generator)).clamp(0, 1)
    return sr, hr


def _u8(image: torch.Tensor) -> np.ndarray:
    return torch.round(image.clamp(0, 1) * 255).to(torch.float64).permute(1, 2, 0).numpy()


def test_psnr_rgb_matches_skimage() -> None:
    sr, hr = _pair()
    expected = peak_signal_noise_ratio(_u8(hr)[2:-2, 2:-2], _u8(sr)[2:-2, 2:-2], data_range=255)
    assert psnr(sr, hr, shave=2) == pytest.approx(expected, abs=1e-9)


def test_psnr_y_matches_skimage_on_bt601_luma() -> None:
    sr, hr = _pair(1)
    weights = np.array([65.481, 128.553, 24.966])
    y_sr = 16 + _u8(sr) @ weights / 255
    y_hr = 16 + _u8(hr) @ weights / 255
    expected = peak_signal_noise_ratio(y_hr[2:-2, 2:-2], y_sr[2:-2, 2:-2], data_range=255)
    assert psnr(sr, hr, shave=2, y_only=True) == pytest.approx(expected, abs=1e-9)


def test_ssim_matches_skimage_gaussian_window() -> None:
    sr, hr = _pair(2)
    settings = {"data_range": 255, "gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
    expected_rgb = structural_similarity(_u8(hr), _u8(sr), channel_axis=2, **settings)
    assert ssim(sr, hr) == pytest.approx(expected_rgb, abs=1e-6)
    y_sr = to_y(torch.from_numpy(_u8(sr)).permute(2, 0, 1))[0].numpy()
    y_hr = to_y(torch.from_numpy(_u8(hr)).permute(2, 0, 1))[0].numpy()
    expected_y = structural_similarity(y_hr[3:-3, 3:-3], y_sr[3:-3, 3:-3], **settings)
    assert ssim(sr, hr, shave=3, y_only=True) == pytest.approx(expected_y, abs=1e-6)


def test_identical_images() -> None:
    _, hr = _pair()
    assert psnr(hr, hr) == math.inf
    assert ssim(hr, hr) == pytest.approx(1.0)


def test_metrics_round_to_8_bit_first() -> None:
    hr = torch.round(_pair()[1] * 255) / 255
    nudged = hr + 0.4 / 255  # less than half a level: the same 8-bit image
    assert image_metrics(nudged.clamp(0, 1), hr, 2)["psnr_rgb"] == math.inf


def test_image_metrics_are_the_four_metrics_on_the_shaved_image() -> None:
    sr, hr = _pair(3)
    expected = {"psnr_rgb": psnr(sr, hr, shave=2), "ssim_rgb": ssim(sr, hr, shave=2),
                "psnr_y": psnr(sr, hr, shave=2, y_only=True), "ssim_y": ssim(sr, hr, shave=2, y_only=True)}
    assert image_metrics(sr, hr, 2) == expected
    assert len(set(expected.values())) == 4  # four different numbers: none can stand in for another
    assert expected["ssim_rgb"] != ssim(sr, hr)  # the shave changes the score, so leaving it out is seen


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="one size"):
        psnr(torch.rand(3, 8, 8), torch.rand(3, 8, 9))

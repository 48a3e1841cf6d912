"""The canonical degradation: shape, value set, and agreement with an independent numpy reference."""

import numpy as np
import pytest
import torch

from training.data.degrade import degrade, downscale_bicubic, quantize_8bit


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (support [-2, 2])."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _aa_weights(in_size: int, scale: int) -> np.ndarray:
    """(out, in) matrix of an antialiased cubic down-sampling: the kernel stretched by `scale`, taps inside the
    image only, renormalised to sum 1 (what clipping the kernel at the border amounts to)."""
    out_size = in_size // scale
    centres = scale * (np.arange(out_size) + 0.5)  # output pixel centres in input pixel units
    inputs = np.arange(in_size) + 0.5  # input pixel centres
    weights = _keys_cubic((inputs[None, :] - centres[:, None]) / scale)
    return weights / weights.sum(axis=1, keepdims=True)


def _reference(hr: np.ndarray, scale: int) -> np.ndarray:
    """(C, H, W) float64 -> (C, H/s, W/s), separable: rows then columns."""
    rows = _aa_weights(hr.shape[1], scale)
    cols = _aa_weights(hr.shape[2], scale)
    return np.einsum("oh,chw,pw->cop", rows, hr, cols)


def _image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    # Smooth gradients plus noise plus a hard edge: exercises lobes, overshoot and the borders.
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2])
    base[:, :, width // 2 :] = 1.0 - base[:, :, width // 2 :]
    return (0.7 * base + 0.3 * torch.rand(3, height, width, generator=gen)).clamp(0, 1)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_matches_numpy_reference_before_rounding(scale: int) -> None:
    hr = _image(12 * scale, 20 * scale, seed=scale)
    ours = downscale_bicubic(hr.double(), scale).numpy()
    ref = _reference(hr.double().numpy(), scale)
    assert ours.shape == ref.shape == (3, 12, 20)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_degrade_is_reference_clamped_and_rounded(scale: int) -> None:
    hr = _image(8 * scale, 10 * scale, seed=10 + scale)
    lr = degrade(hr, scale)
    expected = np.round(np.clip(_reference(hr.double().numpy(), scale), 0, 1) * 255) / 255
    # A value within float error of a half level may round either way: allow one level, and rarely.
    diff = np.abs(lr.double().numpy() - expected)  # float32 k/255 vs float64 k/255: ~1e-8
    assert diff.max() <= 1 / 255 + 1e-6
    assert (diff > 1e-6).mean() < 0.01


@pytest.mark.parametrize("shape", [(3, 48, 64), (2, 3, 48, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_levels(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    hr = torch.rand(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    lr = degrade(hr, 4)
    assert lr.shape == (*shape[:-2], 12, 16)
    assert lr.dtype == dtype
    levels = lr * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert lr.min() >= 0 and lr.max() <= 1


def test_batch_equals_single_images() -> None:
    hr = torch.rand(3, 3, 24, 36, generator=torch.Generator().manual_seed(2))
    batched = degrade(hr, 3)
    for i in range(3):
        assert torch.equal(batched[i], degrade(hr[i], 3))


@pytest.mark.parametrize("value", [0.0, 1.0, 0.5, 77 / 255])
def test_constant_image_stays_constant(value: float) -> None:
    hr = torch.full((3, 30, 42), value)
    lr = degrade(hr, 3)
    assert torch.allclose(lr, torch.full_like(lr, round(value * 255) / 255), atol=1e-6)


def test_overshoot_is_clamped() -> None:
    # A thin bright line on black: the cubic's negative lobes ring below 0 before clamping.
    hr = torch.zeros(3, 16, 16)
    hr[:, :, 7] = 1.0
    assert downscale_bicubic(hr, 2).min() < 0
    assert degrade(hr, 2).min() == 0


def test_quantize_8bit() -> None:
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.4 / 255, 0.999, 2.0])
    assert torch.equal(quantize_8bit(x) * 255, torch.tensor([0.0, 0.0, 0.0, 1.0, 255.0, 255.0]))


@pytest.mark.parametrize(
    ("hr", "scale", "match"),
    [
        (torch.rand(3, 31, 32), 2, "multiple of scale"),
        (torch.rand(3, 30, 32), 4, "multiple of scale"),
        (torch.rand(1, 32, 32), 2, "shape"),
        (torch.rand(32, 32), 2, "shape"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), 2, "float"),
        (torch.rand(3, 32, 32), 0, "scale"),
    ],
)
def test_rejects_bad_input(hr: torch.Tensor, scale: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        degrade(hr, scale)

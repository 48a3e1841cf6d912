"""scripts/linear_baseline.py: the least-squares linear upsampler, the floor for trained students."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.config import dump_toml

from training_utils import load_script, make_image_folder, tiny_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "linear_baseline.py"


@pytest.mark.parametrize(("window", "scale"), [(3, 2), (5, 3)])
def test_fit_recovers_a_linear_upsampler_exactly(window: int, scale: int) -> None:
    script = load_script(SCRIPT)
    generator = torch.Generator().manual_seed(window)
    truth = script.LinearUpsampler(
        torch.randn(3 * window * window + 1, 3 * scale * scale, generator=generator, dtype=torch.float64),
        window, scale,
    )  # fmt: skip
    patches = [torch.rand(3, 10, 12, generator=generator) for _ in range(4)]
    # The truth's border pixels see replicated padding, which the fit leaves out: it must still recover it exactly.
    pairs = [(lr, truth(lr.unsqueeze(0))[0]) for lr in patches]
    fitted = script.fit_linear_upsampler(pairs, window, scale)
    assert torch.allclose(fitted.weights, truth.weights, atol=1e-6)
    probe = torch.rand(1, 3, 9, 7, generator=generator)
    assert fitted(probe).shape == (1, 3, 9 * scale, 7 * scale)
    assert torch.allclose(fitted(probe), truth(probe), atol=1e-5)


def test_fit_rejects_bad_windows_and_inputs() -> None:
    script = load_script(SCRIPT)
    pair = (torch.rand(3, 4, 4), torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="odd"):
        script.fit_linear_upsampler([pair], 4, 2)
    with pytest.raises(ValueError, match="smaller than the 5x5 window"):
        script.fit_linear_upsampler([pair], 5, 2)
    with pytest.raises(ValueError, match="no training pairs"):
        script.fit_linear_upsampler([], 3, 2)
    with pytest.raises(ValueError, match="do not fit"):
        script.LinearUpsampler(torch.zeros(10, 12), 3, 2)


def test_command_fits_on_a_config_and_beats_bicubic_on_its_images(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", count=4, size=(64, 80))
    config = tmp_path / "config.toml"
    config.write_text(dump_toml(tiny_config(folder).to_dict()))
    output = tmp_path / "linear.json"
    command = [sys.executable, str(SCRIPT), "--config", str(config), "--window", "5", "--patches", "40",
               "--data", str(folder), "--json", str(output)]  # fmt: skip (with --data, no built-in set: as `evaluate`)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    scores = json.loads(output.read_text())
    (set_scores,) = scores.values()  # the layout of `python -m training evaluate --json`: {set: {model: ...}}
    assert len(set_scores["linear_5x5"]["per_image"]) == 4
    # Fitted on patches of these very images, the least-squares filter must beat bicubic, itself a linear filter.
    assert set_scores["linear_5x5"]["mean"]["psnr_rgb"] > set_scores["bicubic"]["mean"]["psnr_rgb"]
    assert "linear_5x5: least squares over 40 training patches" in result.stdout

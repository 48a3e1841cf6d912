"""scripts/bicubic_floors.py: OpenCV's bicubic (a = -0.75) beside the MATLAB-style one (a = -0.5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import degrade
from training.data.images import read_image
from training.metrics import image_metrics

from training_utils import load_script, make_image_folder

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bicubic_floors.py"


def _keys_weights(t: float, a: float) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0


def test_the_kernel_is_keys_a_minus_half_by_hand() -> None:
    """One row, away from the borders: each x2 output sample is the a = -0.5 kernel at offsets +-0.25, +-0.75, ..."""
    row = torch.tensor([0, 40, 200, 90, 10, 250, 120, 30], dtype=torch.float32) / 255
    out = load_script(SCRIPT).keys_bicubic(row.expand(1, 3, 4, 8).contiguous(), 2)[0, 0, 0]
    for j in range(4, 11):  # output sample j sits at input position (j + 0.5) / 2 - 0.5
        x = (j + 0.5) / 2 - 0.5
        taps = range(int(np.floor(x)) - 1, int(np.floor(x)) + 3)
        expected = sum(_keys_weights(x - i, -0.5) * float(row[i]) for i in taps)
        assert abs(float(out[j]) - expected) < 1e-5, j


def test_command_scores_both_floors(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", count=2, size=(48, 64))
    out = tmp_path / "floors.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--data", str(folder), "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    by_set = json.loads(out.read_text())
    assert list(by_set) == ["images"]  # with --data, no built-in set unless --sets names one (as `evaluate`)
    scores = by_set["images"]
    assert set(scores) == {"bicubic", "lanczos", "bicubic a=-0.5"}
    assert scores["bicubic a=-0.5"]["mean"]["psnr_rgb"] != scores["bicubic"]["mean"]["psnr_rgb"]
    # one image scored here by hand: the a = -0.5 kernel on the bicubic LR of the whole image
    hr = read_image(folder / "img0.png")
    sr = load_script(SCRIPT).keys_bicubic(degrade(hr, 2).unsqueeze(0), 2).clamp(0, 1)[0]
    assert scores["bicubic a=-0.5"]["per_image"]["img0"] == pytest.approx(image_metrics(sr, hr, 2), abs=1e-4)

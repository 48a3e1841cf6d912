"""The shipped weights: every file in models/weights loads, matches its entry in weights.json, and
upscales two detailed cg-dev crops better than bicubic (PSNR), so a broken or swapped weight file
fails CI (a random or wrong network scores 10-20 dB lower)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import DEFAULT_STUDENT_PATH, WEIGHTS_DIR, Teacher, load_checkpoint
from training.data import default_eval_dir, degrade, read_image
from training.distill import mixed_input
from training.evaluate import baseline_predictors
from training.metrics import psnr

INDEX = WEIGHTS_DIR / "weights.json"
SHIPPED = sorted(WEIGHTS_DIR.glob("*.safetensors"))
# Detailed 256x256 HR windows (top, left) of two cg-dev frames: text, thin geometry and texture.
CROPS = {"pov_ttf1.png": (600, 700), "oa_bases7_sp01.png": (300, 800)}


def test_the_default_student_and_the_index_ship() -> None:
    assert DEFAULT_STUDENT_PATH.is_file(), f"{DEFAULT_STUDENT_PATH} is missing"
    index = json.loads(INDEX.read_text())
    assert sorted(index) == sorted(p.name for p in SHIPPED)
    assert {entry["report_name"] for entry in index.values()} >= {"TAKDSR", "TA", "teacher", "PISR'", "X_s"}


@pytest.fixture(scope="module")
def crops() -> list[tuple[torch.Tensor, torch.Tensor]]:
    folder = default_eval_dir()
    if not folder.is_dir():
        pytest.skip(f"the shared evaluation frames are not at {folder} (set TAKDSR_SHARED)")
    pairs = []
    for name, (top, left) in CROPS.items():
        hr = read_image(folder / name)[:, top : top + 256, left : left + 256]
        pairs.append((degrade(hr, 2).unsqueeze(0), hr.unsqueeze(0)))
    return pairs


def _teacher_of(path: Path) -> Teacher:
    index = json.loads(INDEX.read_text())
    teacher_file = next(name for name, entry in index.items() if entry["stage"] == "teacher")
    return load_checkpoint(WEIGHTS_DIR / teacher_file).model


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
@torch.no_grad()
def test_shipped_checkpoint_beats_bicubic(path: Path, crops: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    checkpoint = load_checkpoint(path)
    entry = json.loads(INDEX.read_text())[path.name]
    meta, model = checkpoint.metadata, checkpoint.model
    assert (meta["role"], meta["arch"], meta["arch_args"]) == (entry["role"], entry["arch"], entry["arch_args"])
    assert meta["scale"] == 2 and meta["training"]["steps"] > 0
    assert meta["training"]["metrics"] == entry["metrics"] and meta["training"]["stage"] == entry["stage"]
    bicubic = baseline_predictors(2)["bicubic"]
    for lr, hr in crops:
        if isinstance(model, Teacher):
            sr = model(hr).image
        elif meta["role"] == "ta":
            sr = model(mixed_input(_teacher_of(path)(hr).cf_prime, lr, tuple(meta["training"]["mix"])))
        else:
            sr = model(lr)
        ours = psnr(sr[0].clamp(0, 1), hr[0], shave=2)
        baseline = psnr(bicubic(lr, hr)[0], hr[0], shave=2)
        assert ours > baseline, f"{path.name}: {ours:.2f} dB, bicubic {baseline:.2f} dB"

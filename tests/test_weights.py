"""The shipped weights: every file in models/weights loads, matches its entry in weights.json, and
upscales better than bicubic (PSNR) the input it was trained for: two detailed cg-dev crops with
bicubic LR, or, for a student trained on natively rendered LR, small rendered validation frames with
native LR. So a broken or swapped weight file fails CI (a random or wrong network scores 10-20 dB lower)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import DEFAULT_STUDENT_PATH, NATIVE_STUDENT_PATH, WEIGHTS_DIR, Teacher, load_checkpoint
from training.config import Config, EvalConfig
from training.data import default_eval_dir, degrade, read_image
from training.distill import mixed_input
from training.evaluate import baseline_predictors, eval_sets
from training.metrics import psnr

INDEX = WEIGHTS_DIR / "weights.json"
SHIPPED = sorted(WEIGHTS_DIR.glob("*.safetensors"))
# Detailed 256x256 HR windows (top, left) of two cg-dev frames: text, thin geometry and texture.
CROPS = {"pov_ttf1.png": (600, 700), "oa_bases7_sp01.png": (300, 800)}


def test_the_default_students_and_the_index_ship() -> None:
    for path in (DEFAULT_STUDENT_PATH, NATIVE_STUDENT_PATH):
        assert path.is_file(), f"{path} is missing"
    index = json.loads(INDEX.read_text())
    assert sorted(index) == sorted(p.name for p in SHIPPED)
    assert {entry["report_name"] for entry in index.values()} >= {"TAKDSR", "TA", "teacher", "PISR'", "X_s"}
    assert index[NATIVE_STUDENT_PATH.name]["lr_kinds"] == ["native"]
    assert index[DEFAULT_STUDENT_PATH.name]["lr_kinds"] == ["bicubic"]


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


@pytest.fixture(scope="module")
def native_frames() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One 512x288 validation frame per scene preset: 2x2-supersampled HR, LR rendered at 256x144."""
    eval_config = EvalConfig(cg_dev=False, rendered_val=False, rendered_native=True, rendered_frames=1,
                             rendered_size=[512, 288])  # fmt: skip
    images = eval_sets(Config(eval=eval_config), 2)["rendered-val-native"]
    return [(image.lr.unsqueeze(0), image.hr.unsqueeze(0)) for image in images]


def _teacher_of(path: Path) -> Teacher:
    index = json.loads(INDEX.read_text())
    teacher_file = next(name for name, entry in index.items() if entry["stage"] == "teacher")
    return load_checkpoint(WEIGHTS_DIR / teacher_file).model


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
@torch.no_grad()
def test_shipped_checkpoint_beats_bicubic(path: Path, request: pytest.FixtureRequest) -> None:
    checkpoint = load_checkpoint(path)
    entry = json.loads(INDEX.read_text())[path.name]
    meta, model = checkpoint.metadata, checkpoint.model
    assert (meta["role"], meta["arch"], meta["arch_args"]) == (entry["role"], entry["arch"], entry["arch_args"])
    assert meta["scale"] == 2 and meta["training"]["steps"] > 0
    assert meta["training"]["metrics"] == entry["metrics"] and meta["training"]["stage"] == entry["stage"]
    native = entry["lr_kinds"] == ["native"]
    pairs = request.getfixturevalue("native_frames" if native else "crops")
    bicubic = baseline_predictors(2)["bicubic"]
    ours_all, baseline_all = [], []
    for lr, hr in pairs:
        if isinstance(model, Teacher):
            sr = model(hr).image
        elif meta["role"] == "ta":
            sr = model(mixed_input(_teacher_of(path)(hr).cf_prime, lr, tuple(meta["training"]["mix"])))
        else:
            sr = model(lr)
        ours_all.append(psnr(sr[0].clamp(0, 1), hr[0], shave=2))
        baseline_all.append(psnr(bicubic(lr, hr)[0], hr[0], shave=2))
    ours, baseline = sum(ours_all) / len(ours_all), sum(baseline_all) / len(baseline_all)
    assert ours > baseline, f"{path.name}: mean {ours:.2f} dB, bicubic {baseline:.2f} dB ({ours_all}, {baseline_all})"

"""The shipped weights: every file in models/weights loads, matches its entry in weights.json, and
upscales better than bicubic (PSNR) the input it was trained for: two detailed cg-dev crops with
bicubic LR, or, for a student trained on natively rendered LR, small rendered validation frames with
native LR. So a broken or swapped weight file fails CI (a random or wrong network scores 10-20 dB lower)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import DEFAULT_STUDENT_PATH, NATIVE_STUDENT_PATH, WEIGHTS_DIR, Teacher, load_checkpoint
from training.config import Config, EvalConfig
from training.data import default_eval_dir, degrade, file_sha256, read_image
from training.distill import mixed_input
from training.evaluate import baseline_predictors, eval_sets
from training.metrics import psnr
from upscaler_server.config import DEFAULT_EDGE_PAD
from upscaler_server.engine import create_engine

INDEX = WEIGHTS_DIR / "weights.json"
SHIPPED = sorted(WEIGHTS_DIR.glob("*.safetensors"))
STUDENTS = [path for path in SHIPPED if json.loads(INDEX.read_text())[path.name]["role"] == "student"]
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
        pytest.fail(f"the shared evaluation frames are not at {folder}: run the tests from a clone placed next to "
                    "shared/, or set TAKDSR_SHARED")
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
    """The shipped discrete-CF teacher of the TA at `path` (the one of the same family)."""
    index = json.loads(INDEX.read_text())
    family = index[path.name]["arch"].split("_")[0]
    teacher_file = next(name for name, entry in index.items()
                        if entry["stage"] == "teacher" and entry["arch"] == f"{family}_teacher")  # fmt: skip
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
    # the bytes the index vouches for: a file holding another file's tensors under its own metadata fails here
    assert file_sha256(path) == entry["sha256"], f"{path.name} is not the file weights.json describes"
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


@pytest.mark.parametrize("path", STUDENTS, ids=[p.stem for p in STUDENTS])
@torch.no_grad()
def test_the_daemon_engine_serves_every_shipped_student(path: Path) -> None:
    """`--checkpoint FILE` works for every student family: the engine's uint8 frame is the network's own output on
    the frame with its edges repeated (--edge-pad, default 4; with 0, on the frame itself), cropped, clamped and
    rounded (within one level: the two runs use different thread counts, so sums round apart)."""
    rgb = torch.randint(0, 256, (36, 52, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    lr = (rgb.permute(2, 0, 1)[None].float() / 255).contiguous(memory_format=torch.channels_last)
    network = load_checkpoint(path).model.eval()
    for edge_pad in (DEFAULT_EDGE_PAD, 0):
        threads = torch.get_num_threads()
        try:
            engine = create_engine(checkpoint=path, device="cpu", precision="fp32", threads=1, edge_pad=edge_pad)
            served = engine.run(rgb.numpy())
        finally:
            torch.set_num_threads(threads)  # the engine sets the process-wide count
        crop = 2 * edge_pad
        output = network(F.pad(lr, (edge_pad,) * 4, mode="replicate"))[0, :, crop : 72 + crop, crop : 104 + crop]
        expected = (output.clamp(0, 1) * 255).round().to(torch.uint8)  # (3, 72, 104)
        assert served.shape == (72, 104, 3)
        difference = (torch.from_numpy(served).permute(2, 0, 1).int() - expected.int()).abs()
        assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3, f"max {difference.max()}"

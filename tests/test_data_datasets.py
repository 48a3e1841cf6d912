"""Training patches and evaluation frames: shapes, HR/LR alignment, seeding, augmentation, mixing, config."""

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.data.augment import NO_AUGMENT, AugmentConfig, AugmentParams, apply_geometry, sample_augment
from training.data.config import DataConfig, SourceConfig, build_eval_dataset, build_train_dataset
from training.data.datasets import EpochSampler, FrameDataset, PatchDataset, worker_start_method
from training.data.degrade import degrade
from training.data.images import MANIFEST_NAME, DatasetError, read_image
from training.data.sources import FolderSource, Frame, scene_times

ALL_AUGMENT = AugmentConfig(channel_permute_p=0.5, blend_p=0.5)


def _write_images(folder: Path, count: int, size: tuple[int, int], seed: int, tint: tuple[int, int, int] | None = None):
    """Random RGB PNGs; with `tint`, one dominant channel so a patch tells which folder it came from."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        if tint is not None:
            rgb = (rgb // 4 + np.array(tint, np.uint8)).astype(np.uint8)
        assert cv2.imwrite(str(folder / f"img{i:02d}.png"), rgb[:, :, ::-1])
    return folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _write_images(tmp_path / "imgs", 3, (50, 62), seed=0)


class _NativeSource:
    """A source with a native LR whose HR is the LR with each pixel repeated s x s: alignment is checkable."""

    native = True

    def __init__(self, scale: int, seed: int = 0) -> None:
        lr = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
        self.frames = [Frame(np.repeat(np.repeat(lr, scale, 0), scale, 1), lr)]

    def __len__(self) -> int:
        return 1

    def name(self, index: int) -> str:
        return "native"

    def frame(self, index: int) -> Frame:
        return self.frames[index]


def _dataset(folder: Path, scale: int = 2, **kwargs) -> PatchDataset:
    source = FolderSource(folder, 24, progress=False)
    defaults = {"scale": scale, "patch_size": 24, "augment": ALL_AUGMENT, "seed": 3, "length": 12}
    return PatchDataset([source], [1.0], **{**defaults, **kwargs})


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_item_shapes_and_bicubic_alignment(folder: Path, scale: int) -> None:
    ds = _dataset(folder, scale, augment=AugmentConfig(blend_p=1.0))  # blending is where LR could go wrong
    for i in range(len(ds)):
        item = ds[i]
        assert item["hr"].shape == (3, 24, 24) and item["lr"].shape == (3, 24 // scale, 24 // scale)
        assert item["hr"].dtype == item["lr"].dtype == torch.float32
        assert torch.equal(item["lr"], degrade(item["hr"], scale))


def test_unaugmented_patch_is_a_crop_on_the_lr_grid(folder: Path) -> None:
    images = [read_image(p) for p in sorted(folder.glob("*.png"))]
    ds = _dataset(folder, 3, augment=NO_AUGMENT)
    for i in range(6):
        hr = ds[i]["hr"]
        matches = [
            (y, x)
            for image in images
            for y in range(0, image.shape[1] - 23)
            for x in range(0, image.shape[2] - 23)
            if torch.equal(image[:, y : y + 24, x : x + 24], hr)
        ]
        assert len(matches) == 1 and matches[0][0] % 3 == 0 and matches[0][1] % 3 == 0


def test_same_seed_same_patches_other_seed_other_patches(folder: Path) -> None:
    a, b, c = _dataset(folder), _dataset(folder), _dataset(folder, seed=4)
    for i in (0, 5, 11, 1000):  # any index is valid, not only those below len
        assert torch.equal(a[i]["hr"], b[i]["hr"]) and torch.equal(a[i]["lr"], b[i]["lr"])
    assert not all(torch.equal(a[i]["hr"], c[i]["hr"]) for i in range(4))
    with pytest.raises(IndexError):
        a[-1]


def _batches(ds: PatchDataset, workers: int, epoch: int) -> list[dict[str, torch.Tensor]]:
    sampler = EpochSampler(len(ds))
    sampler.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers)
    return list(loader)


def test_reproducible_with_0_and_2_workers(folder: Path) -> None:
    ds = _dataset(folder)
    serial, parallel = _batches(ds, 0, epoch=1), _batches(ds, 2, epoch=1)
    assert len(serial) == len(parallel) == 3
    for one, two in zip(serial, parallel, strict=True):
        assert torch.equal(one["hr"], two["hr"]) and torch.equal(one["lr"], two["lr"])
    assert worker_start_method(ds) is None  # no OpenGL involved: the default fork is fine
    first_epoch = _batches(ds, 0, epoch=0)
    assert not torch.equal(first_epoch[0]["hr"], serial[0]["hr"])  # a new epoch sees new patches


@pytest.mark.parametrize("scale", [2, 4])
def test_native_lr_stays_aligned_through_every_augmentation(scale: int) -> None:
    ds = PatchDataset([_NativeSource(scale)], [1.0], scale=scale, patch_size=16, augment=ALL_AUGMENT, length=64)
    blended = 0
    for i in range(len(ds)):
        item = ds[i]
        upsampled = item["lr"].repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # (3, P, P)
        error = (upsampled - item["hr"]).abs().max().item()
        assert error <= 0.5 / 255 + 1e-6  # only the LR's rounding back to 8 bits after a blend
        blended += error > 1e-6
        levels = item["lr"] * 255
        assert torch.allclose(levels, levels.round(), atol=1e-4)  # native LR stays on 8-bit levels
    assert 0 < blended < len(ds)


def test_geometry_commutes_with_the_hr_lr_grid() -> None:
    lr = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    hr = lr.repeat_interleave(2, 1).repeat_interleave(2, 2)  # (3, 8, 8), each LR pixel a 2x2 block
    for k in range(40):
        params = sample_augment(ALL_AUGMENT, np.random.default_rng(k))
        expected = apply_geometry(lr, params).repeat_interleave(2, 1).repeat_interleave(2, 2)
        assert torch.equal(apply_geometry(hr, params), expected)
    assert torch.equal(apply_geometry(hr, AugmentParams()), hr)


def test_augmentation_frequencies() -> None:
    draws = [sample_augment(ALL_AUGMENT, np.random.default_rng(k)) for k in range(2000)]
    assert abs(np.mean([d.hflip for d in draws]) - 0.5) < 0.05
    assert abs(np.mean([d.rot90 == 1 for d in draws]) - 0.25) < 0.05
    assert abs(np.mean([d.channels != (0, 1, 2) for d in draws]) - 0.5) < 0.05
    alphas = [d.blend_alpha for d in draws if d.blend_alpha is not None]
    assert abs(len(alphas) / len(draws) - 0.5) < 0.05 and min(alphas) >= 0.3 and max(alphas) <= 0.7
    off = [sample_augment(NO_AUGMENT, np.random.default_rng(k)) for k in range(50)]
    assert all(d == AugmentParams() for d in off)


def test_mixed_sources_follow_weights(tmp_path: Path) -> None:
    red = FolderSource(_write_images(tmp_path / "red", 2, (32, 32), 1, tint=(192, 0, 0)), 16, progress=False)
    blue = FolderSource(_write_images(tmp_path / "blue", 2, (32, 32), 2, tint=(0, 0, 192)), 16, progress=False)
    ds = PatchDataset([red, blue], [3.0, 1.0], scale=2, patch_size=16, length=400, patches_per_image=1)
    from_red = [ds[i]["hr"][0].mean() > ds[i]["hr"][2].mean() for i in range(len(ds))]
    assert abs(np.mean(from_red) - 0.75) < 0.07


def test_frame_dataset_crops_to_the_scale(tmp_path: Path) -> None:
    _write_images(tmp_path / "eval", 2, (50, 62), seed=5)
    ds = FrameDataset(FolderSource(tmp_path / "eval", 4, progress=False), 4)
    item = ds[1]
    assert item["name"] == "img01"
    assert item["hr"].shape == (3, 48, 60) and item["lr"].shape == (3, 12, 15)
    assert torch.equal(item["hr"], read_image(tmp_path / "eval" / "img01.png")[:, :48, :60])
    assert torch.equal(item["lr"], degrade(item["hr"], 4))


def test_patch_must_be_a_multiple_of_the_scale(folder: Path) -> None:
    with pytest.raises(DatasetError, match="multiple"):
        _dataset(folder, 3, patch_size=32)


def test_config_from_dict_rejects_unknown_keys() -> None:
    good = {"sources": [{"kind": "folder", "path": "x", "weight": 2}], "augment": {"blend_p": 0.1}}
    cfg = DataConfig.from_dict(good)
    assert cfg.sources[0].weight == 2 and cfg.augment.blend_p == 0.1 and cfg.patch_size == 192
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    assert "None" not in repr(cfg.to_dict())  # TOML has no null: None fields are left out
    bad = [
        {**good, "patchsize": 64},
        {**good, "sources": [{"kind": "folder", "path": "x", "wieght": 1}]},
        {**good, "augment": {"blend": 0.1}},
        {**good, "eval": {"kind": "folder", "root": "x"}},
        {"sources": [{"kind": "folder", "path": "x", "lr_kind": "native"}]},
        {"sources": [{"kind": "video"}]},
        {"scale": 2},
        {**good, "scale": "2"},
        {**good, "patch_size": 100, "scale": 3},
        {"sources": []},
        {**good, "seed": -1},
        {**good, "seed": 1.5},
    ]
    for data in bad:
        with pytest.raises(ValueError):
            DataConfig.from_dict(data)


@pytest.mark.parametrize(("data", "message"), [
    ({"sources": [{"kind": "folder", "path": "x", "weight": "a"}]}, "data.sources[0].weight must be a number"),
    ({"sources": [{"kind": "folder", "path": 5}]}, "data.sources[0].path must be a string"),
    ({"sources": [{"kind": "scenes", "width": "big"}]}, "data.sources[0].width must be an integer"),
    ({"sources": [{"kind": "scenes", "presets": "city"}]}, "data.sources[0].presets must be a list"),
    ({"sources": [{"kind": "folder", "path": "x"}], "augment": {"blend_p": "x"}}, "data.augment.blend_p must be a"),
    ({"sources": [{"kind": "folder", "path": "x"}], "augment": {"flip": 3}}, "data.augment.flip must be true or"),
    ({"sources": [{"kind": "folder", "path": "x"}], "eval": {"kind": "folder", "path": 3}}, "data.eval.path must"),
    ({"sources": [{"kind": "folder", "path": "x"}], "augment": {"blend_alpha": [0.3]}}, "blend_alpha must be a list"),
])
def test_config_from_dict_names_a_wrongly_typed_key(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        DataConfig.from_dict(data)


_FOLDER = {"kind": "folder", "path": "x"}


@pytest.mark.parametrize(("data", "message"), [
    ({"sources": [_FOLDER, {"kind": "scenes", "supersample": 0}]}, "data.sources[1].supersample must be >= 1, got 0"),
    ({"sources": [_FOLDER, {"kind": "scenes", "frames_per_preset": 0}]}, "data.sources[1].frames_per_preset must be"),
    ({"sources": [{"kind": "scenes", "width": -160}]}, "data.sources[0].width must be >= 1, got -160"),
    ({"sources": [_FOLDER, {"kind": "folder", "weight": 0}]}, "data.sources[1].weight must be a finite number > 0"),
    ({"sources": [_FOLDER, {"kind": "scene"}]}, "data.sources[1].kind must be 'folder' or 'scenes', got 'scene'"),
    ({"sources": [_FOLDER, {"kind": "scenes", "lr_kind": "x"}]}, "data.sources[1].lr_kind must be 'bicubic' or"),
    ({"sources": [_FOLDER], "eval": {"kind": "folder", "lr_kind": "native"}}, "data.eval.lr_kind: a folder source"),
    ({"sources": [_FOLDER], "augment": {"blend_p": 2}}, "data.augment.blend_p must be in [0, 1], got 2"),
    ({"sources": [_FOLDER], "augment": {"blend_alpha": [0.7, 0.3]}}, "data.augment.blend_alpha must be 0 <= low"),
    ({"sources": [_FOLDER, {"kind": "scenes", "width": 160, "height": 96}], "scale": 3},
     "data.sources[1] width x height 160x96 is not a multiple of data.scale 3"),  # was unnamed, at dataset build
])
def test_config_from_dict_names_the_key_of_a_value_out_of_range(data: dict, message: str) -> None:
    """One message covered weight, supersample and frames_per_preset of any source, and augment lacked `data.`."""
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        DataConfig.from_dict(data)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_config_from_dict_refuses_non_finite_numbers(value: float) -> None:
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.weight must be a finite number"):
        DataConfig.from_dict({"sources": [{"kind": "folder", "path": "x", "weight": value}]})
    with pytest.raises(ValueError, match=r"data\.augment\.blend_alpha\[1\] must be a finite number"):
        DataConfig.from_dict({"sources": [{"kind": "folder", "path": "x"}], "augment": {"blend_alpha": [0, value]}})
    with pytest.raises(ValueError, match="weight must be a finite number > 0"):  # built in code, not from a file
        SourceConfig("folder", "x", weight=value)


def test_a_wrongly_typed_data_key_is_one_error_line_from_the_cli(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[1] / "training" / "configs" / "smoke_cpu.toml"
    command = [sys.executable, "-m", "training", "train", "--config", str(config), "--set",
               'data.sources=[{kind="folder", path="x", weight="a"}]']  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == "error: data.sources[0].weight must be a number, got 'a'"


def test_folder_images_are_named_by_their_path_and_never_merge(tmp_path: Path) -> None:
    """Two images with one stem in two subfolders, or beside each other in two formats, keep distinct names."""
    for sub in ("a", "b"):
        _write_images(tmp_path / "eval" / sub, 1, (20, 20), seed=len(sub))
    png = tmp_path / "eval" / "b" / "img00.png"
    cv2.imwrite(str(png.with_suffix(".jpg")), cv2.imread(str(png)))
    cv2.imwrite(str(png.with_name("img00.png.webp")), cv2.imread(str(png)))
    source = FolderSource(tmp_path / "eval", 4, progress=False)
    names = [source.name(i) for i in range(len(source))]
    assert names == ["a/img00", "b/img00.jpg", "b/img00.png", "b/img00.png.webp"]


def test_build_datasets_from_config(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig([SourceConfig("folder", str(folder))], patch_size=24, length=8, augment=ALL_AUGMENT)
    train = build_train_dataset(cfg, scale=3, seed=7)
    assert len(train) == 8 and train[0]["lr"].shape == (3, 8, 8) and train.seed == 7
    assert build_train_dataset(cfg, scale=3, progress=False).seed == 0  # no seed anywhere
    seeded = dataclasses.replace(cfg, seed=5)
    assert build_train_dataset(seeded, scale=3, progress=False).seed == 5
    assert build_train_dataset(seeded, scale=3, seed=7, progress=False).seed == 7
    monkeypatch.setenv("TAKDSR_SHARED", str(tmp_path / "shared"))
    _write_images(tmp_path / "shared" / "data" / "cg-dev", 1, (30, 40), seed=9)
    evaluation = build_eval_dataset(cfg, scale=2)  # eval path None: the shared cg-dev folder
    assert len(evaluation) == 1 and evaluation[0]["lr"].shape == (3, 15, 20)


def test_a_missing_training_folder_names_the_command_that_makes_it(tmp_path: Path) -> None:
    """The first run of a bundled config before its data command: the error says how to make the folder."""
    for missing in (tmp_path / "data" / "povray", _write_images(tmp_path / "f", 1, (30, 40), seed=4) / "img00.png"):
        cfg = DataConfig([SourceConfig("folder", str(missing))], patch_size=24, length=8)
        with pytest.raises(DatasetError) as refused:
            build_train_dataset(cfg, scale=2, progress=False)
        assert f"training image folder {missing} does not exist or is not a folder" in str(refused.value)
        assert f"python -m training.data povray --out {missing}" in str(refused.value)


def test_training_on_evaluation_data_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cg-dev itself, spelt any way, a folder inside it or holding it, and POV-Ray renders of reserved scenes."""
    from training.data import paths

    shared = tmp_path / "shared"
    monkeypatch.setenv("TAKDSR_SHARED", str(shared))
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "checkout")  # the checkout's own shared folder is not read
    cg_dev = _write_images(shared / "data" / "cg-dev", 1, (30, 40), seed=9)
    (shared / "data" / "reserved-scenes.txt").write_text("povray advanced/abyss.pov\n")
    _write_images(cg_dev / "sub", 1, (30, 40), seed=1)
    for path in (cg_dev, cg_dev / ".." / "cg-dev", cg_dev / "sub", shared):
        cfg = DataConfig([SourceConfig("folder", str(path))], patch_size=24, length=8)
        with pytest.raises(DatasetError, match="never train on them"):
            build_train_dataset(cfg, scale=2, progress=False)
    renders = _write_images(tmp_path / "renders" / "povray", 1, (30, 40), seed=2)
    manifest = {"scenes": {"advanced/abyss.pov": {}, "advanced/desk/desk.pov": {}}, "failed": {}}
    (renders / MANIFEST_NAME).write_text(json.dumps(manifest))
    cfg = DataConfig([SourceConfig("folder", str(tmp_path / "renders"))], patch_size=24, length=8)
    with pytest.raises(DatasetError, match=r"reserved for evaluation, never render: advanced/abyss\.pov"):
        build_train_dataset(cfg, scale=2, progress=False)
    linked = _write_images(tmp_path / "linked", 1, (30, 40), seed=3)  # the scan follows linked folders: so does this
    (linked / "eval").symlink_to(cg_dev, target_is_directory=True)
    cfg = DataConfig([SourceConfig("folder", str(linked))], patch_size=24, length=8)
    with pytest.raises(DatasetError, match="never train on them"):
        build_train_dataset(cfg, scale=2, progress=False)
    (linked / "eval").unlink()
    (linked / "pov").symlink_to(renders, target_is_directory=True)
    with pytest.raises(DatasetError, match="reserved for evaluation"):
        build_train_dataset(cfg, scale=2, progress=False)
    del manifest["scenes"]["advanced/abyss.pov"]
    (renders / MANIFEST_NAME).write_text(json.dumps(manifest))
    hidden = linked / ".old"  # a hidden folder is not read, so its manifest does not count
    hidden.mkdir()
    (hidden / MANIFEST_NAME).write_text(json.dumps({"scenes": {"advanced/abyss.pov": {}}, "failed": {}}))
    assert build_train_dataset(cfg, scale=2, progress=False)[0]["lr"].shape == (3, 12, 12)  # no reserved scene


def test_folder_scan_progress_follows_the_flag(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = DataConfig([SourceConfig("folder", str(folder))], patch_size=24, length=8)
    build_train_dataset(cfg, scale=3, progress=False)  # a trainer logging to a file: no progress bars
    assert "scan" not in capsys.readouterr().err
    build_train_dataset(cfg, scale=3)
    assert "scan" in capsys.readouterr().err


@pytest.mark.parametrize("period", [10.0, 48.0])
def test_scene_times_split_is_disjoint_and_fixed(period: float) -> None:
    train, val = scene_times("train", 50, period), scene_times("val", 20, period)
    assert len(set(train)) == 50 and len(set(val)) == 20 and train == scene_times("train", 50, period)
    assert scene_times("train", 80, period)[:50] == train  # more frames keep the ones already there
    gaps = np.diff(sorted(train))
    assert gaps.max() < 2.5 * gaps.min()  # evenly spread
    eps = 1e-3  # times are rounded to 4 decimals
    assert all(0 <= t < 0.75 * period for t in train) and all(0.8 * period - eps <= t < 0.95 * period for t in val)
    # On the loop, every validation time is at least 5% of a period from every training time, wrap included.
    phases = [(t / period) % 1.0 for t in val]
    assert min(min(abs(p - t / period), 1 - abs(p - t / period)) for p in phases for t in train) >= 0.05 - eps

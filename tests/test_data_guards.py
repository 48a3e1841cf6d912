"""The guard against training on evaluation data, with stand-ins for the shared folder ($TAKDSR_SHARED): cg-dev
frames reached through file links and hard links, damaged manifests, and renders of reserved scenes by name."""

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.data.config import DataConfig, SourceConfig, build_train_dataset
from training.data.images import MANIFEST_NAME, DatasetError


def _write_image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    return path


def _train(folder: Path) -> None:
    cfg = DataConfig([SourceConfig("folder", str(folder))], patch_size=24, length=8)
    build_train_dataset(cfg, scale=2, progress=False)


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in shared folder: one cg-dev frame and a reserved-scenes list."""
    shared = tmp_path / "shared"
    monkeypatch.setenv("TAKDSR_SHARED", str(shared))
    _write_image(shared / "data" / "cg-dev" / "x.png", seed=9)
    (shared / "data" / "reserved-scenes.txt").write_text("povray advanced/abyss.pov\n")
    return shared


def test_file_links_and_hard_links_to_evaluation_frames_are_refused(shared: Path, tmp_path: Path) -> None:
    frame = shared / "data" / "cg-dev" / "x.png"
    folder = tmp_path / "train"
    _write_image(folder / "own.png")
    _train(folder)  # the folder's own images are fine
    (folder / "frame.png").symlink_to(frame)
    with pytest.raises(DatasetError, match=r"frame\.png is a link to a frame of the evaluation frames .*never train"):
        _train(folder)
    (folder / "frame.png").unlink()
    os.link(frame, folder / "sub.png")  # a hard link: the same file under another name, realpath outside cg-dev
    with pytest.raises(DatasetError, match=r"sub\.png is a link to a frame .*never train on them"):
        _train(folder)
    (folder / "sub.png").unlink()
    (folder / "chain.png").symlink_to(tmp_path / "elsewhere.png")  # a link to a hard link of a cg-dev frame
    os.link(frame, tmp_path / "elsewhere.png")
    with pytest.raises(DatasetError, match=r"chain\.png is a link to a frame"):
        _train(folder)


def test_a_damaged_manifest_is_refused(shared: Path, tmp_path: Path) -> None:
    folder = tmp_path / "renders"
    _write_image(folder / "desk.png")
    manifest = json.dumps({"scenes": {"advanced/desk/desk.pov": {}}, "failed": {}})
    (folder / MANIFEST_NAME).write_text(manifest)
    _train(folder)
    (folder / MANIFEST_NAME).write_text(manifest[:20])  # cut short: which scenes it named is unknown
    with pytest.raises(DatasetError, match=r"manifest\.json cannot be read as JSON .*move it out of the training"):
        _train(folder)


def test_renders_of_reserved_scenes_are_refused_by_name_without_a_manifest(shared: Path, tmp_path: Path) -> None:
    folder = tmp_path / "renders"
    _write_image(folder / "advanced__desk__desk.png")
    _train(folder)  # a render of a scene that is not reserved
    _write_image(folder / "sub" / "Advanced__Abyss.jpg")  # another format, another case: still that render
    with pytest.raises(DatasetError, match=r"Advanced__Abyss\.jpg is named like a render of advanced/abyss\.pov, a "
                                           r"scene reserved for evaluation"):
        _train(folder)


def test_without_a_shared_folder_any_folder_of_images_still_trains(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Names with `__` are common in image folders: without the reserved list (no shared folder, as on a
    researcher's own machine) they are not checked, rather than refused for the missing list."""
    monkeypatch.setenv("TAKDSR_SHARED", str(tmp_path / "no-shared-folder"))
    folder = tmp_path / "photos"
    _write_image(folder / "holiday__beach.png")
    _train(folder)

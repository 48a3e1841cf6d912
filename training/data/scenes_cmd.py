"""Writing rendered HR/LR frame pairs of the procedural scenes to disk, with a manifest.

Layout of `--out`: `hr/<name>.png` (W x H, rendered with k x k supersampling), `lr_x<s>/<name>.png` (W/s x H/s:
the native render at LR size, or `degrade` of the HR), `manifest.json`. Frame k is preset `k % P` at the
`k // P`-th time of the split (see sources.scene_times), so train and val frames never share a time.
"""

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.data.degrade import degrade
from training.data.images import (
    MANIFEST_NAME,
    DatasetError,
    file_sha256,
    read_manifest,
    to_tensor,
    to_uint8,
    write_json_atomic,
    write_png,
)
from training.data.sources import LazyRenderer, LrKind, Split, check_presets, frame_name, loop_period, scene_times

__all__ = ["FrameRecord", "frame_pairs", "frame_plan", "write_scene_frames"]


@dataclass
class FrameRecord:
    """One written HR/LR pair, as the manifest stores it."""

    name: str
    preset: str
    t: float
    split: str
    hr: str  # paths relative to the output folder
    lr: str
    width: int
    height: int
    scale: int
    lr_kind: str
    supersample: int
    seconds: float
    hr_sha256: str
    lr_sha256: str
    renderer: str = ""  # the OpenGL driver, GL version: pixels differ between drivers; "" in older manifests


def frame_plan(presets: list[str], count: int, split: Split) -> list[tuple[str, float]]:
    """`count` (preset, t) pairs: presets in turn, each walking through its split's fixed times. A preset named
    twice counts once (twice in turn gave each time twice, and the repeats were skipped: half the frames asked)."""
    presets = list(dict.fromkeys(presets))
    per_preset = math.ceil(count / len(presets))
    times = {p: scene_times(split, per_preset, loop_period(p)) for p in presets}
    return [(presets[k % len(presets)], times[presets[k % len(presets)]][k // len(presets)]) for k in range(count)]


def _files_intact(out_dir: Path, record: dict) -> bool:
    """Both PNGs are there and are the ones the manifest hashed (a damaged or replaced one is rendered again)."""
    return all(
        (out_dir / record[kind]).is_file() and file_sha256(out_dir / record[kind]) == record[f"{kind}_sha256"]
        for kind in ("hr", "lr")
    )


def _render_pair(
    renderer: LazyRenderer, preset: str, t: float, size: tuple[int, int], scale: int, supersample: int, lr_kind: LrKind
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) and (H/s, W/s, 3) uint8 RGB."""
    width, height = size
    hr = renderer.render(preset, t, width, height, supersample)
    if lr_kind == "native":
        return hr, renderer.render(preset, t, width // scale, height // scale, 1)  # same t: same camera
    return hr, to_uint8(degrade(to_tensor(hr), scale))


def _check_records(out_dir: Path, manifest: dict) -> None:
    """DatasetError for a record this command does not write (an object naming its HR and LR files and their
    hashes): the manifest was edited, and what the folder holds can no longer be told."""
    for name, record in manifest["frames"].items():
        keys = ("hr", "lr", "hr_sha256", "lr_sha256")
        if not (isinstance(record, dict) and all(isinstance(record.get(key), str) for key in keys)):
            raise DatasetError(f"{out_dir / MANIFEST_NAME}: frame {name!r} is not a record this command writes "
                               "(was the file edited?); fix it or remove the folder")


def _tidy(out_dir: Path, manifest: dict, settings: dict, planned: set[str], replace: bool) -> None:
    """The pairs the folder holds that this command does not describe (a folder source reads the folder whole):
    pairs of other settings (size, scale, LR kind, supersampling) are refused (DatasetError), and pairs of these
    settings outside the plan (from a larger --count, other presets) are named in a note. With ``replace`` both are
    removed, records and files, so that the folder holds this command's frames alone."""
    frames = manifest["frames"]
    same = {name: all(record.get(key) == value for key, value in settings.items()) for name, record in frames.items()}
    other_settings = [name for name, alike in same.items() if not alike]
    unplanned = [name for name, alike in same.items() if alike and name not in planned]
    if replace:
        _remove_pairs(out_dir, manifest, other_settings + unplanned)
    elif other_settings:
        example = frames[other_settings[0]]
        described = ", ".join(f"{key} {example.get(key)}" for key in settings)
        raise DatasetError(f"{out_dir} holds {frame_pairs(len(other_settings))} rendered with other settings (e.g. "
                           f"{described}); render into another --out folder, or add --replace to remove them and "
                           "render these")
    elif unplanned:
        print(f"note: {out_dir} also holds {frame_pairs(len(unplanned))} of these settings that this command does not "
              "ask for (a larger --count or other presets before); --replace removes them")


def frame_pairs(count: int) -> str:
    """``count`` with the noun, singular for one: "1 frame pairs" in the command's lines."""
    return f"{count} frame pair" + ("" if count == 1 else "s")


def _remove_pairs(out_dir: Path, manifest: dict, names: list[str]) -> None:
    """Remove these pairs' records and files (those inside the folder), and lr_x<s> folders left empty."""
    if not names:
        return
    folders = set()
    for name in names:
        for file in _own_files(out_dir, manifest["frames"].pop(name)):
            file.unlink(missing_ok=True)
            folders.add(file.parent)
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    for folder in folders:  # an lr_x<s> folder of another scale, now empty
        with contextlib.suppress(OSError):  # not empty: frames of these settings, or files of the user's
            folder.rmdir()
    print(f"removed {frame_pairs(len(names))} this command does not describe from {out_dir}")


def _own_files(out_dir: Path, record: dict) -> list[Path]:
    """The PNG files a record names inside ``out_dir``, by their path's words (an edited manifest could name
    ``../x``); a linked hr/ or lr_x<s>/ folder counts as the folder's own. Files (or links) only, never a folder."""
    files = []
    for kind in ("hr", "lr"):
        relative = Path(os.path.normpath(record[kind]))
        if relative.is_absolute() or relative.parts[:1] == ("..",) or relative.suffix != ".png":
            continue
        path = out_dir / relative
        if path.is_symlink() or path.is_file():
            files.append(path)
    return files


def write_scene_frames(
    out_dir: Path,
    count: int,
    *,
    width: int = 1920,
    height: int = 1080,
    scale: int = 2,
    lr_kind: LrKind = "native",
    supersample: int = 2,
    split: Split = "train",
    presets: list[str] | None = None,
    progress: bool = True,
    replace: bool = False,
) -> dict:
    """Render `count` HR/LR pairs into `out_dir` (skipping pairs the manifest already has with the same settings)
    and return the manifest, which is also written to `out_dir/manifest.json` after every frame. Pairs of other
    settings already there are refused (DatasetError); with `replace` they are removed first, and so are pairs of
    these settings that this plan does not ask for."""
    if count < 1:
        raise DatasetError(f"count must be >= 1, got {count}")
    if width % scale or height % scale:
        raise DatasetError(f"frame {width}x{height} is not a multiple of scale {scale}")
    presets = check_presets(presets)
    renderer = LazyRenderer()
    lr_dir = f"lr_x{scale}"
    manifest_path = out_dir / MANIFEST_NAME
    manifest = read_manifest(manifest_path, ("frames",), "scenes")
    _check_records(out_dir, manifest)
    other_splits = sorted({record.get("split") for record in manifest["frames"].values()} - {split})
    if other_splits:  # a folder source reads every frame of a folder: val views would become training data
        raise DatasetError(f"{out_dir} holds {', '.join(map(str, other_splits))} frames; {split} frames need "
                           "another --out folder (train and val never share one)")
    settings = {"width": width, "height": height, "scale": scale, "lr_kind": lr_kind, "supersample": supersample}
    plan = frame_plan(presets, count, split)
    _tidy(out_dir, manifest, settings, {frame_name(preset, t) for preset, t in plan}, replace)
    for sub in ("hr", lr_dir):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    for preset, t in tqdm(plan, desc="scenes", unit="frame", disable=not progress):
        name = frame_name(preset, t)
        old = manifest["frames"].get(name)
        if old and _files_intact(out_dir, old):  # with these settings: the others are gone
            continue
        start = time.perf_counter()
        hr, lr = _render_pair(renderer, preset, t, (width, height), scale, supersample, lr_kind)
        seconds = time.perf_counter() - start
        hr_path, lr_path = out_dir / "hr" / f"{name}.png", out_dir / lr_dir / f"{name}.png"
        try:
            write_png(hr_path, hr)
            write_png(lr_path, lr)
        except BaseException:  # a full disk or a stop between the two: no HR frame without its LR and its record
            hr_path.unlink(missing_ok=True)
            raise
        record = FrameRecord(
            name, preset, t, split, f"hr/{name}.png", f"{lr_dir}/{name}.png", width, height, scale, lr_kind,
            supersample, round(seconds, 3), file_sha256(hr_path), file_sha256(lr_path), renderer.description() or "",
        )  # fmt: skip
        manifest["frames"][name] = asdict(record)
        write_json_atomic(manifest_path, manifest)
    return manifest

"""Scene-renderer data: the `scenes` command, native LR alignment, lazy per-worker contexts, the time split.

Tiny frames (64x36) on whatever OpenGL is present (Mesa llvmpipe here). The first test keeps this process free
of any OpenGL context, so that the forked DataLoader workers are the first to make one.
"""

import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import scenes
from training.data.augment import AugmentConfig
from training.data.config import DataConfig, SourceConfig, build_eval_dataset, build_train_dataset
from training.data.datasets import EpochSampler, PatchDataset, worker_start_method
from training.data.degrade import degrade
from training.data.images import read_image
from training.data.paths import REPO_ROOT
from training.data.scenes_cmd import frame_pairs
from training.data.sources import SceneSource, frame_name, loop_period

NO_EGL = "could not create a headless EGL"
EGL_HINT = "bash scripts/setup.sh --dev installs Mesa's EGL (llvmpipe)"


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10 * math.log10(((a - b) ** 2).mean().item() + 1e-12)


def _scene_source(**kwargs) -> SceneSource:
    defaults = {"width": 64, "height": 36, "scale": 2, "lr_kind": "native", "supersample": 2, "frames_per_preset": 3}
    return SceneSource(None, "train", **{**defaults, **kwargs})


def test_workers_render_lazily_and_reproducibly() -> None:
    source = _scene_source()
    ds = PatchDataset([source], [1.0], scale=2, patch_size=16, augment=AugmentConfig(blend_p=0.5), seed=1, length=8)
    try:
        # the trainer's start method: forked workers fail when an earlier test left this process an OpenGL context
        parallel = list(DataLoader(ds, batch_size=4, sampler=EpochSampler(8), num_workers=2, timeout=120,
                                   multiprocessing_context=worker_start_method(ds)))
    except RuntimeError as exc:
        if NO_EGL in str(exc):
            pytest.fail(f"no headless OpenGL here: {exc}; {EGL_HINT}")
        raise
    assert source.renderer._renderer is None  # the workers rendered; this process made no context
    serial = [ds[i] for i in range(8)]
    assert torch.equal(torch.stack([item["hr"] for item in serial]), torch.cat([b["hr"] for b in parallel]))
    assert torch.equal(torch.stack([item["lr"] for item in serial]), torch.cat([b["lr"] for b in parallel]))


def _run_command(out: Path, split: str = "val", extra: tuple[str, ...] | list[str] = ()) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "training.data", "scenes", "--out", str(out), "--count", "4", "--width", "64",
               "--height", "36", "--scale", "2", "--lr-kind", "native", "--supersample", "2", "--split", split,
               "--presets", "city", *extra]  # fmt: skip  (a later option wins: extra overrides these)
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    if result.returncode != 0 and NO_EGL in result.stderr:
        pytest.fail(f"no headless OpenGL here; {EGL_HINT}")
    return result


def test_scenes_command_writes_aligned_pairs(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    result = _run_command(out)
    assert result.returncode == 0, result.stderr
    frames = json.loads((out / "manifest.json").read_text())["frames"]
    assert len(frames) == 4
    period = loop_period("city")
    pairs = []
    for record in frames.values():
        assert record["preset"] == "city" and record["split"] == "val" and record["lr_kind"] == "native"
        assert 0.8 * period - 1e-3 <= record["t"] < 0.95 * period  # validation times only (rounded to 4 decimals)
        hr, lr = read_image(out / record["hr"]), read_image(out / record["lr"])
        assert hr.shape == (3, 36, 64) and lr.shape == (3, 18, 32)
        assert record["hr_sha256"] == hashlib.sha256((out / record["hr"]).read_bytes()).hexdigest()
        # the driver, since pixels differ between drivers (here Mesa's llvmpipe, or a GPU's): "<renderer>, <version>"
        assert ", " in record["renderer"] and any(word in record["renderer"] for word in ("Mesa", "NVIDIA", "OpenGL"))
        pairs.append((hr, lr))
    # Same camera: each HR, degraded, is closer to its own native LR than to the LR of any other time.
    for i, (hr, _) in enumerate(pairs):
        scores = [_psnr(degrade(hr, 2), lr) for _, lr in pairs]
        assert int(np.argmax(scores)) == i

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert _run_command(out).returncode == 0  # everything already there: nothing re-rendered
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes
    damaged, pair = out / record["hr"], {out / record["hr"], out / record["lr"]}
    damaged.write_bytes(damaged.read_bytes()[:100])  # a damaged frame's pair is rendered again, and only that one
    assert _run_command(out).returncode == 0
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == record["hr_sha256"]
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if p not in pair}
    assert kept == {p: t for p, t in mtimes.items() if p not in pair}
    mixed = _run_command(out, split="train")  # val views would become training data in a folder source
    assert mixed.returncode == 2 and "holds val frames; train frames need another --out folder" in mixed.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_scenes_command_says_so_and_leaves_whole_frames(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C printed a KeyboardInterrupt traceback and SIGTERM killed the command with nothing said; a PNG being
    written was left truncated under its frame's name."""
    out = tmp_path / "frames"
    command = [sys.executable, "-m", "training.data", "scenes", "--out", str(out), "--count", "400", "--width",
               "320", "--height", "180", "--presets", "city"]
    run = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None and len(list(out.glob("hr/*.png"))) < 2:
        time.sleep(0.1)
    run.send_signal(sig)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130 and "stopped: the frames finished so far are in" in stderr, stderr
    assert "Traceback" not in stderr
    for png in out.rglob("*.png"):  # whole files only (a temporary one is hidden, and removed)
        assert cv2.imread(str(png)) is not None, png
    assert [p.name for p in out.rglob(".*") if p.is_file()] == [".training-data.lock"]  # no temporary file left
    frames = json.loads((out / "manifest.json").read_text())["frames"]
    assert all((out / record["hr"]).is_file() and (out / record["lr"]).is_file() for record in frames.values())


def test_a_pair_whose_lr_cannot_be_written_leaves_no_hr_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a walkthrough: a full disk at the LR PNG left its HR frame beside no LR and no manifest record, where a
    folder source on hr/ read it."""
    from training.data import scenes_cmd

    written = scenes_cmd.write_png

    def full_at_lr(path: Path, image: np.ndarray) -> None:
        if path.parent.name.startswith("lr_"):
            raise OSError(28, "No space left on device")
        written(path, image)

    monkeypatch.setattr(scenes_cmd, "write_png", full_at_lr)
    with pytest.raises(OSError, match="No space left"):
        scenes_cmd.write_scene_frames(tmp_path, 1, width=64, height=36, presets=["city"], progress=False)
    assert list(tmp_path.rglob("*.png")) == [] and not (tmp_path / "manifest.json").exists()


def test_a_stop_before_the_first_frame_says_nothing_was_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The stop's line named --out's manifest.json when none had been written, and the folder made for it was gone."""
    from training.data import __main__ as data_cli

    def stopped(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(data_cli, "write_scene_frames", stopped)
    out = tmp_path / "frames"
    assert data_cli.main(["scenes", "--out", str(out), "--count", "1", "--width", "64", "--height", "36"]) == 130
    assert "stopped: no frame was finished, so nothing was kept; the same command starts again" in \
        capsys.readouterr().err
    assert not out.exists()


def test_more_frames_than_distinct_names_or_a_huge_count_is_refused_at_once(tmp_path: Path) -> None:
    """From a walkthrough: names keep 4 decimals of t, so at large counts times merged and fewer frames were written
    without a word; and --count 1000000000 computed its plan for minutes in silence before the first frame."""
    from training.data.images import DatasetError
    from training.data.sources import MAX_TIMES_PER_PRESET, scene_times

    with pytest.raises(DatasetError, match=r"40000 times of the val part of a 24 s loop: only \d+ of them differ"):
        scene_times("val", 40_000, loop_period("arena"))
    assert len(set(scene_times("val", 20_000, loop_period("arena")))) == 20_000
    with pytest.raises(DatasetError, match=f"at most {MAX_TIMES_PER_PRESET}"):
        scene_times("train", MAX_TIMES_PER_PRESET + 1, loop_period("city"))
    huge = _run_command(tmp_path / "out", extra=["--count", "1000000000"])  # refused before the plan is computed
    assert huge.returncode == 2 and "times per preset asked for; at most" in huge.stderr, huge.stderr
    assert not (tmp_path / "out").exists()


def test_write_png_is_whole_or_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.data import images
    from training.data.images import write_png

    def full_disk(source: str, target: str) -> None:  # the temporary file is written; the disk fills before the end
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_png(tmp_path / "frame.png", np.zeros((8, 8, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_scenes_command_refuses_another_commands_folder(tmp_path: Path) -> None:
    out = tmp_path / "povray_out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"scenes": {}, "failed": {}}))  # what the povray command writes
    result = _run_command(out)
    assert result.returncode == 2 and "was not written by `python -m training.data scenes`" in result.stderr
    assert "Traceback" not in result.stderr and not list(out.rglob("*.png"))


def test_loop_period_is_the_camera_period() -> None:
    for preset in scenes.PRESETS:
        period = loop_period(preset)
        assert period < 600
        for t in (0.3, 7.7):
            a, b = scenes.camera_at(preset, t), scenes.camera_at(preset, t + period)
            assert np.allclose((*a.position, a.yaw, a.pitch), (*b.position, b.yaw, b.pitch), atol=1e-6)


def test_bicubic_scene_patches_and_validation_frames() -> None:
    cfg = DataConfig(
        [SourceConfig("scenes", width=64, height=36, lr_kind="bicubic", frames_per_preset=2)],
        patch_size=16, length=4,
        eval=SourceConfig("scenes", width=64, height=36, lr_kind="native", frames_per_preset=1),
    )  # fmt: skip
    train = build_train_dataset(cfg, scale=4, seed=0)
    for i in range(len(train)):
        assert torch.equal(train[i]["lr"], degrade(train[i]["hr"], 4))
    evaluation = build_eval_dataset(cfg, scale=2)
    assert len(evaluation) == len(scenes.PRESETS)
    item = evaluation[0]
    assert item["hr"].shape == (3, 36, 64) and item["lr"].shape == (3, 18, 32)
    preset, t = evaluation.source.pool[0]
    assert item["name"] == frame_name(preset, t) and t >= 0.8 * loop_period(preset) - 1e-3
    train_times = {t for _, t in train.sources[0].pool}
    assert not train_times & {t for _, t in evaluation.source.pool}


def test_disk_cache_is_reused(tmp_path: Path) -> None:
    first = _scene_source(cache_dir=tmp_path, frames_per_preset=1)
    frame = first.frame(0)
    assert len(list(tmp_path.rglob("*.png"))) == 2  # HR and native LR
    second = _scene_source(cache_dir=tmp_path, frames_per_preset=1)
    again = second.frame(0)
    assert second.renderer._renderer is None  # read from disk, not rendered
    assert np.array_equal(frame.hr, again.hr) and np.array_equal(frame.lr, again.lr)


def test_a_cached_frame_of_the_wrong_size_is_rendered_again(tmp_path: Path) -> None:
    """A stale or replaced cache file whose pixels are not the size its name says is treated as damaged."""
    frame = _scene_source(cache_dir=tmp_path, frames_per_preset=1).frame(0)
    lr_file = next(tmp_path.rglob("*_32x18_ss1.png"))
    cv2.imwrite(str(lr_file), np.zeros((20, 200, 3), np.uint8))
    again = _scene_source(cache_dir=tmp_path, frames_per_preset=1).frame(0)
    assert again.lr.shape == (18, 32, 3) and np.array_equal(again.lr, frame.lr)
    assert read_image(lr_file).shape == (3, 18, 32)  # the cache file is repaired too


def test_fork_after_rendering_is_refused_and_forkserver_works() -> None:
    source = _scene_source(frames_per_preset=1)
    ds = PatchDataset([source], [1.0], scale=2, patch_size=16, seed=5, length=4)
    serial = [ds[i] for i in range(4)]  # this process now holds an OpenGL context
    assert worker_start_method(ds) == "forkserver"
    fresh = PatchDataset([_scene_source(frames_per_preset=2)], [1.0], scale=2, patch_size=16, seed=5, length=4)
    with pytest.raises(RuntimeError, match="forkserver"):  # a clear error, not a hang
        list(DataLoader(fresh, batch_size=4, num_workers=1, timeout=60))
    loader = DataLoader(ds, batch_size=4, num_workers=1, timeout=120, multiprocessing_context=worker_start_method(ds))
    assert torch.equal(next(iter(loader))["hr"], torch.stack([item["hr"] for item in serial]))


def test_a_preset_named_twice_still_gives_every_frame_asked_for() -> None:
    """`--presets city city --count 4` planned each time twice, and the repeats were skipped: 2 pairs, not 4."""
    from training.data.scenes_cmd import frame_plan

    plan = frame_plan(["city", "city"], 4, "train")
    assert len(set(plan)) == 4 and plan == frame_plan(["city"], 4, "train")


def test_a_rerun_with_other_settings_is_refused_or_replaces_the_old_frames(tmp_path: Path) -> None:
    """A rerun with another --scale (or size, LR kind, supersampling) and a smaller --count left the earlier frames
    in the folder, which a folder source reads whole: a training set of two settings nobody asked for. It is refused
    now, and --replace removes them, their files and their emptied lr_x<s> folder, before rendering."""
    out = tmp_path / "frames"
    assert _run_command(out).returncode == 0  # 4 pairs at x2
    before = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    refused = _run_command(out, extra=["--scale", "4", "--count", "2"])
    assert refused.returncode == 2 and "holds 4 frame pairs rendered with other settings (e.g. width 64, height 36, " \
        "scale 2, lr_kind native, supersample 2)" in refused.stderr and "--replace" in refused.stderr, refused.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*.png")) == before  # nothing touched
    manifest = json.loads((out / "manifest.json").read_text())
    outside = tmp_path / "not_ours.png"
    outside.write_bytes(b"a file of the user's")
    last = sorted(manifest["frames"])[-1]  # not among the 2 frames rendered next (they overwrite their names' files)
    manifest["frames"][last]["hr"] = "../not_ours.png"  # an edited manifest: --replace removes only files inside
    (out / "manifest.json").write_text(json.dumps(manifest))
    replaced = _run_command(out, extra=["--scale", "4", "--count", "2", "--replace"])
    assert replaced.returncode == 0, replaced.stderr
    assert "removed 4 frame pairs this command does not describe" in replaced.stdout
    frames = json.loads((out / "manifest.json").read_text())["frames"]
    assert len(frames) == 2 and {record["scale"] for record in frames.values()} == {4}
    assert sorted(p.parent.name for p in out.rglob("*.png")).count("lr_x4") == 2
    assert not (out / "lr_x2").exists()
    assert sorted(p.stem for p in (out / "hr").glob("*.png")) == sorted([*frames, last])  # its record named another
    assert outside.read_bytes() == b"a file of the user's"


def test_replace_keeps_a_folder_to_the_frames_asked_for(tmp_path: Path) -> None:
    """A smaller --count with the same settings kept the earlier frames without a word; it now says so, and
    --replace removes them, also from an hr/ folder linked to another disk (its files were taken for outsiders).
    A manifest record this command does not write is refused by name, not with a traceback."""
    out, elsewhere = tmp_path / "frames", tmp_path / "other_disk_hr"
    out.mkdir()
    elsewhere.mkdir()
    (out / "hr").symlink_to(elsewhere)
    assert _run_command(out).returncode == 0  # 4 pairs
    kept = _run_command(out, extra=["--count", "2"])
    assert kept.returncode == 0 and "also holds 2 frame pairs of these settings" in kept.stdout, kept.stdout
    assert len(list(elsewhere.glob("*.png"))) == 4
    manifest = json.loads((out / "manifest.json").read_text())
    last = sorted(manifest["frames"])[-1]  # not among the 2 frames asked for
    manifest["frames"][last]["lr"] = "hr"  # an edited record naming a folder: never removed
    (out / "manifest.json").write_text(json.dumps(manifest))
    replaced = _run_command(out, extra=["--count", "2", "--replace"])
    assert replaced.returncode == 0 and "removed 2 frame pairs" in replaced.stdout, replaced.stderr
    frames = json.loads((out / "manifest.json").read_text())["frames"]
    assert len(frames) == 2 and sorted(p.stem for p in elsewhere.glob("*.png")) == sorted(frames)
    assert (out / "hr").is_symlink() and len(list((out / "lr_x2").glob("*.png"))) == 3  # the edited record's LR
    manifest = json.loads((out / "manifest.json").read_text())
    for junk in ("not a record", {**next(iter(manifest["frames"].values())), "hr_sha256": None}):
        (out / "manifest.json").write_text(json.dumps({**manifest, "frames": {**manifest["frames"], "junk": junk}}))
        refused = _run_command(out)
        assert refused.returncode == 2 and "frame 'junk' is not a record this command writes" in refused.stderr
        assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("command", ["povray", "scenes"])
def test_a_frame_larger_than_the_trainer_reads_is_refused_before_rendering(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """POV-Ray rendered a 100000x100000 frame for hours that the trainer would then refuse as a decompression bomb."""
    from training import MAX_IMAGE_PIXELS
    from training.data.__main__ import main as data_main

    count = ["--count", "1"] if command == "scenes" else ["--only", "incdemo/transforms"]
    assert data_main([command, "--out", str(tmp_path / "out"), "--width", "8194", "--height", "8192", *count]) == 2
    assert 8194 * 8192 > MAX_IMAGE_PIXELS >= 8192 * 8192
    assert f"8194x8192 is more than {MAX_IMAGE_PIXELS} pixels" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_name_that_is_not_utf8_is_printed_on_a_strict_console(tmp_path: Path) -> None:
    """`scenes --out $'bad/s\\xe9'` under a strict UTF-8 locale (Python then encodes stdout and stderr strictly)
    wrote every frame, then printing the folder's name failed ("'utf-8' codec can't encode character '\\udce9'",
    exit 2). The name is printed with backslash escapes."""
    import os

    out = tmp_path / os.fsdecode(b"s\xe9")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    command = [sys.executable, "-m", "training.data", "scenes", "--out", str(out), "--count", "2", "--width", "64",
               "--height", "32", "--presets", "city"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, env=env, timeout=180)
    stdout, stderr = (stream.decode("utf-8") for stream in (result.stdout, result.stderr))  # ASCII escapes: valid
    if result.returncode != 0 and NO_EGL in stderr:
        pytest.fail(f"no headless OpenGL here; {EGL_HINT}")
    assert result.returncode == 0, stderr
    assert f"2 frame pairs in {tmp_path}/s\\udce9" in stdout
    assert len(json.loads((out / "manifest.json").read_text())["frames"]) == 2


def test_one_frame_pair_is_said_in_the_singular() -> None:
    """A --count 1 render ended with "1 frame pairs in ..." (a review)."""
    assert [frame_pairs(n) for n in (0, 1, 2)] == ["0 frame pairs", "1 frame pair", "2 frame pairs"]


def test_a_folder_another_data_command_writes_into_is_refused(tmp_path: Path) -> None:
    """From a researcher's walkthrough: two commands into one folder each rewrote the manifest from their own copy,
    and each lost the other's records (two `povray` runs: 4 renders, 2 in the manifest). The second now stops at once;
    the folder is as the first left it."""
    import fcntl

    out = tmp_path / "frames"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    with open(out / ".training-data.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running command holds it
        refused = _run_command(out)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == (f"error: another python -m training.data command writes into {out}: wait for it to end, "
                              "or choose another --out\n")
    assert sorted(path.name for path in out.iterdir()) == [".training-data.lock", "mine.txt"]
    done = _run_command(out, extra=["--count", "1"])  # once it has ended
    assert done.returncode == 0 and (out / "manifest.json").is_file(), done.stderr


def test_a_failed_scenes_command_leaves_no_empty_folders(tmp_path: Path) -> None:
    """A frame larger than the GL limit failed after hr/ and lr_x2/ were made, and left them (and --out) empty."""
    for out in (tmp_path / "new" / "frames", tmp_path / "existing"):
        (tmp_path / "existing").mkdir(exist_ok=True)
        failed = _run_command(out, extra=["--count", "1", "--width", "9000", "--height", "100"])
        assert failed.returncode == 2 and "exceeds the GL limit" in failed.stderr, failed.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing"]  # made by the test, not the command
    assert [path.name for path in (tmp_path / "existing").iterdir()] == [".training-data.lock"]

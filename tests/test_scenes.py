"""The scene renderer, headless through EGL (Mesa llvmpipe in CI): tiny frames, every preset."""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import scenes
from scenes import PRESETS, Camera, SceneRenderer, camera_at

W, H = 64, 36
TIMES = (0.0, 7.3)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def renderer():
    r = SceneRenderer()
    yield r
    r.release()


def test_public_api() -> None:
    assert set(scenes.__all__) == {
        "PRESETS",
        "Camera",
        "HeadlessContextError",
        "SceneRenderer",
        "camera_at",
        "create_headless_context",
        "render",
    }
    assert len(PRESETS) >= 4
    assert {"city", "garden", "interior", "arena"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_frame_shape_dtype_and_content(renderer: SceneRenderer, preset: str) -> None:
    for t in TIMES:
        frame = renderer.render(preset, t, W, H)
        assert frame.shape == (H, W, 3)
        assert frame.dtype == np.uint8
        assert frame.flags["C_CONTIGUOUS"]
        assert frame.std() > 20.0, "frame is nearly flat"
        assert len(np.unique(frame.reshape(-1, 3), axis=0)) > 300, "too few distinct colours"
        sky_like = (frame.astype(int).max(axis=2) - frame.min(axis=2) < 40) & (frame.min(axis=2) > 150)
        assert sky_like.mean() < 0.5, "mostly sky or blank"


@pytest.mark.parametrize("preset", PRESETS)
def test_deterministic_within_and_across_renderers(renderer: SceneRenderer, preset: str) -> None:
    first = renderer.render(preset, 3.25, W, H)
    renderer.render("city" if preset != "city" else "arena", 1.0, 32, 18)  # other state in between
    assert renderer.render(preset, 3.25, W, H).tobytes() == first.tobytes()
    fresh = SceneRenderer()
    try:
        assert fresh.render(preset, 3.25, W, H).tobytes() == first.tobytes()
    finally:
        fresh.release()


def test_presets_differ_from_each_other(renderer: SceneRenderer) -> None:
    frames = {p: renderer.render(p, 2.0, W, H).astype(np.int16) for p in PRESETS}
    for i, a in enumerate(PRESETS):
        for b in PRESETS[i + 1 :]:
            assert np.abs(frames[a] - frames[b]).mean() > 15.0, f"{a} and {b} look alike"


@pytest.mark.parametrize("preset", PRESETS)
def test_time_moves_the_camera_smoothly(renderer: SceneRenderer, preset: str) -> None:
    a, b = camera_at(preset, 4.0), camera_at(preset, 4.05)
    step = math.dist(a.position, b.position)
    assert 0.0 < step < 1.0, "camera should move a little in 50 ms"
    assert abs(a.yaw - b.yaw) < 0.2
    assert camera_at(preset, 4.0) == a
    assert not np.array_equal(renderer.render(preset, 0.0, W, H), renderer.render(preset, 5.0, W, H))


@pytest.mark.parametrize("preset", PRESETS)
def test_supersample_is_the_box_filtered_large_frame(renderer: SceneRenderer, preset: str) -> None:
    native = renderer.render(preset, 1.5, W, H)
    hr = renderer.render(preset, 1.5, W, H, supersample=2)
    assert hr.shape == (H, W, 3) and hr.dtype == np.uint8
    assert not np.array_equal(hr, native)
    big = renderer.render(preset, 1.5, 2 * W, 2 * H).astype(np.float64)
    expected = np.rint(big.reshape(H, 2, W, 2, 3).mean(axis=(1, 3))).astype(np.uint8)
    np.testing.assert_array_equal(hr, expected)
    # Same view at both resolutions: once aliasing is averaged out (4 x 4 blocks) LR matches the ground truth.
    assert np.abs(_blocks(hr) - _blocks(native)).mean() < 10.0


def _blocks(frame: np.ndarray, k: int = 4) -> np.ndarray:
    h, w = frame.shape[0] // k, frame.shape[1] // k
    return frame[: h * k, : w * k].reshape(h, k, w, k, 3).mean(axis=(1, 3))


def test_explicit_camera(renderer: SceneRenderer) -> None:
    default = renderer.render("garden", 2.0, W, H)
    assert np.array_equal(renderer.render("garden", 2.0, W, H, camera=camera_at("garden", 2.0)), default)
    cam = Camera(position=(0.0, 1.7, 12.0), yaw=0.3, pitch=-0.1, fov_y_degrees=75.0)
    moved = renderer.render("garden", 2.0, W, H, camera=cam)
    assert not np.array_equal(moved, default)
    assert np.array_equal(renderer.render("garden", 99.0, W, H, camera=cam), moved), "camera overrides t"


def test_render_into_a_caller_framebuffer(renderer: SceneRenderer) -> None:
    fbo = renderer.ctx.simple_framebuffer((W, H))
    try:
        renderer.render_into(fbo, "interior", 4.0)
        pixels = np.frombuffer(fbo.read(components=3, alignment=1), np.uint8).reshape(H, W, 3)[::-1]
        assert np.array_equal(pixels, renderer.render("interior", 4.0, W, H))
    finally:
        fbo.release()


def test_borrowed_context_survives_release(renderer: SceneRenderer) -> None:
    borrowed = SceneRenderer(renderer.ctx)
    frame = borrowed.render("arena", 1.0, W, H)
    borrowed.release()
    assert np.array_equal(renderer.render("arena", 1.0, W, H), frame)
    assert np.array_equal(borrowed.render("arena", 1.0, W, H), frame), "usable again after release"
    borrowed.release()


def test_an_owned_context_is_released_by_with_or_when_dropped() -> None:
    """A renderer that makes its own context frees it on leaving a with block, and when dropped without release()
    (each headless context holds tens of MB on llvmpipe)."""
    with SceneRenderer() as scoped:
        scoped.render("city", 0.0, 32, 18)
    assert scoped._ctx is None and scoped._finalizer is None
    dropped = SceneRenderer()
    dropped.render("city", 0.0, 32, 18)
    finalizer = dropped._finalizer
    assert finalizer is not None and finalizer.alive
    del dropped
    gc.collect()
    assert not finalizer.alive  # its context was released


def test_module_level_render_matches_a_renderer(renderer: SceneRenderer) -> None:
    assert np.array_equal(scenes.render("city", 0.5, W, H), renderer.render("city", 0.5, W, H))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("nowhere", 0.0, W, H), {}, "unknown scene preset"),
        (("city", 0.0, 0, H), {}, "width"),
        (("city", 0.0, W, -3), {}, "height"),
        (("city", 0.0, 64.5, H), {}, "width"),
        (("city", 0.0, W, H), {"supersample": 0}, "supersample"),
        (("city", float("nan"), W, H), {}, "finite"),
        (("city", 0.0, 20000, H), {}, "GL limit"),
        (("city", 0.0, 9000, 100), {"supersample": 2}, "GL limit"),
    ],
)
def test_bad_arguments_raise_value_error(renderer: SceneRenderer, args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        renderer.render(*args, **kwargs)


def test_bad_camera_and_renderer_arguments() -> None:
    with pytest.raises(ValueError, match="unknown scene preset"):
        camera_at("moon", 0.0)
    with pytest.raises(ValueError, match="finite"):
        camera_at("city", float("inf"))
    with pytest.raises(ValueError, match="anisotropy"):
        SceneRenderer(anisotropy=0.5)
    nan = float("nan")  # each rendered a flat colour without a word; a field of view of 0 divided by zero
    for position, yaw, pitch in (((nan, 1.0, 0.0), 0.0, 0.0), ((0.0, 1.0, 0.0), float("inf"), 0.0),
                                 ((0.0, 1.0, 0.0), 0.0, nan)):
        with pytest.raises(ValueError, match="finite 3D position, yaw and pitch"):
            Camera(position=position, yaw=yaw, pitch=pitch)
    for fov in (0.0, -60.0, 180.0, nan):
        with pytest.raises(ValueError, match="strictly between 0 and 180"):
            Camera(position=(0.0, 1.0, 0.0), yaw=0.0, pitch=0.0, fov_y_degrees=fov)


def test_import_and_render_without_torch() -> None:
    code = "import scenes, sys; scenes.render('city', 0, 64, 36); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_renderer_benchmark_prints_its_table_and_writes_its_json(tmp_path: Path) -> None:
    """`python -m scenes.bench` (docs/scenes.md) was run by no test (from the coverage review): one frame per size of
    one preset, its table and report; a --json it cannot write is refused before the rendering."""
    preset = next(iter(PRESETS))
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "scenes.bench", "--frames", "1", "--presets", preset, "--json",
                           str(out)], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [(row["width"], row["height"]) for row in report["results"]] == [(640, 360), (1280, 720), (1920, 1080)]
    assert all(row["preset"] == preset and row["fps"] > 0 for row in report["results"])
    assert "1920x1080" in done.stdout and f"wrote {out}" in done.stdout
    refused = subprocess.run([sys.executable, "-m", "scenes.bench", "--json", str(tmp_path / "missing" / "b.json")],
                             capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert refused.returncode == 2 and "name a file in an existing folder" in refused.stderr, refused.stderr
    # the renderer's ValueError came out as a traceback (from a walkthrough)
    refused = subprocess.run([sys.executable, "-m", "scenes.bench", "--anisotropy", "0", "--json", str(out)],
                             capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert refused.returncode == 2 and "--anisotropy must be a number >= 1" in refused.stderr, refused.stderr

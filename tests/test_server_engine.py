"""The engine in-process (formats, alpha, rounding, limits), the offline CLI, and the CUDA paths when a GPU exists."""

from __future__ import annotations

import collections
import os
import pathlib
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from upscaler_server.engine import Engine, NearestEngine, TorchEngine, create_engine, load_network
from upscaler_server.errors import ConfigError, EngineError, ModelLoadError, SharedMemoryError, UpscalerError
from upscaler_server.host import resolve_device
from upscaler_server.protocol import PIXEL_FORMATS

from server_utils import REPO, ArrayFrame, make_checkpoint, png_header_only

RNG = np.random.default_rng(7)
RGB = PIXEL_FORMATS["RGB8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "student.safetensors")


@pytest.fixture(scope="module")
def engine(checkpoint: pathlib.Path) -> Iterator[Engine]:
    threads = torch.get_num_threads()
    yield create_engine(checkpoint=checkpoint, device="cpu", precision="fp32", threads=1)
    torch.set_num_threads(threads)  # the engine sets the process-wide count; give other tests theirs back


def _reference(engine: Engine, rgb: np.ndarray) -> np.ndarray:
    """The documented conversion, written out independently: u8/255 -> model -> round(clamp(y, 0, 1) * 255)."""
    net = engine._net  # type: ignore[attr-defined]
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    with torch.inference_mode():
        y = net(x.contiguous(memory_format=torch.channels_last))
    return (y[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_engine_matches_reference(engine: Engine) -> None:
    rgb = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    out = engine.run(rgb)
    assert out.shape == (48, 80, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _reference(engine, rgb))


def test_pixel_formats_agree(engine: Engine) -> None:
    rgba = RNG.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    rgb = np.ascontiguousarray(rgba[..., :3])
    ref = engine.run(rgb, "RGB8")
    bgr = engine.run(np.ascontiguousarray(rgb[..., ::-1]), "BGR8")
    out_rgba = engine.run(rgba, "RGBA8")
    out_bgra = engine.run(np.ascontiguousarray(rgba[..., [2, 1, 0, 3]]), "BGRA8")
    np.testing.assert_array_equal(bgr[..., ::-1], ref)
    np.testing.assert_array_equal(out_rgba[..., :3], ref)
    np.testing.assert_array_equal(out_bgra[..., [2, 1, 0]], ref)
    alpha = np.repeat(np.repeat(rgba[..., 3], 2, axis=0), 2, axis=1)  # nearest neighbour, never the model
    np.testing.assert_array_equal(out_rgba[..., 3], alpha)
    np.testing.assert_array_equal(out_bgra[..., 3], alpha)


def test_output_is_clamped_not_wrapped(engine: Engine) -> None:
    white, black = np.full((16, 16, 3), 255, np.uint8), np.zeros((16, 16, 3), np.uint8)
    for frame in (white, black):  # a random network overshoots [0, 1]; uint8 must saturate, not wrap
        np.testing.assert_array_equal(engine.run(frame), _reference(engine, frame))


def test_engine_rejects_bad_frames(engine: Engine) -> None:
    assert engine.min_input_size == 15
    with pytest.raises(EngineError, match="minimum"):
        engine.run(np.zeros((14, 64, 3), np.uint8))
    with pytest.raises(EngineError):
        engine.run(np.zeros((16, 16, 3), np.float32))
    with pytest.raises(EngineError):
        engine.upscale(np.zeros((16, 16, 3), np.uint8), PIXEL_FORMATS["RGBA8"], np.zeros((32, 32, 4), np.uint8))
    with pytest.raises(EngineError, match="output"):
        engine.upscale(np.zeros((16, 16, 3), np.uint8), PIXEL_FORMATS["RGB8"], np.zeros((32, 31, 3), np.uint8))


def test_read_only_input_is_accepted(engine: Engine) -> None:
    rgb = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    frozen = np.frombuffer(rgb.tobytes(), np.uint8).reshape(rgb.shape)
    np.testing.assert_array_equal(engine.run(frozen), engine.run(rgb))


def test_nearest_engine() -> None:
    frame = RNG.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    out = NearestEngine(3).run(frame, "BGRA8")
    np.testing.assert_array_equal(out, np.repeat(np.repeat(frame, 3, axis=0), 3, axis=1))


def test_missing_and_bad_models(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        create_engine(checkpoint=tmp_path / "nope.safetensors", device="cpu")
    fifo, loop = tmp_path / "fifo.safetensors", tmp_path / "loop.safetensors"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    with pytest.raises(ModelLoadError, match=r"fifo\.safetensors.: not a regular file"):  # was "not found"
        create_engine(checkpoint=fifo, device="cpu")
    with pytest.raises(ModelLoadError, match=r"loop\.safetensors': a symbolic link that leads nowhere"):
        create_engine(checkpoint=loop, device="cpu")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match=r"corrupt\.safetensors"):
        create_engine(checkpoint=corrupt, device="cpu")
    with pytest.raises(ModelLoadError, match="decoder"):
        create_engine(model="rlfn_teacher", device="cpu")
    with pytest.raises(ModelLoadError, match="unknown model"):
        create_engine(model="no_such_model", device="cpu")
    with pytest.raises(ConfigError, match=r"--scale 5: cannot build 'rlfn_s'.*need scale in"):  # a bad argument
        create_engine(model="rlfn_s", scale=5, device="cpu")
    with pytest.raises(ConfigError, match="the nearest backend runs no model"):  # it ignored them
        create_engine(checkpoint=pathlib.Path("rlfn_s_native_x2"), backend="nearest")
    with pytest.raises(ConfigError, match="the nearest backend runs no model"):
        create_engine(model="rlfn_s", backend="nearest")
    with pytest.raises(ModelLoadError, match=r"is a folder; pass a \.safetensors file or a bundled name"):
        create_engine(checkpoint=tmp_path, device="cpu")
    named = create_engine(checkpoint=pathlib.Path("rlfn_s_native_x2"), device="cpu", threads=1)  # a bundled name
    assert named.weights.endswith("models/weights/rlfn_s_native_x2.safetensors")


def test_offline_cli_is_bit_exact(engine: Engine, checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    rgb = RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    rgba = RNG.integers(0, 256, (18, 16, 4), dtype=np.uint8)
    cv2.imwrite(str(src / "colour.png"), rgb[..., ::-1])
    cv2.imwrite(str(src / "alpha.png"), rgba[..., [2, 1, 0, 3]])
    cv2.imwrite(str(src / "grey.png"), rgb[..., 0])
    (src / "notes.txt").write_text("not an image, not picked up from a folder")
    cmd = [sys.executable, "-m", "upscaler_server.upscale", "--checkpoint", str(checkpoint), "--device", "cpu",
           "--threads", "1", str(src), "-o", str(tmp_path / "out")]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alpha.png", "colour.png", "grey.png"]
    colour = cv2.imread(str(tmp_path / "out" / "colour.png"), cv2.IMREAD_UNCHANGED)[..., ::-1]
    np.testing.assert_array_equal(colour, engine.run(rgb))
    alpha = cv2.imread(str(tmp_path / "out" / "alpha.png"), cv2.IMREAD_UNCHANGED)[..., [2, 1, 0, 3]]
    np.testing.assert_array_equal(alpha, engine.run(rgba, "RGBA8"))
    grey = cv2.imread(str(tmp_path / "out" / "grey.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(grey[..., ::-1], engine.run(np.repeat(rgb[..., :1], 3, axis=2)))


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """``jpeg`` with an APP1 Exif segment holding only the orientation tag (0x0112)."""
    tiff = b"MM\x00*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + bytes(4)
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def test_offline_cli_takes_16_bit_rotated_jpegs_and_any_file_name(engine: Engine, checkpoint: pathlib.Path,
                                                                   tmp_path: pathlib.Path) -> None:
    """16-bit PNGs were refused, a phone JPEG came out on its side, and a name that is not UTF-8 crashed OpenCV."""
    src = tmp_path / "in"
    src.mkdir()
    rgb = RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    cv2.imwrite(str(src / "deep.png"), (rgb.astype(np.uint16) * 257)[..., ::-1])  # 16-bit: x * 257 is x in 8 bits
    ok, jpeg = cv2.imencode(".jpg", rgb[..., ::-1])
    (src / "phone.jpg").write_bytes(_with_exif_orientation(jpeg.tobytes(), 6))  # 6: shown turned 90 degrees
    latin1 = os.path.join(os.fsencode(src), b"caf\xe9.png")
    with open(latin1, "wb") as handle:
        handle.write(cv2.imencode(".png", rgb[..., ::-1])[1].tobytes())
    cmd = [sys.executable, "-m", "upscaler_server.upscale", "--checkpoint", str(checkpoint), "--device", "cpu",
           "--threads", "1", str(src), "-o", str(tmp_path / "out")]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok and run.returncode == 0, run.stderr
    deep = cv2.imread(str(tmp_path / "out" / "deep.png"), cv2.IMREAD_UNCHANGED)
    assert deep.dtype == np.uint8
    np.testing.assert_array_equal(deep[..., ::-1], engine.run(rgb))
    upright = cv2.imread(str(tmp_path / "out" / "phone.png"))
    assert upright.shape == (48, 40, 3)  # the 24x20 picture, upright, upscaled
    written = os.path.join(os.fsencode(tmp_path / "out"), b"caf\xe9.png")
    with open(written, "rb") as handle:
        back = cv2.imdecode(np.frombuffer(handle.read(), np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(back[..., ::-1], engine.run(rgb))
    empty = tmp_path / "empty"
    empty.mkdir()
    run = subprocess.run([*cmd[:-3], str(empty), "-o", str(tmp_path / "out2")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2 and f"no image in {empty}" in run.stderr


def test_offline_cli_reports_failures(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), np.zeros((8, 8, 3), np.uint8))
    base = [sys.executable, "-m", "upscaler_server.upscale", "--device", "cpu", "-o", str(tmp_path / "out")]
    run = subprocess.run([*base, "--checkpoint", str(checkpoint), str(tiny)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1 and f"{tiny}: input 8x8 is smaller than the model's minimum" in run.stderr
    run = subprocess.run([*base, "--checkpoint", str(tmp_path / "missing.safetensors"), str(tiny)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3 and "missing.safetensors" in run.stderr


def test_offline_cli_never_overwrites_an_input(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """An output folder holding an input PNG of the same stem is refused before anything is written."""
    source = tmp_path / "in" / "a.png"
    source.parent.mkdir()
    cv2.imwrite(str(source), np.full((20, 24, 3), 9, np.uint8))
    before = source.read_bytes()
    for inputs, refusal in (([source], "is an input: writing it would overwrite the original"),
                            ([source.parent], "is also an input folder: the images written there would be read")):
        run = subprocess.run([sys.executable, "-m", "upscaler_server.upscale", "--device", "cpu", "--checkpoint",
                              str(checkpoint), "-o", str(source.parent), *map(str, inputs)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 2 and refusal in run.stderr, run.stderr
        assert source.read_bytes() == before


def _offline(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The offline CLI in a process of its own (with ``env`` as its whole environment, if given)."""
    return subprocess.run([sys.executable, "-m", "upscaler_server.upscale", "--device", "cpu", *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120)


def test_offline_cli_replaces_an_existing_output_only_when_asked(tmp_path: pathlib.Path) -> None:
    """It replaced any file of the output's name: photo.jpg upscaled into a folder holding photo.png (another
    picture, not an input) destroyed it, with exit 0."""
    cv2.imwrite(str(tmp_path / "photo.jpg"), np.full((20, 24, 3), 50, np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo.png").write_bytes(b"someone's own picture")
    run = _offline("--backend", "nearest", str(tmp_path / "photo.jpg"), "-o", str(out))
    assert run.returncode == 2 and "photo.png exist(s) already: pass --overwrite" in run.stderr, run.stderr
    assert (out / "photo.png").read_bytes() == b"someone's own picture"
    run = _offline("--backend", "nearest", "--overwrite", str(tmp_path / "photo.jpg"), "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert cv2.imread(str(out / "photo.png")).shape == (40, 48, 3)


def test_offline_cli_skip_existing_goes_on_with_the_images_not_yet_written(tmp_path: pathlib.Path) -> None:
    """From the failure-injection review: a batch that was stopped could not be continued: the rerun was refused
    ("exist(s) already") and --overwrite did every image again. --skip-existing leaves out the images whose output
    exists (outputs are written whole, so an existing one is finished) and never touches those outputs."""
    for index in range(3):
        cv2.imwrite(str(tmp_path / f"frame{index}.png"), np.full((8, 10, 3), 40 * index, np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "frame1.png").write_bytes(b"written by the run that was stopped")
    run = _offline("--backend", "nearest", "--skip-existing", *(str(tmp_path / f"frame{i}.png") for i in range(3)),
                   "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert "skipping 1 of 3 image(s) whose output exists already (--skip-existing)" in run.stderr, run.stderr
    assert "2 of 2 image(s) written" in run.stderr, run.stderr
    assert (out / "frame1.png").read_bytes() == b"written by the run that was stopped"
    assert [cv2.imread(str(out / f"frame{i}.png"))[0, 0, 0] for i in (0, 2)] == [0, 80]
    again = _offline("--backend", "nearest", "--skip-existing", str(tmp_path / "frame0.png"), "-o", str(out))
    assert again.returncode == 0 and "skipping 1 of 1" in again.stderr, again.stderr  # nothing left: nothing to do
    both = _offline("--backend", "nearest", "--skip-existing", "--overwrite", str(tmp_path / "frame0.png"), "-o",
                    str(out))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr, both.stderr


def test_offline_cli_output_folder_checks(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """Reproduced in a review: `upscale photos -o photos` wrote b.png beside b.jpg, and every later run failed with a
    clash ("upscale them apart") even with --overwrite; one file named twice was a clash too; `-o a_file.png` was
    "[Errno 17] File exists" after the model had loaded; an unwritable folder failed once per image, each after the
    model had run on it."""
    from upscaler_server import engine as engine_module
    from upscaler_server import upscale

    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "b.jpg"), np.full((20, 24, 3), 50, np.uint8))
    monkeypatch.setattr(engine_module, "load_network", lambda *a: pytest.fail("the model loaded before the check"))
    assert upscale.main(["--model", "rlfn_s", str(photos), "-o", str(photos)]) == 2
    assert "is also an input folder" in caplog.text and sorted(os.listdir(photos)) == ["b.jpg"]
    (tmp_path / "a_file.png").write_bytes(b"x")
    assert upscale.main(["--model", "rlfn_s", str(photos), "-o", str(tmp_path / "a_file.png")]) == 2
    assert "a_file.png exists and is not a folder; -o names the output folder" in caplog.text
    assert upscale.main(["--model", "rlfn_s", str(photos), "-o", str(tmp_path / "frame_x2.png")]) == 2  # a review
    assert "frame_x2.png looks like a file name, but -o names the output folder" in caplog.text
    assert not (tmp_path / "frame_x2.png").exists()  # it became a folder of that name
    assert upscale.main(["--model", "rlfn_s", str(tmp_path / "none" / "*.png"), "-o", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'none' / '*.png'} does not exist" in caplog.text  # a pattern that matched nothing

    cv2.imwrite(str(tmp_path / "a.jpg"), np.full((20, 24, 3), 60, np.uint8))
    twice = [str(photos / "b.jpg"), str(tmp_path / "a.jpg"), str(photos / ".." / "photos" / "b.jpg"), str(photos)]
    assert upscale.collect_inputs(map(pathlib.Path, twice)) == [photos / "b.jpg", tmp_path / "a.jpg"]
    (photos / "latest.jpg").symlink_to(photos / "b.jpg")  # another output name: upscaled as itself too
    assert upscale.collect_inputs([photos]) == [photos / "b.jpg", photos / "latest.jpg"]
    real_mkstemp = tempfile.mkstemp

    def refused(*args: Any, dir: str | None = None, **kwargs: Any) -> Any:
        if dir is not None and pathlib.Path(dir) == tmp_path / "locked":
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "mkstemp", refused)  # chmod does not stop root, who runs CI
    monkeypatch.setattr(upscale, "upscale_file", lambda *a: pytest.fail("an image ran before the check"))
    caplog.clear()
    assert upscale.main(["--backend", "nearest", *twice, "-o", str(tmp_path / "locked")]) == 2
    assert f"cannot write into {tmp_path / 'locked'}: Permission denied" in caplog.text


def test_offline_cli_checks_the_output_folder_before_the_model_and_removes_one_it_left_empty(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """From an operator's review: an -o that could not be created was reported after the model had loaded, as a
    bare errno ("[Errno 2] No such file or directory: '/proc/takdsr_out'"), and a run that wrote no image left the
    output folder it had made, empty."""
    from upscaler_server import engine, upscale

    cv2.imwrite(str(tmp_path / "a.png"), np.full((20, 30, 3), 50, np.uint8))  # 600 pixels
    real_create = engine.create_engine
    with monkeypatch.context() as patch:
        patch.setattr(engine, "create_engine", lambda **kw: pytest.fail("the model loaded before -o was checked"))
        assert upscale.main(["--backend", "nearest", str(tmp_path / "a.png"), "-o", "/proc/takdsr_out"]) == 2
    assert "cannot create the output folder /proc/takdsr_out: No such file or directory" in caplog.text
    out = tmp_path / "new" / "deeper"
    assert upscale.main(["--backend", "nearest", "--device", "cpu", "--max-pixels", "500", str(tmp_path / "a.png"),
                         "-o", str(out)]) == 1  # its one image refused: nothing written
    assert not (tmp_path / "new").exists()
    assert engine.create_engine is real_create
    assert upscale.main(["--backend", "nearest", "--device", "cpu", str(tmp_path / "a.png"), "-o", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["a.png"]


def test_offline_cli_writes_each_output_whole_or_not_at_all(tmp_path: pathlib.Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """write_bytes truncated the target first: a full disk left truncated and empty PNGs that looked finished."""
    from upscaler_server import upscale

    src = tmp_path / "a.png"
    cv2.imwrite(str(src), np.full((20, 24, 3), 50, np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"the earlier output")
    real_write = pathlib.Path.write_bytes

    def full_disk(path: pathlib.Path, data: bytes) -> int:
        real_write(path, data[: len(data) // 2])  # part of it reached the disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)
    with pytest.raises(UpscalerError, match=r"cannot write .*a\.png: No space left on device"):
        upscale.upscale_file(NearestEngine(2), src, out)
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # no partial file left beside it
    assert (out / "a.png").read_bytes() == b"the earlier output"



def test_offline_cli_writes_long_names_and_never_replaces_a_file_made_during_the_run(tmp_path: pathlib.Path) -> None:
    """The temporary name (output name plus 15 characters) passed the 255-byte limit for a 240-character name, which
    was written before; and a file that appeared after the start-up check was replaced without --overwrite."""
    from upscaler_server import upscale

    src = tmp_path / f"{'a' * 240}.png"
    cv2.imwrite(str(src), np.full((20, 24, 3), 50, np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    assert upscale.upscale_file(NearestEngine(2), src, out).name == f"{'a' * 240}.png"
    late = tmp_path / "late.png"
    cv2.imwrite(str(late), np.full((20, 24, 3), 50, np.uint8))
    (out / "late.png").write_bytes(b"made by someone else meanwhile")
    with pytest.raises(UpscalerError, match="appeared during the run: left as it is"):
        upscale.upscale_file(NearestEngine(2), late, out)
    assert (out / "late.png").read_bytes() == b"made by someone else meanwhile"
    assert upscale.upscale_file(NearestEngine(2), late, out, overwrite=True) == out / "late.png"
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{'a' * 240}.png", "late.png"])


def test_offline_cli_refuses_images_over_max_pixels_by_name(tmp_path: pathlib.Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A 420 KB PNG of 12000x12000 ran the model on 144 megapixels, past 6 GB of memory, where the daemon refuses
    more than 3840x2160."""
    from upscaler_server import upscale

    cv2.imwrite(str(tmp_path / "big.png"), np.full((20, 30, 3), 50, np.uint8))  # 600 pixels
    cv2.imwrite(str(tmp_path / "small.png"), np.full((20, 25, 3), 50, np.uint8))  # 500 pixels
    status = upscale.main(["--backend", "nearest", "--device", "cpu", "--max-pixels", "500", str(tmp_path / "big.png"),
                           str(tmp_path / "small.png"), "-o", str(tmp_path / "out")])
    assert status == 1
    assert "big.png: 30x20 is more than --max-pixels 500 pixels; not upscaled" in caplog.text
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["small.png"]
    assert upscale.DEFAULT_MAX_PIXELS == 3840 * 2160


def test_offline_cli_refuses_a_decompression_bomb_from_its_header(tmp_path: pathlib.Path) -> None:
    """OpenCV's own limit (2^30 pixels) let a 30000x30000 header through to a 2.7 GB decode; the package lowers it to
    8K x 8K before cv2 loads, so such a file is refused before any pixel is decoded (a new process: the limit is read
    when OpenCV loads)."""
    (tmp_path / "bomb.png").write_bytes(png_header_only(9000, 9000))  # 81 megapixels declared, a few KB on disk
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    done = _offline("--backend", "nearest", str(tmp_path / "bomb.png"), "-o", str(tmp_path / "out"), env=env)
    assert done.returncode == 1, done.stderr
    assert "bomb.png: its header declares more than 67108864 pixels, more than this tool decodes" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_client_library_leaves_opencvs_decode_limit_alone() -> None:
    """The package set it on import, so an application importing the client could no longer cv2.imread a 9000x9000
    picture of its own; only the offline CLI, which decodes users' files, sets it."""
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    check = ("import os, upscaler_server.client, upscaler_server.engine\n"
             "assert 'OPENCV_IO_MAX_IMAGE_PIXELS' not in os.environ\n"
             "import upscaler_server.upscale\n"
             "assert os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'] == str(1 << 26)\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("given", "warned"), [("abc", True), ("2GB", True), (" 5000", False), ("5000 ", False),
                                               (str(1 << 64), False), ("64MB", False)])
def test_a_decode_limit_opencv_would_abort_on_is_replaced_not_an_abort(tmp_path: pathlib.Path, given: str,
                                                                      warned: bool) -> None:
    """OpenCV aborted the process as it loaded (std::invalid_argument from stoull, exit 134; found in a review): on no
    number, and (from the coverage review) on blanks around one and on one past 2^64 - 1, which are forgiven; its own
    KB and MB suffixes are kept."""
    cv2.imwrite(str(tmp_path / "small.png"), np.full((20, 24, 3), 50, np.uint8))
    done = _offline("--backend", "nearest", str(tmp_path / "small.png"), "-o", str(tmp_path / "out"),
                    env={**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": given})
    assert done.returncode == 0, done.stderr
    warning = f"OPENCV_IO_MAX_IMAGE_PIXELS={given!r} is not a number of pixels (digits, optionally followed by KB"
    assert (warning in done.stderr) is warned, done.stderr
    assert (tmp_path / "out" / "small.png").is_file()


def test_a_lower_decode_limit_lowers_the_default_max_pixels(tmp_path: pathlib.Path) -> None:
    """With OPENCV_IO_MAX_IMAGE_PIXELS below 3840x2160, every plain run was refused for a --max-pixels never given."""
    cv2.imwrite(str(tmp_path / "small.png"), np.full((20, 24, 3), 50, np.uint8))
    done = _offline("--backend", "nearest", str(tmp_path / "small.png"), "-o", str(tmp_path / "out"),
                    env={**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "4000000"})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "small.png").is_file()


def test_offline_cli_leaves_hidden_files_of_a_folder_out(tmp_path: pathlib.Path) -> None:
    """A macOS resource fork (._frame.png) was read as an image and failed the run, where training skips it."""
    from upscaler_server import upscale

    for name in ("frame.png", ".thumbnail.png", "._frame2.png"):
        (tmp_path / name).write_bytes(b"x")
    assert upscale.collect_inputs([tmp_path]) == [tmp_path / "frame.png"]
    assert upscale.collect_inputs([tmp_path / ".thumbnail.png"]) == [tmp_path / ".thumbnail.png"]  # named: read


def test_offline_cli_names_each_unreadable_file_and_still_writes_the_others(tmp_path: pathlib.Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """From the coverage review (no test reached these refusals): junk, an empty file and float pixels are each
    named with the reason, the run goes on with the rest and exits 1."""
    from upscaler_server import upscale

    cv2.imwrite(str(tmp_path / "good.png"), np.full((20, 24, 3), 50, np.uint8))
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    cv2.imwrite(str(tmp_path / "f32.tiff"), np.full((20, 24, 3), 0.5, np.float32))
    caplog.set_level("INFO", logger="upscaler_server.upscale")  # the summary line
    status = upscale.main(["--backend", "nearest", "--device", "cpu", str(tmp_path), "-o", str(tmp_path / "out")])
    assert status == 1
    assert f"{tmp_path / 'junk.png'}: not an image OpenCV can read" in caplog.text
    assert f"{tmp_path / 'empty.png'}: not an image OpenCV can read" in caplog.text
    assert f"{tmp_path / 'f32.tiff'}: float32 pixels; only 8- and 16-bit images are supported" in caplog.text
    assert "1 of 4 image(s) written" in caplog.text
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.png"]


def test_offline_cli_refuses_damaged_files_in_its_own_words_and_says_subfolders_are_not_searched(
        tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """A truncated PNG let libpng's own "libpng error: PNG input buffer is incomplete" through to stderr, a JPEG cut
    short was upscaled with grey rows, and a subfolder was passed over without a word (training scans folders
    whole)."""
    from upscaler_server import upscale

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # no tiny compressed IDAT
    cv2.imwrite(str(tmp_path / "good.png"), noise)
    whole = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    assert cv2.imwrite(str(tmp_path / "photo.jpg"), noise)
    jpeg = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "photo.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    for suffix in (".bmp", ".tif"):  # OpenCV's own [ERROR] and TIFF_Error lines came beside the tool's
        assert cv2.imwrite(str(tmp_path / f"whole{suffix}"), noise)
        data = (tmp_path / f"whole{suffix}").read_bytes()
        (tmp_path / f"whole{suffix}").unlink()
        (tmp_path / f"cut{suffix[1:]}{suffix}").write_bytes(data[: len(data) // 2])
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")  # left out in silence
    (tmp_path / "notes.txt").write_text("frames of level 3")
    (tmp_path / "more").mkdir()
    caplog.set_level("INFO", logger="upscaler_server.upscale")
    status = upscale.main(["--backend", "nearest", "--device", "cpu", str(tmp_path), "-o", str(tmp_path / "out")])
    stderr = capfd.readouterr().err
    assert status == 1 and "libpng" not in stderr and "ERROR" not in stderr and "TIFF" not in stderr, stderr
    assert f"{tmp_path / 'cut.png'}: a damaged PNG (cut short in its IDAT chunk); not read" in caplog.text
    assert f"{tmp_path / 'photo.jpg'}: a truncated JPEG (no end-of-image marker); not read" in caplog.text
    for name in ("cutbmp.bmp", "cuttif.tif"):
        assert f"{tmp_path / name}: not an image OpenCV can read" in caplog.text
    assert f"{tmp_path}: its subfolders are not searched (more); name them as inputs of their own" in caplog.text
    assert f"{tmp_path}: 2 file(s) left out, not named as an image this tool reads (" in caplog.text
    assert "): anim.gif, notes.txt" in caplog.text
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.png"]


def test_offline_cli_refuses_two_inputs_with_one_output_name_before_anything(tmp_path: pathlib.Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """a.png and a.jpg would both become a.png: refused (exit 2) before the model loads or the output folder is made."""
    from upscaler_server import upscale

    for name in ("a.png", "a.jpg"):
        cv2.imwrite(str(tmp_path / name), np.full((20, 24, 3), 50, np.uint8))
    status = upscale.main(["--backend", "nearest", "--device", "cpu", str(tmp_path / "a.png"), str(tmp_path / "a.jpg"),
                           "-o", str(tmp_path / "out")])
    assert status == 2
    assert "would both be written as a.png; rename one" in caplog.text
    assert not (tmp_path / "out").exists()


def test_offline_cli_interrupted_while_torch_loads_exits_cleanly(tmp_path: pathlib.Path) -> None:
    """Ctrl-C in the CLI's first second, while torch was being imported at the module's top, printed a traceback
    from inside torch and died of SIGINT (from the coverage review). The interrupt is delivered here where the
    Ctrl-C would land, by an import hook raising KeyboardInterrupt when torch is imported: deterministic, no timing."""
    cv2.imwrite(str(tmp_path / "a.png"), np.full((20, 24, 3), 50, np.uint8))
    script = ("import sys\n"
              "class Interrupt:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'torch':\n"
              "            raise KeyboardInterrupt\n"
              "sys.meta_path.insert(0, Interrupt())\n"
              "from upscaler_server import upscale\n"
              f"sys.exit(upscale.main(['--device', 'cpu', {str(tmp_path / 'a.png')!r}, '-o', "
              f"{str(tmp_path / 'out')!r}]))\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 130, done.stderr
    assert "interrupted before any image was written" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_offline_cli_stops_on_ctrl_c_with_what_it_wrote(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Ctrl-C printed a 40-line KeyboardInterrupt traceback and no summary."""
    from upscaler_server import upscale

    for name in "abc":
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.full((20, 24, 3), 50, np.uint8))
    real = upscale.upscale_file

    def interrupted_at_b(engine: Engine, src: pathlib.Path, out_dir: pathlib.Path, *options: object) -> pathlib.Path:
        if src.stem == "b":
            raise KeyboardInterrupt
        return real(engine, src, out_dir, *options)

    monkeypatch.setattr(upscale, "upscale_file", interrupted_at_b)
    status = upscale.main(["--backend", "nearest", "--device", "cpu", *(str(tmp_path / f"{n}.png") for n in "abc"),
                           "-o", str(tmp_path / "out")])
    assert status == 130 and "interrupted: 1 of 3 image(s) written" in caplog.text
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "nearest", "--threads", "-1"], "0 <= threads <= 1024"),
    (["--backend", "nearest", "--threads", "50000"], "0 <= threads <= 1024"),  # segfaulted in libgomp
    (["--backend", "nearest", "--scale", "0"], "1 <= --scale <= 16"),
    (["--backend", "nearest", "--max-pixels", "0"], "1 <= --max-pixels <= 67108864"),
    (["--backend", "nearest", "--pad-channels", "1000"], "0 <= pad_channels <= 64"),
    (["--edge-pad", "-1"], "0 <= edge_pad <= 64"),
    (["--backend", "nearest", "--edge-pad", "2"], "--edge-pad (the nearest backend runs no model)"),
    (["--backend", "auto", "--auto-backends", "onnxrutime"], "unknown onnxrutime: use backends"),
    # from a review: exit 3 ("model not loadable") for a bad argument; a checkpoint nearest ignored; fp16 advice on
    # a CPU for tensorrt, whose --precision fp32 was then refused too
    (["--model", "rlfn_s", "--scale", "5"], "--scale 5: cannot build 'rlfn_s'"),
    (["--backend", "nearest", "--checkpoint", "rlfn_s_native_x2"], "the nearest backend runs no model"),
    (["--backend", "tensorrt", "--device", "cpu"], "backend tensorrt is not available: TensorRT needs CUDA"),
])  # fmt: skip
def test_offline_cli_refuses_settings_the_daemon_refuses(tmp_path: pathlib.Path, args: list[str],
                                                         message: str) -> None:
    """Each ended in a traceback (or a segfault), or was taken in silence, where the daemon says what is wrong."""
    cv2.imwrite(str(tmp_path / "a.png"), np.full((20, 24, 3), 50, np.uint8))
    run = _offline(*args, str(tmp_path / "a.png"), "-o", str(tmp_path / "out"))
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


def test_offline_cli_refuses_an_empty_output_name(tmp_path: pathlib.Path) -> None:
    """From a walkthrough: `-o ""` (an unset $OUTDIR) wrote the images into the current folder."""
    cv2.imwrite(str(tmp_path / "a.png"), np.full((20, 24, 3), 50, np.uint8))
    run = subprocess.run([sys.executable, "-m", "upscaler_server.upscale", "--backend", "nearest", "a.png", "-o", ""],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert run.returncode == 2 and "argument -o/--output: an empty name" in run.stderr, run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_a_scale_other_than_the_checkpoints_is_refused_by_every_command(checkpoint: pathlib.Path,
                                                                        tmp_path: pathlib.Path) -> None:
    """--scale 3 with an x2 checkpoint upscaled x2 without a word (the offline CLI, the export) or served x2."""
    cv2.imwrite(str(tmp_path / "a.png"), np.full((20, 24, 3), 50, np.uint8))
    said = f"--scale 3: {checkpoint} upscales x2 (--scale is for --model; a checkpoint knows its own)"
    run = _offline("--checkpoint", str(checkpoint), "--threads", "1", "--scale", "3", str(tmp_path / "a.png"),
                   "-o", str(tmp_path / "out"))
    assert run.returncode == 2 and said in run.stderr and not (tmp_path / "out").exists(), run.stderr
    run = _offline("--checkpoint", str(checkpoint), "--threads", "1", "--scale", "2", str(tmp_path / "a.png"),
                   "-o", str(tmp_path / "out"))  # its own scale, said again: fine
    assert run.returncode == 0 and cv2.imread(str(tmp_path / "out" / "a.png")).shape == (40, 48, 3), run.stderr
    export = subprocess.run([sys.executable, "-m", "upscaler_server.export", "--checkpoint", str(checkpoint),
                             "--scale", "3", "-o", str(tmp_path / "m.onnx")], cwd=REPO, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert export.returncode == 2 and said in export.stderr and not (tmp_path / "m.onnx").exists(), export.stderr
    with pytest.raises(ConfigError, match=r"--scale 3: .* upscales x2"):
        create_engine(checkpoint=checkpoint, scale=3, device="cpu")
    assert create_engine(model="rlfn_s", scale=3, device="cpu", threads=1).scale == 3


def test_offline_cli_refuses_tune_sizes_below_the_models_minimum(checkpoint: pathlib.Path,
                                                                 tmp_path: pathlib.Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.full((20, 24, 3), 50, np.uint8))
    run = _offline("--checkpoint", str(checkpoint), "--threads", "1", "--backend", "auto", "--tune-sizes", "8x8",
                   "--cache-dir", str(tmp_path / "cache"), str(tmp_path / "a.png"), "-o", str(tmp_path / "out"))
    assert run.returncode == 2 and "smaller than the model's minimum" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    # and above the largest input it takes (99999x99999 was a MemoryError traceback while auto measured it)
    run = _offline("--checkpoint", str(checkpoint), "--backend", "auto", "--tune-sizes", "99999x99999", "--max-pixels",
                   "100000", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"))  # fmt: skip
    assert run.returncode == 2 and "--tune-sizes 99999x99999 within --max-pixels 100000" in run.stderr, run.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_cuda_engine_close_to_cpu(engine: Engine, checkpoint: pathlib.Path, graphs: bool) -> None:
    gpu = create_engine(checkpoint=checkpoint, device="cuda", precision="fp16", cuda_graphs=graphs)
    rgba = RNG.integers(0, 256, (64, 96, 4), dtype=np.uint8)
    for fmt in ("RGBA8", "BGRA8"):
        frame = rgba if fmt == "RGBA8" else np.ascontiguousarray(rgba[..., [2, 1, 0, 3]])
        first, second = gpu.run(frame, fmt), gpu.run(frame, fmt)  # second run: cached plan (graph replay)
        np.testing.assert_array_equal(first, second)
        diff = np.abs(first.astype(int) - engine.run(frame, fmt).astype(int))
        assert diff.max() <= 4, f"fp16 CUDA differs from fp32 CPU by {diff.max()} levels"
        np.testing.assert_array_equal(first[..., 3], np.repeat(np.repeat(rgba[..., 3], 2, 0), 2, 1))
    gpu.close()


def _pipelined(engine: Engine, frames: list[np.ndarray], copied: bool = False) -> list[np.ndarray]:
    """Upscale ``frames`` the way the daemon's worker does: the next frame starts before the previous is waited for;
    ``copied``: as the daemon's slots, reached through copies only (Engine.start_copied)."""
    outs, waiting = [], collections.deque()
    for frame in frames:
        out_shape = engine.output_shape(frame.shape[0], frame.shape[1], RGB)
        if copied:
            slot = ArrayFrame(frame, out_shape)
            outs.append(slot.out)
            waiting.append(engine.start_copied(slot, RGB))
        else:
            outs.append(np.empty(out_shape, np.uint8))
            waiting.append(engine.start(frame, RGB, outs[-1]))
        if len(waiting) >= engine.max_in_flight:
            waiting.popleft()()
    while waiting:
        waiting.popleft()()
    return outs


@pytest.mark.parametrize("copied", [False, True], ids=["arrays", "copied"])
def test_start_on_cpu_finishes_the_frame_at_once(checkpoint: pathlib.Path, copied: bool) -> None:
    # the engine itself (create_engine refuses --overlap with --device cpu; --device auto on a CPU gets here)
    network, name, weights = load_network(checkpoint, None)
    cpu = TorchEngine(network, name=name, device="cpu", precision="fp32", weights=weights, threads=1, overlap=True)
    assert cpu.max_in_flight == 1  # overlap is a CUDA feature: the CPU has no copies to hide
    sizes = [(24, 32), (24, 32), (16, 40), (24, 32)]  # two resolutions: staging arrays per resolution
    frames = [RNG.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    for out, frame in zip(_pipelined(cpu, frames, copied), frames, strict=True):
        np.testing.assert_array_equal(out, cpu.run(frame))


def test_staging_arrays_are_kept_per_size_until_released(checkpoint: pathlib.Path) -> None:
    """A copied frame's staging arrays are reused for its size, dropped by release() (the daemon: when the last
    session of that size ends) and by close(); frames after a release are still right."""
    cpu = create_engine(checkpoint=checkpoint, device="cpu", precision="fp32", threads=1)
    frames = {size: RNG.integers(0, 256, (*size, 3), dtype=np.uint8) for size in [(24, 32), (16, 40)]}

    def copied(frame: np.ndarray) -> np.ndarray:
        slot = ArrayFrame(frame, cpu.output_shape(frame.shape[0], frame.shape[1], RGB))
        cpu.start_copied(slot, RGB)()
        return slot.out

    for frame in frames.values():
        copied(frame)
    assert len(cpu._staging) == 2  # type: ignore[arg-type]
    cpu.release(24, 32, PIXEL_FORMATS["BGR8"])  # another format of that size: nothing of it is kept
    assert len(cpu._staging) == 2  # type: ignore[arg-type]
    cpu.release(24, 32, RGB)
    assert len(cpu._staging) == 1  # type: ignore[arg-type]
    np.testing.assert_array_equal(copied(frames[24, 32]), cpu.run(frames[24, 32]))
    cpu.close()
    assert len(cpu._staging) == 0  # type: ignore[arg-type]


def test_releasing_a_size_returns_freed_heap_memory_at_most_every_ten_seconds(
    checkpoint: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each new size left torch's scratch memory freed but held by glibc's heap; release() now hands it back
    (malloc_trim), rate-limited since a trim takes milliseconds on the transport thread."""
    from upscaler_server import host

    trims: list[int] = []

    class FakeLibc:
        def malloc_trim(self, pad: int) -> int:
            trims.append(pad)
            return 1

    monkeypatch.setattr(host.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(host, "_last_trim", -host._TRIM_EVERY_S)
    clock = [1000.0]
    monkeypatch.setattr(host.time, "monotonic", lambda: clock[0])
    cpu = create_engine(checkpoint=checkpoint, device="cpu", precision="fp32", threads=1)
    cpu.release(24, 32, RGB)
    cpu.release(16, 40, RGB)  # within 10 s of the first: no second trim
    assert trims == [0]
    clock[0] += host._TRIM_EVERY_S
    cpu.release(16, 40, RGB)
    assert trims == [0, 0]
    monkeypatch.undo()
    host.return_freed_memory()  # the real one: glibc's malloc_trim, or nothing where there is none


_KERNEL_CACHE_CHILD = """
import os, sys
import numpy as np
from upscaler_server import host
from upscaler_server.engine import create_engine
from upscaler_server.protocol import PIXEL_FORMATS

host._ONEDNN_KERNELS = 16  # the engine's caps, lowered so that a few sizes overflow them
engine = create_engine(checkpoint=sys.argv[1], device="cpu", precision="fp32", threads=1)
rgb = PIXEL_FORMATS["RGB8"]

def upscale(side):
    engine.upscale(np.zeros((side, side, 3), np.uint8), rgb, np.empty(engine.output_shape(side, side, rgb), np.uint8))

for side in range(40, 80):  # 40 sizes, 1-2 oneDNN kernels each (torch runs smaller ones without oneDNN)
    upscale(side)
print("CAPACITY", os.environ["LRU_CACHE_CAPACITY"], os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], "AGAIN", flush=True)
upscale(40)
"""


@pytest.mark.parametrize("user_capacity", [None, "1024"], ids=["engine-cap", "user-setting"])
def test_a_cpu_engine_caps_the_kernel_caches_unless_the_user_set_them(
    checkpoint: pathlib.Path, user_capacity: str | None
) -> None:
    """torch and oneDNN each keep CPU convolution kernels for 1,024 shapes by default: ~90 MB in a daemon seeing ever
    new frame sizes. The engine caps both (the first size's kernels are built again after 40 other sizes: oneDNN
    prints a cache miss); a user's own settings win."""
    variables = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    env = {key: value for key, value in os.environ.items() if key not in variables}
    env.update({"ONEDNN_VERBOSE": "2"} | ({name: user_capacity for name in variables} if user_capacity else {}))
    run = subprocess.run([sys.executable, "-c", _KERNEL_CACHE_CHILD, str(checkpoint)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    before, marker, after = run.stdout.partition(" AGAIN\n")
    assert marker, run.stdout[-2000:]
    assert before.rsplit("CAPACITY ", 1)[1] == f"{user_capacity or 16} {user_capacity or 16}"
    assert before.count("create:cache_miss") > 16  # the sizes built more kernels than the cap holds
    rebuilt = after.count("create:cache_miss")
    assert (rebuilt > 0) == (user_capacity is None), after[-2000:]


def test_a_copied_frame_is_checked_and_its_read_error_passes_through(engine: Engine) -> None:
    """What the frame's copies raise (the daemon's: SharedMemoryError for a shrunk segment) reaches the caller, and
    no result is written for a frame that could not be read."""
    side = engine.min_input_size
    assert side > 1  # the test model's receptive field needs a minimum size
    small = ArrayFrame(np.zeros((side - 1, side, 3), np.uint8), (2 * side - 2, 2 * side, 3))
    with pytest.raises(EngineError, match=f"smaller than the model's minimum {side}x{side}"):
        engine.start_copied(small, RGB)
    assert small.reads == 0

    class Gone(ArrayFrame):
        def read_into(self, lr: np.ndarray) -> None:
            raise SharedMemoryError("shared memory /x was truncated to 0 bytes")

    gone = Gone(np.zeros((side, side, 3), np.uint8), (2 * side, 2 * side, 3))
    with pytest.raises(SharedMemoryError, match="truncated"):
        engine.start_copied(gone, RGB)
    assert gone.writes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_cuda_overlap_gives_the_frames_of_one_at_a_time(checkpoint: pathlib.Path, graphs: bool) -> None:
    gpu = create_engine(checkpoint=checkpoint, device="cuda", precision="fp16", cuda_graphs=graphs, overlap=True)
    assert gpu.max_in_flight == 2
    sizes = [(64, 96), (64, 96), (48, 80), (64, 96), (64, 96), (48, 80), (48, 80)]  # two plans, interleaved
    frames = [RNG.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    one_at_a_time = [gpu.run(frame) for frame in frames]
    for copied in (False, True):  # arrays, then frames read into and written from the pinned buffers directly
        for pipelined, expected in zip(_pipelined(gpu, frames, copied), one_at_a_time, strict=True):
            np.testing.assert_array_equal(pipelined, expected)
    gpu.close()


def test_plan_cache_keeps_the_most_recent_sizes() -> None:
    from upscaler_server.engine import PlanCache

    built: list[tuple[int, int, str]] = []
    cache: PlanCache[str] = PlanCache(capacity=2)

    def get(key: tuple[int, int, str]) -> str:
        return cache.get(key, lambda: built.append(key) or f"plan{key}")

    a, b, c = (1, 1, "RGB8"), (2, 2, "RGB8"), (3, 3, "RGB8")
    assert get(a) == get(a) == "plan(1, 1, 'RGB8')" and built == [a]
    get(b)
    get(a)  # a is now the most recent: c evicts b
    get(c)
    get(a)
    get(b)
    assert built == [a, b, c, b]


def test_device_names_resolve_or_fail_clearly() -> None:
    assert resolve_device("cpu") == "cpu"
    for bad in ("gpu", "cuda:x", "cuda:-1", "mps"):
        with pytest.raises(ConfigError, match="unknown device"):
            resolve_device(bad)
    if torch.cuda.is_available():  # an already resolved name stays on the GPU (it once fell back to the CPU)
        assert resolve_device("cuda:0") == resolve_device("cuda") == resolve_device("auto") == "cuda:0"
    else:
        assert resolve_device("auto") == "cpu"
        for name in ("cuda", "cuda:0"):
            with pytest.raises(ConfigError, match="no CUDA device"):
                resolve_device(name)


def test_a_checkpoint_whose_finite_weights_overflow_is_refused_at_load(tmp_path: pathlib.Path) -> None:
    """Weights of 1e20 are finite (the file passes the NaN/inf check) but two such layers give 1e40, past float32:
    the output is NaN/inf and would be served as black frames; the load refuses it instead."""
    import models

    network = models.build_model("rlfn_s", scale=2, channels=16)
    with torch.no_grad():
        for parameter in network.parameters():
            if parameter.dim() == 4:
                parameter.mul_(1e20)
    path = models.save_checkpoint(network, tmp_path / "overflow.safetensors", role="student")
    with pytest.raises(ModelLoadError, match=r"overflow\.safetensors: its weights are finite but overflow float32"):
        create_engine(checkpoint=path, device="cpu")
    fine = create_engine(checkpoint=make_checkpoint(tmp_path / "fine.safetensors"), device="cpu", threads=1)
    assert fine.weights.endswith("fine.safetensors")

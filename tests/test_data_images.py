"""Image reading and folder scanning: formats, conversions, skipped files, empty folders."""

import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from training.data.images import (
    MANIFEST_NAME,
    DatasetError,
    ImageReadError,
    SkippedFilesWarning,
    read_image,
    scan_images,
    to_uint8,
    write_json_atomic,
    write_png,
)
from training.data.scenes_cmd import write_scene_frames


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write_bgr(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Good images of every kind, nested, mixed with junk that must be skipped."""
    rgb = _rgb(40, 48)
    _write_bgr(tmp_path / "a_rgb.png", rgb[:, :, ::-1])
    _write_bgr(tmp_path / "nested" / "deeper" / "b_grey.png", rgb[:, :, 0])
    bgra = np.dstack([rgb[:, :, ::-1], np.full((40, 48), 7, np.uint8)])
    _write_bgr(tmp_path / "nested" / "c_rgba.png", bgra)
    _write_bgr(tmp_path / "d_16bit.png", (rgb.astype(np.uint16) * 257)[:, :, ::-1])
    for suffix in (".jpg", ".webp", ".bmp", ".tiff"):
        _write_bgr(tmp_path / "formats" / f"e{suffix}", rgb[:, :, ::-1])
    _write_bgr(tmp_path / "f_tiny.png", _rgb(8, 48))
    good = (tmp_path / "a_rgb.png").read_bytes()
    (tmp_path / "g_truncated.png").write_bytes(good[: len(good) // 2])
    jpeg = (tmp_path / "formats" / "e.jpg").read_bytes()
    (tmp_path / "i_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # OpenCV would decode it to grey rows
    assert cv2.imwrite(str(tmp_path / "j_int16.tiff"), rgb.astype(np.int16))  # a pixel type we do not map to [0, 1]
    (tmp_path / "h_text.png").write_text("not an image")
    (tmp_path / "notes.txt").write_text("junk")
    (tmp_path / "nested" / "README.md").write_text("junk")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "ignored.txt").write_text("hidden files are not part of a dataset")
    return tmp_path


def test_read_rgb_png_is_rgb_in_unit_range(tmp_path: Path) -> None:
    rgb = _rgb(5, 7)
    _write_bgr(tmp_path / "x.png", rgb[:, :, ::-1])
    image = read_image(tmp_path / "x.png")
    assert image.shape == (3, 5, 7) and image.dtype == torch.float32
    assert torch.equal(image, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)


def test_grey_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = _rgb(6, 9)[:, :, 1]
    _write_bgr(tmp_path / "g.png", grey)
    image = read_image(tmp_path / "g.png")
    assert image.shape == (3, 6, 9)
    for channel in image:
        assert torch.equal(channel, torch.from_numpy(grey).float() / 255)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    rgb = _rgb(6, 9)
    _write_bgr(tmp_path / "a.png", np.dstack([rgb[:, :, ::-1], np.zeros((6, 9), np.uint8)]))  # alpha 0 everywhere
    assert torch.equal(read_image(tmp_path / "a.png"), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)


def test_16bit_scales_to_unit_range(tmp_path: Path) -> None:
    rgb16 = np.array([[[0, 65535, 32768]]], np.uint16)  # one RGB pixel
    _write_bgr(tmp_path / "h.png", rgb16[:, :, ::-1])
    image = read_image(tmp_path / "h.png")
    assert torch.allclose(image[:, 0, 0], torch.tensor([0.0, 1.0, 32768 / 65535]))


@pytest.mark.parametrize("suffix", [".jpg", ".webp", ".bmp", ".tiff"])
def test_other_formats(tmp_path: Path, suffix: str) -> None:
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :, 0] = 200  # pure red survives lossy codecs approximately
    _write_bgr(tmp_path / f"x{suffix}", rgb[:, :, ::-1])
    image = read_image(tmp_path / f"x{suffix}")
    assert image.shape == (3, 16, 16)
    assert abs(image[0].mean().item() - 200 / 255) < 0.02 and image[2].mean().item() < 0.02


def test_unreadable_raises_clear_error(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_text("nope")
    with pytest.raises(ImageReadError, match=r"x\.png"):
        read_image(tmp_path / "x.png")
    assert cv2.imwrite(str(tmp_path / "depth.tiff"), np.zeros((8, 8), np.int16))
    with pytest.raises(ImageReadError, match=r"depth\.tiff has pixels of type int16"):
        read_image(tmp_path / "depth.tiff")


def test_a_truncated_jpeg_is_refused_and_a_complete_one_read(tmp_path: Path) -> None:
    _write_bgr(tmp_path / "whole.jpg", _rgb(64, 64))
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "padded.jpg").write_bytes(data + b"\x00" * 16)  # zero padding after the end marker is fine
    assert read_image(tmp_path / "padded.jpg").shape == (3, 64, 64)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.jpg: a truncated JPEG"):
        read_image(tmp_path / "cut.jpg")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # known by its bytes, whatever its name
    with pytest.raises(ImageReadError, match=r"cut\.png: a truncated JPEG"):
        read_image(tmp_path / "cut.png")


def _grey_png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A 1-bit grey PNG of zeros: a few KB that decode to width * height bytes (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    pixels = (b"\x00" * (1 + (width + 7) // 8)) * height if rows is None else rows  # filter byte + packed row
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels, 9)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_bombs_non_finite_floats_and_odd_names_are_skipped_with_their_reason(tmp_path: Path) -> None:
    """Each of these once crashed a scan or poisoned training: a name that is not UTF-8 (OpenCV's imread
    segfaulted), a header OpenCV refuses as too large (cv2.error traceback), a 72-megapixel PNG of 9 KB (GBs per
    worker), a NaN float TIFF (the loss turned NaN at the step that cropped it)."""
    _write_bgr(tmp_path / "good.png", _rgb(40, 48))
    latin1 = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")  # an old Latin-1 name
    with open(latin1, "wb") as handle:
        handle.write((tmp_path / "good.png").read_bytes())
    (tmp_path / "bomb.png").write_bytes(_grey_png(9000, 8000))
    (tmp_path / "huge_header.png").write_bytes(_grey_png(60000, 60000, rows=b"\x00"))
    nan = np.full((40, 48, 3), 0.5, np.float32)
    nan[3, 4, 1] = np.nan
    assert cv2.imwrite(str(tmp_path / "nan.tiff"), nan)
    with pytest.raises(ImageReadError, match="larger than 67 megapixels"):
        read_image(tmp_path / "bomb.png")
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        read_image(tmp_path / "nan.tiff")
    assert read_image(os.fsdecode(latin1)).shape == (3, 40, 48)
    with pytest.warns(SkippedFilesWarning) as record:
        found = scan_images(tmp_path, min_size=32, progress=False)
    assert sorted(info.path.name for info in found) == sorted(["good.png", os.fsdecode(b"caf\xe9.png")])
    message = str(record[0].message)
    assert "2 larger than 67 megapixels (bomb.png, huge_header.png)" in message
    assert "1 with NaN or infinite pixels (nan.tiff)" in message


def _listable(folder: Path) -> bool:
    try:
        os.listdir(folder)
    except PermissionError:
        return False
    return True


def test_damaged_pngs_are_skipped_without_decoder_lines_on_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """libpng's `libpng error: IHDR: CRC error` (`IDAT: CRC error`, `PNG input buffer is incomplete`) and OpenCV's
    `[ERROR] ... IHDR chunk shall be first` came beside the SkippedFilesWarning on every scan of such a folder (about
    10 times a pipeline run). A bad CRC in an ancillary chunk leaves the pixels usable: that file is kept."""
    png = _grey_png(40, 40)
    idat_crc_at = len(png) - 12 - 4  # the IDAT chunk's CRC: just before the 12-byte IEND chunk
    _write_bgr(tmp_path / "good.png", _rgb(40, 48))
    (tmp_path / "crc.png").write_bytes(png[:29] + bytes(4) + png[33:])  # the IHDR chunk's CRC zeroed
    (tmp_path / "idat_crc.png").write_bytes(png[:idat_crc_at] + bytes(4) + png[idat_crc_at + 4 :])
    (tmp_path / "no_iend.png").write_bytes(png[:-12])  # the pixels whole, the end chunk cut off
    (tmp_path / "zero_width.png").write_bytes(_grey_png(0, 40))
    (tmp_path / "cut_header.png").write_bytes(png[:20])
    (tmp_path / "cut_pixels.png").write_bytes(png[:40])  # a whole header, then the pixels cut short
    bad_text = struct.pack(">I", 5) + b"tEXtA\x00bcd" + bytes(4)  # an ancillary chunk with a zeroed CRC
    (tmp_path / "text_crc.png").write_bytes(png[:33] + bad_text + png[33:])
    with pytest.raises(ImageReadError, match=r"crc\.png: a damaged PNG \(its IHDR header fails its CRC\)"):
        read_image(tmp_path / "crc.png")
    with pytest.raises(ImageReadError, match=r"idat_crc\.png: a damaged PNG \(its IDAT chunk fails its CRC\)"):
        read_image(tmp_path / "idat_crc.png")
    with pytest.raises(ImageReadError, match=r"no_iend\.png: a damaged PNG \(cut short: no IEND chunk\)"):
        read_image(tmp_path / "no_iend.png")
    assert read_image(tmp_path / "text_crc.png").shape == (3, 40, 40)
    (tmp_path / "iend_crc.png").write_bytes(png[:-4] + bytes(4))  # the empty IEND's CRC: the pixels are whole
    assert read_image(tmp_path / "iend_crc.png").shape == (3, 40, 40)
    capfd.readouterr()  # libpng's warnings for the ancillary chunk and the IEND (read, not refused)
    (tmp_path / "text_crc.png").unlink()
    (tmp_path / "iend_crc.png").unlink()
    with pytest.warns(SkippedFilesWarning, match="6 unreadable"):
        found = scan_images(tmp_path, progress=False)
    assert [info.path.name for info in found] == ["good.png"]
    assert capfd.readouterr().err == ""


def test_linked_folders_are_followed_once_and_what_cannot_be_reached_is_named(tmp_path: Path) -> None:
    """A dataset assembled from links is read whole (rglob passed over linked folders without a word); a link loop
    ends; broken links, folders that cannot be listed and pipes (which would block a read) are counted."""
    real = tmp_path / "real_set"
    _write_bgr(real / "a.png", _rgb(40, 48))
    data = tmp_path / "data"
    _write_bgr(data / "own.png", _rgb(40, 48, seed=1))
    (data / "set1").symlink_to(real, target_is_directory=True)
    (data / "set1_again").symlink_to(real, target_is_directory=True)  # the same real folder: read once
    (data / "loop").symlink_to(data, target_is_directory=True)
    (data / "gone.png").symlink_to(tmp_path / "missing.png")
    os.mkfifo(data / "pipe.png")
    locked = data / "locked"
    _write_bgr(locked / "hidden_from_us.png", _rgb(40, 48))
    locked.chmod(0)
    try:
        listable = _listable(locked)  # root lists a folder of mode 0 all the same
        with pytest.warns(SkippedFilesWarning) as record:
            found = scan_images(data, min_size=32, progress=False)
    finally:
        locked.chmod(0o755)
    names = [str(info.path.relative_to(data)) for info in found]
    message = str(record[0].message)
    if listable:
        assert names == ["locked/hidden_from_us.png", "own.png", "set1/a.png"]
        assert "2 unreachable (broken links, unreadable folders, pipes) (gone.png, pipe.png)" in message
    else:
        assert names == ["own.png", "set1/a.png"]
        assert "3 unreachable (broken links, unreadable folders, pipes) (gone.png, locked, pipe.png)" in message


def test_a_file_reached_under_two_names_is_read_once(tmp_path: Path) -> None:
    """A link to a file of a linked folder, or a hard link, reached the same image twice: it was trained on and
    scored twice (two rows of the mean). The first name in sorted order is kept; the others are named."""
    real = tmp_path / "real_set"
    _write_bgr(real / "a.png", _rgb(40, 48))
    data = tmp_path / "data"
    _write_bgr(data / "own.png", _rgb(40, 48, seed=1))
    (data / "set1").symlink_to(real, target_is_directory=True)
    (data / "z_link.png").symlink_to(real / "a.png")
    os.link(data / "own.png", data / "own_hard.png")
    with pytest.warns(SkippedFilesWarning) as record:
        found = scan_images(data, min_size=32, progress=False)
    assert [str(info.path.relative_to(data)) for info in found] == ["own.png", "set1/a.png"]
    message = str(record[0].message)
    assert "2 reached again under another name (links to one file) (own_hard.png, z_link.png)" in message


def test_a_linked_folder_is_read_under_its_first_name_in_sorted_order(tmp_path: Path) -> None:
    """data.md's rule, which the walk did not keep (a researcher's walkthrough): it read a folder under the name the
    directory listing gave first, and the files of its second name were not counted in the warning."""
    data = tmp_path / "data"
    _write_bgr(data / "nested" / "deeper" / "a.png", _rgb(40, 48))
    (data / "aaa_link").symlink_to(data / "nested" / "deeper", target_is_directory=True)
    with pytest.warns(SkippedFilesWarning) as record:
        found = scan_images(data, min_size=32, progress=False)
    assert [str(info.path.relative_to(data)) for info in found] == ["aaa_link/a.png"]
    assert "1 reached again under another name (links to one file) (nested/deeper/a.png)" in str(record[0].message)


def test_a_scenes_output_inside_an_image_folder_gives_its_hr_frames_only(tmp_path: Path) -> None:
    """A folder source at data/, holding povray/ and a scenes output scenes-x2/, trained on scenes-x2/lr_x2/*.png as
    HR images (a researcher's walkthrough; only the folder itself was refused). Its manifest names the LR frames: they
    are left out and counted, and the manifest is no stray file."""
    data = tmp_path / "data"
    _write_bgr(data / "povray" / "own.png", _rgb(40, 48))
    (data / "povray" / MANIFEST_NAME).write_text(json.dumps({"scenes": {}, "failed": {}}))
    write_scene_frames(data / "scenes-x2", 2, width=64, height=32, supersample=1, split="val", progress=False)
    with pytest.warns(SkippedFilesWarning) as record:
        found = scan_images(data, progress=False)
    names = [str(info.path.relative_to(data)) for info in found]
    assert names[0] == "povray/own.png" and len(names) == 3, names
    assert all(name.startswith("scenes-x2/hr/") for name in names[1:]), names
    message = str(record[0].message)
    assert "2 LR frames of a training.data scenes output (its manifest.json names them) (scenes-x2/lr_x2/" in message
    assert "not images" not in message, message


def test_a_scenes_cache_is_left_out_of_an_image_folder_and_refused_as_one(tmp_path: Path) -> None:
    """A scenes source's cache_dir holds HR (ss2) and native LR (ss1) renders side by side: inside an image folder
    both were trained on as HR images. The source marks the folder; a scan leaves it out, or refuses it as the root."""
    from training.data.sources import SceneSource

    data, cache = tmp_path / "data", tmp_path / "data" / "scenes-cache"
    _write_bgr(data / "own.png", _rgb(40, 48))
    _write_bgr(cache / "city" / "city_t0001.0000_64x32_ss2.png", _rgb(32, 64))
    _write_bgr(cache / "city" / "city_t0001.0000_32x16_ss1.png", _rgb(16, 32))
    assert len(scan_images(data, progress=False)) == 3  # before the mark, the cache was read as images
    SceneSource(["city"], "train", width=64, height=32, scale=2, lr_kind="native", cache_dir=cache)  # marks it
    with pytest.warns(SkippedFilesWarning) as record:
        found = scan_images(data, progress=False)
    assert [info.path.name for info in found] == ["own.png"]
    assert "1 scenes caches (a cache_dir: HR and LR renders), folder(s) (scenes-cache)" in str(record[0].message)
    with pytest.raises(DatasetError, match=f"{cache} is the cache_dir of a scenes source"):
        scan_images(cache, progress=False)


def test_a_bomb_is_refused_from_its_header_in_a_process_that_imports_training(tmp_path: Path) -> None:
    """training/__init__ sets OPENCV_IO_MAX_IMAGE_PIXELS before OpenCV loads, so a bomb is not decoded (GBs) first;
    the limit equals MAX_PIXELS."""
    (tmp_path / "bomb.png").write_bytes(_grey_png(9000, 8000))
    script = ("from training.data.images import MAX_PIXELS, ImageReadError, read_image\n"
              "import os; assert os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'] == str(MAX_PIXELS)\n"
              f"try: read_image({str(tmp_path / 'bomb.png')!r})\n"
              "except ImageReadError as exc: print(exc.reason, '|', exc)\n")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("larger than 67 megapixels | ") and "its header declares" in run.stdout, run.stdout


@pytest.mark.parametrize(("given", "written"), [(" 5000", "5000"), ("9" * 4301, str((1 << 63) - 1))],
                         ids=["blank", "4301-digits"])
def test_a_decode_limit_opencv_would_abort_on_does_not_abort_training(given: str, written: str) -> None:
    """`OPENCV_IO_MAX_IMAGE_PIXELS=" 5000"` aborted any process importing training once cv2 loaded (exit 134, from the
    coverage review): training now takes the offline CLI's guard, which writes the number back without blanks, and
    clamps a huge one (past 4,300 digits int() itself refused it: from the diff review)."""
    script = "import training, cv2, os; print(os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'])"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": given})
    assert run.returncode == 0 and run.stdout == f"{written}\n", run.stderr


def test_write_png_round_trip(tmp_path: Path) -> None:
    image = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(0))
    target = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"w\xe9.png"))  # not UTF-8: imwrite segfaulted
    write_png(target, image)
    back = read_image(target)
    assert torch.equal(back, torch.from_numpy(to_uint8(image)).permute(2, 0, 1).float() / 255)
    assert (back - image).abs().max() <= 0.5 / 255 + 1e-6


def test_write_json_atomic_leaves_the_users_files_and_writes_through_links(tmp_path: Path) -> None:
    """The temporary file was NAME.tmp: it replaced a user's file of that name, and the rename replaced a link
    (`evaluate --json link.json` made link.json a plain file) instead of writing through it."""
    (tmp_path / "scores.tmp").write_text("mine")
    (tmp_path / "runs").mkdir()
    (tmp_path / "scores.json").symlink_to(tmp_path / "runs" / "scores.json")
    write_json_atomic(tmp_path / "scores.json", {"a": 1})
    assert (tmp_path / "scores.tmp").read_text() == "mine"
    assert (tmp_path / "scores.json").is_symlink() and json.loads((tmp_path / "runs" / "scores.json").read_text())
    os.chmod(tmp_path / "runs" / "scores.json", 0o640)  # a rewrite keeps the file's permissions
    write_json_atomic(tmp_path / "scores.json", {"a": 2})
    assert (tmp_path / "runs" / "scores.json").stat().st_mode & 0o777 == 0o640
    long_name = tmp_path / ("s" * 250 + ".json")  # 255 bytes: a temporary name must not be longer
    write_json_atomic(long_name, [1])
    assert json.loads(long_name.read_text()) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["runs", "scores.json", "scores.tmp", long_name.name])


def test_write_json_atomic_removes_its_temporary_file_on_error(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()  # the rename onto a folder fails
    with pytest.raises(OSError):
        write_json_atomic(tmp_path / "taken", {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "x.json", {"a": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and not any((tmp_path / "taken").iterdir())


def test_scan_keeps_good_images_and_warns_once(messy_folder: Path) -> None:
    with pytest.warns(SkippedFilesWarning) as record:
        found = scan_images(messy_folder, min_size=32, progress=False)
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 7 file(s)" in message
    assert "2 not images" in message and "4 unreadable" in message and "1 smaller than 32px" in message
    assert "g_truncated.png" in message and "f_tiny.png" in message
    assert "i_truncated.jpg" in message and "j_int16.tiff" in message
    names = sorted(str(info.path.relative_to(messy_folder)) for info in found)
    assert names == sorted(
        ["a_rgb.png", "nested/deeper/b_grey.png", "nested/c_rgba.png", "d_16bit.png"]
        + [f"formats/e{s}" for s in (".jpg", ".webp", ".bmp", ".tiff")]
    )
    assert all((info.height, info.width) == (40, 48) for info in found)


def test_scan_without_junk_does_not_warn(tmp_path: Path) -> None:
    _write_bgr(tmp_path / "x.png", _rgb(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(scan_images(tmp_path, progress=False)) == 1


def test_scan_passes_over_the_data_commands_manifest_but_not_a_nested_one(tmp_path: Path) -> None:
    _write_bgr(tmp_path / "x.png", _rgb(4, 4))
    (tmp_path / MANIFEST_NAME).write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [info.path.name for info in scan_images(tmp_path, progress=False)] == ["x.png"]
    # Only the folder's own record is known; a manifest.json further down is an ordinary stray file.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / MANIFEST_NAME).write_text("{}")
    with pytest.warns(SkippedFilesWarning, match=r"1 not images"):
        scan_images(tmp_path, progress=False)


def test_a_folders_own_documentation_is_passed_over_but_other_text_is_junk(tmp_path: Path) -> None:
    """cg-dev's MANIFEST.md was warned of as a skipped file at every evaluation of cg-dev."""
    _write_bgr(tmp_path / "x.png", _rgb(4, 4))
    for name in ("MANIFEST.md", "README", "readme.txt", "LICENSE", "COPYING.txt"):
        (tmp_path / name).write_text("about these images")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [info.path.name for info in scan_images(tmp_path, progress=False)] == ["x.png"]
    (tmp_path / "notes.txt").write_text("junk")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "README.md").write_text("below the top: a stray file")
    _write_bgr(tmp_path / "readme.png", _rgb(4, 4))  # an image named so is an image
    with pytest.warns(SkippedFilesWarning, match=r"2 not images \((notes\.txt, sub/README\.md|sub/README\.md, "
                                                 r"notes\.txt)\)"):
        found = scan_images(tmp_path, progress=False)
    assert [info.path.name for info in found] == ["readme.png", "x.png"]


def test_the_output_of_the_scenes_command_is_refused_for_its_hr_folder(tmp_path: Path) -> None:
    """`evaluate --data sc` or a folder source at sc (not sc/hr) scored or trained on the LR frames (lr_x2/*.png)
    as if they were HR images: the scan is recursive."""
    out = tmp_path / "sc"
    write_scene_frames(out, 1, width=64, height=32, supersample=1, split="val", progress=False)
    with pytest.raises(DatasetError, match=rf"{out} is the output of `python -m training.data scenes`.*: give its "
                                           rf"HR frames, {out}/hr, as the image folder"):
        scan_images(out, progress=False)
    assert [info.path.parent.name for info in scan_images(out / "hr", progress=False)] == ["hr"]


def test_empty_folder_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no usable image"):
        scan_images(tmp_path, progress=False)
    assert issubclass(DatasetError, ValueError)


def test_nothing_usable_is_a_dataset_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    _write_bgr(tmp_path / "small.png", _rgb(4, 4))
    with pytest.warns(SkippedFilesWarning), pytest.raises(DatasetError):
        scan_images(tmp_path, min_size=16, progress=False)


def test_missing_folder_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_images(tmp_path / "nope", progress=False)

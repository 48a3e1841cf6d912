"""Reading images from disk into the project's value range, and scanning folders of them.

Every image becomes a float32 (3, H, W) RGB tensor in [0, 1]. Decoding is OpenCV's (`IMREAD_UNCHANGED`, so 16-bit
stays 16-bit and alpha is visible); nothing here ever unpickles.

Alpha is dropped, not composited: in rendered frames and game captures the alpha channel is rarely coverage (a
back buffer's alpha is often 0 or junk), and compositing over a background would darken or erase those frames.
"""

import contextlib
import hashlib
import json
import math
import os
import secrets
import stat
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from training import MAX_IMAGE_PIXELS
from upscaler_server.files import is_stream, written_file  # standard library only (docs/architecture.md)
from upscaler_server.image_bytes import damage, opencv_log_silenced  # standard library only (cv2 once called)

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_NAME",
    "SCENES_CACHE_MARKER",
    "DatasetError",
    "ImageInfo",
    "ImageReadError",
    "SkippedFilesWarning",
    "file_sha256",
    "read_image",
    "read_image_array",
    "read_manifest",
    "scan_images",
    "to_tensor",
    "to_uint8",
    "walk_dataset",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_png",
    "write_text_atomic",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_NAMED_IN_WARNING = 5
# The record our data commands (`python -m training.data povray|scenes`) write at the top of their output
# folder: part of the dataset's provenance, not junk, so a scan passes over it without a warning.
MANIFEST_NAME = "manifest.json"
# The empty file a scenes source puts into its cache_dir: HR and native LR renders lie there side by side, so a
# folder scan leaves the folder out (a cache_dir inside an image folder trained its LR renders as HR images)
SCENES_CACHE_MARKER = ".scenes-cache"
_FOLDER_DOCUMENTS = {"README", "MANIFEST", "LICENSE", "LICENCE", "COPYING"}  # names (any suffix) _describes_the_folder


class DatasetError(ValueError):
    """A dataset cannot be built: nothing usable in a folder, a source that cannot give what was asked, ..."""


class ImageReadError(ValueError):
    """One file could not be decoded as an image; `reason` is how a folder scan counts it."""

    def __init__(self, message: str, reason: str = "unreadable") -> None:
        super().__init__(message)
        self.reason = reason


class SkippedFilesWarning(UserWarning):
    """Some files of a folder were skipped (one warning per scan, with counts)."""


def read_manifest(path: Path, tables: tuple[str, ...], command: str) -> dict:
    """A data command's manifest.json with its `tables` (each a JSON object), or empty tables when there is none
    yet. DatasetError when the file is not that command's (another command's output folder, or junk)."""
    if not path.is_file():
        return {table: {} for table in tables}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}); move it away or use another --out folder") from None
    if not isinstance(manifest, dict) or not all(isinstance(manifest.get(t), dict) for t in tables):
        raise DatasetError(f"{path} was not written by `python -m training.data {command}` (no "
                           f"{' / '.join(tables)} table): use another --out folder")
    return manifest


def write_json_atomic(path: Path, value: object, *, indent: int = 1, sort_keys: bool = True) -> None:
    """Write `value` as JSON (ASCII, so any image name fits) whole or not at all: `write_text_atomic`. A float that
    is not finite (the PSNR of an image reproduced exactly is infinite) is written as null: json's own Infinity and
    NaN are not JSON, and jq, JavaScript and most other readers refuse the whole file."""
    text = json.dumps(_non_finite_as_null(value), indent=indent, sort_keys=sort_keys, allow_nan=False)
    write_text_atomic(path, text + "\n")


def _non_finite_as_null(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _non_finite_as_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_non_finite_as_null(item) for item in value]
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` as UTF-8 (`write_bytes_atomic`). A name that is not valid UTF-8 (held as surrogates) is written
    with backslash escapes, so the file stays UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8", errors="backslashreplace"))


def write_into(path: Path, data: bytes) -> None:
    """Append `data` to a stream (is_stream) after what this process printed before (a table, then the JSON)."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(path, "ab") as sink:
        sink.write(data)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` through a temporary file and a rename: a killed writer never leaves half a file. A link is
    written through (its target replaced, the link kept), and a rewrite keeps the file's permissions. The temporary
    file is new (exclusive create: it never replaces a file of the user's, as `NAME.tmp` did), hidden (scans pass
    over it), short-named (a name near the 255-byte limit still fits) and removed on any error. What is neither a file
    nor a folder (/dev/null, /dev/stdout, a FIFO) is written into, as a shell's redirection would: a file moved
    onto /dev/null (as root) replaced it for the whole machine. A link another user planted in a shared folder such
    as /tmp is not written through (PermissionError: upscaler_server.files.written_file)."""
    if is_stream(path):
        write_into(path, data)
        return
    target = written_file(path)
    tmp = target.with_name(f".{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as file:  # the umask's permissions
            file.write(data)
        with contextlib.suppress(FileNotFoundError):  # nothing to keep for a new file
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):  # a full disk says no name: say which file
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, as the data commands' manifests and weights.json record it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class ImageInfo:
    """A usable image of a scanned folder."""

    path: Path
    height: int
    width: int
    sha256: str  # of the file's bytes, as scanned (a folder source's fingerprint is made of them)


def _to_rgb(raw: np.ndarray) -> np.ndarray:
    """OpenCV's (H, W), (H, W, 1), (H, W, 3) BGR or (H, W, 4) BGRA -> (H, W, 3) RGB, same dtype."""
    if raw.ndim == 2:
        raw = raw[:, :, None]
    channels = raw.shape[2]
    if channels == 1:
        return np.repeat(raw, 3, axis=2)
    if channels in (3, 4):
        return np.ascontiguousarray(raw[:, :, 2::-1])  # BGR(A) -> RGB, alpha dropped
    raise ImageReadError(f"unsupported channel count {channels}")


def _to_unit_float(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 / uint16 / float -> float32 in [0, 1]."""
    if rgb.dtype == np.uint8:
        return rgb.astype(np.float32) / 255.0
    if rgb.dtype == np.uint16:
        return rgb.astype(np.float32) / 65535.0
    if rgb.dtype in (np.float32, np.float64):
        return np.clip(rgb, 0.0, 1.0).astype(np.float32)  # float TIFF: taken as already in [0, 1]
    raise ImageReadError(f"unsupported pixel type {rgb.dtype}")


_PIXEL_TYPES = (np.uint8, np.uint16, np.float32, np.float64)  # what _to_unit_float maps to [0, 1]
MAX_PIXELS = MAX_IMAGE_PIXELS  # also OpenCV's own limit, set in training/__init__ before cv2 loads
TOO_LARGE = f"larger than {MAX_PIXELS / 1e6:.0f} megapixels"


def _decode(path: Path) -> np.ndarray:
    """The file's pixels as OpenCV reads them; ImageReadError naming the file for anything we cannot use."""
    return _decode_bytes(path, _file_bytes(path))


def _file_bytes(path: Path) -> np.ndarray:
    """The file's bytes (uint8); ImageReadError naming it when it cannot be read."""
    try:
        # the bytes, not the name: OpenCV's imread crashes the process on a name that is not valid UTF-8
        return np.fromfile(path, np.uint8)
    except OSError as exc:
        raise ImageReadError(f"cannot read {path}: {exc.strerror or exc}") from None


def _decode_bytes(path: Path, data: np.ndarray) -> np.ndarray:
    """:func:`_decode` of the bytes ``data`` read from ``path`` (named in errors)."""
    problem = damage(data)  # libjpeg's grey rows, libpng's own stderr lines: refused here instead
    if problem:
        raise ImageReadError(f"cannot decode {path}: {problem}")
    try:
        with opencv_log_silenced():
            raw = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error as exc:  # e.g. a header declaring more pixels than OPENCV_IO_MAX_IMAGE_PIXELS (training/__init__)
        if "validateInputImageSize" in str(exc):
            raise ImageReadError(f"cannot decode {path}: its header declares a frame {TOO_LARGE}", TOO_LARGE) from None
        raise ImageReadError(f"cannot decode {path}: OpenCV refused it ({exc.err or exc})", "unreadable") from None
    if raw is None or raw.size == 0:
        raise ImageReadError(f"cannot decode {path} as an image (unreadable, truncated or not an image)")
    if raw.shape[0] * raw.shape[1] > MAX_PIXELS:
        raise ImageReadError(f"{path} is {raw.shape[1]}x{raw.shape[0]}, {TOO_LARGE}", TOO_LARGE)
    if raw.dtype not in _PIXEL_TYPES:
        raise ImageReadError(f"{path} has pixels of type {raw.dtype}; supported: 8- and 16-bit unsigned, float")
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():  # a float TIFF's NaN would turn the loss NaN
        raise ImageReadError(f"{path} has NaN or infinite pixels", "with NaN or infinite pixels")
    return raw


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 / uint16 / float array -> (3, H, W) float32 tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(_to_unit_float(rgb).transpose(2, 0, 1)))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 RGB, rounded."""
    return (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def read_image(path: str | Path) -> torch.Tensor:
    """Any supported image file -> (3, H, W) float32 RGB in [0, 1]; raises ImageReadError."""
    return to_tensor(_to_rgb(_decode(Path(path))))


def read_image_array(path: str | Path) -> np.ndarray:
    """(H, W, 3) RGB array in the file's own dtype (uint8 for 8-bit files: 4x less memory to cache than float);
    to_tensor then gives the project's range. Raises ImageReadError."""
    return _to_rgb(_decode(Path(path)))


def write_png(path: str | Path, image: torch.Tensor | np.ndarray) -> None:
    """Write (3, H, W) float in [0, 1] or (H, W, 3) uint8 RGB as an 8-bit PNG, whole or not at all; raises OSError
    on failure."""
    rgb = to_uint8(image) if isinstance(image, torch.Tensor) else image
    encoded, png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not encoded:
        raise OSError(f"could not encode {path} as PNG")
    # bytes, not imwrite: OpenCV crashes on a name that is not UTF-8; whole, so an interrupted render never leaves a
    # truncated PNG under the frame's name for a scan to find
    write_bytes_atomic(Path(path), png.tobytes())


def _skip_message(root: Path, skipped: dict[str, list[Path]]) -> str:
    total = sum(len(paths) for paths in skipped.values())
    parts = []
    for reason, paths in skipped.items():
        if paths:
            names = ", ".join(str(p.relative_to(root)) for p in paths[:_NAMED_IN_WARNING])
            more = f", ... {len(paths) - _NAMED_IN_WARNING} more" if len(paths) > _NAMED_IN_WARNING else ""
            parts.append(f"{len(paths)} {reason} ({names}{more})")
    return f"{root}: skipped {total} file(s): " + "; ".join(parts)


def walk_dataset(root: Path, unreachable: list[Path] | None = None, repeated: list[Path] | None = None,
                 caches: list[Path] | None = None) -> Iterator[tuple[Path, Path, list[str]]]:
    """(folder as reached from `root`, its real path, its file names) for every folder a scan reads, in sorted
    order: linked folders are followed (a dataset assembled from links), each real folder once, under its first name
    (a link loop ends); the files of a folder reached again go to `repeated`. Hidden files and folders (".DS_Store",
    ".git", half-written ".name.png") are not part of a dataset, nor is a scenes source's cache_dir (below `root`:
    it goes to `caches`). Folders that cannot be listed go to `unreachable`."""
    seen: set[str] = set()

    def refused(error: OSError) -> None:
        if unreachable is not None:
            unreachable.append(Path(error.filename))

    for folder, subfolders, names in os.walk(root, onerror=refused, followlinks=True):
        real = os.path.realpath(folder)
        visible = sorted(name for name in names if not name.startswith("."))
        if real in seen or (SCENES_CACHE_MARKER in names and folder != str(root)):
            subfolders.clear()
            skipped = repeated if real in seen else caches
            if skipped is not None:
                skipped += [Path(folder, name) for name in visible] if real in seen else [Path(folder)]
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))  # the first name: sorted
        yield Path(folder), Path(real), visible


def _describes_the_folder(name: str) -> bool:
    """A dataset's own documentation at its top level (README.md, MANIFEST.md, LICENSE, COPYING.txt), left out of
    the scan without a warning: cg-dev's MANIFEST.md was warned of as junk at every evaluation."""
    return name.split(".")[0].upper() in _FOLDER_DOCUMENTS and Path(name).suffix.lower() not in IMAGE_SUFFIXES


@dataclass
class _Found:
    """What a scan of a folder finds (`_files_under`), sorted: the files to read, and those left out by reason."""

    files: list[Path]
    unreachable: list[Path]  # broken links, folders that cannot be listed, pipes
    repeats: list[Path]  # files reached again under another name
    lr_frames: list[Path]  # the LR frames of a `scenes` output folder below the root
    caches: list[Path]  # scenes sources' cache_dir folders below the root


def _files_under(root: Path) -> _Found:
    """The files under `root` as `walk_dataset` reaches them, without the data commands' manifests and the folder's
    documentation. A file reached under a second name (a link to it, a hard link, a linked folder holding it) is a
    repeat, left out so that it is not trained on or scored twice; the first name in sorted order is kept. The LR
    frames of a `scenes` output folder below `root` (its manifest names them) are left out: they are no HR images."""
    found = _Found([], [], [], [], [])
    files: list[Path] = []
    lr_named: set[Path] = set()
    for folder, _, names in walk_dataset(root, found.unreachable, found.repeats, found.caches):
        manifest = _data_command_manifest(folder / MANIFEST_NAME) if MANIFEST_NAME in names else None
        frames = manifest.get("frames") if manifest is not None else None  # a scenes output's (the root's is refused)
        if isinstance(frames, dict):
            lr_named |= {folder / record["lr"] for record in frames.values()
                         if isinstance(record, dict) and isinstance(record.get("lr"), str)}
        for name in names:
            path = folder / name
            if (name == MANIFEST_NAME and (folder == root or manifest is not None)) or (
                    folder == root and _describes_the_folder(name)):
                continue
            (files if path.is_file() else found.unreachable).append(path)  # is_file follows links: False when broken
    seen: set[tuple[int, int]] = set()
    for path in sorted(files):
        if path in lr_named:
            found.lr_frames.append(path)
            continue
        try:
            status = path.stat()
        except OSError:  # gone since the walk: for the decode to report
            found.files.append(path)
            continue
        identity = (status.st_dev, status.st_ino)
        (found.repeats if identity in seen else found.files).append(path)
        seen.add(identity)
    for listed in (found.unreachable, found.repeats, found.caches):
        listed.sort()
    return found


def _data_command_manifest(path: Path) -> dict | None:
    """The manifest `python -m training.data povray|scenes` wrote at `path` (a "frames" or a "scenes" table), else
    None (not JSON, not ours, unreadable: then it is a stray file of the folder)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    if isinstance(manifest, dict) and any(isinstance(manifest.get(table), dict) for table in ("frames", "scenes")):
        return manifest
    return None


def _refuse_scenes_output(root: Path) -> None:
    """DatasetError for the output folder of `python -m training.data scenes` (its manifest has a frames table) and
    for a scenes source's cache_dir: the recursive scan read their LR frames as HR images too, and trained or scored
    on them."""
    if (root / SCENES_CACHE_MARKER).exists():
        raise DatasetError(f"{root} is the cache_dir of a scenes source, HR and native LR renders side by side: train "
                           "on it with that scenes source (its cache_dir), not as an image folder")
    manifest = _data_command_manifest(root / MANIFEST_NAME)
    if manifest is not None and isinstance(manifest.get("frames"), dict):
        raise DatasetError(f"{root} is the output of `python -m training.data scenes`, HR and LR frames side by side: "
                           f"give its HR frames, {root / 'hr'}, as the image folder")


def scan_images(root: str | Path, min_size: int = 1, *, progress: bool = True) -> list[ImageInfo]:
    """Every usable image under `root` (recursive, sorted by path, hidden files, the data commands' top-level
    manifest.json and top-level README/MANIFEST/LICENSE/COPYING files ignored), each decoded once to validate it.
    The output folder of `python -m training.data scenes` is refused (DatasetError): its HR frames are in its hr/
    folder.

    Files that are not images (by suffix), fail to decode, or are smaller than `min_size` on either side are
    skipped with one SkippedFilesWarning naming a few. Raises DatasetError if nothing usable is left.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a folder")
    _refuse_scenes_output(root)
    under = _files_under(root)
    skipped: dict[str, list[Path]] = {"not images": [], "unreadable": [], f"smaller than {min_size}px": [],
                                      "unreachable (broken links, unreadable folders, pipes)": under.unreachable,
                                      "reached again under another name (links to one file)": under.repeats,
                                      "LR frames of a training.data scenes output (its manifest.json names them)":
                                          under.lr_frames,
                                      "scenes caches (a cache_dir: HR and LR renders), folder(s)": under.caches}
    found = []
    for path in tqdm(under.files, desc=f"scan {root.name}", unit="file", disable=not progress, leave=False):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped["not images"].append(path)
            continue
        try:
            data = _file_bytes(path)
            height, width = _to_rgb(_decode_bytes(path, data)).shape[:2]
        except ImageReadError as exc:
            skipped.setdefault(exc.reason, []).append(path)
            continue
        if min(height, width) < min_size:
            skipped[f"smaller than {min_size}px"].append(path)
            continue
        found.append(ImageInfo(path, height, width, hashlib.sha256(data).hexdigest()))
    if any(skipped.values()):
        warnings.warn(_skip_message(root, skipped), SkippedFilesWarning, stacklevel=2)
    if not found:
        raise DatasetError(f"no usable image in {root} (suffixes {', '.join(IMAGE_SUFFIXES)}, min size {min_size}px)")
    return found

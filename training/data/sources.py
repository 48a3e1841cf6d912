"""Where HR (and native LR) frames come from: a folder of images, or the procedural scene renderer.

A source is a finite, indexable list of frames. `frame(i)` gives the HR frame as an (H, W, 3) array (uint8, or
uint16 for 16-bit files) and, for a native-LR scene source, the LR frame rendered at (H/s, W/s) with the same
camera. Decoded/rendered frames are kept in a small per-process LRU cache, because a training item crops one
patch and several consecutive items crop the same frame.

The scene renderer (package `scenes`, OpenGL through EGL) is imported and created lazily, inside the process
that renders: an EGL context cannot cross a fork, so each DataLoader worker makes its own on first use.
"""

import functools
import hashlib
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from training.data.images import (
    SCENES_CACHE_MARKER,
    DatasetError,
    ImageReadError,
    read_image_array,
    scan_images,
    write_png,
)

__all__ = [
    "FolderSource",
    "Frame",
    "LazyRenderer",
    "LrKind",
    "SceneSource",
    "Split",
    "check_presets",
    "frame_name",
    "loop_period",
    "scene_times",
]

LrKind = Literal["bicubic", "native"]
Split = Literal["train", "val"]

# Scene time split, as fractions of a preset's camera loop: training frames take the first 75% of the loop,
# validation frames [80%, 95%). The gaps at both ends keep near-identical neighbours of a validation frame (the
# loop wraps from 100% to 0%) out of training. The split is of viewpoints: both see the same static scene.
_SPLIT_PHASES = {"train": (0.0, 0.75), "val": (0.80, 0.95)}
_PERIOD_STEP = 0.25  # loop periods are searched on this grid of seconds...
_PERIOD_MAX = 600.0  # ...up to this; a camera that does not loop by then is split over [0, _PERIOD_MAX)


def _same_camera(a: Any, b: Any) -> bool:
    values_a = (*a.position, a.yaw, a.pitch, a.fov_y_degrees)
    values_b = (*b.position, b.yaw, b.pitch, b.fov_y_degrees)
    return bool(np.allclose(values_a, values_b, rtol=0, atol=1e-6))


@functools.cache
def loop_period(preset: str) -> float:
    """The period of a preset's camera path, found from `scenes.camera_at` (presets do not publish it): the
    smallest grid step P with camera(t + P) == camera(t) at a few t."""
    from scenes import camera_at

    probes = (0.0, 1.37, 5.91)
    for k in range(1, int(_PERIOD_MAX / _PERIOD_STEP) + 1):
        period = k * _PERIOD_STEP
        if all(_same_camera(camera_at(preset, t), camera_at(preset, t + period)) for t in probes):
            return period
    return _PERIOD_MAX


def frame_name(preset: str, t: float) -> str:
    """`city_t0012.3456`: unique per (preset, t), as scene_times rounds t to 4 decimals."""
    return f"{preset}_t{t:09.4f}"


def _van_der_corput(k: int) -> float:
    """k-th point of the base-2 van der Corput sequence in [0, 1): 0, 1/2, 1/4, 3/4, 1/8, ..."""
    value, denominator = 0.0, 1.0
    while k:
        denominator *= 2
        k, bit = divmod(k, 2)
        value += bit / denominator
    return value


MAX_TIMES_PER_PRESET = 100_000  # about 290 GB of 1080p pairs per preset: past any training set


def scene_times(split: Split, count: int, period: float) -> list[float]:
    """`count` fixed times of a split within its part of a loop of `period` seconds.

    A van der Corput sequence: the times are well spread for any count, and the first N are the same whatever
    the count, so asking for more frames keeps (and reuses from disk) the ones already rendered. Seed-free, so
    disk caches are shared between runs.
    """
    if count > MAX_TIMES_PER_PRESET:  # a billion took minutes of silence before the first frame
        raise DatasetError(f"{count} times per preset asked for; at most {MAX_TIMES_PER_PRESET}")
    start, end = _SPLIT_PHASES[split]
    times = [round(period * (start + (end - start) * _van_der_corput(k)), 4) for k in range(count)]
    distinct = len(set(times))
    if distinct < count:  # the frames' names (4 decimals of t) would repeat: fewer frames, said nowhere
        raise DatasetError(f"{count} times of the {split} part of a {period:g} s loop: only {distinct} of them differ "
                           "in their 4 decimals (the frames' names); ask for fewer frames per preset")
    return times


@dataclass
class Frame:
    """One full frame: HR (H, W, 3), and the native LR (H/s, W/s, 3) when the source renders one."""

    hr: np.ndarray
    lr: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.hr.nbytes + (0 if self.lr is None else self.lr.nbytes)


class _FrameCache:
    """LRU cache of frames within a byte budget; each process (DataLoader worker) has its own."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._frames: OrderedDict[int, Frame] = OrderedDict()

    def get(self, key: int) -> Frame | None:
        frame = self._frames.get(key)
        if frame is not None:
            self._frames.move_to_end(key)
        return frame

    def put(self, key: int, frame: Frame) -> None:
        self._frames[key] = frame
        while len(self._frames) > 1 and sum(f.nbytes for f in self._frames.values()) > self.max_bytes:
            self._frames.popitem(last=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes}  # spawned workers start empty rather than receive a copy

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_bytes"])


class FolderSource:
    """Every usable image of a folder (recursive). Only bicubic LR: a folder has no native LR frames."""

    native = False

    def __init__(self, root: str | Path, min_size: int, *, cache_mb: int = 256, progress: bool = True) -> None:
        self.root = Path(root)
        self.images = scan_images(self.root, min_size, progress=progress)
        self._names = _image_names([info.path.relative_to(self.root) for info in self.images])
        self._cache = _FrameCache(cache_mb << 20)

    def __len__(self) -> int:
        return len(self.images)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records of the folder: its absolute path, its usable images' count and one sha256 over
        their paths (relative, sorted) and bytes, so that two runs can tell whether they read the same files."""
        listing = "".join(f"{info.path.relative_to(self.root).as_posix()}\t{info.sha256}\n" for info in self.images)
        return {"kind": "folder", "path": str(self.root.resolve()), "images": len(self.images),
                "sha256": hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()}

    def name(self, index: int) -> str:
        """The image's path in the folder without its suffix (`a/frame`), or with it where two files differ only
        there (`x.png`, `x.jpg`): unique, so that per-image scores keyed by name never merge two images."""
        return self._names[index]

    def frame(self, index: int) -> Frame:
        frame = self._cache.get(index)
        if frame is None:
            try:
                frame = Frame(read_image_array(self.images[index].path))
            except ImageReadError as exc:  # it decoded when scanned: the file changed since
                raise DatasetError(f"{exc}; it was readable when {self.root} was scanned") from exc
            self._cache.put(index, frame)
        return frame


def _image_names(paths: list[Path]) -> list[str]:
    """Unique names for distinct relative paths: each without its suffix, except those that would then repeat,
    which keep it. Repeated until unique, as `x.png` kept whole can meet the stripped `x.png.webp`."""
    whole = [path.as_posix() for path in paths]
    names = [path.with_suffix("").as_posix() for path in paths]
    while True:
        counts = Counter(names)
        repeated = [i for i, name in enumerate(names) if counts[name] > 1 and name != whole[i]]
        if not repeated:  # whole paths are distinct, so every repeat involves a stripped name
            return names
        for i in repeated:
            names[i] = whole[i]


class SceneSource:
    """Frames of the procedural scene renderer: a fixed pool of (preset, t), rendered on demand.

    HR = render(W, H, supersample=k); native LR = render(W/s, H/s, supersample=1) at the same t (same camera).
    With `cache_dir`, rendered frames are also written there as PNG and read back by later runs and workers.
    """

    def __init__(
        self,
        presets: list[str] | None,
        split: Split,
        *,
        width: int,
        height: int,
        scale: int,
        lr_kind: LrKind,
        supersample: int = 2,
        frames_per_preset: int = 64,
        cache_dir: str | Path | None = None,
        cache_mb: int = 256,
    ) -> None:
        if width % scale or height % scale:
            raise DatasetError(f"scene frame {width}x{height} is not a multiple of scale {scale}")
        self.presets = check_presets(presets)
        self.width, self.height, self.scale = width, height, scale
        self.native = lr_kind == "native"
        self.supersample = supersample
        self.pool = [(p, t) for p in self.presets for t in scene_times(split, frames_per_preset, loop_period(p))]
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir is not None and self.cache_dir.is_dir():
            _mark_as_cache(self.cache_dir)  # one made before the marker was: a folder scan must leave it out too
        self._cache = _FrameCache(cache_mb << 20)
        self.renderer = LazyRenderer()

    def __len__(self) -> int:
        return len(self.pool)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records of the source beyond its config: the number of (preset, t) frames. Their pixels
        depend on the OpenGL driver that renders them (docs/scenes.md), which only the workers meet."""
        return {"kind": "scenes", "frames": len(self.pool)}

    def name(self, index: int) -> str:
        return frame_name(*self.pool[index])

    def frame(self, index: int) -> Frame:
        frame = self._cache.get(index)
        if frame is None:
            preset, t = self.pool[index]
            hr = self._cached_render(preset, t, self.width, self.height, self.supersample)
            lr = None
            if self.native:
                lr = self._cached_render(preset, t, self.width // self.scale, self.height // self.scale, 1)
            frame = Frame(hr, lr)
            self._cache.put(index, frame)
        return frame

    def _cached_render(self, preset: str, t: float, width: int, height: int, supersample: int) -> np.ndarray:
        if self.cache_dir is None:
            return self.renderer.render(preset, t, width, height, supersample)
        path = self.cache_dir / preset / f"{frame_name(preset, t)}_{width}x{height}_ss{supersample}.png"
        cached = _read_cached(path, width, height)
        if cached is not None:
            return cached
        rgb = self.renderer.render(preset, t, width, height, supersample)
        path.parent.mkdir(parents=True, exist_ok=True)
        _mark_as_cache(self.cache_dir)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")  # workers may race on one frame: write, rename
        write_png(tmp, rgb)
        os.replace(tmp, path)
        return rgb


def _mark_as_cache(folder: Path) -> None:
    """Put the marker into a cache_dir: a folder scan (an image folder holding it) then leaves its HR and native LR
    renders out instead of training on both as HR images."""
    marker = folder / SCENES_CACHE_MARKER
    if not marker.exists():
        marker.touch()  # workers may race here: touching twice is harmless


def _read_cached(path: Path, width: int, height: int) -> np.ndarray | None:
    """The cached frame at `path`, or None when it must be rendered: missing, damaged, or (stale or replaced) not
    the 8-bit width x height frame its name says, which would crash a batch or train on the wrong pixels."""
    if not path.is_file():
        return None
    try:
        rgb = read_image_array(path)
    except ImageReadError:
        return None
    return rgb if rgb.shape == (height, width, 3) and rgb.dtype == np.uint8 else None


# The process that made this module's first OpenGL context. A fork inherits the value, which is how a forked
# worker knows that its parent holds a context: creating another one there hangs in Mesa's EGL (measured).
_context_pid: int | None = None
_FORKED_AFTER_GL = (
    "this DataLoader worker was forked from a process that has an OpenGL context, and creating another one here "
    "would hang; start the workers with DataLoader(..., multiprocessing_context='forkserver') (or 'spawn'), "
    "see training.data.worker_start_method"
)


class LazyRenderer:
    """The `scenes` renderer of the current process, created on first use: never inherited through a fork (an
    EGL context cannot cross one) and never pickled (spawned workers make their own)."""

    def __init__(self) -> None:
        self._renderer: Any = None
        self._pid = -1

    def render(self, preset: str, t: float, width: int, height: int, supersample: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        global _context_pid
        if self._renderer is None or self._pid != os.getpid():
            if _context_pid not in (None, os.getpid()):
                raise RuntimeError(_FORKED_AFTER_GL)
            from scenes import SceneRenderer  # lazily: importing training.data must not need OpenGL

            renderer = SceneRenderer()
            frame = renderer.render(preset, t, width, height, supersample=supersample)  # makes the context
            self._renderer, self._pid = renderer, os.getpid()
            _context_pid = self._pid
            return frame
        return self._renderer.render(preset, t, width, height, supersample=supersample)

    def description(self) -> str | None:
        """The OpenGL driver this process rendered with (`llvmpipe (LLVM 15.0.6, 256 bits), 4.5 (Core Profile) Mesa
        22.3.6`): a frame's pixels depend on it (docs/scenes.md). None before this process has rendered."""
        if self._renderer is None or self._pid != os.getpid():
            return None
        info = self._renderer.ctx.info
        return f"{info['GL_RENDERER']}, {info['GL_VERSION']}"

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


def check_presets(presets: list[str] | None) -> list[str]:
    """The requested presets (all when None), checked against the renderer's list."""
    try:
        from scenes import PRESETS
    except ImportError as exc:
        raise DatasetError(f"a scenes source needs the `scenes` package, which does not import: {exc}") from exc
    available = list(PRESETS)
    chosen = available if presets is None else list(presets)
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise DatasetError(f"unknown scene presets {unknown}; available: {', '.join(available)}")
    if not chosen:
        raise DatasetError("a scenes source needs at least one preset")
    return chosen

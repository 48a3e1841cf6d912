"""Training patches and evaluation frames as torch datasets.

Training (`PatchDataset`) is map-style with a virtual length: item `i` is a pure function of `(seed, i)`: the
source, the frame, the crop and the augmentation are all drawn from generators seeded with `(seed, ..., i)`. So the
same seed gives the same patches whatever the number of DataLoader workers or their scheduling, and any index
(not only those below `len`) is valid: `EpochSampler` walks `[epoch * len, (epoch + 1) * len)` to see fresh
patches every epoch. Consecutive indices share a frame in groups of `patches_per_image`, so a batch decodes or
renders a few frames rather than one per patch.

Each item is `{"hr": (3, P, P) float32, "lr": (3, P/s, P/s) float32}` in [0, 1]; for a bicubic source the LR is
exactly `degrade(hr, s)` (after augmentation), for a native source it is the aligned crop of the LR render.

With them, what their DataLoader workers need: the start method (`worker_start_method`), and an end with the
trainer's process however it ends (`exit_with_trainer`, `end_workers_at_exit`).
"""

import atexit
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit hook now, so end_workers_at_exit's runs before it
import os
import select
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from training.data.augment import NO_AUGMENT, AugmentConfig, AugmentParams, apply_geometry, blend, sample_augment
from training.data.degrade import degrade
from training.data.images import DatasetError, to_tensor
from training.data.sources import Frame, SceneSource

__all__ = ["EpochSampler", "FrameDataset", "PatchDataset", "Source", "end_workers_at_exit", "exit_with_trainer",
           "worker_start_method"]


class Source(Protocol):
    """What the datasets need of a source (FolderSource, SceneSource)."""

    native: bool

    def __len__(self) -> int: ...

    def name(self, index: int) -> str: ...

    def frame(self, index: int) -> Frame: ...

    def fingerprint(self) -> dict[str, Any]: ...


class PatchDataset(Dataset):
    """Random aligned HR/LR patches from weighted sources (see the module docstring for the seeding)."""

    def __init__(
        self,
        sources: Sequence[Source],
        weights: Sequence[float],
        *,
        scale: int,
        patch_size: int = 192,
        augment: AugmentConfig = NO_AUGMENT,
        seed: int = 0,
        length: int = 16000,
        patches_per_image: int = 4,
    ) -> None:
        if patch_size % scale:
            raise DatasetError(f"patch size {patch_size} is not a multiple of scale {scale}")
        if not sources or len(sources) != len(weights) or min(weights) <= 0:
            raise DatasetError(f"need one or more sources, each with a positive weight; got weights {list(weights)}")
        if length < 1 or patches_per_image < 1 or seed < 0:
            raise DatasetError("length and patches_per_image must be >= 1, seed >= 0")
        self.sources = list(sources)
        self.probs = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.scale, self.patch_size, self.augment = scale, patch_size, augment
        self.seed, self.length, self.patches_per_image = seed, length, patches_per_image

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            raise IndexError(f"negative index {index}")
        group = np.random.default_rng([self.seed, 0, index // self.patches_per_image])
        source = self.sources[int(group.choice(len(self.sources), p=self.probs))]
        frame = source.frame(int(group.integers(len(source))))
        rng = np.random.default_rng([self.seed, 1, index])
        params = sample_augment(self.augment, rng)
        hr, lr = self._patch(frame, params, rng)
        if params.blend_alpha is not None:
            # The partner: another crop of the same frame (no extra decode or render), its own geometry.
            hr2, lr2 = self._patch(frame, sample_augment(self.augment, rng), rng)
            hr = blend(hr, hr2, params.blend_alpha, quantize=False)
            lr = None if lr is None else blend(lr, lr2, params.blend_alpha, quantize=True)
        if lr is None:
            lr = degrade(hr, self.scale)  # after every augmentation: LR == degrade(HR) exactly
        return {"hr": hr, "lr": lr}

    def _patch(
        self, frame: Frame, params: AugmentParams, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A random crop (corner on the LR grid) with its geometry applied; LR only for a native frame."""
        p, s = self.patch_size, self.scale
        height, width = frame.hr.shape[:2]
        if height < p or width < p:
            raise DatasetError(f"frame {width}x{height} is smaller than the {p}px patch")
        y = s * int(rng.integers((height - p) // s + 1))
        x = s * int(rng.integers((width - p) // s + 1))
        hr = apply_geometry(to_tensor(frame.hr[y : y + p, x : x + p]), params)  # (3, P, P)
        if frame.lr is None:
            return hr, None
        lr_crop = frame.lr[y // s : (y + p) // s, x // s : (x + p) // s]
        return hr, apply_geometry(to_tensor(lr_crop), params)  # (3, P/s, P/s)


class FrameDataset(Dataset):
    """Whole frames for evaluation: `{"hr", "lr", "name"}`, HR cropped (bottom/right) to a multiple of the scale,
    LR by `degrade` or the source's native render. Frames differ in size: use batch_size=1."""

    def __init__(self, source: Source, scale: int) -> None:
        self.source, self.scale = source, scale

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        frame = self.source.frame(index)
        s = self.scale
        height, width = (frame.hr.shape[0] // s) * s, (frame.hr.shape[1] // s) * s
        hr = to_tensor(frame.hr[:height, :width])  # (3, H, W), H and W multiples of s
        lr = degrade(hr, s) if frame.lr is None else to_tensor(frame.lr)  # (3, H/s, W/s)
        return {"hr": hr, "lr": lr, "name": self.source.name(index)}


class EpochSampler(Sampler[int]):
    """Indices `[epoch * length, (epoch + 1) * length)` of a PatchDataset: new patches every epoch, reproducible.

    It lives in the main process, so `set_epoch` works with persistent workers too. No shuffling is needed: every
    index is already an independent random patch (in groups of `patches_per_image` sharing a frame).
    """

    def __init__(self, length: int, epoch: int = 0) -> None:
        self.length, self.epoch = length, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.epoch * self.length, (self.epoch + 1) * self.length))


def worker_start_method(dataset: PatchDataset | FrameDataset) -> str | None:
    """The DataLoader `multiprocessing_context` a dataset needs: "forkserver" when it renders scenes, because a
    worker forked from a process that already holds an OpenGL context (say, after a rendered validation pass)
    hangs making its own; else None, the default fork, which starts fastest."""
    sources = dataset.sources if isinstance(dataset, PatchDataset) else [dataset.source]
    return "forkserver" if any(isinstance(source, SceneSource) for source in sources) else None


def exit_with_trainer(trainer_pid: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: end this worker as soon as the trainer process is gone, however it ended
    (SIGKILL included). Torch's own check watches the worker's parent, which under forkserver (scene sources) is
    the fork server, not the trainer, so without this the workers outlive a killed trainer, memory and all.
    SIGTERM is ignored here: a job scheduler sends it to the whole process group, and workers that died of it made
    the trainer fail on its next batch ("DataLoader worker ... killed by signal: Terminated"), unsaved, instead of
    finishing its step and saving its state. The workers end with the trainer anyway."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_when_gone, args=(trainer_pid,), name="exit-with-trainer", daemon=True).start()


def end_workers_at_exit() -> None:
    """Have this process's data-loader workers killed when it exits, before multiprocessing's own exit hook runs:
    that hook sends them SIGTERM, which they ignore (exit_with_trainer), and waits for them. After an error whose
    traceback still held the loader's iterator, so that its workers were never told to stop, the trainer printed
    the error and then waited for ever. Registered anew on each call: atexit runs the hook registered last first,
    and each one once."""
    atexit.unregister(_kill_workers)
    atexit.register(_kill_workers)


def _kill_workers() -> None:
    """Kill the children this process started through multiprocessing: in a trainer, only its data-loader workers,
    which hold nothing to save. Torch's SIGCHLD handler, which raises when a worker dies, is put back first."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        child.kill()
        child.join(5)


def _exit_when_gone(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (not Linux 5.3+), or the trainer is gone already
        while _alive(pid):
            time.sleep(1.0)
    else:
        select.select([pidfd], [], [])  # a pidfd becomes readable when its process exits
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but is not ours to signal
        pass
    return True

"""Evaluation: PSNR/SSIM (RGB and Y) per image and averaged, for trained models and for the
bicubic and Lanczos baselines, on cg-dev, the scene renderer's validation split and any folder.

Every model is evaluated the way it works: a student on the LR image, a TA on its mixed input
(which needs its teacher's CF' of the HR image), a teacher on the HR image.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models import (
    Teacher,
    TeacherOutput,
    count_macs,
    count_parameters,
    load_checkpoint,
    min_lr_size,
    read_metadata,
    weights_sha256,
)
from training.config import Config, EvalConfig
from training.data import DataConfig, SourceConfig, build_eval_dataset, default_eval_dir, to_tensor, to_uint8
from training.data.images import scan_images, write_json_atomic
from training.data.paths import shared_hint
from training.distill import mixed_input
from training.memory import out_of_memory_reason
from training.metrics import image_metrics
from upscaler_server.files import is_stream, written_file  # standard library only (docs/architecture.md)

__all__ = [
    "BUILTIN_SETS",
    "EvalImage",
    "Predictor",
    "baseline_predictors",
    "builtin_sets_config",
    "check_output_file",
    "checkpoint_predictor",
    "eval_sets",
    "evaluate",
    "macs_at",
    "min_lr_side",
    "parse_set_names",
    "score_sets",
    "unique_labels",
]

# (1, 3, h, w) LR and (1, 3, H, W) HR in [0, 1] -> (1, 3, H, W) SR
Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METRIC_KEYS = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y")
BUILTIN_SETS = ("cg-dev", "rendered-val", "rendered-val-native")


@dataclass
class EvalImage:
    name: str
    lr: torch.Tensor  # (3, h, w)
    hr: torch.Tensor  # (3, H, W)


@dataclass
class ModelInfo:
    """What the report says about a model besides its scores."""

    params: int = 0
    macs: int = 0  # at the LR input size of the report (the teacher: at the matching HR size)
    role: str = ""
    checkpoint: str = ""


def eval_sets(config: Config, scale: int, min_lr_side: int = 1) -> dict[str, list[EvalImage]]:
    """The evaluation sets named in config.eval, each a list of whole (or centre-cropped) images; folder images
    whose LR side would be below `min_lr_side` (see `min_lr_side`) are skipped with a warning."""
    check_eval_folders(config)
    _check_crop(config.eval.crop, scale, 1)  # the pipeline checked the networks' minimum before training
    base = config.data or DataConfig(sources=[SourceConfig(kind="folder", path=".")], scale=scale)
    wanted: dict[str, SourceConfig] = {}
    if config.eval.cg_dev:
        wanted["cg-dev"] = SourceConfig(kind="folder")
    # rendered at the size cut to a multiple of the scale, as folder images are cropped: 160x96 at x3 is 159x96 (the
    # whole size failed after every stage of a pipeline had trained)
    width, height = (side - side % scale for side in config.eval.rendered_size)
    rendered = (("rendered-val", config.eval.rendered_val, "bicubic"),
                ("rendered-val-native", config.eval.rendered_native, "native"))  # fmt: skip
    for name, asked, lr_kind in rendered:  # the same validation frames, LR by degrade(HR) or rendered at LR size
        if asked:
            wanted[name] = SourceConfig(kind="scenes", width=width, height=height,
                                        frames_per_preset=config.eval.rendered_frames, lr_kind=lr_kind)  # fmt: skip
    folders = [Path(folder).resolve() for folder in config.eval.folders]  # resolved: "." has a name too
    for name, folder in unique_labels(folders, "image folder", keep_suffix=True).items():
        if name in wanted:
            raise ValueError(f"the image folder {folder} would be scored as {name!r}, the name of a built-in set; "
                             "rename the folder or leave that set out")
        wanted[name] = SourceConfig(kind="folder", path=str(folder))
    return {name: list(_images(base, source, scale, config, min_lr_side)) for name, source in wanted.items()}


def check_eval_folders(config: Config, min_lr_side: int | None = None) -> None:
    """FileNotFoundError naming every image folder the evaluation of ``config`` would read and cannot. With
    ``min_lr_side`` (the pipeline, before training) also DatasetError for a folder of the user's that holds no image
    the evaluation could score, so that a run does not train every stage and then fail on its evaluation."""
    folders = [(Path(folder), "") for folder in config.eval.folders]
    if config.eval.cg_dev:
        # a pip user has no shared folder: say how to score without cg-dev too (smoke_cpu failed with no way round)
        folders.insert(0, (default_eval_dir(), f" (cg-dev; {shared_hint()}; or score without it: --set "
                                               "eval.cg_dev=false for a config, --sets or --data for evaluate)"))
    missing = [f"{folder}{' (a file, not a folder)' if folder.exists() else ''}{hint}"
               for folder, hint in folders if not folder.is_dir()]
    if missing:
        raise FileNotFoundError(f"evaluation image folder(s) missing: {'; '.join(missing)}")
    if min_lr_side is not None:  # each image decoded once more; the junk the scan skips is named in its warning
        _check_crop(config.eval.crop, config.experiment.scale, min_lr_side)
        for folder in config.eval.folders:
            scan_images(folder, min_size=config.experiment.scale * max(1, min_lr_side), progress=False)


def unique_labels(paths: list[Path], what: str = "checkpoint", *, keep_suffix: bool = False) -> dict[str, Path]:
    """Short unique names for the tables: each path's stem (its whole name with `keep_suffix`, for folders), with
    as many parent folders in front as it takes to tell apart paths whose names repeat (RUN/STAGE/final in several
    pipeline runs, a/imgs and b/imgs). The same `what` given twice is a ValueError."""
    if len({path.resolve() for path in paths}) != len(paths):
        raise ValueError(f"the same {what} is given twice")
    depths = [0] * len(paths)
    while True:
        labels = [_label(path, depth, keep_suffix) for path, depth in zip(paths, depths, strict=True)]
        repeated = [i for i, label in enumerate(labels) if labels.count(label) > 1]
        if not repeated:
            return dict(zip(labels, paths, strict=True))
        for i in repeated:
            depths[i] += 1


def _label(path: Path, depth: int, keep_suffix: bool) -> str:
    """The stem (or name) of `path` after its last `depth` parent folders (the whole path when it has fewer), and
    one step further the whole path with its suffix (distinct files differ there: plain/mine.safetensors,
    plain/mine.bak)."""
    parents = path.parent.parts
    if depth > len(parents) + 1 or (keep_suffix and depth > len(parents)):
        return str(path)
    if depth > len(parents):
        return str(path.with_suffix(""))
    return "/".join([*parents[len(parents) - depth :], path.name if keep_suffix else path.stem])


def min_lr_side(paths: list[str | Path]) -> int:
    """The smallest LR side every checkpoint in `paths` accepts (RLFN's and RFDN's ESA pool a 15-pixel window)."""
    return max([1, *(min_lr_size(load_checkpoint(path).model) for path in paths)])


def parse_set_names(text: str) -> list[str]:
    """A --sets argument of the scripts: comma-separated, empty items ignored; naming no set at all is refused (it
    would score nothing). argparse's ArgumentTypeError, so the refusal is a usage error (status 2)."""
    names = [name for name in text.split(",") if name]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no set; built-in sets: {', '.join(BUILTIN_SETS)}")
    return names


def builtin_sets_config(names: list[str] | None, folders: list[Path], rendered_frames: int = 2) -> EvalConfig:
    """The evaluation config that scores the built-in sets `names` (of BUILTIN_SETS; None: cg-dev, unless there are
    `folders`) and the image `folders`. Raises ValueError naming any unknown set, so a command can refuse before it
    does any work."""
    if names is None:
        names = [] if folders else ["cg-dev"]
    unknown = sorted(set(names) - set(BUILTIN_SETS))
    if unknown:
        raise ValueError(f"unknown set(s) {unknown}; built-in sets: {', '.join(BUILTIN_SETS)}")
    return EvalConfig(
        cg_dev="cg-dev" in names, rendered_val="rendered-val" in names,
        rendered_native="rendered-val-native" in names, rendered_frames=rendered_frames,
        folders=[str(folder) for folder in folders],
    )  # fmt: skip


def score_sets(
    predictors: dict[str, Predictor], eval_config: EvalConfig, scale: int, json_path: Path | None = None,
    min_lr_side: int = 1, weights: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Every predictor on every set of `eval_config`: prints each set's means and returns {set: scores} (the
    layout of `evaluate`), also written to `json_path` when given (checked first: scoring cg-dev takes minutes).
    `weights` ({label: weights_sha256 of its checkpoint}) is kept beside each label's scores in every set, so that
    ship-checkpoint can tell a checkpoint trained again since from the one scored."""
    if json_path:
        check_output_file(json_path, "the scores")
    results = {}
    for set_name, images in eval_sets(Config(eval=eval_config), scale, min_lr_side).items():
        scores, _ = evaluate(predictors, images, scale)
        for label, digest in (weights or {}).items():
            scores[label]["weights_sha256"] = digest
        results[set_name] = scores
        print(f"{set_name} ({len(images)} images), mean:")
        for name, result in scores.items():
            print(f"  {name:24s} " + "  ".join(f"{k} {v:.4f}" for k, v in result["mean"].items()))
    if json_path:
        write_json_atomic(json_path, results, indent=2, sort_keys=False)
    return results


def check_output_file(path: Path, what: str) -> None:
    """ValueError when `what` cannot be written to `path` (a folder, or in a folder that is missing or read-only),
    so that a command refuses before its work rather than lose it at the end. A link counts by the folder it leads
    to, unless another user planted it in a shared folder such as /tmp (not written through: write_bytes_atomic);
    /dev/stdout, /dev/null or a FIFO needs only to be writable itself (written into)."""
    if is_stream(path):
        if not os.access(path, os.W_OK):
            raise ValueError(f"cannot write {what} to {path}: it is not writable")
        return
    try:
        folder = written_file(path).parent
    except PermissionError as exc:
        raise ValueError(f"cannot write {what}: {exc}") from None
    if path.is_dir():
        raise ValueError(f"cannot write {what} to {path}: it is a folder; give a file name")
    if not folder.is_dir():
        raise ValueError(f"cannot write {what} to {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {what} to {path}: the folder {folder} is not writable")


def _images(
    base: DataConfig, source: SourceConfig, scale: int, config: Config, min_lr_side: int
) -> Iterator[EvalImage]:
    dataset = build_eval_dataset(dataclasses.replace(base, eval=source, scale=scale), scale, min_lr_side,
                                 progress=config.runtime.progress)
    count = len(dataset) if not config.eval.max_images else min(len(dataset), config.eval.max_images)
    for index in range(count):
        item = dataset[index]
        yield _center_crop(EvalImage(item["name"], item["lr"], item["hr"]), config.eval.crop, scale)


def _check_crop(crop: int, scale: int, min_lr_side: int) -> None:
    """ValueError for an eval.crop whose LR side (crop // scale) is below what the networks take (0: no crop)."""
    if crop and crop // scale < max(1, min_lr_side):
        raise ValueError(f"eval.crop {crop} is too small: the networks need HR crops of at least "
                         f"{scale * max(1, min_lr_side)} px at x{scale} (0 scores whole frames)")


def _center_crop(image: EvalImage, crop: int, scale: int) -> EvalImage:
    if not crop:
        return image
    lr_crop = crop // scale
    h, w = image.lr.shape[-2:]
    top, left = max(0, (h - lr_crop) // 2), max(0, (w - lr_crop) // 2)
    lr = image.lr[:, top : top + lr_crop, left : left + lr_crop]
    hr = image.hr[:, top * scale : (top + lr_crop) * scale, left * scale : (left + lr_crop) * scale]
    return EvalImage(image.name, lr, hr)


def baseline_predictors(scale: int) -> dict[str, Predictor]:
    """Bicubic and Lanczos-4 upscaling of the 8-bit LR image (OpenCV)."""

    def resize_with(interpolation: int) -> Predictor:
        def predict(lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
            lr_u8 = to_uint8(lr[0].cpu())  # (h, w, 3)
            size = (lr_u8.shape[1] * scale, lr_u8.shape[0] * scale)
            return to_tensor(cv2.resize(lr_u8, size, interpolation=interpolation)).unsqueeze(0)

        return predict

    return {"bicubic": resize_with(cv2.INTER_CUBIC), "lanczos": resize_with(cv2.INTER_LANCZOS4)}


class _TeacherRun:
    """A teacher run at most once per HR image: the teacher's row and the TA's CF' share the output."""

    def __init__(self, model: Teacher, device: torch.device) -> None:
        self.model, self.device = model, device
        self._hr: torch.Tensor | None = None
        self._output: TeacherOutput | None = None

    def __call__(self, hr: torch.Tensor) -> TeacherOutput:
        if hr is not self._hr:
            self._hr, self._output = hr, self.model(_to(hr, self.device))
        return self._output


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # channels_last runs these convolutions about twice as fast with oneDNN on the CPU
    return x.to(device).contiguous(memory_format=torch.channels_last)


def _load_for_eval(path: str | Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    checkpoint = load_checkpoint(path, device=device)
    return checkpoint.model.to(memory_format=torch.channels_last), checkpoint.metadata


_TEACHER_RUNS: dict[tuple[str, str], _TeacherRun] = {}


def _teacher_run(path: str | Path, device: torch.device) -> _TeacherRun:
    key = (str(Path(path).resolve()), str(device))
    if key not in _TEACHER_RUNS:
        model, metadata = _load_for_eval(path, device)
        if not isinstance(model, Teacher):
            raise ValueError(f"{path} is not a teacher checkpoint (it is a {metadata['role']}, {metadata['arch']})")
        _TEACHER_RUNS[key] = _TeacherRun(model, device)
    return _TEACHER_RUNS[key]


def checkpoint_predictor(path: str | Path, device: torch.device, teacher_path: str | Path | None = None) -> Predictor:
    """A trained model as a predictor; a TA also needs the teacher whose CF' it mixes in."""
    metadata = read_metadata(path)
    if metadata["arch"].endswith("_teacher"):
        run = _teacher_run(path, device)
        return lambda lr, hr: run(hr).image
    model, _ = _load_for_eval(path, device)
    mix = metadata["training"].get("mix") if metadata["role"] == "ta" else None
    if mix is None:
        return lambda lr, hr: model(_to(lr, device))
    if teacher_path is None:
        raise ValueError(f"{path} is a TA: evaluating it needs its teacher's checkpoint (--teacher FILE)")
    _refuse_another_teacher(path, metadata["training"], teacher_path)
    teacher = _teacher_run(teacher_path, device)
    return lambda lr, hr: model(mixed_input(teacher(hr).cf_prime, _to(lr, device), tuple(mix)))


def _refuse_another_teacher(path: str | Path, training: dict[str, Any], teacher_path: str | Path) -> None:
    """ValueError when a TA recorded the weights of the teacher it learnt from (training.inputs_sha256: its
    init_from, then its guides, the teacher first) and `teacher_path` holds others: it was scored quietly with
    another teacher's CF' (23.44 dB against 26.27 with its own). A TA that recorded none (the bundled one among
    them) is checked by the names both record: its run and guide stage against the teacher's run and stage."""
    recorded = training.get("inputs_sha256")
    if not isinstance(recorded, list) or len(recorded) < 2 or not isinstance(recorded[1], str) or not recorded[1]:
        _refuse_another_teacher_by_name(path, training, teacher_path)
        return
    given = weights_sha256(teacher_path)
    if given != recorded[1]:
        guide = (training.get("guides") or ["?"])[0]
        raise ValueError(f"{path} is a TA trained with another teacher ({guide!r}, weights sha256 "
                         f"{recorded[1][:12]}...) than {teacher_path} (sha256 {given[:12]}...): give the teacher it "
                         "was trained with as --teacher")


def _refuse_another_teacher_by_name(path: str | Path, ta_training: dict[str, Any], teacher_path: str | Path) -> None:
    """For a TA without weight hashes: ValueError when the teacher records another run or stage than the TA's run
    and first guide (`--teacher rlfn_teacher_continuous_x2` for the bundled TA: stage teacher_continuous of its run,
    not teacher). A teacher that records neither is taken on trust, as before."""
    teacher_training = read_metadata(teacher_path)["training"]
    wanted = (ta_training.get("run"), (ta_training.get("guides") or [None])[0])
    given = (teacher_training.get("run"), teacher_training.get("stage"))
    if None in wanted or None in given or wanted == given:
        return
    raise ValueError(f"{path} is a TA trained with another teacher (stage {wanted[1]!r} of run {wanted[0]!r}) than "
                     f"{teacher_path} (stage {given[1]!r} of run {given[0]!r}): give the teacher it was trained with "
                     "as --teacher")


def model_info(path: str | Path, lr_size: tuple[int, int]) -> ModelInfo:
    checkpoint = load_checkpoint(path)
    model: nn.Module = checkpoint.model
    return ModelInfo(count_parameters(model), macs_at(model, lr_size), checkpoint.metadata["role"], str(path))


def macs_at(model: nn.Module, lr_size: tuple[int, int]) -> int:
    """MACs for an LR input of `lr_size` (width, height); a teacher's at the matching HR size, which it reads."""
    width, height = lr_size
    if isinstance(model, Teacher):
        width, height = width * model.scale, height * model.scale
    return count_macs(model, height, width)


@torch.no_grad()
def evaluate(
    predictors: dict[str, Predictor], images: list[EvalImage], scale: int, keep_crops: int = 0, progress: bool = True
) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    """Scores of every predictor on every image: {model: {"per_image": {name: metrics}, "mean": metrics}},
    plus uint8 crops (for the side-by-side figure) of the first `keep_crops` images, ground truth under "GT".
    Image names must be unique (ValueError): per-image scores are keyed by them."""
    _refuse_repeated_names(images)
    results: dict[str, Any] = {name: {"per_image": {}} for name in predictors}
    crops: dict[str, list[np.ndarray]] = {name: [] for name in [*predictors, "GT"]}
    for index, image in enumerate(tqdm(images, desc="evaluate", unit="image", leave=False, disable=not progress)):
        region = _detail_region(image.hr) if index < keep_crops else None
        if region is not None:
            crops["GT"].append(to_uint8(image.hr[region]))
        for name, predict in predictors.items():
            sr = _predict_within_memory(name, predict, image).float()[0].cpu()  # (3, H, W)
            if not bool(torch.isfinite(sr).all()):  # NaN passes clamp and every metric: scores of NaN, invalid JSON
                raise ValueError(f"{name} gives NaN or infinite values on {image.name}: its weights overflow float32 "
                                 "(a damaged file, or a training that diverged); nothing was scored")
            sr = sr.clamp(0, 1)
            results[name]["per_image"][image.name] = image_metrics(sr, image.hr, scale)
            if region is not None:
                crops[name].append(to_uint8(sr[region]))
    for scores in results.values():
        per_image = [scores["per_image"][image.name] for image in images]  # one entry per image scored
        scores["mean"] = {key: float(np.mean([m[key] for m in per_image])) for key in METRIC_KEYS}
    return results, crops


def _predict_within_memory(name: str, predict: Predictor, image: EvalImage) -> torch.Tensor:
    """predict(lr, hr) of one image (a batch of one), with an image too large for the device's memory as one error
    naming the model and the image, instead of the allocator's traceback."""
    try:
        return predict(image.lr.unsqueeze(0), image.hr.unsqueeze(0))
    except RuntimeError as exc:
        if (reason := out_of_memory_reason(exc)) is None:
            raise
        height, width = image.hr.shape[-2:]
        raise ValueError(f"{name} on {image.name} ({width}x{height}) does not fit in memory: {reason}; nothing "
                         "was scored (smaller images need less: a pipeline's eval.crop crops them)") from None


def _refuse_repeated_names(images: list[EvalImage]) -> None:
    seen: set[str] = set()
    for image in images:
        if image.name in seen:
            raise ValueError(f"two evaluation images are named {image.name!r}: their scores would merge")
        seen.add(image.name)


def _detail_region(hr: torch.Tensor, size: int = 96) -> tuple[slice, slice, slice]:
    """The size x size window with the most high-frequency energy (where upscalers differ most)."""
    grey = hr.mean(dim=0)
    detail = (grey[1:, :] - grey[:-1, :]).abs()[:, :-1] + (grey[:, 1:] - grey[:, :-1]).abs()[:-1, :]
    size = min(size, *detail.shape)
    energy = torch.nn.functional.avg_pool2d(detail[None, None], size, stride=size // 2)[0, 0]
    row, col = divmod(int(torch.argmax(energy)), energy.shape[1])
    top, left = row * (size // 2), col * (size // 2)
    return slice(None), slice(top, top + size), slice(left, left + size)

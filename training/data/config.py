"""The data part of a training config: typed dataclasses, strict parsing, and the dataset factories."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from training.data.augment import AugmentConfig
from training.data.datasets import FrameDataset, PatchDataset
from training.data.images import MANIFEST_NAME, DatasetError, walk_dataset
from training.data.paths import default_eval_dir
from training.data.povray import refuse_reserved
from training.data.sources import FolderSource, LrKind, SceneSource

__all__ = ["DataConfig", "SourceConfig", "build_eval_dataset", "build_train_dataset", "drop_none",
           "known_fields"]


@dataclass
class SourceConfig:
    """One source of frames."""

    kind: Literal["folder", "scenes"]
    path: str | None = None  # folder: the image folder (recursive); for evaluation, None means cg-dev
    weight: float = 1.0  # training: relative share of patches drawn from this source
    lr_kind: LrKind = "bicubic"  # "native" (LR rendered at LR size) exists only for scenes
    presets: list[str] | None = None  # scenes: renderer presets, None for all
    supersample: int = 2  # scenes: HR rendered with k x k samples per pixel
    width: int = 1920  # scenes: HR frame size (patches are cropped from whole frames)
    height: int = 1080
    frames_per_preset: int = 64  # scenes: distinct times t per preset (fixed, see sources.scene_times)
    cache_dir: str | None = None  # scenes: keep rendered frames here as PNG (None: render on the fly)

    def __post_init__(self) -> None:
        if self.kind not in ("folder", "scenes"):
            raise ValueError(f"source kind must be 'folder' or 'scenes', got {self.kind!r}")
        if self.lr_kind not in ("bicubic", "native"):
            raise ValueError(f"lr_kind must be 'bicubic' or 'native', got {self.lr_kind!r}")
        if self.kind == "folder" and self.lr_kind == "native":
            raise ValueError("a folder source has no native LR (only rendered scenes do): use lr_kind 'bicubic'")
        if self.weight <= 0 or self.supersample < 1 or self.frames_per_preset < 1:
            raise ValueError("weight must be > 0, supersample and frames_per_preset >= 1")


@dataclass
class DataConfig:
    """Data for one training run. `scale` and `seed` may be overridden by the factories' arguments. `seed` None
    (the default) means: the training run's own seed (the trainer passes runtime.seed)."""

    sources: list[SourceConfig]
    scale: int = 2
    seed: int | None = None
    patch_size: int = 192  # HR patch side; the LR patch is patch_size / scale
    length: int = 16000  # patches per epoch (the dataset's virtual length; see EpochSampler)
    patches_per_image: int = 4  # consecutive patches cropped from one frame (fewer decodes and renders)
    cache_mb: int = 256  # per-process cache of decoded or rendered frames, per source
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: SourceConfig = field(default_factory=lambda: SourceConfig(kind="folder"))

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("data.sources must list at least one source")
        for name in ("scale", "seed", "patch_size", "length", "patches_per_image", "cache_mb"):
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
                raise ValueError(f"data.{name} must be a positive int, got {value!r}")
        if self.patch_size % self.scale:
            raise ValueError(f"data.patch_size {self.patch_size} is not a multiple of data.scale {self.scale}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataConfig":
        """Build from plain data (a parsed TOML/YAML table); unknown keys raise ValueError at every level."""
        top = known_fields(cls, data, "data")
        if "sources" not in top:
            raise ValueError("data.sources is required (a list of source tables)")
        top["sources"] = [_source(s, f"data.sources[{i}]") for i, s in enumerate(top["sources"])]
        if "eval" in top:
            top["eval"] = _source(top["eval"], "data.eval")
        if "augment" in top:
            augment = known_fields(AugmentConfig, top["augment"], "data.augment")
            if "blend_alpha" in augment:
                augment["blend_alpha"] = tuple(augment["blend_alpha"])
            top["augment"] = AugmentConfig(**augment)
        return cls(**top)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for saving the resolved config beside a run; None fields are left out (TOML has no null,
        and from_dict gives them back as their default, None)."""
        return drop_none(dataclasses.asdict(self))


def drop_none(value: Any) -> Any:
    """`value` without the None fields of its tables, for TOML, which has no null (None fields are the defaults)."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [drop_none(v) for v in value]
    return value


def known_fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """`data` as keyword arguments for the dataclass `cls`; a ValueError names any unknown key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a table, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return dict(data)


def _source(data: Any, where: str) -> SourceConfig:
    fields = known_fields(SourceConfig, data, where)
    if "kind" not in fields:
        raise ValueError(f"{where}.kind is required ('folder' or 'scenes')")
    return SourceConfig(**fields)


def refuse_evaluation_data(folder: Path) -> None:
    """DatasetError when training on `folder` would train on evaluation data: the cg-dev frames (the folder is
    cg-dev, holds it, or reaches into it, also through a linked folder), or POV-Ray renders of reserved scenes
    (named by a povray manifest in any folder the scan reads). Walks the folder as the scan does."""
    eval_dir = default_eval_dir().resolve()
    if folder.resolve() in eval_dir.parents:
        raise DatasetError(f"{folder} holds the evaluation frames {eval_dir}: never train on them")
    for reached, real, names in walk_dataset(folder):
        if real == eval_dir or eval_dir in real.parents:
            raise DatasetError(f"{reached} is the evaluation frames {eval_dir} or lies in them: never train on them")
        if MANIFEST_NAME in names:
            _refuse_reserved_renders(reached / MANIFEST_NAME)


def _refuse_reserved_renders(manifest_path: Path) -> None:
    """DatasetError when `manifest_path` is a povray manifest that lists a reserved scene."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not a data command's record: its folder's images are scanned like any others
    scenes = manifest.get("scenes") if isinstance(manifest, dict) and "failed" in manifest else None
    if isinstance(scenes, dict):  # `python -m training.data povray` output
        try:
            refuse_reserved(list(scenes))
        except ValueError as exc:
            raise DatasetError(f"{manifest_path.parent} holds renders of scenes {exc}") from None


def _build_source(
    cfg: SourceConfig, scale: int, min_size: int, split: Literal["train", "val"], cache_mb: int,
    progress: bool = True,
) -> FolderSource | SceneSource:  # fmt: skip
    if cfg.kind == "folder":
        if cfg.path is None:
            raise DatasetError("a training folder source needs a path")
        if split == "train":
            refuse_evaluation_data(Path(cfg.path))
        return FolderSource(cfg.path, min_size, cache_mb=cache_mb, progress=progress)
    if min(cfg.width, cfg.height) < min_size:
        raise DatasetError(f"scene frames {cfg.width}x{cfg.height} are smaller than the {min_size}px patch")
    return SceneSource(
        cfg.presets, split, width=cfg.width, height=cfg.height, scale=scale, lr_kind=cfg.lr_kind,
        supersample=cfg.supersample, frames_per_preset=cfg.frames_per_preset, cache_dir=cfg.cache_dir,
        cache_mb=cache_mb,
    )  # fmt: skip


def build_train_dataset(
    cfg: DataConfig, scale: int | None = None, seed: int | None = None, *, progress: bool = True
) -> PatchDataset:
    """The training patches of `cfg` (scenes sources use the training times only); `progress` shows the
    folder scans' progress bars (off for runs that log to a file)."""
    scale = cfg.scale if scale is None else scale
    sources = [_build_source(s, scale, cfg.patch_size, "train", cfg.cache_mb, progress) for s in cfg.sources]
    return PatchDataset(
        sources, [s.weight for s in cfg.sources], scale=scale, patch_size=cfg.patch_size, augment=cfg.augment,
        seed=(cfg.seed or 0) if seed is None else seed, length=cfg.length, patches_per_image=cfg.patches_per_image,
    )  # fmt: skip


def build_eval_dataset(cfg: DataConfig, scale: int | None = None, min_lr_side: int = 1) -> Dataset:
    """Whole evaluation frames of `cfg.eval`: a folder (default: the cg-dev frames) or the scenes' validation
    times, which are disjoint from the training times. Folder images whose LR image would be smaller than
    `min_lr_side` (what the models to be scored accept) are skipped with a warning, like other unusable files."""
    scale = cfg.scale if scale is None else scale
    source_cfg = cfg.eval
    if source_cfg.kind == "folder" and source_cfg.path is None:
        source_cfg = dataclasses.replace(source_cfg, path=str(default_eval_dir()))
    return FrameDataset(_build_source(source_cfg, scale, scale * max(1, min_lr_side), "val", cfg.cache_mb), scale)

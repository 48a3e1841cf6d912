"""The data part of a training config: typed dataclasses, strict parsing, and the dataset factories."""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from training.data.augment import AugmentConfig
from training.data.datasets import FrameDataset, PatchDataset
from training.data.guards import refuse_evaluation_data
from training.data.images import DatasetError
from training.data.paths import default_eval_dir
from training.data.sources import FolderSource, LrKind, SceneSource

__all__ = ["DataConfig", "SourceConfig", "build_eval_dataset", "build_train_dataset", "drop_none",
           "known_fields", "typed_value"]


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
    # the source's key in the config ("data.sources[1]"), for messages that name the wrong key; not a field
    where: dataclasses.InitVar[str] = "source"

    def __post_init__(self, where: str) -> None:
        if self.kind not in ("folder", "scenes"):
            raise ValueError(f"{where}.kind must be 'folder' or 'scenes', got {self.kind!r}")
        if self.lr_kind not in ("bicubic", "native"):
            raise ValueError(f"{where}.lr_kind must be 'bicubic' or 'native', got {self.lr_kind!r}")
        if self.kind == "folder" and self.lr_kind == "native":
            raise ValueError(f"{where}.lr_kind: a folder source has no native LR (only rendered scenes do): use "
                             "'bicubic'")
        if not 0 < self.weight < math.inf:  # `not` for NaN
            raise ValueError(f"{where}.weight must be a finite number > 0, got {self.weight!r}")
        for name in ("supersample", "frames_per_preset", "width", "height"):  # width -160: "smaller than the patch"
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)!r}")


@dataclass
class DataConfig:
    """Data for one training run. `scale` and `seed` may be overridden by the factories' arguments. `seed` None
    (the default) means: the training run's own seed (the trainer passes runtime.seed)."""

    sources: list[SourceConfig]
    scale: int = 2
    seed: int | None = None
    patch_size: int = 192  # HR patch side; the LR patch is patch_size / scale
    # the dataset's virtual length (len(), EpochSampler's epoch). `train` ignores it: each step draws new patches
    # (StepBatchSampler), and a run's length is optim.steps
    length: int = 16000
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
        for index, source in enumerate(self.sources):  # a scene frame is rendered at HR size and cut to LR exactly
            if source.kind == "scenes" and (source.width % self.scale or source.height % self.scale):
                raise ValueError(f"data.sources[{index}] width x height {source.width}x{source.height} is not a "
                                 f"multiple of data.scale {self.scale}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataConfig":
        """Build from plain data (a parsed TOML/YAML table); unknown keys raise ValueError at every level."""
        top = known_fields(cls, data, "data")
        if "sources" not in top:
            raise ValueError("data.sources is required (a list of source tables)")
        if not isinstance(top["sources"], list):
            raise ValueError(f"data.sources must be a list of source tables, got {top['sources']!r}")
        top["sources"] = [_source(s, f"data.sources[{i}]") for i, s in enumerate(top["sources"])]
        if "eval" in top:
            top["eval"] = _source(top["eval"], "data.eval")
        if "augment" in top:
            top["augment"] = AugmentConfig(**_typed_fields(AugmentConfig, top["augment"], "data.augment"))
        hints = typing.get_type_hints(cls)
        scalars = {key: typed_value(value, hints[key], f"data.{key}") for key, value in top.items()
                   if key not in ("sources", "eval", "augment")}  # fmt: skip
        return cls(**{**top, **scalars})

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
    fields = _typed_fields(SourceConfig, data, where)
    if "kind" not in fields:
        raise ValueError(f"{where}.kind is required ('folder' or 'scenes')")
    return SourceConfig(**fields, where=where)


def _typed_fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """`known_fields`, each value checked against its field's annotation."""
    hints = typing.get_type_hints(cls)
    return {key: typed_value(value, hints[key], f"{where}.{key}")
            for key, value in known_fields(cls, data, where).items()}  # fmt: skip


def typed_value(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against a config field's annotation, naming `key` (an int where a float is wanted becomes a
    float, a list where a tuple is wanted a tuple), so that a wrong type is refused when the config is read rather
    than crash in training. Literal values are left to the dataclasses' own checks, which list the choices."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # `str | None`: None, else the other type
        if value is None:
            return None
        (hint,) = [arg for arg in args if arg is not type(None)]
        return typed_value(value, hint, key)
    if origin is dict:  # free-form tables (experiment.extra_args): checked where they are used
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a table, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        if origin is tuple and len(value) != len(args):
            raise ValueError(f"{key} must be a list of {len(args)} values, got {value!r}")
        items = args if origin is tuple else args * len(value)
        pairs = enumerate(zip(value, items, strict=True))
        return origin(typed_value(v, item, f"{key}[{i}]") for i, (v, item) in pairs)
    return _scalar(value, hint, key)


def _scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):  # TOML has nan and inf; a NaN passes every `<` check after this one
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def _build_source(
    cfg: SourceConfig, scale: int, min_size: int, split: Literal["train", "val"], cache_mb: int,
    progress: bool = True,
) -> FolderSource | SceneSource:  # fmt: skip
    if cfg.kind == "folder":
        if cfg.path is None:
            raise DatasetError("a training folder source needs a path")
        if split == "train":
            refuse_evaluation_data(Path(cfg.path))
        if not Path(cfg.path).is_dir():  # the usual first-run mistake: the data command has not been run yet
            raise DatasetError(
                f"training image folder {cfg.path} does not exist or is not a folder: render one with `python -m "
                f"training.data povray --out {cfg.path}` (docs/data.md, 'Making a training set'), or point this "
                "data.sources entry's path at a folder of HR images"
            )
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


def build_eval_dataset(cfg: DataConfig, scale: int | None = None, min_lr_side: int = 1, *,
                       progress: bool = True) -> Dataset:
    """Whole evaluation frames of `cfg.eval`: a folder (default: the cg-dev frames) or the scenes' validation
    times, which are disjoint from the training times. Folder images whose LR image would be smaller than
    `min_lr_side` (what the models to be scored accept) are skipped with a warning, like other unusable files;
    `progress` shows a folder scan's progress bar."""
    scale = cfg.scale if scale is None else scale
    source_cfg = cfg.eval
    if source_cfg.kind == "folder" and source_cfg.path is None:
        source_cfg = dataclasses.replace(source_cfg, path=str(default_eval_dir()))
    source = _build_source(source_cfg, scale, scale * max(1, min_lr_side), "val", cfg.cache_mb, progress)
    return FrameDataset(source, scale)

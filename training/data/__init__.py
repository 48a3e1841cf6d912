"""Training and evaluation data: the canonical degradation, image folders, scene renders, POV-Ray renders.

Values are float32 RGB in [0, 1], (3, H, W); uint8 only in files. See docs/data.md.
"""

from training.data.augment import AugmentConfig, AugmentParams, apply_geometry, blend, sample_augment
from training.data.config import DataConfig, SourceConfig, build_eval_dataset, build_train_dataset
from training.data.datasets import (
    EpochSampler,
    FrameDataset,
    PatchDataset,
    end_workers_at_exit,
    exit_with_trainer,
    worker_start_method,
)
from training.data.degrade import degrade, downscale_bicubic, quantize_8bit
from training.data.images import (
    DatasetError,
    ImageReadError,
    SkippedFilesWarning,
    file_sha256,
    read_image,
    scan_images,
    to_tensor,
    to_uint8,
    write_json_atomic,
    write_png,
)
from training.data.paths import default_eval_dir, reserved_scenes, shared_dir
from training.data.povray import load_scene_list, render_scenes
from training.data.scenes_cmd import write_scene_frames
from training.data.sources import FolderSource, SceneSource, loop_period, scene_times

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "DataConfig",
    "DatasetError",
    "EpochSampler",
    "FolderSource",
    "FrameDataset",
    "ImageReadError",
    "PatchDataset",
    "SceneSource",
    "SkippedFilesWarning",
    "SourceConfig",
    "apply_geometry",
    "blend",
    "build_eval_dataset",
    "build_train_dataset",
    "default_eval_dir",
    "degrade",
    "downscale_bicubic",
    "end_workers_at_exit",
    "exit_with_trainer",
    "file_sha256",
    "load_scene_list",
    "loop_period",
    "quantize_8bit",
    "read_image",
    "render_scenes",
    "reserved_scenes",
    "sample_augment",
    "scan_images",
    "scene_times",
    "shared_dir",
    "to_tensor",
    "to_uint8",
    "worker_start_method",
    "write_json_atomic",
    "write_png",
    "write_scene_frames",
]

"""Typed experiment configuration, read from small TOML files in training/configs/.

One file describes an experiment (the family, widths, schedule, data, evaluation); `pipeline` derives
every stage from it, and `train` trains the one stage named in its `[stage]` table. Unknown keys are
errors at every level; `--set section.key=value` overrides any field (the value is read as TOML,
falling back to a plain string). The resolved config is saved beside each run as config.toml.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from training.data import DataConfig
from training.data.config import known_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "Config",
    "EvalConfig",
    "ExperimentConfig",
    "LossConfig",
    "OptimConfig",
    "RuntimeConfig",
    "StageConfig",
    "apply_overrides",
    "dump_toml",
    "load_config",
]

ROLES = ("teacher", "ta", "student")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    family: str = "rlfn"  # decoder family: rlfn | rfdn | pan
    scale: int = 2
    channels: int = 52  # decoder width, the same for teacher, TAs and student
    teacher_blocks: int = 6
    ta_blocks: list[int] = field(default_factory=lambda: [3])  # one entry per TA, highest first (dense guidance)
    student_blocks: int = 1
    encoder_channels: int = 56
    mix: list[float] = field(default_factory=lambda: [0.3, 0.7])  # TA input: mix[0] * CF' + mix[1] * X
    extra_args: dict[str, Any] = field(default_factory=dict)  # more build_model overrides (e.g. up_channels for PAN)
    teacher_steps: int = 0  # per-role schedule lengths for the pipeline; 0 = optim.steps
    ta_steps: int = 0
    student_steps: int = 0
    baselines: bool = True  # pipeline: also train PISR' (continuous teacher -> student) and X_s (student alone)


@dataclass
class StageConfig:
    """One stage for `python -m training train` (the pipeline fills these in itself)."""

    name: str = "stage"
    role: str = "student"  # teacher | ta | student
    blocks: int = 0  # 0: by role (teacher_blocks, ta_blocks[0], student_blocks)
    discrete: bool = True  # teachers: 8-bit CF' (TAKDSR) or continuous CF (PISR')
    init_from: str = ""  # a teacher checkpoint to initialise from ("" = random initialisation)
    guides: list[str] = field(default_factory=list)  # frozen higher checkpoints: the teacher first, then TAs
    steps: int = 0  # 0: optim.steps


@dataclass
class OptimConfig:
    steps: int = 1000  # iterations (the data has no fixed epoch)
    batch_size: int = 16
    lr: float = 1e-3  # Adam, decayed by cosine annealing to lr_min over the steps
    lr_min: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.0  # 0 = off


@dataclass
class LossConfig:
    imitation: float = 1e-2  # lambda_T: |X - CF'| in the teacher's loss
    feature: float = 1e-4  # lambda_A / lambda_S: |f_higher - f| per higher model
    output: float = 1.0  # weight of each |Y_higher - Y| term


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | off
    channels_last: bool = True
    compile: bool = False  # torch.compile the trained model
    workers: int = 2  # DataLoader workers per process
    seed: int = 0
    threads: int = 0  # torch CPU threads per process (0 = torch's default)
    log_every: int = 25
    checkpoint_every: int = 500
    # > 0: also keep the network every this many steps as RUN_DIR/snapshots/step_<N>.safetensors (a checkpoint
    # with the step and `partial_of` in its metadata), to evaluate a run part-way; 0: only the final one
    snapshot_every: int = 0
    progress: bool = True
    # > 0: a wall-time budget in seconds: the cosine runs over the budget instead of the steps and
    # the stage ends when it is spent (or at the configured steps, if sooner). The steps done are
    # saved in the checkpoint; for sharing a GPU's time among parallel stages.
    time_budget_s: float = 0.0


@dataclass
class EvalConfig:
    cg_dev: bool = True  # the shared development frames (../shared/data/cg-dev)
    rendered_val: bool = True  # the scene renderer's validation split, LR = degrade(HR) (bicubic)
    rendered_native: bool = False  # the same frames with the LR rendered natively at LR size (engine-like)
    rendered_frames: int = 2  # validation frames per preset
    rendered_size: list[int] = field(default_factory=lambda: [1920, 1080])  # HR width, height
    folders: list[str] = field(default_factory=list)  # any other image folders
    max_images: int = 0  # per set, 0 = all (for smoke runs)
    crop: int = 0  # HR centre crop side, 0 = whole frames (for smoke runs)
    crops_for_figure: int = 3  # side-by-side crops in the report
    latency_repeats: int = 3  # timed forward passes per model at 960x540 LR input (0 = skip)


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    data: DataConfig | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))


_SECTIONS = {
    "experiment": ExperimentConfig,
    "stage": StageConfig,
    "optim": OptimConfig,
    "loss": LossConfig,
    "runtime": RuntimeConfig,
    "eval": EvalConfig,
}


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML experiment file, apply `key=value` overrides, validate."""
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    return from_dict(apply_overrides(raw, overrides or []))


def from_dict(raw: dict[str, Any]) -> Config:
    unknown = sorted(set(raw) - {*_SECTIONS, "data"})
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; known: {sorted({*_SECTIONS, 'data'})}")
    sections = {name: _section(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
    data = DataConfig.from_dict(raw["data"]) if "data" in raw else None
    config = Config(data=data, **sections)
    _validate(config)
    return config


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` (nested keys with dots); the value is parsed as TOML, else kept as a string."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        *parents, leaf = key.strip().split(".")
        table = raw
        for part in parents:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ValueError(f"--set {key}: {part!r} is not a table")
        table[leaf] = _parse_value(key.strip(), text.strip())
    return raw


def _parse_value(key: str, text: str) -> Any:
    """TOML, or else a bare string; an array, table or quoted string that is not valid TOML is an error
    (e.g. an inline table broken over two lines), not a string that fails later with a puzzling message."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError as exc:
        if text[:1] in ('[', '{', '"', "'"):
            raise ValueError(f"--set {key}: {text!r} is not a valid TOML value ({exc})") from None
        return text


def _section(cls: type, values: Any, name: str) -> Any:
    return cls(**known_fields(cls, values, f"[{name}]"))


def _validate(config: Config) -> None:
    exp, stage = config.experiment, config.stage
    if stage.role not in ROLES:
        raise ValueError(f"stage.role must be one of {ROLES}, got {stage.role!r}")
    if exp.scale not in (2, 3, 4):
        raise ValueError(f"experiment.scale must be 2, 3 or 4, got {exp.scale}")
    if len(exp.mix) != 2:
        raise ValueError(f"experiment.mix must be two weights [lambda1, lambda2], got {exp.mix}")
    if sorted(exp.ta_blocks, reverse=True) != exp.ta_blocks or any(b < 1 for b in exp.ta_blocks):
        raise ValueError(f"experiment.ta_blocks must be positive and decreasing, got {exp.ta_blocks}")
    if config.optim.steps < 1 or config.optim.batch_size < 1:
        raise ValueError("optim.steps and optim.batch_size must be >= 1")
    if config.runtime.amp not in ("auto", "bf16", "off"):
        raise ValueError(f"runtime.amp must be auto, bf16 or off, got {config.runtime.amp!r}")
    if config.runtime.checkpoint_every < 1 or config.runtime.snapshot_every < 0:
        raise ValueError("runtime.checkpoint_every must be >= 1 and runtime.snapshot_every >= 0 (0: none)")
    if config.runtime.time_budget_s < 0:
        raise ValueError("runtime.time_budget_s must be >= 0 (0: no budget)")
    if config.data is not None and config.data.scale != exp.scale:
        raise ValueError(f"data.scale {config.data.scale} != experiment.scale {exp.scale}")


def _drop_none(value: Any) -> Any:
    # TOML has no null: fields left at None are simply omitted (they are the defaults).
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def dump_toml(value: dict[str, Any]) -> str:
    return tomli_w.dumps(value)

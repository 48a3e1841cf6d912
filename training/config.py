"""Typed experiment configuration, read from small TOML files in training/configs/.

One file describes an experiment (the family, widths, schedule, data, evaluation); `pipeline` derives
every stage from it, and `train` trains the one stage named in its `[stage]` table. Unknown keys are
errors at every level; `--set section.key=value` overrides any field (the value is read as TOML,
falling back to a plain string). The resolved config is saved beside each run as config.toml.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from models.checkpoint import resolve_checkpoint
from models.registry import FAMILIES
from training.data import DataConfig
from training.data.config import drop_none, known_fields, typed_value

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
    "config_from_toml",
    "differing_keys",
    "dump_toml",
    "load_config",
    "resolve_config",
]

ROLES = ("teacher", "ta", "student")
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # the bundled configs (installed with the package)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    family: str = "rlfn"  # decoder family: rlfn | rfdn | pan, or one added with models.register_family
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
    # pipeline: also train the full backbone (teacher_blocks, on X, alone, teacher_steps): the paper's upper reference
    full_reference: bool = False


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
        return drop_none(dataclasses.asdict(self))


_SECTIONS = {
    "experiment": ExperimentConfig,
    "stage": StageConfig,
    "optim": OptimConfig,
    "loss": LossConfig,
    "runtime": RuntimeConfig,
    "eval": EvalConfig,
}


def resolve_config(path: str | Path) -> Path:
    """`path` itself when it exists; else a bundled config it names: `smoke_cpu`, with or without `.toml`, or
    `training/configs/<name>` read from outside a checkout (an installed package has no such folder beside you).
    Anything else comes back unchanged, for the caller to report as missing."""
    given = Path(path)
    bare = given.parent == Path(".")
    relative_to_checkout = given.parts[-3:-1] == ("training", "configs") and not given.is_absolute()
    if given.exists() or not (bare or relative_to_checkout):
        return given
    bundled = CONFIGS_DIR / f"{given.name.removesuffix('.toml')}.toml"
    return bundled if bundled.is_file() else given


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML experiment file (or a bundled one by name: `resolve_config`), apply `key=value` overrides,
    validate."""
    path = resolve_config(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        bundled = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.toml")))
        raise FileNotFoundError(f"config {path} not found; a path to a TOML file, or a bundled config by name "
                                f"({bundled})") from None
    try:
        text = data.decode("utf-8")  # TOML is UTF-8: a file that is not is refused, as tomllib.load did
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a valid TOML file (not UTF-8: {exc})") from None
    return config_from_toml(text, path, overrides)


def config_from_toml(text: str, source: str | Path, overrides: list[str] | None = None) -> Config:
    """A config from TOML text (a file's, or the copy a training state keeps), `source` naming it in errors."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # e.g. a run's config.toml cut short
        raise ValueError(f"{source} is not a valid TOML file ({exc})") from None
    return from_dict(apply_overrides(raw, overrides or []))


def from_dict(raw: dict[str, Any]) -> Config:
    unknown = sorted(set(raw) - {*_SECTIONS, "data"})
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; known: {sorted({*_SECTIONS, 'data'})}")
    sections = {name: _section(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
    data = DataConfig.from_dict(raw["data"]) if "data" in raw else None
    config = Config(data=data, **sections)
    _validate(config)
    # a bundled checkpoint's name (rlfn_teacher_takdsr_x2) as every other command takes it; files stay as named
    config.stage.init_from = str(resolve_checkpoint(config.stage.init_from)) if config.stage.init_from else ""
    config.stage.guides = [str(resolve_checkpoint(guide)) for guide in config.stage.guides]
    return config


def differing_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested config dicts (a key one lacks differs), sorted."""
    keys = []
    for key in a.keys() | b.keys():
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            keys += differing_keys(left, right, f"{prefix}{key}.")
        elif left != right:
            keys.append(f"{prefix}{key}")
    return sorted(keys)


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
    fields = known_fields(cls, values, f"[{name}]")
    hints = typing.get_type_hints(cls)
    return cls(**{key: typed_value(value, hints[key], f"{name}.{key}") for key, value in fields.items()})


# build_model arguments the trainer sets from the experiment itself (training/stages.py, build_stage_network)
_SET_BY_EXPERIMENT = {"channels", "blocks", "scale", "encoder_channels", "discrete"}


def _at_least(minimum: float, **values: float) -> None:
    """Each keyword (a dotted key spelt with __ for the dot) must be >= minimum."""
    for key, value in values.items():
        if value < minimum:
            raise ValueError(f"{key.replace('__', '.')} must be >= {minimum}, got {value}")


def _validate(config: Config) -> None:
    exp, stage, optim, runtime = config.experiment, config.stage, config.optim, config.runtime
    if stage.role not in ROLES:
        raise ValueError(f"stage.role must be one of {ROLES}, got {stage.role!r}")
    for key, name in (("experiment.name", exp.name), ("stage.name", stage.name)):  # train's default: runs/<e>/<s>
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(f"{key} must be a plain folder name (no '/', not '.' or '..'), got {name!r}")
    if exp.family not in FAMILIES:
        raise ValueError(f"experiment.family must be one of {', '.join(FAMILIES)}, got {exp.family!r}")
    if exp.scale not in (2, 3, 4):
        raise ValueError(f"experiment.scale must be 2, 3 or 4, got {exp.scale}")
    if len(exp.mix) != 2 or any(w < 0 for w in exp.mix) or sum(exp.mix) <= 0:
        raise ValueError(f"experiment.mix must be two weights [lambda1, lambda2] >= 0, not both 0, got {exp.mix}")
    # TAKDSR needs at least one TA (the baselines without one are PISR' and X_s)
    if not exp.ta_blocks or sorted(exp.ta_blocks, reverse=True) != exp.ta_blocks or min(exp.ta_blocks) < 1:
        raise ValueError(f"experiment.ta_blocks must list one or more TAs, positive and decreasing, got "
                         f"{exp.ta_blocks}")
    _at_least(1, experiment__channels=exp.channels, experiment__teacher_blocks=exp.teacher_blocks,
              experiment__student_blocks=exp.student_blocks, experiment__encoder_channels=exp.encoder_channels,
              optim__steps=optim.steps, optim__batch_size=optim.batch_size, runtime__log_every=runtime.log_every,
              runtime__checkpoint_every=runtime.checkpoint_every)
    _at_least(0, experiment__teacher_steps=exp.teacher_steps, experiment__ta_steps=exp.ta_steps,
              experiment__student_steps=exp.student_steps, stage__blocks=stage.blocks, stage__steps=stage.steps,
              optim__lr_min=optim.lr_min, optim__grad_clip=optim.grad_clip, loss__imitation=config.loss.imitation,
              loss__feature=config.loss.feature, loss__output=config.loss.output, runtime__workers=runtime.workers,
              runtime__seed=runtime.seed, runtime__threads=runtime.threads,
              runtime__snapshot_every=runtime.snapshot_every, runtime__time_budget_s=runtime.time_budget_s)
    _check_blocks_within_teacher(exp, stage)
    if runtime.seed >= 2**63:  # torch's generators take a signed 64-bit seed
        raise ValueError(f"runtime.seed must be < 2**63, got {runtime.seed}")
    taken = sorted(_SET_BY_EXPERIMENT & exp.extra_args.keys())
    if taken:
        raise ValueError(f"experiment.extra_args cannot set {', '.join(taken)}: the experiment's own keys do "
                         "(experiment.channels, the blocks keys, experiment.scale, experiment.encoder_channels, "
                         "stage.discrete)")
    if optim.lr <= 0 or optim.lr_min > optim.lr:
        raise ValueError(f"optim.lr must be > 0 and >= optim.lr_min, got lr {optim.lr}, lr_min {optim.lr_min}")
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        raise ValueError(f"optim.betas must be two numbers in [0, 1), got {optim.betas}")
    if runtime.amp not in ("auto", "bf16", "off"):
        raise ValueError(f"runtime.amp must be auto, bf16 or off, got {runtime.amp!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", runtime.device):
        raise ValueError(f"runtime.device must be auto, cpu, cuda or cuda:N, got {runtime.device!r}")
    _validate_eval(config.eval)
    if config.data is not None and config.data.scale != exp.scale:
        raise ValueError(f"data.scale {config.data.scale} != experiment.scale {exp.scale}: the data's LR and the "
                         "networks are made for one scale; set both (--set experiment.scale=N --set data.scale=N)")


def _check_blocks_within_teacher(exp: ExperimentConfig, stage: StageConfig) -> None:
    """TAs and students start from the teacher's first blocks, so none may have more than it: a pipeline failed
    only after its teacher (and TAs) had trained, on the first stage initialised with too many."""
    counts = {"experiment.ta_blocks": max(exp.ta_blocks), "experiment.student_blocks": exp.student_blocks}
    if stage.init_from:  # a `train` stage initialised from a teacher; 0 takes the role's count, checked above
        counts["stage.blocks"] = stage.blocks
    for key, blocks in counts.items():
        if blocks > exp.teacher_blocks:
            raise ValueError(f"{key} must be <= experiment.teacher_blocks ({exp.teacher_blocks}): they are "
                             f"initialised from the teacher's first blocks, got {blocks}")


def _validate_eval(ev: EvalConfig) -> None:
    _at_least(0, eval__rendered_frames=ev.rendered_frames, eval__max_images=ev.max_images, eval__crop=ev.crop,
              eval__crops_for_figure=ev.crops_for_figure, eval__latency_repeats=ev.latency_repeats)
    if len(ev.rendered_size) != 2 or min(ev.rendered_size) < 1:
        raise ValueError(f"eval.rendered_size must be [width, height] >= 1, got {ev.rendered_size}")


def dump_toml(value: dict[str, Any]) -> str:
    return tomli_w.dumps(value)

"""What a stage is, from its config alone: the network it trains (fresh, or initialised from a teacher), its
frozen guides and the checks that they fit, its steps, mix and data seed, the files it starts from and their hashes,
and what a checkpoint's metadata says of it.

Apart from the loop (training/trainer.py) because none of it needs one: the pipeline, export-state,
scripts/linear_baseline.py and the tests use it too, and the loop only asks it for the pieces it trains with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import (
    WEIGHTS_DIR,
    Teacher,
    build_model,
    init_from_teacher,
    load_checkpoint,
    min_lr_size,
    size_problem,
    weights_sha256,
)
from models.checkpoint import MAX_BLOCKS
from training.config import Config, ExperimentConfig, StageConfig
from training.distill import Guide

__all__ = [
    "build_stage_network", "changed_guides", "check_guides_fit", "check_patch_size", "input_hashes", "load_guides",
    "refuse_oversized", "stage_blocks", "stage_data_seed", "stage_inputs", "stage_mix", "stage_steps",
    "training_summary",
]  # fmt: skip


def stage_mix(config: Config) -> tuple[float, float] | None:
    """The TA's input mix; None for teachers and students."""
    return tuple(config.experiment.mix) if config.stage.role == "ta" else None


def stage_steps(config: Config) -> int:
    """The steps the stage is planned for: its own, else the experiment's."""
    return config.stage.steps or config.optim.steps


def stage_data_seed(config: Config) -> int:
    """The seed of the stage's training patches: data.seed where the config sets it, else the run's seed. So
    `runtime.seed` alone changes the initialisation and the patches together, and a fixed `data.seed` keeps the
    patches while `runtime.seed` varies the initialisation (to tell the two apart)."""
    return config.runtime.seed if config.data.seed is None else config.data.seed


def stage_blocks(config: Config) -> int:
    exp, stage = config.experiment, config.stage
    if stage.blocks:
        return stage.blocks
    if stage.role == "ta":
        return exp.ta_blocks[0]
    return exp.teacher_blocks if stage.role == "teacher" else exp.student_blocks


def check_patch_size(patch_size: int, scale: int, networks: list[nn.Module]) -> None:
    """Refuse training patches too small for a network (RLFN's and RFDN's ESA pool a 15-pixel LR window), with the
    smallest that works, rather than failing inside a pooling layer (a teacher reads the HR patch, the others the
    LR one: either way the LR side patch_size / scale is what must reach the minimum)."""
    for network in networks:
        minimum = min_lr_size(network)
        if patch_size // scale < minimum:
            raise ValueError(f"data.patch_size {patch_size} is too small for {type(network).__name__}: it needs "
                             f"patches of at least {minimum * scale} px at x{scale}")


def refuse_oversized(config: Config) -> None:
    """ValueError for a stage whose network every loader would refuse for its size (models.size_problem): said
    before hours of training, and before anything is allocated (a config of huge widths built gigabytes first, or
    ran out of memory). A fresh network is sized on the meta device; one initialised from a teacher is no larger
    than that checkpoint, which its loader has sized."""
    blocks = stage_blocks(config)
    if blocks > MAX_BLOCKS:  # even on the meta device a million blocks take a minute to build
        raise ValueError(f"stage {config.stage.name} would train a network of {blocks} blocks, more than checkpoints "
                         f"of this package may hold ({MAX_BLOCKS})")
    if config.stage.init_from:
        return
    with torch.device("meta"):
        too_large = size_problem(build_stage_network(config))
    if too_large:
        raise ValueError(f"stage {config.stage.name} would train {too_large}")


def build_stage_network(config: Config) -> nn.Module:
    """The network the stage trains: a fresh teacher, or a decoder initialised from a teacher."""
    exp, stage = config.experiment, config.stage
    blocks = stage_blocks(config)
    if stage.role == "teacher":
        return build_model(
            f"{exp.family}_teacher", channels=exp.channels, blocks=blocks, scale=exp.scale,
            encoder_channels=exp.encoder_channels, discrete=stage.discrete, **exp.extra_args,
        )  # fmt: skip
    if stage.init_from:
        checkpoint = load_checkpoint(stage.init_from)
        teacher = checkpoint.model
        if not isinstance(teacher, Teacher):
            raise ValueError(f"init_from {stage.init_from} is not a teacher checkpoint")
        if teacher.scale != exp.scale:
            raise ValueError(f"init_from {stage.init_from} upscales x{teacher.scale}, the experiment x{exp.scale}")
        _check_teacher_is_the_experiments(stage.init_from, checkpoint.metadata["arch"], teacher, exp)
        return init_from_teacher(teacher, blocks)
    return build_model(exp.family, channels=exp.channels, blocks=blocks, scale=exp.scale, **exp.extra_args)


def _check_teacher_is_the_experiments(path: str, arch: str, teacher: Teacher, exp: ExperimentConfig) -> None:
    """ValueError naming the keys for an init_from teacher of another shape than the experiment's: its width and
    family were taken silently (a seeded 52-channel teacher gave a 52-channel student whose metadata said 8)."""
    args = teacher.arch_args()
    found = {"experiment.family": arch.removesuffix("_teacher"), "experiment.channels": args.get("channels"),
             "experiment.teacher_blocks": args.get("blocks"),
             "experiment.encoder_channels": args.get("encoder_channels"),
             **{f"experiment.extra_args.{key}": args[key] for key in exp.extra_args if key in args}}  # fmt: skip
    wanted = {"experiment.family": exp.family, "experiment.channels": exp.channels,
              "experiment.teacher_blocks": exp.teacher_blocks, "experiment.encoder_channels": exp.encoder_channels,
              **{f"experiment.extra_args.{key}": exp.extra_args[key] for key in exp.extra_args if key in args}}
    differ = [f"{key} is {value!r}, the teacher's {found[key]!r}" for key, value in wanted.items()
              if value != found[key]]
    if differ:
        raise ValueError(f"init_from {path} is not a teacher of this experiment: {'; '.join(differ)}. Set those keys "
                         "to the teacher's values (`python -m models info FILE` shows them), or start from a teacher "
                         "of this experiment")


def stage_inputs(stage: StageConfig) -> list[str]:
    """The files a stage starts from and learns from: its init_from ("" for none), then its guides."""
    return [stage.init_from, *stage.guides]


def input_hashes(stage: StageConfig) -> list[str]:
    """The weights' sha256 of each of `stage_inputs` ("" for no init_from): kept in state.pt and in the final
    checkpoint, so a resume or a pipeline rerun can tell when one of them was trained again or replaced since. Of
    the weights, not the file: a shipped checkpoint (its scores added to the metadata) seeded back into a run is
    still the guide its TA was trained with."""
    return [weights_sha256(path) if path else "" for path in stage_inputs(stage)]


def changed_guides(started_with: StageConfig, stage: StageConfig, saved: list[Any], current: list[str]) -> list[str]:
    """The guides that `stage` names as `started_with` did (the same folder and file name: a run folder may have
    moved) whose weights' hash in `saved` differs from `current` (both lists as input_hashes gives them)."""
    if len(saved) != len(current) or len(started_with.guides) != len(stage.guides):
        return []  # another list of guides: a change made on purpose, which the resume notes
    return [path for before, path, old, new in zip(started_with.guides, stage.guides, saved[1:], current[1:],
                                                   strict=True)
            if Path(before).parts[-2:] == Path(path).parts[-2:] and old and old != new]


def load_guides(paths: list[str]) -> list[Guide]:
    """Frozen higher models, named by their stage; a TA guide keeps the mix it was trained with."""
    guides = []
    for path in paths:
        checkpoint = load_checkpoint(path)
        training = checkpoint.metadata.get("training", {})
        mix = training.get("mix") if checkpoint.metadata["role"] == "ta" else None
        name = training.get("stage") or checkpoint.metadata["role"]
        if name in {guide.name for guide in guides}:  # the loss terms are keyed by name: one would vanish silently
            raise ValueError(f"two guides are named {name!r} (their stage): {path} and an earlier one; guides "
                             "must come from different stages")
        guides.append(Guide(name, checkpoint.model, tuple(mix) if mix else None))
    if guides and not isinstance(guides[0].model, Teacher):
        raise ValueError("the first guide must be the teacher")
    return guides


def check_guides_fit(network: nn.Module, guides: dict[str, Guide], scale: int) -> None:
    """Refuse, naming the file, a guide that cannot teach `network`: another scale (its images would not match
    the HR patch) or another feature width (the feature term compares its features with the network's)."""
    width = network.arch_args().get("channels")
    for path, guide in guides.items():
        if guide.model.scale != scale:
            raise ValueError(f"guide {path} upscales x{guide.model.scale}, the experiment x{scale}")
        guide_width = guide.model.arch_args().get("channels")
        if guide_width != width:
            raise ValueError(f"guide {path} has {guide_width} feature channels and the network it teaches {width}: "
                             "the feature term compares the two (set experiment.channels, or init_from its teacher)")


def training_summary(config: Config, steps: int, seconds: float) -> dict[str, Any]:
    """What a checkpoint's metadata says of the stage that trained it."""
    stage = config.stage
    return {
        "stage": stage.name,
        "steps": steps,
        "batch_size": config.optim.batch_size,
        "seconds": round(seconds, 1),
        "mix": list(stage_mix(config)) if stage_mix(config) else None,
        "guides": [_input_label(p) for p in stage.guides],
        "init_from": _input_label(stage.init_from) if stage.init_from else None,
        "config": config.to_dict(),
    }


def _input_label(path: str) -> str:
    """A stage's guide or init_from as its metadata names it: the stage of <run>/<stage>/final.safetensors, or a
    bundled checkpoint's name (its folder, models/weights, would say nothing)."""
    file = Path(path)
    return file.stem if file.resolve().parent == WEIGHTS_DIR.resolve() else file.parent.name

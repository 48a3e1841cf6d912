"""`python -m training pipeline`: the paper's whole comparison in one run.

Stages, each in its own folder under RUN_DIR (a finished stage is skipped, an interrupted one resumed):
  teacher            discrete-CF teacher                              (TAKDSR)
  ta1 .. taK         TAs, init from the teacher, dense guidance        (TAKDSR)
  student_takdsr     student, init from the teacher, guided by teacher + TAs
  teacher_continuous continuous-CF teacher                            (PISR')
  student_pisr       student, init from it, guided by it alone        (PISR')
  student_alone      student from scratch, L1 to the ground truth     (X_s)
then evaluates them with bicubic and Lanczos on the evaluation sets and writes results.json,
report.md and the plots.

`stages=[...]` trains only the named stages and does not evaluate: independent stages (the teacher,
the continuous teacher and X_s; later the TA and PISR') can then run as parallel processes on one GPU,
and a final plain run evaluates them all.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from models import load_model, read_metadata, weights_sha256
from models.registry import FAMILIES
from training.config import Config, StageConfig, differing_keys, dump_toml, load_config
from training.data import SourceConfig
from training.data.images import write_json_atomic
from training.devices import is_main_process
from training.environment import arithmetic, environment
from training.evaluate import (
    baseline_predictors,
    check_eval_folders,
    checkpoint_predictor,
    eval_sets,
    evaluate,
    min_lr_side,
    model_info,
)
from training.latency import measure_latency
from training.report import REPORT_LR_SIZE, write_report
from training.run_folder import refuse_a_stage_folder, remove_if_only
from training.state import started_with
from training.trainer import FINAL_FILE, STATE_FILE, TrainingInterrupted, read_state, stage_inputs, train_stage
from upscaler_server.files import missing_folders  # standard library only

__all__ = ["DISPLAY_NAMES", "display_name", "pipeline_stages", "run_pipeline"]

RUN_CONFIG = "config.toml"  # the run folder's record of the config it was trained with

# stage name -> the name in the paper's tables
DISPLAY_NAMES = {
    "student_alone": "X_s",
    "student_pisr": "PISR'",
    "student_takdsr": "TAKDSR",
    "ta1": "TA",
    "full_alone": "full backbone",
    "teacher": "teacher",
    "teacher_continuous": "teacher (continuous)",
}


def display_name(stage_name: str) -> str:
    """The paper's name for a stage; TAs after the first are TA2, TA3, ... (any number may be configured)."""
    if stage_name.startswith("ta") and stage_name[2:].isdigit() and stage_name != "ta1":
        return f"TA{stage_name[2:]}"
    return DISPLAY_NAMES.get(stage_name, stage_name)


def pipeline_stages(config: Config, run_dir: Path) -> list[StageConfig]:
    exp = config.experiment
    steps = {"teacher": exp.teacher_steps, "ta": exp.ta_steps, "student": exp.student_steps}

    def final(name: str) -> str:
        return str(run_dir / name / FINAL_FILE)

    def stage(name: str, role: str, **fields: Any) -> StageConfig:
        return StageConfig(name=name, role=role, steps=steps[role], **fields)

    stages = [stage("teacher", "teacher")]
    ta_names = [f"ta{i + 1}" for i in range(len(exp.ta_blocks))]
    for index, (name, blocks) in enumerate(zip(ta_names, exp.ta_blocks, strict=True)):
        guides = [final("teacher"), *(final(n) for n in ta_names[:index])]
        stages.append(stage(name, "ta", blocks=blocks, init_from=final("teacher"), guides=guides))
    guides = [final("teacher"), *(final(n) for n in ta_names)]
    stages.append(stage("student_takdsr", "student", init_from=final("teacher"), guides=guides))
    if exp.baselines:
        stages.append(stage("teacher_continuous", "teacher", discrete=False))
        continuous = final("teacher_continuous")
        stages.append(stage("student_pisr", "student", init_from=continuous, guides=[continuous]))
        stages.append(stage("student_alone", "student"))
    if exp.full_reference:  # the whole decoder trained on X alone: what the backbone reaches without HR information
        stages.append(StageConfig(name="full_alone", role="student", blocks=exp.teacher_blocks,
                                  steps=exp.teacher_steps))  # fmt: skip
    return stages


def run_pipeline(config: Config, run_dir: Path, stages: list[str] | None = None) -> dict[str, Any] | None:
    """Train every unfinished stage and evaluate (returns the results), or train only `stages` (returns None)."""
    refuse_a_stage_folder(run_dir, "python -m training pipeline")
    all_stages = pipeline_stages(config, run_dir)
    chosen = _chosen_stages(all_stages, stages)
    if stages is None:  # the evaluation after training: its folders are checked before hours of training
        _refuse_evaluating_nothing(config)
        check_eval_folders(config, FAMILIES[config.experiment.family].decoder.min_input_size)
    _say_data_eval_unread(config)
    for stage in chosen:  # every interrupted stage is checked before anything is written or trained
        stage_dir = run_dir / stage.name
        if (stage_dir / STATE_FILE).exists() and not (stage_dir / FINAL_FILE).exists():
            _check_same_training(dataclasses.replace(config, stage=stage), stage_dir)
    _refuse_stale_stages(all_stages, chosen, run_dir)
    made = missing_folders(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        _train_stages(config, run_dir, all_stages, chosen, evaluate=stages is None)
    except BaseException:  # refused or stopped before a stage had anything to keep: no run folder with a config alone
        remove_if_only(run_dir, {RUN_CONFIG}, made)
        raise
    if stages is not None or not is_main_process():  # under torchrun rank 0 alone evaluates and reports: every
        return None  # rank scored the whole evaluation and wrote the same files
    results = evaluate_run(config, run_dir)
    write_report(run_dir, results)
    return results


def _train_stages(config: Config, run_dir: Path, all_stages: list[StageConfig], chosen: list[StageConfig],
                  evaluate: bool) -> None:
    """Write the run's config.toml (a whole run's, `evaluate`) and train the `chosen` stages that are not finished."""
    kept_with_other_values = {stage.name: _kept_changes(dataclasses.replace(config, stage=stage), run_dir / stage.name)
                              for stage in chosen if (run_dir / stage.name / FINAL_FILE).exists()}
    # parallel partial runs may differ in their overrides (e.g. time budgets); and a run whose kept stages were trained
    # with other values keeps the config.toml that says so: this config did not train them
    run_config = run_dir / RUN_CONFIG
    if evaluate and (not any(kept_with_other_values.values()) or not run_config.exists()):
        run_config.write_text(dump_toml(config.to_dict()))
    elif evaluate:
        print(f"{run_config} is left as it was: kept stages were trained with other values than this "
              "config's (below)")
    for stage in chosen:
        stage_dir = run_dir / stage.name
        if stage.name in kept_with_other_values:
            _say_kept(stage.name, stage_dir, kept_with_other_values[stage.name],
                      _trained_from(stage, all_stages, run_dir))
            continue
        missing = list(dict.fromkeys(p for p in stage_inputs(stage) if p and not Path(p).exists()))  # once each
        if missing:
            raise FileNotFoundError(f"stage {stage.name} needs {', '.join(missing)}: train those stages first")
        result = train_stage(dataclasses.replace(config, stage=stage), stage_dir,
                             resume=(stage_dir / STATE_FILE).exists())
        # a line per stage as it ends, as `train` prints: with runtime.progress off nothing else said how far it was
        if is_main_process():  # once under torchrun
            print(f"{stage.name}: {result.steps} steps in {result.seconds:.0f} s -> {result.checkpoint}", flush=True)
        more_to_do = stage is not chosen[-1] or evaluate  # later stages, or the evaluation
        if result.stopped_by is not None and more_to_do:  # a stop in the stage's last step: done, go no further
            name = signal.Signals(result.stopped_by).name
            raise TrainingInterrupted(f"interrupted by {name} at the last step of {stage.name} (its "
                                      f"{FINAL_FILE} is saved); rerun the same command to go on", result.stopped_by)


# What may differ between the segments of a resumed stage: how it runs, and the experiment keys that shape the
# pipeline's list of stages rather than this stage (its own steps are in its stage table)
_NOT_COMPARED = {
    *(f"runtime.{key}" for key in ("device", "compile", "workers", "threads", "log_every", "checkpoint_every",
                                   "snapshot_every", "progress", "channels_last")),
    *(f"experiment.{key}" for key in ("name", "teacher_steps", "ta_steps", "student_steps", "baselines",
                                      "full_reference")),
    "data.cache_mb",
}


def _refuse_evaluating_nothing(config: Config) -> None:
    """A pipeline that evaluates needs a set to score: with none it trained every stage, then wrote a report without
    a score."""
    scored = config.eval
    if not (scored.cg_dev or scored.rendered_val or scored.rendered_native or scored.folders):
        raise ValueError("the evaluation has no set to score: set eval.cg_dev, eval.rendered_val or "
                         "eval.rendered_native to true, or give eval.folders (to train without evaluating, name the "
                         "stages: --stages)")


def _say_data_eval_unread(config: Config) -> None:
    """`[data.eval]` is the data library's (build_eval_dataset); the pipeline scores the sets of `[eval]`. A config
    that sets it expects it to be scored, and nothing said it was not."""
    if config.data is not None and config.data.eval != SourceConfig(kind="folder"):  # DataConfig's default
        print(f"note: data.eval ({config.data.eval.kind} {config.data.eval.path or ''}) is not read by the trainer or "
              "the pipeline: they score the sets of [eval] (eval.cg_dev, eval.rendered_val, eval.rendered_native, "
              "eval.folders)",
              file=sys.stderr)


def _check_same_training(config: Config, stage_dir: Path) -> None:
    """An interrupted stage resumes only with the config it was started with (its RUN_DIR/<stage>/config.toml, or
    the copy in its state.pt), evaluation and the keys above aside: another schedule, data or loss would go on
    silently, and the checkpoint's metadata would then describe a training that never ran."""
    saved = started_with(stage_dir)
    if saved is None:  # a state of an older version, put back without its config.toml: nothing to compare
        return
    keys = _changed_keys(saved, config)
    if keys:
        raise ValueError(
            f"stage {config.stage.name} in {stage_dir} was started with another config ({keys}): run the pipeline "
            "with the config and --set overrides it was started with (for scripts/train_parallel.sh, the same "
            f"line), or continue that stage alone with `python -m training train --resume {stage_dir}` (and "
            "--set KEY=VALUE for a change made on purpose)"
        )


def _changed_keys(saved: Config, config: Config) -> str:
    """The keys that shape a stage (those of _NOT_COMPARED and those it never reads aside) whose values differ
    between `saved` and `config`, as a short list ("" when none do)."""
    ignored = _NOT_COMPARED | (_unread_keys(saved.stage) & _unread_keys(config.stage))
    changed = [_setting_key(key, saved, config) for key in differing_keys(_comparable(saved), _comparable(config))
               if key not in ignored and not key.startswith("data.eval.")]  # no stage reads data.eval
    return ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")


def _setting_key(key: str, saved: Config, config: Config) -> str:
    """The key a user sets for ``key``: pipeline_stages fills a stage's steps and blocks from the experiment, and a
    message naming stage.steps named a key that no config or --set of a pipeline holds."""
    stage = config.stage
    role = "teacher" if stage.name == "full_alone" else stage.role  # the whole decoder, on the teacher's schedule
    if key == "stage.steps":
        return f"experiment.{role}_steps" if saved.stage.steps or stage.steps else "optim.steps"
    if key == "stage.blocks" and role in ("teacher", "ta"):
        return f"experiment.{role}_blocks"
    return key


def _unread_keys(stage: StageConfig) -> set[str]:
    """The experiment and loss keys that never reach `stage`'s network, input or loss (stages.stage_blocks,
    build_stage_network, stage_mix, Distillation): every stage's config holds the whole experiment, and a teacher
    interrupted, then rerun with another `experiment.student_blocks`, was refused, or called stale when finished."""
    unread = set()
    if stage.role != "ta":  # the mixed input is a TA's alone
        unread.add("experiment.mix")
    if stage.blocks or stage.role != "ta":  # the pipeline gives each TA its count in stage.blocks
        unread.add("experiment.ta_blocks")
    if stage.blocks or stage.role != "student":
        unread.add("experiment.student_blocks")
    # a stage started from a teacher checks that teacher's shape against these two
    if (stage.blocks or stage.role != "teacher") and not stage.init_from:
        unread.add("experiment.teacher_blocks")
    if stage.role != "teacher" and not stage.init_from:
        unread.add("experiment.encoder_channels")
    if stage.role != "teacher":  # |X - CF'|: only a teacher writes CF'
        unread.add("loss.imitation")
    if not stage.guides:  # the terms that compare with the guides
        unread |= {"loss.feature", "loss.output"}
    return unread


def _trained_from(stage: StageConfig, all_stages: list[StageConfig], run_dir: Path) -> list[Path]:
    """The folders of the stages in `run_dir` that start from or learn from `stage`'s checkpoint."""
    final = run_dir / stage.name / FINAL_FILE
    return [run_dir / other.name for other in all_stages
            if (run_dir / other.name).exists() and any(p and Path(p) == final for p in stage_inputs(other))]


def _kept_changes(config: Config, stage_dir: Path) -> str:
    """The keys this config would have trained a finished stage with otherwise ("" when none, or when its config.toml
    is missing or damaged: the checkpoint is what counts)."""
    try:
        saved = load_config(stage_dir / "config.toml") if (stage_dir / "config.toml").is_file() else None
    except ValueError:
        saved = None
    return "" if saved is None else _changed_keys(saved, config)


def _say_kept(name: str, stage_dir: Path, keys: str, dependents: list[Path]) -> None:
    """A finished stage is kept, never trained again: say so, naming the keys this config would have trained it with
    otherwise (a rerun with `--set optim.steps=...` reported the stage as trained and changed nothing), and the
    stages that would have to go with it (a rerun then refuses to keep them: _refuse_stale_stages)."""
    other = ""
    if keys:
        also = f" and the stages trained from it, {' '.join(map(str, dependents))}" if dependents else ""
        other = f"; it was trained with other values for {keys} (to train it with these, remove {stage_dir}{also})"
    print(f"{name}: kept, finished before in {stage_dir}{other}")


def _refuse_stale_stages(all_stages: list[StageConfig], chosen: list[StageConfig], run_dir: Path) -> None:
    """Refuse, before anything trains, when a stage (finished or interrupted) was started from or guided by a file
    that this run would no longer match: one that has changed since, or one whose stage this run trains again. A
    teacher trained again (its folder removed, as the `kept` line says to) left its TAs and students, finished or
    half-way, kept or resumed against the new teacher without a word, and scored as if they had learnt from it."""
    retrained = {stage.name for stage in chosen if not (run_dir / stage.name / FINAL_FILE).exists()}
    hashes: dict[Path, str] = {}  # weights' sha256 by file
    stale: dict[str, str] = {}  # stage -> why
    for stage in all_stages:
        recorded = _recorded_inputs(run_dir / stage.name)
        if recorded is None or len(recorded) != len(stage_inputs(stage)):
            continue
        for path_text, old in zip(stage_inputs(stage), recorded, strict=True):
            path = Path(path_text)
            if not old:  # no init_from, or a state of an older version
                continue
            if not path.exists():
                if path.parent.name in retrained:
                    stale.setdefault(stage.name, f"from {path.parent.name}, which this run trains again")
            elif hashes.setdefault(path, weights_sha256(path)) != old:
                stale.setdefault(stage.name, f"from {path}, which has changed since")
    if stale:
        reasons = "; ".join(f"{name} ({why})" for name, why in stale.items())
        folders = " ".join(str(run_dir / name) for name in stale)
        raise ValueError(f"stages trained from or with files this run would no longer match: {reasons}. Remove "
                         f"their folders to train them again ({folders}), or put the old files back")


def _recorded_inputs(stage_dir: Path) -> list[Any] | None:
    """The input hashes a stage recorded (final checkpoint, else state.pt); None where it recorded none."""
    if (stage_dir / FINAL_FILE).exists():
        recorded = read_metadata(stage_dir / FINAL_FILE).get("training", {}).get("inputs_sha256")
    elif (stage_dir / STATE_FILE).exists():
        recorded = read_state(stage_dir / STATE_FILE, torch.device("cpu")).get("inputs_sha256")
    else:
        return None
    return recorded if isinstance(recorded, list) else None


def _comparable(config: Config) -> dict[str, Any]:
    """The config as a dict without its evaluation table, its guides and initialisation named by their stage (the
    pipeline makes those paths from the run folder, which may be spelt otherwise, or moved, since)."""
    as_dict = config.to_dict()
    as_dict.pop("eval", None)
    stage = as_dict["stage"]
    stage["init_from"] = Path(stage["init_from"]).parent.name if stage.get("init_from") else ""
    stage["guides"] = [Path(path).parent.name for path in stage.get("guides", [])]
    # the schedule's length, as one number: experiment.<role>_steps fills stage.steps, and 0 there means optim.steps
    # (which no stage reads otherwise), so teacher_steps=6 and optim.steps=6 with teacher_steps=0 are the same stage
    stage["steps"] = config.stage.steps or config.optim.steps
    as_dict["optim"].pop("steps")
    return as_dict


def _chosen_stages(all_stages: list[StageConfig], names: list[str] | None) -> list[StageConfig]:
    if names is None:
        return all_stages
    known = [stage.name for stage in all_stages]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise ValueError(f"unknown stage(s) {unknown or names}; this experiment has {', '.join(known)}")
    return [stage for stage in all_stages if stage.name in names]


def evaluate_run(config: Config, run_dir: Path, device: torch.device | None = None) -> dict[str, Any]:
    """Scores of every trained stage plus bicubic and Lanczos; writes RUN_DIR/results.json."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = config.experiment.scale
    stages = pipeline_stages(config, run_dir)
    checkpoints = {display_name(s.name): run_dir / s.name / FINAL_FILE for s in stages}
    predictors = dict(baseline_predictors(scale))
    for stage in stages:
        # a TA reads the teacher's CF' mixed with the LR image, so it is scored with the teacher it was trained on
        teacher = run_dir / "teacher" / FINAL_FILE if stage.role == "ta" else None
        predictors[display_name(stage.name)] = checkpoint_predictor(run_dir / stage.name / FINAL_FILE, device, teacher)
    results: dict[str, Any] = {"family": config.experiment.family, "scale": scale,
                               "report_lr_size": list(REPORT_LR_SIZE), "sets": {}, "crops": {},
                               "models": {}, "environment": {**environment(), "evaluated_on": arithmetic(device, 1)}}
    for set_name, images in eval_sets(config, scale, min_lr_side(list(checkpoints.values()))).items():
        scores, crops = evaluate(predictors, images, scale, keep_crops=config.eval.crops_for_figure,
                                 progress=config.runtime.progress)
        # eval.crop and eval.max_images travel with the scores: `ship` must not pass a smoke run's cut-down scores off
        # as whole-set ones
        results["sets"][set_name] = {"images": [image.name for image in images], "crop": config.eval.crop,
                                     "max_images": config.eval.max_images, "scores": scores}
        results["crops"][set_name] = crops
    for display, path in checkpoints.items():
        results["models"][display] = dataclasses.asdict(model_info(path, REPORT_LR_SIZE))
        results["models"][display]["training"] = _training_summary(path)
        # what `ship` compares with the file it ships: a stage trained again after this evaluation has other weights
        results["models"][display]["weights_sha256"] = weights_sha256(path)
        if config.eval.latency_repeats:
            results["models"][display]["latency"] = _latency(path, device, config.eval.latency_repeats)
    serialisable = {k: v for k, v in results.items() if k != "crops"}
    write_json_atomic(run_dir / "results.json", serialisable, indent=2, sort_keys=False)
    return results


def _latency(path: Path, device: torch.device, repeats: int) -> dict[str, Any]:
    return measure_latency(load_model(path), *REPORT_LR_SIZE, device, repeats=repeats)  # every usable core


def _training_summary(path: Path) -> dict[str, Any]:
    training = read_metadata(path)["training"]
    return {k: training.get(k) for k in ("steps", "batch_size", "device", "seconds", "final_loss")}

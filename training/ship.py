"""`python -m training ship RUN_DIR --out models/weights [--stages ...]`: copy a pipeline run's checkpoints into the
bundled-weights folder, with the run's evaluation scores merged into each file's metadata, and
update weights.json (what each file is, how it was trained, what it scores).

`python -m training ship-checkpoint FILE --name NAME --scores SCORES.json` does the same for one
checkpoint trained outside a pipeline (e.g. the native-LR student), with the scores written by
`python -m training evaluate --json`.

`python -m training seed-run RUN_DIR --stages teacher,ta1` goes the other way: it puts shipped checkpoints into a
run folder as finished stages, so that `pipeline --stages ...` trains new students from the shipped guides."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

from models import Checkpoint, count_parameters, load_checkpoint, read_metadata, save_checkpoint, weights_sha256
from models.registry import FAMILIES
from training.data import file_sha256, write_json_atomic
from training.evaluate import macs_at
from training.pipeline import REPORT_LR_SIZE
from training.run_folder import refuse_a_stage_folder
from training.trainer import FINAL_FILE

__all__ = ["SHIPPED", "cut_down_evaluation", "lr_kinds", "seed_run", "ship_checkpoint", "ship_run"]

# pipeline stage -> (file name stem in models/weights, the name used in reports)
SHIPPED = {
    "student_takdsr": ("s_takdsr", "TAKDSR"),
    "ta1": ("ta_takdsr", "TA"),
    "teacher": ("teacher_takdsr", "teacher"),
    "student_pisr": ("s_pisr", "PISR'"),
    "student_alone": ("s_alone", "X_s"),
    "teacher_continuous": ("teacher_continuous", "teacher (continuous)"),  # PISR's teacher; the ablations reuse it
}


def ship_run(run_dir: Path, out_dir: Path, stages: list[str] | None = None, *, overwrite: bool = False
             ) -> dict[str, Any]:
    """Write the shipped checkpoints (every stage of SHIPPED the run has, or only `stages`) and update weights.json;
    returns the entries written. A file of the same name in `out_dir` is replaced only with `overwrite`."""
    unknown = sorted(set(stages or []) - set(SHIPPED))
    if unknown or stages == []:
        raise ValueError(f"cannot ship stage(s) {unknown or stages}; shippable: {', '.join(SHIPPED)}")
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(_not_evaluated(run_dir))
    results = _read_json_object(results_path, "a pipeline's results.json")
    try:
        scores_by_set = {set_name: data["scores"] for set_name, data in results["sets"].items()}
        # what each set's scores cover (crop and max_images: None in a results.json written before they were kept)
        evaluation = {set_name: {"images": len(data["images"]), "crop": data.get("crop"),
                                 "max_images": data.get("max_images")} for set_name, data in results["sets"].items()}
        models = dict(results["models"])
    except (KeyError, TypeError, AttributeError, ValueError):
        raise ValueError(f"{results_path} is not a pipeline's results.json (no sets with scores, or no models): "
                         "evaluate the run") from None
    bicubic = _means(scores_by_set, "bicubic", results_path)
    if stages is None:  # a run without baselines (or TAs) has fewer stages: ship what it has
        stages = [stage for stage in SHIPPED if (run_dir / stage / FINAL_FILE).exists()]
        if not stages:
            raise ValueError(f"{run_dir} has none of the shippable stages ({', '.join(SHIPPED)}) finished")
    # everything is loaded and looked up first: a missing stage or score fails before any file is replaced
    chosen = [(stage, stem, display) for stage, (stem, display) in SHIPPED.items() if stage in stages]
    loaded = []
    for stage, stem, display in chosen:
        checkpoint = load_checkpoint(run_dir / stage / FINAL_FILE)
        info = models.get(display)
        if not isinstance(info, dict) or not {"params", "macs"} <= info.keys():
            raise ValueError(f"{results_path} has no scores for {display} ({stage}): evaluate the run")
        _refuse_other_weights(run_dir / stage / FINAL_FILE, [info.get("weights_sha256")],
                              f"{results_path} ({display})", _evaluate_run_command(run_dir))
        family = checkpoint.metadata["arch"].split("_")[0]  # "rlfn_teacher" -> "rlfn"
        name = f"{family}_{stem}_x{checkpoint.metadata['scale']}.safetensors"
        loaded.append((checkpoint, name, display, info, _means(scores_by_set, display, results_path)))
    _refuse_replacing(out_dir, [name for _, name, _, _, _ in loaded], overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = _read_index(out_dir)
    written = {}
    try:
        for checkpoint, name, display, info, scores in loaded:
            index[name] = written[name] = _ship_file(
                checkpoint, out_dir / name, report_name=display, run=run_dir.name, scores=scores,
                evaluation=evaluation, bicubic=bicubic, params=info["params"], macs=info["macs"],
                latency=info.get("latency"),
            )  # fmt: skip
    finally:  # a write that fails (a full disk, Ctrl-C) leaves the files before it replaced: the index says so
        _write_index(out_dir, index)
    return written


def ship_checkpoint(
    path: Path, name: str, report_name: str, scores_path: Path, out_dir: Path, *, label: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Ship one checkpoint as `out_dir/name.safetensors` with the scores of its label (default: the file's
    stem) in `scores_path` (`python -m training evaluate --json`: {set: {label: {"mean": ...}}}); returns
    its weights.json entry."""
    if name.endswith(".safetensors"):  # the stem: it wrote NAME.safetensors.safetensors
        stem = name.removesuffix(".safetensors")
        raise ValueError(f"the name is a file name stem, without .safetensors: --name {stem}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):  # a file in out_dir, never a path out of it
        raise ValueError(f"the name must be a plain file name stem (letters, digits, _ . -, not starting with . or "
                         f"-), got {name!r}")
    checkpoint = load_checkpoint(path)
    if contradiction := _name_contradiction(name, checkpoint.metadata):
        raise ValueError(f"--name {name}: {contradiction}, but {path} holds a {checkpoint.metadata['arch']} network "
                         f"x{checkpoint.metadata['scale']}; name it after what it is, e.g. "
                         f"{_family_of(checkpoint.metadata)}_..._x{checkpoint.metadata['scale']}")
    if not isinstance(checkpoint.metadata["training"].get("config"), dict):
        # shipped weights carry how they were trained (config, data, steps, device): refuse before writing anything
        raise ValueError(f"{path} has no training config in its metadata: only checkpoints this trainer wrote "
                         "(a stage's final.safetensors, or python -m training export-state) can be shipped")
    all_scores = _read_json_object(scores_path, "the scores of `python -m training evaluate --json`")
    label = label or path.stem
    scores, bicubic = _means(all_scores, label, scores_path), _means(all_scores, "bicubic", scores_path)
    recorded = [by_label[label].get("weights_sha256") for by_label in all_scores.values()]  # _means checked them
    # `evaluate` scores whole images, every one of a set
    evaluation = {set_name: {"images": _count(by_label[label].get("per_image")), "crop": 0, "max_images": 0}
                  for set_name, by_label in all_scores.items()}
    again = (f"python -m training evaluate --checkpoint {path} [--teacher T, for a TA] --sets/--data as before "
             f"--json {scores_path}")
    _refuse_other_weights(path, recorded, f"{scores_path} ({label!r})", again)
    file_name = f"{name}.safetensors"
    _refuse_replacing(out_dir, [file_name], overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = _read_index(out_dir)
    model = checkpoint.model
    index[file_name] = _ship_file(
        checkpoint, out_dir / file_name, report_name=report_name, run=path.parent.name, scores=scores,
        evaluation=evaluation, bicubic=bicubic, params=count_parameters(model), macs=macs_at(model, REPORT_LR_SIZE),
        latency=None,
    )  # fmt: skip
    _write_index(out_dir, index)
    return index[file_name]


def _family_of(metadata: dict[str, Any]) -> str:
    """The registry family of a checkpoint's network (``rlfn`` for ``rlfn_teacher``)."""
    return str(metadata["arch"]).removesuffix("_teacher")


def _name_contradiction(name: str, metadata: dict[str, Any]) -> str | None:
    """What a bundled name (``rlfn_s_takdsr_x2``: family first, scale last) says that the checkpoint is not. Users pick
    a ``--checkpoint`` by it, and seed-run finds guides by ``{family}_..._x{scale}``: an RFDN x3 shipped as
    ``rlfn_s_new_x2`` was taken for what its name said. Names outside that pattern say nothing and pass."""
    first = name.split("_")[0]
    if first in FAMILIES and first != _family_of(metadata):
        return f"it starts with the family {first}"
    named_scale = re.search(r"_x(\d+)$", name)
    if named_scale and int(named_scale.group(1)) != metadata["scale"]:
        return f"it ends with the scale x{named_scale.group(1)}"
    return None


def seed_run(
    run_dir: Path, stages: list[str], *, weights_dir: Path, family: str = "rlfn", scale: int = 2
) -> dict[str, str]:
    """Copy the shipped checkpoint of each stage into `run_dir/<stage>/final.safetensors`, where the pipeline
    takes it as a finished stage (a guide or an initialisation). A stage the run already has is kept: a run
    folder is never overwritten. Returns {stage: "copied" | "kept"}."""
    refuse_a_stage_folder(run_dir, "python -m training seed-run")
    unknown = sorted(set(stages) - set(SHIPPED))
    if unknown or not stages:
        raise ValueError(f"cannot seed stage(s) {unknown or stages}; shipped stages: {', '.join(SHIPPED)}")
    sources = {stage: weights_dir / f"{family}_{SHIPPED[stage][0]}_x{scale}.safetensors" for stage in stages}
    for stage, source in sources.items():
        if not source.is_file():
            raise FileNotFoundError(f"no shipped {stage} for {family} x{scale}: {source} does not exist (the "
                                    "bundled weights are RLFN x2; for others, --weights names a folder that `ship "
                                    "--out` wrote)")
        read_metadata(source)  # a truncated or foreign file fails here, before anything is copied
    done = {}
    for stage, source in sources.items():
        target = run_dir / stage / FINAL_FILE
        done[stage] = "kept" if target.exists() else "copied"
        if done[stage] == "copied":
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return done


def _not_evaluated(run_dir: Path) -> str:
    """Why a folder without results.json cannot be shipped, and how to score it: a pipeline run trained with
    --stages alone, or one stage's `train` folder."""
    if not run_dir.is_dir():
        return f"{run_dir} is not a folder: name a pipeline's run folder"
    if (run_dir / FINAL_FILE).exists():
        return (f"{run_dir} has not been evaluated (it has no results.json): it is one stage's `train` folder; score "
                f"it with `python -m training evaluate --checkpoint {run_dir / FINAL_FILE} --json SCORES.json` and "
                "ship it with `python -m training ship-checkpoint`")
    return f"{run_dir} has not been evaluated (it has no results.json): evaluate it: {_evaluate_run_command(run_dir)}"


def _evaluate_run_command(run_dir: Path) -> str:
    """The command that evaluates a pipeline run (it trains nothing that is finished): with the run's own config when
    a whole pipeline wrote one there."""
    if (run_dir / "config.toml").is_file():
        return f"python -m training pipeline --config {run_dir / 'config.toml'} --run-dir {run_dir}"
    return (f"python -m training pipeline --config CONFIG --run-dir {run_dir} (the config and --set overrides it was "
            "trained with, without --stages)")


def _refuse_other_weights(path: Path, recorded: list[Any], where: str, evaluate_again: str) -> None:
    """ValueError unless every hash recorded beside the scores (`where`) is that of `path`'s weights: a checkpoint
    trained again after its evaluation shipped with the old scores (20 steps beside a 300-step PSNR)."""
    if not all(isinstance(digest, str) for digest in recorded):
        raise ValueError(f"{where} does not record which weights it scored (scores written before that was "
                         f"recorded), so they may not be {path}'s; evaluate again: {evaluate_again}")
    if set(recorded) != {weights_sha256(path)}:
        # which of the two cannot be told from a hash: say both (a wrong --label read as "trained again")
        raise ValueError(f"{where} scored other weights than {path} holds: another checkpoint scored under that "
                         f"label, or this one trained again since; evaluate again: {evaluate_again}")


def _refuse_replacing(out_dir: Path, names: list[str], overwrite: bool) -> None:
    """Before anything is written: shipping a new run into the bundled weights (the default --out) replaced the
    shipped files of its family and scale, whatever their width or training, without a word."""
    existing = [name for name in names if (out_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {', '.join(existing)}: pass --overwrite to replace them, or "
                              "ship into another folder with --out")


def _ship_file(
    checkpoint: Checkpoint, path: Path, *, report_name: str, run: str, scores: dict[str, Any],
    evaluation: dict[str, Any], bicubic: dict[str, Any], params: int, macs: int, latency: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """Save `checkpoint` at `path` with its scores (and what they cover: `evaluation`) in the metadata; returns its
    weights.json entry."""
    metadata = checkpoint.metadata
    training = {**metadata["training"], "metrics": scores, "evaluation": evaluation, "run": run}
    entry = {
        "stage": training.get("stage"),
        "report_name": report_name,
        "role": metadata["role"],
        "arch": metadata["arch"],
        "arch_args": metadata["arch_args"],
        "params": params,
        "macs_960x540": macs,
        "training": {k: training.get(k) for k in ("steps", "batch_size", "device", "seconds", "mix", "init_from")}
        | ({"partial_of": training["partial_of"]} if training.get("partial_of") else {}),  # a snapshot's: step of N
        "metrics": scores,
        "evaluation": evaluation,
        "bicubic": bicubic,
        "latency": latency,
        "lr_kinds": lr_kinds(training["config"]),
    }
    save_checkpoint(checkpoint.model, path, role=metadata["role"], training=training)
    entry["sha256"] = file_sha256(path)  # the test of the shipped weights checks it: no file swaps its tensors
    return entry


def cut_down_evaluation(entry: dict[str, Any]) -> str | None:
    """What makes a shipped entry's scores less than whole-set ones (eval.crop, eval.max_images), or None."""
    cut = [f"{set_name}: {cover['images']} image(s)" + (f" cropped to {cover['crop']} px" if cover["crop"] else "")
           for set_name, cover in entry["evaluation"].items() if cover["crop"] or cover["max_images"]]
    return "; ".join(cut) or None


def _count(per_image: Any) -> int | None:
    return len(per_image) if isinstance(per_image, dict) else None


def lr_kinds(config: dict[str, Any]) -> list[str]:
    """The kinds of LR a checkpoint was trained on ("bicubic", "native"), from its saved training config."""
    sources = config.get("data", {}).get("sources", [])
    return sorted({source.get("lr_kind", "bicubic") for source in sources})


def _means(scores_by_set: Any, label: str, path: Path) -> dict[str, dict[str, Any]]:
    """{set: the mean scores of `label`} from {set: {label: {"mean": {...}, ...}}}, every set having them."""
    try:
        means = {set_name: scores[label]["mean"] for set_name, scores in scores_by_set.items()}
    except (KeyError, TypeError, AttributeError):
        means = {}
    if not means or not all(isinstance(mean, dict) for mean in means.values()):
        labels = sorted({name for scores in scores_by_set.values() if isinstance(scores, dict) for name in scores}
                        if isinstance(scores_by_set, dict) else ())
        known = f"; it has scores for {', '.join(map(repr, labels[:12]))}" if labels else ""
        raise ValueError(f"{path} has no scores for {label!r} in every set (a mean per set){known}")
    for set_name, mean in means.items():  # json reads NaN and Infinity, which weights.json must never carry
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in mean.values()):
            raise ValueError(f"{path}: the {set_name} scores of {label!r} are not all finite numbers: {mean}")
    return means


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:  # also a file that is not UTF-8
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not {what}: not a JSON object")
    return data


def _read_index(out_dir: Path) -> dict[str, Any]:
    index_path = out_dir / "weights.json"
    return _read_json_object(index_path, "a weights index") if index_path.exists() else {}


def _write_index(out_dir: Path, index: dict[str, Any]) -> None:
    """weights.json, replaced atomically: an interrupted write never leaves half an index."""
    write_json_atomic(out_dir / "weights.json", index, indent=2, sort_keys=False)

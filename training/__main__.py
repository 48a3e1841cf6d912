"""python -m training {train, pipeline, evaluate, latency, ship, ship-checkpoint, seed-run, export-state}:
the TAKDSR trainer's command line."""

from __future__ import annotations

import signal

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds) ended in a KeyboardInterrupt traceback: die by the
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # signal, as a shell command does; main's caller puts Python's back

import argparse
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TextIO

import torch

from models import (
    WEIGHTS_DIR,
    CheckpointError,
    build_model,
    list_models,
    load_model,
    min_lr_size,
    read_metadata,
    resolve_checkpoint,
    weights_sha256,
)
from training.config import Config, differing_keys, load_config
from training.data import DatasetError, SkippedFilesWarning
from training.data.images import write_json_atomic
from training.devices import is_main_process, world_size
from training.evaluate import (
    BUILTIN_SETS,
    baseline_predictors,
    builtin_sets_config,
    check_output_file,
    checkpoint_predictor,
    min_lr_side,
    parse_set_names,
    score_sets,
    unique_labels,
)
from training.latency import measure_latency
from training.memory import out_of_memory_reason
from training.pipeline import run_pipeline
from training.report import latency_where
from training.run_folder import held_instead_of_a_state
from training.ship import SHIPPED, cut_down_evaluation, seed_run, ship_checkpoint, ship_run
from training.state import FINAL_FILE, STATE_FILE, started_with
from training.trainer import (
    DataWorkerError,
    NonFiniteLossError,
    OutOfMemoryError,
    TrainingInterrupted,
    export_state,
    train_stage,
)
from upscaler_server.console import add_version_option, escape_unprintable_names  # standard library only


def _comma_list(text: str) -> list[str]:
    """Each name once, in order: `--stages teacher,teacher` trained one and said "finished teacher, teacher"."""
    return list(dict.fromkeys(text.split(",")))


def _size(text: str) -> tuple[int, int]:
    """`960x540` -> (960, 540); argparse reports anything else."""
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT with positive integers, got {text!r}")
    return int(width), int(height)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _thread_count(text: str) -> int:
    """0 (every usable core) to 1024: far more threads than cores fail in libgomp, or crash the process."""
    if not text.isdigit() or int(text) > 1024:
        raise argparse.ArgumentTypeError(f"expected 0 (every usable core) to 1024, got {text!r}")
    return int(text)


def _device(text: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`, and a CUDA device only where one exists."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    device = torch.device(text)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: no such CUDA device here ({torch.cuda.device_count()} found)")
    return device


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    add_version_option(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one stage (the [stage] table of the config)")
    pipeline = commands.add_parser("pipeline", help="train and evaluate the paper's whole comparison")
    pipeline.add_argument("--config", required=True, type=Path,
                          help="a TOML file, or a bundled config by name (smoke_cpu, rlfn_x2, ...: training/configs/)")
    train.add_argument("--config", type=Path, help="a TOML file or a bundled config by name; with --resume, the run's "
                       "own config.toml is used and a different --config is refused")
    for sub in (train, pipeline):
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        sub.add_argument("--run-dir", type=Path, help="output folder (default runs/<experiment>[/<stage>])")
    pipeline.add_argument(
        "--stages", type=_comma_list, metavar="NAME,...",
        help="train only these stages (e.g. teacher,student_alone), no evaluation: for parallel runs",
    )  # fmt: skip
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    evaluate_cmd = commands.add_parser("evaluate", help="PSNR/SSIM of a checkpoint against bicubic and Lanczos")
    # a file, or a bundled name such as rlfn_s_takdsr_x2 (models.resolve_checkpoint)
    evaluate_cmd.add_argument("--checkpoint", required=True, type=resolve_checkpoint, action="append",
                              help="a .safetensors file or a bundled name such as rlfn_s_takdsr_x2; repeat for several")
    evaluate_cmd.add_argument("--teacher", type=resolve_checkpoint, help="the teacher checkpoint (needed to evaluate "
                              "a TA): a file or a bundled name")
    evaluate_cmd.add_argument("--data", type=Path, action="append", default=[], help="an image folder (repeatable)")
    evaluate_cmd.add_argument(
        "--sets", type=parse_set_names, default=None, metavar="NAME,...",
        help=f"built-in sets: {', '.join(BUILTIN_SETS)} (default: cg-dev, unless --data is given)",
    )  # fmt: skip
    evaluate_cmd.add_argument("--frames", type=_positive_int, default=2, help="rendered validation frames per preset")
    evaluate_cmd.add_argument("--json", type=Path, help="also write the scores here")
    ship = commands.add_parser("ship", help="copy a pipeline run's checkpoints, with their scores, to a folder")
    ship.add_argument("run_dir", type=Path)
    ship.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="the weights folder (default: the bundled one, "
                      "%(default)s, wherever the command runs)")
    ship.add_argument("--overwrite", action="store_true", help="replace files of the same name in --out (the "
                      "bundled weights, by default): without it, shipping over one is refused")
    ship.add_argument(
        "--stages", type=_comma_list, metavar="NAME,...",
        help="ship only these stages (e.g. student_takdsr; default: every shippable stage the run has)"
    )
    ship_one = commands.add_parser("ship-checkpoint", help="ship one checkpoint with scores from `evaluate --json`")
    ship_one.add_argument("checkpoint", type=Path)
    ship_one.add_argument("--name", required=True, help="file name stem in the weights folder")
    ship_one.add_argument("--report-name", required=True, help="the model's name in reports")
    ship_one.add_argument("--scores", required=True, type=Path, help="`evaluate --json` output that scored it")
    ship_one.add_argument("--label", help="the checkpoint's label in SCORES (default: the file's stem)")
    ship_one.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="the weights folder (default: the bundled "
                          "one, %(default)s, wherever the command runs)")
    ship_one.add_argument("--overwrite", action="store_true", help="replace a file of the same name in --out")
    seed = commands.add_parser("seed-run", help="put shipped checkpoints into a run folder as finished stages")
    seed.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a pipeline run folder (created if needed)")
    seed.add_argument(
        "--stages", required=True, type=_comma_list, metavar="NAME,...", help="e.g. teacher,ta1,teacher_continuous"
    )
    seed.add_argument("--family", default="rlfn", help="the architecture family of the shipped files")
    seed.add_argument("--scale", type=int, default=2)
    seed.add_argument("--weights", type=Path, default=WEIGHTS_DIR,
                      help="the shipped-weights folder (default: the bundled one, also in a pip install)")
    export = commands.add_parser("export-state", help="a checkpoint of a run's saved state, to evaluate it part-way")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a stage's run folder (config.toml, state.pt)")
    export.add_argument("--state", type=Path, help="a copy of the state to export (default RUN_DIR/state.pt)")
    export.add_argument("--out", required=True, type=Path, help="the checkpoint to write (.safetensors)")
    latency = commands.add_parser("latency", help="inference time of checkpoints or registered models")
    latency.add_argument("targets", nargs="+", metavar="CHECKPOINT_OR_NAME",
                         help="checkpoint files, bundled checkpoint names or registered model names")
    latency.add_argument("--input", type=_size, default="960x540",
                         help="LR input WxH (a teacher reads the matching HR size)")
    latency.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    latency.add_argument("--repeats", type=_positive_int, default=5)
    latency.add_argument("--threads", type=_thread_count, default=0,
                         help="torch CPU threads (default 0: every usable core)")
    latency.add_argument("--json", type=Path, help="also write the timings here")
    return parser


def _train(args: argparse.Namespace) -> int:
    if args.resume is not None and args.run_dir is not None and args.run_dir.resolve() != args.resume.resolve():
        raise ValueError(f"--resume {args.resume} goes on in that folder; --run-dir {args.run_dir} does not apply (it "
                         "was ignored): to continue a copy, copy the folder and resume the copy")
    if args.resume is not None:
        config = _resumed_config(args.resume, args.config, args.set)
    elif args.config is None:
        raise ValueError("train needs --config FILE (or --resume RUN_DIR, which reads the run's own config)")
    else:
        config = load_config(args.config, args.set)
    run_dir = args.resume or args.run_dir or Path("runs") / config.experiment.name / config.stage.name
    result = train_stage(config, run_dir, resume=args.resume is not None)
    if is_main_process():  # once under torchrun
        print(f"{config.stage.name}: {result.steps} steps in {result.seconds:.0f} s -> {result.checkpoint}")
    return 0


def _resumed_config(run_dir: Path, config_path: Path | None, overrides: list[str]) -> Config:
    """The config a run continues with: the one it saved, plus ``--set`` changes made on purpose. A ``--config`` that
    differs from it is refused: continuing with another data source, network or schedule would quietly change the
    run (or end it at once) and overwrite what it was started with."""
    saved, state = run_dir / "config.toml", run_dir / STATE_FILE
    if not saved.is_file():  # the copy the state keeps, as the pipeline and export-state take it
        if not state.is_file():
            raise FileNotFoundError(f"nothing to resume: {saved} and {state} do not exist")
        print(f"note: {saved} does not exist: resuming with the config kept in {state}")
    config = _stage_config(run_dir, state, overrides)
    if config_path is not None:
        given = load_config(config_path, overrides).to_dict()
        differ = differing_keys(given, config.to_dict())
        if differ:
            keys = ", ".join(differ[:5]) + (" ..." if len(differ) > 5 else "")
            raise ValueError(f"{config_path} differs from the config {run_dir} was started with ({keys}); resume "
                             f"with --resume {run_dir} alone, and --set KEY=VALUE for a change made on purpose")
    return config


def _pipeline(args: argparse.Namespace) -> int:
    stage_keys = [item.split("=", 1)[0] for item in args.set if item.startswith("stage.")]
    if stage_keys:  # each stage's table comes from [experiment]: they were ignored without a word
        raise ValueError(f"--set {', '.join(stage_keys)}: the [stage] table is for `train`; the pipeline makes each "
                         "stage's from [experiment] (e.g. experiment.teacher_steps, ta_steps, student_steps) and "
                         "[optim] (optim.steps)")
    config = load_config(args.config, args.set)
    run_dir = args.run_dir or Path("runs") / config.experiment.name
    results = run_pipeline(config, run_dir, args.stages)
    if results is None:  # --stages, or a rank other than 0 under torchrun (rank 0 evaluates and reports)
        if args.stages and is_main_process():
            print(f"finished {', '.join(args.stages)} in {run_dir}")  # trained now, or kept (said above)
        return 0
    for set_name, data in results["sets"].items():
        means = {name: round(s["mean"]["psnr_rgb"], 2) for name, s in data["scores"].items()}
        print(f"{set_name}: mean PSNR RGB {means}")
    print(f"report: {run_dir / 'report.md'}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    models = [*args.checkpoint, *([args.teacher] if args.teacher else [])]
    scales = {read_metadata(path)["scale"] for path in models}  # the teacher too: a TA reads its CF'
    if len(scales) != 1:
        raise ValueError(f"the checkpoints (and --teacher) upscale by different factors {sorted(scales)}: evaluate "
                         "them separately")
    scale = scales.pop()
    eval_config = builtin_sets_config(args.sets, args.data, args.frames)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predictors = dict(baseline_predictors(scale))
    baselines = {name.casefold(): name for name in predictors}
    labels = unique_labels(args.checkpoint)
    for label, path in labels.items():
        # its scores would replace the baseline's row under its name, or sit beside it under one that differs only
        # by case (Lanczos beside lanczos), as if a baseline were scored twice
        if label.casefold() in baselines:
            raise ValueError(f"{path} would be labelled {label!r}, the name of a baseline "
                             f"({baselines[label.casefold()]}, case aside): rename the file")
        predictors[label] = checkpoint_predictor(path, device, args.teacher)
    weights = {label: weights_sha256(path) for label, path in labels.items()}
    score_sets(predictors, eval_config, scale, args.json, min_lr_side(models), weights)
    return 0


def _latency(args: argparse.Namespace) -> int:
    width, height = args.input
    device = args.device
    if args.json:
        check_output_file(args.json, "the timings")
    timings = {}
    for target in args.targets:
        model = build_model(target) if target in list_models() else load_model(resolve_checkpoint(target))
        if min(width, height) < min_lr_size(model):
            raise ValueError(f"{target} needs an LR input of at least {min_lr_size(model)} px a side, got "
                             f"{width}x{height}")
        try:
            timings[target] = measure_latency(model, width, height, device, repeats=args.repeats,
                                              threads=args.threads)  # fmt: skip
        except RuntimeError as exc:
            if (reason := out_of_memory_reason(exc)) is None:
                raise
            raise ValueError(f"{target} at {width}x{height} does not fit in {device} memory: {reason}") from None
        timing = timings[target]
        print(f"{target}: {timing['median_ms']:.1f} ms median at {timing['input']} on {latency_where(timing)}")
    if args.json:
        write_json_atomic(args.json, timings, indent=2, sort_keys=False)
    return 0


def _export_state(args: argparse.Namespace) -> int:
    state = args.state or args.run_dir / STATE_FILE
    if not state.is_file():
        instead = held_instead_of_a_state(args.run_dir) if args.state is None else ""
        raise FileNotFoundError(f"no saved state: {state} does not exist" + (f"; {instead}" if instead else ""))
    config = _stage_config(args.run_dir, state)
    path = export_state(state, config, args.out)
    training = read_metadata(path)["training"]
    print(f"{path}: {config.stage.name} at step {training['steps']} of {training['partial_of']}")
    return 0


def _stage_config(run_dir: Path, state: Path, overrides: list[str] | None = None) -> Config:
    config = started_with(run_dir, state, overrides)
    if config is None:
        raise FileNotFoundError(f"{run_dir / 'config.toml'} does not exist, and {state} keeps no copy of the config "
                                "(an older version's state): put the stage's config.toml back")
    return config


def _ship_checkpoint(args: argparse.Namespace) -> int:
    entry = ship_checkpoint(args.checkpoint, args.name, args.report_name, args.scores, args.out, label=args.label,
                            overwrite=args.overwrite)
    print(f"{args.out / (args.name + '.safetensors')}: {entry['report_name']}, {entry['params']:,} parameters")
    partial_of = entry["training"].get("partial_of")
    if partial_of:  # a snapshot or an exported state: weights.json says so too
        print(f"warning: {args.checkpoint} is a stage part-way, at step {entry['training']['steps']} of {partial_of}",
              file=sys.stderr)
    return 0


def _seed_run(args: argparse.Namespace) -> int:
    done = seed_run(args.run_dir, args.stages, weights_dir=args.weights, family=args.family, scale=args.scale)
    for stage, action in done.items():
        print(f"{args.run_dir / stage}: {action}")
    return 0


def _ship(args: argparse.Namespace) -> int:
    for name, entry in ship_run(args.run_dir, args.out, args.stages, overwrite=args.overwrite).items():
        print(f"{args.out / name}: {entry['report_name']}, {entry['params']:,} parameters")
        cut = cut_down_evaluation(entry)
        if cut:  # a smoke config's scores: recorded as such (weights.json "evaluation"), and said here
            print(f"warning: {name} was scored on a cut-down evaluation ({cut}; eval.crop / eval.max_images): its "
                  "scores do not compare with whole-set ones", file=sys.stderr)
    others = sorted(folder.name for folder in args.run_dir.iterdir() if folder.name not in SHIPPED
                    and (folder / FINAL_FILE).is_file())  # fmt: skip
    if others and args.stages is None:  # a second TA, the full backbone: left out without a word
        print(f"note: not shipped, as ship takes only {', '.join(SHIPPED)}: {', '.join(others)} (in {args.run_dir})",
              file=sys.stderr)
    return 0


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM outside the training steps (loading data or guides, between stages, evaluating) stops like Ctrl-C,
    with one line: it killed the process without a word. The training loop has handlers of its own."""
    raise TrainingInterrupted("stopped by SIGTERM outside the training steps; rerun the same command to go on "
                              "(finished stages are kept, an interrupted one resumes from its state.pt)", signum)


class _SkippedFilesOnce:
    """warnings.showwarning for the command line: a SkippedFilesWarning as one "warning: ..." line, each message once
    (a folder is scanned by the check before training, by every stage and by the evaluation: the same warning came
    two or three times, each with Python's echo of the source line that scanned); other warnings as Python shows
    them."""

    def __init__(self, default: Callable[..., None]) -> None:
        self.shown: set[str] = set()
        self.default = default  # how every other warning is shown

    def __call__(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
        if not issubclass(category, SkippedFilesWarning):
            self.default(message, category, filename, lineno, file, line)
        elif str(message) not in self.shown:
            self.shown.add(str(message))
            print(f"warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    escape_unprintable_names()  # before anything prints, argparse's errors included: a name may not be UTF-8
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    shown_before = warnings.showwarning
    warnings.showwarning = _SkippedFilesOnce(shown_before)
    try:
        return _run(args)
    finally:  # main() called from a program (or a test) gives the hook back
        warnings.showwarning = shown_before


_DISTRIBUTED_COMMANDS = ("train", "pipeline")  # what torchrun's ranks share; the others run whole in each


def _run(args: argparse.Namespace) -> int:
    handlers = {
        "train": _train, "pipeline": _pipeline, "evaluate": _evaluate, "latency": _latency, "ship": _ship,
        "ship-checkpoint": _ship_checkpoint, "seed-run": _seed_run, "export-state": _export_state,
    }  # fmt: skip
    if world_size() > 1 and args.command not in _DISTRIBUTED_COMMANDS:
        # each rank ran the whole command: two evaluations, and two ships racing for the same files (one failed)
        if is_main_process():
            print(f"error: {args.command} runs in one process; run it without torchrun (only "
                  f"{' and '.join(_DISTRIBUTED_COMMANDS)} train on several)", file=sys.stderr)
        return 2
    try:
        return handlers[args.command](args)
    except TrainingInterrupted as exc:
        if is_main_process():  # every rank stops at the same step: one line says so
            print(f"stopped: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (the loop turns its own into TrainingInterrupted)
        print("stopped: interrupted; rerun the same command to go on (finished stages are kept, an interrupted one "
              "resumes from its last state.pt)", file=sys.stderr)
        return 128 + signal.SIGINT
    # OSError: a folder or file that cannot be read or written (an unwritable run or cache folder, a full disk)
    except (NonFiniteLossError, OutOfMemoryError, DataWorkerError, CheckpointError, DatasetError, ValueError,
            OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def exit_with(status: int) -> NoReturn:
    """Exit with `status`. After a stop (128 + the signal), stop signals are ignored while the interpreter and torch
    tear down (about a second): a second signal within FORCE_AFTER_S of the first is the same stop delivered twice,
    and one landing here killed the process by that signal (status -2 to a Python caller), after "stopped: ..."."""
    if status > 128:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C is a KeyboardInterrupt again
    exit_with(main())

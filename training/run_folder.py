"""A stage folder's files besides its saved state: the lock one trainer holds on it while it trains, what marks a
pipeline's run folder, the temporary files a killed trainer left, and metrics.jsonl cut back to a resumed step.

Apart from the loop (training/trainer.py) because it is bookkeeping of the folder, not training: the loop takes the
lock and calls these before its first step.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
from collections.abc import Iterator
from pathlib import Path

from training.state import FINAL_FILE, STATE_FILE
from upscaler_server.files import missing_folders, remove_empty  # standard library only

__all__ = ["LOCK_FILE", "SNAPSHOT_DIR", "held_instead_of_a_state", "pipeline_files", "refuse_a_stage_folder",
           "remove_if_only", "remove_leftover_temporaries", "run_dir_lock", "truncate_metrics"]

LOCK_FILE = ".trainer.lock"  # held by the trainer of a stage folder (hidden: image scans pass over it)
SNAPSHOT_DIR = "snapshots"


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, holder: bool) -> Iterator[None]:
    """Hold `run_dir` for one trainer (rank 0 of a DDP run) while it trains: two in one stage folder (the same stage
    listed twice, or a pipeline started while scripts/train_parallel.sh still trains it) overwrote each other's
    state.pt, and one failed on the other's temporary file. The lock is the kernel's, so a killed trainer leaves
    none behind; the empty .trainer.lock file stays. Folders made for the lock go again when the run is refused
    before it trains (a mistyped --resume path leaves nothing behind)."""
    if not holder:
        yield
        return
    made = missing_folders(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK_FILE, "a")  # noqa: SIM115 (closed by the with below)
    except OSError:  # a read-only run folder: nobody trains there; the checks in the run say what is wrong with it
        lock = None
    if lock is None:
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # the other trainer's folder and lock: never touched
            raise ValueError(f"another trainer is training in {run_dir}: wait for it to end (or stop it) and run "
                             "this again") from None
        try:
            yield
        except BaseException:
            remove_if_only(run_dir, {LOCK_FILE}, made)  # while the lock is held: no other trainer is inside
            raise


def remove_if_only(run_dir: Path, names: set[str], made: list[Path]) -> None:
    """Remove the folders `made` (deepest first, from upscaler_server.files.missing_folders) when the run folder
    holds nothing but files of these `names`, which go too: a run refused or stopped before it trained leaves no
    folder behind."""
    if not made or not {path.name for path in run_dir.iterdir()} <= names:
        return
    for name in names:
        (run_dir / name).unlink(missing_ok=True)
    remove_empty(made)  # one that something was put into meanwhile stays, and so do the folders above it


def pipeline_files(run_dir: Path) -> list[str]:
    """What marks `run_dir` as a pipeline's run folder: its results.json, and its stage folders holding a state or
    final checkpoint (a run trained with --stages, or seeded, has no results.json)."""
    if not run_dir.is_dir():
        return []
    found = sorted(f"{folder.name}/" for folder in run_dir.iterdir() if folder.is_dir()
                   and ((folder / FINAL_FILE).exists() or (folder / STATE_FILE).exists()))  # fmt: skip
    if (run_dir / "results.json").exists():
        found.insert(0, "results.json")
    return found


def refuse_a_stage_folder(run_dir: Path, command: str) -> None:
    """FileExistsError when `run_dir` is one stage's folder (a `train` run, or a stage of a pipeline run), which
    `command` would make a pipeline's run folder of: the pipeline wrote its config.toml over the stage's, and that
    stage could be neither resumed nor exported any more."""
    held = [name for name in (STATE_FILE, FINAL_FILE) if (run_dir / name).is_file()]
    if held:
        raise FileExistsError(f"{run_dir} is one stage's folder (it holds {', '.join(held)}), not a pipeline's run "
                              f"folder, which holds a folder per stage: give `{command}` another run folder (a stage's "
                              "folder is trained further with `python -m training train --resume`)")


def held_instead_of_a_state(run_dir: Path) -> str:
    """What `run_dir`, which has no saved state, holds instead, for the refusal of a command that needs one
    (export-state): a finished stage, or a pipeline's run folder (seeded ones have no config.toml, and the message
    was about a missing config and the bundled configs' names). "" when it is none of these."""
    if not run_dir.is_dir():
        return f"{run_dir} is not a folder"
    if (run_dir / FINAL_FILE).is_file():
        return f"{run_dir} holds a finished stage: its checkpoint is {run_dir / FINAL_FILE}"
    stages = [folder.rstrip("/") for folder in pipeline_files(run_dir) if folder.endswith("/")]
    saved = [run_dir / stage for stage in stages if (run_dir / stage / STATE_FILE).is_file()]
    if saved:
        return (f"{run_dir} is a pipeline's run folder: name the folder of a stage with a state, "
                f"{', '.join(map(str, saved))}")
    if stages:
        return (f"{run_dir} is a pipeline's run folder whose stages ({', '.join(stages)}) are finished: their "
                f"checkpoints are {run_dir}/<stage>/{FINAL_FILE}")
    return ""


def remove_leftover_temporaries(run_dir: Path) -> None:
    """The temporary files of checkpoint and state writes that a killed trainer left (save_checkpoint's
    `.<name>.<random>`, `state.pt.tmp`): full-size copies nothing reads. Only called under the folder's lock, so no
    other trainer is writing them."""
    for folder, pattern in ((run_dir, f".{FINAL_FILE}.*"), (run_dir / SNAPSHOT_DIR, ".step_*.safetensors.*"),
                            (run_dir, STATE_FILE + ".tmp")):
        for leftover in folder.glob(pattern):
            with contextlib.suppress(OSError):
                leftover.unlink()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records up to the resumed step; a line that is not one (the half-written last line of a crash or a
    full disk, a hand edit) is dropped with the rest, since the log only reports and resuming needs none of it."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(errors="replace").splitlines() if _record_step(line) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _record_step(line: str) -> float:
    """The step of one metrics.jsonl record; infinity for a line that is not a record."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else math.inf

"""A stage folder's saved training state (RUN_DIR/state.pt): reading it back with its contents checked, the
checks a resume makes of it against this run (network, optimizer moments, schedule form, config, data, arithmetic
segments), and exporting its network part-way as a checkpoint.

Apart from the loop (training/trainer.py) because none of it needs a running trainer: `export-state` and the
pipeline read states too; the loop writes them and calls these to take one back.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import describe_shape_mismatch, save_checkpoint
from models.checkpoint import TRAINING_STATE_NAME
from training.config import Config, config_from_toml, differing_keys, load_config
from training.distill import TrainedModel
from training.stages import build_stage_network, stage_steps, training_summary

__all__ = [
    "FINAL_FILE", "STATE_FILE", "data_contents", "export_state", "first_line", "is_arithmetic_segment",
    "optimizer_state_mismatch", "print_changes", "read_state", "refuse_older_schedule", "sources_line",
    "started_with", "state_dict_mismatch",
]  # fmt: skip

STATE_FILE = TRAINING_STATE_NAME  # the name models.checkpoint gives a hint for
FINAL_FILE = "final.safetensors"


def read_state(path: Path, device: torch.device, needs: tuple[str, ...] = ()) -> dict[str, Any]:
    """A saved training state (RUN_DIR/state.pt) with at least `step`, `model` and `needs`; anything else
    (not a torch file, truncated, other contents) is a ValueError naming the file."""
    # weights_only: tensors and plain containers only, never arbitrary pickled objects.
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # torch's text for it advises weights_only=False: what this trainer never does
        raise ValueError(f"{path} is not a training state: not a torch file of tensors and plain containers "
                         "(another format, damaged, or pickled objects, which are never loaded)") from None
    except Exception as exc:  # weights_only cannot run code, so any failure here just means "not a state file"
        raise ValueError(f"{path} is not a training state ({type(exc).__name__}: {first_line(exc)})") from None
    missing = {"step", "model", *needs} - (state.keys() if isinstance(state, dict) else set())
    if missing:
        raise ValueError(f"{path} is not a training state (no {', '.join(sorted(missing))} entries)")
    step = state["step"]
    if not isinstance(state["model"], dict) or not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{path} is not a training state (its model is not a state dict or its step not a "
                         "non-negative int)")
    for key in ("seconds", "budget_spent", "budget_s"):  # read back as floats on a resume
        value = state.get(key, 0.0)
        # a range, not math.isfinite: an int past any float raised OverflowError there (a traceback), or in float()
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0 <= value <= sys.float_info.max):  # NaN fails every comparison
            raise ValueError(f"{path} is not a training state (its {key} {value!r:.40} is not a number of 0 or more)")
    last_loss = state.get("last_loss")
    if last_loss is not None and not (isinstance(last_loss, float) and math.isfinite(last_loss)):
        raise ValueError(f"{path} is not a training state (its last_loss {last_loss!r:.40} is not a finite number)")
    hashes = state.get("inputs_sha256")
    if hashes is not None and not (isinstance(hashes, list) and all(isinstance(h, str) for h in hashes)):
        raise ValueError(f"{path} is not a training state (its inputs_sha256 is not a list of strings)")
    return state


def started_with(stage_dir: Path, state_path: Path | None = None, overrides: list[str] | None = None
                 ) -> Config | None:
    """The config a stage was started with: its config.toml, else the copy its state (``state_path``, by default
    the folder's) keeps, for a state put back alone as the GPU scripts bring it back; None when that state is an
    older version's, without a copy. ``overrides``: `key=value` changes made on purpose (--set)."""
    if (stage_dir / "config.toml").is_file():
        return load_config(stage_dir / "config.toml", overrides)
    state_path = state_path or stage_dir / STATE_FILE
    saved = read_state(state_path, torch.device("cpu")).get("config")
    return config_from_toml(saved, state_path, overrides) if isinstance(saved, str) else None


def print_changes(path: Path, saved: Any, config: Config) -> None:
    """Say which keys a resumed run now trains with other values than its state was saved with: a change made on
    purpose (``--set``), or a state.pt put back from another run, which must not pass unnoticed."""
    if not isinstance(saved, str):  # a state of an older version: it kept no config
        return
    try:
        before = config_from_toml(saved, path).to_dict()
    except ValueError as exc:  # not valid TOML, or keys of another version
        print(f"note: the config kept in {path} cannot be read ({first_line(exc)}); resuming with this run's")
        return
    changed = differing_keys(_resolved_stage_paths(before), _resolved_stage_paths(config.to_dict()))
    if changed:
        keys = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
        print(f"note: resuming {path} with values other than it was saved with, for {keys}")


def _resolved_stage_paths(as_dict: dict[str, Any]) -> dict[str, Any]:
    """A config dict with its stage's guides and init_from resolved: a pipeline makes them from its run folder,
    which a resume may spell otherwise (relative, absolute) for the same files."""
    stage = as_dict["stage"]
    stage["init_from"] = str(Path(stage["init_from"]).resolve()) if stage.get("init_from") else ""
    stage["guides"] = [str(Path(path).resolve()) for path in stage.get("guides", [])]
    return as_dict


def state_dict_mismatch(module: nn.Module, saved: dict[str, Any]) -> str:
    """What keeps `saved` from loading into `module`, in one short line ("" when the names, shapes and kinds fit:
    load_state_dict would turn integer tensors into weights silently)."""
    expected = {name: list(tensor.shape) for name, tensor in module.state_dict().items()}
    stored = {name: list(value.shape) if isinstance(value, torch.Tensor) else None for name, value in saved.items()}
    mismatch = describe_shape_mismatch(expected, stored)
    not_float = [name for name, value in saved.items() if isinstance(value, torch.Tensor)
                 and not value.is_floating_point()]
    return mismatch or (f"{not_float[0]} holds {saved[not_float[0]].dtype}, not weights" if not_float else "")


def optimizer_state_mismatch(optimizer: torch.optim.Optimizer) -> str:
    """A loaded optimizer state whose moment tensors do not fit their parameters, in one line ("" when they do):
    Adam's load_state_dict takes them as they are, and the next step failed with a broadcast error."""
    for parameter, moments in optimizer.state.items():
        for key, value in moments.items():
            if key != "step" and isinstance(value, torch.Tensor) and value.shape != parameter.shape:
                return f"optimizer {key} of shape {list(value.shape)} for a parameter of {list(parameter.shape)}"
    return ""


def first_line(exc: BaseException) -> str:
    """An exception's first line: torch's messages go on for many lines of advice."""
    return str(exc).strip().split("\n", 1)[0]


def export_state(state_path: Path, config: Config, out: Path) -> Path:
    """A checkpoint of the network in a saved training state (RUN_DIR/state.pt, written every
    `checkpoint_every` steps), to evaluate a run part-way; `config` is the run's (RUN_DIR/config.toml).
    Its metadata says `partial_of` the stage's planned steps and the step it was saved at."""
    if out.suffix.lower() != ".safetensors":  # every loader takes the file by that name; x.onnx would be no ONNX
        raise ValueError(f"--out {out}: a checkpoint is a .safetensors file; name it so (for ONNX, export the "
                         "checkpoint with python -m upscaler_server.export)")
    if out.resolve() == (state_path.parent / FINAL_FILE).resolve():  # a part-way network in the finished one's place
        raise ValueError(f"{out} is the stage's own final checkpoint: export the state to another file")
    state = read_state(state_path, torch.device("cpu"))
    # the weights come from the state: build the bare network, without loading the teacher it started from
    network = build_stage_network(dataclasses.replace(config, stage=dataclasses.replace(config.stage, init_from="")))
    trained = TrainedModel(network)
    mismatch = state_dict_mismatch(trained, state["model"])
    try:
        if mismatch:
            raise ValueError(mismatch)
        trained.load_state_dict(state["model"])
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{state_path} does not hold this config's {config.stage.name} network: "
                         f"{first_line(exc)}") from None
    summary = training_summary(config, int(state["step"]), float(state.get("seconds", 0.0)))
    summary["partial_of"] = stage_steps(config)
    return save_checkpoint(network, out, role=config.stage.role, training=summary)


def refuse_older_schedule(path: Path, scheduler: Any, run_dir: Path) -> None:
    """ValueError for a state saved by a trainer before time budgets (before 2026-11-25), whose scheduler was a
    CosineAnnealingLR (T_max, eta_min): it was refused as if the config had changed, which it had not."""
    if isinstance(scheduler, dict) and "T_max" in scheduler and "lr_lambdas" not in scheduler:
        raise ValueError(f"{path} was saved by an older version of this trainer (its learning-rate schedule is kept "
                         f"in another form) and cannot be resumed; its network can: `python -m training export-state "
                         f"{run_dir} --out FILE.safetensors`, or remove {run_dir} to train the stage again")


def data_contents(sources: Any) -> Any:
    """Data sources' fingerprints without the folders' paths: what was read, wherever it lies."""
    if not isinstance(sources, list):
        return sources
    return [{k: v for k, v in s.items() if k != "path"} if isinstance(s, dict) else s for s in sources]


def sources_line(sources: Any) -> str:
    """Data sources' fingerprints in a line: a folder's image count and hash, a scene source's frame count."""
    if not isinstance(sources, list):
        return "not recorded"
    return "; ".join(_source_words(s) if isinstance(s, dict) else "?" for s in sources)


def _source_words(source: dict[str, Any]) -> str:
    if source.get("kind") == "scenes":
        return f"scenes: {source.get('frames')} frames"
    return f"{source.get('path')}: {source.get('images')} images, sha256 {str(source.get('sha256'))[:12]}"


def is_arithmetic_segment(segment: Any) -> bool:
    """Whether a state's arithmetic_history entry has the shape this trainer writes."""
    return (isinstance(segment, dict) and isinstance(segment.get("arithmetic"), str)
            and isinstance(segment.get("from_step"), int) and not isinstance(segment.get("from_step"), bool))

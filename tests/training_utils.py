"""Helpers for the trainer tests: a synthetic image folder, a tiny experiment config, the analysis scripts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest

from training.config import Config, from_dict
from training.trainer import _Trainer

SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "smoke_cpu.toml"


def stop_at_step(monkeypatch: pytest.MonkeyPatch, last_step: int) -> None:
    """Every run set going while ``monkeypatch`` holds sets the Ctrl-C flag, as SIGINT does, once it has done
    ``last_step`` steps: it saves its state and raises TrainingInterrupted."""
    original_step = _Trainer._step

    def step_then_stop(self: _Trainer, loss_module, batch, step):  # type: ignore[no-untyped-def]
        terms = original_step(self, loss_module, batch, step)
        self.stop_requested = self.stop_requested or step + 1 == last_step
        return terms

    monkeypatch.setattr(_Trainer, "_step", step_then_stop)


def load_script(path: Path) -> ModuleType:
    """A script of scripts/ imported as a module (they are not a package), to test its functions directly."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_image_folder(folder: Path, count: int = 6, size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """PNG images of random rectangles, lines and text: sharp edges for the networks to learn."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    height, width = size
    for index in range(count):
        image = np.full((height, width, 3), rng.integers(0, 255, 3), np.uint8)
        for _ in range(25):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            p1 = tuple(int(v) for v in rng.integers(0, max(size), 2))
            p2 = tuple(int(v) for v in rng.integers(0, max(size), 2))
            cv2.rectangle(image, p1, p2, colour, -1 if rng.random() < 0.5 else 1)
            cv2.putText(image, "Ab3", p1, cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1)
        cv2.imwrite(str(folder / f"img{index}.png"), image)
    return folder


def tiny_config(folder: Path, **sections: dict) -> Config:
    """A narrow RLFN experiment on `folder`; `sections` update the config's tables."""
    raw: dict = {
        "experiment": {"name": "tiny", "channels": 8, "teacher_blocks": 2, "ta_blocks": [1], "encoder_channels": 8},
        "optim": {"steps": 6, "batch_size": 2},
        "runtime": {"workers": 0, "log_every": 1, "checkpoint_every": 1000, "progress": False, "threads": 1},
        "data": {"patch_size": 32, "sources": [{"kind": "folder", "path": str(folder)}]},
        "eval": {"cg_dev": False, "rendered_val": False, "folders": [str(folder)], "max_images": 2, "crop": 64},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)

"""Helpers for the client_demo tests: run the demo as a subprocess that cannot hang, tiny student checkpoints,
and what a spawned daemon may leave behind. Imported by tests/test_demo_*.py (not a conftest)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHM_DIR = pathlib.Path("/dev/shm")
DEMO_TIMEOUT = 120.0  # s for one demo run: renderer start-up plus a cold daemon on a busy 2-core machine
XVFB_SCREEN = "-screen 0 1024x768x24"  # 24-bit: GLX needs a TrueColor visual


def make_checkpoint(path: pathlib.Path, channels: int = 8, seed: int = 0) -> pathlib.Path:
    """A random-init rlfn_s student saved as a real checkpoint (tests may import torch; the demo may not)."""
    import torch

    import models

    torch.manual_seed(seed)
    return models.save_checkpoint(models.build_model("rlfn_s", scale=2, channels=channels), path, role="student")


def demo_command(*args: str, xvfb: bool = False) -> list[str]:
    command = [sys.executable, "-m", "client_demo", *args]
    if not xvfb:
        return command
    xvfb_run = shutil.which("xvfb-run")
    if xvfb_run is None:
        pytest.fail("xvfb-run is not installed (Debian package xvfb), so window mode cannot be tested without a "
                    "display; bash scripts/setup.sh --dev installs it")
    return [xvfb_run, "-a", "-s", XVFB_SCREEN, *command]


def run_demo(*args: str, xvfb: bool = False, timeout: float = DEMO_TIMEOUT, command: Sequence[str] | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m client_demo ARGS`` (or ``command``) from the repository root, with ``env`` added to the
    environment; fail, never hang, on timeout."""
    env = {**{k: v for k, v in os.environ.items() if k != "DISPLAY"}, **(env or {})}  # a developer's display: not ours
    try:
        return subprocess.run(command or demo_command(*args, xvfb=xvfb), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the demo did not finish within {timeout} s:\n{exc.stdout}\n{exc.stderr}")


def output_of(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def daemon_pid(stderr: str) -> int:
    """The spawned daemon's pid, from the demo's "upscaler daemon ready (pid N)" line."""
    match = re.search(r"upscaler daemon ready \(pid (\d+)\)", stderr)
    assert match, f"the demo did not report its daemon's pid:\n{stderr}"
    return int(match.group(1))


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def segments_of(pid: int) -> list[str]:
    """Shared-memory segments of daemon ``pid`` (named /takdsr-<uid>-<pid>-..., docs/protocol.md)."""
    return sorted(p.name for p in SHM_DIR.glob(f"takdsr-{os.geteuid()}-{pid}-*")) if SHM_DIR.is_dir() else []


def read_stats(out: pathlib.Path) -> dict[str, Any]:
    return json.loads((out / "stats.json").read_text())


def read_png(path: pathlib.Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} is not a readable image"
    return image[..., ::-1]

"""What a run's numbers depend on besides its config and its data, recorded so that a run can be repeated.

``environment()`` (library versions and the code's commit) goes into every checkpoint the trainer writes and into
results.json; ``arithmetic()`` names where a step's floating-point results come from. A run resumed on other
arithmetic (another thread count, CPU or GPU, number of ranks, torch version) goes on correctly, but its steps are not
bit-identical to those an uninterrupted run would have taken: the trainer says so, and the checkpoint keeps each
segment's arithmetic.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import cv2
import numpy as np
import torch

from upscaler_server import cpu_model  # standard library only (docs/architecture.md)

__all__ = ["arithmetic", "environment"]

PACKAGE = "takdsr-upscaler"
_SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the checkout (or site-packages) this code runs from


def environment() -> dict[str, str | None]:
    """Versions of Python and of the libraries the numbers go through, this package's, and the git commit of the
    checkout it runs from (``-dirty`` when tracked files differ from it; None outside a git checkout). Found once per
    process: the code that runs is the code imported, whatever is edited later, and every checkpoint a trainer saves
    (each snapshot too) would otherwise run git twice."""
    return dict(_environment_once())


@functools.cache
def _environment_once() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        PACKAGE: _package_version(),
        "git_commit": _git_commit(),
    }


def arithmetic(device: torch.device, ranks: int) -> str:
    """Where a training step's floating-point results come from: the GPU, or the CPU's model and thread count
    (oneDNN splits work and picks kernels by both), the number of ranks and torch's version."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_model()}, {torch.get_num_threads()} threads"
    return f"{device.type}: {where}; {ranks} rank(s); torch {torch.__version__}"


def _package_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return None


def _git_commit() -> str | None:
    if not (_SOURCE_ROOT / ".git").exists():
        return None
    try:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git installed, or a broken checkout: nothing to record
        return None
    return head + ("-dirty" if dirty else "")


def _git(*args: str) -> str:
    # GIT_OPTIONAL_LOCKS=0: `git status` would refresh .git/index under index.lock, and a `git commit` of the user's
    # at that moment failed ("index.lock: File exists")
    done = subprocess.run(["git", "-C", str(_SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10,
                          check=True, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    return done.stdout.strip()

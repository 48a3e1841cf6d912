"""The demo's settings (one dataclass built from the command line) and its exit statuses."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "CHECKPOINT_METADATA_KEY",
    "DEFAULT_AUTO_BACKENDS",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NO_WINDOW",
    "EXIT_OK",
    "EXIT_SPAWN",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "NATIVE_STUDENT_FILE",
    "SR_CAPTION",
    "DaemonWatch",
    "DemoConfig",
]

EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected error (a traceback is printed)
EXIT_USAGE = 2  # invalid arguments, or the daemon refuses this stream (scale, size)
EXIT_UNAVAILABLE = 3  # headless: the upscaler could not be reached, or stopped answering mid-run
EXIT_SPAWN = 4  # --spawn-server: the daemon could not start (its log is printed)
EXIT_NO_WINDOW = 5  # no display (window mode) or no OpenGL 3.3 context (either mode)
EXIT_INTERRUPTED = 130  # Ctrl-C, SIGTERM or SIGHUP

# The bundled student trained on natively rendered LR (models.NATIVE_STUDENT_PATH's name; the demo does not
# import `models`, which imports torch): the spawned daemon's default.
NATIVE_STUDENT_FILE = "rlfn_s_native_x2.safetensors"
CHECKPOINT_METADATA_KEY = "takdsr"  # models.checkpoint.METADATA_KEY, repeated: importing models imports torch

# What the spawned daemon's `--backend auto` may pick from unless --auto-backends says otherwise: eager PyTorch in
# fp32, or in bf16 (a CPU with bf16 instructions) / fp16 (CUDA) when that is faster and within auto's tolerance.
# Measuring these costs a few seconds before the first frame of a size (then cached on disk); compile's candidates
# would cost tens of seconds of compilation on a CPU before the first upscaled frame.
DEFAULT_AUTO_BACKENDS = ("eager",)

# The caption of the upscaled half of the split view (window and headless); the model's name is in the HUD.
SR_CAPTION = "upscaled (SR)"

# Returns why the spawned daemon is gone (e.g. "was killed by signal 9 (SIGKILL)"), or None while it runs or when
# not spawned.
DaemonWatch = Callable[[], str | None]


@dataclass(frozen=True)
class DemoConfig:
    """Everything a run needs; see ``python -m client_demo --help``."""

    endpoint: str | None = None  # daemon endpoint; None: the client's default (or the spawned daemon's)
    spawn_server: bool = False  # start (and stop) a daemon of our own
    checkpoint: pathlib.Path | None = None  # for the spawned daemon; None: the bundled native-LR student
    device: str = "auto"  # for the spawned daemon
    backend: str = "auto"  # for the spawned daemon: its --backend (not nearest, which runs no checkpoint)
    auto_backends: tuple[str, ...] = DEFAULT_AUTO_BACKENDS  # for the spawned daemon's --backend auto
    scene: str = "city"  # scenes preset
    lr_size: tuple[int, int] = (640, 360)  # rendered (low-resolution) size
    scale: int = 2  # the daemon's factor; HR = LR * scale
    view: str = "split"  # split, sr, bilinear or native
    compare: str = "bilinear"  # right half of the split view: bilinear or native
    timeout: float = 10.0  # s without a daemon reply before reconnecting
    out: pathlib.Path | None = None  # headless output folder / window screenshot folder
    headless: bool = False
    frames: int = 120  # headless: frames to render
    fps: float = 30.0  # headless: frame rate of the camera path's clock and of the MP4
    start: float = 0.0  # s on the camera path of the first frame
    max_fps: float = 60.0  # window: frame-rate cap (spares the CPU that the daemon needs)
    screenshot_after: int | None = None  # window: save a screenshot after this many frames (tests)
    exit_after: int | None = None  # window: quit after this many frames (tests)

    @property
    def hr_size(self) -> tuple[int, int]:
        return self.lr_size[0] * self.scale, self.lr_size[1] * self.scale

"""Real-time upscaling daemon, its client library and tools.

Importing the package (or :mod:`upscaler_server.client`) loads no torch: the client side is numpy, pyzmq and msgpack
only. The daemon (``python -m upscaler_server``) loads the engine, which imports torch and ``models``.
"""

import contextlib
import ctypes
import pathlib
import platform
import signal
import sys
from collections.abc import Callable, Sequence

__version__ = "0.3.0.dev0"

__all__ = ["__version__", "cpu_model", "daemon_command", "die_with_parent"]

_PR_SET_PDEATHSIG = 1

# `python -m upscaler_server`, with the folder that holds this installation's packages first on the import path, in
# place of the current folder ('' for -c; absent under -P / PYTHONSAFEPATH, when the first entry is a PYTHONPATH one
# and stays); the folder comes first in argv and is taken out before the daemon parses it
_BOOTSTRAP = ("import runpy, sys; root = sys.argv.pop(1); "
              "sys.path[:1] = [root] if sys.path[:1] == [''] else [root, *sys.path[:1]]; "
              "runpy.run_module('upscaler_server', run_name='__main__', alter_sys=True)")


def daemon_command(args: Sequence[str]) -> list[str]:
    """The command that starts the daemon with ``args`` in a child process (the demo's and the benchmark's), on the
    packages this process imported. Plain ``python -m upscaler_server`` puts the current folder first on the import
    path, so a user's own ``models`` or ``training`` package there (research folders often have one) was imported
    instead, and the daemon failed to start."""
    packages_root = str(pathlib.Path(__file__).resolve().parent.parent)
    return [sys.executable, "-c", _BOOTSTRAP, packages_root, *args]


def _set_death_signal() -> None:
    """In the child, between fork and exec: the kernel sends it SIGTERM when its parent dies (even by SIGKILL),
    and the daemon then stops cleanly (its shared memory unlinked)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def die_with_parent() -> Callable[[], None] | None:
    """``preexec_fn`` for a daemon that must not outlive the tool that started it (Linux; None elsewhere)."""
    return _set_death_signal if sys.platform == "linux" else None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows: for the auto backend's cache key
    and the benchmark's record."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    return model

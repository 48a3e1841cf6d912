"""Real-time upscaling daemon, its client library and tools.

Importing the package (or :mod:`upscaler_server.client`) loads no torch: the client side is numpy, pyzmq and msgpack
only. The daemon (``python -m upscaler_server``) loads the engine, which imports torch and ``models``.
"""

import pathlib
import sys
from collections.abc import Sequence

__version__ = "0.1.0"

__all__ = ["__version__", "daemon_command"]

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

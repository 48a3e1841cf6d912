"""The console set-up every command-line entry point of the project runs first (the daemon, the offline CLI, the
export, the benchmark, the status command, the demo, ``python -m models``, ``python -m training`` and
``python -m training.data``).

Standard library only, and so is ``upscaler_server/__init__``: the trainer and ``python -m models`` import it without
loading the daemon, torch-free clients (the demo) without loading torch (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import sys

from upscaler_server import __version__

__all__ = ["add_version_option", "drop_stdout", "escape_unprintable_names", "ignore_the_working_folder"]

_PROJECT = pathlib.Path(__file__).resolve().parents[1]  # the checkout (or site-packages) holding our packages


def add_version_option(parser: argparse.ArgumentParser) -> None:
    """``--version``: the package's name and version, the same for every command (one distribution ships them all,
    and a bug report needs it)."""
    parser.add_argument("--version", action="version", version=f"takdsr-upscaler {__version__}")


def drop_stdout() -> None:
    """Point stdout at /dev/null after a write to it failed (``| head`` closed the pipe, a full disk), so that the flush
    at exit does not fail again on what could not be written."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def escape_unprintable_names() -> None:
    """Make sys.stdout and sys.stderr write what their encoding cannot hold as backslash escapes.

    A file or folder name that is not valid UTF-8 (a Latin-1 name from an old archive) is held by Python as
    surrogates ('r\\udce9un'); under a strict UTF-8 locale (Python then encodes stdout and stderr with
    errors='strict') printing it crashed the command after its work was done ("'utf-8' codec can't encode character
    '\\udce9'", and a failing exit status). It is printed as 'r\\udce9un' instead. Streams that are not text files
    (replaced by a caller, or None without a console) are left alone."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def ignore_the_working_folder() -> None:
    """Take the working folder off the front of sys.path, where ``python -m`` put it, unless the project's packages
    are there (a checkout run from its root). Its folders otherwise hide ours: a ``models`` folder in $HOME, where
    systemd runs user units, was imported instead of the project's, and the daemon failed to start ("module 'models'
    has no attribute 'DEFAULT_STUDENT_PATH'"). What ``python -P`` does (3.11+), for every supported Python; called
    before the project's other packages are imported."""
    if not sys.path:
        return
    first = pathlib.Path(sys.path[0] or os.curdir).resolve()
    if first == pathlib.Path.cwd().resolve() and first != _PROJECT:
        del sys.path[0]

"""The console set-up every command-line entry point of the project runs first (the daemon, the offline CLI, the
export, the benchmark, the demo, ``python -m models``, ``python -m training`` and ``python -m training.data``).

Standard library only, and so is ``upscaler_server/__init__``: the trainer and ``python -m models`` import it without
loading the daemon, torch-free clients (the demo) without loading torch (docs/architecture.md).
"""

from __future__ import annotations

import io
import sys

__all__ = ["escape_unprintable_names"]


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

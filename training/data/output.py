"""The output folder of a data command (`python -m training.data povray|scenes --out`), claimed before any work.

Checked first, so that minutes of rendering are not lost: it must not be evaluation data (guards.py), it is made
and must take a file (an unwritable folder failed only after the first render), and one command at a time writes
into it (two `povray` commands into one folder each rewrote the manifest from their own copy, and each lost the
other's records). A command that fails or is stopped removes the folders it made and left empty.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from training.data.guards import refuse_evaluation_output
from training.data.images import DatasetError
from upscaler_server.files import check_writable, make_folder, remove_empty  # standard library only

__all__ = ["LOCK_FILE", "claimed_output"]

LOCK_FILE = ".training-data.lock"  # held by the command writing into the folder (hidden: image scans pass over it)


@contextlib.contextmanager
def claimed_output(out: Path) -> Iterator[None]:
    """Hold `out` for this command while the block runs (see the module docstring). DatasetError for evaluation data
    or a folder another data command holds, FolderError (an OSError) for one that cannot be made or written. The
    lock is the kernel's, so a killed command leaves none; the empty lock file stays, as the trainer's does."""
    refuse_evaluation_output(out)
    made = make_folder(out, f"the output folder {out}")
    before = set(_entries(out))
    try:
        check_writable(out)
        lock = open(out / LOCK_FILE, "a")  # noqa: SIM115 (closed by the with below)
    except BaseException:
        remove_empty(made)
        raise
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # the other command's folder: never touched
            raise DatasetError(f"another python -m training.data command writes into {out}: wait for it to end, "
                               "or choose another --out") from None
        try:
            yield
        finally:  # a failure, or a stop before anything was written; while the lock is held: no other command is in
            _remove_left_empty(out, before, made)


def _entries(folder: Path) -> list[str]:
    return [path.name for path in folder.iterdir()]


def _remove_left_empty(out: Path, before: set[str], made: list[Path]) -> None:
    """What this command made in `out` and left empty (the scenes command's hr/ and lr_x<s>/ when its first frame
    failed), then `out` itself and the folders above it that it made, if nothing else is there."""
    remove_empty([out / name for name in set(_entries(out)) - before if (out / name).is_dir()])
    if made and set(_entries(out)) <= {LOCK_FILE}:
        (out / LOCK_FILE).unlink(missing_ok=True)
        remove_empty(made)

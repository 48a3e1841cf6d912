"""Writing output files whole: a hidden temporary file beside the target, moved onto it only when complete.

Used by the offline CLI, the ONNX export and the benchmark's JSON, so that a full disk, an error or a Ctrl-C
leaves the earlier file (or none), never a truncated one that looks finished.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
from collections.abc import Iterator

__all__ = ["partial_beside", "publish"]


@contextlib.contextmanager
def partial_beside(target: pathlib.Path) -> Iterator[pathlib.Path]:
    """A path for the temporary file beside ``target``, removed when the block ends (published or not). Its name is
    short (a long target name plus a suffix would pass the 255-byte limit) and random (two runs writing into one
    folder never share it); the file is created by whoever writes it, with the usual permissions."""
    partial = target.with_name(f".{target.name[:32]}.{secrets.token_hex(4)}.part")
    try:
        yield partial
    finally:
        partial.unlink(missing_ok=True)


def publish(partial: pathlib.Path, target: pathlib.Path, *, overwrite: bool) -> None:
    """Move the finished ``partial`` onto ``target``. Without ``overwrite`` a file that appeared at ``target`` since
    the caller checked is never replaced (FileExistsError): a hard link is made, which fails on an existing name,
    and the partial is left for partial_beside to remove."""
    if overwrite:
        os.replace(partial, target)
        return
    try:
        os.link(partial, target)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this filesystem (some network or FUSE ones): check, then move
        if os.path.lexists(target):
            raise FileExistsError(f"{target} exists") from None
        os.replace(partial, target)

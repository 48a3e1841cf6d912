"""Whether another process holds the flock(2) lock a daemon keeps on one of its files for its whole life: the
endpoint's lock file (endpoint.py) and each shared-memory segment it made (shm.py). The kernel drops such a lock
when its holder dies, SIGKILL too, so a held lock means a live daemon, whatever its pid looks like from here (pid
namespaces that share /dev/shm)."""

from __future__ import annotations

import fcntl
import os
import pathlib

__all__ = ["held"]


def held(path: str | pathlib.Path) -> bool:
    """True when a live process holds a lock on the file at ``path``. Opened read-only, without following a link or
    blocking (a FIFO planted under the name) and without creating it; a file that cannot be opened is held by
    nobody. The probe's own lock, if it gets one, goes with its descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # gone, never made, or a link planted under the name
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False

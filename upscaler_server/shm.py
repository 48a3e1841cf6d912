"""POSIX shared-memory rings of frame slots, their naming, and removal of segments left by dead daemons.

Only the daemon creates and unlinks segments. Names are ``/takdsr-<uid>-<pid>-<session as 8 hex digits>-<in|out>``:
the pid of the owning daemon tells a later daemon whether the owner is still alive. Torch-free (the client uses it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import pathlib
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

from upscaler_server.errors import SharedMemoryError
from upscaler_server.locks import held
from upscaler_server.protocol import Segment

__all__ = ["SHM_DIR", "SLOT_ALIGN", "Ring", "RingLayout", "SlotFrame", "check_segment_name", "pid_alive",
           "probe_kernel_copy", "remove_stale_segments", "segment_name"]

log = logging.getLogger("upscaler_server.shm")

SLOT_ALIGN = 4096  # slot starts are page-aligned so a slot can be mapped, DMA'd or pinned on its own
SHM_DIR = pathlib.Path("/dev/shm")  # where Linux exposes POSIX shared memory; absent elsewhere (no stale scan)
_PREFIX = "takdsr"
_NAME = re.compile(rf"/{_PREFIX}-(\d+)-(\d+)-([0-9a-f]{{8}})-(in|out)")  # segment_name's: uid, pid, session, kind
_WARNED_OF: set[str] = set()  # kinds of tampering with owned segments this process warned of (_first_warning)


@dataclass(frozen=True)
class RingLayout:
    """Byte layout of a ring: ``slots`` frames of height x width x channels uint8, tightly packed rows."""

    width: int
    height: int
    channels: int
    slots: int

    @property
    def row_stride(self) -> int:
        return self.width * self.channels

    @property
    def slot_bytes(self) -> int:
        return self.row_stride * self.height

    @property
    def slot_stride(self) -> int:
        return -(-self.slot_bytes // SLOT_ALIGN) * SLOT_ALIGN

    @property
    def size(self) -> int:
        return self.slot_stride * self.slots

    def segment(self, name: str) -> Segment:
        """The wire description of a segment with this layout."""
        return Segment(name=name, size=self.size, slot_stride=self.slot_stride, slot_bytes=self.slot_bytes,
                       row_stride=self.row_stride)

    def check(self, seg: Segment) -> None:
        """Raise SharedMemoryError when ``seg`` (from the daemon) disagrees with this layout."""
        if self.segment(seg.name) != seg:
            raise SharedMemoryError(f"segment {seg.name} layout {seg} does not match the expected {self}")


def segment_name(pid: int, session: int, kind: str) -> str:
    """Wire name (leading slash) of a session's ``kind`` ("in" or "out") segment owned by daemon ``pid``."""
    return f"/{_PREFIX}-{os.geteuid()}-{pid}-{session:08x}-{kind}"


def check_segment_name(name: str, session: int, kind: str) -> None:
    """SharedMemoryError unless ``name`` is what a daemon of this process's user calls session ``session``'s ``kind``
    segment. Checked before mapping it: a process that answers in the daemon's place (one that took a tcp port
    first) could otherwise name another application's segment of this user, private as the daemon's are, and the
    client would write its frames into it and read that application's bytes back as a result."""
    match = _NAME.fullmatch(name)
    if match is None or int(match.group(3), 16) != session or match.group(4) != kind:
        expected = f"/{_PREFIX}-{os.geteuid()}-<daemon pid>-{session:08x}-{kind}"
        raise SharedMemoryError(f"the daemon named {name!r} as session {session}'s {kind}put segment, where a daemon "
                                f"names it {expected}: refused, as whatever answered may be no upscaler daemon")
    if int(match.group(1)) != os.geteuid():
        raise SharedMemoryError(f"shared memory {name} is named for uid {match.group(1)}, and this process runs as uid "
                                f"{os.geteuid()}: a daemon serves only its own user's clients; run the client as the "
                                "daemon's user, or start a daemon of your own")


class Ring:
    """A mapped segment holding a ring of frame slots; ``owner`` rings were created here and may be unlinked."""

    def __init__(self, shm: _Mapping, layout: RingLayout, owner: bool) -> None:
        self._shm: _Mapping | None = shm
        self.layout = layout
        self.owner = owner
        self.name = "/" + shm.name.lstrip("/")
        self._unlinked = False

    @classmethod
    def create(cls, name: str, layout: RingLayout) -> Ring:
        """Create a new 0600 segment (fails if the name exists) with its pages reserved up front."""
        _check_space(layout.size)
        try:
            shm = _Mapping(name=name.lstrip("/"), create=True, size=layout.size)
        except OSError as exc:
            raise SharedMemoryError(f"cannot create shared memory {name} ({layout.size} bytes): {exc}") from exc
        ring = cls(shm, layout, owner=True)
        try:
            # a shared lock for as long as the descriptor is open (the kernel drops it however this process ends):
            # what tells another daemon that the segment's owner lives, where pids cannot (remove_stale_segments)
            fcntl.flock(shm._fd, fcntl.LOCK_SH)  # type: ignore[attr-defined]
            _reserve(shm._fd, name, layout.size)  # type: ignore[attr-defined]
        except BaseException as exc:  # whatever failed, the segment goes: it was left behind with no session
            ring.unlink()
            ring.close()
            if isinstance(exc, OSError) and not isinstance(exc, SharedMemoryError):  # an INTERNAL reply before
                raise SharedMemoryError(f"cannot set up shared memory {name} ({layout.size} bytes): {exc}") from exc
            raise
        return ring

    @classmethod
    def attach(cls, name: str, layout: RingLayout) -> Ring:
        """Map an existing segment without letting Python's resource tracker unlink it at our exit; only one of this
        process's effective user's, private to that user (SharedMemoryError otherwise)."""
        try:
            shm = _attach_untracked(name.lstrip("/"))
        except PermissionError as exc:  # not gone: another user's (a daemon serves only its own user's clients)
            raise SharedMemoryError(f"cannot attach shared memory {name}: {_whose(name)}") from exc
        except OSError as exc:
            raise SharedMemoryError(f"cannot attach shared memory {name}: {exc}; is the daemon still running?") \
                from exc
        try:
            _check_private(name, os.fstat(shm._fd))
        except SharedMemoryError:
            shm.close()
            raise
        if shm.size < layout.size:
            shm.close()
            raise SharedMemoryError(f"shared memory {name} has {shm.size} bytes, expected {layout.size}")
        return cls(shm, layout, owner=False)

    def slot(self, index: int) -> np.ndarray:
        """Zero-copy (height, width, channels) uint8 view of slot ``index``. The view holds an export of the mapping
        (through its own memoryview slice), so the mapping outlives :meth:`close` for as long as the view lives."""
        start = self._slot_offset(index)
        assert self._shm is not None  # _slot_offset checked
        lay = self.layout
        return np.frombuffer(self._shm.buf[start : start + lay.slot_bytes], np.uint8).reshape(
            lay.height, lay.width, lay.channels)

    def _slot_offset(self, index: int) -> int:
        """Byte offset of slot ``index`` in the segment, once the ring is known open and the index in range."""
        if self._shm is None:
            raise SharedMemoryError(f"shared memory {self.name} is closed")
        if not 0 <= index < self.layout.slots:
            raise IndexError(f"slot {index} out of range [0, {self.layout.slots})")
        return index * self.layout.slot_stride

    def read_slot(self, index: int, dst: np.ndarray) -> None:
        """Copy slot ``index`` into ``dst`` (C-contiguous, ``slot_bytes`` bytes) with pread(2), not through the
        mapping: a segment that a client shrinks meanwhile gives a short read here (SharedMemoryError), where reading
        the mapping's lost pages would kill this process with SIGBUS."""
        fd, start, view = self._io_args(index, dst)
        done = 0
        while done < len(view):
            try:
                count = os.preadv(fd, [view[done:]], start + done)
            except OSError as exc:
                raise SharedMemoryError(f"cannot read slot {index} of {self.name}: {exc}") from exc
            if count == 0:  # end of file: the segment is shorter than its layout
                self.check_intact()
                raise SharedMemoryError(f"shared memory {self.name} ended inside slot {index}")
            done += count

    def write_slot(self, index: int, src: np.ndarray) -> None:
        """Copy ``src`` (C-contiguous, ``slot_bytes`` bytes) into slot ``index`` without touching the mapping from
        this process's own code (see :meth:`read_slot`): the kernel copies into the mapping (process_vm_writev on
        this very process), so a page lost to a shrink ends the copy with EFAULT, never SIGBUS, and nothing takes the
        file's lock, which a client resizing its segment would hold for as long as its call runs (tmpfs: ftruncate,
        fallocate); pwrite(2) where that system call is not allowed (seccomp)."""
        fd, start, view = self._io_args(index, src)
        self.check_intact()
        if not _kernel_copy_allowed():
            self._pwrite_slot(index, fd, start, view)
            return
        assert self._shm is not None  # _io_args checked
        slot_address = _buffer_address(self._shm.buf) + start
        done = 0
        while done < len(view):
            copied, error = _kernel_copy(slot_address + done, src.ctypes.data + done, len(view) - done)
            if copied > 0:
                done += copied
            elif not _kernel_copy_allowed():  # refused on its first use: pwrite from here on
                self._pwrite_slot(index, fd, start + done, view[done:])
                return
            else:
                self.check_intact()  # a shrink: "was truncated to N bytes"
                cause = _lost_page_cause(error, len(view) - done)
                raise SharedMemoryError(f"cannot write slot {index} of {self.name}: {cause}")

    def _pwrite_slot(self, index: int, fd: int, offset: int, view: memoryview) -> None:
        """pwrite(2) fallback of :meth:`write_slot` (``view`` to the file at ``offset``): a segment shrunk between
        the size check and the write grows back to the slot's end, as a write past the end of a file does; only
        that segment's client sees it."""
        done = 0
        while done < len(view):
            try:
                done += os.pwritev(fd, [view[done:]], offset + done)
            except OSError as exc:  # ENOSPC: a shrunk tmpfs segment grown back on a full tmpfs
                raise SharedMemoryError(f"cannot write slot {index} of {self.name}: {exc}") from exc

    def _io_args(self, index: int, array: np.ndarray) -> tuple[int, int, memoryview]:
        """Descriptor, byte offset of slot ``index`` and a byte view of ``array``, once both are checked."""
        start = self._slot_offset(index)
        assert self._shm is not None  # _slot_offset checked
        if array.dtype != np.uint8 or array.nbytes != self.layout.slot_bytes or not array.flags.c_contiguous:
            raise ValueError(f"a slot of {self.name} holds {self.layout.slot_bytes} contiguous uint8 bytes, got "
                             f"{array.shape} {array.dtype}")
        return self._shm._fd, start, memoryview(array).cast("B")

    def check_intact(self) -> None:
        """Raise SharedMemoryError when the segment is now smaller than its layout: a client that opened it with
        O_TRUNC or ftruncate()d it to a wrong size. Touching the lost pages would kill this process (SIGBUS), so
        the daemon checks when a frame is submitted, and then has the kernel copy its slots (read_slot, write_slot),
        or, with --map-slots, checks again when the engine takes the frame up and copies through its mapping."""
        if self._shm is None:
            raise SharedMemoryError(f"shared memory {self.name} is closed")
        size = os.fstat(self._shm._fd).st_size  # our own descriptor: the segment we map, even if renamed
        if size < self.layout.size:
            raise SharedMemoryError(f"shared memory {self.name} was truncated to {size} bytes; it needs "
                                    f"{self.layout.size}: open it without O_TRUNC and never resize it")

    def unlink(self) -> None:
        """Remove the name (owner only, idempotent); the mapping stays valid until :meth:`close`."""
        if not self.owner or self._unlinked or self._shm is None:
            return
        self._unlinked = True
        try:
            self._shm.unlink()  # also unregisters it from the resource tracker: no second unlink at exit
            return
        except FileNotFoundError:  # a client that unlinks its segments does it for every one
            log.log(_first_warning("removed"), "shared memory %s was already removed by someone else (a client must "
                    "not unlink the daemon's segments; further ones are logged at DEBUG)", self.name)
        except OSError as exc:  # the name now holds something else (a client's folder): not ours to remove
            log.log(_first_warning("replaced"), "cannot remove shared memory %s: %s (a client must not replace the "
                    "daemon's segments; further ones are logged at DEBUG)", self.name, exc)
        # nor the resource tracker's business: it would try again at exit and report the segment as leaked
        resource_tracker.unregister(self.name, "shared_memory")  # type: ignore[attr-defined,unused-ignore]

    def close(self) -> bool:
        """Unmap, or leave the mapping to the slot views still alive (False then: _Mapping.unmap_or_leave)."""
        shm, self._shm = self._shm, None
        return True if shm is None else shm.unmap_or_leave()


@dataclass(frozen=True)
class SlotFrame:
    """Slot ``slot`` of a session's input ring and of its output ring, reached through copies only (the engine's
    :class:`~upscaler_server.engine.CopiedFrame`): the daemon never touches a client-writable mapping directly."""

    input: Ring
    output: Ring
    slot: int

    @property
    def height(self) -> int:
        return self.input.layout.height

    @property
    def width(self) -> int:
        return self.input.layout.width

    def read_into(self, lr: np.ndarray) -> None:
        self.input.read_slot(self.slot, lr)

    def write_from(self, out: np.ndarray) -> None:
        self.output.write_slot(self.slot, out)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def _process_vm_writev() -> Callable[..., int] | None:
    """libc's process_vm_writev(2), or None where libc lacks it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).process_vm_writev
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_ssize_t
    function.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                         ctypes.c_ulong]
    return function


_PROCESS_VM_WRITEV = _process_vm_writev()
_kernel_copy_refused = False  # set by probe_kernel_copy or by the first call that seccomp (or an old kernel) refuses
_LOST_PAGE_ERRORS = (errno.EFAULT, errno.ENOMEM)  # a destination page that cannot be had; anything else: refused
# The probe: a copy of one byte within its own process, exit status 0 when it landed
_PROBE = """
import ctypes, os, sys
class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]
libc = ctypes.CDLL(None, use_errno=True)
source, target = ctypes.create_string_buffer(b"x", 1), ctypes.create_string_buffer(1)
copied = libc.process_vm_writev(os.getpid(), ctypes.byref(IoVec(ctypes.addressof(source), 1)), 1,
                                ctypes.byref(IoVec(ctypes.addressof(target), 1)), 1, 0)
sys.exit(0 if copied == 1 and target.raw == b"x" else os.strerror(ctypes.get_errno()))
"""


def _kernel_copy_allowed() -> bool:
    return _PROCESS_VM_WRITEV is not None and not _kernel_copy_refused


def _refuse_kernel_copy(reason: str) -> None:
    global _kernel_copy_refused
    _kernel_copy_refused = True
    log.warning("process_vm_writev is not allowed here (%s): slots are written with pwrite", reason)


def probe_kernel_copy() -> None:
    """Try process_vm_writev once in a child process (it inherits this one's seccomp filter), so that a filter that
    kills on it (systemd's SystemCallFilter= without SystemCallErrorNumber=) picks pwrite now instead of killing the
    daemon at its first frame. The daemon calls it at start-up."""
    if not _kernel_copy_allowed():
        return
    if not sys.executable:  # an embedded interpreter: nothing to run the test with
        _refuse_kernel_copy("no Python executable to test it in a child process")
        return
    try:
        probe = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE], capture_output=True, text=True,
                               timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _refuse_kernel_copy(f"its test in a child process did not run: {exc}")
        return
    if probe.returncode < 0:
        _refuse_kernel_copy(f"its test killed a child process with {signal.Signals(-probe.returncode).name}")
    elif probe.returncode != 0:
        _refuse_kernel_copy(probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else
                            f"its test exited {probe.returncode}")


def _kernel_copy(dst_address: int, src_address: int, size: int) -> tuple[int, int]:
    """memcpy done by the kernel in this process (ctypes releases the GIL): (bytes copied, errno). A destination
    page that cannot be had (past the end of a shrunk file, or none left on a full tmpfs) ends the copy there:
    fewer bytes, or -1 with EFAULT/ENOMEM, where a copy in this process's own code would die of SIGBUS."""
    assert _PROCESS_VM_WRITEV is not None
    local, remote = _IoVec(src_address, size), _IoVec(dst_address, size)
    copied = _PROCESS_VM_WRITEV(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    error = ctypes.get_errno() if copied < 0 else 0
    if error and error not in _LOST_PAGE_ERRORS:  # ENOSYS, EPERM, EACCES...: a seccomp filter, an old kernel
        _refuse_kernel_copy(os.strerror(error))
    return copied, error


def _lost_page_cause(error: int, remaining: int) -> str:
    """Why a page of an intact segment could not be written (``remaining`` bytes were left to copy): tmpfs out of
    space reaches the copy as EFAULT, as a page past the end of the file would."""
    if SHM_DIR.is_dir():
        stats = os.statvfs(SHM_DIR)
        free = stats.f_bavail * stats.f_frsize
        if free < remaining:
            return f"{SHM_DIR} has {free} bytes free, too few for the pages this segment lacks"
    return os.strerror(error)


def _buffer_address(buffer: memoryview) -> int:
    """Address of a mapping's first byte; the temporary view that tells it is gone at once (no export held)."""
    return int(np.frombuffer(buffer, np.uint8, count=1).ctypes.data)


class _Mapping(shared_memory.SharedMemory):
    """A SharedMemory that is never closed under live views, by Ring.close() or by its garbage collection. A
    client's rings are not closed for it at exit (a daemon thread may still use them), so the interpreter's teardown
    collects them, maybe before their slot views: SharedMemory.__del__ then printed a BufferError."""

    _made = False  # SharedMemory.__init__ has returned: only then may unlink() tell the resource tracker

    def __init__(self, name: str, create: bool = False, size: int = 0, **options: Any) -> None:
        self._creating = create
        super().__init__(name, create, size, **options)
        self._made = True

    def unlink(self) -> None:
        """SharedMemory's, but for its own call when a mapping fails (EMFILE near the descriptor limit, ENOMEM): then
        a new segment goes without a word to the resource tracker, which had not been told of it yet and printed a
        KeyError traceback into the daemon's log; and an existing segment (a client attaching the daemon's) stays:
        it is not this process's to remove."""
        if self._made:
            super().unlink()
        elif self._creating:
            shared_memory._posixshmem.shm_unlink(self._name)  # type: ignore[attr-defined]

    def unmap_or_leave(self) -> bool:
        """Unmap, or, while views are alive, leave the mapping to them: it goes with the last one (each holds an
        export of it; unmapping under them would crash the reader). Returns False in that case."""
        try:
            self.close()
        except BufferError:  # raised by mmap.close(): exports (views) remain
            self._mmap = None  # type: ignore[attr-defined]  # the views' exports keep it mapped
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            return False
        return True

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.unmap_or_leave()


def _whose(name: str) -> str:
    """Why segment ``name`` may not be opened: whose it is and its mode, when /dev/shm tells."""
    try:
        info = (SHM_DIR / name.lstrip("/")).stat()
    except OSError:
        owner = "it belongs to another user"
    else:
        owner = f"it belongs to uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):04o}"
    return (f"permission denied: {owner}, and this process runs as uid {os.geteuid()}; a daemon serves only its own "
            "user's clients")


def _check_private(name: str, info: os.stat_result) -> None:
    """SharedMemoryError unless segment ``name`` (``info``: its fstat) is this process's effective user's with no group
    or other permission bits, as the daemon makes them (docs/protocol.md, section 6.1). Only a client of the daemon's
    user can then map them, except root, which maps any user's: it would give its frames to another user's daemon."""
    euid, mode = os.geteuid(), stat.S_IMODE(info.st_mode)
    if info.st_uid != euid or mode & 0o077:
        raise SharedMemoryError(f"shared memory {name} belongs to uid {info.st_uid} with mode {mode:04o}, and this "
                                f"process runs as uid {euid}: a daemon serves only its own user's clients (through "
                                "segments of mode 0600); run the client as the daemon's user, or start a daemon of "
                                "your own")


def _attach_untracked(name: str) -> _Mapping:
    if sys.version_info >= (3, 13):
        return _Mapping(name=name, track=False)  # type: ignore[call-arg,unused-ignore]
    shm = _Mapping(name=name)
    # Python < 3.13 registers attached segments too and would unlink the daemon's segment when this process exits.
    resource_tracker.unregister("/" + name, "shared_memory")  # type: ignore[attr-defined,unused-ignore]
    return shm


def _check_space(size: int) -> None:
    if not SHM_DIR.is_dir():
        return
    st = os.statvfs(SHM_DIR)
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise SharedMemoryError(f"{SHM_DIR} has {free} bytes free, a session needs {size}: close sessions, use "
                                "fewer slots or a smaller frame, or enlarge the tmpfs")


def _first_warning(kind: str) -> int:
    """WARNING the first time this process meets this ``kind`` of tampering with its segments, DEBUG after (a client
    doing it to every session wrote 2 lines per session, 9,900 in 5 s)."""
    level = logging.DEBUG if kind in _WARNED_OF else logging.WARNING
    _WARNED_OF.add(kind)
    return level


def _reserve(fd: int, name: str, size: int) -> None:
    """Allocate the pages of segment ``name`` (open as ``fd``) now: tmpfs would otherwise fail later with SIGBUS when
    the daemon first writes. Through the segment's own descriptor: opening it again failed near the open-file limit
    (EMFILE), as an INTERNAL reply that left the segment behind."""
    if not hasattr(os, "posix_fallocate") or not (SHM_DIR / name.lstrip("/")).exists():
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise SharedMemoryError(f"cannot reserve {size} bytes for {name}: {exc}") from exc


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and can still act (another user's counts; an unreaped zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an unreaped zombie still answers kill(0) but will never clean up
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_segments(shm_dir: pathlib.Path = SHM_DIR) -> list[str]:
    """Unlink this user's daemon segments whose owner pid is dead (or is this very process, which owns none yet). A
    file named like one but owned by another user (planted: anyone may create names in /dev/shm) is left alone,
    silently: this user cannot remove it from the sticky folder, and it is no segment of this user's daemons."""
    if not shm_dir.is_dir():
        return []
    removed = []
    for entry in os.scandir(shm_dir):
        match = _NAME.fullmatch("/" + entry.name)
        if not match or match.group(1) != str(os.geteuid()):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.geteuid():
                continue
        except OSError:  # gone meanwhile
            continue
        pid = int(match.group(2))
        # a held lock (Ring.create's) is a live daemon whose pid looks dead, or like this process, from another pid
        # namespace that shares /dev/shm; a daemon older than the lock holds none, and its pid alone decides
        if (pid != os.getpid() and pid_alive(pid)) or held(entry.path):
            continue
        try:
            os.unlink(entry.path)
            removed.append(entry.name)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove stale shared memory %s: %s", entry.path, exc)
    return removed

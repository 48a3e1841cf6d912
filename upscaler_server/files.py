"""Writing output files whole: a hidden temporary file beside the target, moved onto it only when complete.

Used by the offline CLI, the ONNX export and the benchmark's JSON, so that a full disk, an error or a Ctrl-C
leaves the earlier file (or none), never a truncated one that looks finished. A target that is a link to a file is
written where the link leads (the link stays), unless another user planted it in a shared folder such as /tmp (the
kernel's protected_symlinks rule, which writing to the link's target would bypass); one that is no file at all,
such as /dev/null, /dev/stdout or a FIFO, is written into when the output is complete, as a shell's redirection
would: moving a file onto it (as root) turned /dev/null into a plain file for the whole machine.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["FolderError", "check_writable", "folder_made_for", "is_stream", "make_folder", "missing_folders",
           "partial_beside", "planted_link", "publish", "remove_empty", "replace_whole", "written_file"]


_MAX_LINKS = 40  # as the kernel's limit on links followed in one lookup


class FolderError(OSError):
    """An output folder that cannot be made or written into; the message names it."""


def is_stream(target: pathlib.Path) -> bool:
    """Whether ``target`` (or what its links lead to, /proc's too) exists and is neither a file nor a folder: a device
    such as /dev/null, /dev/stdout on a terminal or a pipe, a FIFO or a socket, written into rather than replaced.
    A name of a process's descriptor (/dev/stdout, /dev/fd/N, /proc/self/fd/N) is one whatever it leads to: after a
    shell's `> log` or `>> log` it leads to a file, and replacing that file lost what `>>` kept in it and what the
    process had printed before (a benchmark's table)."""
    try:
        mode = os.stat(target).st_mode
    except (OSError, ValueError):  # absent, a dangling link or a loop, a name with a NUL
        return False
    if _DESCRIPTOR_NAME.fullmatch(os.path.abspath(target)):
        return not stat.S_ISDIR(mode)
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


_DESCRIPTOR_NAME = re.compile(r"/dev/(stdout|stderr|fd/\d+)|/proc/(self|thread-self|\d+)/fd/\d+")


def written_file(target: pathlib.Path) -> pathlib.Path:
    """The file a write to ``target`` replaces: what a link leads to (kept a link), else ``target`` itself.
    PermissionError for a link another user planted in a shared folder such as /tmp (see planted_link), wherever it
    is in a chain of links. Links among the folders on the way are left to the kernel, which checks them when the
    file is opened: the path returned is not resolved further."""
    path = target
    for _ in range(_MAX_LINKS):
        try:
            link = os.lstat(path)
            if not stat.S_ISLNK(link.st_mode):
                return path
            folder = os.stat(path.parent)
        except OSError:  # absent (a new file), or gone meanwhile: the write reports what it finds
            return path
        if planted_link(link, folder, os.geteuid()):
            raise PermissionError(f"{path} is a link of another user (uid {link.st_uid}) in the shared folder "
                                  f"{path.parent}: not written through (the kernel does not follow such links "
                                  "either); remove it or write elsewhere")
        path = path.parent / os.readlink(path)  # an absolute link replaces the folder
    raise OSError(errno.ELOOP, f"{target}: more than {_MAX_LINKS} links in a row")


def planted_link(link: os.stat_result, folder: os.stat_result, euid: int) -> bool:
    """The kernel's rule for following a link (fs.protected_symlinks), which a write to the link's realpath would
    bypass: a link in a sticky, world-writable folder (/tmp) is followed only by its owner, or when the folder's
    owner owns it too. Otherwise another user could make our output overwrite any file of ours it names."""
    shared = folder.st_mode & stat.S_ISVTX and folder.st_mode & stat.S_IWOTH
    return bool(shared) and link.st_uid not in (euid, folder.st_uid)


@contextlib.contextmanager
def partial_beside(target: pathlib.Path) -> Iterator[pathlib.Path]:
    """A path for the temporary file beside the file ``target`` names (written_file), removed when the block ends
    (published or not); for a stream target, in the temporary folder (/dev is no place for it). Its name is short
    (a long target name plus a suffix would pass the 255-byte limit) and random (two runs writing into one folder
    never share it); the file is created by whoever writes it, with the usual permissions."""
    beside = pathlib.Path(tempfile.gettempdir()) / target.name if is_stream(target) else written_file(target)
    partial = beside.with_name(f".{beside.name[:32]}.{secrets.token_hex(4)}.part")
    try:
        yield partial
    finally:
        partial.unlink(missing_ok=True)


def publish(partial: pathlib.Path, target: pathlib.Path, *, overwrite: bool) -> None:
    """Move the finished ``partial`` onto ``target`` (the file a link leads to). Without ``overwrite`` a file that
    appeared at ``target`` since the caller checked is never replaced (FileExistsError): a hard link is made, which
    fails on an existing name, and the partial is left for partial_beside to remove. A stream target (is_stream) is
    written into instead, with or without ``overwrite``: nothing is replaced."""
    if is_stream(target):  # appended after what this process printed before (a table, then the JSON)
        sys.stdout.flush()
        sys.stderr.flush()
        with open(partial, "rb") as source, open(target, "ab") as sink:
            shutil.copyfileobj(source, sink)
        return
    target = written_file(target)
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


def check_writable(folder: pathlib.Path) -> None:
    """FolderError (naming ``folder``) unless a file can be created in it: checked by creating and removing one, since
    permission bits do not tell (root, read-only mounts, ACLs), and before the minutes of work whose result would
    then be lost."""
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.")
    except OSError as exc:
        raise FolderError(f"cannot write into {folder}: {exc.strerror or exc}") from None
    os.close(handle)
    os.unlink(probe)


def missing_folders(folder: pathlib.Path) -> list[pathlib.Path]:
    """``folder`` and the folders above it that do not exist yet, deepest first: what making it creates, and what a
    failed run removes again (:func:`remove_empty`)."""
    return [made for made in [folder, *folder.parents] if not os.path.lexists(made)]


def make_folder(folder: pathlib.Path, described: str) -> list[pathlib.Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first (for :func:`remove_empty`).
    FolderError, saying "cannot create ``described``" and why, when it cannot."""
    missing = missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission, a read-only mount
        raise FolderError(f"cannot create {described}: {exc.strerror or exc}") from None
    return missing


def remove_empty(folders: list[pathlib.Path]) -> None:
    """Remove ``folders`` (deepest first) that are still empty: what a failed run made, so it leaves nothing."""
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty (someone wrote there meanwhile) or gone: left as it is
            folder.rmdir()


@contextlib.contextmanager
def folder_made_for(target: pathlib.Path) -> Iterator[None]:
    """Create ``target``'s folder (and missing parents; FolderError if it cannot) for the block; if the block fails
    or is interrupted, remove again those it created that are still empty, so a failed run leaves nothing behind."""
    missing = make_folder(target.parent, f"the folder of {target}")
    try:
        yield
    except BaseException:
        remove_empty(missing)
        raise


def replace_whole(target: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``target`` through a temporary file and a rename, replacing an earlier file: a run killed
    mid-write leaves the earlier file (or none), never half of this one."""
    with partial_beside(target) as partial:
        partial.write_text(text)
        publish(partial, target, overwrite=True)

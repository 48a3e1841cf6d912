"""Shared-memory rings: slot views keep their mapping alive after close, a truncated segment is detected, and the
daemon's copies into and out of slots survive a segment shrunk under them."""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from upscaler_server import shm
from upscaler_server.errors import ErrorCode, SharedMemoryError
from upscaler_server.shm import SHM_DIR, Ring, RingLayout, remove_stale_segments, segment_name

from server_utils import REPO, Daemon, encode_request, raw_socket, run_server, serve_here, shm_segments

LAYOUT = RingLayout(32, 24, 3, 2)


def _mappings(name: str) -> int:
    with open("/proc/self/maps") as maps:
        return sum(name.lstrip("/") in line for line in maps)


def test_a_view_outlives_close_and_its_mapping_goes_with_it() -> None:
    """Reading a slot view after its ring was closed used to read unmapped memory (SIGSEGV): run it in a child."""
    script = textwrap.dedent("""
        import gc, os
        from upscaler_server.shm import Ring, RingLayout
        lay = RingLayout(32, 24, 3, 2)
        name = f"/takdsr-test-view-{os.getpid()}"
        owner = Ring.create(name, lay)
        client = Ring.attach(name, lay)
        view = client.slot(1)
        view[...] = 7
        part = view[2:5, 3:9]  # a view of the view holds the mapping too
        assert client.close() is False  # views are alive: the mapping is left to them
        assert int(view.mean()) == 7 and int(part.sum()) == 7 * 3 * 6 * 3
        count = lambda: sum(name.lstrip("/") in line for line in open("/proc/self/maps"))
        assert count() == 2  # the owner's mapping and the one the views keep
        del view, part
        gc.collect()
        assert count() == 1  # gone with the last view
        owner.unlink()
        assert owner.close() is True
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr)
    assert "Exception ignored" not in run.stderr


def test_close_without_views_unmaps_at_once() -> None:
    name = f"/takdsr-test-close-{os.getpid()}"
    ring = Ring.create(name, LAYOUT)
    ring.slot(0)[...] = 1  # a temporary view, gone at once
    ring.unlink()
    assert ring.close() is True and _mappings(name) == 0
    with pytest.raises(SharedMemoryError, match="is closed"):
        ring.slot(0)


def test_a_truncated_segment_is_detected() -> None:
    name = f"/takdsr-test-trunc-{os.getpid()}"
    owner = Ring.create(name, LAYOUT)
    try:
        owner.check_intact()
        fd = os.open(f"/dev/shm/{name.lstrip('/')}", os.O_RDWR | os.O_TRUNC)  # a client's mistake
        try:
            with pytest.raises(SharedMemoryError, match="was truncated to 0 bytes"):
                owner.check_intact()
            short = LAYOUT.size - 1  # slot 0 still whole, the last slot's last byte gone
            os.ftruncate(fd, short)
            with pytest.raises(SharedMemoryError, match=f"was truncated to {short} bytes"):
                owner.check_intact()
            os.ftruncate(fd, LAYOUT.size)
            owner.check_intact()  # its size back: usable again
        finally:
            os.close(fd)
    finally:
        owner.unlink()
        owner.close()


def test_slot_indices_and_attach_sizes_are_checked() -> None:
    name = f"/takdsr-test-bounds-{os.getpid()}"
    owner = Ring.create(name, LAYOUT)
    try:
        assert owner.slot(LAYOUT.slots - 1).shape == (LAYOUT.height, LAYOUT.width, LAYOUT.channels)
        for index in (-1, LAYOUT.slots):
            with pytest.raises(IndexError, match="out of range"):
                owner.slot(index)
        bigger = RingLayout(LAYOUT.width, LAYOUT.height, LAYOUT.channels, LAYOUT.slots + 1)
        with pytest.raises(SharedMemoryError, match=f"has {LAYOUT.size} bytes, expected {bigger.size}"):
            Ring.attach(name, bigger)  # a client told a layout larger than the segment
    finally:
        owner.unlink()
        owner.close()


def test_a_client_attaches_only_segments_private_to_its_own_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the security review: a client mapped any segment it could open. The daemon makes them 0600 as its own
    user, so only that user's clients can, except root, which mapped other users' segments and handed their daemons
    its frames. Another user is faked through os.geteuid (and, as root, with a segment given to uid 65534)."""
    name = f"/takdsr-test-owner-{os.getpid()}"
    path = SHM_DIR / name.lstrip("/")
    real = os.geteuid()
    owner = Ring.create(name, LAYOUT)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(os, "geteuid", lambda: real + 1)
            with pytest.raises(SharedMemoryError, match=f"shared memory {name} belongs to uid {real} with mode 0600, "
                               f"and this process runs as uid {real + 1}: a daemon serves only its own user's "
                               "clients"):
                Ring.attach(name, LAYOUT)
            frame = np.full((LAYOUT.height, LAYOUT.width, 3), 9, np.uint8)  # the daemon's own use: unaffected
            owner.write_slot(1, frame)
            copy = np.zeros_like(frame)
            owner.read_slot(1, copy)
            assert int(copy.min()) == 9
        os.chmod(path, 0o640)
        with pytest.raises(SharedMemoryError, match=f"belongs to uid {real} with mode 0640"):
            Ring.attach(name, LAYOUT)
        if real == 0:
            os.chown(path, 65534, -1)
            os.chmod(path, 0o600)
            with pytest.raises(SharedMemoryError, match="belongs to uid 65534 with mode 0600, and this process runs "
                               "as uid 0"):
                Ring.attach(name, LAYOUT)
            os.chown(path, 0, -1)
        assert _mappings(name) == 1  # the owner's: a refused segment is unmapped at once
        os.chmod(path, 0o600)
        client = Ring.attach(name, LAYOUT)  # this user's, private: mapped
        assert int(client.slot(1).min()) == 9
        client.close()
    finally:
        owner.unlink()
        owner.close()


def test_a_segment_that_may_not_be_opened_is_named_as_another_users(monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES was reported as "is the daemon still running?": a segment of another user's (which a client other than
    root cannot open) is named as such. Faked: root opens any segment."""
    name = f"/takdsr-test-eacces-{os.getpid()}"
    owner = Ring.create(name, LAYOUT)
    try:
        def refused(shm_name: str) -> None:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), shm_name)

        monkeypatch.setattr(shm, "_attach_untracked", refused)
        with pytest.raises(SharedMemoryError) as raised:
            Ring.attach(name, LAYOUT)
        assert str(raised.value) == (f"cannot attach shared memory {name}: permission denied: it belongs to uid "
                                     f"{os.geteuid()} with mode 0600, and this process runs as uid {os.geteuid()}; a "
                                     "daemon serves only its own user's clients")
    finally:
        owner.unlink()
        owner.close()
    monkeypatch.undo()
    with pytest.raises(SharedMemoryError, match=r"No such file.*is the daemon still running"):
        Ring.attach(name, LAYOUT)  # gone: that question is still asked


def test_stale_segments_of_another_user_are_left_alone_in_silence(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: pathlib.Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Files named like this user's segments of a dead daemon but owned by another user (planted in /dev/shm) were
    unlinked, or, where the sticky folder refused, warned of at every daemon start (from the security review). Files
    of this user's are faked as another user's through os.geteuid; as root, one is also given to uid 65534."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = [f"takdsr-{os.geteuid()}-{dead.pid}-0000abcd-{kind}" for kind in ("in", "out")]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    real = os.geteuid()
    with caplog.at_level(logging.WARNING, logger="upscaler_server.shm"), monkeypatch.context() as patch:
        patch.setattr(os, "geteuid", lambda: real + 1)
        assert remove_stale_segments(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == names and not caplog.records
    if real == 0:
        os.chown(tmp_path / names[0], 65534, -1)  # planted by another user
        assert remove_stale_segments(tmp_path) == [names[1]]  # this user's own stale segment still goes
        assert [p.name for p in tmp_path.iterdir()] == [names[0]] and not caplog.records
    else:
        assert sorted(remove_stale_segments(tmp_path)) == names


_OWNER_IN_ANOTHER_NAMESPACE = """
import sys
from multiprocessing import resource_tracker
from upscaler_server.shm import Ring, RingLayout
rings = [Ring.create(name, RingLayout(8, 8, 3, 1)) for name in sys.argv[1:]]
for name in sys.argv[1:]:  # killed, it leaves them to the next daemon alone (its resource tracker would race it)
    resource_tracker.unregister(name, "shared_memory")
print("created", flush=True)
sys.stdin.read()  # until the test closes the pipe
for ring in rings:
    ring.unlink()
    ring.close()
"""


def test_segments_a_live_daemon_holds_are_not_stale_whatever_their_pid_says() -> None:
    """From the operations review: two containers of a pod share /dev/shm but not their pids. A daemon judged
    segments by their pid alone, so another namespace's live daemon (its pid dead here, or equal to this very
    process's) lost its sessions' segments when this one started. The owner's lock now tells."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = [segment_name(pid, 0xABCD, "in") for pid in (dead.pid, os.getpid())]
    owner = subprocess.Popen([sys.executable, "-c", _OWNER_IN_ANOTHER_NAMESPACE, *names], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "created\n"
        removed = remove_stale_segments()
        assert not set(removed) & {name.lstrip("/") for name in names}
        assert all((SHM_DIR / name.lstrip("/")).exists() for name in names)
    finally:
        owner.kill()  # as a daemon killed: the kernel drops its locks, and the segments are stale now
        owner.wait()
    assert sorted(set(remove_stale_segments()) & {name.lstrip("/") for name in names}) == sorted(
        name.lstrip("/") for name in names)


def test_slots_are_read_and_written_by_copies_that_survive_a_truncation() -> None:
    name = f"/takdsr-test-copies-{os.getpid()}"
    owner = Ring.create(name, LAYOUT)
    client = Ring.attach(name, LAYOUT)
    try:
        frame = np.random.default_rng(1).integers(0, 256, (LAYOUT.height, LAYOUT.width, 3), dtype=np.uint8)
        client.slot(1)[...] = frame
        copy = np.zeros_like(frame)
        owner.read_slot(1, copy)
        np.testing.assert_array_equal(copy, frame)
        owner.write_slot(0, frame[::-1].copy())
        np.testing.assert_array_equal(client.slot(0), frame[::-1])
        with pytest.raises(ValueError, match="holds 2304 contiguous uint8 bytes"):
            owner.read_slot(0, np.zeros((2, 2, 3), np.uint8))
        with pytest.raises(ValueError, match="contiguous"):
            owner.write_slot(0, np.zeros((LAYOUT.height, 2 * LAYOUT.width, 3), np.uint8)[:, ::2])
        os.truncate(SHM_DIR / name.lstrip("/"), LAYOUT.slot_stride + 100)  # slot 1 cut short, slot 0 whole
        with pytest.raises(SharedMemoryError, match=f"was truncated to {LAYOUT.slot_stride + 100} bytes"):
            owner.read_slot(1, copy)  # a short read; through the mapping it was SIGBUS
        with pytest.raises(SharedMemoryError, match="was truncated"):
            owner.write_slot(1, frame)
        assert os.path.getsize(SHM_DIR / name.lstrip("/")) == LAYOUT.slot_stride + 100  # not grown back
    finally:
        client.close()
        owner.unlink()
        owner.close()



def test_a_result_written_into_lost_pages_is_an_error_and_the_segment_stays_shrunk() -> None:
    """write_slot's copy is the kernel's: pages lost to a shrink that lands after the size check end it with EFAULT
    (SharedMemoryError), where a copy in the daemon's own code dies of SIGBUS, and the segment is not grown back (a
    pwrite would have extended it). The check is skipped once to reach the copy; in a child, so a SIGBUS would show
    as its exit status instead of killing the tests."""
    script = textwrap.dedent("""
        import os
        import numpy as np
        from upscaler_server.errors import SharedMemoryError
        from upscaler_server.shm import SHM_DIR, Ring, RingLayout
        lay = RingLayout(64, 64, 3, 2)  # slots of three pages
        name = f"/takdsr-test-lost-{os.getpid()}"
        owner = Ring.create(name, lay)
        try:
            cut = lay.slot_stride + 100  # slot 1 keeps one page, loses the rest
            os.truncate(SHM_DIR / name.lstrip("/"), cut)
            checks = [lambda: None, Ring.check_intact.__get__(owner)]  # the shrink comes just after the first check
            owner.check_intact = lambda: checks.pop(0)()
            try:
                owner.write_slot(1, np.full((64, 64, 3), 9, np.uint8))
            except SharedMemoryError as exc:
                print("error:", exc)
            print("size:", os.path.getsize(SHM_DIR / name.lstrip("/")) == cut)
        finally:
            owner.unlink()
            owner.close()
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, (run.returncode, run.stderr)  # -7: SIGBUS
    assert "was truncated to 12388 bytes" in run.stdout and "size: True" in run.stdout, run.stdout


@pytest.mark.parametrize("error", ["EPERM", "ENOSYS", "EACCES"])
def test_slots_are_written_with_pwrite_where_the_kernel_copy_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                                        error: str) -> None:
    """Where a seccomp filter (or an old kernel) refuses process_vm_writev with any error but a lost page's, the
    first refusal switches to pwrite, which writes the same bytes."""
    import ctypes
    import errno

    from upscaler_server import shm

    def refused(*args: object) -> int:
        ctypes.set_errno(getattr(errno, error))
        return -1

    monkeypatch.setattr(shm, "_PROCESS_VM_WRITEV", refused)
    monkeypatch.setattr(shm, "_kernel_copy_refused", False)
    name = f"/takdsr-test-pwrite-{os.getpid()}"
    owner = Ring.create(name, LAYOUT)
    try:
        frame = np.random.default_rng(3).integers(0, 256, (LAYOUT.height, LAYOUT.width, 3), dtype=np.uint8)
        copy = np.zeros_like(frame)
        owner.write_slot(1, frame)
        owner.read_slot(1, copy)
        np.testing.assert_array_equal(copy, frame)
        assert shm._kernel_copy_refused
        owner.write_slot(0, frame[::-1].copy())  # pwrite from the start now
        owner.read_slot(0, copy)
        np.testing.assert_array_equal(copy, frame[::-1])
    finally:
        owner.unlink()
        owner.close()


@pytest.mark.parametrize(("probe", "reason"), [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSYS)", "its test killed a child process with SIGSYS"),
    ("import sys; sys.exit('Permission denied')", "Permission denied"),
    (None, None),  # the real probe: allowed here
])
def test_the_kernel_copy_is_probed_in_a_child_before_the_first_frame(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture,
                                                                    probe: str | None, reason: str | None) -> None:
    """A seccomp filter that kills on process_vm_writev (SIGSYS) must not kill the daemon at a client's first
    frame: the daemon tries the call in a child at start-up and writes with pwrite if the child dies or fails."""
    from upscaler_server import shm

    monkeypatch.setattr(shm, "_kernel_copy_refused", False)
    if probe is not None:
        monkeypatch.setattr(shm, "_PROBE", probe)
    with caplog.at_level("WARNING", logger="upscaler_server.shm"):
        shm.probe_kernel_copy()
    assert shm._kernel_copy_allowed() == (reason is None)
    if reason is not None:
        assert f"process_vm_writev is not allowed here ({reason})" in caplog.text


def test_a_page_tmpfs_cannot_give_is_named_as_such() -> None:
    """A full /dev/shm reaches the kernel copy as EFAULT, like a page past the end of the file; with the size
    intact, the error says how much room is left rather than "Bad address"."""
    import errno

    from upscaler_server import shm

    assert "bytes free, too few for the pages this segment lacks" in shm._lost_page_cause(errno.EFAULT, 1 << 50)
    assert shm._lost_page_cause(errno.EFAULT, 1) == os.strerror(errno.EFAULT)

def _send(sock: zmq.Socket[bytes], **fields: object) -> None:
    """Send without waiting: these tests collect replies of several requests (``_replies``)."""
    sock.send(encode_request(**fields))


def _replies(daemon: Daemon | None, sock: zmq.Socket[bytes], count: int, timeout: float = 120.0) -> dict[int, dict]:
    """The next ``count`` replies, by request id; fails at once when the daemon (a subprocess; None: in this process)
    dies, and instead of hanging."""
    replies = {}
    deadline = time.monotonic() + timeout
    while len(replies) < count:
        if daemon is not None and daemon.proc.poll() is not None:
            code = daemon.proc.returncode
            pytest.fail(f"the daemon died: {signal.Signals(-code).name if code < 0 else f'exit {code}'}")
        if time.monotonic() > deadline:
            pytest.fail(f"no reply within {timeout} s; got {replies}")
        if sock.poll(100, zmq.POLLIN):
            reply = msgpack.unpackb(sock.recv_multipart()[-1], raw=False)
            replies[reply["req"]] = reply
    return replies


def test_a_segment_shrunk_while_its_frame_is_computed_is_an_error_not_a_crash() -> None:
    """The daemon checks a segment's size when a frame is submitted, and then has the kernel copy its slots (pread,
    process_vm_writev). Before, it wrote the result through its mapping: an output segment a client truncated while
    the network ran (after that check) killed the daemon with SIGBUS. Now that frame gets SHM_ERROR, the daemon lives
    on, the session works again once the size is back, and nothing is left in /dev/shm (run_server checks that)."""
    with run_server("--model", "rlfn_s", "--threads", "1") as daemon, raw_socket(daemon.endpoint) as sock:
        _send(sock, type="open", req=1, width=640, height=360, format="RGB8", slots=1)
        opened = _replies(daemon, sock, 1)[1]
        assert opened["type"] == "opened", opened
        session, output = opened["session"], SHM_DIR / opened["output"]["name"].lstrip("/")
        _send(sock, type="submit", req=2, session=session, slot=0, frame=1)
        _send(sock, type="ping", req=3, sessions=[session])  # answered once the submit was checked and queued
        pong = _replies(daemon, sock, 1)
        assert pong[3]["type"] == "pong", pong  # the frame (about a second of CPU here) is still being computed
        os.truncate(output, 0)
        error = _replies(daemon, sock, 1)[2]
        assert (error["type"], error.get("name")) == ("error", "SHM_ERROR"), error
        assert "was truncated to 0 bytes" in error["message"]
        os.truncate(output, opened["output"]["size"])
        _send(sock, type="submit", req=4, session=session, slot=0, frame=2)
        assert _replies(daemon, sock, 1)[4]["type"] == "done"
        _send(sock, type="close", req=5, session=session)
        assert _replies(daemon, sock, 1)[5]["type"] == "closed"


@pytest.mark.parametrize("mode", [[], ["--map-slots"]], ids=["copied", "map-slots"])
def test_both_slot_modes_serve_frames_and_refuse_a_shrunk_segment(mode: list[str]) -> None:
    """The default (kernel copies) and --map-slots give the same frames; both refuse a segment already shrunk when a
    frame is submitted, and serve again once its size is back."""
    with run_server("--backend", "nearest", *mode) as daemon, raw_socket(daemon.endpoint) as sock:
        assert ("slots=mapped" in daemon.log()) == bool(mode) and ("slots=copied" in daemon.log()) != bool(mode)
        _send(sock, type="open", req=1, width=20, height=12, format="BGRA8", slots=2)
        opened = _replies(daemon, sock, 1)[1]
        paths = {kind: SHM_DIR / opened[kind]["name"].lstrip("/") for kind in ("input", "output")}
        layouts = {"input": RingLayout(20, 12, 4, 2), "output": RingLayout(40, 24, 4, 2)}
        rings = {kind: Ring.attach(opened[kind]["name"], layouts[kind]) for kind in paths}
        try:
            lr = np.random.default_rng(2).integers(0, 256, (12, 20, 4), dtype=np.uint8)
            rings["input"].slot(1)[...] = lr
            _send(sock, type="submit", req=2, session=opened["session"], slot=1, frame=1)
            assert _replies(daemon, sock, 1)[2]["type"] == "done"
            np.testing.assert_array_equal(rings["output"].slot(1), lr.repeat(2, 0).repeat(2, 1))
            for kind, path in paths.items():
                os.truncate(path, opened[kind]["slot_stride"])  # slot 0 whole, slot 1 gone
                _send(sock, type="submit", req=3, session=opened["session"], slot=1, frame=2)
                error = _replies(daemon, sock, 1)[3]
                assert error.get("name") == "SHM_ERROR" and "was truncated" in error["message"], error
                os.truncate(path, opened[kind]["size"])
            _send(sock, type="submit", req=4, session=opened["session"], slot=1, frame=3)
            assert _replies(daemon, sock, 1)[4]["type"] == "done"
        finally:
            for ring in rings.values():
                ring.close()
        _send(sock, type="close", req=5, session=opened["session"])
        assert _replies(daemon, sock, 1)[5]["type"] == "closed"


def _anon_rss_mb(pid: int) -> float:
    """Anonymous resident memory of ``pid`` (the daemon's own arrays, not shared memory), MB."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


def test_staging_memory_goes_with_the_last_session_of_its_size() -> None:
    """The default daemon copies each frame through an LR and an HR array of its own; they stay while a session of
    that size is open and are freed with the last one (before: kept for the daemon's life, up to four sizes)."""
    with run_server("--backend", "nearest") as daemon, raw_socket(daemon.endpoint) as sock:
        sessions = []
        for req in (1, 2):  # two sessions of one size, RGBA8: a 2048x1152 frame and its 4096x2304 result, 47 MB
            _send(sock, type="open", req=req, width=2048, height=1152, format="RGBA8", slots=1)
            sessions.append(_replies(daemon, sock, 1)[req]["session"])
            _send(sock, type="submit", req=10 + req, session=sessions[-1], slot=0, frame=1)
            assert _replies(daemon, sock, 1)[10 + req]["type"] == "done"
        in_use = _anon_rss_mb(daemon.pid)
        _send(sock, type="close", req=3, session=sessions[0])
        assert _replies(daemon, sock, 1)[3]["type"] == "closed"
        one_left = _anon_rss_mb(daemon.pid)
        assert in_use - one_left < 20, (in_use, one_left)  # the other session still uses them: kept
        _send(sock, type="close", req=4, session=sessions[1])
        assert _replies(daemon, sock, 1)[4]["type"] == "closed"
        _send(sock, type="ping", req=5, sessions=[])  # answered after the close's release
        _replies(daemon, sock, 1)
        assert one_left - _anon_rss_mb(daemon.pid) > 30, (one_left, _anon_rss_mb(daemon.pid))


def test_a_segment_name_taken_by_a_folder_is_left_alone_and_the_daemon_lives() -> None:
    """A client that replaced a segment's name with a folder made the daemon's unlink raise: a close got INTERNAL
    and left the other segment behind, and a lease expiring that way killed the daemon. Now the folder is left (not
    the daemon's to remove), the other segment is unlinked, and the daemon serves on. A name a client removed is
    no error either, and Python's resource tracker is told, so it does not report a leak at exit."""
    with run_server("--backend", "nearest", "--lease-timeout", "1") as daemon, raw_socket(daemon.endpoint) as sock:
        folders = []
        try:
            opened = []
            for req in (1, 2):
                _send(sock, type="open", req=req, width=16, height=16, format="RGB8", slots=1)
                opened.append(_replies(daemon, sock, 1)[req])
                folder = SHM_DIR / opened[-1]["input"]["name"].lstrip("/")
                folder.unlink()
                folder.mkdir()
                folders.append(folder)
            (SHM_DIR / opened[0]["output"]["name"].lstrip("/")).unlink()  # and this name is simply gone
            _send(sock, type="close", req=3, session=opened[0]["session"])
            assert _replies(daemon, sock, 1)[3]["type"] == "closed"
            time.sleep(2.5)  # the second session's lease expires: the daemon removes it on its own
            _send(sock, type="open", req=4, width=16, height=16, format="RGB8", slots=1)
            fresh = _replies(daemon, sock, 1)[4]
            _send(sock, type="submit", req=5, session=fresh["session"], slot=0, frame=1)
            assert _replies(daemon, sock, 1)[5]["type"] == "done"
            prefix = f"takdsr-{os.geteuid()}-{daemon.pid}-"
            left = sorted(path.name for path in SHM_DIR.iterdir() if path.name.startswith(prefix))
            segments = [fresh[kind]["name"].lstrip("/") for kind in ("input", "output")]
            expected = sorted([*(folder.name for folder in folders), *segments])
            assert left == expected  # the output segments are gone, the folders left alone
            # two names replaced, warned of once (a client doing it to every session wrote 9,900 lines in 5 s)
            assert daemon.log().count("cannot remove shared memory") == 1
            assert "further ones are logged at DEBUG" in daemon.log()
            assert "was already removed by someone else" in daemon.log()
        # leaving run_server checks the log: no "leaked" report of Python's resource tracker at the daemon's exit
        finally:
            for folder in folders:
                folder.rmdir()


def test_staging_is_released_after_the_frame_a_closed_session_had_running() -> None:
    """A session closed while the engine thread had already taken up its frame: the frame builds its staging
    arrays after the close, so they are released when that frame is done, not at the close (which would leave them
    for the daemon's life: no session of that size remains to release them)."""
    from upscaler_server.engine import NearestEngine

    class SlowToStart(NearestEngine):
        """Takes 0.5 s between taking a frame up and touching its staging: the close arrives in between."""

        def start_copied(self, frame, fmt):  # type: ignore[no-untyped-def]
            time.sleep(0.5)
            return super().start_copied(frame, fmt)

    engine = SlowToStart()
    with serve_here(engine) as daemon, raw_socket(daemon.endpoint) as sock:
        _send(sock, type="open", req=1, width=64, height=32, format="RGB8", slots=1)
        session = _replies(None, sock, 1)[1]["session"]
        _send(sock, type="submit", req=2, session=session, slot=0, frame=1)
        time.sleep(0.2)  # the engine thread has the frame
        _send(sock, type="close", req=3, session=session)
        assert _replies(None, sock, 1)[3]["type"] == "closed"  # the frame's reply is dropped: session ended
        deadline = time.monotonic() + 10
        while (engine._staging is None or len(engine._staging)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine._staging is not None and len(engine._staging) == 0



def test_inline_frames_waiting_for_the_engine_count_against_the_unread_budget() -> None:
    """Only results already handed to ZeroMQ counted: frames accepted while the engine lagged all passed the check,
    so the bound held only as long as the engine kept up (a test of it failed once the daemon's timing shifted).
    Here the engine is held until eight frames are in: with a budget of three results, three are accepted."""
    from upscaler_server.engine import NearestEngine

    class Held(NearestEngine):
        def __init__(self) -> None:
            super().__init__(2)
            self.gate = threading.Event()

        def upscale(self, lr, fmt, out):  # type: ignore[no-untyped-def]
            self.gate.wait(30)
            return super().upscale(lr, fmt, out)

    engine = Held()
    result_bytes = 32 * 32 * 3  # a 16x16 RGB8 frame at x2
    with serve_here(engine, max_unread_bytes=3 * result_bytes) as daemon, raw_socket(daemon.endpoint) as sock:
        try:
            pixels = bytes(16 * 16 * 3)
            for req in range(1, 9):
                _send(sock, type="process", req=req, width=16, height=16, format="RGB8", frame=req, pixels=pixels)
            busy = _replies(None, sock, 5, timeout=10)  # refused at once, while the engine still holds the first
            assert {reply.get("name") for reply in busy.values()} == {"BUSY"}
            engine.gate.set()
            done = _replies(None, sock, 3)
            assert {reply["type"] for reply in done.values()} == {"result"} and set(done) == {1, 2, 3}
            _send(sock, type="process", req=9, width=16, height=16, format="RGB8", frame=9, pixels=pixels)
            assert _replies(None, sock, 1)[9]["type"] == "result"  # read: the budget is free again
        finally:
            engine.gate.set()


def test_frames_the_stop_cannot_wait_for_are_answered_shutting_down() -> None:
    """A frame still running when the drain timeout ran out got no reply: the daemon closed its socket without a
    word, and the client waited out its whole timeout (then a ping nobody answered). Here the engine holds a session
    frame and an inline frame past a 0.3 s drain: both are answered SHUTTING_DOWN as the daemon stops."""
    from upscaler_server.engine import NearestEngine

    class Held(NearestEngine):
        max_in_flight = 2  # the worker takes both frames up: two running frames to answer

        def __init__(self) -> None:
            super().__init__(2)
            self.gate, self.both_started, self.calls = threading.Event(), threading.Event(), 0

        def start(self, lr, fmt, out):  # type: ignore[no-untyped-def]  (session frames come here too)
            self.calls += 1
            deadline = time.monotonic() + 10
            while self.calls == 1 and not len(server._queue) and time.monotonic() < deadline:
                time.sleep(0.01)  # the first frame waits for the second to be queued, so the worker takes both up
            if self.calls == 2:
                self.both_started.set()
            return lambda: self.upscale(lr, fmt, out)

        def upscale(self, lr, fmt, out):  # type: ignore[no-untyped-def]
            self.gate.wait(30)
            return super().upscale(lr, fmt, out)

    engine = Held()
    with serve_here(engine, drain_timeout=0.3) as daemon, raw_socket(daemon.endpoint) as sock:
        server = daemon.server
        try:
            _send(sock, type="open", req=1, width=16, height=16, format="RGB8", slots=1)
            session = _replies(None, sock, 1)[1]["session"]
            _send(sock, type="submit", req=2, session=session, slot=0, frame=1)
            _send(sock, type="process", req=3, width=16, height=16, format="RGB8", frame=2, pixels=bytes(16 * 16 * 3))
            assert engine.both_started.wait(10)
            stop_asked = time.monotonic()
            server.request_stop()
            replies = _replies(None, sock, 2, timeout=10)
            assert time.monotonic() - stop_asked < 5
            assert {req: (reply["type"], reply.get("name")) for req, reply in replies.items()} == {
                2: ("error", "SHUTTING_DOWN"), 3: ("error", "SHUTTING_DOWN")}
            assert "did not wait for this frame" in replies[2]["message"]
            daemon.thread.join(10)
            assert not daemon.thread.is_alive()
            assert server.worker_running  # the engine still holds the frames: the daemon's process would _exit
        finally:
            engine.gate.set()


def test_a_ring_whose_set_up_fails_with_an_os_error_is_removed_and_said_as_shm_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """From a hostile-client review: near the open-file limit, reserving a new segment's pages opened it a second
    time, failed with EMFILE, and the OSError escaped as an INTERNAL reply, leaving the segment (1 GB, sparse) in
    /dev/shm for the daemon's life. Reserving now goes through the segment's own descriptor, and any OSError of the
    set-up (the lock here) removes the segment and is SHM_ERROR."""
    name = segment_name(os.getpid(), 77, "in")
    real_flock = shm.fcntl.flock

    def failing_flock(fd: int, operation: int) -> None:
        if operation == shm.fcntl.LOCK_SH:
            raise OSError(errno.ENOLCK, "No locks available")
        real_flock(fd, operation)

    monkeypatch.setattr(shm.fcntl, "flock", failing_flock)
    try:
        with pytest.raises(SharedMemoryError, match=r"cannot set up shared memory .*No locks available") as info:
            Ring.create(name, LAYOUT)
        assert info.value.code == ErrorCode.SHM_ERROR
        assert not (SHM_DIR / name.lstrip("/")).exists(), "the segment was left behind"
    finally:
        (SHM_DIR / name.lstrip("/")).unlink(missing_ok=True)


def test_a_segment_that_cannot_be_mapped_is_removed_if_new_and_kept_if_attached() -> None:
    """From a hostile-client review: near the open-file limit mmap failed with EMFILE, and CPython unregistered the
    new segment from the resource tracker, which had not been told of it: the tracker printed a KeyError traceback
    into the daemon's log (the client correctly got SHM_ERROR). And a client whose mapping of the daemon's segment
    failed so unlinked that segment. Run apart: the tracker writes to the process's stderr when it reads a message."""
    script = textwrap.dedent("""
        import errno, os
        from multiprocessing import shared_memory
        from upscaler_server import shm
        from upscaler_server.errors import SharedMemoryError

        def no_more_files(*args, **kwargs):
            raise OSError(errno.EMFILE, "Too many open files")

        layout = shm.RingLayout(16, 16, 3, 2)
        created, attached = (shm.segment_name(os.getpid(), session, "in") for session in (5, 6))
        daemons = shm.Ring.create(attached, layout)
        real_mmap, shared_memory.mmap.mmap = shared_memory.mmap.mmap, no_more_files
        for call in (lambda: shm.Ring.create(created, layout), lambda: shm.Ring.attach(attached, layout)):
            try:
                call()
            except SharedMemoryError as exc:
                print(exc.code.name)
        shared_memory.mmap.mmap = real_mmap
        print(*(os.path.exists(str(shm.SHM_DIR / name.lstrip("/"))) for name in (created, attached)))
        daemons.unlink()
        daemons.close()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    # the new segment is gone, the daemon's is still there, and nothing of the tracker's is in the log
    assert done.returncode == 0 and done.stdout.split() == ["SHM_ERROR", "SHM_ERROR", "False", "True"], done
    assert done.stderr == "", done.stderr


def test_a_session_whose_output_ring_cannot_be_made_leaves_no_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    """SessionTable.open creates the input ring, then the output ring: when the second fails (tmpfs full, found when
    its pages are reserved), the first must go too, and the half-made output ring with it; otherwise both stayed in
    /dev/shm and mapped in the daemon for its whole life, since no session names them. The table stays empty."""
    from upscaler_server.config import Config
    from upscaler_server.protocol import Open
    from upscaler_server.sessions import SessionTable

    original_reserve = shm._reserve
    reserved: list[str] = []

    def reserve(fd: int, name: str, size: int) -> None:
        reserved.append(name)
        if name.endswith("-out"):
            raise SharedMemoryError(f"cannot reserve {size} bytes for {name}: tmpfs full (faked)")
        original_reserve(fd, name, size)

    table = SessionTable(Config(endpoint="ipc:///tmp/takdsr-never-bound.sock"), scale=2, min_size=1)  # no daemon
    request = Open(width=32, height=24, format="RGB8", slots=2)
    before = shm_segments(os.getpid())  # this process's daemon-named segments (an in-process Server's): none now
    monkeypatch.setattr(shm, "_reserve", reserve)
    try:
        with pytest.raises(SharedMemoryError, match="tmpfs full") as info:
            table.open(request, owner=b"client")
        assert [name.rsplit("-", 1)[1] for name in reserved] == ["in", "out"]  # the second ring is the one that failed
        assert shm_segments(os.getpid()) == before, "a ring of the failed session is left in /dev/shm"
        # unmapped at once, not only when the garbage goes (the traceback, kept here, refers to both rings)
        assert all(_mappings(name) == 0 for name in reserved), "a ring of the failed session is still mapped"
        del info
        assert len(table) == 0 and table.all() == []
        monkeypatch.undo()
        session = table.open(request, owner=b"client")  # nothing left over in the way: the next open works
        try:
            assert len(table) == 1 and len(shm_segments(os.getpid())) == len(before) + 2
        finally:
            table.remove(session.id)
            session.release()
        assert shm_segments(os.getpid()) == before
    finally:
        for name in reserved:  # never litter /dev/shm, even when failing
            (SHM_DIR / name.lstrip("/")).unlink(missing_ok=True)

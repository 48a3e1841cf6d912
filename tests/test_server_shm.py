"""Shared-memory rings: slot views keep their mapping alive after close, and a truncated segment is detected."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from upscaler_server.errors import SharedMemoryError
from upscaler_server.shm import Ring, RingLayout

from server_utils import REPO

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

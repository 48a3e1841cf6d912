"""Output files named by the user that are not plain files. The writers replace a file whole (a temporary file
moved onto it), and so, run as root, `export -o /dev/null --overwrite` and `bench --json /dev/null` turned /dev/null
into a plain file for the whole machine (found in a review). Now what is neither a file nor a folder (a device, a
FIFO, /dev/stdout on a pipe) is written into, and a link to a file has that file replaced, the link kept. Tested
with FIFOs, which behave as devices do here and need no privilege (never with /dev/null itself)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from training.data.images import write_json_atomic
from training.evaluate import check_output_file
from upscaler_server import export
from upscaler_server.bench import check_json_target
from upscaler_server.files import is_stream, partial_beside, planted_link, publish, replace_whole


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "out.fifo"
    os.mkfifo(path)
    return path


def read_while(fifo: Path, write: Callable[[], object]) -> bytes:
    """What a reader of ``fifo`` receives while ``write()`` runs; the FIFO must still be one afterwards. The reader
    copies into a file (a pipe back to this process would fill while ``write`` runs, and stall both)."""
    received = fifo.with_name("received")
    with open(received, "wb") as sink:
        reader = subprocess.Popen(["cat", str(fifo)], stdout=sink)
    try:
        write()
        reader.wait(timeout=30)
    finally:
        reader.kill()
        reader.wait()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a file"
    data = received.read_bytes()
    received.unlink()
    return data


def test_streams_are_told_apart(tmp_path: Path, fifo: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "to_fifo").symlink_to(fifo)
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    assert is_stream(fifo) and is_stream(tmp_path / "to_fifo") and is_stream(Path("/dev/null"))
    assert not any(is_stream(tmp_path / name) for name in ("file", "dangling", "missing", "."))


def test_replace_whole_writes_into_a_fifo(fifo: Path) -> None:
    assert read_while(fifo, lambda: replace_whole(fifo, "{}\n")) == b"{}\n"
    assert [p.name for p in fifo.parent.iterdir()] == [fifo.name]  # no temporary file left beside it


@pytest.mark.parametrize("mode", ["a", "w"])
def test_stdout_led_to_a_file_by_a_redirection_is_written_into_not_replaced(tmp_path: Path, mode: str) -> None:
    """From a review: `bench --json /dev/stdout >> log` replaced log with a file of the JSON alone (/dev/stdout led to
    a plain file), losing what log held and the table printed before; `>` lost the table."""
    log = tmp_path / "log.txt"
    log.write_text("earlier\n")
    inode = log.stat().st_ino
    script = ("from pathlib import Path\nfrom upscaler_server.files import replace_whole\n"
              "from training.data.images import write_json_atomic\n"
              "print('table', flush=True)\nreplace_whole(Path('/dev/stdout'), 'json\\n')\n"
              "write_json_atomic(Path('/dev/fd/1'), {'a': 1}, indent=None)\n")
    with open(log, mode) as out:  # a shell's `>>`, then `>`
        subprocess.run([sys.executable, "-c", script], stdout=out, check=True, cwd=Path(__file__).parents[1])
    kept = "earlier\n" if mode == "a" else ""
    assert log.read_text() == kept + 'table\njson\n{"a": 1}\n' and log.stat().st_ino == inode


@pytest.mark.parametrize("overwrite", [False, True])
def test_publish_through_a_link_replaces_the_file_and_keeps_the_link(tmp_path: Path, overwrite: bool) -> None:
    real = tmp_path / "real" / "scores.json"
    real.parent.mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with partial_beside(link) as partial:
        assert partial.parent == real.parent  # beside the file it replaces: the move stays on one filesystem
        partial.write_text("new")
        publish(partial, link, overwrite=overwrite)
    assert link.is_symlink() and real.read_text() == "new"
    with partial_beside(link) as partial:
        partial.write_text("newer")
        if overwrite:
            publish(partial, link, overwrite=True)
        else:
            with pytest.raises(FileExistsError):
                publish(partial, link, overwrite=False)
    assert link.is_symlink() and real.read_text() == ("newer" if overwrite else "new")


def test_export_writes_into_a_fifo_without_overwrite(fifo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing is replaced, so --overwrite is not asked for; the size and --benchmark read a temporary copy (as for
    `-o /dev/null --benchmark N`, where there is nothing to read back)."""
    statuses = []
    received = read_while(fifo, lambda: statuses.append(export.main(
        ["--model", "rlfn_s", "--height", "16", "--width", "16", "-o", str(fifo), "--benchmark", "1"])))
    out = capsys.readouterr().out
    assert statuses == [0] and f"wrote {fifo} ({len(received)} bytes)" in out and "onnxruntime CPU" in out, out
    import onnx

    assert onnx.load_from_string(received).graph.input[0].name == "lr"
    assert [p.name for p in fifo.parent.iterdir()] == [fifo.name]


def test_export_through_a_link_replaces_the_file_it_leads_to(tmp_path: Path) -> None:
    real = tmp_path / "models" / "student.onnx"
    real.parent.mkdir()
    real.write_bytes(b"older")
    link = tmp_path / "current.onnx"
    link.symlink_to(real)
    assert export.main(["--model", "rlfn_s", "--height", "16", "--width", "16", "-o", str(link), "--overwrite"]) == 0
    assert link.is_symlink() and real.read_bytes()[:5] != b"older"


def test_json_targets_accept_streams_and_check_where_links_lead(tmp_path: Path, fifo: Path) -> None:
    check_json_target(fifo)
    check_output_file(fifo, "the scores")
    link = tmp_path / "scores.json"
    link.symlink_to(tmp_path / "missing" / "scores.json")  # the folder the file would be written in is where it leads
    with pytest.raises(ValueError, match="missing does not exist"):
        check_json_target(link)
    with pytest.raises(ValueError, match="missing does not exist"):
        check_output_file(link, "the scores")


def test_training_json_writes_into_a_fifo(fifo: Path) -> None:
    received = read_while(fifo, lambda: write_json_atomic(fifo, {"psnr": 38.0}))
    assert json.loads(received) == {"psnr": 38.0}
    assert [p.name for p in fifo.parent.iterdir()] == [fifo.name]


def _stat(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, uid, 0, 0, 0, 0))


@pytest.mark.parametrize(("folder_mode", "folder_uid", "link_uid", "planted"), [
    (0o41777, 0, 1002, True),  # /tmp: sticky, world-writable, root's; bob's link, alice writes
    (0o41777, 0, 1001, False),  # alice's own link in /tmp
    (0o41777, 1002, 1002, False),  # a link of the folder's owner
    (0o40777, 0, 1002, False),  # world-writable, not sticky: the kernel follows it too
    (0o41755, 0, 1002, False),  # sticky, not world-writable
])
def test_a_link_is_followed_as_the_kernel_would(folder_mode: int, folder_uid: int, link_uid: int,
                                                planted: bool) -> None:
    """fs.protected_symlinks' rule, which a write to a link's realpath bypassed (from a two-users review: bob's link
    /tmp/alice-bench.json -> ~alice/notes.txt had `bench --json` replace alice's notes)."""
    assert planted_link(_stat(stat.S_IFLNK | 0o777, link_uid), _stat(folder_mode, folder_uid), 1001) is planted


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a link another owner (lchown)")
def test_a_link_another_user_planted_in_a_shared_folder_is_not_written_through(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    planted = shared / "bench.json"
    planted.symlink_to(precious)
    os.lchown(planted, 12345, 12345)
    with pytest.raises(ValueError, match=r"is a link of another user \(uid 12345\) in the shared folder"):
        check_json_target(planted)
    with pytest.raises(PermissionError), partial_beside(planted) as partial:
        partial.write_text("{}")
    with pytest.raises(ValueError, match=r"cannot write the scores: .*is a link of another user \(uid 12345\)"):
        check_output_file(planted, "the scores")  # the trainer's and evaluate's writers (from the leftovers)
    with pytest.raises(PermissionError, match=r"is a link of another user"):
        write_json_atomic(planted, {"psnr": 38.0})
    own = tmp_path / "latest.json"  # the user's own link, leading to the planted one (from the diff review)
    own.symlink_to(planted)
    with pytest.raises(PermissionError, match=r"bench\.json is a link of another user"):
        replace_whole(own, "{}")
    onnx = shared / "m.onnx"
    onnx.symlink_to(precious)
    os.lchown(onnx, 12345, 12345)
    run = subprocess.run([sys.executable, "-m", "upscaler_server.export", "-o", str(onnx), "--overwrite"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "is a link of another user" in run.stderr, run.stderr
    assert precious.read_text() == "mine"

"""The C client example (examples/c_client) against a live daemon: it builds with make, its output equals the Python
client's byte for byte, it reports error replies, and valgrind finds no leak or memory error in it."""

from __future__ import annotations

import pathlib
import resource
import shutil
import subprocess
from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from upscaler_server.client import UpscalerClient

from server_utils import REPO, Daemon, make_checkpoint, run_server

C_DIR = REPO / "examples" / "c_client"
DEBIAN_PACKAGES = "build-essential pkg-config libzmq3-dev libmsgpack-dev libpng-dev valgrind"
RUN_TIMEOUT = 120  # seconds; valgrind on a loaded 2-core machine is slow


@pytest.fixture(scope="module")
def binary() -> pathlib.Path:
    missing = [tool for tool in ("cc", "make", "pkg-config") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: apt-get install {DEBIAN_PACKAGES} (or bash scripts/setup.sh)")
    build = subprocess.run(["nice", "make", "-C", str(C_DIR)], capture_output=True, text=True, timeout=300)
    if build.returncode != 0:
        pytest.fail(f"make -C examples/c_client failed; it needs the Debian packages {DEBIAN_PACKAGES}:\n"
                    f"{build.stdout}{build.stderr}")
    return C_DIR / "build" / "takdsr_upscale"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "student.safetensors")
    with run_server("--checkpoint", str(checkpoint), "--device", "cpu", "--threads", "1") as d:
        yield d


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def _python_upscale(daemon: Daemon, frame: np.ndarray, fmt: str) -> np.ndarray:
    with UpscalerClient(daemon.endpoint, timeout=30, name="pytest-c-compare") as client:
        return client.upscale(frame, fmt)


def _pattern(width: int, height: int) -> np.ndarray:
    """The C program's generated RGBA pattern (image_io.c, image_pattern)."""
    y, x = np.mgrid[0:height, 0:width]
    rgba = [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.where((x // 4 + y // 4) & 1, 220, 30),
            (x * 7 + y * 13) & 0xFF]
    return np.stack(rgba, axis=-1).astype(np.uint8)


def test_ppm_file_matches_the_python_client(binary: pathlib.Path, daemon: Daemon, tmp_path: pathlib.Path) -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (27, 41, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "in.ppm"), rgb[..., ::-1])  # OpenCV's header has a comment line: parsed too
    out = tmp_path / "out.ppm"
    result = _run([str(binary), "-e", daemon.endpoint, "-i", str(tmp_path / "in.ppm"), "-o", str(out)])
    assert result.returncode == 0, result.stdout + result.stderr
    c_output = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)[..., ::-1]
    np.testing.assert_array_equal(c_output, _python_upscale(daemon, rgb, "RGB8"))
    assert not daemon.segments(), "the C client's session was not closed"


def test_pipelined_bgra_pattern_matches_the_python_client(binary: pathlib.Path, daemon: Daemon,
                                                          tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out.png"
    cmd = [str(binary), "-e", daemon.endpoint, "-p", "33x20", "-f", "BGRA8", "-s", "3", "-n", "5", "-o", str(out)]
    result = _run(cmd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 frame(s) 33x20 -> 66x40 BGRA8" in result.stdout
    rgba = _pattern(33, 20)
    expected = _python_upscale(daemon, np.ascontiguousarray(rgba[..., [2, 1, 0, 3]]), "BGRA8")
    np.testing.assert_array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), expected)  # both BGRA


def test_error_reply_is_printed_with_its_code(binary: pathlib.Path, daemon: Daemon, tmp_path: pathlib.Path) -> None:
    result = _run([str(binary), "-e", daemon.endpoint, "-p", "10x30", "-o", str(tmp_path / "x.ppm")])
    assert result.returncode == 1
    assert "daemon error 14 SIZE_TOO_SMALL" in result.stderr and "minimum" in result.stderr


@pytest.mark.parametrize("name", ["out.png", "out.ppm"])
def test_an_unwritable_output_says_why(binary: pathlib.Path, daemon: Daemon, tmp_path: pathlib.Path,
                                       name: str) -> None:
    """Any failed write used to blame the file name's suffix."""
    target = tmp_path / "missing_folder" / name
    result = _run([str(binary), "-e", daemon.endpoint, "-p", "20x20", "-o", str(target)])
    assert result.returncode == 1 and f"cannot write {target}: No such file or directory" in result.stderr
    wrong = _run([str(binary), "-e", daemon.endpoint, "-p", "20x20", "-o", str(tmp_path / "out.jpg")])
    assert wrong.returncode == 1 and "out.jpg: the name must end in .png or .ppm" in wrong.stderr


@pytest.mark.parametrize("args", [["-p", "5x0"], ["-p", "-5x3"], ["-p", "70000x8"], ["-p", "8x8junk"],
                                  ["-p", "8x8", "-s", "0"], ["-p", "8x8", "-s", "-1"], ["-p", "8x8", "-n", "x"],
                                  ["-p", "8x8", "-t", "-3"]])
def test_bad_arguments_exit_2_before_any_work(binary: pathlib.Path, tmp_path: pathlib.Path, args: list[str]) -> None:
    """Sizes and counts are checked whole: a sign or junk is refused, never wrapped to a huge allocation."""
    run = _run([str(binary), "-e", "ipc:///nonexistent/socket", *args, "-o", str(tmp_path / "out.png")])
    assert run.returncode == 2 and "usage:" in run.stderr, run.stderr
    assert not (tmp_path / "out.png").exists()


def test_a_huge_pattern_is_refused_by_the_daemon_before_it_is_made(binary: pathlib.Path, daemon: Daemon,
                                                                   tmp_path: pathlib.Path) -> None:
    """-p made its pattern before asking the daemon: 60000x60000 RGBA is 14 GB, which under a memory limit failed
    to allocate and exited 1 without a word (and without one would have filled this machine's memory)."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    out = tmp_path / "x.png"
    result = subprocess.run([str(binary), "-e", daemon.endpoint, "-p", "60000x60000", "-f", "RGBA8", "-o", str(out)],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT, preexec_fn=limit_memory)
    assert result.returncode == 1 and "SIZE_TOO_LARGE" in result.stderr, result.stderr
    assert not out.exists()


def test_an_unreadable_input_is_named(binary: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A missing or damaged input file is named, before anything is asked of the daemon."""
    for bad in (tmp_path / "missing.png", tmp_path / "junk.png"):
        if bad.name == "junk.png":
            bad.write_bytes(b"not a png at all")
        result = _run([str(binary), "-e", "ipc:///nonexistent/socket", "-i", str(bad), "-o", str(tmp_path / "o.png")])
        assert result.returncode == 1 and f"cannot read {bad}" in result.stderr, result.stderr


def test_silent_daemon_is_a_timeout(binary: pathlib.Path, tmp_path: pathlib.Path) -> None:
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    result = _run([str(binary), "-e", endpoint, "-p", "20x20", "-t", "300", "-o", str(tmp_path / "x.ppm")])
    assert result.returncode == 1 and "TIMEOUT" in result.stderr


def _build_test_program(name: str, folder: pathlib.Path) -> pathlib.Path:
    """tests/c/NAME.c built against the example's client (the fixture `binary` has checked the tools)."""
    msgpack = "msgpack-c" if subprocess.run(["pkg-config", "--exists", "msgpack-c"]).returncode == 0 else "msgpack"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "libzmq", msgpack], capture_output=True, text=True,
                           check=True).stdout.split()  # fmt: skip
    build = subprocess.run(["cc", "-std=c11", "-Wall", "-Werror", "-O1", "-I", str(C_DIR),
                            str(REPO / "tests" / "c" / f"{name}.c"), str(C_DIR / "takdsr_client.c"), *flags,
                            "-o", str(folder / name)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert build.returncode == 0, build.stderr
    return folder / name


def test_waits_survive_signals_and_name_their_own_timeout(binary: pathlib.Path, daemon: Daemon,
                                                          tmp_path: pathlib.Path) -> None:
    """An interval timer installed without SA_RESTART interrupted zmq_poll, and takdsr_wait failed with
    'Interrupted system call'; a 0-ms poll said the client's 10-s default instead of the 0 ms asked for."""
    run = _run([str(_build_test_program("signals_during_wait", tmp_path)), daemon.endpoint, "20"])
    assert run.returncode == 0, run.stdout + run.stderr
    signals = int(run.stdout.split("signals: ")[1].split()[0])
    assert signals > 20  # the waits were interrupted, many times
    assert "poll: no reply from the daemon within 0 ms" in run.stdout


def test_a_blocked_send_keeps_its_timeout_under_signals(binary: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A send waiting for room, retried after each signal, restarted ZMQ_SNDTIMEO every time and never ended."""
    run = _run([str(_build_test_program("signals_during_send", tmp_path)), f"ipc://{tmp_path}/nobody.sock"])
    assert run.returncode == 0 and run.stdout.startswith("send: TIMEOUT after "), run.stdout + run.stderr
    assert int(run.stdout.split(" after ")[1].split()[0]) < 1000  # the client's 5 ms, give or take a busy machine


def test_no_leak_under_valgrind(binary: pathlib.Path, daemon: Daemon, tmp_path: pathlib.Path) -> None:
    if shutil.which("valgrind") is None:
        pytest.fail(f"valgrind not found: apt-get install {DEBIAN_PACKAGES} (or bash scripts/setup.sh)")
    cmd = ["nice", "valgrind", "--leak-check=full", "--errors-for-leak-kinds=definite,indirect,possible",
           "--error-exitcode=1", str(binary), "-e", daemon.endpoint, "-p", "32x24", "-f", "RGBA8", "-s", "2",
           "-n", "3", "-o", str(tmp_path / "out.png")]
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "ERROR SUMMARY: 0 errors" in result.stderr, result.stderr[-6000:]

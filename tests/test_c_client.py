"""The C client example (examples/c_client) against a live daemon: it builds with make, its output equals the Python
client's byte for byte, it reads PNGs as the Python tools do, it reports error replies and bad names (before any
work), it exits without a second timeout when the daemon dies or stops, it closes its session on Ctrl-C, it refuses a
daemon's reply that breaks the protocol, and valgrind finds no leak or memory error in it."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest

from upscaler_server.client import UpscalerClient
from upscaler_server.upscale import read_8bit

from server_utils import (
    FAKE_SESSION,
    FOREIGN_SEGMENTS,
    REPO,
    Daemon,
    fake_daemon,
    foreign_segment_names,
    make_checkpoint,
    png_header_only,
    run_server,
    scripted_daemon,
    short_tmpdir,
    untouched_segments,
)

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
    """Any failed write used to blame the file name's suffix; a missing folder, or a folder named as the output, was
    found only after every frame had run (from a review): now a bad argument, before connecting."""
    target = tmp_path / "missing_folder" / name
    result = _run([str(binary), "-e", daemon.endpoint, "-p", "20x20", "-o", str(target)])
    assert result.returncode == 2, result.stderr
    assert f"cannot write into {tmp_path / 'missing_folder'}: No such file or directory" in result.stderr
    (tmp_path / name).mkdir()
    result = _run([str(binary), "-e", "ipc:///nonexistent/socket", "-p", "20x20", "-o", str(tmp_path / name)])
    assert result.returncode == 2 and f"-o {tmp_path / name} is a folder" in result.stderr, result.stderr


@pytest.mark.parametrize("args", [["-p", "5x0"], ["-p", "-5x3"], ["-p", "70000x8"], ["-p", "8x8junk"],
                                  ["-p", "8x8", "-s", "0"], ["-p", "8x8", "-s", "-1"], ["-p", "8x8", "-n", "x"],
                                  ["-p", "8x8", "-t", "-3"],
                                  # from a review: an unknown format or endpoint failed after connecting (exit 1)
                                  ["-p", "8x8", "-f", "rgba8"], ["-p", "8x8", "-e", "bogus"],
                                  ["-p", "8x8", "-e", "tcp://127.0.0.1"], ["-p", "8x8", "-e", "tcp://host:port"],
                                  ["-p", "8x8", "-e", "tcp://127.0.0.1:99999"], ["-p", "8x8", "-e", "tcp://127.0.0.1:0"],
                                  # an abstract socket, which the daemon never serves: it waited out the timeout
                                  ["-p", "8x8", "-e", "ipc://@abc"]])
def test_bad_arguments_exit_2_before_any_work(binary: pathlib.Path, tmp_path: pathlib.Path, args: list[str]) -> None:
    """Sizes and counts are checked whole: a sign or junk is refused, never wrapped to a huge allocation."""
    run = _run([str(binary), "-e", "ipc:///nonexistent/socket", *args, "-o", str(tmp_path / "out.png")])
    assert run.returncode == 2 and "usage:" in run.stderr, run.stderr
    assert f"error: {args[-2]} {args[-1]}: " in run.stderr, run.stderr  # says which argument, and why
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(("args", "why"), [
    (["-p", "8x8"], "-o OUT.png|OUT.ppm is required"),
    (["-o", "x.png"], "give one frame: -i FILE or -p WxH"),
    (["-p", "8x8", "-i", "in.png", "-o", "x.png"], "give one frame: -i FILE or -p WxH"),
    (["-p", "8x8", "-o", "x.png", "extra"], "extra: an argument this tool does not take"),
    (["--bogus"], "unrecognized option"),
])
def test_a_usage_error_says_what_is_wrong(binary: pathlib.Path, args: list[str], why: str) -> None:
    """A missing -o, a missing or second input, or a stray argument printed the usage line alone (a review)."""
    run = _run([str(binary), *args])
    assert run.returncode == 2 and why in run.stderr and "usage:" in run.stderr, run.stderr


def test_help_is_printed_to_stdout_with_status_0(binary: pathlib.Path) -> None:
    """-h was an invalid option (status 2)."""
    for flag in ("-h", "--help"):
        run = _run([str(binary), flag])
        assert run.returncode == 0 and run.stdout.startswith("usage:") and run.stderr == "", run.stderr
        assert "-t, --timeout MS" in run.stdout and "Exit status:" in run.stdout


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


def test_an_input_the_daemon_refuses_is_never_decoded(binary: pathlib.Path, nearest: Daemon,
                                                        tmp_path: pathlib.Path) -> None:
    """A PNG was decoded whole before the daemon could refuse its size: a few KB declaring 20000x20000 took 1.2 GB
    and seconds first (from a review). Its header is read, the daemon asked, and only then is it decoded."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(20000, 20000))  # one row of data: decoding it would fail, after the allocation
    run = _run([str(binary), "-e", nearest.endpoint, "-i", str(bomb), "-o", str(tmp_path / "out.png")])
    assert run.returncode == 1 and "daemon error" in run.stderr and "SIZE_TOO_LARGE" in run.stderr, run.stderr
    assert "cannot read" not in run.stderr and not nearest.segments()


def test_an_unreadable_input_is_named(binary: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A missing or damaged input file is named, before anything is asked of the daemon."""
    for bad in (tmp_path / "missing.png", tmp_path / "junk.png"):
        if bad.name == "junk.png":
            bad.write_bytes(b"not a png at all")
        result = _run([str(binary), "-e", "ipc:///nonexistent/socket", "-i", str(bad), "-o", str(tmp_path / "o.png")])
        assert result.returncode == 1 and f"cannot read {bad}" in result.stderr, result.stderr


def test_silent_daemon_is_a_timeout(binary: pathlib.Path, tmp_path: pathlib.Path) -> None:
    endpoint = f"ipc://{tmp_path}/silent.sock"
    got: list[str] = []
    with scripted_daemon(endpoint, lambda request: got.append(request["type"])):  # never answers
        result = _run([str(binary), "-e", endpoint, "-p", "20x20", "-t", "1500", "-o", str(tmp_path / "x.ppm")])
    assert result.returncode == 1 and "TIMEOUT" in result.stderr and "within 1500 ms" in result.stderr, result.stderr
    assert got == ["hello"]


@pytest.mark.parametrize("left", ["no file", "a dead daemon's file"])
def test_no_daemon_on_an_ipc_endpoint_is_named_at_once(binary: pathlib.Path, tmp_path: pathlib.Path,
                                                       left: str) -> None:
    """With no daemon the tool waited its whole timeout (10 s by default) and said "TIMEOUT ... is it running?"; the
    Python client says at once that the socket file is missing or was left by a daemon that is no longer running."""
    path = tmp_path / "d.sock"
    if left != "no file":
        with socket.socket(socket.AF_UNIX) as dead:  # bound, never listening: what a killed daemon leaves
            dead.bind(str(path))
    start = time.monotonic()
    result = _run([str(binary), "-e", f"ipc://{path}", "-p", "20x20", "-t", "10000", "-o", str(tmp_path / "x.ppm")])
    seconds = time.monotonic() - start
    why = "does not exist" if left == "no file" else "left by a daemon that is no longer running"
    assert result.returncode == 1 and "hello: UNAVAILABLE" in result.stderr and why in result.stderr, result.stderr
    assert seconds < 5, f"{seconds:.1f} s for a 10 s timeout"


def test_a_reply_to_a_message_the_daemon_could_not_read_ends_the_wait(binary: pathlib.Path,
                                                                      tmp_path: pathlib.Path) -> None:
    """A MALFORMED reply carries req 0 (the daemon never read the message's req): the client dropped it as an answer
    to nothing and waited out its timeout."""
    endpoint = f"ipc://{tmp_path}/d.sock"
    malformed = {"v": 1, "type": "error", "req": 0, "code": 1, "name": "MALFORMED", "message": "not msgpack"}
    start = time.monotonic()
    with scripted_daemon(endpoint, lambda request: malformed):
        result = _run([str(binary), "-e", endpoint, "-p", "20x20", "-t", "10000", "-o", str(tmp_path / "x.ppm")])
    seconds = time.monotonic() - start
    assert result.returncode == 1 and "hello: daemon error 1 MALFORMED: not msgpack" in result.stderr, result.stderr
    assert seconds < 5, f"{seconds:.1f} s for a 10 s timeout"


def test_client_names_the_daemon_would_refuse_are_refused_before_sending(binary: pathlib.Path, nearest: Daemon,
                                                                         tmp_path: pathlib.Path) -> None:
    """Bytes that are not UTF-8 got MALFORMED (which the client then waited its timeout for), and a name over 64
    characters INVALID_FIELD; the Python client shortens its names to 64 characters."""
    run = _run([str(_build_test_program("hello_names", tmp_path)), nearest.endpoint])
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ARGUMENT: the client name must be UTF-8 text of at most 64 characters") == 6, run.stdout


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
           "-n", "3", "-S", "-o", str(tmp_path / "out.png")]  # -S: takdsr_stats too
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "ERROR SUMMARY: 0 errors" in result.stderr, result.stderr[-6000:]
    assert "daemon statistics: " in result.stdout


def test_the_daemons_statistics_are_printed_as_the_python_client_reads_them(binary: pathlib.Path,
                                                                            tmp_path: pathlib.Path) -> None:
    with run_server("--backend", "nearest", "--threads", "1") as fresh:  # its own daemon: counts from zero
        result = _run([str(binary), "-e", fresh.endpoint, "-p", "40x30", "-s", "2", "-n", "7", "-S", "-o",
                       str(tmp_path / "out.png")])
        assert result.returncode == 0, result.stdout + result.stderr
        with UpscalerClient(fresh.endpoint, timeout=10) as client:
            stats = client.stats()
    printed = re.search(r"daemon statistics: (\d+) frame\(s\) done, (\d+) failed, (\d+) refused BUSY in [\d.]+ s; "
                        r"(\d+) session\(s\) open, (\d+) frame\(s\) queued; the latest (\d+) frame\(s\): total "
                        r"p50 ([\d.]+) ms p99 ([\d.]+) ms, model p50 ([\d.]+) ms p99 ([\d.]+) ms", result.stdout)
    assert printed is not None, result.stdout
    counts = [int(n) for n in printed.groups()[:6]]
    assert counts == [7, 0, 0, 0, 0, 7] == [stats.frames_done, stats.frames_failed, stats.frames_busy, stats.sessions,
                                            stats.queued, stats.recent_frames]
    times = [stats.total_us_p50, stats.total_us_p99, stats.infer_us_p50, stats.infer_us_p99]
    assert printed.groups()[6:] == tuple(f"{us / 1000:.2f}" for us in times)


# --- PNG inputs: alpha, 16 bits, gAMA (image_io.c, load_png) ------------------------------------------------------


@pytest.fixture(scope="module")
def nearest() -> Iterator[Daemon]:
    """A daemon whose x2 output is a plain nearest-neighbour copy: the expected result of any input is known."""
    with run_server("--backend", "nearest", "--threads", "1") as d:
        yield d


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_png(path: pathlib.Path, samples: np.ndarray, colour_type: int, chunks: tuple[tuple[bytes, bytes], ...] = ()
               ) -> None:
    """A PNG written by hand (OpenCV writes neither grey+alpha nor a gAMA chunk): HEIGHT x WIDTH [x CHANNELS] samples,
    8 or 16 bits by their dtype, `chunks` placed before the image data."""
    height, width = samples.shape[:2]
    depth = 16 if samples.dtype == np.uint16 else 8
    rows = samples.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) +
                     b"".join(_png_chunk(kind, data) for kind, data in chunks) +
                     _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def _to_8bit(samples: np.ndarray) -> np.ndarray:
    """The offline CLI's rule (upscaler_server/upscale.py, read_8bit): 16-bit x -> x * 255 / 65535 rounded."""
    if samples.dtype == np.uint16:
        return ((samples.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return samples


def _expected_rgb(path: pathlib.Path) -> np.ndarray:
    """The colour channels as the project's offline CLI reads the file (OpenCV, then its 16 -> 8 bit rule), as RGB."""
    image = read_8bit(path)
    return np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., 2::-1]


def _run_nearest(binary: pathlib.Path, daemon: Daemon, src: pathlib.Path, out: pathlib.Path) -> np.ndarray:
    result = _run([str(binary), "-e", daemon.endpoint, "-i", str(src), "-o", str(out)])
    assert result.returncode == 0, result.stdout + result.stderr
    return cv2.imread(str(out), cv2.IMREAD_UNCHANGED)[..., ::-1]


def _nearest_x2(rgb: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1)


RNG = np.random.default_rng(11)
PALETTE = RNG.integers(0, 256, (16, 3), dtype=np.uint8)
PNG_CASES = {  # name: (samples, PNG colour type, chunks before the image data)
    "rgba8": (RNG.integers(0, 256, (17, 23, 4), dtype=np.uint8), 6, ()),
    "grey_alpha8": (RNG.integers(0, 256, (17, 23, 2), dtype=np.uint8), 4, ()),
    "rgba16": (RNG.integers(0, 65536, (17, 23, 4), dtype=np.uint16), 6, ()),
    "rgb16": (RNG.integers(0, 65536, (17, 23, 3), dtype=np.uint16), 2, ()),
    "grey16": (RNG.integers(0, 65536, (17, 23), dtype=np.uint16), 0, ()),
    "rgb8_gama_1.0": (RNG.integers(0, 256, (17, 23, 3), dtype=np.uint8), 2, ((b"gAMA", struct.pack(">I", 100000)),)),
    "grey16_gama_1.0": (RNG.integers(0, 65536, (17, 23), dtype=np.uint16), 0, ((b"gAMA", struct.pack(">I", 100000)),)),
    "palette_trns": (RNG.integers(0, 16, (17, 23), dtype=np.uint8), 3,
                     ((b"PLTE", PALETTE.tobytes()), (b"tRNS", RNG.integers(0, 256, 16, dtype=np.uint8).tobytes()))),
}


def _colour(samples: np.ndarray, colour_type: int) -> np.ndarray:
    """The RGB of PNG samples, alpha left out, 8 bits by the CLI's rule."""
    if colour_type == 3:
        return PALETTE[samples]
    rgb = {0: lambda s: np.stack([s] * 3, axis=-1), 2: lambda s: s, 4: lambda s: np.stack([s[..., 0]] * 3, axis=-1),
           6: lambda s: s[..., :3]}[colour_type](samples)
    return _to_8bit(rgb)


@pytest.mark.parametrize("name", sorted(PNG_CASES))
def test_png_inputs_arrive_as_their_colour_channels(binary: pathlib.Path, nearest: Daemon, tmp_path: pathlib.Path,
                                                    name: str) -> None:
    """libpng's simplified reader blended alpha onto an uninitialised buffer (the frame depended on heap contents),
    took 16-bit samples as linear light and applied gAMA: the daemon got other values than the Python tools read."""
    samples, colour_type, chunks = PNG_CASES[name]
    src = tmp_path / f"{name}.png"
    _write_png(src, samples, colour_type, chunks)
    expected = _colour(samples, colour_type)
    if colour_type != 4:  # OpenCV reads grey+alpha as BGRA with the grey repeated: the same colour
        np.testing.assert_array_equal(_expected_rgb(src), expected)  # what the offline CLI reads
    np.testing.assert_array_equal(_run_nearest(binary, nearest, src, tmp_path / "out.ppm"), _nearest_x2(expected))


def test_opencv_written_rgba_png_is_read_the_same_whatever_the_heap_holds(binary: pathlib.Path, nearest: Daemon,
                                                                          tmp_path: pathlib.Path) -> None:
    bgra = RNG.integers(0, 256, (19, 21, 4), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "in.png"), bgra)
    expected = _nearest_x2(bgra[..., 2::-1])
    for perturb in ("0", "85", "170"):
        result = subprocess.run([str(binary), "-e", nearest.endpoint, "-i", str(tmp_path / "in.png"), "-o",
                                 str(tmp_path / "out.ppm")], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                                env={**os.environ, "MALLOC_PERTURB_": perturb})  # fmt: skip
        assert result.returncode == 0, result.stderr
        np.testing.assert_array_equal(cv2.imread(str(tmp_path / "out.ppm"))[..., ::-1], expected)


def test_rgba_png_under_valgrind(binary: pathlib.Path, nearest: Daemon, tmp_path: pathlib.Path) -> None:
    if shutil.which("valgrind") is None:
        pytest.skip(f"valgrind not found: apt-get install {DEBIAN_PACKAGES} (or bash scripts/setup.sh)")
    cv2.imwrite(str(tmp_path / "in.png"), RNG.integers(0, 256, (16, 16, 4), dtype=np.uint8))
    result = _run(["nice", "valgrind", "--error-exitcode=1", str(binary), "-e", nearest.endpoint, "-i",
                   str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png")])  # fmt: skip
    assert result.returncode == 0 and "ERROR SUMMARY: 0 errors" in result.stderr, result.stderr[-6000:]


# --- names: checked before any work, any case -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["co/x.jpg", "out.jpg", "somefolder", "out.png.txt"])
def test_a_bad_output_name_is_refused_before_connecting(binary: pathlib.Path, tmp_path: pathlib.Path,
                                                        name: str) -> None:
    """A bad -o was refused only after every frame had run, with exit status 1."""
    start = time.monotonic()
    run = _run([str(binary), "-e", f"ipc://{tmp_path}/nobody.sock", "-p", "20x20", "-t", "5000", "-o", name])
    assert run.returncode == 2 and "usage:" in run.stderr and "must end in .png or .ppm" in run.stderr, run.stderr
    assert time.monotonic() - start < 4  # no hello was waited for


def test_a_bad_input_name_is_refused_as_an_argument(binary: pathlib.Path, tmp_path: pathlib.Path) -> None:
    cv2.imwrite(str(tmp_path / "in.jpg"), np.zeros((20, 20, 3), np.uint8))
    run = _run([str(binary), "-e", f"ipc://{tmp_path}/nobody.sock", "-i", str(tmp_path / "in.jpg"), "-o", "o.png"])
    assert run.returncode == 2 and "must end in .png or .ppm" in run.stderr, run.stderr


def test_suffixes_are_case_insensitive(binary: pathlib.Path, nearest: Daemon, tmp_path: pathlib.Path) -> None:
    rgb = RNG.integers(0, 256, (16, 18, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), rgb[..., ::-1])
    (tmp_path / "a.png").rename(tmp_path / "IN.PNG")
    run = _run([str(binary), "-e", nearest.endpoint, "-i", str(tmp_path / "IN.PNG"), "-o", str(tmp_path / "OUT.Ppm")])
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "OUT.Ppm").read_bytes().startswith(b"P6\n")
    (tmp_path / "OUT.Ppm").rename(tmp_path / "b.ppm")
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "b.ppm"))[..., ::-1], _nearest_x2(rgb))
    run = _run([str(binary), "-e", nearest.endpoint, "-i", str(tmp_path / "b.ppm"), "-o", str(tmp_path / "X.PNG")])
    assert run.returncode == 0 and (tmp_path / "X.PNG").read_bytes().startswith(b"\x89PNG"), run.stderr


# --- a daemon that dies or stops: no second timeout -----------------------------------------------------------------


def _start_long_run(binary: pathlib.Path, daemon: Daemon, tmp_path: pathlib.Path, timeout_ms: int
                    ) -> subprocess.Popen[str]:
    """takdsr_upscale submitting frames for far longer than the test, once its session is open, with four slots: a
    stopping daemon answers the frames waiting in its queue with SHUTTING_DOWN (frames not yet read from its socket
    get no reply at all)."""
    proc = subprocess.Popen([str(binary), "-e", daemon.endpoint, "-p", "96x64", "-s", "4", "-n", "4000000000",
                             "-t", str(timeout_ms), "-o", str(tmp_path / "out.png")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while not daemon.segments() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # frames flowing
    assert proc.poll() is None and daemon.segments(), proc.communicate()
    return proc


def _seconds_to_exit(proc: subprocess.Popen[str], sig: int, on: subprocess.Popen[str] | subprocess.Popen[bytes]
                     ) -> tuple[float, str]:
    """Sends `sig` to `on` (the daemon, or the tool itself) and waits for the tool: seconds taken, its stderr."""
    start = time.monotonic()
    on.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return time.monotonic() - start, err


def test_a_killed_daemon_is_noticed_within_a_second(binary: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A wait for a frame lasted the whole timeout after the daemon was killed, and closing the session waited (and
    failed) a second one. The wait now finds within about a second that nobody listens on the socket file the
    daemon left, and the session is dropped without a close."""
    with run_server("--backend", "nearest", "--threads", "1", check_clean=False) as daemon:
        proc = _start_long_run(binary, daemon, tmp_path, 8000)
        seconds, err = _seconds_to_exit(proc, signal.SIGKILL, daemon.proc)
    assert proc.returncode == 1 and "UNAVAILABLE" in err and "no longer running" in err, err
    assert seconds < 4, f"{seconds:.1f} s after the kill for an 8 s timeout:\n{err}"
    assert not (tmp_path / "out.png").exists()


def test_a_stopping_daemon_ends_the_run_at_once(binary: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """SHUTTING_DOWN was followed by a close that the stopping daemon never answers: a whole timeout more. A model
    (slower than the client) keeps frames in the daemon's queue, so SIGTERM answers some with SHUTTING_DOWN."""
    checkpoint = make_checkpoint(tmp_path / "student.safetensors")
    with run_server("--checkpoint", str(checkpoint), "--device", "cpu", "--threads", "1") as daemon:
        proc = _start_long_run(binary, daemon, tmp_path, 4000)
        seconds, err = _seconds_to_exit(proc, signal.SIGTERM, daemon.proc)
    assert proc.returncode == 1 and "SHUTTING_DOWN" in err, err
    assert seconds < 3, f"{seconds:.1f} s after SIGTERM for a 4 s timeout:\n{err}"


# --- a daemon that breaks the protocol: slots -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def asan_binary(binary: pathlib.Path) -> pathlib.Path:
    build = subprocess.run(["nice", "make", "-C", str(C_DIR), "asan"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    return C_DIR / "build" / "asan" / "takdsr_upscale"


def test_an_opened_reply_with_other_slots_is_a_protocol_error(asan_binary: pathlib.Path,
                                                              tmp_path: pathlib.Path) -> None:
    """slots 100 in `opened` (2 asked for) made the example index its 64-slot busy[] array out of bounds."""
    endpoint = f"ipc://{tmp_path}/fake.sock"
    with fake_daemon(endpoint, 100) as seen:
        run = _run([str(asan_binary), "-e", endpoint, "-p", "16x16", "-s", "2", "-n", "70", "-t", "3000", "-o",
                    str(tmp_path / "out.png")])  # fmt: skip
    assert run.returncode == 1, run.stderr[-4000:]
    assert "PROTOCOL" in run.stderr and "opened 100 slots where 2 were asked for" in run.stderr, run.stderr[-4000:]
    assert "Sanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr[-4000:]
    assert "submit" not in seen and seen[-1] == "close", seen  # the session was closed, nothing submitted


@pytest.mark.parametrize(("opened", "said"), [
    ({"width": 64, "height": 64}, "opened 64x64 RGB8 frames where 16x16 RGB8 were asked for"),
    # out_width * 3 * out_height wraps to a small slot size modulo 2^64: the layout check passed, and the example
    # wrote far past its pattern buffer (from a review)
    ({"out_width": 4294902213, "out_height": 1431677460}, "not one whole scale of 1 to 16"),
    ({"out_width": 48, "out_height": 32}, "not one whole scale"),
])
def test_an_opened_reply_with_other_sizes_is_a_protocol_error(asan_binary: pathlib.Path, tmp_path: pathlib.Path,
                                                              opened: dict[str, int], said: str) -> None:
    endpoint = f"ipc://{tmp_path}/fake.sock"
    with fake_daemon(endpoint, 2, opened=opened) as seen:
        run = _run([str(asan_binary), "-e", endpoint, "-p", "16x16", "-t", "3000", "-o", str(tmp_path / "out.png")])
    assert run.returncode == 1 and "PROTOCOL" in run.stderr and said in run.stderr, run.stderr[-4000:]
    assert "Sanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr[-4000:]
    assert "submit" not in seen and seen[-1] == "close", seen


def test_a_daemon_of_another_protocol_version_is_named_as_such(binary: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """From the upgrade review: a newer daemon's welcome (v 2) was "the daemon's reply lacks a valid v/type/req
    header", with no version named."""
    endpoint = f"ipc://{tmp_path}/fake.sock"
    with fake_daemon(endpoint, 2, version=2):
        run = _run([str(binary), "-e", endpoint, "-p", "16x16", "-t", "3000", "-o", str(tmp_path / "out.png")])
    assert run.returncode == 1, run.stderr
    assert "the daemon answered in protocol version 2; this client speaks 1" in run.stderr, run.stderr


def test_a_segment_shorter_than_its_reply_says_is_named(asan_binary: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """It was reported with whatever errno libzmq had left ("Resource temporarily unavailable")."""
    endpoint = f"ipc://{tmp_path}/fake.sock"
    with fake_daemon(endpoint, 2, short_input=True):
        run = _run([str(asan_binary), "-e", endpoint, "-p", "16x16", "-t", "3000", "-o", str(tmp_path / "out.png")])
    assert run.returncode == 1 and "holds 4096 bytes, the opened reply says 8192" in run.stderr, run.stderr[-4000:]


@pytest.mark.parametrize("which", FOREIGN_SEGMENTS)
def test_a_segment_the_daemon_would_not_name_so_is_refused(asan_binary: pathlib.Path, tmp_path: pathlib.Path,
                                                           which: str) -> None:
    """From the second security review: the client mapped whatever segment of its user the opened reply named, so a
    process answering in the daemon's place (one that took a tcp port first) had it write frames into another
    application's private segment, and read that one's bytes back as the result. Now the name must be the one a
    daemon of this user gives this session's input or output (docs/protocol.md, section 6.1)."""
    endpoint = f"ipc://{tmp_path}/fake.sock"
    names = foreign_segment_names(which)
    with fake_daemon(endpoint, 2, names=names) as seen:
        run = _run([str(asan_binary), "-e", endpoint, "-p", "16x16", "-t", "3000", "-o", str(tmp_path / "out.png")])
        assert untouched_segments(names)
    assert run.returncode == 1 and "PROTOCOL" in run.stderr, run.stderr[-4000:]
    assert (f"the daemon named {names['in']} as session {FAKE_SESSION}'s input segment, where a daemon of this user "
            f"(uid {os.geteuid()}) names it /takdsr-{os.geteuid()}-<daemon pid>-{FAKE_SESSION:08x}-in: refused"
            ) in run.stderr, run.stderr[-4000:]
    assert "submit" not in seen and seen[-1] == "close", seen
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("other", ["mode 0644", "another user's"])
def test_a_segment_not_private_to_this_user_is_refused(asan_binary: pathlib.Path, tmp_path: pathlib.Path,
                                                       other: str) -> None:
    """From the security review: the client mapped whatever segment the opened reply named. The daemon makes them
    0600 as its own user, so only that user's clients can map them, except root: a root engine mapped another user's
    segments and handed that user's daemon its frames. Now a segment must be this user's with no group or other bits
    (as the Python client checks too)."""
    if other == "another user's" and os.geteuid() != 0:
        pytest.skip("only root can give a segment to another user, and only root could then map it")
    mode, owner = (0o644, os.geteuid()) if other == "mode 0644" else (0o600, 65534)
    endpoint = f"ipc://{tmp_path}/fake.sock"
    with fake_daemon(endpoint, 2, mode=mode, owner=owner) as seen:
        run = _run([str(asan_binary), "-e", endpoint, "-p", "16x16", "-t", "3000", "-o", str(tmp_path / "out.png")])
    assert run.returncode == 1 and "PROTOCOL" in run.stderr, run.stderr[-4000:]
    assert (f"belongs to uid {owner} with mode {mode:04o}, and this client runs as uid {os.geteuid()}: a daemon serves "
            "only its own user's clients") in run.stderr, run.stderr[-4000:]
    assert "submit" not in seen and seen[-1] == "close", seen  # nothing written there; the session closed


def test_another_users_socket_and_segments_are_named_at_once(binary: pathlib.Path, nearest: Daemon,
                                                             tmp_path: pathlib.Path) -> None:
    """A socket this user may not connect to (another user's daemon: 0600, in a 0700 folder) was retried by libzmq
    until the timeout ran out, then "TIMEOUT ... is it running?"; a segment it may not open said only "Permission
    denied". As root the tool runs as uid 65534 against this user's daemon; otherwise a socket of mode 0000 refuses
    this user."""
    if os.geteuid() == 0:
        shared = short_tmpdir()  # the tool's output folder, and the fake daemon's, open to the other user
        shared.chmod(0o777)
        as_other: dict[str, Any] = {"user": 65534, "cwd": shared}
        refused = nearest.endpoint.removeprefix("ipc://")
        owner = f"its folder {pathlib.Path(refused).parent} belongs to uid 0 (mode 0700)"  # run_server's 0700 folder
        uid = 65534
    else:
        shared, as_other = tmp_path, {}
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        refused = str(tmp_path / "private.sock")
        listener.bind(refused)
        listener.listen()
        os.chmod(refused, 0)
        owner, uid = f"it belongs to uid {os.geteuid()} (mode 0000)", os.geteuid()
    try:
        start = time.monotonic()
        run = _run_as(as_other, [str(binary), "-e", f"ipc://{refused}", "-p", "16x16", "-t", "3000", "-o",
                                 str(shared / "out.png")])  # fmt: skip
        assert run.returncode == 1 and time.monotonic() - start < 2.5, run.stderr
        assert (f"permission denied on {refused}: {owner} and this process runs as uid {uid}; a daemon serves only "
                "its own user's clients") in run.stderr, run.stderr
        if os.geteuid() == 0:  # a daemon whose socket is open to all, but whose segments are its user's (0600)
            endpoint = f"ipc://{shared}/fake.sock"
            names = {kind: f"/takdsr-65534-{os.getpid()}-{FAKE_SESSION:08x}-{kind}" for kind in ("in", "out")}
            with fake_daemon(endpoint, 2, names=names) as seen:  # named for the client's uid: its check passes
                os.chmod(shared / "fake.sock", 0o777)
                run = _run_as(as_other, [str(binary), "-e", endpoint, "-p", "16x16", "-t", "3000", "-o",
                                         str(shared / "out.png")])  # fmt: skip
            assert run.returncode == 1 and "Permission denied: the segment is another user's, and a daemon serves " \
                "only its own user's clients" in run.stderr, run.stderr
            assert "submit" not in seen and seen[-1] == "close", seen
    finally:
        if os.geteuid() == 0:
            shutil.rmtree(shared, ignore_errors=True)
        else:
            listener.close()


def _run_as(how: dict[str, Any], cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, **how)


def test_a_closed_sessions_outcomes_are_never_returned(binary: pathlib.Path, nearest: Daemon,
                                                       tmp_path: pathlib.Path) -> None:
    """Outcomes that arrived before the close stayed queued, and the next takdsr_wait returned a frame of the session
    that was gone: an engine changing resolution read an unwritten slot of its new session (from a review)."""
    run = _run([str(_build_test_program("closed_session_events", tmp_path)), nearest.endpoint])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pending after close: 0" in run.stdout and "wait: TIMEOUT" in run.stdout, run.stdout


def test_a_session_opened_for_an_open_given_up_on_is_closed(tmp_path: pathlib.Path) -> None:
    """From a C integrator's walkthrough: with the daemon stalled, takdsr_session_open timed out; the daemon then
    opened the session all the same, its late `opened` was dropped, and 9 MB of segments stayed until its lease
    ended (the Python client closes such sessions). The C client now closes it too."""
    with run_server("--backend", "nearest", "--threads", "1") as daemon:
        run = _run([str(_build_test_program("late_opened", tmp_path)), daemon.endpoint, str(daemon.proc.pid)])
        assert run.returncode == 0, run.stdout + run.stderr
        assert "open: TIMEOUT" in run.stdout and "sessions open: 0" in run.stdout, run.stdout


# --- Ctrl-C and SIGTERM: close the session, exit 128 + signal --------------------------------------------------------


def test_a_signal_before_the_session_is_open_ends_the_tool_at_once(binary: pathlib.Path,
                                                                    tmp_path: pathlib.Path) -> None:
    """Its handler, installed first, only set a flag: Ctrl-C while the tool waited for an absent daemon's welcome was
    ignored until the whole timeout had passed, then it exited 1 (from a review). There is nothing to close yet. (A
    daemon that does not answer: with no socket file at all the hello now fails at once.)"""
    endpoint = f"ipc://{tmp_path}/silent.sock"
    with scripted_daemon(endpoint, lambda request: None):
        proc = subprocess.Popen([str(binary), "-e", endpoint, "-p", "20x20", "-t", "20000", "-o",
                                 str(tmp_path / "out.png")], stderr=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(0.5)
        seconds, err = _seconds_to_exit(proc, signal.SIGINT, proc)
    assert proc.returncode == -signal.SIGINT and seconds < 3, f"{seconds:.1f} s, status {proc.returncode}: {err}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_closes_its_session(binary: pathlib.Path, nearest: Daemon, tmp_path: pathlib.Path,
                                               sig: signal.Signals) -> None:
    """Killed by the signal, the tool left its session (and its segments) until the daemon's lease expired."""
    proc = _start_long_run(binary, nearest, tmp_path, 5000)
    seconds, err = _seconds_to_exit(proc, sig, proc)
    assert proc.returncode == 128 + sig, err
    assert "interrupted" in err and seconds < 3, f"{seconds:.1f} s: {err}"
    assert not nearest.segments(), "the session was left open"
    assert not (tmp_path / "out.png").exists()


def test_a_run_interrupted_while_its_frames_time_out_still_exits_128_plus_the_signal(binary: pathlib.Path,
                                                                                     tmp_path: pathlib.Path) -> None:
    """From an integrator's walkthrough: Ctrl-C while the daemon was stalled (SIGSTOP here; a hung driver) ended the
    wait for the frames in flight with TIMEOUT, and the tool exited 1: run_frames() dropped collect()'s 128 + signal,
    which the README promises (130 after Ctrl-C)."""
    with run_server("--backend", "nearest", "--threads", "1", check_clean=False) as daemon:
        proc = _start_long_run(binary, daemon, tmp_path, 1500)
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.2)  # the frames in flight stay unanswered
            seconds, err = _seconds_to_exit(proc, signal.SIGINT, proc)
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
    assert proc.returncode == 128 + signal.SIGINT, f"status {proc.returncode}: {err}"
    assert "TIMEOUT" in err and seconds < 6, f"{seconds:.1f} s: {err}"
    assert not (tmp_path / "out.png").exists()


# --- the default endpoint: its folder must be this user's, mode 0700 -------------------------------------------------


def _default_endpoint_env(xdg: pathlib.Path | None, endpoint: str | None = None) -> dict[str, str]:
    """This process's environment with XDG_RUNTIME_DIR set to ``xdg`` and $TAKDSR_UPSCALER_ENDPOINT to ``endpoint``
    (each left out when None)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "TAKDSR_UPSCALER_ENDPOINT")}
    return {**env, **({"XDG_RUNTIME_DIR": str(xdg)} if xdg else {}),
            **({"TAKDSR_UPSCALER_ENDPOINT": endpoint} if endpoint else {})}


@pytest.fixture
def xdg() -> Iterator[pathlib.Path]:
    """A short folder for $XDG_RUNTIME_DIR (socket paths stay under 107 bytes), removed afterwards."""
    folder = short_tmpdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("made", ["mode 0755", "symbolic link", "file"])
def test_a_default_endpoint_folder_that_is_not_private_is_refused(binary: pathlib.Path, xdg: pathlib.Path,
                                                                   tmp_path: pathlib.Path, made: str) -> None:
    """From a review: the default endpoint's folder was never checked. Another user could make
    /tmp/takdsr-<this uid> (mode 0755), serve a 0777 socket in it, and get this user's frames. The folder must be a
    directory (not a link), this user's, mode 0700, as the daemon's runtime_dir() requires. Tests cannot switch users:
    a folder of this user's with mode 0755 (or a link, or a file) fails the same check."""
    folder = xdg / "takdsr"
    if made == "mode 0755":
        folder.mkdir(mode=0o700)
        folder.chmod(0o755)
        kind = "a directory"
    elif made == "symbolic link":
        (xdg / "real").mkdir(mode=0o700)  # private itself: the link is what is refused
        folder.symlink_to(xdg / "real")
        kind = "a symbolic link"
    else:
        folder.write_bytes(b"")
        kind = "no directory"
    endpoint = f"ipc://{folder}/upscaler.sock"
    listens = made == "mode 0755"  # a daemon there: the client must not say a word to it
    with fake_daemon(endpoint, 2) if listens else contextlib.nullcontext([]) as seen:
        run = subprocess.run([str(binary), "-p", "16x16", "-t", "2000", "-o", str(tmp_path / "out.png")],
                             capture_output=True, text=True, timeout=RUN_TIMEOUT, env=_default_endpoint_env(xdg))
    assert run.returncode == 1, run.stderr
    mode = folder.lstat().st_mode & 0o7777
    assert (f"{folder} must be a directory owned by uid {os.geteuid()} with mode 0700, but it is {kind} owned by uid "
            f"{os.geteuid()} with mode {mode:04o}; remove it") in run.stderr, run.stderr
    assert seen == [], seen
    if listens:  # an endpoint the user names is theirs to choose: -e or $TAKDSR_UPSCALER_ENDPOINT reach that daemon
        for args, env in (["-e", endpoint], _default_endpoint_env(xdg)), ([], _default_endpoint_env(xdg, endpoint)):
            with fake_daemon(endpoint, 2) as seen:
                subprocess.run([str(binary), *args, "-p", "16x16", "-t", "300", "-o", str(tmp_path / "out.png")],
                               capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)
            assert seen[:2] == ["hello", "open"], seen


def test_the_default_endpoint_in_a_private_folder_is_used(binary: pathlib.Path, xdg: pathlib.Path,
                                                          tmp_path: pathlib.Path) -> None:
    """A missing folder is created 0700 (nobody else can make it meanwhile); an existing 0700 one of this user's
    serves."""
    run = subprocess.run([str(binary), "-p", "16x16", "-t", "300", "-o", str(tmp_path / "out.png")],
                         capture_output=True, text=True, timeout=RUN_TIMEOUT, env=_default_endpoint_env(xdg))
    assert run.returncode == 1 and "UNAVAILABLE" in run.stderr and "does not exist" in run.stderr, run.stderr
    assert (xdg / "takdsr").lstat().st_mode & 0o7777 == 0o700
    with run_server("--backend", "nearest", "--threads", "1", endpoint=f"ipc://{xdg}/takdsr/upscaler.sock"):
        run = subprocess.run([str(binary), "-p", "16x16", "-o", str(tmp_path / "out.png")], capture_output=True,
                             text=True, timeout=RUN_TIMEOUT, env=_default_endpoint_env(xdg))
    assert run.returncode == 0, run.stderr


def test_a_long_xdg_runtime_dir_is_named_when_the_socket_path_would_be_too_long(binary: pathlib.Path,
                                                                                 xdg: pathlib.Path) -> None:
    """The socket path made from a long $XDG_RUNTIME_DIR was handed to libzmq, which said "File name too long" of a
    path nobody chose (from the security review): the variable and the ways round it are named instead."""
    long = xdg / ("x" * 100)
    long.mkdir()
    socket_path = long / "takdsr" / "upscaler.sock"
    run = subprocess.run([str(binary), "-p", "16x16", "-o", str(xdg / "out.png")], capture_output=True, text=True,
                         timeout=RUN_TIMEOUT, env=_default_endpoint_env(long))
    assert run.returncode == 1, run.stderr
    assert (f"the default socket path {socket_path} is {len(str(socket_path))} bytes long, more than a Unix socket's "
            "107, because $XDG_RUNTIME_DIR is long: set TAKDSR_UPSCALER_ENDPOINT to a shorter ipc:// path (or pass "
            "one, -e), or use a shorter XDG_RUNTIME_DIR") in run.stderr, run.stderr
    assert not (long / "takdsr").exists()

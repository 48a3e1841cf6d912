"""client_demo headless mode end to end, against daemons started by the tests or by --spawn-server."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import pathlib
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest

import scenes
from client_demo.daemon_stats import STATS_TIMEOUT, daemon_statistics
from client_demo.metrics import psnr
from upscaler_server.client import UpscalerClient

from demo_utils import (
    REPO,
    daemon_pid,
    demo_command,
    make_checkpoint,
    output_of,
    process_alive,
    read_png,
    read_stats,
    run_demo,
    segments_of,
)
from server_utils import Daemon, run_server, serve_here, shm_segments, short_tmpdir

LR = (64, 36)
LR_ARG = f"{LR[0]}x{LR[1]}"
HR = (LR[0] * 2, LR[1] * 2)
EXIT_UNAVAILABLE = 3  # client_demo.config, written out: the tests pin the documented value


@pytest.fixture(scope="module")
def nearest_daemon() -> Iterator[Daemon]:
    """The daemon's nearest-neighbour backend: the demo's output becomes exactly predictable."""
    with run_server("--backend", "nearest") as daemon:
        yield daemon


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_checkpoint(tmp_path_factory.mktemp("demo-ckpt") / "student.safetensors")


def test_headless_frames_are_the_upscaled_render(nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    """Each PNG of the SR view is the daemon's upscale of that frame's LR render (orientation, slots and frame
    bookkeeping all show up here), and the PSNR in stats.json is against the supersampled HR render of that frame."""
    frames = 5
    result = run_demo("--headless", "--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--frames", str(frames),
                      "--view", "sr", "--scene", "arena", "--start", "3", "--fps", "10", "--out", str(tmp_path))
    assert result.returncode == 0, output_of(result)
    stats = read_stats(tmp_path)
    assert stats["completed"] and stats["frames"] == frames, stats
    assert stats["upscaler"]["model"] == "nearest"
    for record in stats["per_frame"]:
        t = 3 + record["index"] / 10
        assert record["t"] == pytest.approx(t)
        lr = scenes.render("arena", t, *LR)
        expected = np.repeat(np.repeat(lr, 2, axis=0), 2, axis=1)
        shown = read_png(tmp_path / "frames" / f"{record['index']:05d}.png")
        assert np.array_equal(shown, expected), f"frame {record['index']} is not the upscale of its LR render"
        reference = scenes.render("arena", t, *HR, supersample=2)
        assert record["psnr_sr_db"] == pytest.approx(psnr(expected, reference), abs=1e-6)
        bilinear = cv2.resize(lr, HR, interpolation=cv2.INTER_LINEAR)
        assert record["psnr_bilinear_db"] == pytest.approx(psnr(bilinear, reference), abs=0.5)


def test_an_earlier_runs_frames_are_replaced_and_an_unwritable_out_is_refused(nearest_daemon: Daemon,
                                                                              tmp_path: pathlib.Path) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for name in ("00001.png", "00004.png", "notes.txt"):  # a longer earlier run, and a file of the user's
        (frames / name).write_bytes(b"old")
    result = run_demo("--headless", "--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--frames", "2",
                      "--out", str(tmp_path))
    assert result.returncode == 0, output_of(result)
    assert sorted(p.name for p in frames.iterdir()) == ["00000.png", "00001.png", "notes.txt"]
    assert read_png(frames / "00001.png").shape == (HR[1], HR[0], 3)  # this run's frame, not the old bytes
    unwritable = run_demo("--headless", "--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--frames", "2",
                          "--out", "/proc/takdsr-demo-out")  # fmt: skip
    assert unwritable.returncode == 2 and "cannot write into /proc/takdsr-demo-out" in unwritable.stderr, \
        output_of(unwritable)


def test_the_split_view_is_captioned_and_a_run_without_frames_leaves_no_video(nearest_daemon: Daemon,
                                                                             tmp_path: pathlib.Path) -> None:
    """Whoever watches demo.mp4 must see which half is the upscaler; a run that gets no frame writes no video."""
    args = ["--headless", "--endpoint", nearest_daemon.endpoint, "--lr", "160x90", "--frames", "1", "--scene",
            "arena"]
    for view in ("split", "sr"):
        result = run_demo(*args, "--view", view, "--out", str(tmp_path / view))
        assert result.returncode == 0, output_of(result)
    split, sr = (read_png(tmp_path / view / "frames" / "00000.png") for view in ("split", "sr"))
    left = slice(0, split.shape[1] // 2 - 1)  # the divider is the two middle columns
    assert np.array_equal(split[:-30, left], sr[:-30, left])  # the upscaled half, untouched above the caption
    caption = split[-30:, left]
    assert (caption == 255).all(axis=2).any() and (caption == 0).all(axis=2).sum() > 200  # white text, dark box
    assert not np.array_equal(caption, sr[-30:, left])
    nobody = run_demo("--headless", "--endpoint", f"ipc://{tmp_path}/nobody.sock", "--lr", LR_ARG, "--frames", "2",
                      "--out", str(tmp_path / "none"))
    assert nobody.returncode == 3, output_of(nobody)
    assert not (tmp_path / "none" / "demo.mp4").exists()  # no unplayable 257-byte file
    assert not (tmp_path / "none" / "stats.json").exists()  # never connected: nothing in --out was written


def test_spawn_server_writes_outputs_and_leaves_nothing(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    frames = 4
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "auto.json").write_text("{not json")  # its daemon's warning is shown: its log goes with its folder
    result = run_demo("--headless", "--spawn-server", "--checkpoint", str(checkpoint), "--device", "cpu",
                      "--lr", LR_ARG, "--frames", str(frames), "--scene", "city", "--out", str(tmp_path),
                      env={"TAKDSR_CACHE_DIR": str(cache)})
    assert result.returncode == 0, output_of(result)
    # its --backend auto measured eager fp32 against eager bf16 for the demo's size, and nothing else (compile's
    # candidates would have cost tens of seconds before the first frame); the demo shows what the daemon's auto logged
    from upscaler_server.backends.common import cpu_bf16  # what the daemon tests on this CPU

    prefix = "client_demo: from the daemon's log: "
    said = [line.removeprefix(prefix) for line in result.stderr.splitlines() if line.startswith(prefix)]
    if cpu_bf16():
        measured = json.loads((cache / "auto.json").read_text())["entries"]
        assert [key.rsplit("|", 1)[1] for key in measured] == [LR_ARG], measured
        (entry,) = measured.values()
        assert set(entry["candidates"]) == {"eager-fp32", "eager-bf16"} and entry["choice"] in entry["candidates"]
        assert len(said) == 2, output_of(result)
        assert said[0].startswith(f"ignoring the corrupt auto-backend cache {cache}")
        assert said[1].startswith(f"auto backend for {LR_ARG} on cpu: {entry['choice']} (measured: eager-fp32 ")
    else:  # fp32 eager is the only candidate: taken without measuring, the cache neither read nor written
        assert said == [f"auto backend for {LR_ARG} on cpu: eager-fp32, the only candidate here (not measured)"]
        assert (cache / "auto.json").read_text() == "{not json"
    pid = daemon_pid(result.stderr)
    assert not process_alive(pid), f"the spawned daemon {pid} is still running"
    assert not segments_of(pid), f"the spawned daemon left shared memory: {segments_of(pid)}"

    pngs = sorted((tmp_path / "frames").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(frames)]
    first = read_png(pngs[0])
    assert first.shape == (HR[1], HR[0], 3) and first.mean() > 10, "frames should show the scene"
    video = cv2.VideoCapture(str(tmp_path / "demo.mp4"))
    assert video.isOpened() and int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == frames
    video.release()

    stats = read_stats(tmp_path)
    assert stats["completed"] and stats["error"] is None and stats["frames"] == frames
    assert stats["lr_size"] == list(LR) and stats["hr_size"] == list(HR) and stats["scale"] == 2
    assert stats["upscaler"]["model"].startswith("rlfn") and stats["upscaler"]["device"] == "cpu"
    assert stats["upscaler"]["precision"] == "auto"  # chosen per size: the daemon's log and auto.json say which
    assert stats["fps"] > 0 and stats["wall_s"] > 0
    rtt = stats["round_trip_ms"]
    assert 0 < rtt["p50"] <= rtt["p90"] <= rtt["p99"]
    assert len(stats["per_frame"]) == frames
    for record in stats["per_frame"]:
        assert all(math.isfinite(record[k]) and 0 < record[k] <= 100 for k in ("psnr_sr_db", "psnr_bilinear_db"))
    assert stats["psnr_db"]["bilinear_mean"] > 15, "bilinear should resemble the native render"
    # the daemon's own account: it served this run alone, so its counts are the run's, and its model times the replies'
    daemon = stats["daemon_statistics"]
    assert (daemon["frames_done"], daemon["frames_failed"], daemon["recent_frames"]) == (frames, 0, frames), daemon
    infer_us = sorted(record["infer_ms"] * 1000 for record in stats["per_frame"])
    assert infer_us[0] - 1 <= daemon["infer_us_p50"] <= daemon["infer_us_p99"] <= infer_us[-1] + 1, (daemon, infer_us)
    assert f"the daemon since it started: {frames} frame(s) done, 0 failed" in result.stdout, output_of(result)


def test_headless_exits_cleanly_when_the_daemon_is_killed(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Documented: exit status 3, a message, partial outputs with stats.json "completed": false; the killed
    daemon's shared memory is cleared."""
    log = tmp_path / "demo.log"
    with _running_demo(log, "--headless", "--spawn-server", "--checkpoint", str(checkpoint), "--device", "cpu",
                       "--lr", LR_ARG, "--frames", "100000", "--out", str(tmp_path / "out")) as demo:
        pid = _wait_for_frames(demo, log, tmp_path / "out" / "frames", count=2)
        os.kill(pid, signal.SIGKILL)
        status = demo.wait(timeout=60)
    stderr_text = log.read_text()
    assert status == EXIT_UNAVAILABLE, stderr_text
    assert "upscaler daemon was killed by signal 9 (SIGKILL)" in stderr_text, stderr_text
    stats = read_stats(tmp_path / "out")
    assert stats["completed"] is False and "killed by signal 9" in stats["error"] and stats["frames"] >= 2
    assert stats["daemon_statistics"] is None  # not asked for: nobody answers
    assert not process_alive(pid) and not segments_of(pid)


def _wait_for_frames(demo: subprocess.Popen[str], log: pathlib.Path, frames_dir: pathlib.Path, count: int,
                     spawned: bool = True) -> int:
    """Wait until the demo has written ``count`` frames; returns its spawned daemon's pid (0 if not ``spawned``)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert demo.poll() is None, f"the demo exited early ({demo.returncode}):\n{log.read_text()}"
        if frames_dir.is_dir() and len(list(frames_dir.glob("*.png"))) >= count:
            return daemon_pid(log.read_text()) if spawned else 0
        time.sleep(0.1)
    pytest.fail(f"the demo wrote fewer than {count} frames in 90 s:\n{log.read_text()}")


def test_the_daemons_statistics_are_asked_of_the_daemon_that_served(nearest_daemon: Daemon,
                                                                    tmp_path: pathlib.Path) -> None:
    """Counts of another daemon instance (the served one restarted) would be another run's; none answering is None."""
    with UpscalerClient(nearest_daemon.endpoint) as client:
        instance = client.info.instance
    served = daemon_statistics(nearest_daemon.endpoint, instance)
    assert served is not None and served.instance == instance
    assert daemon_statistics(nearest_daemon.endpoint, instance + "-restarted") is None
    started = time.monotonic()
    assert daemon_statistics(f"ipc://{tmp_path}/nobody.sock", instance) is None
    assert time.monotonic() - started < STATS_TIMEOUT  # no socket file: known at once, not after the timeout


def test_spawn_server_on_an_endpoint_already_served_refuses(nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    """Another daemon answering on --endpoint would be taken for the spawned one: refused before spawning."""
    command = demo_command("--headless", "--spawn-server", "--endpoint", nearest_daemon.endpoint, "--frames", "2",
                           "--out", str(tmp_path / "out"))
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 4 and "another upscaler daemon already serves" in run.stderr, run.stderr
    assert "daemon ready" not in run.stderr
    assert not (tmp_path / "out").exists()  # locked first, nothing written: the folder it made is removed again


def test_a_spawned_daemon_that_cannot_load_its_checkpoint_is_reported_and_leaves_nothing(
        tmp_path: pathlib.Path) -> None:
    """docs/demo.md: a daemon that cannot start (a file that is not a checkpoint) is reported with its message, and
    the demo exits with status 4. Its private folder (log, socket), the --out folder it made, and any shared memory
    go with it: nothing is left of a run that never served a frame."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    segments_before = set(shm_segments())
    result = run_demo("--headless", "--spawn-server", "--checkpoint", str(junk), "--device", "cpu", "--lr", LR_ARG,
                      "--frames", "2", "--out", str(out))
    assert result.returncode == 4, output_of(result)
    assert "the upscaler daemon exited with status" in result.stderr and "before it was ready" in result.stderr, \
        output_of(result)
    tail = [line for line in result.stderr.splitlines() if line.startswith("  | ")]  # the daemon's log, quoted
    assert any(f"cannot load checkpoint {junk}" in line for line in tail), output_of(result)
    assert "daemon ready" not in result.stderr
    assert not out.exists(), list(out.rglob("*"))
    started = re.search(r"starting the upscaler daemon \(ipc://(/tmp/takdsr-demo-(\d+)-[^/]+)/", result.stderr)
    assert started, output_of(result)
    assert not pathlib.Path(started.group(1)).exists(), f"the demo left its daemon's folder {started.group(1)}"
    assert not list(pathlib.Path("/tmp").glob(f"takdsr-demo-{started.group(2)}-*"))
    # the daemon is gone: a segment of its would be one of a process no longer alive (other daemons may run)
    left = [name for name in set(shm_segments()) - segments_before if not process_alive(int(name.split("-")[2]))]
    assert left == [], f"shared memory left behind: {left}"


def test_wall_s_includes_the_spawned_daemons_start_up(nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    """docs/demo.md: "start-up included"; the time the spawned daemon took to start was left out. A stand-in for
    SpawnedDaemon takes 5 s to start (longer than the rest of this run) and hands the demo the tests' daemon."""
    code = (
        "import sys, time\n"
        "from client_demo import cli\n"
        "class SlowDaemon:\n"
        f"    endpoint, pid = {nearest_daemon.endpoint!r}, 0\n"
        "    def __init__(self, *args, **kwargs): pass\n"
        "    def __enter__(self): return self\n"
        "    def __exit__(self, *exc): pass\n"
        "    def start(self, should_stop): time.sleep(5)\n"
        "    def gone(self): return None\n"
        "    def auto_backend_lines(self): return []\n"
        "cli.SpawnedDaemon = SlowDaemon\n"
        f"sys.exit(cli.main(['--headless', '--spawn-server', '--lr', '{LR_ARG}', '--frames', '1', '--out', "
        f"{str(tmp_path)!r}]))\n"
    )
    result = run_demo(command=[sys.executable, "-c", code])
    assert result.returncode == 0, output_of(result)
    assert read_stats(tmp_path)["wall_s"] >= 5


def test_demo_never_imports_torch(nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    """Every client_demo module is imported and a headless run done in one process; torch must not be loaded."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import client_demo\n"
        "for m in pkgutil.iter_modules(client_demo.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('client_demo.' + m.name)\n"
        "from client_demo.cli import main\n"
        f"status = main(['--headless', '--endpoint', {nearest_daemon.endpoint!r}, '--lr', '{LR_ARG}',\n"
        f"               '--frames', '2', '--out', {str(tmp_path)!r}])\n"
        "print('loaded:', sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
        "sys.exit(status)\n"
    )
    result = run_demo(command=[sys.executable, "-c", code])
    assert result.returncode == 0, output_of(result)
    assert "loaded: []" in result.stdout, output_of(result)


def test_bundled_student_beats_bilinear(tmp_path: pathlib.Path) -> None:
    """The demo's default student (trained on native LR, as the demo renders it) against bilinear, both
    compared with the 2x2-supersampled HR render."""
    result = run_demo("--headless", "--spawn-server", "--device", "cpu", "--lr", "160x90", "--frames", "4",
                      "--scene", "city", "--out", str(tmp_path))
    assert result.returncode == 0, output_of(result)
    quality = read_stats(tmp_path)["psnr_db"]
    assert quality["sr_mean"] > quality["bilinear_mean"], quality


@contextlib.contextmanager
def _running_demo(log: pathlib.Path, *args: str,
                  command: list[str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """``python -m client_demo ARGS`` (or ``command``) in the background, its stderr in ``log`` and its stdout beside
    it (_stdout_of); killed on the way out if it is still running."""
    with open(log, "w") as stderr, open(_stdout_of(log), "w") as stdout:
        demo = subprocess.Popen(command or demo_command(*args), cwd=REPO, stdout=stdout, stderr=stderr, text=True)
    try:
        yield demo
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def _stdout_of(log: pathlib.Path) -> pathlib.Path:
    return log.with_name(log.name + ".stdout")


def _ended(demo: subprocess.Popen[str], timeout: float = 60) -> int:
    """The demo's exit status; it is killed (and the test fails) if it does not end within ``timeout``."""
    try:
        return demo.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        demo.kill()
        demo.wait()
        pytest.fail(f"the demo did not end within {timeout} s")


def _earlier_run(out: pathlib.Path) -> dict[str, bytes]:
    """The outputs of an earlier, completed run in ``out``; returns them by name."""
    (out / "frames").mkdir(parents=True)
    files = {"frames/00000.png": b"old frame", "demo.mp4": b"old video",
             "stats.json": b'{"completed": true, "error": null, "frames": 1}'}
    for name, content in files.items():
        (out / name).write_bytes(content)
    return files


def test_an_invalid_lr_deletes_nothing_of_an_earlier_run(nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    """An --lr whose HR frames this OpenGL cannot draw is an argument error (status 2): it used to be found only after
    the earlier run's frames and video were deleted, leaving its stats.json ("completed": true) beside nothing."""
    files = _earlier_run(tmp_path)
    result = run_demo("--headless", "--endpoint", nearest_daemon.endpoint, "--lr", "9000x100", "--frames", "2",
                      "--out", str(tmp_path))
    assert result.returncode == 2 and "px a side" in result.stderr, output_of(result)
    assert {name: (tmp_path / name).read_bytes() for name in files} == files


@pytest.mark.parametrize(("case", "status", "said"), [
    ("wrong scale", 2, "the daemon upscales x2 but the demo was asked for x3"),
    ("no daemon", EXIT_UNAVAILABLE, "upscaler unavailable while connecting"),
    ("one slot", 2, "the daemon allows 1 frame(s) in flight per session and the demo keeps 2"),
])
def test_a_daemon_that_cannot_serve_the_run_deletes_nothing_of_an_earlier_run(
        case: str, status: int, said: str, nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    """From a review: the earlier run's frames and video were deleted before the daemon was reached, so a mistyped
    --scale or endpoint, or a daemon not started yet, cost the earlier outputs. A daemon with --max-slots 1, which
    can never serve the demo's two frames in flight, was reported as unreachable (status 3)."""
    files = _earlier_run(tmp_path / "out")
    run = functools.partial(run_demo, "--headless", "--lr", LR_ARG, "--frames", "2", "--out", str(tmp_path / "out"))
    if case == "wrong scale":
        result = run("--endpoint", nearest_daemon.endpoint, "--scale", "3")
    elif case == "no daemon":
        result = run("--endpoint", f"ipc://{tmp_path}/none.sock")
    else:
        with run_server("--backend", "nearest", "--max-slots", "1") as one_slot:
            result = run("--endpoint", one_slot.endpoint)
    assert result.returncode == status and said in result.stderr, output_of(result)
    assert f"nothing in {tmp_path / 'out'} was changed" in result.stderr
    assert {name: (tmp_path / "out" / name).read_bytes() for name in files} == files


def test_a_frame_given_up_says_how_long_it_waited_and_which_option_to_raise(tmp_path: pathlib.Path) -> None:
    """From a review: with --timeout 0.05 the run ended "frame 1 got no reply in 0 s although the daemon answers
    pings; is it overloaded?", a wait of 0.1 s shown as 0, and no word of --timeout."""
    with run_server("--model", "rlfn_s", "--threads", "1") as slow:  # random weights: 0.1 s or more a frame here
        result = run_demo("--headless", "--lr", "320x180", "--frames", "6", "--timeout", "0.05", "--endpoint",
                          slow.endpoint, "--out", str(tmp_path / "out"))
    assert result.returncode == 3, output_of(result)
    assert re.search(r"frame \d+ got no reply in \d+\.\d s although the daemon answers pings; is it overloaded\? "
                     r"\(a frame is given up after twice --timeout: raise it above one frame's upscale time\)",
                     result.stderr), output_of(result)


def test_a_run_that_writes_nothing_removes_the_folders_it_created(tmp_path: pathlib.Path) -> None:
    """From a paths review: a first run with no daemon to reach created --out (and its missing parents) and left them
    holding only the lock file. A folder that existed keeps its lock file, as before."""
    out = tmp_path / "new" / "deeper" / "out"
    result = run_demo("--headless", "--lr", LR_ARG, "--frames", "2", "--out", str(out), "--endpoint",
                      f"ipc://{tmp_path}/none.sock")
    assert result.returncode == 3 and "nothing in" in result.stderr, output_of(result)
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))
    existing = tmp_path / "existing"
    existing.mkdir()
    result = run_demo("--headless", "--lr", LR_ARG, "--frames", "2", "--out", str(existing), "--endpoint",
                      f"ipc://{tmp_path}/none.sock")
    assert result.returncode == 3, output_of(result)
    assert [path.name for path in existing.iterdir()] == [".takdsr-demo.lock"]


def test_the_supersampled_reference_is_within_what_opengl_draws(nearest_daemon: Daemon,
                                                                tmp_path: pathlib.Path) -> None:
    """Headless frames are scored against a 2x2-supersampled render: HR frames above half the GL limit passed the
    size check and failed on the first frame with a traceback (exit 1), after the earlier outputs were deleted."""
    renderer = scenes.SceneRenderer()
    try:
        largest = renderer.max_size()
    finally:
        renderer.release()
    files = _earlier_run(tmp_path)
    lr_width = largest // 4 + 1  # x2: HR within the limit, its reference (2x HR) beyond it
    result = run_demo("--headless", "--endpoint", nearest_daemon.endpoint, "--lr", f"{lr_width}x4", "--frames", "1",
                      "--out", str(tmp_path))
    assert result.returncode == 2, output_of(result)
    assert "with their 2x2-supersampled reference" in result.stderr and "Traceback" not in result.stderr
    assert {name: (tmp_path / name).read_bytes() for name in files} == files


def test_stats_name_the_default_endpoint_used(nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    """Without --endpoint the demo connects to the client's default ($TAKDSR_UPSCALER_ENDPOINT); stats.json said
    null (found in a review)."""
    result = run_demo("--headless", "--lr", LR_ARG, "--frames", "1", "--out", str(tmp_path),
                      env={"TAKDSR_UPSCALER_ENDPOINT": nearest_daemon.endpoint})
    assert result.returncode == 0, output_of(result)
    assert read_stats(tmp_path)["upscaler"]["endpoint"] == nearest_daemon.endpoint


def test_a_default_endpoint_that_is_no_endpoint_is_a_usage_error(tmp_path: pathlib.Path) -> None:
    """It was reported as a daemon that could not be reached (status 3), quoting a value the user never typed."""
    result = run_demo("--headless", "--lr", LR_ARG, "--frames", "1", "--out", str(tmp_path / "out"),
                      env={"TAKDSR_UPSCALER_ENDPOINT": "foo"})
    assert result.returncode == 2, output_of(result)
    assert "$TAKDSR_UPSCALER_ENDPOINT: endpoint 'foo' must start with ipc:// or tcp://" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_demo_into_the_same_folder_is_refused(nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    """Two runs into one --out (scripts/demo.sh always uses ./demo_out) overwrote each other and both exited 0."""
    out = tmp_path / "out"
    with _running_demo(tmp_path / "first.log", "--headless", "--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG,
                       "--frames", "100000", "--view", "sr", "--out", str(out)) as first:
        _wait_for_frames(first, tmp_path / "first.log", out / "frames", count=2, spawned=False)
        start = time.monotonic()
        second = run_demo("--headless", "--endpoint", nearest_daemon.endpoint, "--lr", "160x90", "--frames", "1",
                          "--out", str(out))
        assert second.returncode == 2, output_of(second)
        assert f"another demo (pid {first.pid}) is writing into {out}" in second.stderr, output_of(second)
        assert time.monotonic() - start < 10
        assert read_png(out / "frames" / "00000.png").shape == (HR[1], HR[0], 3)  # the first run's, untouched
        first.send_signal(signal.SIGTERM)
        assert _ended(first) == 130
    assert read_stats(out)["error"] == "interrupted"


def test_a_second_signal_still_leaves_a_truthful_stats_json(nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    """A second signal interrupts at once; stats.json was written only at the end, so the earlier run's
    "completed": true stayed beside this run's frames."""
    _earlier_run(tmp_path)
    log = tmp_path / "demo.log"
    with _running_demo(log, "--headless", "--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--frames",
                       "100000", "--out", str(tmp_path)) as demo:
        _wait_for_frames(demo, log, tmp_path / "frames", count=3, spawned=False)
        demo.send_signal(signal.SIGINT)
        demo.send_signal(signal.SIGTERM)  # another signal number: never merged with the first
        assert _ended(demo) == 130, log.read_text()
    stats = read_stats(tmp_path)
    assert stats["completed"] is False and "interrupted" in stats["error"], stats
    # and the run says how far it got (a second signal that landed in a frame printed only "interrupted")
    said = _stdout_of(log).read_text()
    assert f"wrote {stats['frames']}/100000 frames to {tmp_path}" in said, (said, log.read_text())
    # in one line: "client_demo: interrupted" came after "client_demo: interrupted at once ..."
    assert len(_interrupted_lines(log)) == 1, log.read_text()
    # "at once" waits while a frame's PNG and record are written (CI once saw 3 PNGs and 2 records before it did;
    # the test below sends the signal into that gap on purpose)
    pngs = len(list((tmp_path / "frames").glob("*.png")))
    assert pngs >= 3 and stats["frames"] == pngs, (pngs, stats["frames"])
    assert (tmp_path / "frames" / "00000.png").stat().st_size > len(b"old frame")


def test_a_second_signal_during_the_final_stats_write_still_leaves_them(nearest_daemon: Daemon,
                                                                        tmp_path: pathlib.Path) -> None:
    """From a review: a second signal that landed in the final write of stats.json aborted it, which then still
    said "the run did not finish" and 0 frames beside the frames and a playable MP4. The final write is made slow
    here (1 s), and the second signal is sent into it."""
    log = tmp_path / "demo.log"
    slow_final_write = textwrap.dedent("""
        import sys, time
        from client_demo import cli, headless
        save = headless._save_stats
        def slow_when_final(out, stats):
            if stats["error"] != headless.UNFINISHED:
                print("final stats write", file=sys.stderr, flush=True)
                time.sleep(1)
            save(out, stats)
        headless._save_stats = slow_when_final
        sys.exit(cli.main(sys.argv[1:]))
    """)
    command = [sys.executable, "-c", slow_final_write, "--headless", "--endpoint", nearest_daemon.endpoint, "--lr",
               LR_ARG, "--frames", "100000", "--view", "sr", "--out", str(tmp_path)]
    with _running_demo(log, command=command) as demo:
        _wait_for_frames(demo, log, tmp_path / "frames", count=3, spawned=False)
        demo.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        while "final stats write" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        demo.send_signal(signal.SIGTERM)
        assert _ended(demo) == 130, log.read_text()
    stats = read_stats(tmp_path)
    frames = len(list((tmp_path / "frames").glob("*.png")))
    assert stats["error"] == "interrupted" and stats["frames"] == frames >= 3, (stats["error"], log.read_text())
    assert stats["outputs"]["video"] == "demo.mp4"
    video = cv2.VideoCapture(str(tmp_path / "demo.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == frames
    assert len(_interrupted_lines(log)) == 1, log.read_text()


def _interrupted_lines(log: pathlib.Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("client_demo: interrupted")]


def test_a_second_signal_between_a_frames_png_and_its_record_still_counts_the_frame(nearest_daemon: Daemon,
                                                                                   tmp_path: pathlib.Path) -> None:
    """A second signal that lands after a frame's PNG is written but before its record used to leave one more PNG
    than stats.json counts (CI saw 3 PNGs, 2 records). The frame's files and record are now one step that the
    second signal waits for. Here each frame's write is followed by a 1 s pause, and the signals are sent into it."""
    log = tmp_path / "demo.log"
    slow_frame_write = textwrap.dedent("""
        import sys, time
        from client_demo import cli, headless
        write = headless._Outputs.write
        def slow_write(self, index, rgb):
            write(self, index, rgb)
            if index == 2:
                print("frame 2 written", file=sys.stderr, flush=True)
                time.sleep(1)
        headless._Outputs.write = slow_write
        sys.exit(cli.main(sys.argv[1:]))
    """)
    command = [sys.executable, "-c", slow_frame_write, "--headless", "--endpoint", nearest_daemon.endpoint, "--lr",
               LR_ARG, "--frames", "100000", "--view", "sr", "--out", str(tmp_path)]
    with _running_demo(log, command=command) as demo:
        deadline = time.monotonic() + 60
        while "frame 2 written" not in log.read_text() and time.monotonic() < deadline and demo.poll() is None:
            time.sleep(0.02)
        demo.send_signal(signal.SIGINT)
        demo.send_signal(signal.SIGTERM)  # "at once", while frame 2 has its PNG and not yet its record
        assert _ended(demo) == 130, log.read_text()
    stats = read_stats(tmp_path)
    pngs = sorted(path.name for path in (tmp_path / "frames").glob("*.png"))
    assert stats["completed"] is False and "interrupted" in stats["error"], stats
    assert pngs == ["00000.png", "00001.png", "00002.png"], pngs
    assert stats["frames"] == 3 and [record["index"] for record in stats["per_frame"]] == [0, 1, 2], stats["frames"]


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_an_external_daemon_that_goes_away_is_noticed_at_once(stop_signal: int, tmp_path: pathlib.Path) -> None:
    """--endpoint (not --spawn-server), the default --timeout of 10 s: a daemon that died or was stopped used to be
    noticed only after the timeout, as one that "does not answer"."""
    log = tmp_path / "demo.log"
    with run_server("--backend", "nearest", check_clean=False) as daemon, \
            _running_demo(log, "--headless", "--endpoint", daemon.endpoint, "--lr", LR_ARG, "--frames", "100000",
                          "--out", str(tmp_path / "out")) as demo:
        _wait_for_frames(demo, log, tmp_path / "out" / "frames", count=2, spawned=False)
        daemon.proc.send_signal(stop_signal)
        start = time.monotonic()
        status = _ended(demo)
        elapsed = time.monotonic() - start
    stderr = log.read_text()
    assert status == EXIT_UNAVAILABLE and elapsed < 5, (elapsed, stderr)
    assert "stopped answering" in stderr or "shutting down" in stderr, stderr
    assert "does not answer" not in stderr, stderr


def _paused_past_the_lease(demo: subprocess.Popen[str], log: pathlib.Path, out: pathlib.Path) -> int:
    """Stop the demo (as Ctrl-Z does) for three leases of 1 s once it has written 3 frames; its exit status."""
    _wait_for_frames(demo, log, out / "frames", count=3, spawned=False)
    demo.send_signal(signal.SIGSTOP)
    time.sleep(3)
    demo.send_signal(signal.SIGCONT)
    return _ended(demo)


def test_a_demo_paused_past_its_lease_opens_a_new_session(tmp_path: pathlib.Path) -> None:
    """Ctrl-Z for longer than the daemon's lease: the daemon ends the session, and the demo used to exit 3 blaming
    the daemon. It now opens one new session and sends the frames lost with the old one again."""
    frames = 40
    log, out = tmp_path / "demo.log", tmp_path / "out"
    with run_server("--backend", "nearest", "--lease-timeout", "1") as daemon:
        with _running_demo(log, "--headless", "--endpoint", daemon.endpoint, "--lr", LR_ARG, "--frames", str(frames),
                           "--view", "sr", "--out", str(out)) as demo:
            status = _paused_past_the_lease(demo, log, out)
        assert "lease expired" in daemon.log()
    assert status == 0, log.read_text()
    stats = read_stats(out)
    assert stats["completed"] and stats["sessions_reopened"] == 1, stats
    assert [r["index"] for r in stats["per_frame"]] == list(range(frames))
    assert len(list((out / "frames").glob("*.png"))) == frames


def test_a_session_reopened_within_one_poll_still_resends_its_frames(tmp_path: pathlib.Path) -> None:
    """Reproduced in a review: when the main thread was busy past the worker's wait for it (2 s) plus the backoff,
    one poll() applied both the loss and the new connection; the demo never saw RETRYING, so the frames lost with
    the old session were never sent again and it waited for them forever. The main thread is made that slow here
    by holding back the first loss 3 s before it is applied."""
    frames = 30
    log, out = tmp_path / "demo.log", tmp_path / "out"
    slow_loss = textwrap.dedent("""
        import sys, time
        from client_demo import cli, link
        apply, held = link.UpscaleLink._apply, []
        def held_back(self, event, finished):
            if isinstance(event, link._Lost) and not held:
                held.append(event)
                time.sleep(3)
            apply(self, event, finished)
        link.UpscaleLink._apply = held_back
        sys.exit(cli.main(sys.argv[1:]))
    """)
    command = [sys.executable, "-c", slow_loss, "--headless", "--lr", LR_ARG, "--frames", str(frames), "--view", "sr",
               "--out", str(out)]
    with run_server("--backend", "nearest", "--lease-timeout", "1") as daemon, \
            _running_demo(log, command=[*command, "--endpoint", daemon.endpoint]) as demo:
        status = _paused_past_the_lease(demo, log, out)
    assert status == 0, log.read_text()
    stats = read_stats(out)
    assert stats["completed"] and stats["sessions_reopened"] == 1, stats
    assert [r["index"] for r in stats["per_frame"]] == list(range(frames))


def test_an_output_folder_removed_mid_run_is_reported_without_contradiction(nearest_daemon: Daemon,
                                                                            tmp_path: pathlib.Path) -> None:
    """The demo said it could not write stats.json, and then that stats.json said completed: false."""
    log, out = tmp_path / "demo.log", tmp_path / "out"
    with _running_demo(log, "--headless", "--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--frames",
                       "100000", "--out", str(out)) as demo:
        _wait_for_frames(demo, log, out / "frames", count=2, spawned=False)
        shutil.rmtree(out)
        status = _ended(demo)
    stderr = log.read_text()
    assert status == 1 and "cannot write the outputs" in stderr, stderr
    assert "stats.json says" not in stderr, stderr


def _daemon_folder(stderr: str) -> pathlib.Path:
    """The spawned daemon's private folder, from "starting the upscaler daemon (ipc://FOLDER/upscaler.sock)"."""
    match = re.search(r"starting the upscaler daemon \(ipc://(\S+)/upscaler\.sock\)", stderr)
    assert match, stderr
    return pathlib.Path(match.group(1))


def test_sighup_stops_like_sigterm(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A closed terminal or a lost SSH session: SIGHUP killed the demo outright (status 129), leaving an unplayable
    demo.mp4, no stats.json and the spawned daemon's temporary folder."""
    log, out = tmp_path / "demo.log", tmp_path / "out"
    with _running_demo(log, "--headless", "--spawn-server", "--checkpoint", str(checkpoint), "--device", "cpu",
                       "--lr", LR_ARG, "--frames", "100000", "--out", str(out)) as demo:
        pid = _wait_for_frames(demo, log, out / "frames", count=2)
        demo.send_signal(signal.SIGHUP)
        status = _ended(demo)
    stderr = log.read_text()
    assert status == 130, stderr
    stats = read_stats(out)
    assert stats["completed"] is False and stats["error"] == "interrupted" and stats["frames"] >= 2
    video = cv2.VideoCapture(str(out / "demo.mp4"))
    assert video.isOpened() and int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == stats["frames"]
    video.release()
    assert not process_alive(pid) and not segments_of(pid)
    assert not _daemon_folder(stderr).exists()


def _sigterm_pending(pid: int) -> bool:
    """Whether SIGTERM waits, undelivered, on the (stopped) process ``pid``."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_signals_while_the_spawned_daemon_stops_cut_nothing_short(checkpoint: pathlib.Path,
                                                                  tmp_path: pathlib.Path) -> None:
    """A second and a third signal while the demo waits for its (here stalled) daemon to stop: the second kills the
    daemon at once; the third used to raise inside the clean-up too, which printed "interrupted" twice and left the
    daemon's temporary folder behind."""
    log, out = tmp_path / "demo.log", tmp_path / "out"
    pid = None
    try:
        with _running_demo(log, "--headless", "--spawn-server", "--checkpoint", str(checkpoint), "--device", "cpu",
                           "--lr", LR_ARG, "--frames", "100000", "--out", str(out)) as demo:
            pid = _wait_for_frames(demo, log, out / "frames", count=2)
            os.kill(pid, signal.SIGSTOP)  # it cannot stop: the demo waits up to 15 s, then kills it
            demo.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while not _sigterm_pending(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _sigterm_pending(pid), f"the demo did not stop its daemon:\n{log.read_text()}"
            demo.send_signal(signal.SIGINT)
            demo.send_signal(signal.SIGTERM)
            status = _ended(demo, timeout=10)
    finally:
        if pid is not None and process_alive(pid):
            os.kill(pid, signal.SIGKILL)
    stderr = log.read_text()
    assert status == 130 and "Traceback" not in stderr, stderr
    assert stderr.splitlines().count("client_demo: interrupted") == 1, stderr
    assert not process_alive(pid) and not segments_of(pid)
    assert not _daemon_folder(stderr).exists()


def test_two_demos_spawning_daemons_on_one_endpoint(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Started at the same moment, both demos find the endpoint free; the daemon that binds second exits 2. Its
    demo took the first daemon's answer for its own ("ready"), then failed with status 3 and deleted the log that
    said why: it must say so with status 4, as for any daemon that cannot start."""
    folder = short_tmpdir()
    endpoint = f"ipc://{folder}/d.sock"
    try:
        with contextlib.ExitStack() as running:
            demos = [running.enter_context(_running_demo(
                tmp_path / f"{i}.log", "--headless", "--spawn-server", "--checkpoint", str(checkpoint), "--device",
                "cpu", "--endpoint", endpoint, "--lr", LR_ARG, "--frames", "40", "--out", str(tmp_path / f"out{i}")))
                for i in range(2)]
            statuses = [_ended(demo) for demo in demos]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(2)]
    assert sorted(statuses) == [0, 4], logs
    loser = logs[statuses.index(4)]
    assert "another daemon already serves" in loser and "daemon ready" not in loser, loser


def _run_on_a_terminal(command: list[str], timeout: float = 120.0) -> tuple[int, str, str]:
    """Run ``command`` with its stderr on a pseudo-terminal 120 columns wide and stdout on a pipe; (exit status,
    stdout, everything the terminal received)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    try:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=slave)
    finally:
        os.close(slave)
    received, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal has closed it
                    break
                if not data:
                    break
                received += data
        else:
            process.kill()
            pytest.fail(f"the demo did not finish within {timeout} s:\n{received.decode(errors='replace')}")
        stdout = process.stdout.read() if process.stdout else b""
        status = process.wait(timeout=30)
    finally:
        os.close(master)
        if process.stdout:
            process.stdout.close()
    return status, stdout.decode(), received.decode(errors="replace")


def test_a_terminal_shows_the_runs_progress_and_a_log_does_not(nearest_daemon: Daemon, tmp_path: pathlib.Path) -> None:
    """A headless run printed nothing until it ended: minutes at 1280x720 on a CPU, and its first frame alone waits
    behind the daemon's warm-up of the size (auto's measuring: 18 s). On a terminal a progress bar now says so while
    its clock runs; in a log or a pipe nothing is added."""
    from client_demo.headless import FIRST_FRAME_NOTE
    from upscaler_server.engine import NearestEngine

    class SlowFirstFrame(NearestEngine):
        """The first frame waits 2.5 s, as behind a warm-up (which itself may end during the renderer's start-up)."""

        def upscale(self, lr: np.ndarray, fmt: Any, out: np.ndarray) -> Any:
            if not getattr(self, "warm", False):
                self.warm = True
                time.sleep(2.5)  # on the engine thread: the daemon answers pings meanwhile
            return super().upscale(lr, fmt, out)

    with serve_here(SlowFirstFrame(2)) as daemon:
        status, stdout, terminal = _run_on_a_terminal(demo_command(
            "--headless", "--endpoint", daemon.endpoint, "--lr", LR_ARG, "--frames", "3", "--out", str(tmp_path)))
    assert status == 0, f"{stdout}\n{terminal}"
    assert "wrote 3/3 frames" in stdout and "wrote" not in terminal, f"{stdout}\n{terminal}"
    shown = [line for line in re.split(r"[\r\n]", terminal) if line.startswith("client_demo:") and "frame" in line]
    waiting = [line for line in shown if " 0/3 " in line and FIRST_FRAME_NOTE in line]
    assert re.search(r"00:0[123]", "".join(waiting)), f"the bar's clock did not run during the wait:\n{terminal}"
    assert any(" 3/3 " in line or " 2/3 " in line or " 1/3 " in line for line in shown), terminal
    result = run_demo("--headless", "--endpoint", nearest_daemon.endpoint, "--lr", LR_ARG, "--frames", "3",
                      "--out", str(tmp_path / "piped"))
    assert result.returncode == 0, output_of(result)
    assert FIRST_FRAME_NOTE not in result.stderr and "0/3" not in result.stderr, output_of(result)

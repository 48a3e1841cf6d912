"""client_demo pieces that need neither a daemon nor OpenGL: metrics, the camera rig, views, the command line."""

from __future__ import annotations

import math
import os
import pathlib

import numpy as np
import pytest

import scenes
from client_demo.cli import parse_args
from client_demo.config import DemoConfig
from client_demo.controls import VIEWS, CameraRig, ViewState
from client_demo.frames import letterbox
from client_demo.metrics import PSNR_CAP_DB, RollingWindow, percentiles, psnr


def test_psnr_matches_its_definition() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-3, 4, a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse))
    assert psnr(a, a) == PSNR_CAP_DB
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, a[:-1])


def test_percentiles_and_rolling_window() -> None:
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    p = percentiles(range(101))
    assert (p["p50"], p["p90"], p["p99"]) == (50, 90, 99)
    window = RollingWindow(seconds=1.0)
    for i, value in enumerate([100.0, 1.0, 2.0, 3.0]):
        window.add(i * 0.4, value)  # at t=1.2 the first value (t=0) is older than a second
    assert window.count(1.2) == 3 and window.median(1.2) == 2.0
    assert window.count(10.0) == 0 and window.median(10.0) is None


def test_camera_rig_follows_the_path_until_moved() -> None:
    rig = CameraRig("arena", t=2.0)
    assert rig.pose() == scenes.camera_at("arena", 2.0)
    rig.paused = True
    rig.advance(1.0)
    assert rig.t == 2.0
    start = rig.pose()
    rig.move(forward=1, right=0, up=0, dt=0.5)
    moved = np.subtract(rig.pose().position, start.position)
    assert moved @ start.forward() > 0 and moved[1] == 0, "forward follows the heading, on the level"
    rig.move(forward=0, right=1, up=0, dt=0.5)
    right = np.subtract(rig.pose().position, start.position) - moved
    assert abs(right @ start.forward()) < 1e-9 and np.cross(start.forward(), right)[1] < 0, "right is to the right"
    rig.look(yaw=0.0, pitch=10.0)
    assert rig.pose().pitch < math.pi / 2
    rig.back_to_path()
    assert rig.pose() == scenes.camera_at("arena", 2.0)


def test_view_state_cycles_every_view() -> None:
    ui = ViewState()
    seen = []
    for _ in VIEWS:
        seen.append(ui.view)
        ui.cycle_view()
    assert sorted(seen) == sorted(VIEWS) and ui.view == VIEWS[0]
    ui.toggle_compare()
    assert ui.compare == "native"


def test_letterbox_keeps_the_aspect_ratio() -> None:
    assert letterbox(1280, 720, 1280, 720) == (0, 0, 1280, 720)
    assert letterbox(1000, 1000, 1280, 720) == (0, 219, 1000, 562)


def test_command_line() -> None:
    cfg = parse_args(["--lr", "320x180", "--scale", "2", "--view", "native", "--headless"])
    assert cfg.lr_size == (320, 180) and cfg.hr_size == (640, 360) and cfg.view == "native" and cfg.headless
    assert parse_args(["--endpoint", "tcp://192.168.1.20:5555"]).endpoint == "tcp://192.168.1.20:5555"  # a remote one
    named = parse_args(["--spawn-server", "--checkpoint", "rlfn_s_takdsr_x2"])  # a bundled name: the daemon finds it
    assert str(named.checkpoint) == "rlfn_s_takdsr_x2"
    for bad in (["--lr", "320"], ["--checkpoint", "x.safetensors"], ["--headless", "--frames", "0"],
                ["--scene", "moon"],
                ["--spawn-server", "--checkpoint", "no_such_student_x2"],
                ["--spawn-server", "--checkpoint", "/nonexistent/dir/rlfn_s_takdsr_x2.safetensors"],
                ["--headless", "--out", "demo_\udce9"],  # not UTF-8: OpenCV's writers would crash the demo
                ["--headless", "--out", __file__],  # a file, not a folder
                # inf and nan pass a `<= 0` check: the MP4 writer spun forever at inf fps, nan failed mid-run
                ["--headless", "--fps", "inf"], ["--headless", "--fps", "nan"], ["--headless", "--fps", "1e6"],
                ["--max-fps", "inf"], ["--start", "nan"],
                ["--timeout", "nan"], ["--timeout", "inf"], ["--exit-after", "0"], ["--screenshot-after", "-1"],
                # no daemon can listen there: it was reported as an unreachable daemon (status 3)
                ["--endpoint", "bogus"], ["--endpoint", "ipc://"], ["--endpoint", "/tmp/upscaler.sock"],
                # and (from a review) a tcp endpoint without a port, or with one that is no number, and an ipc path
                # longer than a Unix socket's
                ["--endpoint", "tcp://127.0.0.1"], ["--endpoint", "tcp://127.0.0.1:port"],
                ["--endpoint", "ipc:///tmp/" + "x" * 110]):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2, bad


def test_refusals_name_the_option_at_fault(capsys: pytest.CaptureFixture[str]) -> None:
    """From a walkthrough: `--out ""` wrote the frames into the current folder (pathlib reads "" as "."); --frames 0
    was "--scale and --frames must be positive"; a screenshot after the last frame was never taken, with status 0."""
    for bad, said in ((["--headless", "--out", ""], "argument --out: an empty path"),
                      (["--headless", "--frames", "0"], "--frames must be positive, got 0"),
                      (["--scale", "0"], "--scale must be positive, got 0"),
                      (["--screenshot-after", "10", "--exit-after", "5"],
                       "--screenshot-after 10 comes after --exit-after 5")):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2 and said in capsys.readouterr().err, bad
    assert parse_args(["--screenshot-after", "5", "--exit-after", "5"]).screenshot_after == 5


def test_a_screenshot_folder_that_cannot_be_written_is_refused_before_the_window(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """From a walkthrough: the window's --out was found unwritable only at the first screenshot, after the daemon had
    started and the frames had run (a file where a folder is: root, who runs the tests, may write anywhere else)."""
    from client_demo import cli
    from client_demo.config import EXIT_USAGE

    def no_window() -> int:
        raise AssertionError("the window was opened")

    monkeypatch.setattr(cli, "_window_unavailable", no_window)
    monkeypatch.setattr(cli, "_Signals", no_window)  # refused before the demo's handlers take this process's signals
    (tmp_path / "file").write_text("")
    assert cli.main(["--out", str(tmp_path / "file" / "shots"), "--exit-after", "3"]) == EXIT_USAGE
    assert f"client_demo: --out: no screenshot could be saved: cannot write into {tmp_path / 'file'}: Not a directory" \
        in capsys.readouterr().err
    monkeypatch.setattr(pathlib.Path, "cwd", staticmethod(lambda: tmp_path / "file"))  # no chdir into a file
    assert cli.main(["--screenshot-after", "2"]) == EXIT_USAGE
    assert "--screenshot-after (into the current folder, without --out): no screenshot" in capsys.readouterr().err


def test_a_daemon_killed_by_a_signal_is_said_so() -> None:
    from client_demo.spawn import how_it_ended

    assert how_it_ended(-9) == "was killed by signal 9 (SIGKILL)"  # it said "exited with status -9"
    assert how_it_ended(3) == "exited with status 3" and how_it_ended(0) == "exited with status 0"
    assert how_it_ended(-200) == "was killed by signal 200"


def test_an_option_of_the_other_mode_is_refused_not_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    """From a review: --frames or --fps in window mode, and --exit-after, --max-fps or --screenshot-after with
    --headless, did nothing and the run ended with status 0."""
    for bad, said in ((["--frames", "3"], "--frames would be ignored: it is for --headless runs"),
                      (["--fps", "10", "--frames", "3"], "--frames, --fps would be ignored: they are for --headless"),
                      (["--headless", "--exit-after", "3"], "--exit-after would be ignored: it is for the window"),
                      (["--headless", "--max-fps", "5", "--screenshot-after", "2"],
                       "--max-fps, --screenshot-after would be ignored: they are for the window")):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2 and said in capsys.readouterr().err, bad
    headless = parse_args(["--headless", "--frames", "3", "--fps", "10", "--start", "2"])
    assert (headless.frames, headless.fps, headless.start, headless.max_fps) == (3, 10.0, 2.0, DemoConfig.max_fps)
    window = parse_args(["--max-fps", "5", "--exit-after", "4", "--start", "2"])
    assert (window.max_fps, window.exit_after, window.start, window.frames) == (5.0, 4, 2.0, DemoConfig.frames)


def test_the_spawned_daemons_backend_and_what_auto_may_pick(capsys: pytest.CaptureFixture[str]) -> None:
    """The spawned daemon runs --backend auto among eager fp32 and eager bf16/fp16 unless told otherwise: fp32 eager,
    the daemon's own default on a CPU, ran the demo's network at half the speed this CPU's bf16 allows."""
    from client_demo.spawn import SpawnedDaemon

    default = parse_args(["--spawn-server"])
    assert (default.backend, default.auto_backends) == ("auto", ("eager",))
    narrowed = parse_args(["--spawn-server", "--auto-backends", "eager-fp32,onnxruntime"])
    assert narrowed.auto_backends == ("eager-fp32", "onnxruntime")
    assert parse_args(["--spawn-server", "--backend", "compile"]).backend == "compile"

    def daemon_args(**kwargs: object) -> list[str]:
        daemon = SpawnedDaemon(pathlib.Path("rlfn_s_native_x2"), "cpu", **kwargs)  # type: ignore[arg-type]
        daemon.stop()  # never started: this removes its folder
        return list(daemon.command[daemon.command.index("--device"):])

    assert daemon_args() == ["--device", "cpu", "--backend", "auto", "--auto-backends", "eager",
                             "--checkpoint", "rlfn_s_native_x2"]
    assert daemon_args(auto_backends=("eager-fp32", "onnxruntime"))[2:6] == ["--backend", "auto", "--auto-backends",
                                                                            "eager-fp32,onnxruntime"]
    assert "--auto-backends" not in daemon_args(backend="eager")
    for bad, said in ((["--backend", "eager"], "configure the daemon that --spawn-server starts"),
                      (["--auto-backends", "eager"], "configure the daemon that --spawn-server starts"),
                      (["--spawn-server", "--backend", "eager", "--auto-backends", "eager"],
                       "--auto-backends narrows --backend auto, not --backend eager"),
                      (["--spawn-server", "--auto-backends", ""], "names at least one backend"),
                      (["--spawn-server", "--auto-backends", "egaer"], "unknown egaer"),
                      # the nearest backend runs no checkpoint, and the demo always gives its daemon one
                      (["--spawn-server", "--backend", "nearest"], "invalid choice: 'nearest'")):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2 and said in capsys.readouterr().err, bad


def test_the_daemons_auto_lines_are_read_from_its_log() -> None:
    """The demo prints what its daemon's auto logged: whole messages (a compiler's error runs over several lines; only
    its first was kept), of that logger only, shortened, whatever bytes the log holds; not the resource tracker's
    warning about a killed daemon's segments, which ran on from auto's last message (a review)."""
    from client_demo.spawn import SpawnedDaemon

    daemon = SpawnedDaemon(pathlib.Path("rlfn_s_native_x2"), "cpu")
    try:
        auto = b"upscaler_server.backends.auto"
        daemon.log_path.write_bytes(
            b"2026-12-07 11:16:28,735 INFO upscaler_server: upscaler ready: pid=1\n"
            b"2026-12-07 11:16:30,001 WARNING " + auto + b": auto: compile-fp32 cannot run here, skipped: raised:\n"
            b"CppCompileError: C++ compile error\n"
            b"\n"
            b"2026-12-07 11:16:31,988 INFO " + auto + b": auto backend for 320x180 on cpu: eager-bf16 (measured)\n"
            b"2026-12-07 11:16:32,000 INFO upscaler_server.server: a line of another logger \xff\n"
            b"Traceback of another logger's message\n"
            b"2026-12-07 11:16:33,000 WARNING " + auto + b": \xff" + b"x" * 2000 + b"\n"
            b"2026-12-07 11:16:34,000 INFO " + auto + b": auto backend for 640x360 on cpu: eager-bf16\n"
            # the daemon killed: Python's resource tracker warns on stderr, after auto's last record
            b"/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: There "
            b"appear to be 2 leaked shared_memory objects to clean up at shutdown\n"
            b"  warnings.warn('resource_tracker: There appear to be %d '\n")
        lines = daemon.auto_backend_lines()
    finally:
        daemon.stop()
    assert lines[:2] == ["auto: compile-fp32 cannot run here, skipped: raised: | CppCompileError: C++ compile error",
                         "auto backend for 320x180 on cpu: eager-bf16 (measured)"]
    assert len(lines) == 4 and len(lines[2]) == 600 and lines[2].startswith("\ufffdxxx") and lines[2].endswith(" ...")
    assert lines[3] == "auto backend for 640x360 on cpu: eager-bf16"


def test_the_scale_defaults_to_the_spawned_checkpoints(tmp_path: pathlib.Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """An x3 student spawned without --scale 3 was refused: "the daemon upscales x3 but the demo was asked for x2".
    Another --scale than the spawned checkpoint's was refused only once the daemon had started (a review): now at
    once."""
    import models
    from client_demo.config import CHECKPOINT_METADATA_KEY

    assert models.checkpoint.METADATA_KEY == CHECKPOINT_METADATA_KEY  # the two spellings of one key agree
    x3 = models.save_checkpoint(models.build_model("rlfn_s", channels=8, scale=3), tmp_path / "x3.safetensors",
                                role="student")
    assert parse_args(["--spawn-server", "--checkpoint", str(x3)]).scale == 3
    assert parse_args(["--spawn-server", "--checkpoint", str(x3), "--scale", "3"]).scale == 3
    for args, said in (([str(x3), "--scale", "2"], "--scale 2, but the --spawn-server checkpoint x3.safetensors "
                                                  "upscales x3: leave --scale out, or pass --scale 3"),
                       (["--scale", "4"], "checkpoint rlfn_s_native_x2.safetensors upscales x2")):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--spawn-server", *(["--checkpoint"] if args[0] == str(x3) else []), *args])
        assert exc.value.code == 2 and said in capsys.readouterr().err, args
    assert parse_args(["--scale", "4"]).scale == 4  # another daemon's: it says, once reached
    assert parse_args(["--spawn-server", "--checkpoint", "rlfn_s_takdsr_x2"]).scale == 2  # a bundled name
    assert parse_args([]).scale == 2  # another daemon's: the default
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    assert parse_args(["--spawn-server", "--checkpoint", str(junk)]).scale == 2  # the daemon says what is wrong


def test_the_demo_finds_the_native_student_without_importing_torch() -> None:
    import models
    from client_demo.cli import _native_student
    from client_demo.config import NATIVE_STUDENT_FILE

    assert models.NATIVE_STUDENT_PATH.name == NATIVE_STUDENT_FILE  # the two names of one file agree
    assert _native_student() == models.NATIVE_STUDENT_PATH.resolve()


def test_headless_without_opengl_says_so_in_one_line(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """No EGL: exit 5 with the renderer's message, as window mode does for no display; no traceback. An earlier
    run's outputs stay as they were (they were deleted first, its stats.json left to describe nothing)."""
    from client_demo import headless
    from client_demo.config import EXIT_NO_WINDOW

    def no_gl(*args: object, **kwargs: object) -> None:
        raise scenes.HeadlessContextError("could not create a headless EGL OpenGL 3.3 context; install Mesa's EGL")

    monkeypatch.setattr(headless, "GpuFrames", no_gl)
    out = tmp_path / "out"
    (out / "frames").mkdir(parents=True)
    earlier = {"frames/00000.png": b"frame", "demo.mp4": b"video", "stats.json": b'{"completed": true}'}
    for name, content in earlier.items():
        (out / name).write_bytes(content)
    cfg = parse_args(["--headless", "--lr", "320x180", "--out", str(out)])
    with headless.OutputFolder(out) as folder:
        status = headless.run_headless(cfg, link=None, watch=lambda: None, should_stop=lambda: False, folder=folder,
                                       started=0.0)
    assert status == EXIT_NO_WINDOW
    assert "client_demo: could not create a headless EGL" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in earlier} == earlier


def test_demo_sh_names_the_size_it_starts_at(tmp_path: pathlib.Path) -> None:
    """Without a GPU, scripts/demo.sh said "starting at --lr 320x180" even when it was given another --lr. Run here
    with stand-ins for setup.sh and the venv's python, which prints the demo's arguments."""
    import shutil
    import subprocess

    (tmp_path / "scripts").mkdir()
    shutil.copy(pathlib.Path(__file__).parents[1] / "scripts" / "demo.sh", tmp_path / "scripts")
    shutil.copytree(pathlib.Path(__file__).parents[1] / "scripts" / "lib", tmp_path / "scripts" / "lib")
    (tmp_path / "scripts" / "setup.sh").write_text("")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "$@"\n')
    python.chmod(0o755)
    (tmp_path / "bin").mkdir()
    for tool in ("bash", "dirname"):
        (tmp_path / "bin" / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path)}  # no nvidia-smi, no display
    for args, size in (([], "320x180"), (["--lr", "160x90"], "160x90"), (["--lr=200x100"], "200x100")):
        run = subprocess.run([tmp_path / "bin" / "bash", tmp_path / "scripts" / "demo.sh", *args], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        assert f"starting at --lr {size}\n" in run.stderr, (args, run.stderr)
        assert "No such file" not in run.stderr, run.stderr
        assert run.stdout.count("--lr") == 1, (args, run.stdout)


def test_demo_sh_runs_headless_when_display_names_no_display(tmp_path: pathlib.Path) -> None:
    """From a walkthrough: a DISPLAY left from a dropped ssh -X session made demo.sh try a window, which failed with
    status 5, where the README promises headless output without a display. The stand-in python runs glfw's probe
    (``-c``) for real and prints the demo's arguments otherwise."""
    import shutil
    import subprocess
    import sys

    repo = pathlib.Path(__file__).parents[1]
    (tmp_path / "scripts").mkdir()
    shutil.copy(repo / "scripts" / "demo.sh", tmp_path / "scripts")
    shutil.copytree(repo / "scripts" / "lib", tmp_path / "scripts" / "lib")
    (tmp_path / "scripts" / "setup.sh").write_text("")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\necho "$@"\n')
    python.chmod(0o755)
    (tmp_path / "bin").mkdir()
    for tool in ("bash", "dirname"):
        (tmp_path / "bin" / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path), "PYTHONPATH": str(repo), "DISPLAY": ":9876"}
    run = subprocess.run([tmp_path / "bin" / "bash", tmp_path / "scripts" / "demo.sh"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "[demo] DISPLAY=:9876 WAYLAND_DISPLAY= reach no display (" in run.stderr, run.stderr
    assert "--headless --out demo_out" in run.stdout, run.stdout


def test_the_window_magnifies_small_pictures_within_the_screen() -> None:
    from client_demo.window import window_size

    assert window_size((640, 360), (1920, 1080)) == (1280, 720)  # the CPU default: the HUD covers a corner only
    assert window_size((1280, 720), (1920, 1080)) == (1280, 720)
    assert window_size((3840, 2160), (1920, 1080)) == (1920, 1080)  # larger than the screen: fitted, letterboxed
    assert window_size((2560, 1440), (1280, 720)) == (1280, 720)
    assert window_size((2, 800), (1280, 720)) == (320, 720)  # thin pictures: room for the HUD
    assert window_size((4000, 2), (1280, 720)) == (1280, 320)
    assert window_size((192, 108), (1280, 800)) == (1152, 648)  # x7 would not fit the screen
    assert window_size((640, 360), None) == (1280, 720)


def test_the_spawned_daemon_imports_this_installation(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m upscaler_server` put the current folder first on the import path: the demo run from a research
    folder with its own `models/` package spawned a daemon that imported it and failed (exit 4)."""
    from client_demo.spawn import SpawnedDaemon
    from upscaler_server.client import UpscalerClient

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('the user\\'s own models package')\n")
    monkeypatch.chdir(tmp_path)
    with SpawnedDaemon(pathlib.Path("rlfn_s_native_x2"), "cpu") as daemon:
        daemon.start()
        client = UpscalerClient(daemon.endpoint, timeout=30)
        with client:
            assert client.upscale(np.zeros((24, 32, 3), np.uint8)).shape == (48, 64, 3)


def test_folders_of_demos_that_died_are_removed_by_the_next_one() -> None:
    """A demo ended by Xlib (X connection lost: exit(1) inside glfw) or SIGKILL left /tmp/takdsr-demo-* behind."""
    import shutil
    import subprocess
    import sys

    from client_demo.spawn import SpawnedDaemon

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = pathlib.Path(f"/tmp/takdsr-demo-{int(gone.stdout)}-left")
    alive = pathlib.Path(f"/tmp/takdsr-demo-{os.getpid()}-mine")
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "daemon.log").write_text("a log\n")
    try:
        daemon = SpawnedDaemon(pathlib.Path("rlfn_s_native_x2"), "cpu")
        daemon.stop()
        assert not dead.exists() and alive.exists()
    finally:
        shutil.rmtree(dead, ignore_errors=True)
        shutil.rmtree(alive, ignore_errors=True)


def test_a_spawned_daemon_is_killed_once_the_demo_is_told_to_stop_at_once() -> None:
    """From a review: a second signal that came before the demo began to stop its daemon (during the run or the
    link's close) was spent there, and the daemon, stalled, was then waited for the whole 15 s; a third signal was
    only counted. The wait now looks at the demo's signal count as it goes."""
    import subprocess
    import sys
    import threading
    import time

    from client_demo.spawn import STOP_TIMEOUT, SpawnedDaemon

    at_once: list[bool] = []
    ignores_sigterm = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); " \
                      "time.sleep(60)"
    for told_before in (True, False):
        at_once.clear()
        daemon = SpawnedDaemon(hurry=lambda: bool(at_once))
        proc = subprocess.Popen([sys.executable, "-c", ignores_sigterm], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"1\n"  # SIGTERM is ignored from here on
        daemon._proc = proc
        if told_before:
            at_once.append(True)
        else:
            threading.Timer(0.3, at_once.append, (True,)).start()
        start = time.monotonic()
        daemon.stop()
        assert time.monotonic() - start < STOP_TIMEOUT / 3, told_before
        assert proc.poll() is not None
        proc.stdout.close()

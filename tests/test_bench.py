"""`python -m upscaler_server.bench` runs end to end on tiny frames and writes a JSON that says what it measured."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pytest

from upscaler_server import bench, engine
from upscaler_server.shm import pid_alive

from server_utils import REPO


def test_bench_measures_transport_and_both_end_to_end_modes(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "upscaler_server.bench", "--sizes", "64x48", "--repeats", "3", "--frames", "3",
               "--budget", "5", "--device", "cpu", "--threads", "1", "--backend", "compile", "--precision", "bf16",
               "--map-slots", "--json", str(out)]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    (transport,) = result["transport"]
    assert transport["lr"] == "64x48"
    assert all(transport[k] > 0 for k in ("memcpy_ms", "nearest_ms", "shm_ms", "shm_zero_copy_ms",
                                          "shm_zero_copy_mapped_ms", "inline_ms"))
    e2e = result["end_to_end"]
    assert e2e["device"] == "cpu" and e2e["overlap"] is False and e2e["map_slots"] is True
    assert e2e["backend"] == "compile" and e2e["precision"] == "bf16"  # the daemon ran what was asked for
    (row,) = e2e["rows"]
    assert row["hr"] == "128x96" and row["frames"] >= 3
    assert row["fps"] > 0 and row["fps_2_in_flight"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
    assert "fps x2" in run.stdout and "mapped slots" in run.stdout  # the two-in-flight column, the slot mode
    machine = result["machine"]  # what a reader needs to reproduce the numbers (--threads was recorded nowhere)
    assert machine["settings"] == {"threads": 1, "repeats": 3, "frames": 3, "budget_s": 5.0, "device": "cpu",
                                   "edge_pad": 4}
    assert {"numpy", "pyzmq", "opencv"} <= set(machine["versions"]) and machine["cpu"]
    assert len(machine["load_before"]) == 3 and len(machine["load_after"]) == 3


def test_bench_measures_a_student_of_another_scale_at_its_own(tmp_path: pathlib.Path) -> None:
    """An x3 student was refused with '--scale 2: ... upscales x3', naming an option the benchmark does not have."""
    import models

    x3 = models.save_checkpoint(models.build_model("rlfn_s", channels=8, scale=3), tmp_path / "x3.safetensors",
                                role="student")  # fmt: skip
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "upscaler_server.bench", "--checkpoint", str(x3), "--sizes", "32x32",
               "--repeats", "1", "--frames", "3", "--budget", "5", "--device", "cpu", "--threads", "1",
               "--json", str(out)]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    e2e = json.loads(out.read_text())["end_to_end"]
    assert e2e["scale"] == 3 and [row["hr"] for row in e2e["rows"]] == ["96x96"]


def test_the_end_to_end_daemon_gets_the_cache_folder(tmp_path: pathlib.Path) -> None:
    """--cache-dir reached the --backends daemons only: the end-to-end daemon exported into the default cache."""
    pytest.importorskip("onnxruntime")
    import models

    student = models.save_checkpoint(models.build_model("rlfn_s", channels=8), tmp_path / "s.safetensors",
                                     role="student")  # fmt: skip
    command = [sys.executable, "-m", "upscaler_server.bench", "--checkpoint", str(student), "--sizes", "32x32",
               "--repeats", "1", "--frames", "3", "--budget", "5", "--device", "cpu", "--threads", "1",
               "--backend", "onnxruntime", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TAKDSR_CACHE_DIR": str(tmp_path / "default-cache")})
    assert run.returncode == 0, run.stdout + run.stderr
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx")) and not (tmp_path / "default-cache").exists()


def test_bench_refuses_an_abbreviated_option() -> None:
    """`--backend` (the end-to-end daemon's) and `--backends` (the comparison) must not be mistaken for each other."""
    command = [sys.executable, "-m", "upscaler_server.bench", "--backe", "eager", "--skip-e2e"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "unrecognized arguments: --backe" in run.stderr


def test_bench_backends_table_has_stage_times_speedups_and_end_to_end(tmp_path: pathlib.Path) -> None:
    """`--backends` on the CPU: fp32 eager as the reference, every row's compute and copies within its total, and
    the end-to-end column from a daemon run with that row's settings."""
    out = tmp_path / "backends.json"
    command = [sys.executable, "-m", "upscaler_server.bench", "--backends", "eager,eager-fp32-pad8", "--sizes",
               "64x48", "--frames", "4", "--budget", "5", "--device", "cpu", "--threads", "1", "--json", str(out)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["eager-fp32", "eager-fp32-pad8"]  # "eager" is the reference, once
    reference, padded = rows
    assert reference["speedup"] == 1.0 and reference["max_diff"] == 0 and reference["psnr"] is None
    assert padded["max_diff"] <= 1  # zero-padded channels compute the same function (float sums reordered)
    for r in rows:
        assert r["lr"] == "64x48" and r["frames"] >= 4 and r["model_p99_ms"] >= r["model_ms"] > 0
        assert r["compute_ms"] > 0 and r["copies_ms"] >= 0
        # each frame's parts lie inside its timed call, so their medians add up to no more than a slow frame
        assert r["compute_ms"] + r["copies_ms"] <= r["model_p99_ms"] * 1.1
        assert r["e2e_ms"] > 0 and r["fps"] == pytest.approx(1e3 / r["e2e_ms"]) and r["e2e_frames"] >= 3
    assert "| of which compute | of which copies |" in run.stdout
    # each row as it is measured, in words (a dict's repr was printed)
    assert re.search(r"^measured eager-fp32-pad8 at LR 64x48: [\d.]+ ms median, [\d.]+ ms p99 over \d+ frames; "
                     r"against fp32 eager: max diff [01] levels, ", run.stderr, re.M), run.stderr


def test_bench_json_on_stdout_puts_the_tables_on_stderr() -> None:
    """From a walkthrough: `bench --json /dev/stdout | jq .` failed, the table and the JSON mixed on stdout."""
    command = [sys.executable, "-m", "upscaler_server.bench", "--sizes", "64x48", "--repeats", "1", "--skip-e2e",
               "--json", "/dev/stdout"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["transport"][0]["lr"] == "64x48"  # the JSON alone
    assert "Transport: nearest-neighbour x2 backend" in run.stderr


@pytest.mark.parametrize(("labels", "message"), [("eager,eager-graphs", "eager-graphs: -graphs needs CUDA"),
                                                 ("eager,eager-fp16", "eager-fp16 cannot run here: fp16 needs CUDA")])
def test_bench_backends_refuses_what_cannot_run_here_before_measuring(tmp_path: pathlib.Path, labels: str,
                                                                      message: str) -> None:
    command = [sys.executable, "-m", "upscaler_server.bench", "--backends", labels, "--device", "cpu",
               "--skip-e2e", "--sizes", "64x48", "--json", str(tmp_path / "b.json")]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert "measured" not in run.stderr and not (tmp_path / "b.json").exists()


def test_bench_refuses_cuda_only_daemon_options_on_the_cpu() -> None:
    """The daemon would drop --cuda-graphs and --overlap on a CPU while the table still named them. (Refused before
    anything is measured; with --skip-e2e they are refused as options of the part it leaves out.)"""
    for option in ("--cuda-graphs", "--overlap"):
        command = [sys.executable, "-m", "upscaler_server.bench", option, "--device", "cpu", "--sizes", "64x48"]
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "need CUDA" in run.stderr, run.stderr


@pytest.mark.parametrize(("options", "status", "message"), [
    (["--frames", "0"], 2, "--frames 0: use at least 3"),
    (["--backends", "eager", "--frames", "2"], 2, "--frames 2: use at least 3"),
    (["--repeats", "0"], 2, "--repeats 0: use at least 1"),  # a table of nan and a JSON with NaN tokens
    (["--budget", "nan"], 2, "--budget nan: use a positive number of seconds"),  # a JSON traceback at the end
    (["--budget", "-1"], 2, "--budget -1.0: use a positive number of seconds"),
    (["--threads", "-1"], 2, "--threads -1: needs 0 <= threads <= 1024"),
    (["--sizes", "0x0"], 2, "--sizes 0x0: width and height must be at least 1"),
    (["--sizes", "8x8"], 2, "--sizes 8x8 is below the model's minimum input size 15x15"),
    (["--e2e-sizes", "64x48,8x20"], 2, "--e2e-sizes 8x20 is below the model's minimum input size 15x15"),
    (["--backends", "eager", "--sizes", "8x8", "--skip-e2e"], 2, "--sizes 8x8 is below the model's minimum"),
    (["--json", "{tmp}/absent/b.json"], 2, "the folder {tmp}/absent does not exist"),
    (["--json", "{tmp}"], 2, "--json {tmp} is a folder"),
    (["--json", "{tmp}/evil.pt/b.json"], 2, "--json {tmp}/evil.pt/b.json: {tmp}/evil.pt is not a folder"),
    (["--checkpoint", "{tmp}/evil.pt"], 3, "cannot load checkpoint {tmp}/evil.pt"),
    # it said "or --model NAME", an option the benchmark does not have
    (["--checkpoint", "{tmp}/absent.safetensors"], 3, "not found; pass --checkpoint PATH or a bundled name, or leave "
     "--checkpoint out to measure the default student\n"),
    (["--backends", "eager", "--checkpoint", "rlfn_teacher_takdsr_x2"], 3, "is a Teacher, not an LR -> HR decoder"),
    # the end-to-end daemon's refusals came only when it started, after the transport part had been measured
    (["--backend", "tensorrt"], 2, "--backend tensorrt --precision auto on cpu: "),
    (["--precision", "fp16"], 2, "fp16 needs CUDA"),
    (["--e2e-sizes", "4000x36"], 2, "--e2e-sizes 4000x36: the daemon takes frames up to 3840x2160"),
    # measured (minutes at real sizes), then left out of the backend table without a word
    (["--backends", "eager", "--sizes", "32x32", "--e2e-sizes", "48x48,32x32"], 2, "--e2e-sizes 48x48: not in --sizes"),
    # the ONNX export found it out after fp32 eager had been measured (exit 1)
    (["--backends", "onnxruntime", "--cache-dir", "{tmp}/evil.pt/sub"], 2,
     "--cache-dir {tmp}/evil.pt/sub: {tmp}/evil.pt is not a folder"),
    # a cache no measured backend keeps files in was accepted and left empty
    (["--backends", "eager,compile-bf16", "--cache-dir", "{tmp}/cache"], 2,
     "--cache-dir would be ignored: none of eager, compile-bf16 keeps files there"),
    (["--backend", "compile", "--cache-dir", "{tmp}/cache"], 2,
     "--cache-dir would be ignored: the end-to-end daemon's --backend compile keeps no files"),
    # the other parts' options, dropped in silence by --backends (--cuda-graphs alone is refused on a CPU)
    *[(["--backends", "eager", *option], 2, f"these options would be ignored with --backends: {option[0]} ({hint}")
      for option, hint in ((["--backend", "compile"], "name the backends in --backends"),
                           (["--precision", "bf16"], "add it to each label"), (["--cuda-graphs"], "add -graphs"),
                           (["--overlap"], "the table times one frame"), (["--map-slots"], "the table's daemons"),
                           (["--repeats", "1"], "the table times --frames frames"))],
    # and the end-to-end part's, dropped in silence by a transport-only run (an operator's review)
    (["--skip-e2e", "--frames", "5", "--map-slots", "--checkpoint", "rlfn_s_native_x2"], 2,
     "these options would be ignored with --skip-e2e (they set up the end-to-end part): --checkpoint, --map-slots, "
     "--frames; leave them out"),
])  # fmt: skip
def test_bench_refuses_bad_options_in_one_line_before_measuring(options: list[str], status: int, message: str,
                                                                tmp_path: pathlib.Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 (bad arguments) or 3 (a checkpoint that is no loadable student, as the daemon) in one line, before
    any daemon starts: these used to fail with a traceback, often after the transport part had run."""
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(print))
    monkeypatch.setattr(bench, "spawn_daemon", _must_not_measure)
    monkeypatch.setattr(engine, "create_engine", _must_not_measure)  # the --backends model-only part
    argv = ["--device", "cpu", "--sizes", "64x48", *(o.format(tmp=tmp_path) for o in options)]
    assert bench.main(argv) == status
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


@pytest.mark.parametrize(("option", "value"), [("--sizes", ","), ("--sizes", ""), ("--e2e-sizes", ","),
                                               ("--backends", ","), ("--backends", "")])
def test_bench_refuses_an_empty_list(option: str, value: str, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`--sizes ,` started daemons to print empty tables; `--backends ""` counted as no --backends and ran the
    default benchmark (minutes)."""
    monkeypatch.setattr(bench, "spawn_daemon", _must_not_measure)
    monkeypatch.setattr(engine, "create_engine", _must_not_measure)
    with pytest.raises(SystemExit) as exited:
        bench.main(["--device", "cpu", f"{option}={value}"])
    what = "backend" if option == "--backends" else "size"
    assert exited.value.code == 2 and f"argument {option}: {value!r} names no {what}" in capsys.readouterr().err


def test_bench_says_what_a_size_is(capsys: pytest.CaptureFixture[str]) -> None:
    """It said "invalid _sizes value: 'abc'", naming a function of the benchmark."""
    with pytest.raises(SystemExit) as exited:
        bench.main(["--sizes", "abc"])
    assert exited.value.code == 2 and "argument --sizes: 'abc' is not WIDTHxHEIGHT, e.g. 640x360" in \
        capsys.readouterr().err


def test_bench_skip_e2e_prints_no_end_to_end_table(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """It printed the end-to-end header, with "skipped" as the weights, above an empty table."""
    row = dict.fromkeys(("bytes_in", "bytes_out", "memcpy_ms", "nearest_ms", "shm_ms", "shm_zero_copy_ms",
                         "shm_zero_copy_mapped_ms", "inline_ms", "shm_over_memcpy", "inline_over_memcpy",
                         "inline_over_shm"), 1.0)
    monkeypatch.setattr(bench, "transport", lambda sizes, repeats: [{**row, "lr": "64x48", "hr": "128x96"}])
    assert bench.main(["--device", "cpu", "--sizes", "64x48", "--skip-e2e"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Transport:") and "64x48" in out and "End to end" not in out, out


def _must_not_measure(*args: object, **kwargs: object) -> None:
    raise AssertionError("measuring started before the options were checked")


def test_bench_says_in_one_line_that_a_daemon_did_not_start(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    def transport(sizes: object, repeats: int) -> None:
        with bench.spawn_daemon(["--backend", "nearest", "--pad-channels", "-1"]):
            raise AssertionError("the daemon started")

    monkeypatch.setattr(bench, "transport", transport)
    assert bench.main(["--device", "cpu", "--sizes", "64x48", "--skip-e2e"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bench: a daemon did not start (exited with status 2): ") and "pad_channels" in err
    assert err.count("\n") == 1, err


def test_a_daemon_starts_from_a_folder_with_its_own_models_package(tmp_path: pathlib.Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m upscaler_server` put the current folder first on the import path: a research folder with its own
    `models/` package (common) made the spawned daemon import it and fail (AttributeError, exit 1)."""
    from upscaler_server.client import UpscalerClient

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('the user\'s own models package')\n")
    monkeypatch.chdir(tmp_path)
    with bench.spawn_daemon(["--device", "cpu", "--threads", "1"]) as endpoint, \
            UpscalerClient(endpoint, timeout=30) as client:
        frame = np.zeros((24, 32, 3), np.uint8)
        assert client.upscale(frame).shape == (48, 64, 3)  # the bundled student, from this installation


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_benchmark_leaves_no_daemon_running(sig: signal.Signals) -> None:
    """SIGTERM (`timeout`, `kill`, a cancelled CI job) left both transport daemons running for good, and their
    folders. Now SIGTERM is cleaned up as Ctrl-C is, and the daemons die with the benchmark even on SIGKILL."""
    bench_run = subprocess.Popen([sys.executable, "-m", "upscaler_server.bench", "--device", "cpu", "--sizes", "64x48",
                                  "--repeats", "100000", "--skip-e2e"], cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    children = pathlib.Path(f"/proc/{bench_run.pid}/task/{bench_run.pid}/children")
    daemons: list[int] = []
    deadline = time.monotonic() + 120
    while len(daemons) < 2 and time.monotonic() < deadline and bench_run.poll() is None:
        daemons = [int(pid) for pid in children.read_text().split()] if children.exists() else []
        time.sleep(0.2)
    assert len(daemons) == 2, "the benchmark did not start its two transport daemons"
    time.sleep(3)  # both ready, measuring
    folders = [_endpoint_folder(pid) for pid in daemons]
    try:
        bench_run.send_signal(sig)
        _, stderr = bench_run.communicate(timeout=60)
        if sig == signal.SIGTERM:
            assert bench_run.returncode == 130 and stderr.strip().endswith("interrupted"), stderr
        deadline = time.monotonic() + 30
        while any(map(pid_alive, daemons)) and time.monotonic() < deadline:  # a zombie (init may never reap it) is not
            time.sleep(0.2)
        assert not any(map(pid_alive, daemons)), "a daemon outlived the benchmark"
        if sig == signal.SIGTERM:
            assert not any(map(os.path.exists, folders)), "the benchmark left a daemon's folder"
        else:  # nothing of the benchmark ran to remove them: the next benchmark does
            assert all(map(os.path.exists, folders))
            assert set(folders) <= set(bench.remove_stale_folders())
            assert not any(map(os.path.exists, folders))
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def test_the_next_benchmark_removes_the_folders_of_a_killed_one_and_only_those(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A SIGKILLed benchmark left /tmp/ups-bench-* folders (daemon logs) for good. Its folders name its pid; a
    later benchmark removes those whose benchmark has ended, and nothing else."""
    monkeypatch.setattr(bench, "BENCH_TMP", tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = tmp_path / f"ups-bench-{dead.pid}-abc123"
    (killed / "sub").mkdir(parents=True)
    (killed / "daemon.log").write_text("log")
    running = bench.bench_folder()  # this process's: still running
    other_name = tmp_path / "ups-bench-notapid"
    other_name.mkdir()
    link = tmp_path / f"ups-bench-{dead.pid}-link"
    link.symlink_to(other_name)
    assert running.parent == tmp_path and running.name.startswith(f"ups-bench-{os.getpid()}-")
    assert bench.remove_stale_folders() == [killed]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([running.name, other_name.name, link.name])
    (tmp_path / f"ups-bench-{dead.pid}-def456").mkdir()
    assert bench.main(["--device", "cpu", "--sizes", "0x0"]) == 2  # refused options: nothing removed
    assert (tmp_path / f"ups-bench-{dead.pid}-def456").exists()
    monkeypatch.setattr(bench, "_transport_and_end_to_end", lambda args: {})
    monkeypatch.setattr(bench, "_print_tables", lambda result: None)
    assert bench.main(["--device", "cpu", "--sizes", "64x48", "--skip-e2e"]) == 0
    assert not (tmp_path / f"ups-bench-{dead.pid}-def456").exists()
    err = capsys.readouterr().err
    assert f"bench: removed {tmp_path / f'ups-bench-{dead.pid}-def456'}, left by a benchmark that was killed" in err


def _endpoint_folder(pid: int) -> pathlib.Path:
    """The private folder of the daemon ``pid``: where its --endpoint ipc socket lies."""
    argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    endpoint = argv[argv.index("--endpoint") + 1]
    assert endpoint.startswith("ipc:///tmp/ups-bench-"), endpoint
    return pathlib.Path(endpoint.removeprefix("ipc://")).parent


def test_bench_ctrl_c_stops_the_daemons_and_says_interrupted(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    daemon_folders: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def recorded_mkdtemp(*args: Any, **kwargs: Any) -> str:
        daemon_folders.append(mkdtemp(*args, **kwargs))
        return daemon_folders[-1]

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.tempfile, "mkdtemp", recorded_mkdtemp)
    monkeypatch.setattr(bench, "_transport_row", interrupted)  # both transport daemons are running
    argv = ["--device", "cpu", "--sizes", "64x48", "--skip-e2e", "--json", str(tmp_path / "b.json")]
    try:
        status = bench.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main (a traceback)")
    assert status == 130 and capsys.readouterr().err == "interrupted\n"
    assert len(daemon_folders) == 2 and not any(map(os.path.exists, daemon_folders))  # removed once stopped
    assert list(tmp_path.iterdir()) == []

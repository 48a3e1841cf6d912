"""`python -m upscaler_server.bench` runs end to end on tiny frames and writes a JSON that says what it measured."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

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
        assert r["e2e_ms"] > 0 and r["fps"] == pytest.approx(1e3 / r["e2e_ms"])
    assert "| of which compute | of which copies |" in run.stdout


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
    """The daemon would drop --cuda-graphs and --overlap on a CPU while the table still named them."""
    for option in ("--cuda-graphs", "--overlap"):
        command = [sys.executable, "-m", "upscaler_server.bench", option, "--device", "cpu", "--skip-e2e"]
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "need CUDA" in run.stderr, run.stderr

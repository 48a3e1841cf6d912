"""`python -m upscaler_server.bench` runs end to end on tiny frames and writes a JSON that says what it measured."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from server_utils import REPO


def test_bench_measures_transport_and_both_end_to_end_modes(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "upscaler_server.bench", "--sizes", "64x48", "--repeats", "3", "--frames", "3",
               "--budget", "5", "--device", "cpu", "--threads", "1", "--backend", "compile", "--precision", "bf16",
               "--json", str(out)]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    (transport,) = result["transport"]
    assert transport["lr"] == "64x48"
    assert all(transport[k] > 0 for k in ("memcpy_ms", "nearest_ms", "shm_ms", "shm_zero_copy_ms", "inline_ms"))
    e2e = result["end_to_end"]
    assert e2e["device"] == "cpu" and e2e["overlap"] is False
    assert e2e["backend"] == "compile" and e2e["precision"] == "bf16"  # the daemon ran what was asked for
    (row,) = e2e["rows"]
    assert row["hr"] == "128x96" and row["frames"] >= 3
    assert row["fps"] > 0 and row["fps_2_in_flight"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
    assert "fps x2" in run.stdout  # the printed table has the two-in-flight column


def test_bench_refuses_an_abbreviated_option() -> None:
    """`--backend` (the end-to-end daemon's) and `--backends` (the comparison) must not be mistaken for each other."""
    command = [sys.executable, "-m", "upscaler_server.bench", "--backe", "eager", "--skip-e2e"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "unrecognized arguments: --backe" in run.stderr

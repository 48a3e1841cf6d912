"""scripts/memory_per_size.py runs, reads memory at the points asked and counts the distinct sizes it sent."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from server_utils import REPO


def _run_eager(frames: int, out: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """The script on the eager backend alone, 2 readings after the start, results into `out`; it must succeed."""
    run = subprocess.run([sys.executable, "scripts/memory_per_size.py", "--backends", "eager", "--frames", str(frames),
                          "--points", "2", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run


def test_memory_per_size_reports_each_run(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "memory.json"
    run = _run_eager(8, out)
    results = json.loads(out.read_text())
    assert set(results) == {"eager/fixed", "eager/random", "eager/random-closed"}
    assert results["eager/fixed"]["sizes"] == 4 and 1 < results["eager/random"]["sizes"] <= 8
    for result in results.values():
        assert [index for index, _ in result["trace"]] == [0, 4, 8]
        assert all(100 < mb < 10_000 for _, mb in result["trace"])  # a torch process: hundreds of MB
        assert 100 < result["trimmed"] < 10_000  # glibc here: the reading after malloc_trim is there
    assert "| eager | random |" in run.stdout


def test_the_header_names_the_frames_read_at(tmp_path: pathlib.Path) -> None:
    """A reading every frames // points frames: with 5 frames and 2 points the last comes after frame 4, not 5."""
    out = tmp_path / "memory.json"
    run = _run_eager(5, out)
    assert "| RSS MB after 0, 2 ... 4 frames |" in run.stdout.splitlines()[0]
    assert [index for index, _ in json.loads(out.read_text())["eager/fixed"]["trace"]] == [0, 2, 4]

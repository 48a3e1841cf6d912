"""scripts/resize_stall.py runs both daemons and reports the victim's round trips of both phases."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from server_utils import REPO


def test_resize_stall_reports_both_daemons(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "stall.json"
    run = subprocess.run([sys.executable, "scripts/resize_stall.py", "--size", "64x48", "--frames", "3",
                          "--grow-mb", "8", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert (result["size"], result["frames"], result["grow_mb"]) == ("64x48", 3, 8)
    assert [row["mode"] for row in result["rows"]] == ["default", "map-slots"]
    for row in result["rows"]:
        assert row["alone_max_ms"] >= row["alone_p50_ms"] > 0 and row["resizing_max_ms"] >= row["resizing_p50_ms"] > 0
    assert "resizing p50" in run.stdout

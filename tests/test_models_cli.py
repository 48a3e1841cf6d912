"""`python -m models info`: registered names and checkpoint files, and a clear error otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models import build_model, count_macs, save_checkpoint, weights_sha256

REPO = Path(__file__).resolve().parents[1]


def _info(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "models", "info", *args], cwd=REPO, capture_output=True, text=True)


def test_info_on_a_registered_name_prints_params_and_macs() -> None:
    result = _info("rlfn", "--input", "64x48")
    assert result.returncode == 0, result.stderr
    assert "526,856" in result.stdout
    macs = count_macs(build_model("rlfn"), 48, 64)
    assert f"{macs / 1e9:.3f} G at 64x48" in result.stdout


def test_info_on_a_checkpoint_prints_its_metadata(tmp_path: Path) -> None:
    path = save_checkpoint(build_model("pan_s", channels=8, up_channels=8), tmp_path / "p.safetensors",
                           role="student", training={"steps": 42})
    result = _info(str(path), "--input", "32x32")
    assert result.returncode == 0, result.stderr
    assert '"steps": 42' in result.stdout and '"role": "student"' in result.stdout
    # the hash results.json and `evaluate --json` record, so scores can be matched to a file without Python
    assert f"weights      sha256 {weights_sha256(path)} " in result.stdout
    assert "sha256" not in _info("pan_s", "--input", "32x32").stdout  # a registered name has no file


def test_info_on_a_bad_target_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"nope")
    for target in ("not_a_model", str(broken)):
        result = _info(target)
        assert result.returncode == 2 and "error:" in result.stderr and target in result.stderr


def test_info_on_a_size_the_model_cannot_read_is_a_clear_error() -> None:
    small = _info("rlfn_s", "--input", "10x10")
    assert small.returncode == 2 and "smaller than the smallest input 15x15" in small.stderr
    odd = _info("pan_teacher", "--input", "1921x1080")
    assert odd.returncode == 2 and "must be a multiple of its scale 2" in odd.stderr
    assert "Traceback" not in small.stderr + odd.stderr
    huge = _info("rlfn_s", "--input", "1000000000x1000000000")  # was a "Storage size calculation overflowed" traceback
    assert huge.returncode == 2 and "at most 1048576 px a side" in huge.stderr and "Traceback" not in huge.stderr
    largest = _info("rlfn_s", "--input", "1048576x15")
    assert largest.returncode == 0, largest.stderr


def test_info_into_a_closed_pipe_ends_without_a_traceback() -> None:
    """`python -m models info ... | head`: the reader is gone before the metadata is printed."""
    reader, writer = os.pipe()
    os.close(reader)  # closed before the child writes: its print meets EPIPE
    try:
        result = subprocess.run([sys.executable, "-m", "models", "info", "rlfn_s_takdsr_x2"], cwd=REPO,
                                stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    finally:
        os.close(writer)
    assert result.returncode == 141 and result.stderr == "", result.stderr


def test_a_name_that_is_nothing_lists_the_bundled_checkpoints_too() -> None:
    """`rlfn_s_takdsr` (no _x2) listed the registered models alone: nothing told the user the bundled names."""
    result = _info("rlfn_s_takdsr")
    assert result.returncode == 2, result.stderr
    assert "bundled checkpoints: " in result.stderr and "rlfn_s_takdsr_x2" in result.stderr
    assert "models (random weights): " in result.stderr and "rlfn_s," in result.stderr
    assert "rlfn_s_takdsr_x2" in _info("--help").stdout


def test_an_empty_name_is_not_called_the_current_folder() -> None:
    result = _info("")
    assert result.returncode == 2 and "no checkpoint or model named" in result.stderr, result.stderr
    assert "'.'" not in result.stderr


def test_an_answer_that_cannot_be_written_is_an_error_not_a_traceback() -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "models", "info", "rlfn_s"], cwd=REPO, stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == "error: cannot write the answer: No space left on device\n"


def test_info_on_a_checkpoint_whose_name_is_not_utf8_on_a_strict_console(tmp_path: Path) -> None:
    """A Latin-1 folder name (held by Python as surrogates): the checkpoint was "not a readable safetensors file", and
    printing its name crashed under a strict UTF-8 locale. Both are fine now: the name is printed escaped."""
    folder = tmp_path / os.fsdecode(b"r\xe9un")
    path = save_checkpoint(build_model("rlfn_s", channels=8), folder / "s.safetensors", role="student")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    result = subprocess.run([sys.executable, "-m", "models", "info", str(path), "--input", "64x48"], cwd=REPO,
                            capture_output=True, env=env)
    stdout, stderr = (stream.decode("utf-8") for stream in (result.stdout, result.stderr))  # ASCII escapes: valid
    assert result.returncode == 0, stderr
    assert f"model        {tmp_path}/r\\udce9un/s.safetensors" in stdout and f"sha256 {weights_sha256(path)}" in stdout

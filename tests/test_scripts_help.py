"""Every script in scripts/ answers -h/--help with what it does and its usage, and does nothing else: before,
`bash scripts/setup.sh --help` set the machine up, `scripts/ablations_cpu.sh --help` took "--help" for its run folder
and `scripts/gpu_checks.sh --help` called it an unknown part. Each shell script runs from a copy of scripts/ in an
empty folder, so anything it started to do (a venv, a run folder, an install) would show up there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHELL_SCRIPTS = sorted(path.name for path in (REPO / "scripts").glob("*.sh"))
PYTHON_SCRIPTS = sorted(path.name for path in (REPO / "scripts").glob("*.py"))


def header_comment(script: Path) -> str:
    """The comment block from line 2 up to the first line that is not a comment, without its '# ' marks."""
    lines = []
    for line in script.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines) + "\n"


def files_under(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*")}


@pytest.fixture
def scripts_copy(tmp_path: Path) -> Path:
    """A copy of scripts/ inside an otherwise empty folder (no .venv, no pyproject.toml, no training data)."""
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    return tmp_path


def run_script(folder: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(folder / "scripts" / script), *args], cwd=folder, capture_output=True,
                          text=True, timeout=60)


def test_every_script_is_covered() -> None:
    assert {"setup.sh", "demo.sh", "gpu_checks.sh", "ablations_cpu.sh", "backbones_cpu.sh", "train_parallel.sh",
            "matched_students.sh"} <= set(SHELL_SCRIPTS)
    assert "scores_table.py" in PYTHON_SCRIPTS


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_help_prints_its_header_and_does_nothing(scripts_copy: Path, script: str, flag: str) -> None:
    before = files_under(scripts_copy)
    result = run_script(scripts_copy, script, flag)
    header = header_comment(REPO / "scripts" / script)
    assert header.count("\n") >= 3, f"{script} has no header comment to show"
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    if script == "demo.sh":  # then the demo's own options, which need the venv this empty folder lacks
        assert result.stdout.startswith(header + "\nThe demo's options"), result.stdout  # no comment of the script's
        assert "run bash scripts/setup.sh, then .venv/bin/python -m client_demo --help" in result.stdout
    else:
        assert result.stdout == header
    assert files_under(scripts_copy) == before


def test_demo_help_lists_the_demo_options_once_set_up() -> None:
    """In a set-up checkout --help goes on with the options that pass through to the demo (without setting up)."""
    if not (REPO / ".venv" / "bin" / "python").exists():  # a checkout tested with another interpreter
        pytest.skip("no .venv in this checkout, so nothing to pass through to: run `bash scripts/setup.sh --dev`")
    result = run_script(REPO, "demo.sh", "--help")
    assert result.returncode == 0, result.stderr
    assert "The demo's options (python -m client_demo --help):\nusage: python -m client_demo" in result.stdout
    assert "--spawn-server" in result.stdout and "[setup]" not in result.stderr


@pytest.mark.parametrize(("script", "args", "message"), [
    ("setup.sh", ["--devv"], "setup: unknown argument(s) '--devv' (nothing, --dev, or --help)"),
    ("setup.sh", ["--dev", "extra"], "setup: unknown argument(s) '--dev extra'"),
    ("ablations_cpu.sh", ["--run-root"], "ablations_cpu: usage: [CONFIG=FILE] scripts/ablations_cpu.sh [RUN_ROOT]"),
    ("ablations_cpu.sh", ["runs/a", "runs/b"], "ablations_cpu: usage:"),
    ("gpu_checks.sh", ["--tests"], "gpu_checks: unknown part --tests (parts: tests latency e2e backends students"),
    # the whole --help came for two arguments, and STEPS abc seeded the run, then failed in three trainers
    ("matched_students.sh", ["runs/a", "out"], "matched_students: usage: [CONFIG=...] scripts/matched_students.sh "
                                               "RUN_DIR OUT_DIR STEPS"),
    ("matched_students.sh", ["runs/a", "out", "abc"], "matched_students: STEPS must be a whole number >= 1, got 'abc'"),
])
def test_shell_script_refuses_arguments_it_does_not_take(scripts_copy: Path, script: str, args: list[str],
                                                         message: str) -> None:
    before = files_under(scripts_copy)
    result = run_script(scripts_copy, script, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert files_under(scripts_copy) == before


def test_gpu_checks_tells_an_interpreter_without_torch_from_a_machine_without_a_gpu(scripts_copy: Path) -> None:
    """From a walkthrough: a PYTHON that cannot import torch (python3 outside the venv, a typo) was reported as "no
    CUDA device visible"."""
    import torch

    for python, said in (("/no/such/python", "gpu_checks: /no/such/python cannot import torch (on this project's "
                                             "machine set PYTHON=.venv/bin/python"),
                         (sys.executable, f"gpu_checks: no CUDA device visible to {sys.executable}")):
        if python == sys.executable and torch.cuda.is_available():
            continue  # it would run the checks
        result = subprocess.run(["bash", str(scripts_copy / "scripts" / "gpu_checks.sh"), "latency"], cwd=scripts_copy,
                                capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": python})
        assert result.returncode == 2 and said in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "No such file" not in result.stderr, result.stderr


@pytest.mark.parametrize("script", PYTHON_SCRIPTS)
def test_python_script_help(tmp_path: Path, script: str) -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script} ")
    assert list(tmp_path.iterdir()) == []

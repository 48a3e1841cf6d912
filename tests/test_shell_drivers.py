"""The training drivers of scripts/ (train_parallel.sh, matched_students.sh, backbones_cpu.sh, ablations_cpu.sh) run
against a fake PYTHON, so no test trains: it records each call's arguments and signals, sleeps, fails or leaves
checkpoints on demand (FAKE_* variables below). Each test takes a few seconds at most."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
CONFIG = str(REPO / "training" / "configs" / "smoke_cpu.toml")
DRIVERS = ("train_parallel.sh", "matched_students.sh", "backbones_cpu.sh", "ablations_cpu.sh")

# The fake python: `-m training ...` as the drivers call it. Each line of FAKE_LOG is one event of one call (start,
# signal, stopped, failed, done) with its arguments and pid. FAKE_SLEEP: seconds to "train" (a signal ends it
# early), where FAKE_SLEEP_ON is set only in calls with that argument; FAKE_FAIL: fail when the joined arguments
# hold this text; FAKE_FINAL: leave RUN_DIR/<stage>/final.safetensors for each of --stages. A missing --config
# fails as the real one does. SIGINT or SIGTERM: wait a moment (a second signal is recorded too), leave
# RUN_DIR/<stage>/state.pt and exit 128 + signal, as the trainer does.
FAKE_PYTHON = """\
import json, os, signal, sys, time
from pathlib import Path

args = sys.argv[1:]
signals = []


def record(event, **extra):
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(json.dumps({"event": event, "args": args, "pid": os.getpid(), **extra}) + "\\n")


def on_signal(signum, frame):
    signals.append(signum)
    record("signal", signum=signum)


def value(flag):
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def stages():
    run_dir, names = value("--run-dir"), value("--stages")
    return [Path(run_dir) / name for name in names.split(",")] if run_dir and names else []


signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)
record("start")
config = value("--config")
if config and not Path(config).is_file():
    print(f"error: config {config} not found", file=sys.stderr)
    sys.exit(1)
fail = os.environ.get("FAKE_FAIL")
if fail and fail in " ".join(args):
    print(f"error: fake failure ({fail})", file=sys.stderr)
    record("failed")
    sys.exit(1)
sleep_on = os.environ.get("FAKE_SLEEP_ON")
sleep = float(os.environ.get("FAKE_SLEEP", "0")) if sleep_on is None or sleep_on in args else 0
deadline = time.monotonic() + sleep
while time.monotonic() < deadline and not signals:
    time.sleep(0.02)
if signals:
    time.sleep(0.3)
    for stage in stages():
        stage.mkdir(parents=True, exist_ok=True)
        (stage / "state.pt").write_text("state")
    record("stopped")
    print(f"stopped by signal {signals[0]}", file=sys.stderr)
    sys.exit(128 + signals[0])
if os.environ.get("FAKE_FINAL"):
    for stage in stages():
        stage.mkdir(parents=True, exist_ok=True)
        (stage / "final.safetensors").write_text("final")
record("done")
print("fake training done")
"""


@pytest.fixture
def fake(tmp_path: Path) -> dict[str, str]:
    """The environment of a driver run with the fake python (FAKE_LOG in tmp_path)."""
    python = tmp_path / "fake_python"
    python.write_text(f"#!{sys.executable}\n{FAKE_PYTHON}")
    python.chmod(0o755)
    return {**os.environ, "PYTHON": str(python), "FAKE_LOG": str(tmp_path / "calls.jsonl")}


def events(env: dict[str, str], kind: str | None = None) -> list[dict]:
    log = Path(env["FAKE_LOG"])
    lines = log.read_text().splitlines() if log.exists() else []
    return [event for event in map(json.loads, lines) if kind is None or event["event"] == kind]


def arg(event: dict, flag: str) -> str:
    return event["args"][event["args"].index(flag) + 1]


def run(script: str, *args: str, env: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPTS / script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@contextlib.contextmanager
def started(script: str, *args: str, env: dict[str, str], calls: int):
    """The driver as a process group of its own (a terminal's foreground job), once `calls` fake trainers run."""
    process = subprocess.Popen(["bash", str(SCRIPTS / script), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 8
        while len(events(env, "start")) < calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(events(env, "start")) == calls, events(env)
        time.sleep(0.2)  # the fakes have their signal handlers (installed before they record their start)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for event in events(env, "start"):  # fakes that a driver left running in a process group of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(event["pid"], signal.SIGKILL)
        process.communicate(timeout=10)


@pytest.mark.parametrize("script", DRIVERS)
def test_driver_parses(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- train_parallel.sh --------------------------------------------------------------------------------------------


def test_train_parallel_runs_each_stage_once_with_its_budget(fake: dict[str, str], tmp_path: Path) -> None:
    result = run("train_parallel.sh", CONFIG, str(tmp_path / "run"), "0300", "teacher,,student_alone,",
                 "--set", "runtime.workers=0", env=fake)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "teacher: done (fake training done)" in result.stdout and "student_alone: done" in result.stdout
    calls = events(fake, "start")
    assert sorted(arg(call, "--stages") for call in calls) == ["student_alone", "teacher"]
    for call in calls:
        assert call["args"][:3] == ["-m", "training", "pipeline"] and arg(call, "--config") == CONFIG
        assert "runtime.time_budget_s=300" in call["args"]  # 0300 read as decimal, passed without the zero
        assert call["args"][-2:] == ["--set", "runtime.workers=0"]
    assert (tmp_path / "run" / "teacher.log").read_text() == "fake training done\n"


@pytest.mark.parametrize("budget", ["abc", "5m", "-5", "", "1e3"])
def test_train_parallel_refuses_a_budget_that_is_no_number_of_seconds(fake: dict[str, str], tmp_path: Path,
                                                                       budget: str) -> None:  # fmt: skip
    result = run("train_parallel.sh", CONFIG, str(tmp_path / "run"), budget, "teacher", env=fake)
    assert result.returncode == 2 and "BUDGET_S must be a number of seconds >= 0" in result.stderr, result.stderr
    assert not events(fake)


@pytest.mark.parametrize(("stages", "message"), [("teacher,teacher", "stage 'teacher' is listed twice"),
                                                 ("ta1,student_pisr,ta1", "stage 'ta1' is listed twice"),
                                                 (",", "no stage in ','"), ("", "no stage in ''")])  # fmt: skip
def test_train_parallel_refuses_duplicate_and_empty_stage_lists(fake: dict[str, str], tmp_path: Path, stages: str,
                                                                message: str) -> None:  # fmt: skip
    result = run("train_parallel.sh", CONFIG, str(tmp_path / "run"), "0", stages, env=fake)
    assert result.returncode == 2 and message in result.stderr, result.stdout + result.stderr
    assert not events(fake)


@pytest.mark.parametrize("budget", ["30", "0"])
def test_train_parallel_passes_ctrl_c_on_to_its_trainers(fake: dict[str, str], tmp_path: Path, budget: str) -> None:
    """A terminal's Ctrl-C reaches the script's process group only; with a budget `timeout` has put each trainer in
    a group of its own. Each trainer gets one SIGINT, saves and stops; no stage is reported done."""
    env = {**fake, "FAKE_SLEEP": "6"}
    stages = ("teacher", "student_alone")
    with started("train_parallel.sh", CONFIG, str(tmp_path / "run"), budget, ",".join(stages), env=env,
                 calls=2) as process:  # fmt: skip
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=8)
        assert process.returncode == 130, output
    assert "done" not in output
    for stage in stages:
        assert f"{stage}: exit 130" in output
        assert (tmp_path / "run" / stage / "state.pt").exists()
    stopping = events(env, "signal")
    assert sorted(arg(event, "--stages") for event in stopping) == sorted(stages), stopping  # one SIGINT each
    assert {event["signum"] for event in stopping} == {signal.SIGINT}


def test_train_parallel_passes_sigterm_on_as_ctrl_c(fake: dict[str, str], tmp_path: Path) -> None:
    """SIGTERM to the script alone (a job scheduler's stop): its trainers are sent SIGINT, it exits 143."""
    env = {**fake, "FAKE_SLEEP": "6"}
    with started("train_parallel.sh", CONFIG, str(tmp_path / "run"), "0", "teacher", env=env, calls=1) as process:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=8)
        assert process.returncode == 143, output
    assert "teacher: exit 130" in output and "done" not in output
    assert [event["signum"] for event in events(env, "signal")] == [signal.SIGINT]


# -- matched_students.sh ------------------------------------------------------------------------------------------


def test_matched_students_refuse_an_out_dir_they_cannot_create(fake: dict[str, str], tmp_path: Path) -> None:
    out_file = tmp_path / "out"
    out_file.write_text("a file, not a folder")
    result = run("matched_students.sh", str(tmp_path / "run"), str(out_file), "10", env={**fake, "FAKE_FINAL": "1"})
    assert result.returncode != 0 and f"cannot write to OUT_DIR '{out_file}'" in result.stderr, result.stderr
    assert not events(fake)  # nothing seeded, nothing trained


def test_matched_students_fail_when_a_copy_fails(fake: dict[str, str], tmp_path: Path) -> None:
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    (out_dir / "student_pisr.safetensors" / "final.safetensors").mkdir(parents=True)  # cp cannot write over it
    result = run("matched_students.sh", str(run_dir), str(out_dir), "10", env={**fake, "FAKE_FINAL": "1"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "could not copy" in result.stderr and "student_pisr" in result.stderr
    assert (out_dir / "student_takdsr.safetensors").read_text() == "final"  # the others are copied still
    assert (out_dir / "student_alone.safetensors").read_text() == "final"
    calls = events(fake, "start")
    assert [call["args"][2] for call in calls].count("seed-run") == 1
    assert sorted(arg(call, "--stages") for call in calls[1:]) == ["student_alone", "student_pisr", "student_takdsr"]
    assert all("experiment.student_steps=10" in call["args"] for call in calls[1:])


def test_matched_students_pass_on_a_failed_training(fake: dict[str, str], tmp_path: Path) -> None:
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    env = {**fake, "FAKE_FINAL": "1", "FAKE_FAIL": "--stages student_pisr"}
    result = run("matched_students.sh", str(run_dir), str(out_dir), "10", env=env)
    assert result.returncode == 1 and "student_pisr: exit 1" in result.stdout, result.stdout + result.stderr
    assert "student_pisr left no checkpoint or state" in result.stderr
    assert sorted(path.name for path in out_dir.iterdir()) == ["student_alone.safetensors",
                                                                "student_takdsr.safetensors"]  # fmt: skip


def test_matched_students_stopped_by_ctrl_c_copy_the_states_and_exit_130(fake: dict[str, str],
                                                                         tmp_path: Path) -> None:  # fmt: skip
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    env = {**fake, "FAKE_SLEEP": "6", "FAKE_SLEEP_ON": "pipeline"}  # not seed-run
    with started("matched_students.sh", str(run_dir), str(out_dir), "10", env=env, calls=4) as process:
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=8)
        assert process.returncode == 130, output
    assert sorted(path.name for path in out_dir.iterdir()) == [
        f"{stage}.state.pt" for stage in ("student_alone", "student_pisr", "student_takdsr")
    ]
    assert len(events(env, "signal")) == 3  # one SIGINT each trainer: a second would force it


# -- backbones_cpu.sh ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["rfdn", "pna"], "unknown family or mode 'pna'"),
    (["shipp", "rfdn"], "unknown family or mode 'shipp'"),
    (["ship", "rfdn", "pan", "rlfm"], "unknown family or mode 'rlfm'"),
    (["ship-pisr", "rfdn", "rfdn"], "family 'rfdn' is named twice"),
    (["cf-ta"], "cf-ta needs at least one FAMILY"),
    (["cf-ta", "pan", "../rfdn"], "unknown family or mode '../rfdn'"),
    (["teachers", "rfdn", "abc"], "STEPS must be a whole number of steps > 0, not 'abc'"),
    (["teachers", "rfdm", "6000"], "unknown family or mode 'rfdm'"),
])  # fmt: skip
def test_backbones_refuse_a_bad_command_line_before_training(fake: dict[str, str], tmp_path: Path, args: list[str],
                                                             message: str) -> None:  # fmt: skip
    env = {**fake, "RUN_ROOT": str(tmp_path / "root")}
    result = run("backbones_cpu.sh", *args, env=env)
    assert result.returncode == 2 and message in result.stderr, result.stdout + result.stderr
    assert "families: pan rfdn rlfn" in result.stderr or "unknown" not in message
    assert not events(fake) and not (tmp_path / "root").exists()


def test_backbones_comparison_trains_and_evaluates_each_family(fake: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = run("backbones_cpu.sh", "rfdn", "pan", env={**fake, "RUN_ROOT": str(root)})
    assert result.returncode == 0, result.stdout + result.stderr
    trained = sorted((arg(call, "--run-dir"), arg(call, "--stages")) for call in events(fake, "start")
                     if "--stages" in call["args"])  # fmt: skip
    assert trained == sorted([(str(root / "rfdn"), "teacher,ta1,student_takdsr"),
                              (str(root / "rfdn"), "teacher_continuous,student_pisr,student_alone"),
                              (str(root / "pan"), "teacher,ta1,student_takdsr"),
                              (str(root / "pan"), "teacher_continuous,student_pisr,student_alone")])  # fmt: skip
    assert (root / "evaluate_rfdn.log").exists() and (root / "evaluate_pan.log").exists()


def test_backbones_name_the_log_of_a_failed_queue(fake: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = {**fake, "RUN_ROOT": str(root), "FAKE_FAIL": "teacher,ta1,student_takdsr"}
    result = run("backbones_cpu.sh", "rfdn", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"the reason is in {root}/queue_1.log" in result.stderr
    assert "error: fake failure (teacher,ta1,student_takdsr)" in result.stderr  # its last lines
    assert "queue_2.log" not in result.stderr  # that queue went through
    assert not (root / "evaluate_rfdn.log").exists()


def test_backbones_cf_ta_on_a_new_run_root(fake: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "new" / "root"
    result = run("backbones_cpu.sh", "cf-ta", "rfdn", env={**fake, "RUN_ROOT": str(root)})
    assert result.returncode == 0, result.stdout + result.stderr
    calls = events(fake, "start")
    assert [call["args"][2] for call in calls] == ["train", "train", "train", "evaluate"]
    assert (root / "cf_ta_rfdn.log").exists() and arg(calls[-1], "--json") == str(root / "rfdn" / "cf_ta_scores.json")


def test_backbones_cf_ta_stops_at_a_failed_stage_and_names_its_log(fake: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = {**fake, "RUN_ROOT": str(root), "FAKE_FAIL": "stage.name=ta_continuous"}
    result = run("backbones_cpu.sh", "cf-ta", "rfdn", "pan", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"the reason is in {root}/cf_ta_rfdn.log" in result.stderr and "fake failure" in result.stderr
    assert len(events(fake, "start")) == 2  # not the stage after it, nor pan


def test_backbones_ship_names_the_log_of_a_failed_family(fake: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = {**fake, "RUN_ROOT": str(root), "FAKE_FAIL": "pan_x2.toml"}
    result = run("backbones_cpu.sh", "ship", "rfdn", "pan", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"the reason is in {root}/ship_family_pan.log" in result.stderr
    assert "ship_family_rfdn.log" not in result.stderr


def test_backbones_teachers_trains_both_teachers_and_scores_them(fake: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = run("backbones_cpu.sh", "teachers", "rfdn", "600", env={**fake, "RUN_ROOT": str(root)})
    assert result.returncode == 0, result.stdout + result.stderr
    calls = events(fake, "start")
    assert sorted(arg(call, "--stages") for call in calls[:2]) == ["teacher", "teacher_continuous"]
    assert all("experiment.teacher_steps=600" in call["args"] for call in calls[:2])
    assert arg(calls[2], "--json") == str(root / "rfdn_teachers_600" / "teacher_scores.json")


def test_backbones_teachers_stopped_by_ctrl_c_get_one_sigint_each(fake: dict[str, str], tmp_path: Path) -> None:
    """The trainers share the terminal's process group with the script: its Ctrl-C reaches them, and the script
    must not send a second SIGINT, which would stop them before they saved."""
    env = {**fake, "RUN_ROOT": str(tmp_path / "root"), "FAKE_SLEEP": "6"}
    with started("backbones_cpu.sh", "teachers", "rfdn", "600", env=env, calls=2) as process:
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=8)
        assert process.returncode == 130, output
    assert len(events(env, "signal")) == 2, events(env, "signal")
    assert "teacher.log" in output and "teacher_continuous.log" in output
    assert len(events(env, "start")) == 2  # not scored


# -- ablations_cpu.sh ---------------------------------------------------------------------------------------------


def test_ablations_name_the_logs_of_failed_queues(fake: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = run("ablations_cpu.sh", str(root), env={**fake, "FAKE_FAIL": "--run-dir"})
    assert result.returncode == 1, result.stdout + result.stderr
    for queue in (1, 2):
        assert f"queue {queue} failed (exit 1); the reason is in {root}/queue_{queue}.log" in result.stderr
    assert "error: fake failure (--run-dir)" in result.stderr
    assert not events(fake, "start")[2:]  # each queue stopped at its first row; nothing evaluated


def test_ablations_evaluate_after_both_queues(fake: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = run("ablations_cpu.sh", str(root), env={**fake, "FAKE_FINAL": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert [call["args"][2] for call in events(fake, "start")][-2:] == ["evaluate", "evaluate"]
    assert not result.stderr


def test_ablations_pass_a_sigterm_on_to_each_running_trainer(fake: dict[str, str], tmp_path: Path) -> None:
    """The trap sent SIGINT to the queues, background subshells that ignore it: 30 s after a SIGTERM nothing had
    stopped, and a queue went on to its next row."""
    env = {**fake, "FAKE_SLEEP": "6"}
    with started("ablations_cpu.sh", str(tmp_path / "root"), env=env, calls=2) as process:
        process.send_signal(signal.SIGTERM)  # the script alone, as `kill PID` does
        output, _ = process.communicate(timeout=8)
        assert process.returncode == 130, output
    assert sorted(event["signum"] for event in events(env, "signal")) == [signal.SIGINT, signal.SIGINT]
    assert len(events(env, "stopped")) == 2 and len(events(env, "start")) == 2  # no next row, no evaluation


# -- relative paths: from where the driver is started, not the checkout it cds into ----------------------------------


def test_relative_paths_are_taken_from_where_a_driver_is_started(fake: dict[str, str], tmp_path: Path) -> None:
    """`cd /data && bash <checkout>/scripts/ablations_cpu.sh runs` wrote into <checkout>/runs: the drivers cd into the
    checkout, and relative RUN_ROOT, RUN_DIR, OUT_DIR, CONFIG and PYTHON were read from there."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "bin").mkdir()
    os.symlink(fake["PYTHON"], here / "bin" / "python")  # PYTHON=bin/python: a path, from here
    env = {**fake, "FAKE_FINAL": "1", "PYTHON": "bin/python"}

    def started_here(script: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(SCRIPTS / script), *args], cwd=here, env={**env, **extra},
                              capture_output=True, text=True, timeout=20)  # fmt: skip

    ablations = started_here("ablations_cpu.sh", "abl")
    assert ablations.returncode == 0, ablations.stdout + ablations.stderr
    assert (here / "abl" / "base").is_dir() and not (REPO / "abl").exists()
    matched = started_here("matched_students.sh", "run", "out", "10", CONFIG="my.toml")
    assert not (REPO / "run").exists() and not (REPO / "out").exists()
    assert (here / "out").is_dir(), matched.stderr
    configs = {arg(call, "--config") for call in events(fake, "start") if "--config" in call["args"]}
    assert str(here / "my.toml") in configs, configs  # the fake fails on a missing config, as the trainer does
    backbones = started_here("backbones_cpu.sh", "teachers", "rfdn", "10", RUN_ROOT="bb")
    assert not (REPO / "bb").exists()
    assert any(arg(call, "--run-dir").startswith(f"{here}/bb/") for call in events(fake, "start")
               if "--run-dir" in call["args"]), backbones.stdout + backbones.stderr

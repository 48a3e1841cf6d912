"""The researcher scripts of scripts/ refuse ordinary mistakes as the `python -m training` commands do: one
`error: ...` line and status 1 (2 with argparse's usage for a malformed argument), never a traceback, and before the
long part of their work (a fit, a probe, a measurement)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models import build_model, save_checkpoint
from training.config import dump_toml

from training_utils import load_script, make_image_folder, tiny_config

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def _run(script: str, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env=env)  # fmt: skip


def _refused(run: subprocess.CompletedProcess | tuple[int, str], status: int, *fragments: str) -> None:
    """Status 1 and a last line `error: ...`, or 2 and argparse's `...: error: argument ...`, holding `fragments`;
    no traceback (warnings and progress bars may come before the line)."""
    code, stderr = (run.returncode, run.stderr) if isinstance(run, subprocess.CompletedProcess) else run
    assert code == status, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") if status == 1 else ": error: argument" in last, stderr
    for fragment in fragments:
        assert fragment in last, stderr


def _mean(psnr: float) -> dict:
    return {"mean": {"psnr_rgb": psnr, "ssim_rgb": 0.9, "psnr_y": psnr + 1, "ssim_y": 0.95}}


@pytest.fixture
def scores(tmp_path: Path) -> Path:
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"cg-dev": {"bicubic": _mean(30), "final": _mean(31)}}))
    return path


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "No such file"),
        ("{not json", "is not a JSON file"),
        ("[1, 2]", "a JSON list, not an object of evaluation sets"),
        ((REPO / "models" / "weights" / "weights.json").read_text(), "has no mean psnr_rgb"),  # not scores at all
        ("{}", "holds no scores"),  # once a table of one empty row, with status 0
        ('{"cg-dev": {}}', "holds no scores"),
    ],
)  # fmt: skip
def test_scores_table_refuses_files_that_are_not_scores(tmp_path: Path, content: str | None, fragment: str) -> None:
    path = tmp_path / "scores.json"
    if content is not None:
        path.write_text(content)
    _refused(_run("scores_table.py", path), 1, str(path), fragment)
    _refused(_run("scores_table.py", path, "--plot", tmp_path / "bars.png"), 1, fragment)


def test_scores_table_refuses_a_plot_it_cannot_write_before_the_table(tmp_path: Path, scores: Path) -> None:
    for plot, fragment in ((tmp_path / "none" / "bars.png", "does not exist"), (tmp_path / "bars.txt", ".txt")):
        run = _run("scores_table.py", scores, "--plot", plot)
        _refused(run, 1, fragment)
        assert run.stdout == ""
    assert not list(tmp_path.glob("bars*"))


def test_scores_table_says_how_to_tell_two_final_checkpoints_apart(tmp_path: Path, scores: Path) -> None:
    """Two runs' final.safetensors each evaluated alone are both labelled `final`."""
    other = tmp_path / "other" / "scores.json"
    other.parent.mkdir()
    other.write_text(json.dumps({"cg-dev": {"bicubic": _mean(30), "final": _mean(32)}}))
    _refused(_run("scores_table.py", scores, other), 1, "'final' is scored twice on cg-dev", str(scores), str(other),
             "evaluate them together")  # fmt: skip


@pytest.mark.parametrize("other_bicubic", [{**_mean(44.37), "per_image": {"a": {}, "b": {}}},
                                           {**_mean(30), "per_image": {"a": {}}}], ids=["crops", "fewer images"])
def test_scores_table_refuses_files_that_scored_other_images_under_one_name(tmp_path: Path,
                                                                          other_bicubic: dict) -> None:
    """From a researcher's walkthrough: a smoke run's results (2 cg-dev images cropped to 96 px) beside the shipped
    scores made one table, with the last file's bicubic row (44.37 dB instead of 35.17), and --versus paired each
    crop with the whole frame of its name (-20.27 dB). Files whose baselines differ scored other images."""
    shipped, smoke = tmp_path / "shipped.json", tmp_path / "smoke.json"
    shipped.write_text(json.dumps({"cg-dev": {"bicubic": {**_mean(30), "per_image": {"a": {}, "b": {}}},
                                              "shipped": _mean(31)}}))  # fmt: skip
    smoke.write_text(json.dumps({"cg-dev": {"bicubic": other_bicubic, "smoke": _mean(45)}}))
    said = f"{shipped} and {smoke} scored other images as 'cg-dev': bicubic scores 30.00 dB in one and"
    _refused(_run("scores_table.py", shipped, smoke), 1, said, "compare scores of the same images")
    same = tmp_path / "same.json"  # the same images, scored on another machine: rounding apart
    same.write_text(json.dumps({"cg-dev": {"bicubic": {**_mean(30.001), "per_image": {"b": {}, "a": {}}},
                                           "mine": _mean(32)}}))  # fmt: skip
    merged = _run("scores_table.py", shipped, same)
    assert merged.returncode == 0 and "| mine | 32.00 /" in merged.stdout, merged.stderr


def test_scores_table_refuses_rows_that_name_no_model(scores: Path) -> None:
    _refused(_run("scores_table.py", scores, "--rows", ","), 1, "names no model")


@pytest.mark.parametrize("sets", ["", ","])
def test_an_empty_set_list_is_refused(tmp_path: Path, sets: str) -> None:
    """It once scored nothing, wrote {} and exited 0 (`python -m training evaluate --sets ""` refuses it)."""
    out = tmp_path / "scores.json"
    _refused(_run("bicubic_floors.py", "--sets", sets, "--json", out), 2, "--sets", "names no set")
    config = tmp_path / "config.toml"
    config.write_text(dump_toml(tiny_config(tmp_path).to_dict()))
    _refused(_run("linear_baseline.py", "--config", config, "--sets", sets, "--json", out), 2, "--sets",
             "names no set")  # fmt: skip
    assert not out.exists()


def _bad_folders(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    empty, junk = tmp_path / "empty", tmp_path / "junk"
    empty.mkdir()
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    return {"missing": (tmp_path / "missing", "missing"), "empty": (empty, "no usable image"),
            "junk": (junk, "no usable image")}  # fmt: skip


@pytest.mark.parametrize("case", ["missing", "empty", "junk"])
def test_bicubic_floors_refuses_unusable_data_folders(tmp_path: Path, case: str) -> None:
    folder, fragment = _bad_folders(tmp_path)[case]
    _refused(_run("bicubic_floors.py", "--data", folder), 1, fragment)


def test_bicubic_floors_refuses_a_json_it_cannot_write(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", count=1, size=(32, 32))
    _refused(_run("bicubic_floors.py", "--data", folder, "--json", tmp_path / "none" / "f.json"), 1, "does not exist")


@pytest.fixture
def linear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """The linear_baseline script with its training dataset refused (a mistake must be found before it) and a
    config of a valid image folder."""
    script = load_script(SCRIPTS / "linear_baseline.py")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the training dataset was built before the arguments were checked")

    monkeypatch.setattr(script, "build_train_dataset", refuse)
    folder = make_image_folder(tmp_path / "images", count=1, size=(64, 64))
    config = tmp_path / "config.toml"
    config.write_text(dump_toml(tiny_config(folder).to_dict()))  # 32 px HR patches: 16 px LR at x2
    return script, config, folder


@pytest.mark.parametrize("case", ["missing", "empty", "junk", "json", "window"])
def test_linear_baseline_refuses_before_it_builds_the_training_set(
    tmp_path: Path, linear: tuple, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    script, config, folder = linear
    args, fragment = {
        **{name: (["--data", str(path)], text) for name, (path, text) in _bad_folders(tmp_path).items()},
        "json": (["--data", str(folder), "--json", str(tmp_path / "none" / "x.json")], "does not exist"),
        "window": (["--data", str(folder), "--window", "17"], "larger than the config's LR patches (16 px"),
    }[case]  # fmt: skip
    _refused((script.main(["--config", str(config), *args]), capsys.readouterr().err), 1, fragment)


def test_linear_baseline_refuses_a_config_with_no_training_data(
    linear: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    script, config, folder = linear
    config.write_text(dump_toml({key: value for key, value in tiny_config(folder).to_dict().items() if key != "data"}))
    _refused((script.main(["--config", str(config), "--data", str(folder)]), capsys.readouterr().err), 1,
             "no [data] table")  # fmt: skip


@pytest.mark.parametrize(("args", "fragment"), [(["--window", "4"], "odd"), (["--patches", "0"], ">= 1")])
def test_linear_baseline_refuses_bad_numbers_as_arguments(
    linear: tuple, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    script, config, folder = linear
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--config", str(config), "--data", str(folder), *args])
    _refused((exit_info.value.code, capsys.readouterr().err), 2, fragment)


def test_linear_baseline_refuses_a_missing_config_and_a_bad_override(tmp_path: Path) -> None:
    _refused(_run("linear_baseline.py", "--config", tmp_path / "none.toml"), 1, "none.toml")
    config = tmp_path / "config.toml"
    config.write_text(dump_toml(tiny_config(tmp_path).to_dict()))
    _refused(_run("linear_baseline.py", "--config", config, "--set", "optim.steps=many"), 1, "optim.steps")


@pytest.fixture(scope="module")
def probe_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny x2 RLFN teacher (its decoder needs LR sides of 15 px: HR crops of 30), a student, an image folder."""
    tmp = tmp_path_factory.mktemp("probe")
    teacher = build_model("rlfn_teacher", channels=8, blocks=2, encoder_channels=8)
    student = build_model("rlfn_s", channels=8)
    return (save_checkpoint(teacher, tmp / "teacher.safetensors", role="teacher"),
            save_checkpoint(student, tmp / "student.safetensors", role="student"),
            make_image_folder(tmp / "images", count=1, size=(48, 64)))  # fmt: skip


def test_cf_probe_refuses_checkpoints_that_are_not_teachers(tmp_path: Path, probe_inputs: tuple) -> None:
    _, student, folder = probe_inputs
    _refused(_run("cf_probe.py", student, "--data", folder), 1, "is not a teacher checkpoint")
    _refused(_run("cf_probe.py", tmp_path / "none.safetensors", "--data", folder), 1, "none.safetensors")


@pytest.mark.parametrize("case", ["missing", "empty", "junk"])
def test_cf_probe_refuses_unusable_data_folders(tmp_path: Path, probe_inputs: tuple, case: str) -> None:
    folder, fragment = _bad_folders(tmp_path)[case]
    _refused(_run("cf_probe.py", probe_inputs[0], "--data", folder), 1, fragment)


@pytest.mark.parametrize(("args", "fragment"), [(["--max-images", "-1"], ">= 0"), (["--threads", "-3"], "1024"),
                                                (["--crop", "-2"], ">= 0")])  # fmt: skip
def test_cf_probe_refuses_bad_numbers_as_arguments(probe_inputs: tuple, args: list[str], fragment: str) -> None:
    teacher, _, folder = probe_inputs
    _refused(_run("cf_probe.py", teacher, "--data", folder, *args), 2, fragment)


def test_cf_probe_refuses_a_crop_below_the_teachers_smallest_input(tmp_path: Path, probe_inputs: tuple) -> None:
    teacher, _, folder = probe_inputs
    for crop in ("7", "29"):
        _refused(_run("cf_probe.py", teacher, "--data", folder, "--crop", crop), 1, "at least 30 px")
    out = tmp_path / "probe.json"
    run = _run("cf_probe.py", teacher, "--data", folder, "--crop", "30", "--json", out)
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())[0]["images"] == 1


def test_cf_probe_refuses_a_json_it_cannot_write_before_probing(tmp_path: Path, probe_inputs: tuple) -> None:
    teacher, _, folder = probe_inputs
    run = _run("cf_probe.py", teacher, "--data", folder, "--json", tmp_path / "none" / "probe.json")
    _refused(run, 1, "does not exist")
    assert run.stdout == ""  # no table: nothing was probed


def test_cf_probe_takes_bundled_checkpoint_names(probe_inputs: tuple) -> None:
    """As `python -m training evaluate --checkpoint rlfn_teacher_takdsr_x2` does (models.resolve_checkpoint)."""
    run = _run("cf_probe.py", "rlfn_teacher_takdsr_x2", "--data", probe_inputs[2], "--crop", "32")
    assert run.returncode == 0, run.stderr
    assert "| rlfn_teacher_takdsr_x2 | discrete |" in run.stdout


@pytest.mark.parametrize(("args", "fragment"), [
    (["--frames", "0"], "--frames"), (["--grow-mb", "0"], "--grow-mb"), (["--grow-mb", "-1"], "--grow-mb"),
    # the daemon refused these, once it had started (a walkthrough)
    (["--size", "0x0"], "0x0: width and height must be at least 1"),
    (["--size", "100000x100000"], "100000x100000: the daemon takes frames up to 3840x2160")])  # fmt: skip
def test_resize_stall_refuses_bad_numbers_as_arguments(args: list[str], fragment: str) -> None:
    _refused(_run("resize_stall.py", "--size", "16x16", "--frames", "1", "--grow-mb", "1", *args), 2, fragment)


def test_resize_stall_refuses_a_json_it_cannot_write_before_measuring(tmp_path: Path) -> None:
    run = _run("resize_stall.py", "--size", "16x16", "--frames", "1", "--grow-mb", "1", "--json",
               tmp_path / "none" / "stall.json")  # fmt: skip
    _refused(run, 1, "--json")
    assert run.stdout == ""


def test_memory_per_size_blames_frames_0_on_frames() -> None:
    _refused(_run("memory_per_size.py", "--frames", "0"), 2, "argument --frames: '0': a whole number, at least 1")


def test_memory_per_size_refuses_an_unknown_backend() -> None:
    """Its child said so, but the parent printed a CalledProcessError with the child's whole source instead."""
    _refused(_run("memory_per_size.py", "--backends", "eager,nope", "--frames", "2", "--points", "1"), 2,
             "unknown backend(s) ['nope']")  # fmt: skip


def test_memory_per_size_reports_a_failed_childs_last_line(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(SCRIPTS / "memory_per_size.py")
    monkeypatch.setattr(script, "_CHILD", "import sys\nprint('working')\nsys.exit('the real reason')")
    with pytest.raises(RuntimeError, match=r"^eager/fixed: the real reason$"):
        script.measure("eager", "fixed", 2, 1)


def test_memory_per_size_skips_a_backend_not_installed(tmp_path: Path) -> None:
    """onnxruntime hidden from the children, as where it is not installed: eager's results are kept and written."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text('import sys\nsys.modules["onnxruntime"] = None\n')
    out = tmp_path / "memory.json"
    run = _run("memory_per_size.py", "--frames", "2", "--points", "1", "--json", out,
               env={**os.environ, "PYTHONPATH": str(hide)})  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "note: onnxruntime skipped: " in run.stderr and "needs onnxruntime" in run.stderr
    assert set(json.loads(out.read_text())) == {"eager/fixed", "eager/random", "eager/random-closed"}


def test_memory_per_size_refuses_a_json_it_cannot_write_before_measuring(tmp_path: Path) -> None:
    run = _run("memory_per_size.py", "--backends", "eager", "--frames", "2", "--points", "1", "--json",
               tmp_path / "none" / "memory.json")  # fmt: skip
    _refused(run, 1, "--json")
    assert run.stdout == ""


@pytest.mark.parametrize(("args", "status", "fragment"), [
    (["--threads", "0"], 2, "from 1 to 1024"),
    (["--timed-frames", "-1"], 2, "from 0 to 10000"),
    (["--pads", "0,65"], 2, "each 0 to 64"),
    (["--pads", "abc"], 2, "argument --pads: 'abc': comma-separated pixel counts"),  # "invalid _pads value" before
    (["--checkpoint", "rlfn_s_takdsr_x2", "--checkpoint", "absent.safetensors"], 1, "absent.safetensors not found"),
    (["--checkpoint", "rlfn_teacher_takdsr_x2"], 1, "not an LR -> HR decoder"),
])  # fmt: skip
def test_edge_study_refuses_before_it_scores(args: list[str], status: int, fragment: str) -> None:
    """A bad count crashed after the scoring (minutes on cg-dev, and the results were lost), a second checkpoint
    that did not exist after the first had been scored."""
    run = _run("edge_study.py", *args, "--set", "rendered-val")
    _refused(run, status, fragment)
    assert run.stdout == ""

"""`python -m training evaluate` with several checkpoints and sets, the native-LR validation set, and moving
checkpoints between runs and the shipped-weights folder (ship-checkpoint, seed-run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models import (
    CheckpointError,
    build_model,
    count_macs,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    weights_sha256,
)
from training.__main__ import main as training_main
from training.config import Config, EvalConfig
from training.data import degrade
from training.data.images import read_image
from training.evaluate import (
    EvalImage,
    baseline_predictors,
    builtin_sets_config,
    eval_sets,
    evaluate,
    score_sets,
    unique_labels,
)
from training.metrics import image_metrics
from training.ship import seed_run, ship_checkpoint

from training_utils import load_script, make_image_folder

REPO = Path(__file__).resolve().parents[1]


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "training", "evaluate", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)


def test_evaluate_compares_several_checkpoints(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", count=2, size=(48, 64))
    paths = []
    for run in ("a", "b"):
        torch.manual_seed(len(paths))
        model = build_model("rlfn_s", channels=8)
        paths.append(save_checkpoint(model, tmp_path / run / "final.safetensors", role="student"))
    output = tmp_path / "scores.json"
    result = _evaluate("--checkpoint", str(paths[0]), "--checkpoint", str(paths[1]), "--data", str(folder),
                       "--json", str(output))  # fmt: skip
    assert result.returncode == 0, result.stderr
    scores = json.loads(output.read_text())["images"]
    assert set(scores) == {"bicubic", "lanczos", "a/final", "b/final"}  # same stems: named by their folders
    assert scores["a/final"]["mean"]["psnr_rgb"] != scores["b/final"]["mean"]["psnr_rgb"]
    # one image scored here by hand: the bicubic LR of the whole image, the network, all four metrics
    hr = read_image(folder / "img1.png")
    with torch.no_grad():
        sr = load_checkpoint(paths[1]).model(degrade(hr, 2).unsqueeze(0)).clamp(0, 1)[0]
    assert scores["b/final"]["per_image"]["img1"] == pytest.approx(image_metrics(sr, hr, 2), abs=1e-4)

    bad = _evaluate("--checkpoint", str(paths[0]), "--sets", "cg-dev,nonsense")
    assert bad.returncode == 1 and "unknown set(s) ['nonsense']" in bad.stderr
    # empty items are passed over, as by the scripts' --sets ("cg-dev," was "unknown set(s) ['']"); none is refused
    none = _evaluate("--checkpoint", str(paths[0]), "--sets", ",")
    assert none.returncode == 2 and "',' names no set; built-in sets: cg-dev" in none.stderr, none.stderr
    trailing = _evaluate("--checkpoint", str(paths[0]), "--sets", "nonsense,")
    assert trailing.returncode == 1 and "unknown set(s) ['nonsense']" in trailing.stderr, trailing.stderr


def _strict_json(text: str) -> object:
    """JSON as jq or JavaScript read it: Infinity and NaN are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_an_image_reproduced_exactly_is_scored_infinite_and_written_as_json(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", count=1, size=(48, 64))
    cv2.imwrite(str(folder / "flat.png"), np.full((48, 64, 3), 90, np.uint8))  # bicubic gives it back exactly
    model = build_model("rlfn_s", channels=8)
    checkpoint = save_checkpoint(model, tmp_path / "final.safetensors", role="student")
    output = tmp_path / "scores.json"
    result = _evaluate("--checkpoint", str(checkpoint), "--data", str(folder), "--json", str(output))
    assert result.returncode == 0, result.stderr
    bicubic = _strict_json(output.read_text())["images"]["bicubic"]  # json wrote Infinity before
    assert bicubic["per_image"]["flat"]["psnr_rgb"] is None and bicubic["mean"]["psnr_y"] is None
    assert bicubic["per_image"]["flat"]["ssim_rgb"] == pytest.approx(1.0)
    assert isinstance(bicubic["per_image"]["img0"]["psnr_rgb"], float)
    table = subprocess.run([sys.executable, str(REPO / "scripts" / "scores_table.py"), str(output)],
                           capture_output=True, text=True)  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "| bicubic | inf / " in table.stdout


def test_evaluate_and_latency_take_bundled_names(tmp_path: Path) -> None:
    """`--checkpoint rlfn_ta_takdsr_x2 --teacher rlfn_teacher_takdsr_x2` from any folder, as the daemon takes them."""
    folder = make_image_folder(tmp_path / "images", count=1, size=(48, 64))
    output = tmp_path / "scores.json"
    command = [sys.executable, "-m", "training", "evaluate", "--checkpoint", "rlfn_ta_takdsr_x2", "--teacher",
               "rlfn_teacher_takdsr_x2", "--data", str(folder), "--json", str(output)]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert json.loads(output.read_text())["images"]["rlfn_ta_takdsr_x2"]["mean"]["psnr_rgb"] > 0
    command = [sys.executable, "-m", "training", "latency", "rlfn_s_takdsr_x2", "--input", "32x32", "--repeats", "1"]
    latency = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert latency.returncode == 0 and latency.stdout.startswith("rlfn_s_takdsr_x2: "), latency.stderr
    bad_size = subprocess.run([*command[:-4], "--input", "32x32x3"], capture_output=True, text=True, timeout=240)
    assert bad_size.returncode == 2 and "expected WIDTHxHEIGHT" in bad_size.stderr
    too_small = subprocess.run([*command[:-4], "--input", "14x64"], capture_output=True, text=True, timeout=240)
    assert too_small.returncode == 1 and "needs an LR input of at least 15 px a side" in too_small.stderr


def test_evaluation_folders_keep_their_images_apart_and_skip_what_a_model_cannot_take(tmp_path: Path) -> None:
    """Two folders of the same name are two sets; an image whose LR side is below the model's minimum (RLFN: 15)
    is skipped with a warning, not a crash inside the network."""
    first = make_image_folder(tmp_path / "a" / "imgs", count=2, size=(48, 64))
    second = make_image_folder(tmp_path / "b" / "imgs", count=1, size=(48, 64), seed=1)
    make_image_folder(tmp_path / "tiny", count=1, size=(20, 20))
    (second / "tiny.png").write_bytes((tmp_path / "tiny" / "img0.png").read_bytes())
    model = save_checkpoint(build_model("rlfn_s", channels=8), tmp_path / "s.safetensors", role="student")
    output = tmp_path / "scores.json"
    result = _evaluate("--checkpoint", str(model), "--data", str(first), "--data", str(second), "--json", str(output))
    assert result.returncode == 0, result.stderr
    scores = json.loads(output.read_text())
    assert set(scores) == {"a/imgs", "b/imgs"}
    assert len(scores["a/imgs"]["s"]["per_image"]) == 2 and list(scores["b/imgs"]["s"]["per_image"]) == ["img0"]
    assert "skipped 1 file(s): 1 smaller than 30px (tiny.png)" in result.stderr
    own_cg_dev = make_image_folder(tmp_path / "cg-dev", count=1)
    clash = _evaluate("--checkpoint", str(model), "--sets", "cg-dev", "--data", str(own_cg_dev))
    assert clash.returncode == 1 and "the name of a built-in set" in clash.stderr


def _same_stems_folder(folder: Path) -> Path:
    """a/frame.png, b/frame.png, x.png and x.jpg: four images, two stems."""
    for sub in ("a", "b"):
        make_image_folder(folder / sub, count=1, size=(32, 32), seed=len(sub))
        (folder / sub / "img0.png").rename(folder / sub / "frame.png")
    make_image_folder(folder, count=1, size=(32, 32), seed=3)
    (folder / "img0.png").rename(folder / "x.png")
    cv2.imwrite(str(folder / "x.jpg"), cv2.imread(str(folder / "a" / "frame.png")))
    return folder


def test_evaluate_scores_every_image_when_file_stems_repeat(tmp_path: Path) -> None:
    folder = _same_stems_folder(tmp_path / "imgs")
    output = tmp_path / "scores.json"
    score_sets(baseline_predictors(2), builtin_sets_config(None, [folder]), 2, output)
    scores = json.loads(output.read_text())["imgs"]["bicubic"]
    assert sorted(scores["per_image"]) == ["a/frame", "b/frame", "x.jpg", "x.png"]
    psnrs = [metrics["psnr_rgb"] for metrics in scores["per_image"].values()]
    assert scores["mean"]["psnr_rgb"] == pytest.approx(sum(psnrs) / 4)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["imgs", "scores.json"]  # no temporary file left
    image = EvalImage("frame", torch.zeros(3, 8, 8), torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="two evaluation images are named 'frame'"):  # never a silent merge
        evaluate(baseline_predictors(2), [image, image], 2)


def test_an_image_too_large_for_memory_is_one_error_naming_model_and_image() -> None:
    """A teacher on a 4000x4000 image under `ulimit -v 5000000` ended in the CPU allocator's traceback."""
    def out_of_memory(lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3584000000 bytes.\nmore")

    def other_failure(lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("Given groups=1, weight of size [8, 3, 3, 3]")

    image = EvalImage("frame", torch.zeros(3, 8, 12), torch.zeros(3, 16, 24))
    with pytest.raises(ValueError, match=r"^teacher on frame \(24x16\) does not fit in memory: DefaultCPUAllocator: "
                                         r"can't allocate memory: you tried to allocate 3584000000 bytes\.; nothing "
                                         r"was scored \(smaller images need less"):
        evaluate({"bicubic": baseline_predictors(2)["bicubic"], "teacher": out_of_memory}, [image], 2)
    with pytest.raises(RuntimeError, match="Given groups=1"):  # not every failure is taken for memory
        evaluate({"teacher": other_failure}, [image], 2)


def test_the_scores_file_is_checked_before_any_scoring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_image_folder(tmp_path / "images", count=1, size=(48, 64))
    sets = builtin_sets_config(None, [folder])
    with monkeypatch.context() as patch:
        patch.setattr("training.evaluate.eval_sets", lambda *args: pytest.fail("scored before the check"))
        with pytest.raises(ValueError, match=r"cannot write the scores to .*missing/s\.json: the folder .*missing "
                                             r"does not exist; create it first"):
            score_sets(baseline_predictors(2), sets, 2, tmp_path / "missing" / "s.json")
        with pytest.raises(ValueError, match=r"cannot write the scores to .*images: it is a folder; give a file"):
            score_sets(baseline_predictors(2), sets, 2, folder)
    model = save_checkpoint(build_model("rlfn_s", channels=8), tmp_path / "s.safetensors", role="student")
    result = _evaluate("--checkpoint", str(model), "--data", str(folder), "--json", str(tmp_path / "no" / "s.json"))
    assert result.returncode == 1 and result.stderr.startswith("error: cannot write the scores to "), result.stderr
    assert "Traceback" not in result.stderr


def test_a_ta_needs_a_teacher_and_a_teacher_it_gets(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", count=1, size=(48, 64))
    ta = save_checkpoint(build_model("rlfn_ta", channels=8), tmp_path / "ta.safetensors", role="ta",
                         training={"mix": [0.3, 0.7]})  # fmt: skip
    student = save_checkpoint(build_model("rlfn_s", channels=8), tmp_path / "s.safetensors", role="student")
    alone = _evaluate("--checkpoint", str(ta), "--data", str(folder))
    assert alone.returncode == 1 and "is a TA: evaluating it needs its teacher's checkpoint" in alone.stderr
    wrong = _evaluate("--checkpoint", str(ta), "--teacher", str(student), "--data", str(folder))
    assert wrong.returncode == 1 and "s.safetensors is not a teacher checkpoint (it is a student, rlfn)" in wrong.stderr


def test_a_ta_without_weight_hashes_is_refused_a_teacher_of_another_run_or_stage(tmp_path: Path) -> None:
    """From a researcher's walkthrough: the bundled TA records no training.inputs_sha256 (it predates them), so
    `--teacher rlfn_teacher_continuous_x2` scored it with the wrong CF' and exit 0. Its run and guide stage name
    its teacher; a teacher that records neither is still taken on trust."""
    from training.evaluate import checkpoint_predictor

    bundled_ta = resolve_checkpoint("rlfn_ta_takdsr_x2")
    with pytest.raises(ValueError, match=r"rlfn_ta_takdsr_x2\.safetensors is a TA trained with another teacher "
                                         r"\(stage 'teacher' of run 'rlfn_x2'\) than .*rlfn_teacher_continuous_x2"
                                         r"\.safetensors \(stage 'teacher_continuous' of run 'rlfn_x2'\)"):
        checkpoint_predictor(bundled_ta, torch.device("cpu"), resolve_checkpoint("rlfn_teacher_continuous_x2"))
    checkpoint_predictor(bundled_ta, torch.device("cpu"), resolve_checkpoint("rlfn_teacher_takdsr_x2"))
    ta = save_checkpoint(build_model("rlfn_ta", channels=8), tmp_path / "ta.safetensors", role="ta",
                         training={"mix": [0.3, 0.7], "run": "mine", "guides": ["teacher"]})  # fmt: skip
    for training, refused in (({"run": "smoke", "stage": "teacher"}, True), ({}, False),
                              ({"run": "mine", "stage": "teacher"}, False)):
        teacher = save_checkpoint(build_model("rlfn_teacher", channels=8), tmp_path / "t.safetensors",
                                  role="teacher", training=training)  # fmt: skip
        if refused:
            with pytest.raises(ValueError, match=r"\(stage 'teacher' of run 'mine'\) than .*t\.safetensors \(stage "
                                                 r"'teacher' of run 'smoke'\)"):
                checkpoint_predictor(ta, torch.device("cpu"), teacher)
        else:
            checkpoint_predictor(ta, torch.device("cpu"), teacher)


def test_native_validation_frames_differ_from_bicubic_ones() -> None:
    eval_config = EvalConfig(cg_dev=False, rendered_val=True, rendered_native=True, rendered_frames=1,
                             rendered_size=[128, 96])  # fmt: skip
    sets = eval_sets(Config(eval=eval_config), 2)
    bicubic, native = sets["rendered-val"], sets["rendered-val-native"]
    assert [i.name for i in bicubic] == [i.name for i in native] and len(native) == 4  # one frame per preset
    for b, n in zip(bicubic, native, strict=True):
        assert torch.equal(b.hr, n.hr)  # the same HR frame
        assert torch.equal(b.lr, degrade(b.hr, 2))
        assert n.lr.shape == b.lr.shape and not torch.equal(n.lr, b.lr)  # rendered at LR size, not filtered


def test_ship_checkpoint_merges_into_the_index(tmp_path: Path) -> None:
    training = {"steps": 3, "config": {"data": {"sources": [{"kind": "scenes", "lr_kind": "native"}]}}}
    path = save_checkpoint(build_model("rlfn_s", channels=8), tmp_path / "native_student.safetensors",
                           role="student", training=training)  # fmt: skip
    mean = {"psnr_rgb": 30.0, "ssim_rgb": 0.9, "psnr_y": 31.0, "ssim_y": 0.91}
    scores = tmp_path / "scores.json"
    per_image = {"a.png": mean, "b.png": mean, "c.png": mean}
    by_model = {"bicubic": {"mean": mean}, "native_student": {"mean": mean, "per_image": per_image,
                                                              "weights_sha256": weights_sha256(path)}}
    scores.write_text(json.dumps({"rendered-val-native": by_model}))
    out = tmp_path / "weights"
    out.mkdir()
    (out / "weights.json").write_text(json.dumps({"earlier.safetensors": {"stage": "teacher"}}))

    entry = ship_checkpoint(path, "rlfn_s_native_x2", "X_s (native LR)", scores, out)
    index = json.loads((out / "weights.json").read_text())
    assert set(index) == {"earlier.safetensors", "rlfn_s_native_x2.safetensors"} and index[
        "rlfn_s_native_x2.safetensors"] == entry  # fmt: skip
    assert entry["lr_kinds"] == ["native"] and entry["metrics"] == {"rendered-val-native": mean}
    shipped = load_checkpoint(out / "rlfn_s_native_x2.safetensors")
    assert shipped.metadata["training"]["metrics"] == entry["metrics"] and shipped.metadata["training"]["steps"] == 3
    whole = {"rendered-val-native": {"images": 3, "crop": 0, "max_images": 0}}  # `evaluate` scores whole images
    assert entry["evaluation"] == whole == shipped.metadata["training"]["evaluation"]

    other = save_checkpoint(build_model("rlfn_s", channels=8), tmp_path / "unscored.safetensors", role="student",
                            training=training)  # fmt: skip
    by_model["native_student"]["weights_sha256"] = weights_sha256(other)  # the same network saved twice: scored
    scores.write_text(json.dumps({"rendered-val-native": by_model}))
    with pytest.raises(ValueError, match=r"no scores for 'unscored' .*; it has scores for 'bicubic', "
                                         r"'native_student'$"):
        ship_checkpoint(other, "x", "x", scores, out)
    relabelled = ship_checkpoint(other, "x", "x", scores, out, label="native_student")  # scored under another name
    assert relabelled["metrics"] == {"rendered-val-native": mean}

    teacher = save_checkpoint(build_model("rlfn_teacher", channels=8, blocks=2, encoder_channels=8),
                              tmp_path / "native_student.safetensors", role="teacher", training=training)  # fmt: skip
    by_model["native_student"]["weights_sha256"] = weights_sha256(teacher)
    scores.write_text(json.dumps({"rendered-val-native": by_model}))
    shipped_teacher = ship_checkpoint(teacher, "t", "t", scores, out)
    assert shipped_teacher["macs_960x540"] == count_macs(load_checkpoint(teacher).model, 1080, 1920)  # HR input
    # a name saying another family or scale (seed-run and users take the file for what its name says)
    for name, says in (("rfdn_teacher_new_x2", "starts with the family rfdn"), ("rlfn_teacher_x3", "scale x3")):
        with pytest.raises(ValueError, match=rf"--name {name}: it .*{says}, but .* holds a rlfn_teacher network x2; "
                                             r"name it after what it is, e.g. rlfn_\.\.\._x2"):
            ship_checkpoint(teacher, name, "t", scores, out)
        assert not (out / f"{name}.safetensors").exists()
    ship_checkpoint(teacher, "rlfn_teacher_new_x2", "t", scores, out)
    assert load_checkpoint(out / "rlfn_teacher_new_x2.safetensors").metadata["arch"] == "rlfn_teacher"

    bare = save_checkpoint(build_model("rlfn_s", channels=8), tmp_path / "native_student.safetensors", role="student")
    before = json.loads((out / "weights.json").read_text())
    with pytest.raises(ValueError, match="has no training config in its metadata"):
        ship_checkpoint(bare, "bare", "bare", scores, out)
    assert not (out / "bare.safetensors").exists() and json.loads((out / "weights.json").read_text()) == before


def test_ship_checkpoint_refuses_scores_of_other_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint trained again after `evaluate --json` scored it (`train --resume` with more steps) shipped with
    the old scores, matched by its file name alone; scores written without the weights' hash are refused too."""
    training = {"steps": 3, "config": {"data": {"sources": [{"kind": "folder"}]}}}
    path = save_checkpoint(build_model("rlfn_s", channels=8), tmp_path / "final.safetensors", role="student",
                           training=training)  # fmt: skip
    folder = make_image_folder(tmp_path / "images", count=1, size=(48, 64))
    scores = tmp_path / "scores.json"
    assert training_main(["evaluate", "--checkpoint", str(path), "--data", str(folder), "--json", str(scores)]) == 0
    assert json.loads(scores.read_text())["images"]["final"]["weights_sha256"] == weights_sha256(path)
    torch.manual_seed(1)
    save_checkpoint(build_model("rlfn_s", channels=8), path, role="student", training={**training, "steps": 9})
    args = ["ship-checkpoint", str(path), "--name", "s", "--report-name", "S", "--scores", str(scores), "--out",
            str(tmp_path / "out")]  # fmt: skip
    assert training_main(args) == 1
    again = rf"evaluate again: python -m training evaluate --checkpoint {path} .* --json {scores}$"
    assert re.search(rf"error: {scores} \('final'\) scored other weights than {path} holds: another checkpoint "
                     rf"scored under that label, or this one trained again since; {again}",
                     capsys.readouterr().err.strip())  # fmt: skip
    older = json.loads(scores.read_text())
    del older["images"]["final"]["weights_sha256"]
    scores.write_text(json.dumps(older))
    assert training_main(args) == 1
    assert re.search(rf"\('final'\) does not record which weights it scored .*; {again}", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def _weights_folder(folder: Path) -> Path:
    """A shipped-weights folder with a tiny RLFN x2 teacher and TA under the shipped file names."""
    folder.mkdir()
    save_checkpoint(build_model("rlfn_teacher", channels=8, blocks=2), folder / "rlfn_teacher_takdsr_x2.safetensors",
                    role="teacher", training={"steps": 1})  # fmt: skip
    save_checkpoint(build_model("rlfn_ta", channels=8), folder / "rlfn_ta_takdsr_x2.safetensors", role="ta",
                    training={"steps": 1})  # fmt: skip
    return folder


def test_seed_run_copies_shipped_guides_and_never_overwrites(tmp_path: Path) -> None:
    weights, run = _weights_folder(tmp_path / "weights"), tmp_path / "run"
    assert seed_run(run, ["teacher", "ta1"], weights_dir=weights) == {"teacher": "copied", "ta1": "copied"}
    for stage, name in (("teacher", "rlfn_teacher_takdsr_x2"), ("ta1", "rlfn_ta_takdsr_x2")):
        assert (run / stage / "final.safetensors").read_bytes() == (weights / f"{name}.safetensors").read_bytes()
    trained_here = run / "ta1" / "final.safetensors"
    trained_here.write_bytes(b"the run's own TA")
    assert seed_run(run, ["teacher", "ta1"], weights_dir=weights) == {"teacher": "kept", "ta1": "kept"}
    assert trained_here.read_bytes() == b"the run's own TA"


def test_seed_run_refuses_unknown_missing_or_foreign_files(tmp_path: Path) -> None:
    weights, run = _weights_folder(tmp_path / "weights"), tmp_path / "run"
    with pytest.raises(ValueError, match="cannot seed stage"):
        seed_run(run, ["teacher", "ta9"], weights_dir=weights)
    with pytest.raises(FileNotFoundError, match="no shipped teacher_continuous for rlfn x2"):
        seed_run(run, ["teacher", "teacher_continuous"], weights_dir=weights)
    # (a researcher seeding a family of their own was not told of --weights)
    with pytest.raises(FileNotFoundError, match=r"no shipped teacher for pan x2: .* does not exist \(the bundled "
                                                r"weights are RLFN x2; for others, --weights names a folder"):
        seed_run(run, ["teacher"], weights_dir=weights, family="pan")
    (weights / "rlfn_ta_takdsr_x2.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        seed_run(run, ["teacher", "ta1"], weights_dir=weights)
    assert not run.exists()  # every file is checked before the first copy


def test_seed_run_command_line(tmp_path: Path) -> None:
    weights, run = _weights_folder(tmp_path / "weights"), tmp_path / "run"
    command = [sys.executable, "-m", "training", "seed-run", str(run), "--weights", str(weights), "--stages"]
    seeded = subprocess.run([*command, "teacher"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert seeded.returncode == 0 and f"{run / 'teacher'}: copied" in seeded.stdout, seeded.stderr
    wrong = subprocess.run([*command, "student_x"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 1 and "error: cannot seed stage(s) ['student_x']" in wrong.stderr


def test_checkpoint_labels_are_unique_and_short() -> None:
    paths = [Path("runs/a/student/final.safetensors"), Path("runs/b/student/final.safetensors"),
             Path("runs/a/ta1/final.safetensors"), Path("models/weights/rlfn_s_takdsr_x2.safetensors")]  # fmt: skip
    labels = unique_labels(paths)
    assert list(labels) == ["a/student/final", "b/student/final", "ta1/final", "rlfn_s_takdsr_x2"]
    assert list(labels.values()) == paths
    nested = unique_labels([Path("final.safetensors"), Path("x/final.safetensors")])
    assert list(nested) == ["final", "x/final"]  # a path with no folders left is named by itself
    suffixes = unique_labels([Path("plain/mine.safetensors"), Path("plain/mine.bak")])
    assert list(suffixes) == ["plain/mine.safetensors", "plain/mine.bak"]  # only the suffix tells them apart
    with pytest.raises(ValueError, match="given twice"):
        unique_labels([Path("x/final.safetensors"), Path("x/../x/final.safetensors")])


def test_scores_table_merges_files_and_names_rows(tmp_path: Path) -> None:
    def mean(psnr: float) -> dict:
        return {"mean": {"psnr_rgb": psnr, "ssim_rgb": 0.9, "psnr_y": psnr + 1, "ssim_y": 0.95}}

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"cg-dev": {"bicubic": mean(30), "run/student": mean(31.5)}}))
    second.write_text(json.dumps({"cg-dev": {"bicubic": mean(30), "run/ta1": mean(33.25)}}))
    script = [sys.executable, str(REPO / "scripts" / "scores_table.py"), str(first), str(second)]
    result = subprocess.run([*script, "--rows", "run/ta1=TA,run/student=Student"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2:] == ["| TA | 33.25 / 0.9000 / 34.25 / 0.9500 |",
                                              "| Student | 31.50 / 0.9000 / 32.50 / 0.9500 |"]  # fmt: skip
    missing = subprocess.run([*script, "--rows", "nope=X"], capture_output=True, text=True)
    assert missing.returncode != 0 and "nope" in missing.stderr
    twice = subprocess.run([*script, str(first)], capture_output=True, text=True)
    assert twice.returncode != 0 and "scored twice" in twice.stderr
    second.write_text(json.dumps({"cg-dev": {"bicubic": mean(30), "run/ta1": mean(33.25), "run/student": mean(31)}}))
    bars = subprocess.run([*script[:2], str(second), "--rows", "bicubic=B,run/ta1=TA", "--plot",
                           str(tmp_path / "bars.png")], capture_output=True, text=True)  # fmt: skip
    assert bars.returncode == 0, bars.stderr
    assert (tmp_path / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_table_reads_pipeline_results_with_the_run_as_prefix(tmp_path: Path) -> None:
    def mean(psnr: float) -> dict:
        return {"mean": {"psnr_rgb": psnr, "ssim_rgb": 0.9, "psnr_y": psnr + 1, "ssim_y": 0.95}, "per_image": {}}

    for run, psnr in (("rfdn", 31.0), ("pan", 32.0)):
        (tmp_path / run).mkdir()
        results = {"scale": 2, "models": {}, "sets": {"cg-dev": {"images": ["a"], "scores": {
            "bicubic": mean(30), "TAKDSR": mean(psnr)}}}}  # fmt: skip
        (tmp_path / run / "results.json").write_text(json.dumps(results))
    files = [str(tmp_path / run / "results.json") for run in ("rfdn", "pan")]
    script = [sys.executable, str(REPO / "scripts" / "scores_table.py"), *files,
              "--rows", "bicubic=B,pan/TAKDSR=PAN,rfdn/TAKDSR=RFDN"]  # fmt: skip
    result = subprocess.run(script, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert [line.split(" | ")[0] for line in result.stdout.splitlines()[2:]] == ["| B", "| PAN", "| RFDN"]
    assert "| PAN | 32.00 /" in result.stdout

    info = json.loads((tmp_path / "pan" / "results.json").read_text())
    info["models"]["TAKDSR"] = {"params": 45103, "macs": 46.69e9, "training": {"steps": 1500, "seconds": 978.4},
                                "latency": {"median_ms": 812.3, "device": "cpu"}}  # fmt: skip
    (tmp_path / "pan" / "results.json").write_text(json.dumps(info))
    with_info = subprocess.run([*script, "--info"], capture_output=True, text=True)
    assert with_info.returncode == 0, with_info.stderr
    lines = with_info.stdout.splitlines()
    assert lines[0] == "| model | params | GMACs | steps | train s | ms at 960x540 | cg-dev |"
    assert lines[3].startswith("| PAN | 45,103 | 46.7 | 1500 | 978 | 812 (cpu) | 32.00 /")
    assert lines[2].startswith("| B | - | - | - | - | - | 30.00 /")


def test_cf_probe_switches_the_cf_kind_and_describes_the_cf(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", count=2, size=(48, 64))
    paths = []
    for discrete in (True, False):
        torch.manual_seed(int(discrete))
        teacher = build_model("rlfn_teacher", channels=8, blocks=2, encoder_channels=8, discrete=discrete)
        paths.append(save_checkpoint(teacher, tmp_path / f"teacher_{discrete}.safetensors", role="teacher"))
    output = tmp_path / "probe.json"
    script = [sys.executable, str(REPO / "scripts" / "cf_probe.py"), "--data", str(folder)]
    result = subprocess.run([*script, *map(str, paths), "--json", str(output)], cwd=REPO, capture_output=True,
                            text=True, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr
    probes = json.loads(output.read_text())
    assert [probe["discrete"] for probe in probes] == [True, False]
    for probe in probes:
        mean = probe["mean"]
        assert probe["images"] == 2
        assert mean["as_trained"]["psnr_rgb"] != mean["switched"]["psnr_rgb"]  # the kind did change the input
        assert 0 <= mean["cf"]["share_outside_0_1"] <= 1 and 0 <= mean["cf"]["mean_distance_to_level"] <= 0.5
        assert 1 <= mean["cf"]["levels_used_per_channel"] <= 256
        assert mean["decoder_on_lr"]["psnr_rgb"] != mean["as_trained"]["psnr_rgb"]  # X, not CF', went in
        assert 0 < mean["cf"]["side_information_bits"] <= 9  # CF' - X spans at most 511 levels
    assert "| teacher_True | discrete |" in result.stdout

    student = save_checkpoint(build_model("rlfn_s", channels=8), tmp_path / "student.safetensors", role="student")
    refused = subprocess.run([*script, str(student)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert refused.returncode != 0 and "is not a teacher checkpoint" in refused.stderr


def test_cf_side_information_is_the_entropy_of_the_level_differences() -> None:
    entropy_bits = load_script(REPO / "scripts" / "cf_probe.py").difference_entropy_bits
    lr = torch.full((1, 3, 4, 4), 100 / 255)
    assert entropy_bits(lr.clone(), lr) == 0.0  # CF' = X carries nothing more
    cf_prime = lr.clone()
    cf_prime[..., :2, :] += 3 / 255  # half the values 3 levels up: one bit per value
    assert entropy_bits(cf_prime, lr) == pytest.approx(1.0)
    cf_prime[..., :1, :] -= 4 / 255  # a quarter each at +3 and -1 levels, half at 0: 1.5 bits
    assert entropy_bits(cf_prime, lr) == pytest.approx(1.5)


def test_rendered_validation_frames_are_cut_to_a_multiple_of_the_scale() -> None:
    """1920x1080 is no multiple of 4: an x4 pipeline trained every stage, then failed to render its validation set
    ("scene frame ... is not a multiple of scale 4"). The frames are rendered at the size cut down, as folder images
    are cropped."""
    config = Config(eval=EvalConfig(cg_dev=False, rendered_val=True, rendered_native=True, rendered_size=[70, 42],
                                    rendered_frames=1, folders=[]))
    for name, images in eval_sets(config, 4).items():
        assert images and all(tuple(image.hr.shape[1:]) == (40, 68) for image in images), name
        assert all(tuple(image.lr.shape[1:]) == (10, 17) for image in images), name


def test_scores_table_compares_two_models_image_by_image(tmp_path: Path) -> None:
    def scored(per_image: dict[str, float]) -> dict:
        psnr = sum(per_image.values()) / len(per_image)
        return {"mean": {"psnr_rgb": psnr, "ssim_rgb": 0.9, "psnr_y": psnr, "ssim_y": 0.9},
                "per_image": {name: {"psnr_rgb": value} for name, value in per_image.items()}}  # fmt: skip

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"cg-dev": {"run/a": scored({"x": 31.0, "y": 30.0, "z": 40.0})},
                                 "val": {"run/a": scored({"v": 20.0})}}))  # fmt: skip
    # b has one image a lacks (left out of the comparison) and no "val" set (that set is not compared)
    second.write_text(json.dumps({"cg-dev": {"other/b": scored({"x": 30.0, "y": 30.5, "z": 39.0, "w": 1.0})}}))
    script = [sys.executable, str(REPO / "scripts" / "scores_table.py"), str(first), str(second)]
    result = subprocess.run([*script, "--versus", "run/a", "other/b"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    comparison = result.stdout.split("\n\n")[1].splitlines()
    # differences +1.0, -0.5, +1.0 over the three common images: mean +0.5, a ahead on two
    assert comparison[2:] == ["| run/a | other/b | cg-dev | +0.500 dB | 2 of 3 |"]
    unknown = subprocess.run([*script, "--versus", "run/a", "nope"], capture_output=True, text=True)
    assert unknown.returncode == 1 and "no scores for ['nope']" in unknown.stderr and not unknown.stdout
    second.write_text(json.dumps({"val": {"other/b": {"mean": scored({"q": 1.0})["mean"]}}}))
    no_images = subprocess.run([*script, "--versus", "run/a", "other/b"], capture_output=True, text=True)
    assert no_images.returncode == 1 and "no per-image scores of both on val" in no_images.stderr
    second.write_text(json.dumps({"other": {"other/b": scored({"v": 1.0})}}))
    apart = subprocess.run([*script, "--versus", "run/a", "other/b"], capture_output=True, text=True)
    assert apart.returncode == 1 and "no evaluation set scores both" in apart.stderr
    broken = scored({"x": 1.0})
    broken["per_image"]["x"] = {"ssim_rgb": 0.9}  # a hand-edited file: no PSNR where one is compared
    second.write_text(json.dumps({"cg-dev": {"other/b": broken}}))
    no_psnr = subprocess.run([*script, "--versus", "run/a", "other/b"], capture_output=True, text=True)
    assert no_psnr.returncode == 1 and "per-image scores without a PSNR RGB: ['x']" in no_psnr.stderr

"""Runs and files a researcher did not make carefully: a rerun over an interrupted run, a pipeline resumed with
another config, a failed resume, guides that cannot teach the network, tampered states, checkpoints and score
files. Each must end in one clear error that names the file, with nothing lost."""

from __future__ import annotations

import dataclasses
import fcntl
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import CheckpointError, build_model, load_checkpoint, save_checkpoint, weights_sha256
from training.__main__ import main as training_main
from training.config import StageConfig, dump_toml, load_config
from training.data.images import DatasetError, SkippedFilesWarning, scan_images
from training.pipeline import run_pipeline
from training.report import write_report
from training.ship import seed_run, ship_checkpoint, ship_run
from training.trainer import FORCE_AFTER_S, LOCK_FILE, TrainingInterrupted, _Trainer, read_state, train_stage

from training_utils import make_image_folder, stop_at_step, tiny_config


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def _stage_config(folder: Path, role: str, **stage: object):
    return dataclasses.replace(tiny_config(folder), stage=StageConfig(name=role, role=role, **stage))


@pytest.fixture
def stop_at_step_3(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run in the test sets the Ctrl-C flag after its third step, as SIGINT does."""
    stop_at_step(monkeypatch, 3)


def test_a_fresh_run_never_starts_over_a_saved_one(image_folder: Path, tmp_path: Path, stop_at_step_3: None) -> None:
    config, run = _stage_config(image_folder, "teacher"), tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train_stage(config, run)
    saved = {name: (run / name).read_bytes() for name in ("state.pt", "metrics.jsonl", "config.toml")}
    with pytest.raises(FileExistsError, match=r"holds an interrupted run \(state\.pt\).*--resume"):
        train_stage(config, run)  # the same command again, without --resume
    assert {name: (run / name).read_bytes() for name in saved} == saved  # nothing of the interrupted run changed


def test_a_finished_run_is_not_overwritten_by_the_cli(image_folder: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    train_stage(_stage_config(image_folder, "student"), run)
    final = (run / "final.safetensors").read_bytes()
    config = tmp_path / "config.toml"
    config.write_text((run / "config.toml").read_text())
    assert training_main(["train", "--config", str(config), "--run-dir", str(run)]) == 1
    error = capsys.readouterr().err
    assert "holds a finished run (final.safetensors): choose another --run-dir" in error
    assert f"train --resume {run}` with --set optim.steps=N (more steps)" in error
    (run / "state.pt").unlink()  # final weights alone (shipped, or copied): nothing to resume, and none suggested
    assert training_main(["train", "--config", str(config), "--run-dir", str(run)]) == 1
    assert "--resume" not in capsys.readouterr().err
    assert (run / "final.safetensors").read_bytes() == final


def test_train_refuses_a_pipelines_run_folder(image_folder: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`train --run-dir runs/p5`, a pipeline's folder, trained there and replaced the config.toml it evaluates with."""
    config = tiny_config(image_folder, experiment={"baselines": True}, optim={"steps": 2})
    run = tmp_path / "run"
    run_pipeline(config, run, ["student_alone"])  # a run trained with --stages: no results.json yet
    command = ["train", "--config", str(_toml(config, tmp_path)), "--run-dir", str(run)]
    assert training_main(command) == 1
    assert (f"{run} holds a pipeline run (student_alone/): choose another --run-dir, or a stage folder in it such as "
            f"{run / 'stage'}") in capsys.readouterr().err
    (run / "config.toml").write_text("the pipeline's")
    (run / "results.json").write_text("{}")
    assert training_main(command) == 1
    assert "holds a pipeline run (results.json, student_alone/)" in capsys.readouterr().err
    assert (run / "config.toml").read_text() == "the pipeline's"
    assert not (run / "metrics.jsonl").exists()


def test_a_pipeline_and_seed_run_refuse_a_stage_folder(image_folder: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """From a researcher's walkthrough: `pipeline --run-dir` on a `train` folder wrote its config.toml over the
    stage's, which then could be neither resumed nor exported; `seed-run` put stage folders into it."""
    run = tmp_path / "stage"
    config = _stage_config(image_folder, "student")
    train_stage(config, run)
    stage_config = (run / "config.toml").read_text()
    pipeline = tiny_config(image_folder, optim={"steps": 2})
    bundled = Path(__file__).parents[1] / "models" / "weights"
    calls = (lambda: run_pipeline(pipeline, run, ["student_alone"]), lambda: run_pipeline(pipeline, run),
             lambda: seed_run(run, ["teacher"], weights_dir=bundled))  # fmt: skip
    for call in calls:
        with pytest.raises(FileExistsError, match=rf"{run} is one stage's folder \(it holds state.pt, "
                                                  r"final.safetensors\), not a pipeline's run folder"):
            call()
    assert (run / "config.toml").read_text() == stage_config and not (run / "teacher").exists()
    (run / "final.safetensors").unlink()  # interrupted: the state alone
    assert training_main(["pipeline", "--config", str(_toml(pipeline, tmp_path)), "--run-dir", str(run)]) == 1
    assert "is one stage's folder (it holds state.pt)" in capsys.readouterr().err
    train_stage(dataclasses.replace(config, optim=dataclasses.replace(config.optim, steps=8)), run, resume=True)


def test_train_resume_takes_the_config_kept_in_the_state_when_config_toml_is_gone(
        image_folder: Path, tmp_path: Path, stop_at_step_3: None, capsys: pytest.CaptureFixture[str]) -> None:
    """From a researcher's walkthrough: the pipeline and export-state read the copy a state.pt keeps, and the
    pipeline's refusal named `train --resume`, which said "nothing to resume: .../config.toml does not exist"."""
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train_stage(_stage_config(image_folder, "student"), run)
    (run / "config.toml").unlink()
    assert training_main(["train", "--resume", str(run), "--set", "optim.steps=5"]) == 0
    said = capsys.readouterr().out
    assert f"note: {run / 'config.toml'} does not exist: resuming with the config kept in {run / 'state.pt'}" in said
    assert read_state(run / "state.pt", torch.device("cpu"))["step"] == 5
    assert (run / "config.toml").is_file()  # written again, as every resume writes it
    (run / "config.toml").unlink()
    (run / "state.pt").unlink()
    assert training_main(["train", "--resume", str(run)]) == 1
    assert "nothing to resume: " in capsys.readouterr().err


def test_options_the_command_would_ignore_are_refused(image_folder: Path, tmp_path: Path, stop_at_step_3: None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """From a researcher's walkthrough: `train --resume A --run-dir B` went on in A without a word, and `pipeline
    --set stage.steps=3` trained every stage for optim.steps."""
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train_stage(_stage_config(image_folder, "student"), run)
    state = (run / "state.pt").read_bytes()
    assert training_main(["train", "--resume", str(run), "--run-dir", str(tmp_path / "branch")]) == 1
    assert f"--run-dir {tmp_path / 'branch'} does not apply" in capsys.readouterr().err
    assert (run / "state.pt").read_bytes() == state and not (tmp_path / "branch").exists()
    config = _toml(tiny_config(image_folder), tmp_path)
    assert training_main(["pipeline", "--config", str(config), "--run-dir", str(tmp_path / "p"), "--stages", "teacher",
                          "--set", "stage.steps=3", "--set", "stage.role=student"]) == 1  # fmt: skip
    assert "--set stage.steps, stage.role: the [stage] table is for `train`" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    # the drivers pass the same folder as both (scripts/ablations_cpu.sh): that goes on
    assert training_main(["train", "--resume", str(run), "--run-dir", str(run), "--set", "optim.steps=5"]) == 0
    capsys.readouterr()
    # a stage named twice is trained once, and said once (it said "finished teacher, teacher")
    assert training_main(["pipeline", "--config", str(config), "--run-dir", str(tmp_path / "p"), "--stages",
                          "teacher,teacher", "--set", "optim.steps=2"]) == 0  # before the fixture's stop at 3
    assert f"finished teacher in {tmp_path / 'p'}" in capsys.readouterr().out


def test_more_threads_than_cores_are_noted(image_folder: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """From a researcher's walkthrough: runtime.threads=100 on 2 cores was taken without a word (12 steps: 100 s)."""
    config = _stage_config(image_folder, "student")
    too_many = len(os.sched_getaffinity(0)) + 1
    threads_before = torch.get_num_threads()
    try:
        train_stage(dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, threads=too_many)),
                    tmp_path / "many")  # fmt: skip
        assert f"note: runtime.threads={too_many} is more than the" in capsys.readouterr().out
        train_stage(config, tmp_path / "one")  # threads = 1
        assert "runtime.threads" not in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads_before)


def test_shipping_a_stage_part_way_says_so(image_folder: Path, tmp_path: Path, stop_at_step_3: None,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """From a researcher's walkthrough: ship-checkpoint of a snapshot or an exported state shipped it without a word,
    and weights.json left out that it was a stage part-way (the file's own metadata has partial_of)."""
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train_stage(_stage_config(image_folder, "student"), run)
    part = tmp_path / "part.safetensors"
    assert training_main(["export-state", str(run), "--out", str(part)]) == 0
    scores = tmp_path / "scores.json"
    assert training_main(["evaluate", "--checkpoint", str(part), "--data", str(image_folder), "--json",
                          str(scores)]) == 0  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "weights"
    assert training_main(["ship-checkpoint", str(part), "--name", "part", "--report-name", "Part", "--scores",
                          str(scores), "--out", str(out)]) == 0  # fmt: skip
    assert f"warning: {part} is a stage part-way, at step 3 of 6" in capsys.readouterr().err
    assert json.loads((out / "weights.json").read_text())["part.safetensors"]["training"]["partial_of"] == 6


def test_resuming_a_finished_run_without_more_steps_is_refused(image_folder: Path, tmp_path: Path) -> None:
    config = _stage_config(image_folder, "student")
    config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, checkpoint_every=3))
    run = tmp_path / "run"
    train_stage(config, run)
    final = (run / "final.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"finished run .*--resume .* --set optim\.steps=N"):
        train_stage(config, run)
    with pytest.raises(ValueError, match=r"finished at step 6 of 6: .*--set optim\.steps=N"):
        train_stage(config, run, resume=True)  # would only rewrite final.safetensors, with no final loss
    assert (run / "final.safetensors").read_bytes() == final
    longer = dataclasses.replace(config, optim=dataclasses.replace(config.optim, steps=8))
    assert train_stage(longer, run, resume=True).steps == 8  # more steps: it goes on


def test_resuming_an_unfinished_run_with_fewer_steps_than_it_did_is_refused(image_folder: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped at step 4 of 6, resumed with optim.steps=2: it "finished" at once, with the final checkpoint taken
    mid-schedule (lr not decayed) and no word about it (a review)."""
    config = _stage_config(image_folder, "student")
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        stop_at_step(patch, 4)
        with pytest.raises(TrainingInterrupted):
            train_stage(config, run)
    state = (run / "state.pt").read_bytes()
    fewer = dataclasses.replace(config, optim=dataclasses.replace(config.optim, steps=2))
    with pytest.raises(ValueError, match=rf"{run} is at step 4, past the 2 steps this config gives it \(optim\.steps\):"
                                         r" .* give it more than 4 steps, or .* export-state"):
        train_stage(fewer, run, resume=True)
    assert (run / "state.pt").read_bytes() == state and not (run / "final.safetensors").exists()
    assert train_stage(config, run, resume=True).steps == 6  # its own steps: it goes on


def test_a_run_that_ended_between_saves_or_by_its_budget_is_finished(image_folder: Path, tmp_path: Path) -> None:
    """7 steps, a state every 3: the last state was step 6, so a resume trained step 7 again and rewrote the final
    checkpoint; a run its time budget ended was told to add steps, which changed nothing."""
    config = _stage_config(image_folder, "student")
    odd = dataclasses.replace(config, optim=dataclasses.replace(config.optim, steps=7),
                              runtime=dataclasses.replace(config.runtime, checkpoint_every=3))  # fmt: skip
    train_stage(odd, tmp_path / "odd")
    assert torch.load(tmp_path / "odd" / "state.pt", weights_only=True)["step"] == 7
    with pytest.raises(ValueError, match="finished at step 7 of 7"):
        train_stage(odd, tmp_path / "odd", resume=True)
    budget = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, time_budget_s=1e-6))
    assert train_stage(budget, tmp_path / "budget").steps == 1
    with pytest.raises(ValueError, match=r"finished at step 1 of 6: .*runtime\.time_budget_s=S \(more seconds\)"):
        train_stage(budget, tmp_path / "budget", resume=True)


def test_a_failed_resume_keeps_the_runs_config(image_folder: Path, tmp_path: Path, stop_at_step_3: None,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train_stage(_stage_config(image_folder, "student"), run)
    saved = (run / "config.toml").read_text()
    missing = tmp_path / "no" / "such" / "folder"
    code = training_main(["train", "--resume", str(run), "--set",
                          f'data.sources=[{{kind="folder", path="{missing}"}}]'])  # fmt: skip
    assert code == 1 and "does not exist" in capsys.readouterr().err
    assert (run / "config.toml").read_text() == saved  # a plain --resume still works
    assert load_config(run / "config.toml").data.sources[0].path == str(image_folder)


def test_a_pipeline_resumes_a_stage_only_with_the_config_it_started_with(
    image_folder: Path, tmp_path: Path, stop_at_step_3: None
) -> None:
    config = tiny_config(image_folder, experiment={"baselines": True}, optim={"steps": 6})
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        run_pipeline(config, run, ["student_alone"])
    state = (run / "student_alone" / "state.pt").read_bytes()
    other = dataclasses.replace(config, optim=dataclasses.replace(config.optim, lr=1e-2),
                                data=dataclasses.replace(config.data, patch_size=64))  # fmt: skip
    with pytest.raises(ValueError, match=r"student_alone .* another config \(data\.patch_size, optim\.lr\)"):
        run_pipeline(other, run, ["student_alone"])
    assert (run / "student_alone" / "state.pt").read_bytes() == state
    # how it runs may change (here the log interval), and the keys that shape other stages: the stage goes on
    relaxed = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, log_every=2),
                                  experiment=dataclasses.replace(config.experiment, full_reference=True))
    run_pipeline(relaxed, run, ["student_alone"])
    assert load_checkpoint(run / "student_alone" / "final.safetensors").metadata["training"]["steps"] == 6


def test_a_pipeline_resume_and_kept_line_ignore_the_keys_the_stage_never_reads(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A teacher stopped by SIGTERM, rerun with `--set experiment.student_blocks=2`, was refused as started with
    another config, and a finished one was called trained with other values, though neither key reaches it."""
    config = tiny_config(image_folder, experiment={"baselines": False, "teacher_blocks": 3}, optim={"steps": 6})
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)
        with pytest.raises(TrainingInterrupted):
            run_pipeline(config, run, ["teacher"])
    others = dataclasses.replace(
        config, experiment=dataclasses.replace(config.experiment, student_blocks=2, ta_blocks=[2], mix=[0.5, 0.5]),
        loss=dataclasses.replace(config.loss, feature=1e-3, output=0.5))  # fmt: skip
    imitation = dataclasses.replace(others, loss=dataclasses.replace(others.loss, imitation=0.5))
    with pytest.raises(ValueError, match=r"teacher .* another config \(loss\.imitation\)"):  # one it reads
        run_pipeline(imitation, run, ["teacher"])
    run_pipeline(others, run, ["teacher"])
    assert load_checkpoint(run / "teacher" / "final.safetensors").metadata["training"]["steps"] == 6
    capsys.readouterr()
    run_pipeline(config, run, ["teacher"])  # the keys changed back: the finished teacher is still as good
    assert f"teacher: kept, finished before in {run / 'teacher'}\n" in capsys.readouterr().out
    with monkeypatch.context() as patch:  # a TA does not read student_blocks, but reads its mix
        stop_at_step(patch, 3)
        with pytest.raises(TrainingInterrupted):
            run_pipeline(config, run, ["ta1"])
    mix = dataclasses.replace(config, experiment=dataclasses.replace(config.experiment, mix=[0.5, 0.5]))
    with pytest.raises(ValueError, match=r"ta1 .* another config \(experiment\.mix\)"):
        run_pipeline(mix, run, ["ta1"])
    student_blocks = dataclasses.replace(config, experiment=dataclasses.replace(config.experiment, student_blocks=2))
    run_pipeline(student_blocks, run, ["ta1"])
    assert load_checkpoint(run / "ta1" / "final.safetensors").metadata["training"]["steps"] == 6


def test_a_pipeline_names_the_keys_that_set_a_stages_steps_and_blocks(image_folder: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A teacher stopped at step 4, rerun with experiment.teacher_steps=2, was refused as started with another config
    "(stage.steps)": a key that no pipeline config or --set holds (a review). A TA's blocks, the same. And the same
    schedule spelt the other way (optim.steps=6 for teacher_steps=6) was refused too."""
    config = tiny_config(image_folder, experiment={"baselines": False, "teacher_steps": 6, "ta_blocks": [2]},
                         optim={"steps": 5})  # fmt: skip
    run = tmp_path / "run"
    other = dataclasses.replace(config, experiment=dataclasses.replace(config.experiment, teacher_steps=2,
                                                                       ta_blocks=[1]))  # fmt: skip
    spelt_otherwise = dataclasses.replace(config, experiment=dataclasses.replace(config.experiment, teacher_steps=0),
                                          optim=dataclasses.replace(config.optim, steps=6))  # fmt: skip
    for stage, named in (("teacher", r"experiment\.teacher_steps"), ("ta1", r"experiment\.ta_blocks")):
        with monkeypatch.context() as patch:
            stop_at_step(patch, 4)
            with pytest.raises(TrainingInterrupted):
                run_pipeline(config, run, [stage])
        with pytest.raises(ValueError, match=rf"stage {stage} .* another config \({named}\)"):
            run_pipeline(other, run, [stage])
        if stage == "teacher":  # the TA starts from it
            run_pipeline(spelt_otherwise, run, ["teacher"])
            assert load_checkpoint(run / "teacher" / "final.safetensors").metadata["training"]["steps"] == 6


def test_a_pipeline_that_fails_before_training_leaves_no_run_folder(image_folder: Path, tmp_path: Path) -> None:
    """A pipeline on a folder with no usable image stopped with a clear error, but left RUN_DIR/config.toml (and
    the folders made for it) behind, a run folder with nothing trained (a review); `train` left none."""
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    config = tiny_config(image_folder, data={"sources": [{"kind": "folder", "path": str(junk)}]},
                         eval={"folders": [str(image_folder)]})  # fmt: skip
    run = tmp_path / "new" / "run"
    with pytest.warns(SkippedFilesWarning), pytest.raises(DatasetError, match="no usable image"):
        run_pipeline(config, run)
    assert not (tmp_path / "new").exists()
    with pytest.raises(FileNotFoundError, match="train those stages first"):  # a partial run: no config.toml
        run_pipeline(config, run, ["ta1"])
    assert not (tmp_path / "new").exists()
    run.mkdir(parents=True)  # a folder of the user's stays, with what they put there
    with pytest.warns(SkippedFilesWarning), pytest.raises(DatasetError):
        run_pipeline(config, run)
    assert sorted(p.name for p in run.iterdir()) == ["config.toml"]


def test_a_pipeline_checks_every_interrupted_stage_before_it_trains_any(
    image_folder: Path, tmp_path: Path, stop_at_step_3: None
) -> None:
    """The refusal used to come when the loop reached the stage: after the run's config.toml was replaced and the
    stages before it were trained under the new config."""
    config = tiny_config(image_folder, experiment={"baselines": True}, optim={"steps": 6},
                         eval={"latency_repeats": 0, "crops_for_figure": 0})  # fmt: skip
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        run_pipeline(config, run, ["student_alone"])
    (run / "student_alone" / "config.toml").unlink()  # put back as the GPU scripts bring it: the state alone
    budgeted = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, time_budget_s=300.0))
    with pytest.raises(ValueError, match=r"student_alone .* another config \(runtime\.time_budget_s\)"):
        run_pipeline(budgeted, run)
    assert sorted(p.name for p in run.iterdir()) == ["student_alone"]  # nothing trained, no config.toml written


def test_a_pipeline_resumes_its_stage_from_a_moved_run_folder(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guides' paths are made from the run folder: named from elsewhere, or moved, it is the same run."""
    config = tiny_config(image_folder, experiment={"baselines": False}, optim={"steps": 6})
    monkeypatch.chdir(tmp_path)
    run_pipeline(config, Path("run"), ["teacher"])  # relative, from tmp_path
    with monkeypatch.context() as patch:
        stop_at_step(patch, 3)
        with pytest.raises(TrainingInterrupted):
            run_pipeline(config, Path("run"), ["ta1"])
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    (tmp_path / "run").rename(moved)
    monkeypatch.chdir(moved)  # where the saved relative paths name nothing
    run_pipeline(config, moved, ["ta1"])  # absolute now, and the folder moved
    assert load_checkpoint(moved / "ta1" / "final.safetensors").metadata["training"]["steps"] == 6


def test_guides_and_teachers_that_cannot_teach_the_network_are_named(image_folder: Path, tmp_path: Path) -> None:
    teacher = str(save_checkpoint(build_model("rlfn_teacher", channels=8, blocks=2, encoder_channels=8),
                                  tmp_path / "t8.safetensors", role="teacher"))  # fmt: skip
    teacher_x3 = str(save_checkpoint(build_model("rlfn_teacher", channels=8, blocks=2, encoder_channels=8, scale=3),
                                     tmp_path / "t3.safetensors", role="teacher"))  # fmt: skip
    wide = _stage_config(image_folder, "student", guides=[teacher])
    wide = dataclasses.replace(wide, experiment=dataclasses.replace(wide.experiment, channels=16))
    with pytest.raises(ValueError, match=r"guide .*t8\.safetensors has 8 feature channels and the network .* 16"):
        train_stage(wide, tmp_path / "wide")
    with pytest.raises(ValueError, match=r"guide .*t3\.safetensors upscales x3, the experiment x2"):
        train_stage(_stage_config(image_folder, "student", guides=[teacher_x3]), tmp_path / "x3")
    with pytest.raises(ValueError, match=r"init_from .*t3\.safetensors upscales x3, the experiment x2"):
        train_stage(_stage_config(image_folder, "student", init_from=teacher_x3), tmp_path / "init")
    assert not any((tmp_path / name).exists() for name in ("wide", "x3", "init"))


def test_evaluate_refuses_a_teacher_of_another_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ta = save_checkpoint(build_model("rlfn", channels=8, blocks=1), tmp_path / "ta.safetensors", role="ta",
                         training={"mix": [0.3, 0.7]})  # fmt: skip
    teacher = save_checkpoint(build_model("rlfn_teacher", channels=8, blocks=2, encoder_channels=8, scale=3),
                              tmp_path / "t3.safetensors", role="teacher")  # fmt: skip
    code = training_main(["evaluate", "--checkpoint", str(ta), "--teacher", str(teacher), "--data", str(tmp_path)])
    assert code == 1 and "upscale by different factors [2, 3]" in capsys.readouterr().err


def test_evaluate_refuses_a_teacher_the_ta_was_not_trained_with(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`evaluate --checkpoint TA --teacher OTHER` scored quietly with the other teacher's CF' (23.44 dB against 26.27
    with its own). A TA records its teacher's weights in training.inputs_sha256 (init_from, then the guides)."""
    images = make_image_folder(tmp_path / "images", count=1, size=(64, 64))
    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        teachers.append(save_checkpoint(build_model("rlfn_teacher", channels=8, blocks=2, encoder_channels=8),
                                        tmp_path / f"teacher{seed}.safetensors", role="teacher"))  # fmt: skip
    own, other = teachers
    training = {"mix": [0.3, 0.7], "guides": ["teacher"], "inputs_sha256": [weights_sha256(own)] * 2}
    ta = save_checkpoint(build_model("rlfn", channels=8, blocks=1), tmp_path / "ta.safetensors", role="ta",
                         training=training)  # fmt: skip
    args = ["evaluate", "--checkpoint", str(ta), "--data", str(images), "--teacher"]
    assert training_main([*args, str(other)]) == 1
    assert re.search(rf"error: {ta} is a TA trained with another teacher \('teacher', weights sha256 "
                     rf"{weights_sha256(own)[:12]}\.\.\.\) than {other} \(sha256 {weights_sha256(other)[:12]}",
                     capsys.readouterr().err)  # fmt: skip
    assert training_main([*args, str(own)]) == 0
    older = save_checkpoint(build_model("rlfn", channels=8, blocks=1), tmp_path / "older.safetensors", role="ta",
                            training={"mix": [0.3, 0.7]})  # a TA that recorded no hash: scored as before
    assert training_main(["evaluate", "--checkpoint", str(older), "--data", str(images), "--teacher", str(other)]) == 0
    assert training_main(["evaluate", "--checkpoint", str(older), "--data", str(images)]) == 1
    assert "needs its teacher's checkpoint (--teacher FILE)" in capsys.readouterr().err


def _saved_state(tmp_path: Path, image_folder: Path) -> tuple[Path, dict]:
    config = _stage_config(image_folder, "teacher")
    config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, checkpoint_every=2))
    run = tmp_path / "run"
    train_stage(config, run)
    (run / "final.safetensors").unlink()  # as if stopped after its last save
    return run, torch.load(run / "state.pt", weights_only=True)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def _with_moments(optimizer_state: dict, moment: torch.Tensor) -> dict:
    """Adam's saved state with every exp_avg replaced by `moment`."""
    moments = {index: {**entry, "exp_avg": moment} for index, entry in optimizer_state["state"].items()}
    return {**optimizer_state, "state": moments}


def test_tampered_training_states_are_refused_in_one_line(image_folder: Path, tmp_path: Path) -> None:
    run, state = _saved_state(tmp_path, image_folder)
    config = load_config(run / "config.toml")
    cases = {
        "pickled": {**state, "model": _Exploit()},
        "negative step": {**state, "step": -4},
        "bad generator": {**state, "torch_rng": torch.zeros(3)},
        "another network": {**state, "model": {f"network.other{i}": torch.zeros(2) for i in range(300)}},
        # each went on, or failed later with no file named: an int64 network was cast to weights, Adam's moments
        # of another shape failed the next step with a broadcast traceback, seconds failed float() unnamed
        "integer weights": {**state, "model": {k: v.to(torch.int64) for k, v in state["model"].items()}},
        "moments of another shape": {**state, "optimizer": _with_moments(state["optimizer"], torch.zeros(3))},
        "seconds as text": {**state, "seconds": "abc"},
        "negative budget spent": {**state, "budget_spent": -1.0},
        "seconds past any float": {**state, "seconds": 10**400},  # OverflowError in math.isfinite: a traceback
    }
    for case, tampered in cases.items():
        torch.save(tampered, run / "state.pt")
        with pytest.raises(ValueError) as caught:
            train_stage(config, run, resume=True)
        message = str(caught.value)
        assert str(run / "state.pt") in message and "\n" not in message and len(message) < 400, (case, message)
        assert "weights_only" not in message, case  # torch's advice to unpickle is not passed on
    torch.save({**state, "step": True}, run / "state.pt")  # a bool is an int to Python, not a step
    with pytest.raises(ValueError, match="non-negative int"):
        read_state(run / "state.pt", torch.device("cpu"))


def test_a_state_of_the_trainer_before_time_budgets_is_named_as_such(image_folder: Path, tmp_path: Path) -> None:
    """From the upgrade review: a state saved before 2026-11-25 kept a CosineAnnealingLR (T_max, eta_min), and its
    resume was refused as "was the config changed since it was saved?: 'lr_lambdas'", which it had not been."""
    run, state = _saved_state(tmp_path, image_folder)
    older = {"T_max": 12, "eta_min": 1e-4, "base_lrs": [1e-3], "last_epoch": state["step"], "_step_count": 5,
             "_get_lr_called_within_step": False, "_last_lr": [5e-4]}
    torch.save({**state, "scheduler": older}, run / "state.pt")
    with pytest.raises(ValueError, match=rf"{run / 'state.pt'} was saved by an older version of this trainer .*"
                                         rf"python -m training export-state {run} --out FILE\.safetensors"):
        train_stage(load_config(run / "config.toml"), run, resume=True)


def test_a_half_written_metrics_line_does_not_block_a_resume(image_folder: Path, tmp_path: Path) -> None:
    run, _ = _saved_state(tmp_path, image_folder)
    records = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(records) + '\n{"step": 7, "lr": 0.00')  # a crash mid-write
    result = train_stage(load_config(run / "config.toml"), run, resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, result.steps + 1))


def test_a_cut_config_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[experiment]\nta_blocks = [3,\n")
    with pytest.raises(ValueError, match=rf"{path} is not a valid TOML file"):
        load_config(path)


def _student_file(tmp_path: Path) -> Path:
    return save_checkpoint(build_model("rlfn", channels=8, blocks=1), tmp_path / "s.safetensors", role="student",
                           training={"config": {}})  # fmt: skip


def _with_tensors(path: Path, out: Path, change) -> Path:
    tensors = load_file(path)
    with open(path, "rb") as handle:  # the metadata is kept as it is
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    save_file({name: change(tensor) for name, tensor in tensors.items()}, out, metadata=header["__metadata__"])
    return out


def test_checkpoint_values_are_checked_as_the_models_float32(tmp_path: Path) -> None:
    path = _student_file(tmp_path)
    fp8 = _with_tensors(path, tmp_path / "fp8.safetensors", lambda t: t.to(torch.float8_e4m3fn))
    assert load_checkpoint(fp8).model.conv_1.weight.dtype == torch.float32  # no isfinite for float8: cast first
    huge = _with_tensors(path, tmp_path / "f64.safetensors", lambda t: t.double().fill_(1e300))  # inf in float32
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(huge)


@pytest.mark.parametrize("metadata", ["[" * 100_000 + "]" * 100_000, '{"a": ' + "9" * 5000 + "}"],
                         ids=["nested 100k deep", "5000-digit int"])
def test_hostile_metadata_json_is_a_checkpoint_error(tmp_path: Path, metadata: str) -> None:
    path = tmp_path / "hostile.safetensors"
    save_file({"x": torch.zeros(1)}, path, metadata={"takdsr": metadata})
    with pytest.raises(CheckpointError, match="metadata is not valid JSON"):
        load_checkpoint(path)


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    model = build_model("rlfn", channels=8, blocks=1)
    with torch.no_grad():
        model.conv_1.bias[0] = float("nan")
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        save_checkpoint(model, tmp_path / "nan.safetensors", role="student")
    assert list(tmp_path.iterdir()) == []


def test_malformed_score_and_index_files_are_named(tmp_path: Path) -> None:
    path = _student_file(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    with pytest.raises(ValueError, match=r"results\.json is not a pipeline's results\.json"):
        ship_run(tmp_path / "run", tmp_path / "weights")
    (tmp_path / "scores.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"scores\.json is not the scores .*not a JSON object"):
        ship_checkpoint(path, "x", "x", tmp_path / "scores.json", tmp_path / "weights")
    (tmp_path / "scores.json").write_text('{"cg-dev": {"s": 3}}')
    with pytest.raises(ValueError, match=r"scores\.json has no scores for 's'"):
        ship_checkpoint(path, "x", "x", tmp_path / "scores.json", tmp_path / "weights")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "weights.json").write_text('{"cut": ')
    scored = {"cg-dev": {"s": {"mean": {}, "weights_sha256": weights_sha256(path)}, "bicubic": {"mean": {}}}}
    (tmp_path / "scores.json").write_text(json.dumps(scored))
    with pytest.raises(ValueError, match=r"weights\.json is not valid JSON"):
        ship_checkpoint(path, "x", "x", tmp_path / "scores.json", tmp_path / "weights")


@pytest.mark.parametrize("command", [["ship", "runs/x"], ["ship-checkpoint", "x.safetensors", "--name", "x",
                                                           "--report-name", "x", "--scores", "s.json"]])
def test_ship_writes_into_the_bundled_weights_folder_wherever_it_runs(command: list[str]) -> None:
    """The default --out was models/weights of the current folder: run elsewhere, it made a ./models folder, which
    then shadowed the models package for every later `python -m training` there (an ImportError)."""
    from models import WEIGHTS_DIR
    from training.__main__ import _parser

    out = _parser().parse_args(command).out
    assert out == WEIGHTS_DIR and out.is_absolute()


@pytest.mark.parametrize("name", ["../escaped", "sub/dir/x", "", ".hidden", "-x"])
def test_a_shipped_name_is_a_plain_file_name(tmp_path: Path, name: str) -> None:
    """--name ../escaped wrote out/../escaped.safetensors, outside the weights folder, and indexed it there."""
    path = _student_file(tmp_path)
    (tmp_path / "scores.json").write_text('{"cg-dev": {"s": {"mean": {}}, "bicubic": {"mean": {}}}}')
    with pytest.raises(ValueError, match="plain file name stem"):
        ship_checkpoint(path, name, "x", tmp_path / "scores.json", tmp_path / "weights", label="s")
    assert not (tmp_path / "weights").exists() and not (tmp_path / "escaped.safetensors").exists()


def test_a_shipped_name_with_its_suffix_and_a_missing_run_are_named_as_such(tmp_path: Path) -> None:
    """From a researcher's walkthrough: --name foo.safetensors wrote foo.safetensors.safetensors; `ship` of a run
    folder that does not exist said it "has not been evaluated"."""
    path = _student_file(tmp_path)
    (tmp_path / "scores.json").write_text('{"cg-dev": {"s": {"mean": {}}, "bicubic": {"mean": {}}}}')
    with pytest.raises(ValueError, match=r"a file name stem, without \.safetensors: --name foo$"):
        ship_checkpoint(path, "foo.safetensors", "x", tmp_path / "scores.json", tmp_path / "weights", label="s")
    assert not (tmp_path / "weights").exists()
    with pytest.raises(FileNotFoundError, match=r"runs/typo is not a folder: name a pipeline's run folder"):
        ship_run(tmp_path / "runs" / "typo", tmp_path / "weights")


@pytest.mark.parametrize(("args", "message"), [(["--device", "bogus"], "expected cpu, cuda or cuda:N"),
                                               (["--device", "cuda:99"], "no such CUDA device here"),
                                               (["--repeats", "0"], "expected an integer >= 1"),
                                               (["--threads", "50000"], "expected 0 (every usable core) to 1024")])
def test_latency_arguments_are_checked_before_any_work(args: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A bad device ended in torch's traceback, a missing CUDA in an AssertionError, --repeats 0 in 'no median'."""
    with pytest.raises(SystemExit) as exit_info:
        training_main(["latency", "rlfn_s", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_evaluate_frames_is_checked_as_an_argument(capsys: pytest.CaptureFixture[str]) -> None:
    """`evaluate --sets rendered-val --frames 0` said 'source.frames_per_preset must be >= 1', a key nobody gave."""
    with pytest.raises(SystemExit) as exit_info:
        training_main(["evaluate", "--checkpoint", "rlfn_s_takdsr_x2", "--sets", "rendered-val", "--frames", "0"])
    assert exit_info.value.code == 2 and "argument --frames: expected an integer >= 1, got '0'" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("name", ["bicubic", "Lanczos"])
def test_a_checkpoint_named_like_a_baseline_is_refused(name: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """bicubic.safetensors took the bicubic row: the network's scores printed and saved as OpenCV bicubic's; and
    Lanczos.safetensors made a row beside lanczos's, two names a reader takes for one."""
    folder = make_image_folder(tmp_path / "images", count=1, size=(48, 64))
    named = _student_file(tmp_path).rename(tmp_path / f"{name}.safetensors")
    code = training_main(["evaluate", "--checkpoint", str(named), "--data", str(folder)])
    assert code == 1 and f"would be labelled {name!r}, the name of a baseline" in capsys.readouterr().err


def test_latency_json_says_where_it_was_measured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "latency.json"
    assert training_main(["latency", "rlfn_s", "--input", "32x32", "--repeats", "1", "--threads", "1",
                          "--json", str(out)]) == 0
    timing = json.loads(out.read_text())["rlfn_s"]
    assert timing["device"] == "cpu" and timing["threads"] == 1 and "on cpu, 1 threads" in capsys.readouterr().out


def test_latency_checks_its_json_path_first_and_names_a_frame_too_large_for_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing --json folder failed after every model was timed; an input too large for memory ended in torch's
    allocator traceback."""
    import training.__main__ as cli

    def not_to_be_called(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("measured before the output path was checked")

    monkeypatch.setattr(cli, "measure_latency", not_to_be_called)
    for out, message in ((tmp_path / "gone" / "t.json", "the folder .*gone does not exist"), (tmp_path, "a folder")):
        assert training_main(["latency", "rlfn_s", "--input", "32x32", "--json", str(out)]) == 1
        assert re.search(f"error: cannot write the timings to .*{message}", capsys.readouterr().err)

    def out_of_memory(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 119997600012 bytes.\nmore lines")

    monkeypatch.setattr(cli, "measure_latency", out_of_memory)
    assert training_main(["latency", "rlfn_s", "--input", "99999x99999"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: rlfn_s at 99999x99999 does not fit in cpu memory: [enforce fail")
    assert err.count("\n") == 1  # the first line of torch's message only

    def other_failure(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(cli, "measure_latency", other_failure)
    with pytest.raises(RuntimeError, match="a bug of ours"):  # not dressed up as a user's mistake
        training_main(["latency", "rlfn_s", "--input", "32x32"])


def test_a_pipeline_refuses_an_evaluation_folder_without_a_usable_image_before_training(tmp_path: Path) -> None:
    """Only the folder's existence was checked first: every stage trained, then the evaluation failed on a folder of
    junk, or of images too small for the network."""
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "empty.png").write_bytes(b"")
    (junk / "text.jpg").write_text("not a picture")
    tiny = make_image_folder(tmp_path / "tiny", count=2, size=(29, 29))  # LR 14x14: below RLFN's 15 px
    config = tiny_config(make_image_folder(tmp_path / "train"), experiment={"baselines": False})
    for folder in (junk, tiny):
        bad = dataclasses.replace(config, eval=dataclasses.replace(config.eval, folders=[str(folder)]))
        with pytest.raises(DatasetError, match=f"no usable image in {folder}.*min size 30px"), \
                pytest.warns(SkippedFilesWarning, match="skipped 2 file"):
            run_pipeline(bad, tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_the_command_line_says_skipped_files_once_in_one_line(image_folder: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A pipeline's folder is scanned by the check before training, by each stage and by the evaluation: the same
    SkippedFilesWarning came two or three times, each with Python's echo of the line that scanned."""
    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    (folder / "notes.txt").write_text("junk")
    config = tiny_config(folder, experiment={"baselines": False}, optim={"steps": 1},
                         eval={"latency_repeats": 0, "crops_for_figure": 0})  # fmt: skip
    command = ["pipeline", "--config", str(_toml(config, tmp_path)), "--run-dir", str(tmp_path / "run")]
    assert training_main(command) == 0
    out, err = capsys.readouterr()
    # and a line per stage as it ends (with runtime.progress off, as here, nothing said how far the run was)
    assert "teacher: 1 steps in " in out and f" -> {tmp_path / 'run' / 'ta1' / 'final.safetensors'}\n" in out, out
    lines = [line for line in err.splitlines() if "notes.txt" in line]
    assert lines == [f"warning: {folder}: skipped 1 file(s): 1 not images (notes.txt)"], err
    assert "SkippedFilesWarning" not in err and "scan_images(" not in err, err
    with pytest.warns(SkippedFilesWarning):  # outside the command, the warning is an ordinary warning again
        scan_images(folder, progress=False)


def test_a_report_takes_image_names_that_are_not_utf8(tmp_path: Path) -> None:
    """report.md failed to encode a Latin-1 file name from a user's folder, and was left empty on every rerun."""
    name = b"caf\xe9.png".decode("utf-8", "surrogateescape")  # how Python holds such a name
    metrics = {"psnr_rgb": 30.0, "ssim_rgb": 0.9, "psnr_y": 30.0, "ssim_y": 0.9}
    results = {"scale": 2, "report_lr_size": [960, 540], "models": {},
               "sets": {"mine": {"images": [name], "scores": {"bicubic": {"per_image": {name: metrics},
                                                                        "mean": metrics}}}}}  # fmt: skip
    report = write_report(tmp_path, results).read_bytes().decode("utf-8")  # valid UTF-8 throughout
    assert "caf\\udce9.png" in report


def test_evaluate_prints_a_folder_name_that_is_not_utf8_on_a_strict_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every image was scored, then printing the set's name raised UnicodeEncodeError (exit 1, scores lost) where
    standard output is strict UTF-8, as on a usual en_US.UTF-8 desktop."""
    folder = tmp_path / b"set_\xff".decode("utf-8", "surrogateescape")
    make_image_folder(tmp_path / "set", count=1, size=(64, 64)).rename(folder)  # cv2.imwrite dies on such a name
    console = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", console)
    assert training_main(["evaluate", "--checkpoint", "rlfn_s_takdsr_x2", "--data", str(folder)]) == 0
    console.flush()
    assert "set_\\udcff" in console.buffer.getvalue().decode("utf-8")


def test_evaluate_says_a_file_given_as_a_folder_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "frame.png"
    image.write_bytes(b"")
    assert training_main(["evaluate", "--checkpoint", "rlfn_s_takdsr_x2", "--data", str(image)]) == 1
    assert f"evaluation image folder(s) missing: {image} (a file, not a folder)" in capsys.readouterr().err


def test_two_trainers_never_train_in_one_stage_folder(image_folder: Path, tmp_path: Path, stop_at_step_3: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `pipeline --stages teacher` at once (or train_parallel.sh's `teacher,teacher`) wrote over each other's
    state.pt, and one failed on the other's temporary file. The lock comes first: taken after the state was read
    and the data scanned, a resume still took up the other's state and wrote over its final checkpoint."""
    config, run = _stage_config(image_folder, "teacher"), tmp_path / "run"
    with pytest.raises(TrainingInterrupted):  # the lock is released when a run ends, here by an interrupt
        train_stage(config, run)
    with open(run / LOCK_FILE, "a") as held, monkeypatch.context() as patch:  # the other trainer, while it trains
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        patch.setattr(_Trainer, "_load_state", lambda self: pytest.fail("the state was read before the lock"))
        before = (run / "state.pt").read_bytes()
        with pytest.raises(ValueError, match=f"another trainer is training in {run}"):
            train_stage(config, run, resume=True)
        assert (run / "state.pt").read_bytes() == before
    bad_data = dataclasses.replace(config, data=dataclasses.replace(
        config.data, sources=[dataclasses.replace(config.data.sources[0], path=str(tmp_path / "gone"))]))
    assert (run / LOCK_FILE).exists()  # the refused one left the other's lock alone
    with pytest.raises(DatasetError):  # refused before training: the folder it made for its lock goes again
        train_stage(bad_data, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):  # a mistyped path: no folder left, at any depth
        train_stage(config, tmp_path / "typo" / "teacher", resume=True)
    assert not (tmp_path / "typo").exists()
    assert train_stage(config, run, resume=True).steps > 3  # free again: the resume goes on to the end


def test_a_finished_stage_is_reported_kept_with_the_values_it_was_trained_with(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pipeline --stages teacher --set optim.steps=400` on a finished teacher printed "trained teacher" and left it
    at its 2 steps."""
    config = tiny_config(image_folder, experiment={"baselines": False}, optim={"steps": 2})
    run = tmp_path / "run"
    assert training_main(["pipeline", "--config", str(_toml(config, tmp_path)), "--run-dir", str(run),
                          "--stages", "teacher"]) == 0
    capsys.readouterr()
    final = (run / "teacher" / "final.safetensors").read_bytes()
    assert training_main(["pipeline", "--config", str(_toml(config, tmp_path)), "--run-dir", str(run),
                          "--stages", "teacher", "--set", "optim.steps=4", "--set", "optim.lr=5e-3"]) == 0
    out = capsys.readouterr().out
    assert (f"teacher: kept, finished before in {run / 'teacher'}; it was trained with other values for optim.lr, "
            f"optim.steps (to train it with these, remove {run / 'teacher'})") in out
    assert f"finished teacher in {run}" in out and "trained" not in out.replace("was trained", "")
    assert (run / "teacher" / "final.safetensors").read_bytes() == final


def test_a_rerun_whose_kept_stages_differ_leaves_the_runs_config_and_data_eval_is_said_to_be_unread(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished run rerun with other data.sources kept every stage (rightly) and rewrote the run's config.toml
    with the new sources, which then named data no stage was trained on. data.eval, which nothing in training
    reads, was accepted without a word (a config setting it expected it scored), and changing it made every
    stage "trained with other values for data.eval.path"."""
    config = tiny_config(image_folder, experiment={"baselines": False}, optim={"steps": 1},
                         eval={"latency_repeats": 0, "crops_for_figure": 0})  # fmt: skip
    run, toml = tmp_path / "run", _toml(config, tmp_path)
    assert training_main(["pipeline", "--config", str(toml), "--run-dir", str(run)]) == 0
    written = (run / "config.toml").read_text()
    capsys.readouterr()
    other_data = image_folder.parent / "other"
    shutil.copytree(image_folder, other_data)
    assert training_main(["pipeline", "--config", str(toml), "--run-dir", str(run), "--set",
                          f'data.sources=[{{kind="folder", path="{other_data}"}}]']) == 0
    out = capsys.readouterr().out
    assert f"{run / 'config.toml'} is left as it was" in out and "other values for data.sources" in out, out
    assert (run / "config.toml").read_text() == written
    assert training_main(["pipeline", "--config", str(toml), "--run-dir", str(run), "--set",
                          f'data.eval={{kind="folder", path="{other_data}"}}']) == 0
    captured = capsys.readouterr()
    assert f"data.eval (folder {other_data}) is not read by the trainer or the pipeline" in captured.err
    assert "other values" not in captured.out and "left as it was" not in captured.out, captured.out


def test_a_pipeline_with_no_set_to_score_is_refused_before_training(image_folder: Path, tmp_path: Path) -> None:
    """eval.cg_dev and eval.rendered_val false and no eval.folders: every stage trained, then a report without a
    score."""
    config = tiny_config(image_folder, experiment={"baselines": False}, optim={"steps": 1},
                         eval={"folders": [], "cg_dev": False, "rendered_val": False})  # fmt: skip
    with pytest.raises(ValueError, match=r"the evaluation has no set to score: .* --stages\)"):
        run_pipeline(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert run_pipeline(config, tmp_path / "run", ["teacher"]) is None  # training alone needs no set


def _toml(config: object, folder: Path) -> Path:
    path = folder / "config.toml"
    path.write_text(dump_toml(config.to_dict()))
    return path


def test_one_stop_delivered_twice_at_once_still_saves_the_state(image_folder: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler's SIGTERM to every process of a job and train_parallel.sh passing one on arrive together; the
    second was taken as "force": KeyboardInterrupt, and no state.pt. A second signal later still forces."""
    original_step = _Trainer._step

    def step_then_two_signals(self: _Trainer, loss_module, batch, step):  # type: ignore[no-untyped-def]
        terms = original_step(self, loss_module, batch, step)
        if step + 1 == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return terms

    monkeypatch.setattr(_Trainer, "_step", step_then_two_signals)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="interrupted by SIGTERM at step 3"):
        train_stage(_stage_config(image_folder, "teacher"), run)
    assert read_state(run / "state.pt", torch.device("cpu"))["step"] == 3
    trainer = _Trainer.__new__(_Trainer)  # the handler alone: a second signal past FORCE_AFTER_S forces the stop
    trainer.stop_requested, trainer.stop_requested_at = True, time.monotonic() - FORCE_AFTER_S - 1
    with pytest.raises(KeyboardInterrupt):
        trainer._on_stop_signal(signal.SIGINT, None)


def test_a_stage_too_large_for_any_loader_is_refused_before_it_trains(image_folder: Path, tmp_path: Path) -> None:
    config = _stage_config(image_folder, "teacher")
    deep = dataclasses.replace(config, experiment=dataclasses.replace(config.experiment, teacher_blocks=300))
    with pytest.raises(ValueError, match="stage teacher would train a network of 300 blocks, more than checkpoints"):
        train_stage(deep, tmp_path / "deep")
    assert not (tmp_path / "deep").exists()


def test_a_stage_of_huge_widths_is_refused_before_anything_is_allocated(image_folder: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """channels 5000 built 926 M parameters (3.7 GB) before size_problem refused them; 100000 ran out of memory
    with an allocator error that named no setting. The stage is now sized on the meta device first."""
    import training.stages as stages_module  # where refuse_oversized looks build_stage_network up
    import training.trainer as trainer_module  # and where the trainer does

    config = _stage_config(image_folder, "student")
    wide = dataclasses.replace(config, experiment=dataclasses.replace(config.experiment, channels=100_000))
    real_build = stages_module.build_stage_network

    def only_on_meta(cfg: object) -> torch.nn.Module:
        network = real_build(cfg)
        assert all(p.is_meta for p in network.parameters()), "built with real memory before the size check"
        return network

    for module in (stages_module, trainer_module):
        monkeypatch.setattr(module, "build_stage_network", only_on_meta)
    with pytest.raises(ValueError, match=r"stage student would train a network of [\d,]+ values, more than"):
        train_stage(wide, tmp_path / "wide")
    assert not (tmp_path / "wide").exists()


def test_stages_from_a_teacher_trained_again_are_refused_not_mixed(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ta1 stopped half-way, then the teacher trained again (its folder removed, as the `kept` line advises): ta1
    resumed against the new teacher and a finished student was kept as if it had learnt from it (found in a
    review). Both are refused before anything trains, naming the folders to remove."""
    config = tiny_config(image_folder, experiment={"baselines": False}, optim={"steps": 4})
    run = tmp_path / "run"
    run_pipeline(config, run, ["teacher"])
    with monkeypatch.context() as patch:
        stop_at_step(patch, 2)
        with pytest.raises(TrainingInterrupted):
            run_pipeline(config, run, ["ta1"])
    assert read_state(run / "ta1" / "state.pt", torch.device("cpu"))["inputs_sha256"][0]  # init_from: the teacher
    state = (run / "ta1" / "state.pt").read_bytes()
    old_teacher = run / "old_teacher.safetensors"
    (run / "teacher" / "final.safetensors").rename(old_teacher)
    for stage_file in (run / "teacher").iterdir():
        stage_file.unlink()
    (run / "teacher").rmdir()
    with pytest.raises(ValueError, match=r"ta1 \(from teacher, which this run trains again\)\. Remove their folders "
                                         rf"to train them again \({run / 'ta1'}\)"):
        run_pipeline(config, run, ["teacher", "ta1"])
    assert not (run / "teacher").exists() and (run / "ta1" / "state.pt").read_bytes() == state
    # a teacher file replaced by another (trained again elsewhere): ta1's resume is refused, by the pipeline and by
    # `train --resume` alike
    (run / "teacher").mkdir()
    save_checkpoint(build_model("rlfn_teacher", channels=8, blocks=2, encoder_channels=8),
                    run / "teacher" / "final.safetensors", role="teacher", training={"stage": "teacher"})
    with pytest.raises(ValueError, match=rf"ta1 \(from {run / 'teacher' / 'final.safetensors'}, which has changed"):
        run_pipeline(config, run, ["ta1"])
    with pytest.raises(ValueError, match="as it was then, and the file has changed since"):
        train_stage(load_config(run / "ta1" / "config.toml"), run / "ta1", resume=True)
    # the old teacher put back: ta1 goes on and finishes, and a later change of the teacher flags the finished ta1
    old_teacher.replace(run / "teacher" / "final.safetensors")
    run_pipeline(config, run, ["ta1"])
    assert load_checkpoint(run / "ta1" / "final.safetensors").metadata["training"]["steps"] == 4
    save_checkpoint(build_model("rlfn_teacher", channels=8, blocks=2, encoder_channels=8),
                    run / "teacher" / "final.safetensors", role="teacher", training={"stage": "teacher"})
    with pytest.raises(ValueError, match=r"ta1 \(from .*which has changed since\)"):
        run_pipeline(config, run, ["student_takdsr"])


def test_a_stop_during_the_last_step_stops_the_pipeline(image_folder: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during a stage's last step was dropped (the stage had no step left to stop before), and the pipeline
    went on to train the next stages."""
    config = tiny_config(image_folder, experiment={"baselines": False}, optim={"steps": 3})
    run = tmp_path / "run"
    stop_at_step(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted, match="at the last step of teacher"):
        run_pipeline(config, run, ["teacher", "ta1"])
    assert (run / "teacher" / "final.safetensors").exists() and not (run / "ta1").exists()
    # a stage alone (`train`, or the last stage a pipeline was given) is simply finished: exit 0, nothing to rerun
    assert run_pipeline(config, run, ["ta1"]) is None and (run / "ta1" / "final.safetensors").exists()
    result = train_stage(_stage_config(image_folder, "teacher", steps=3), tmp_path / "alone")
    assert result.stopped_by == signal.SIGINT and result.checkpoint.exists()


def test_a_resume_with_no_step_left_keeps_the_last_loss(image_folder: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the last state save and before final.safetensors: the rerun wrote final_loss NaN (no step ran
    to give one), which results.json then carried as invalid JSON."""
    config = _stage_config(image_folder, "teacher")
    run = tmp_path / "run"

    def killed(self: _Trainer, steps: int, seconds: float) -> Path:
        raise KeyboardInterrupt  # where a SIGKILL in the final save leaves the run

    with monkeypatch.context() as patch:
        patch.setattr(_Trainer, "_save_final", killed)
        with pytest.raises(KeyboardInterrupt):
            train_stage(config, run)
    last_loss = read_state(run / "state.pt", torch.device("cpu"))["last_loss"]
    assert isinstance(last_loss, float) and last_loss > 0
    result = train_stage(config, run, resume=True)
    assert result.final_loss == last_loss
    assert load_checkpoint(run / "final.safetensors").metadata["training"]["final_loss"] == last_loss


def test_a_state_whose_step_disagrees_with_its_schedule_is_refused(image_folder: Path, tmp_path: Path) -> None:
    """A state.pt claiming 10**30 steps was resumed as finished, and its checkpoint claimed them."""
    run, state = _saved_state(tmp_path, image_folder)
    config = load_config(run / "config.toml")
    for step in (10**30, state["step"] + 1):
        torch.save({**state, "step": step}, run / "state.pt")
        with pytest.raises(ValueError, match=r"state\.pt does not hold .* is not the \d+ steps its schedule has run"):
            train_stage(config, run, resume=True)
    torch.save({**state, "last_loss": float("nan")}, run / "state.pt")
    with pytest.raises(ValueError, match="last_loss nan is not a finite number"):
        read_state(run / "state.pt", torch.device("cpu"))


def test_evaluate_and_ship_refuse_a_checkpoint_that_overflows(image_folder: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Finite weights scaled by 1e15: evaluate printed NaN scores and wrote them as invalid JSON, and
    ship-checkpoint shipped the file with NaN in weights.json."""
    trained = load_checkpoint(train_stage(_stage_config(image_folder, "student"), tmp_path / "run").checkpoint)
    with torch.no_grad():
        for parameter in trained.model.parameters():
            parameter.mul_(1e15)
    path = save_checkpoint(trained.model, tmp_path / "big.safetensors", role="student",
                           training=trained.metadata["training"])
    images = make_image_folder(tmp_path / "images", count=2, size=(64, 64))
    scores = tmp_path / "scores.json"
    assert training_main(["evaluate", "--checkpoint", str(path), "--data", str(images), "--json", str(scores)]) == 1
    assert "gives NaN or infinite values on" in capsys.readouterr().err and not scores.exists()
    scores.write_text(json.dumps({"set": {"big": {"mean": {"psnr_rgb": float("nan")}},
                                          "bicubic": {"mean": {"psnr_rgb": 30.0}}}}))
    with pytest.raises(ValueError, match="scores of 'big' are not all finite numbers"):
        ship_checkpoint(path, "big_x2", "Big", scores, tmp_path / "out")
    assert not (tmp_path / "out" / "weights.json").exists()


def test_sigterm_outside_the_training_steps_stops_with_one_line(tmp_path: Path) -> None:
    """SIGTERM while the data or guides load, between stages or while evaluating killed the process without a
    word, and Ctrl-C there gave a traceback."""
    script = ("import os, signal, sys\n"
              "import training.__main__ as cli\n"
              "def stopped_while_loading(args):\n"
              "    os.kill(os.getpid(), signal.{})\n"
              "    raise AssertionError('the signal did not stop the command')\n"
              "cli._evaluate = stopped_while_loading\n"
              "sys.exit(cli.main(['evaluate', '--checkpoint', 'x.safetensors']))\n")
    for name, status in (("SIGTERM", 143), ("SIGINT", 130)):
        run = subprocess.run([sys.executable, "-c", script.format(name)], capture_output=True, text=True, timeout=120,
                             cwd=Path(__file__).resolve().parents[1])
        assert run.returncode == status and "stopped:" in run.stderr, (name, run.stderr)
        assert "Traceback" not in run.stderr, (name, run.stderr)


def test_ctrl_c_while_torch_loads_ends_the_command_without_a_traceback(tmp_path: Path) -> None:
    """`python -m training` spends seconds importing torch; a Ctrl-C there printed a KeyboardInterrupt traceback. A
    stand-in torch that blocks on import makes the moment certain."""
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("import pathlib, time\n"
                                      f"pathlib.Path({str(tmp_path / 'loading')!r}).touch()\n"
                                      "time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])])}
    process = subprocess.Popen([sys.executable, "-m", "training", "--help"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "loading").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGINT and "Traceback" not in err, err  # died by the signal, as a shell tool


def test_temporary_files_of_a_killed_save_are_removed_on_resume(image_folder: Path, tmp_path: Path) -> None:
    """A SIGKILL inside save_checkpoint (after the temporary file was written, before the rename) left a full-size
    hidden copy that no later run removed."""
    run, _ = _saved_state(tmp_path, image_folder)
    (run / "snapshots").mkdir()
    leftovers = [run / ".final.safetensors.al_192s0", run / "snapshots" / ".step_4.safetensors.x1y2z3",
                 run / "state.pt.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"\0" * 1024)
    keep = run / "notes.txt"
    keep.write_text("mine")
    train_stage(load_config(run / "config.toml"), run, resume=True)
    assert not any(leftover.exists() for leftover in leftovers) and keep.read_text() == "mine"


def test_the_kept_line_names_the_stages_trained_from_a_kept_stage(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`remove RUN/teacher` alone led to a refusal on the next run (its TA was trained from it): the line names them."""
    config = tiny_config(image_folder, experiment={"baselines": False}, optim={"steps": 2})
    run = tmp_path / "run"
    run_pipeline(config, run, ["teacher", "ta1"])
    capsys.readouterr()
    longer = dataclasses.replace(config, optim=dataclasses.replace(config.optim, steps=4))
    run_pipeline(longer, run, ["teacher"])
    assert (f"(to train it with these, remove {run / 'teacher'} and the stages trained from it, {run / 'ta1'})"
            in capsys.readouterr().out)


def test_guides_changed_on_purpose_at_a_resume_are_taken(image_folder: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The hash check refused `train --resume --set stage.guides=[other teacher]` (a change made on purpose, which
    the resume notes) and `--set stage.init_from=""` once the teacher was gone (a resume takes its weights from the
    state), saying the file "has changed since" (found in a review)."""
    teachers = {name: train_stage(_stage_config(image_folder, "teacher"), tmp_path / name).checkpoint
                for name in ("teacher_a", "teacher_b")}
    student = _stage_config(image_folder, "student", init_from=str(teachers["teacher_a"]),
                            guides=[str(teachers["teacher_a"])])
    with monkeypatch.context() as patch:
        stop_at_step(patch, 2)
        with pytest.raises(TrainingInterrupted):
            train_stage(student, tmp_path / "student")
    other_guide = dataclasses.replace(student, stage=dataclasses.replace(
        student.stage, init_from="", guides=[str(teachers["teacher_b"])]))  # fmt: skip
    assert train_stage(other_guide, tmp_path / "student", resume=True).steps == 6


def test_sigterm_to_the_whole_process_group_still_saves_the_state(image_folder: Path, tmp_path: Path) -> None:
    """A job scheduler sends SIGTERM to every process of the job: the data-loader workers died of it, and the
    trainer failed on its next batch ("DataLoader worker ... killed by signal: Terminated") without saving."""
    config = tiny_config(image_folder, optim={"steps": 1_000_000}, runtime={"workers": 2})
    config = dataclasses.replace(config, stage=StageConfig(name="teacher", role="teacher"))
    run = tmp_path / "run"
    trainer = subprocess.Popen([sys.executable, "-m", "training", "train", "--config", str(_toml(config, tmp_path)),
                                "--run-dir", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(_lines(run / "metrics.jsonl")) < 3:  # the workers are feeding it
            time.sleep(0.2)
        os.killpg(trainer.pid, signal.SIGTERM)
        _, stderr = trainer.communicate(timeout=60)
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
    assert trainer.returncode == 143 and "Traceback" not in stderr, stderr
    stopped_at = int(re.search(r"interrupted by SIGTERM at step (\d+)", stderr).group(1))
    assert read_state(run / "state.pt", torch.device("cpu"))["step"] == stopped_at


def test_a_second_signal_during_the_exit_after_a_stop_leaves_the_status_128_plus_the_first(image_folder: Path,
                                                                                          tmp_path: Path) -> None:
    """From a researcher's walkthrough: a second Ctrl-C within FORCE_AFTER_S (the same stop, delivered twice) that
    landed after "stopped: ..." while the interpreter and torch tore down (about a second) killed the trainer by
    SIGINT: status -2 to a Python caller, not the documented 130."""
    config = tiny_config(image_folder, optim={"steps": 1_000_000})
    config = dataclasses.replace(config, stage=StageConfig(name="teacher", role="teacher"))
    run = tmp_path / "run"
    trainer = subprocess.Popen([sys.executable, "-m", "training", "train", "--config", str(_toml(config, tmp_path)),
                                "--run-dir", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(_lines(run / "metrics.jsonl")) < 2:
            time.sleep(0.1)
        trainer.send_signal(signal.SIGINT)
        assert trainer.stderr is not None
        said = [trainer.stderr.readline()]
        while said[-1] and not said[-1].startswith("stopped: "):
            said.append(trainer.stderr.readline())
        trainer.send_signal(signal.SIGINT)  # into the exit that follows that line
        said.append(trainer.stderr.read())
        trainer.wait(60)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    assert trainer.returncode == 130 and "Traceback" not in "".join(said), (trainer.returncode, said)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _file_size_limit(limit: int):  # type: ignore[no-untyped-def]
    """preexec_fn for a child whose writes past ``limit`` bytes fail (EFBIG) as they would on a full disk, without
    the privileges a small tmpfs needs."""

    def limit_in_child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_in_child


def test_a_state_save_on_a_full_disk_is_one_line_and_keeps_the_state_saved_before(image_folder: Path,
                                                                                  tmp_path: Path) -> None:
    """From the failure-injection review: torch's writer reported a full disk as a traceback of "[enforce fail at
    inline_container.cc] unexpected pos", naming neither the disk nor the file."""
    run, saved = _saved_state(tmp_path, image_folder)  # a state of step 6
    limit = (run / "state.pt").stat().st_size // 2
    result = subprocess.run([sys.executable, "-m", "training", "train", "--resume", str(run), "--set",
                             "optim.steps=8"], capture_output=True, text=True, timeout=300,
                            preexec_fn=_file_size_limit(limit), cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: [Errno 27] cannot save the training state (File too large); the one saved before is kept: "
        f"'{run / 'state.pt'}'")
    assert torch.load(run / "state.pt", weights_only=True)["step"] == saved["step"] == 6
    assert not (run / "state.pt.tmp").exists()
    # a fresh run's first save: there is none before it to keep (it said "the one saved before is kept")
    fresh = tmp_path / "fresh"
    config = _toml(_stage_config(image_folder, "teacher"), tmp_path)
    result = subprocess.run([sys.executable, "-m", "training", "train", "--config", str(config), "--run-dir",
                             str(fresh)], capture_output=True, text=True, timeout=300,
                            preexec_fn=_file_size_limit(limit), cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"error: [Errno 27] cannot save the training state (File too large); none was saved before: "
        f"'{fresh / 'state.pt'}'"), result.stderr


_SAVE_A_CHECKPOINT = """
import sys
from models import build_model, save_checkpoint
save_checkpoint(build_model("rlfn_s", channels=8), sys.argv[1], role="student")
"""


def test_a_checkpoint_save_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path: Path) -> None:
    """safetensors' writer raised its own SafetensorError ("I/O error: No space left on device"), which the command
    lines did not take for a disk problem: a traceback."""
    target = tmp_path / "out" / "student.safetensors"
    result = subprocess.run([sys.executable, "-c", _SAVE_A_CHECKPOINT, str(target)], capture_output=True, text=True,
                            timeout=120, preexec_fn=_file_size_limit(4096), cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1, result.stderr
    assert (f"OSError: [Errno 27] cannot write the checkpoint (File too large): '{target}'"
            in result.stderr.splitlines()), result.stderr
    assert list(target.parent.iterdir()) == []


_DELETING_TRAINER = """
import pathlib, sys
import training.trainer as trainer
from training.__main__ import main

scanned = trainer.build_train_dataset

def build_then_delete(*args, **kwargs):  # the folder loses its images after the scan, as to a clean-up or a sync
    dataset = scanned(*args, **kwargs)
    for image in pathlib.Path(sys.argv[1]).glob("*.png"):
        image.unlink()
    return dataset

trainer.build_train_dataset = build_then_delete
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("workers", [0, 1])
def test_images_gone_after_the_scan_end_a_run_in_one_line_with_its_state_saved(image_folder: Path, tmp_path: Path,
                                                                              workers: int) -> None:
    """From the failure-injection review: with data-loader workers (every shipped config but the smoke one), an
    image deleted after the scan printed torch's "Caught DatasetError in DataLoader worker process 0." and the
    worker's traceback, and then the trainer never exited: multiprocessing's exit hook sent the worker SIGTERM,
    which workers ignore, and waited for it. Now one line names the file and how to go on from the state it saved,
    and the process ends at once."""
    folder = make_image_folder(tmp_path / "images", count=3)
    config = tiny_config(folder, optim={"steps": 1000}, runtime={"workers": workers})
    config = dataclasses.replace(config, stage=StageConfig(name="teacher", role="teacher"))
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", _DELETING_TRAINER, str(folder), "train", "--config",
                             str(_toml(config, tmp_path)), "--run-dir", str(run)], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    said = re.fullmatch(rf"error: cannot read {re.escape(str(folder))}/img\d\.png: .*; it was readable when .* was "
                        r"scanned \(for step (\d+) of teacher\); with the folder mended, `python -m training train "
                        rf"--resume {re.escape(str(run))}` \(or the same pipeline command\) goes on from step (\d+)",
                        last)
    assert said is not None, last
    assert int(said[1]) == int(said[2]) + 1
    assert torch.load(run / "state.pt", weights_only=True)["step"] == int(said[2])


_WRITE_A_FIGURE = """
import sys
from pathlib import Path
from training.data.images import write_bytes_atomic
write_bytes_atomic(Path(sys.argv[1]), bytes(100_000))
"""


def test_an_atomic_write_on_a_full_disk_names_the_file_and_leaves_no_part(tmp_path: Path) -> None:
    """The report's figures were written in place: a full disk left a cut crops_*.png that no viewer opens, and
    `error: [Errno 28] No space left on device` named no file (results.json's error neither)."""
    target = tmp_path / "crops_cg-dev.png"
    result = subprocess.run([sys.executable, "-c", _WRITE_A_FIGURE, str(target)], capture_output=True, text=True,
                            timeout=120, preexec_fn=_file_size_limit(4096), cwd=Path(__file__).resolve().parents[1])
    assert f"OSError: [Errno 27] File too large: '{target}'" in result.stderr.splitlines(), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_progress_off_silences_the_evaluation_bars_too(image_folder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """runtime.progress = false silenced the training bars only: the evaluation's folder scan ("scan <folder>") and
    its per-image bar ("evaluate") still wrote to stderr (a researcher's review)."""
    config = tiny_config(image_folder, experiment={"baselines": False}, optim={"steps": 2},
                         eval={"latency_repeats": 0, "crops_for_figure": 0})  # fmt: skip
    run_pipeline(config, tmp_path / "run")
    said = capsys.readouterr().err
    assert "scan " not in said and "evaluate" not in said, said

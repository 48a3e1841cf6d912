"""The trainer: loss terms by hand, frozen guides, overfitting one batch, exact resume, Ctrl-C,
NaN detection, DDP with 2 CPU processes, and the smoke pipeline end to end."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import WEIGHTS_DIR, Teacher, build_model, load_checkpoint, load_model, read_metadata
from training.__main__ import main as training_main
from training.config import Config, StageConfig, dump_toml, load_config
from training.data import file_sha256
from training.devices import Dist
from training.distill import Distillation, Guide, TrainedModel
from training.pipeline import pipeline_stages, run_pipeline
from training.ship import SHIPPED, cut_down_evaluation, seed_run, ship_run
from training.state import print_changes
from training.trainer import NonFiniteLossError, TrainingInterrupted, _Trainer, train_stage

from training_utils import SMOKE_CONFIG, make_image_folder, stop_at_step, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def _teacher() -> Teacher:
    torch.manual_seed(0)
    return build_model("rlfn_teacher", channels=8, blocks=2, encoder_channels=8).eval()


def test_teacher_loss_terms_by_hand() -> None:
    teacher = _teacher()
    hr, lr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 16, 16)
    terms = Distillation(TrainedModel(teacher), [], imitation_weight=0.01)(lr, hr)
    out = teacher(hr)
    assert set(terms) == {"pixel", "imitation", "total"}
    assert torch.allclose(terms["pixel"], (hr - out.image).abs().mean())
    assert torch.allclose(terms["imitation"], 0.01 * (lr - out.cf_prime).abs().mean())
    assert torch.allclose(terms["total"], terms["pixel"] + terms["imitation"])


def test_ta_and_student_loss_terms_by_hand() -> None:
    teacher = _teacher()
    ta = build_model("rlfn", channels=8, blocks=1).eval()
    student = build_model("rlfn", channels=8, blocks=1).eval()
    hr, lr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 16, 16)
    mix = (0.3, 0.7)
    t_out = teacher(hr)
    mixed = 0.3 * t_out.cf_prime + 0.7 * lr
    a_img, a_feat = ta.forward_with_features(mixed)

    ta_terms = Distillation(TrainedModel(ta), [Guide("teacher", teacher)], mix=mix, feature_weight=1e-4)(lr, hr)
    assert torch.allclose(ta_terms["pixel"], (hr - a_img).abs().mean())
    assert torch.allclose(ta_terms["out_teacher"], (t_out.image - a_img).abs().mean())
    assert torch.allclose(ta_terms["feat_teacher"], 1e-4 * (t_out.features - a_feat).abs().mean())

    guides = [Guide("teacher", teacher), Guide("ta1", ta, mix)]
    s_terms = Distillation(TrainedModel(student), guides, feature_weight=1e-4)(lr, hr)
    s_img, s_feat = student.forward_with_features(lr)
    expected = {
        "pixel": (hr - s_img).abs().mean(),
        "out_teacher": (t_out.image - s_img).abs().mean(),
        "out_ta1": (a_img - s_img).abs().mean(),
        "feat_teacher": 1e-4 * (t_out.features - s_feat).abs().mean(),
        "feat_ta1": 1e-4 * (a_feat - s_feat).abs().mean(),
    }
    for name, value in expected.items():
        assert torch.allclose(s_terms[name], value), name
    assert torch.allclose(s_terms["total"], sum(expected.values()))


def test_mixed_input_without_a_teacher_guide_is_an_error() -> None:
    with pytest.raises(ValueError, match="teacher"):
        Distillation(TrainedModel(build_model("rlfn_s", channels=8)), [], mix=(0.3, 0.7))


def _stage_config(folder: Path, tmp_path: Path, role: str, **stage: object):
    config = tiny_config(folder)
    return dataclasses.replace(config, stage=StageConfig(name=role, role=role, **stage))


@pytest.mark.parametrize(("data_seed", "runtime_seed", "patch_seed"), [(None, 3, 3), (5, 3, 5), (0, 3, 0)])
def test_patches_follow_data_seed_else_the_run_seed(
    image_folder: Path, tmp_path: Path, data_seed: int | None, runtime_seed: int, patch_seed: int
) -> None:
    config = _stage_config(image_folder, tmp_path, "teacher")
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, seed=data_seed),
        runtime=dataclasses.replace(config.runtime, seed=runtime_seed),
    )
    assert _Trainer(config, tmp_path / "run", Dist())._loader(0).dataset.seed == patch_seed


def test_frozen_guides_do_not_change_and_student_does(image_folder: Path, tmp_path: Path) -> None:
    teacher_config = _stage_config(image_folder, tmp_path, "teacher")
    teacher_path = train_stage(teacher_config, tmp_path / "teacher").checkpoint
    before = {k: v.clone() for k, v in load_model(teacher_path).state_dict().items()}
    student_config = _stage_config(
        image_folder, tmp_path, "student", init_from=str(teacher_path), guides=[str(teacher_path)]
    )
    trainer = _Trainer(student_config, tmp_path / "student", Dist())
    initial_student = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer.run(resume=False)
    guide = trainer.guides[0].model
    assert not guide.training and not any(p.requires_grad for p in guide.parameters())
    for name, tensor in guide.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    changed = [k for k, v in trainer.network.state_dict().items() if not torch.equal(v, initial_student[k])]
    assert changed


def test_student_overfits_a_single_batch() -> None:
    torch.manual_seed(0)
    student = build_model("rlfn_s", channels=16)
    hr = F.interpolate(torch.rand(2, 3, 8, 8), size=(32, 32), mode="bilinear", align_corners=False)
    lr = F.avg_pool2d(hr, 2)
    loss_module = Distillation(TrainedModel(student), [])
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-3)
    first = loss_module(lr, hr)["total"].item()
    for _ in range(300):
        loss = loss_module(lr, hr)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 10, (first, loss.item())


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["total"] for r in records}


def test_resume_continues_exactly(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _stage_config(image_folder, tmp_path, "teacher")
    train_stage(config, tmp_path / "straight")
    expected = _losses(tmp_path / "straight")

    with monkeypatch.context() as patch, pytest.raises(TrainingInterrupted, match="step 3"):
        stop_at_step(patch, 3)
        train_stage(config, tmp_path / "resumed")
    assert set(_losses(tmp_path / "resumed")) == {1, 2, 3}
    train_stage(config, tmp_path / "resumed", resume=True)
    resumed = _losses(tmp_path / "resumed")
    assert list(resumed) == list(expected)
    for step in (4, 5, 6):
        assert resumed[step] == expected[step], step
    a = load_model(tmp_path / "straight" / "final.safetensors").state_dict()
    b = load_model(tmp_path / "resumed" / "final.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_records_what_the_run_depended_on(image_folder: Path, tmp_path: Path) -> None:
    """From a reproducibility review: nothing recorded the library versions, the commit, where the steps ran or which
    files a folder source held (a changed image gave other weights and metadata differing only in final_loss)."""
    config = _stage_config(image_folder, tmp_path, "teacher")
    train_stage(config, tmp_path / "run")
    training = read_metadata(tmp_path / "run" / "final.safetensors")["training"]
    assert training["environment"]["torch"] == torch.__version__
    assert set(training["environment"]) >= {"python", "numpy", "opencv", "takdsr-upscaler", "git_commit"}
    [segment] = training["arithmetic"]
    assert segment["from_step"] == 0 and segment["arithmetic"].startswith("cpu: ")
    assert segment["arithmetic"].endswith(f"{torch.get_num_threads()} threads; 1 rank(s); torch {torch.__version__}")
    [folder] = training["data_sources"]
    assert folder["kind"] == "folder" and folder["path"] == str(image_folder.resolve()) and folder["images"] == 6

    changed = tmp_path / "changed"
    shutil.copytree(image_folder, changed)
    first = sorted(changed.glob("*.png"))[0]
    first.write_bytes(sorted(image_folder.glob("*.png"))[1].read_bytes())  # one image replaced by another
    same_files = _Trainer(_stage_config(image_folder, tmp_path, "teacher"), tmp_path / "a", Dist())
    same_files._loader(0)
    other_files = _Trainer(dataclasses.replace(config, data=_folder_data(config, changed)), tmp_path / "b", Dist())
    other_files._loader(0)
    assert same_files.data_sources == [folder]
    assert other_files.data_sources[0]["images"] == 6 and other_files.data_sources[0]["sha256"] != folder["sha256"]


def _folder_data(config: Config, folder: Path):
    source = dataclasses.replace(config.data.sources[0], path=str(folder))
    return dataclasses.replace(config.data, sources=[source])


def test_a_resume_on_other_arithmetic_or_data_says_so_and_records_both(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resume with another thread count (the default `threads = 0` follows the cores a node gives) went on without
    a word, its steps no longer bit-identical to an uninterrupted run's, and the metadata named only the last
    segment's device. Files changed in the data folder also passed unnoticed."""
    config = _stage_config(image_folder, tmp_path, "teacher")
    with monkeypatch.context() as patch, pytest.raises(TrainingInterrupted, match="step 3"):
        stop_at_step(patch, 3)
        train_stage(config, tmp_path / "run")
    capsys.readouterr()
    changed = tmp_path / "changed"
    shutil.copytree(image_folder, changed)
    sorted(changed.glob("*.png"))[0].unlink()
    import training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "arithmetic", lambda device, ranks: "cpu: elsewhere, 7 threads")
    train_stage(dataclasses.replace(config, data=_folder_data(config, changed)), tmp_path / "run", resume=True)
    out = capsys.readouterr().out
    assert "on other arithmetic than its last steps ran on (cpu: elsewhere, 7 threads; before: cpu: " in out
    assert "not bit-identical" in out
    assert "note: the training data differ from what the resumed steps read" in out and ": 5 images" in out
    history = read_metadata(tmp_path / "run" / "final.safetensors")["training"]["arithmetic"]
    assert [segment["from_step"] for segment in history] == [0, 3]
    assert history[1]["arithmetic"] == "cpu: elsewhere, 7 threads" and history[0]["arithmetic"].startswith("cpu: ")


def test_a_resume_from_the_same_files_in_a_moved_folder_notes_no_change(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """From the diff review: the fingerprint's path made a moved data folder read as changed data."""
    config = _stage_config(image_folder, tmp_path, "teacher")
    with monkeypatch.context() as patch, pytest.raises(TrainingInterrupted):
        stop_at_step(patch, 3)
        train_stage(config, tmp_path / "run")
    moved = tmp_path / "moved"
    shutil.copytree(image_folder, moved)
    capsys.readouterr()
    train_stage(dataclasses.replace(config, data=_folder_data(config, moved)), tmp_path / "run", resume=True)
    assert "training data differ" not in capsys.readouterr().out


def test_a_resume_with_another_lr_and_betas_trains_with_them_and_says_so(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The saved optimizer and schedule kept the lr and betas the run started with: a resume with --set optim.lr
    trained with the old base lr times the new lr_min/lr ratio (a schedule neither config has), and the old betas,
    while config.toml recorded the new values."""
    config = _stage_config(image_folder, tmp_path, "teacher")
    optim = dataclasses.replace(config.optim, lr=0.01, lr_min=0.005, betas=[0.8, 0.99])
    changed = dataclasses.replace(config, optim=optim)
    train_stage(changed, tmp_path / "straight")
    with monkeypatch.context() as patch, pytest.raises(TrainingInterrupted):
        stop_at_step(patch, 3)
        train_stage(config, tmp_path / "resumed")
    capsys.readouterr()
    train_stage(changed, tmp_path / "resumed", resume=True)
    assert "optim.betas, optim.lr, optim.lr_min" in capsys.readouterr().out

    def lrs(run_dir: Path) -> dict[int, float]:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["lr"] for r in records}

    straight, resumed = lrs(tmp_path / "straight"), lrs(tmp_path / "resumed")
    assert [resumed[step] for step in (4, 5, 6)] == pytest.approx([straight[step] for step in (4, 5, 6)])
    state = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    assert all(tuple(group["betas"]) == (0.8, 0.99) for group in state["optimizer"]["param_groups"])


def test_a_resume_notes_no_change_for_the_run_folder_spelt_otherwise(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pipeline makes a stage's guides and init_from from its run folder: resumed with the folder spelt otherwise
    (absolute, not relative) it noted changed stage.guides and stage.init_from, which named the same files."""
    monkeypatch.chdir(tmp_path)
    final = Path("run") / "teacher" / "final.safetensors"

    def stage(path: Path) -> Config:
        return _stage_config(image_folder, tmp_path, "ta", init_from=str(path), guides=[str(path)])

    print_changes(tmp_path / "state.pt", dump_toml(stage(final).to_dict()), stage(tmp_path / final))
    assert capsys.readouterr().out == ""
    print_changes(tmp_path / "state.pt", dump_toml(stage(final).to_dict()), stage(tmp_path / "other" / final))
    assert "for stage.guides, stage.init_from" in capsys.readouterr().out


def test_export_state_checkpoints_a_run_part_way(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = train_stage(_stage_config(image_folder, tmp_path, "teacher"), tmp_path / "teacher").checkpoint
    config = _stage_config(image_folder, tmp_path, "student", init_from=str(teacher), guides=[str(teacher)])
    run = tmp_path / "student"
    with monkeypatch.context() as patch, pytest.raises(TrainingInterrupted):
        stop_at_step(patch, 3)
        train_stage(config, run)
    teacher.rename(tmp_path / "moved.safetensors")  # the weights come from the state alone

    assert training_main(["export-state", str(run), "--out", str(tmp_path / "step3.safetensors")]) == 0
    assert "student at step 3 of 6" in capsys.readouterr().out
    exported = load_checkpoint(tmp_path / "step3.safetensors")
    training = exported.metadata["training"]
    assert exported.metadata["role"] == "student" and training["steps"] == 3 and training["partial_of"] == 6
    saved = torch.load(run / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[f"network.{k}"], v) for k, v in exported.model.state_dict().items())

    (tmp_path / "moved.safetensors").rename(teacher)
    train_stage(config, run, resume=True)  # the run goes on: its final weights are not step 3's
    final = load_model(run / "final.safetensors").state_dict()
    assert any(not torch.equal(final[k], v) for k, v in exported.model.state_dict().items())


def test_export_state_says_what_a_folder_without_a_state_holds(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """export-state on a seeded run folder said "config RUN/config.toml not found; a path to a TOML file, or a bundled
    config by name (...)": a pipeline's run folder, which holds no state of its own, was taken for a missing config
    (a review). A state put back without its config.toml (as the GPU scripts bring it) was refused the same way."""
    run = tmp_path / "run"
    teacher = run / "teacher"
    train_stage(_stage_config(image_folder, tmp_path, "teacher"), teacher)
    (teacher / "state.pt").rename(tmp_path / "teacher_state.pt")
    out = str(tmp_path / "x.safetensors")
    assert training_main(["export-state", str(teacher), "--out", out]) == 1
    assert (f"no saved state: {teacher / 'state.pt'} does not exist; {teacher} holds a finished stage: its checkpoint "
            f"is {teacher / 'final.safetensors'}") in capsys.readouterr().err
    assert training_main(["export-state", str(run), "--out", out]) == 1
    assert (f"{run} is a pipeline's run folder whose stages (teacher) are finished: their checkpoints are "
            f"{run}/<stage>/final.safetensors") in capsys.readouterr().err
    student = run / "student"
    with monkeypatch.context() as patch, pytest.raises(TrainingInterrupted):
        stop_at_step(patch, 3)
        train_stage(_stage_config(image_folder, tmp_path, "student"), student)
    assert training_main(["export-state", str(run), "--out", out]) == 1
    assert f"{run} is a pipeline's run folder: name the folder of a stage with a state, {student}" in \
        capsys.readouterr().err
    (student / "config.toml").unlink()  # the state alone: it keeps a copy of its config
    assert training_main(["export-state", str(student), "--out", out]) == 0
    assert "student at step 3 of 6" in capsys.readouterr().out
    assert training_main(["export-state", str(tmp_path / "absent"), "--out", out]) == 1
    assert f"{tmp_path / 'absent'} is not a folder" in capsys.readouterr().err


def test_snapshots_keep_the_network_part_way(image_folder: Path, tmp_path: Path) -> None:
    config = _stage_config(image_folder, tmp_path, "teacher")
    config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, snapshot_every=2))
    train_stage(config, tmp_path / "run")
    snapshots = sorted((tmp_path / "run" / "snapshots").iterdir())
    assert [p.name for p in snapshots] == ["step_2.safetensors", "step_4.safetensors"]  # step 6 is the final one
    weights = [load_checkpoint(p) for p in [*snapshots, tmp_path / "run" / "final.safetensors"]]
    assert [c.metadata["training"]["steps"] for c in weights] == [2, 4, 6]
    assert [c.metadata["training"].get("partial_of") for c in weights] == [6, 6, None]
    first, second, final = (c.model.state_dict() for c in weights)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(second[k], final[k]) for k in first)
    with pytest.raises(ValueError, match="snapshot_every"):
        load_config(SMOKE_CONFIG, ["runtime.snapshot_every=-1"])


def test_export_state_rejects_a_missing_or_foreign_state(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "teacher"
    train_stage(_stage_config(image_folder, tmp_path, "teacher"), run)
    out = str(tmp_path / "x.safetensors")
    final = (run / "final.safetensors").read_bytes()
    assert training_main(["export-state", str(run), "--out", str(run / "final.safetensors")]) == 1
    assert "is the stage's own final checkpoint" in capsys.readouterr().err  # it was replaced, marked partial_of
    assert training_main(["export-state", str(run), "--out", str(tmp_path / "x.onnx")]) == 1  # safetensors bytes
    assert "a checkpoint is a .safetensors file" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
    assert (run / "final.safetensors").read_bytes() == final
    (run / "state.pt").rename(tmp_path / "kept.pt")  # the state saved at the end, put aside
    assert training_main(["export-state", str(run), "--out", out]) == 1
    assert "no saved state" in capsys.readouterr().err
    torch.save({"step": 2, "model": {"network.other": torch.zeros(1)}}, tmp_path / "foreign.pt")
    assert training_main(["export-state", str(run), "--state", str(tmp_path / "foreign.pt"), "--out", out]) == 1
    assert "does not hold this config's teacher network" in capsys.readouterr().err
    torch.save([1, 2], tmp_path / "junk.pt")
    assert training_main(["export-state", str(run), "--state", str(tmp_path / "junk.pt"), "--out", out]) == 1
    assert "is not a training state" in capsys.readouterr().err
    (tmp_path / "text.pt").write_text("not a torch file")
    assert training_main(["export-state", str(run), "--state", str(tmp_path / "text.pt"), "--out", out]) == 1
    assert "is not a training state" in capsys.readouterr().err
    (run / "state.pt").write_bytes((tmp_path / "junk.pt").read_bytes()[:40])  # a truncated state: resume says so
    with pytest.raises(ValueError, match="is not a training state"):
        train_stage(_stage_config(image_folder, tmp_path, "teacher"), run, resume=True)
    (run / "state.pt").write_text("hello\n")  # torch's unpickler raises KeyError on this one
    with pytest.raises(ValueError, match="is not a training state"):
        train_stage(_stage_config(image_folder, tmp_path, "teacher"), run, resume=True)
    assert not Path(out).exists()


def test_resume_with_a_changed_network_says_so(image_folder: Path, tmp_path: Path) -> None:
    config = _stage_config(image_folder, tmp_path, "teacher")
    config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, checkpoint_every=1))
    train_stage(config, tmp_path / "run")
    wider = dataclasses.replace(config, experiment=dataclasses.replace(config.experiment, channels=12))
    with pytest.raises(ValueError, match="does not hold this config's teacher training state"):
        train_stage(wider, tmp_path / "run", resume=True)


def test_patches_too_small_for_a_network_are_refused_before_training(image_folder: Path, tmp_path: Path) -> None:
    """RLFN's ESA pools a 15-pixel LR window: a teacher needs 30-px HR patches at x2, a student 30 px too."""
    for role in ("teacher", "student"):
        config = _stage_config(image_folder, tmp_path, role)
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, patch_size=16))
        with pytest.raises(ValueError, match=r"data\.patch_size 16 is too small .* at least 30 px at x2"):
            train_stage(config, tmp_path / role)
        assert not (tmp_path / role / "metrics.jsonl").exists()


def test_two_guides_of_the_same_stage_name_are_refused(image_folder: Path, tmp_path: Path) -> None:
    """Loss terms are keyed by the guide's stage name: a second guide of the same name would drop the first's terms."""
    teacher = train_stage(_stage_config(image_folder, tmp_path, "teacher"), tmp_path / "teacher").checkpoint
    config = _stage_config(image_folder, tmp_path, "student", guides=[str(teacher), str(teacher)])
    with pytest.raises(ValueError, match="two guides are named 'teacher'"):
        train_stage(config, tmp_path / "student")


def _lr_at_each_step(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records}


def test_time_budget_ends_the_stage_and_its_cosine(image_folder: Path, tmp_path: Path) -> None:
    config = _stage_config(image_folder, tmp_path, "student")
    spent = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, time_budget_s=1e-6))
    result = train_stage(spent, tmp_path / "spent")
    assert result.steps == 1  # the budget was gone after one step: stop there, not at optim.steps = 6
    assert load_checkpoint(result.checkpoint).metadata["training"]["steps"] == 1
    assert _lr_at_each_step(tmp_path / "spent")[1] == pytest.approx(config.optim.lr_min)

    roomy = dataclasses.replace(spent, runtime=dataclasses.replace(spent.runtime, time_budget_s=1e6))
    assert train_stage(roomy, tmp_path / "roomy").steps == config.optim.steps  # never past the configured steps
    assert min(_lr_at_each_step(tmp_path / "roomy").values()) > 0.99 * config.optim.lr  # a tiny share of the time


def _with_budget(config, seconds: float):
    return dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, time_budget_s=seconds))


def test_a_run_its_budget_ended_goes_on_with_a_larger_budget(image_folder: Path, tmp_path: Path) -> None:
    """The share of the old budget was restored and compared with 1 against any new budget: a resume with more
    seconds said the run was finished and asked for more seconds. The same budget still finds it finished."""
    config = _stage_config(image_folder, tmp_path, "student")
    assert train_stage(_with_budget(config, 1e-6), tmp_path / "run").steps == 1
    with pytest.raises(ValueError, match=r"finished at step 1 of 6: .*--set runtime\.time_budget_s=S"):
        train_stage(_with_budget(config, 1e-6), tmp_path / "run", resume=True)
    assert train_stage(_with_budget(config, 1e6), tmp_path / "run", resume=True).steps == config.optim.steps
    lrs = _lr_at_each_step(tmp_path / "run")
    assert min(lrs[step] for step in range(2, 7)) > 0.99 * config.optim.lr  # the cosine now spans the new budget


def test_a_resume_takes_the_budget_share_as_saved_or_against_a_new_budget(image_folder: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = _with_budget(_stage_config(image_folder, tmp_path, "student"), 1e6)
    stop_at_step(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        train_stage(config, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    same = _Trainer(config, tmp_path / "run", Dist())
    same._load_state()
    assert same.budget_spent == state["budget_spent"] > 0  # the same budget: exactly where it stopped
    doubled = _Trainer(_with_budget(config, 2e6), tmp_path / "run", Dist())
    doubled._load_state()
    assert doubled.budget_spent == state["seconds"] / 2e6
    assert "time budget" not in capsys.readouterr().out
    unbudgeted = _Trainer(_with_budget(config, 0), tmp_path / "run", Dist())
    unbudgeted._load_state()
    assert unbudgeted.budget_spent == 0  # no budget: only the steps end the stage
    # ... and its cosine jumps back to the steps' share: said, since it looked like a restarted schedule
    assert (f"note: {tmp_path / 'run' / 'state.pt'} ran under a time budget of 1e+06 s (0% spent); without one "
            "(runtime.time_budget_s = 0) the stage ends at its 6 steps, so its learning-rate cosine now follows the "
            "steps: 33% of the way, not 0%") in capsys.readouterr().out


def test_the_cosine_runs_over_the_steps_without_a_budget(image_folder: Path, tmp_path: Path) -> None:
    config = _stage_config(image_folder, tmp_path, "student")
    train_stage(config, tmp_path / "plain")
    lrs = _lr_at_each_step(tmp_path / "plain")
    assert lrs[1] < config.optim.lr and lrs[config.optim.steps] == pytest.approx(config.optim.lr_min)
    assert list(lrs.values()) == sorted(lrs.values(), reverse=True)


def test_nan_loss_stops_with_the_step(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _stage_config(image_folder, tmp_path, "student")
    original_forward, original_step = Distillation.forward, _Trainer._step
    steps = {"n": 0}

    def counted(self, loss_module, batch, step):  # the forwards of training steps (not the memory probe's)
        steps["n"] += 1
        return original_step(self, loss_module, batch, step)

    def poisoned(self, lr, hr):
        terms = original_forward(self, lr, hr)
        if steps["n"] == 4:
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(_Trainer, "_step", counted)
    monkeypatch.setattr(Distillation, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 4"):
        train_stage(config, tmp_path / "nan")


def _write_config(tmp_path: Path, folder: Path, steps: int) -> Path:
    text = SMOKE_CONFIG.read_text().split("[[data.sources]]")[0]
    text += f'[[data.sources]]\nkind = "folder"\npath = "{folder}"\n\n[stage]\nname = "teacher"\nrole = "teacher"\n'
    path = tmp_path / "config.toml"
    path.write_text(text.replace("steps = 12", f"steps = {steps}"))
    return path


def test_a_stage_starts_from_and_learns_from_bundled_checkpoints_by_name(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """init_from and guides took file paths only ('checkpoint 'rlfn_teacher_takdsr_x2': file not found'), where every
    other command takes a bundled checkpoint's name."""
    from models import WEIGHTS_DIR

    monkeypatch.chdir(tmp_path)  # no file of that name here: the bundled one is meant
    config = _write_config(tmp_path, image_folder, steps=1)
    name = "rlfn_teacher_takdsr_x2"
    assert training_main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run"),
                          "--set", 'stage.name="student"', "--set", 'stage.role="student"',
                          "--set", f'stage.init_from="{name}"', "--set", f'stage.guides=["{name}"]',
                          "--set", "experiment.channels=52", "--set", "experiment.teacher_blocks=6",
                          "--set", "experiment.encoder_channels=56", "--set", "eval.cg_dev=false"]) == 0  # fmt: skip
    training = read_metadata(tmp_path / "run" / "final.safetensors")["training"]
    assert training["guides"] == [name] and training["init_from"] == name  # not "weights", their folder
    assert training["config"]["stage"]["guides"] == [str(WEIGHTS_DIR / f"{name}.safetensors")]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_saves_state_and_exits_cleanly(image_folder: Path, tmp_path: Path, signum: int) -> None:
    config = _write_config(tmp_path, image_folder, steps=100_000)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "training", "train", "--config", str(config), "--run-dir", str(run_dir),
               "--set", "runtime.log_every=1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "metrics.jsonl").exists() or len(_losses(run_dir)) < 2:
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.2)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, stderr
    resume = f"resume with `python -m training train --resume {run_dir}`"
    assert f"interrupted by {signal.Signals(signum).name}" in stderr and resume in stderr, stderr
    state = torch.load(run_dir / "state.pt", weights_only=True)
    assert state["step"] == max(_losses(run_dir))
    if signum != signal.SIGINT:
        return
    # the printed command continues the run with its own config; another --config is refused and changes nothing
    saved = (run_dir / "config.toml").read_text()
    other = subprocess.run([sys.executable, "-m", "training", "train", "--config", str(SMOKE_CONFIG), "--resume",
                            str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert other.returncode == 1 and "differs from the config" in other.stderr, other.stderr
    assert (run_dir / "config.toml").read_text() == saved
    steps = state["step"] + 2
    command = [sys.executable, "-m", "training", "train", "--resume", str(run_dir), "--set", f"optim.steps={steps}"]
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    final = load_checkpoint(run_dir / "final.safetensors")
    assert max(_losses(run_dir)) == steps and final.metadata["training"]["steps"] == steps


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # it just ended
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_scene_workers_end_with_a_killed_trainer(tmp_path: Path) -> None:
    # Scene sources start their workers by forkserver, whose workers torch does not tie to the trainer.
    text = SMOKE_CONFIG.read_text().replace("steps = 12", "steps = 100000").replace("workers = 0", "workers = 1")
    config = tmp_path / "config.toml"
    config.write_text(text + '\n[stage]\nname = "teacher"\nrole = "teacher"\n')
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "training", "train", "--config", str(config), "--run-dir", str(run_dir),
               "--set", "runtime.log_every=1"]  # fmt: skip
    with open(tmp_path / "log.txt", "w") as log:  # not a pipe: surviving workers would hold it open
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists():
            assert time.monotonic() < deadline and process.poll() is None, (tmp_path / "log.txt").read_text()
            time.sleep(0.2)
        workers = _descendants(process.pid)
        assert workers  # the fork server and the worker, at least
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 20
        while (alive := {pid for pid in workers if Path(f"/proc/{pid}").exists()}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"still running after the trainer was killed: {sorted(alive)}"
    finally:
        process.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_ddp_two_cpu_processes_with_gloo(image_folder: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun comes with torch, next to this python"
    config = _write_config(tmp_path, image_folder, steps=4)
    run_dir = tmp_path / "ddp"
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training", "train", "--config", str(config),
               "--run-dir", str(run_dir), "--set", "runtime.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(run_dir / "final.safetensors")
    assert checkpoint.metadata["training"]["world_size"] == 2
    assert checkpoint.metadata["training"]["steps"] == 4


def test_ddp_ranks_stop_together_when_one_alone_gets_the_signal(image_folder: Path, tmp_path: Path) -> None:
    """From a walkthrough: a SIGTERM to rank 1 alone (a worker's own kill; torchrun passes one to each worker in
    turn) stopped rank 1, which printed a resume command, while rank 0 died in its next step's collective with a
    gloo traceback and saved nothing. Rank 1 here takes the signal's flag after its second step, as its handler
    would; both ranks now stop after that step, and rank 0 saves the state the resume command names."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun comes with torch, next to this python"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""
        import os, signal, sys
        from training.trainer import _Trainer
        step_of = _Trainer._step
        def step_then_signalled(self, loss_module, batch, step):
            terms = step_of(self, loss_module, batch, step)
            if os.environ["RANK"] == "1" and step + 1 == 2:
                self.stop_requested, self.stop_signal = True, signal.SIGTERM
            return terms
        _Trainer._step = step_then_signalled
        from training.__main__ import main
        sys.exit(main(sys.argv[1:]))
    """))
    config = _write_config(tmp_path, image_folder, steps=6)
    run_dir = tmp_path / "ddp"
    command = [torchrun, "--standalone", "--nproc_per_node", "2", str(driver), "train", "--config", str(config),
               "--run-dir", str(run_dir), "--set", "runtime.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert result.stderr.count("stopped: interrupted by SIGTERM at step 2;") == 1, result.stderr[-3000:]  # rank 0's
    assert "Connection closed by peer" not in result.stderr and "training/trainer.py" not in result.stderr
    assert torch.load(run_dir / "state.pt", weights_only=True)["step"] == 2  # what `--resume` goes on from


def test_under_torchrun_only_rank_0_evaluates_and_commands_of_one_process_are_refused(image_folder: Path,
                                                                                        tmp_path: Path) -> None:
    """From a walkthrough: every rank ran the pipeline's whole evaluation and wrote its report, and `ship` ran in each
    rank, racing for the same files (one rank then failed the job although the files were shipped)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun comes with torch, next to this python"
    config = _write_config(tmp_path, image_folder, steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pipeline = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training", "pipeline", "--config",
                str(config), "--run-dir", str(tmp_path / "run"), "--set", "runtime.threads=1", "--set",
                "experiment.baselines=false", "--set", "eval.rendered_val=false", "--set", "eval.cg_dev=false",
                "--set", f'eval.folders=["{image_folder}"]', "--set", "eval.latency_repeats=1"]
    result = subprocess.run(pipeline, cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("report: ") == 1 and result.stdout.count("teacher: 2 steps in") == 1, result.stdout
    ship = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training", "ship", str(tmp_path / "run"),
            "--out", str(tmp_path / "weights")]
    result = subprocess.run(ship, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode != 0 and result.stderr.count("error: ship runs in one process; run it without "
                                                          "torchrun (only train and pipeline") == 1, result.stderr
    assert not (tmp_path / "weights").exists()


def test_ddp_pipeline_stages_wait_for_each_others_checkpoint(image_folder: Path, tmp_path: Path) -> None:
    """Only rank 0 writes a stage's checkpoint: rank 1 used to start the next stage before it existed and fail with
    "stage ta1 needs .../teacher/final.safetensors". And one process group serves every stage: a new group per
    stage sometimes hung both ranks between two stages."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    config = _write_config(tmp_path, image_folder, steps=2)
    run_dir = tmp_path / "ddp"
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training", "pipeline", "--config",
               str(config), "--run-dir", str(run_dir), "--stages", "teacher,ta1,student_takdsr", "--set",
               "runtime.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("ta1", "student_takdsr"):
        assert load_checkpoint(run_dir / stage / "final.safetensors").metadata["training"]["world_size"] == 2


def test_smoke_pipeline_end_to_end(image_folder: Path, tmp_path: Path) -> None:
    config = load_config(
        SMOKE_CONFIG,
        [f'data.sources=[{{kind="folder", path="{image_folder}"}}]', "eval.rendered_val=false", "eval.cg_dev=false",
         f'eval.folders=["{image_folder}"]', "eval.latency_repeats=1"],
    )
    run_dir = tmp_path / "smoke"
    results = run_pipeline(config, run_dir)
    for stage in ("teacher", "ta1", "student_takdsr", "teacher_continuous", "student_pisr", "student_alone"):
        checkpoint = load_checkpoint(run_dir / stage / "final.safetensors")
        assert checkpoint.metadata["training"]["steps"] == 12
    assert load_checkpoint(run_dir / "ta1" / "final.safetensors").metadata["training"]["mix"] == [0.3, 0.7]
    saved = json.loads((run_dir / "results.json").read_text())
    scores = saved["sets"][image_folder.name]["scores"]
    assert {"bicubic", "lanczos", "X_s", "PISR'", "TAKDSR", "TA", "teacher"} <= set(scores)
    assert results["sets"][image_folder.name]["scores"]["bicubic"]["mean"]["psnr_rgb"] > 10
    assert saved["models"]["TAKDSR"]["latency"]["median_ms"] > 0
    assert saved["models"]["TAKDSR"]["latency"]["threads"] == len(os.sched_getaffinity(0))  # whatever training set
    assert saved["environment"]["torch"] == torch.__version__ and saved["environment"]["evaluated_on"].startswith("cpu")
    report = (run_dir / "report.md").read_text()
    assert "TAKDSR" in report and "PISR'" in report
    for plot in ("loss_curves.png", "psnr_per_model.png", f"crops_{image_folder.name}.png"):
        assert (run_dir / plot).stat().st_size > 1000

    index = ship_run(run_dir, tmp_path / "weights")
    assert json.loads((tmp_path / "weights" / "weights.json").read_text()) == index
    assert {entry["report_name"] for entry in index.values()} == {"TAKDSR", "TA", "teacher", "PISR'", "X_s",
                                                                  "teacher (continuous)"}  # fmt: skip
    student = load_checkpoint(tmp_path / "weights" / "rlfn_s_takdsr_x2.safetensors")
    expected_psnr = scores["TAKDSR"]["mean"]["psnr_rgb"]
    assert student.metadata["training"]["metrics"][image_folder.name]["psnr_rgb"] == expected_psnr
    # smoke_cpu scores 2 images cropped to 96 px: the shipped scores say so (they passed for whole-set ones)
    covered = {image_folder.name: {"images": 2, "crop": 96, "max_images": 2}}
    assert saved["sets"][image_folder.name]["crop"] == 96 and saved["sets"][image_folder.name]["max_images"] == 2
    assert student.metadata["training"]["evaluation"] == covered == index["rlfn_s_takdsr_x2.safetensors"]["evaluation"]
    assert cut_down_evaluation(index["rlfn_s_takdsr_x2.safetensors"]) == f"{image_folder.name}: 2 image(s) cropped " \
                                                                           "to 96 px"

    only_student = ship_run(run_dir, tmp_path / "students", stages=["student_takdsr"])
    assert list(only_student) == ["rlfn_s_takdsr_x2.safetensors"] == [p.name for p in
                                                                       (tmp_path / "students").glob("*.safetensors")]
    assert only_student["rlfn_s_takdsr_x2.safetensors"] == index["rlfn_s_takdsr_x2.safetensors"]
    with pytest.raises(ValueError, match="cannot ship stage"):
        ship_run(run_dir, tmp_path / "students", stages=["student_takdsr", "ta7"])

    # a failed ship keeps weights.json in step with the files: those replaced before the failure are indexed
    other_run = tmp_path / "smoke2"  # another run name: the shipped files' bytes differ from the first ship's
    shutil.copytree(run_dir, other_run)
    before = {p.name: p.read_bytes() for p in (tmp_path / "weights").iterdir()}
    with pytest.raises(FileExistsError, match="pass --overwrite to replace them"):  # it replaced them without a word
        ship_run(other_run, tmp_path / "weights")
    assert {p.name: p.read_bytes() for p in (tmp_path / "weights").iterdir()} == before
    (tmp_path / "weights" / "rlfn_s_pisr_x2.safetensors").unlink()
    (tmp_path / "weights" / "rlfn_s_pisr_x2.safetensors").mkdir()  # its write fails, after three others
    with pytest.raises(OSError):
        ship_run(other_run, tmp_path / "weights", overwrite=True)
    index = json.loads((tmp_path / "weights" / "weights.json").read_text())
    replaced = [name for name in index if (tmp_path / "weights" / name).is_file()
                and read_metadata(tmp_path / "weights" / name)["training"]["run"] == "smoke2"]
    assert sorted(replaced) == ["rlfn_s_takdsr_x2.safetensors", "rlfn_ta_takdsr_x2.safetensors",
                                "rlfn_teacher_takdsr_x2.safetensors"]  # fmt: skip
    for name, entry in index.items():
        if (tmp_path / "weights" / name).is_file():
            assert file_sha256(tmp_path / "weights" / name) == entry["sha256"], name
    shutil.rmtree(tmp_path / "weights" / "rlfn_s_pisr_x2.safetensors")
    ship_run(run_dir, tmp_path / "weights", overwrite=True)  # as it was, for the checks below

    unscored = json.loads((run_dir / "results.json").read_text())
    del unscored["models"]["PISR'"]
    (run_dir / "results.json").write_text(json.dumps(unscored))
    before = {p.name: p.read_bytes() for p in (tmp_path / "weights").iterdir()}
    with pytest.raises(ValueError, match="has no scores for PISR'"):
        ship_run(run_dir, tmp_path / "weights", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "weights").iterdir()} == before  # nothing replaced


def test_pipeline_stages_run_separately_then_evaluate(image_folder: Path, tmp_path: Path) -> None:
    config = tiny_config(image_folder, experiment={"baselines": False}, optim={"steps": 2},
                         eval={"latency_repeats": 0, "crops_for_figure": 0})  # fmt: skip
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="unknown stage"):
        run_pipeline(config, run_dir, ["teacher", "student_pisr"])  # no baselines in this experiment
    teacher = run_dir / "teacher" / "final.safetensors"  # a TA starts from it and learns from it: named once
    with pytest.raises(FileNotFoundError, match=rf"^stage ta1 needs {teacher}: train those stages first$"):
        run_pipeline(config, run_dir, ["ta1"])
    assert run_pipeline(config, run_dir, ["teacher"]) is None
    assert (run_dir / "teacher" / "final.safetensors").exists() and not (run_dir / "ta1").exists()
    run_pipeline(config, run_dir, ["ta1"])
    results = run_pipeline(config, run_dir)  # trains only what is left (the student), then evaluates
    assert load_checkpoint(run_dir / "student_takdsr" / "final.safetensors").metadata["training"]["steps"] == 2
    assert {"TAKDSR", "TA", "teacher"} <= set(results["sets"][image_folder.name]["scores"])
    # a run without baselines ships the stages it has (it failed on the missing student_pisr), and the shipped guides
    # seed a new run whose student trains from them: shipping re-saves them with their scores, which must not make
    # the TA's record of its teacher look stale
    shipped = ship_run(run_dir, tmp_path / "weights")
    assert sorted(shipped) == ["rlfn_s_takdsr_x2.safetensors", "rlfn_ta_takdsr_x2.safetensors",
                               "rlfn_teacher_takdsr_x2.safetensors"]  # fmt: skip
    seed_run(tmp_path / "seeded", ["teacher", "ta1"], weights_dir=tmp_path / "weights")
    run_pipeline(config, tmp_path / "seeded", ["student_takdsr"])
    assert (tmp_path / "seeded" / "student_takdsr" / "final.safetensors").exists()


def test_ship_refuses_scores_of_other_weights(image_folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A stage trained again after the run's evaluation (its folder removed, `pipeline --stages` with other steps)
    shipped with the old results.json scores, and a run that was never evaluated was an Errno 2 about results.json."""
    config = tiny_config(image_folder, experiment={"baselines": False}, optim={"steps": 1},
                         eval={"latency_repeats": 0, "crops_for_figure": 0})  # fmt: skip
    run_dir = tmp_path / "run"
    run_pipeline(config, run_dir, ["teacher", "ta1", "student_takdsr"])
    with pytest.raises(FileNotFoundError, match=r"run has not been evaluated \(it has no results\.json\): evaluate "
                                                r"it: python -m training pipeline --config CONFIG --run-dir .*run \("):
        ship_run(run_dir, tmp_path / "weights")
    run_pipeline(config, run_dir)
    # a stage ship does not take (a second TA here) is named, not left out without a word
    (run_dir / "ta2").mkdir()
    shutil.copyfile(run_dir / "ta1" / "final.safetensors", run_dir / "ta2" / "final.safetensors")
    capsys.readouterr()
    assert training_main(["ship", str(run_dir), "--out", str(tmp_path / "all")]) == 0
    assert (f"note: not shipped, as ship takes only {', '.join(SHIPPED)}: ta2 (in {run_dir})"
            in capsys.readouterr().err)  # fmt: skip
    shutil.rmtree(run_dir / "ta2")
    again = rf"evaluate again: python -m training pipeline --config {run_dir}/config\.toml --run-dir {run_dir}$"
    shutil.rmtree(run_dir / "student_takdsr")
    run_pipeline(tiny_config(image_folder, experiment={"baselines": False, "student_steps": 2}, optim={"steps": 1}),
                 run_dir, ["student_takdsr"])  # fmt: skip
    with pytest.raises(ValueError, match=r"results\.json \(TAKDSR\) scored other weights than .*student_takdsr/"
                                         rf"final\.safetensors holds: another checkpoint scored under that label, "
                                         rf"or this one trained again since; {again}"):
        ship_run(run_dir, tmp_path / "weights", stages=["student_takdsr"])
    results = json.loads((run_dir / "results.json").read_text())
    del results["models"]["TA"]["weights_sha256"]  # a results.json written before the hashes were recorded
    (run_dir / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match=rf"\(TA\) does not record which weights it scored .*; {again}"):
        ship_run(run_dir, tmp_path / "weights", stages=["ta1"])
    assert ship_run(run_dir, tmp_path / "weights", stages=["teacher"])  # the teacher scored is the one shipped
    assert not (tmp_path / "weights" / "rlfn_s_takdsr_x2.safetensors").exists()
    with pytest.raises(FileNotFoundError, match=r"teacher has not been evaluated .* one stage's `train` folder; score "
                                                r"it with `python -m training evaluate --checkpoint"):
        ship_run(run_dir / "teacher", tmp_path / "weights")


def test_a_seeded_teacher_of_another_shape_is_refused(image_folder: Path, tmp_path: Path) -> None:
    """The bundled 52-channel 6-block teacher seeded into a run whose config says 8 channels and 2 blocks gave a
    52-channel student, and metadata saying 8 channels: the network took the teacher's width without a word."""
    seed_run(tmp_path / "run", ["teacher", "ta1"], weights_dir=WEIGHTS_DIR)
    config = tiny_config(image_folder, experiment={"baselines": False}, optim={"steps": 1})
    teacher = tmp_path / "run" / "teacher" / "final.safetensors"
    with pytest.raises(ValueError, match=rf"init_from {teacher} is not a teacher of this experiment: "
                                         r"experiment.channels is 8, the teacher's 52; experiment.teacher_blocks is 2, "
                                         r"the teacher's 6; experiment.encoder_channels is 8, the teacher's 56\. Set"):
        run_pipeline(config, tmp_path / "run", ["student_takdsr"])
    assert not (tmp_path / "run" / "student_takdsr" / "final.safetensors").exists()
    with pytest.raises(ValueError, match=r"experiment.family is 'rfdn', the teacher's 'rlfn'\."):
        run_pipeline(tiny_config(image_folder, experiment={"baselines": False, "family": "rfdn", "channels": 52,
                                                           "teacher_blocks": 6, "encoder_channels": 56}),
                     tmp_path / "run", ["student_takdsr"])  # fmt: skip


def test_pipeline_checks_its_evaluation_folders_before_training(image_folder: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing evaluation folder (here cg-dev, with the shared folder elsewhere) fails before any stage trains."""
    monkeypatch.setenv("TAKDSR_SHARED", str(tmp_path / "no-shared"))
    config = tiny_config(image_folder, experiment={"baselines": False}, optim={"steps": 1},
                         eval={"cg_dev": True, "folders": [str(image_folder), str(tmp_path / "gone")]})  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"no-shared/data/cg-dev \(cg-dev; the shared data folder is "
                                                r"\$TAKDSR_SHARED=.*no-shared; or score without it: --set "
                                                r"eval.cg_dev=false for a config, --sets or --data for evaluate\); "
                                                r".*/gone$"):
        run_pipeline(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing trained
    with pytest.warns(UserWarning, match=r"\$TAKDSR_SHARED=.*no-shared does not exist: no evaluation data there"):
        assert run_pipeline(config, tmp_path / "run", ["teacher"]) is None  # a stage alone does not evaluate


@pytest.mark.parametrize(("crop", "scale", "minimum"), [(3, 2, 30), (29, 2, 30), (44, 3, 45)])
def test_an_evaluation_crop_too_small_for_the_networks_is_refused_before_training(
    image_folder: Path, tmp_path: Path, crop: int, scale: int, minimum: int
) -> None:
    """RLFN needs 15 LR pixels: a smaller eval.crop failed in the evaluation, after every stage had trained."""
    patch = 48 if scale == 3 else 32
    config = tiny_config(image_folder, experiment={"baselines": False, "scale": scale}, optim={"steps": 1},
                         data={"scale": scale, "patch_size": patch}, eval={"crop": crop})  # fmt: skip
    with pytest.raises(ValueError, match=rf"eval.crop {crop} is too small: the networks need HR crops of at least "
                                         rf"{minimum} px at x{scale}"):
        run_pipeline(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing trained


def test_pipeline_with_three_tas_trains_and_scores_each(image_folder: Path, tmp_path: Path) -> None:
    """Any number of TAs: each is scored with the teacher's CF' and named TA, TA2, TA3 in the results."""
    config = tiny_config(image_folder, experiment={"baselines": False, "teacher_blocks": 4, "ta_blocks": [3, 2, 1]},
                         optim={"steps": 1}, eval={"latency_repeats": 0, "crops_for_figure": 0})  # fmt: skip
    results = run_pipeline(config, tmp_path / "run")
    scores = results["sets"][image_folder.name]["scores"]
    assert {"TAKDSR", "TA3", "TA2", "TA", "teacher"} <= set(scores)
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.index("| TA3 ") < report.index("| TA2 ") < report.index("| TA ") < report.index("| teacher ")


def test_full_reference_is_the_whole_backbone_trained_alone(image_folder: Path, tmp_path: Path) -> None:
    config = tiny_config(image_folder, experiment={"baselines": False, "full_reference": True, "teacher_steps": 2},
                         optim={"steps": 1}, eval={"latency_repeats": 0, "crops_for_figure": 0})  # fmt: skip
    full = {stage.name: stage for stage in pipeline_stages(config, tmp_path / "run")}["full_alone"]
    assert (full.role, full.blocks, full.steps, full.guides, full.init_from) == ("student", 2, 2, [], "")
    results = run_pipeline(config, tmp_path / "run")
    checkpoint = load_checkpoint(tmp_path / "run" / "full_alone" / "final.safetensors")
    assert checkpoint.model.config.blocks == 2 and checkpoint.metadata["training"]["steps"] == 2
    assert "full backbone" in results["sets"][image_folder.name]["scores"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.index("| TA ") < report.index("| full backbone ") < report.index("| teacher ")


def test_latency_command(tmp_path: Path) -> None:
    output = tmp_path / "latency.json"
    command = [sys.executable, "-m", "training", "latency", "rlfn_s", "--input", "64x48", "--repeats", "2",
               "--json", str(output)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    timing = json.loads(output.read_text())["rlfn_s"]
    assert timing["median_ms"] > 0 and timing["input"] == "64x48"


def test_two_tas_get_dense_guidance(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, experiment={"teacher_blocks": 4, "ta_blocks": [3, 2]})
    stages = {stage.name: stage for stage in pipeline_stages(config, tmp_path)}
    final = {name: str(tmp_path / name / "final.safetensors") for name in stages}
    assert stages["ta1"].guides == [final["teacher"]] and stages["ta1"].blocks == 3
    assert stages["ta2"].guides == [final["teacher"], final["ta1"]] and stages["ta2"].blocks == 2
    assert stages["student_takdsr"].guides == [final["teacher"], final["ta1"], final["ta2"]]
    assert stages["student_pisr"].guides == [final["teacher_continuous"]] and not stages["student_alone"].guides

    teacher, ta1 = _teacher(), build_model("rlfn", channels=8, blocks=1).eval()
    ta2 = build_model("rlfn", channels=8, blocks=1)
    guides = [Guide("teacher", teacher), Guide("ta1", ta1, (0.3, 0.7))]
    terms = Distillation(TrainedModel(ta2), guides, mix=(0.3, 0.7))(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 32, 32))
    assert {"out_teacher", "feat_teacher", "out_ta1", "feat_ta1"} <= set(terms)


def test_train_parallel_script_runs_stages_side_by_side(image_folder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sets = ["--set", f'data.sources=[{{kind="folder", path="{image_folder}"}}]', "--set", "runtime.workers=0",
            "--set", "experiment.channels=8", "--set", "experiment.encoder_channels=8"]  # fmt: skip
    command = ["bash", str(REPO / "scripts" / "train_parallel.sh"), str(SMOKE_CONFIG), str(run_dir), "30",
               "teacher,student_alone", *sets]  # fmt: skip
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "teacher: done" in result.stdout and "student_alone: done" in result.stdout
    for stage in ("teacher", "student_alone"):
        training = load_checkpoint(run_dir / stage / "final.safetensors").metadata["training"]
        assert training["config"]["runtime"]["time_budget_s"] == 30 and training["steps"] >= 1
    assert not (run_dir / "ta1").exists()  # only the stages asked for

    failed = subprocess.run([*command[:5], "ta1,nonsense", *sets], cwd=REPO, capture_output=True, text=True,
                            timeout=240, env=env)  # fmt: skip
    assert failed.returncode == 1 and "nonsense: exit 1" in failed.stdout


def _matched_students(run_dir: Path, out_dir: Path, steps: int, image_folder: Path) -> list[str]:
    """The command of scripts/matched_students.sh at tiny settings (the shipped 52-channel guides, small patches)."""
    sets = [f'data.sources=[{{kind="folder", path="{image_folder}"}}]', "data.patch_size=48", "optim.batch_size=2",
            "runtime.workers=0", "runtime.threads=1", "runtime.checkpoint_every=1"]  # fmt: skip
    return ["bash", str(REPO / "scripts" / "matched_students.sh"), str(run_dir), str(out_dir), str(steps),
            *(arg for item in sets for arg in ("--set", item))]  # fmt: skip


MATCHED = {"student_takdsr": (["teacher", "ta1"], "teacher"), "student_pisr": (["teacher_continuous"],
           "teacher_continuous"), "student_alone": ([], None)}  # fmt: skip


def test_matched_students_train_equal_steps_from_the_shipped_guides(image_folder: Path, tmp_path: Path) -> None:
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(_matched_students(run_dir, out_dir, 2, image_folder), cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for stage, (guides, init_from) in MATCHED.items():
        training = load_checkpoint(out_dir / f"{stage}.safetensors").metadata["training"]
        seen = (training["steps"], training["batch_size"], training["guides"], training["init_from"])
        assert seen == (2, 2, guides, init_from), stage
        assert training["config"]["runtime"]["time_budget_s"] == 0  # the cosine runs over the steps
    for stage, shipped in (("teacher", "rlfn_teacher_takdsr_x2"), ("ta1", "rlfn_ta_takdsr_x2"),
                           ("teacher_continuous", "rlfn_teacher_continuous_x2")):  # fmt: skip
        shipped_bytes = (REPO / "models" / "weights" / f"{shipped}.safetensors").read_bytes()
        assert (run_dir / stage / "final.safetensors").read_bytes() == shipped_bytes


def test_matched_students_stopped_by_ctrl_c_hand_back_their_state(image_folder: Path, tmp_path: Path) -> None:
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    process = subprocess.Popen(_matched_students(run_dir, out_dir, 100_000, image_folder), cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # every trainer has saved a state, so each has its Ctrl-C handler
        while not all((run_dir / stage / "state.pt").exists() for stage in MATCHED) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole group, as from a terminal or `timeout`
        output, _ = process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output  # train_parallel.sh passed the Ctrl-C on and exits 130
    for stage in MATCHED:
        assert f"{stage}: exit 130" in output
        state = torch.load(out_dir / f"{stage}.state.pt", weights_only=True)
        assert 1 <= state["step"] < 100_000
    assert not list(out_dir.glob("*.safetensors"))

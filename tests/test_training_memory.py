"""A batch too large for the machine: refused before training with the largest batch that fits (it was the kernel's
OOM killer on a CPU, with no word and no state; an allocator traceback on CUDA), and running out of memory in a step
is one error naming the settings to change."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import training.memory as memory
import training.trainer as trainer_module
from training.__main__ import main as training_main
from training.config import StageConfig, dump_toml
from training.memory import StepMemory, available_memory_bytes, is_out_of_memory, measure_step_memory
from training.trainer import OutOfMemoryError, _init_distributed, _Trainer, train_stage

from training_utils import make_image_folder, tiny_config

FLOAT = 4  # bytes


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def _teacher_config(folder: Path, **optim: object):
    config = tiny_config(folder, optim=optim) if optim else tiny_config(folder)
    return dataclasses.replace(config, stage=StageConfig(name="teacher", role="teacher"))


def _patches(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(samples, 3, 8, 8), torch.zeros(samples, 3, 16, 16)


def test_the_step_memory_is_the_patches_and_what_autograd_saves() -> None:
    weight = torch.ones(3, 1, 1, requires_grad=True)

    def loss(lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        # mul saves hr for the weight's gradient (counted once, with the inputs); each relu saves its output: one HR
        # patch a sample, and the weight's size once
        return torch.relu(hr * weight).sum() + torch.relu(weight).sum() + lr.sum()

    step = measure_step_memory(loss, _patches)
    patches = 3 * 8 * 8 * FLOAT + 3 * 16 * 16 * FLOAT
    assert step.per_sample == patches + 3 * 16 * 16 * FLOAT
    assert step.fixed == weight.nbytes
    assert step.need(5) == weight.nbytes + 5 * step.per_sample


def test_the_largest_batch_is_the_last_that_fits() -> None:
    step = StepMemory(fixed=100, per_sample=10)
    assert step.largest_batch(step.need(7)) == 7
    assert step.largest_batch(step.need(7) - 1) == 6
    assert step.largest_batch(50) == 0


def test_free_cpu_memory_is_the_least_of_meminfo_and_every_cgroup_limit(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       9000 kB\nMemAvailable:   8000 kB\n")
    cgroups = tmp_path / "cgroup"
    for folder, files in {"game": {"memory.max": "1000000\n", "memory.current": "400000\n"},
                          "game/trainer": {"memory.max": "max\n", "memory.current": "100000\n"},
                          "memory/box": {"memory.limit_in_bytes": "9223372036854771712\n",
                                         "memory.usage_in_bytes": "100\n"},
                          "memory": {"memory.limit_in_bytes": "700000\n", "memory.usage_in_bytes": "200000\n"}}.items():
        (cgroups / folder).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (cgroups / folder / name).write_text(text)
    own = tmp_path / "self_cgroup"
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    monkeypatch.setattr(memory, "CGROUP_DIR", cgroups)
    monkeypatch.setattr(memory, "PROC_CGROUP", own)
    cpu = torch.device("cpu")

    own.write_text("0::/game/trainer\n")  # v2: the limit sits on the parent group
    assert available_memory_bytes(cpu) == 600000
    own.write_text("4:cpu,memory:/box\n1:cpu:/\nnot a cgroup line\n")  # v1: the limit sits on the root group
    assert available_memory_bytes(cpu) == 500000
    own.write_text("0::/\n")  # no limit anywhere: MemAvailable alone
    assert available_memory_bytes(cpu) == 8000 * 1024
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "missing")
    assert available_memory_bytes(cpu) is None  # nothing known: nothing is checked


def test_out_of_memory_errors_are_told_from_others() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"))
    assert not is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
    assert not is_out_of_memory(ValueError("can't allocate memory"))


def test_a_batch_no_machine_holds_is_refused_before_training(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(OutOfMemoryError, match=r"optim\.batch_size 10000000 of 32 px patches needs at least "
                                               r"[\d.]+ GiB of cpu memory for one step of teacher, and [\d.]+ GiB "
                                               r"is free: a batch of at most \d+ fits that bound"):
        train_stage(_teacher_config(image_folder, batch_size=10_000_000), run)
    assert not (run / "state.pt").exists() and not (run / "metrics.jsonl").exists()


def test_the_refusal_comes_at_the_first_batch_beyond_the_measured_bound(image_folder: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = _teacher_config(image_folder, batch_size=3, steps=2)
    step = _Trainer(config, tmp_path / "probe", _init_distributed("cpu"))._step_memory()
    assert step.per_sample > 3 * 32 * 32 * FLOAT  # more than the HR patch alone: the network's saved tensors

    monkeypatch.setattr(trainer_module, "available_memory_bytes", lambda device: step.need(3) - 1)
    with pytest.raises(OutOfMemoryError, match="a batch of at most 2 fits that bound"):
        train_stage(config, tmp_path / "refused")
    monkeypatch.setattr(trainer_module, "available_memory_bytes", lambda device: step.need(3))
    assert train_stage(config, tmp_path / "fits").steps == 2


def test_running_out_of_memory_in_a_step_is_one_error_naming_the_settings(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(image_folder, runtime={"checkpoint_every": 1})
    config_file = tmp_path / "config.toml"
    config_file.write_text(dump_toml(config.to_dict()))
    real_step = _Trainer._step

    def out_of_memory_at_step_3(self: _Trainer, loss_module, batch, step):  # type: ignore[no-untyped-def]
        if step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nIf reserved but ...")
        return real_step(self, loss_module, batch, step)

    monkeypatch.setattr(_Trainer, "_step", out_of_memory_at_step_3)
    run = tmp_path / "run"
    argv = ["train", "--config", str(config_file), "--set", "stage.role=teacher", "--set", "stage.name=teacher",
            "--run-dir", str(run)]
    assert training_main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"error: out of cpu memory in step 3 of teacher (batch 2 of 32 px patches): CUDA out of memory. "
                     f"Tried to allocate 2.00 GiB.; a smaller optim.batch_size or data.patch_size needs less; "
                     f"`python -m training train --resume {run} --set optim.batch_size=N` goes on from the last "
                     f"saved state")
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 2  # the steps before it are kept

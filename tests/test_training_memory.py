"""A batch too large for the machine: refused before training, with the batch above which it cannot fit (it was
the kernel's OOM killer on a CPU, with no word and no state; an allocator traceback on CUDA), and running out of
memory in a step is one error naming the settings to change."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import training.memory as memory
import training.trainer as trainer_module
from training.__main__ import main as training_main
from training.config import StageConfig, dump_toml
from training.data.datasets import PatchDataset
from training.devices import init_distributed
from training.memory import available_memory_bytes, kept_bytes_per_sample, out_of_memory_reason
from training.trainer import OutOfMemoryError, _Trainer, train_stage

from training_utils import make_image_folder, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


def _stage(folder: Path, role: str = "teacher", guides: tuple[str, ...] = (), **sections: dict):
    return dataclasses.replace(tiny_config(folder, **sections), stage=StageConfig(name=role, role=role,
                                                                                  guides=list(guides)))


def _patches(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(samples, 3, 8, 8), torch.zeros(samples, 3, 16, 16)


def test_the_count_is_the_patches_and_the_inputs_of_trained_convolutions() -> None:
    torch.manual_seed(0)
    first, second = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
    frozen = nn.Conv2d(3, 5, 1).requires_grad_(False)

    def loss(lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        # hr is the first convolution's input (counted once, with the patches); the relu's output is the second's
        # input (the relu saves it too: once); the sigmoid's saved output and the frozen convolution's input are not
        # counted: a compiled backward may recompute the one and never needs the other
        image = second(torch.relu(first(hr)))
        return torch.sigmoid(image).mean() + frozen(lr).mean()

    patches = (3 * 8 * 8 + 3 * 16 * 16) * 4
    assert kept_bytes_per_sample(loss, _patches) == patches + 4 * 16 * 16 * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the convolutions save bf16 copies: 2 bytes a value
        assert kept_bytes_per_sample(loss, _patches) == patches + (3 * 16 * 16 + 4 * 16 * 16) * 2


def test_the_trainer_counts_in_the_dtype_it_trains_in(image_folder: Path, tmp_path: Path) -> None:
    counts = {amp: _Trainer(_stage(image_folder, runtime={"amp": amp}), tmp_path / amp,
                            init_distributed("cpu"))._kept_bytes_per_sample() for amp in ("off", "bf16")}
    patches = (3 * 16 * 16 + 3 * 32 * 32) * 4  # the tiny config's patches: 32 px HR at x2
    assert counts["off"] > 2 * patches  # the teacher's convolutions' inputs
    assert counts["bf16"] - patches < 0.55 * (counts["off"] - patches)  # halved, bar the first layer's fp32 input


def test_free_cpu_memory_is_the_least_of_meminfo_and_every_cgroup_limit(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       9000 kB\nMemAvailable:   8000 kB\n")
    cgroups = tmp_path / "cgroup"
    files = {
        "game": {"memory.max": "1000000\n", "memory.current": "400000\n",
                 "memory.stat": "anon 10\nactive_file 20000\ninactive_file 50000\n"},
        "game/trainer": {"memory.max": "max\n", "memory.current": "100000\n"},
        "memory/box": {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "100\n",
                       "memory.stat": "total_inactive_file 0\n"},
        "memory": {"memory.limit_in_bytes": "700000\n", "memory.usage_in_bytes": "200000\n",
                   "memory.stat": "cache 100000\ntotal_active_file 7000\ntotal_inactive_file 30000\n"},
        "broken": {"memory.max": "\n", "memory.current": "1\n"},
    }
    for folder, contents in files.items():
        (cgroups / folder).mkdir(parents=True, exist_ok=True)
        for name, text in contents.items():
            (cgroups / folder / name).write_text(text)
    own = tmp_path / "self_cgroup"
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    monkeypatch.setattr(memory, "CGROUP_DIR", cgroups)
    monkeypatch.setattr(memory, "PROC_CGROUP", own)
    cpu = torch.device("cpu")

    own.write_text("0::/game/trainer\n")  # v2: the limit sits on the parent group; its file cache is reclaimable
    assert available_memory_bytes(cpu) == 1000000 - (400000 - 20000 - 50000)
    own.write_text("4:cpu,memory:/box\n1:cpu:/\nnot a cgroup line\n")  # v1: the limit sits on the root group
    assert available_memory_bytes(cpu) == 700000 - (200000 - 7000 - 30000)
    for unreadable in ("0::/broken\n", b"0::/\xff\n"):  # an empty limit, a file that is not text: no limit known
        own.write_bytes(unreadable if isinstance(unreadable, bytes) else unreadable.encode())
        assert available_memory_bytes(cpu) == 8000 * 1024  # MemAvailable alone
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "missing")
    assert available_memory_bytes(cpu) is None  # nothing known: nothing is checked


def test_out_of_memory_errors_are_told_from_others() -> None:
    cuda = "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert out_of_memory_reason(torch.OutOfMemoryError(f"{cuda}\nIf reserved but unallocated ...")) == cuda
    cpu = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"
    assert out_of_memory_reason(RuntimeError(cpu)) == cpu
    assert out_of_memory_reason(RuntimeError("Expected all tensors to be on the same device")) is None
    assert out_of_memory_reason(ValueError("can't allocate memory")) is None


def test_a_batch_no_machine_holds_is_refused_before_training(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(OutOfMemoryError, match=r"optim\.batch_size 10000000 of 32 px patches keeps more than "
                                               r"[\d.]+ GiB of cpu memory for one step of teacher, and [\d.]+ GiB "
                                               r"is free: a batch over \d+ cannot fit"):
        train_stage(_stage(image_folder, optim={"batch_size": 10_000_000}), run)
    assert not (run / "state.pt").exists() and not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("role, guides", [("teacher", ()), ("student", ("teacher",))])
def test_the_refusal_comes_at_the_first_batch_beyond_the_count(image_folder: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, role: str,
                                                               guides: tuple[str, ...]) -> None:
    guide_files = ()
    if guides:
        guide_files = (str(train_stage(_stage(image_folder, optim={"steps": 1}), tmp_path / "teacher").checkpoint),)
    config = _stage(image_folder, role, guide_files, optim={"batch_size": 3, "steps": 2})
    per_sample = _Trainer(config, tmp_path / "probe", init_distributed("cpu"))._kept_bytes_per_sample()

    monkeypatch.setattr(trainer_module, "available_memory_bytes", lambda device: 3 * per_sample - 1)
    with pytest.raises(OutOfMemoryError, match="a batch over 2 cannot fit"):
        train_stage(config, tmp_path / "refused")
    monkeypatch.setattr(trainer_module, "available_memory_bytes", lambda device: per_sample - 1)
    with pytest.raises(OutOfMemoryError, match="is free: even a batch of 1 does not fit"):
        train_stage(config, tmp_path / "refused")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two CPU ranks on this host share its memory
    monkeypatch.setattr(trainer_module, "available_memory_bytes", lambda device: 6 * per_sample - 1)
    both = f"{6 * per_sample / 2**30:.2f} GiB"
    with pytest.raises(OutOfMemoryError, match=f"patches on each of the 2 ranks of this host together keep more than "
                                               f"{both} of cpu memory .* a batch over 2 cannot fit"):
        train_stage(config, tmp_path / "refused")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(trainer_module, "available_memory_bytes", lambda device: 3 * per_sample)
    assert train_stage(config, tmp_path / "fits").steps == 2


def test_the_count_leaves_training_as_it_was(image_folder: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe forwards constant patches and draws nothing from the random generators: the losses are those of a
    run without it."""
    config = _stage(image_folder, optim={"steps": 3})
    train_stage(config, tmp_path / "counted")
    monkeypatch.setattr(trainer_module, "available_memory_bytes", lambda device: None)  # nothing known: no probe
    monkeypatch.setattr(_Trainer, "_kept_bytes_per_sample", lambda self: pytest.fail("probed without a limit"))
    train_stage(config, tmp_path / "plain")
    assert _losses(tmp_path / "counted") == _losses(tmp_path / "plain")


def _losses(run: Path) -> list[str]:
    return [line.split('"it_per_s"')[0] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ddp_ranks_stop_together_when_one_has_too_little_memory(image_folder: Path, tmp_path: Path) -> None:
    """Rank 1 refused alone and rank 0 died in its first backward with a traceback (gloo; NCCL would hang)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None, "torchrun comes with torch, next to this python"
    driver = tmp_path / "driver.py"
    driver.write_text("import os, sys\nimport training.trainer\nif os.environ['RANK'] == '1':\n"
                      "    training.trainer.available_memory_bytes = lambda device: 1\n"
                      "from training.__main__ import main\nsys.exit(main(sys.argv[1:]))\n")
    config = tmp_path / "config.toml"
    config.write_text(dump_toml(_stage(image_folder).to_dict()))
    run = tmp_path / "ddp"
    command = [torchrun, "--standalone", "--nproc_per_node", "2", str(driver), "train", "--config", str(config),
               "--run-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode != 0
    assert "error: optim.batch_size 2 of 32 px patches on each of the 2 ranks of this host together keep more" in \
        result.stderr
    assert "error: another rank has too little memory free for optim.batch_size 2" in result.stderr
    assert "training/trainer.py" not in result.stderr, result.stderr[-3000:]  # no traceback of a rank (torchrun
    # prints its own for any child that exits 1)
    assert not (run / "state.pt").exists()


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


@pytest.mark.gpu
def test_on_cuda_the_count_and_the_free_memory_are_the_devices(image_folder: Path, tmp_path: Path) -> None:
    """CUDA's free memory is the driver's plus torch's cached blocks; the probe runs on the GPU in bf16 (amp auto)
    and a batch the GPU cannot hold is refused before training, as on the CPU."""
    device = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    del cached  # back in torch's cache: still free for the next allocation
    assert free - 64 * 2**20 <= available_memory_bytes(device) <= total  # the 256 MiB cached count as free
    config = _stage(image_folder, runtime={"device": "cuda"}, optim={"batch_size": 10_000_000})
    with pytest.raises(OutOfMemoryError, match=r"of cuda(:0)? memory for one step of teacher"):
        train_stage(config, tmp_path / "run")


def test_a_worker_killed_while_handing_a_batch_over_is_the_same_error(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker killed while the trainer took a batch's shared memory from it reset that connection before torch's
    SIGCHLD handler spoke: "error: [Errno 104] Connection reset by peer" (seen once in CI, under load)."""
    config = tiny_config(image_folder, runtime={"workers": 1, "checkpoint_every": 1}, optim={"steps": 4})
    config_file = tmp_path / "config.toml"
    config_file.write_text(dump_toml(config.to_dict()))

    def reset(*args: object) -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(_Trainer, "_step_within_memory", reset)
    argv = ["train", "--config", str(config_file), "--set", "stage.role=teacher", "--set", "stage.name=teacher",
            "--run-dir", str(tmp_path / "run")]
    assert training_main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: a data-loader worker of teacher died (its connection was reset while it handed a "
                            "batch over: Connection reset by peer): the kernel's OOM killer"), error


def test_a_data_loader_worker_killed_mid_run_is_one_error_and_the_run_resumes(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The OOM killer often picks a data-loader worker: torch's SIGCHLD handler then raised its RuntimeError, a
    traceback, from wherever the training loop was."""
    config = tiny_config(image_folder, runtime={"workers": 1, "checkpoint_every": 1}, optim={"steps": 40})
    config_file = tmp_path / "config.toml"
    config_file.write_text(dump_toml(config.to_dict()))
    real_item = PatchDataset.__getitem__

    def killed_at_the_sixth_batch(self: PatchDataset, index: int) -> dict[str, torch.Tensor]:
        if index >= 10:  # batches of 2: the worker (forked, as for every folder source) dies making the sixth
            os.kill(os.getpid(), signal.SIGKILL)
        return real_item(self, index)

    monkeypatch.setattr(PatchDataset, "__getitem__", killed_at_the_sixth_batch)
    run = tmp_path / "run"
    argv = ["train", "--config", str(config_file), "--set", "stage.role=teacher", "--set", "stage.name=teacher",
            "--run-dir", str(run)]
    assert training_main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: a data-loader worker of teacher died \((DataLoader worker \(pid(\(s\))? \d+\) (is killed by signal: "
        r"Killed|exited unexpectedly)|its connection was reset while it handed a batch over: .*)\): "
        r"the kernel's OOM killer ends one so when memory runs out \(`dmesg` says whether it did\); fewer "
        r"runtime\.workers, a smaller data\.cache_mb \(each worker has its own\) or optim\.batch_size need less; "
        rf"`python -m training train --resume {re.escape(str(run))} --set optim\.batch_size=N` goes on from the last "
        r"saved state", error), error
    saved = torch.load(run / "state.pt", weights_only=True)["step"]
    assert 0 < saved <= 5
    monkeypatch.setattr(PatchDataset, "__getitem__", real_item)
    assert training_main(["train", "--resume", str(run), "--set", "optim.steps=8"]) == 0
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 8

"""Where a training step runs: this process's rank under DistributedDataParallel (torchrun's environment), its
device, the device's name as a checkpoint records it, and the dtype autocast gives the step.

Apart from the loop (training/trainer.py) because none of it is the loop: it is settled once, before the trainer
builds anything.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "autocast_dtype", "device_name", "init_distributed", "is_main_process", "stage_device",
           "world_size"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """Processes of this torchrun job (1 outside one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process on its own: the one that evaluates, reports and prints summaries."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: str) -> Dist:
    world = world_size()
    if world <= 1:
        return Dist()
    info = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    # Once per process, for every stage of a pipeline: destroying the group after a stage and making a new one for
    # the next raced (a rank still leaving the old group's barrier while another joined the new one hung both).
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    return info


def stage_device(name: str, dist_info: Dist) -> torch.device:
    if name == "auto":
        return torch.device("cuda", dist_info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("runtime.device asks for CUDA but no GPU is available")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads of {os.cpu_count()} cores)"  # the threads the times were taken on


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16

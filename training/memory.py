"""How much memory a training step needs, and how much the device has: so that a batch too large for the machine
is refused with a number before training, rather than killed by the kernel's OOM killer without a word (CPU) or
ended by an allocator traceback in the first step (CUDA).

The need is measured, not modelled: one probe forward of the loss at batch 1 and one at batch 2 count the bytes of
the tensors autograd keeps for the backward pass (each storage once) plus the input patches. Their difference is
what one more sample costs; the rest (autocast's weight copies) is fixed. Both are lower bounds on a real step:
the backward's gradients, the frozen guides' passing activations and the allocator's slack come on top, so a
refusal is never a false alarm, and a batch that passes may still be close to the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["StepMemory", "available_memory_bytes", "is_out_of_memory", "measure_step_memory"]

CGROUP_DIR = Path("/sys/fs/cgroup")  # cgroup v2: a container's limit, which MemAvailable does not know of
MEMINFO = Path("/proc/meminfo")
PROC_CGROUP = Path("/proc/self/cgroup")  # this process's groups, one line per hierarchy


@dataclass(frozen=True)
class StepMemory:
    """Bytes a training step holds at least: `fixed + batch_size * per_sample`."""

    fixed: int
    per_sample: int

    def need(self, batch_size: int) -> int:
        return self.fixed + batch_size * self.per_sample

    def largest_batch(self, available: int) -> int:
        """The largest batch whose lower bound fits in `available` bytes (0 when not even one sample does)."""
        return max(0, (available - self.fixed) // self.per_sample) if self.per_sample else 0


def measure_step_memory(loss: Callable[[torch.Tensor, torch.Tensor], object],
                        make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> StepMemory:
    """`loss(lr, hr)` is the step's forward (the loss module under the step's autocast); `make_batch(n)` gives an
    (lr, hr) pair of n samples as the step receives them. The graph of each probe is dropped unused."""
    one, two = (_saved_bytes(loss, *make_batch(n)) for n in (1, 2))
    per_sample = max(two - one, 0)
    return StepMemory(fixed=max(one - per_sample, 0), per_sample=per_sample)


def _saved_bytes(loss: Callable[[torch.Tensor, torch.Tensor], object], lr: torch.Tensor, hr: torch.Tensor) -> int:
    storages: dict[int, int] = {lr.untyped_storage().data_ptr(): lr.untyped_storage().nbytes(),
                                hr.untyped_storage().data_ptr(): hr.untyped_storage().nbytes()}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()  # a view saved twice (or an input) counts once
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss(lr, hr)
    return sum(storages.values())


def available_memory_bytes(device: torch.device) -> int | None:
    """What a new allocation on `device` may still take: for CUDA the driver's free memory plus torch's cached
    blocks; for the CPU the kernel's MemAvailable, or less where a cgroup limits the process. None when unknown
    (another device type, or a system without /proc/meminfo)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    known = [value for value in (_meminfo_available(), _cgroup_headroom()) if value is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        lines = MEMINFO.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the file says kB
    return None


def _cgroup_headroom() -> int | None:
    """The least limit - usage over this process's memory cgroup and the groups above it (a limit may sit on any
    of them; cgroup v2 or v1), or None without a limit."""
    headrooms = []
    for folder, limit_file, usage_file in _memory_cgroups():
        try:
            limit = (folder / limit_file).read_text().strip()
            usage = int((folder / usage_file).read_text())
        except (OSError, ValueError):
            continue  # a root group has neither file
        if limit != "max":  # v1 says "no limit" with a huge number, which the min with MemAvailable passes over
            headrooms.append(max(int(limit) - usage, 0))
    return min(headrooms) if headrooms else None


def _memory_cgroups() -> list[tuple[Path, str, str]]:
    """(folder, limit file, usage file) of each memory cgroup from this process's own up to the root."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return []
    groups = []
    for line in lines:
        fields = line.split(":", 2)  # hierarchy id : controllers : path
        if len(fields) != 3:
            continue
        _hierarchy, controllers, path = fields
        if controllers == "":  # v2: one hierarchy for every controller
            root, files = CGROUP_DIR, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1
            root, files = CGROUP_DIR / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        own = root / path.lstrip("/")
        groups += [(folder, *files) for folder in (own, *own.parents) if folder.is_relative_to(root)]
    return groups


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA OutOfMemoryError, or its CPU allocator refusing (a ulimit or a failed mmap)."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError)
                                                        and "can't allocate memory" in str(exc))

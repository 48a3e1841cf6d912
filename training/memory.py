"""How much memory a training step needs, and how much the device has: so that a batch too large for the machine
is refused with a number before training, rather than killed by the kernel's OOM killer without a word (CPU) or
ended by an allocator traceback in the first step (CUDA).

The need is measured, not modelled, and only its part that any backward pass must keep is counted: the input patches
and the input of every trained convolution (its weight's gradient needs it), as autograd saved them on one probe
forward of the loss at batch 1, each storage once and in the dtype autocast gave it. A compiled graph may save fewer
of the other tensors (activations it recomputes), never fewer of these. So the count is a lower bound of a real
step whatever runs it: the other saved tensors, the gradients, the frozen guides' passing activations and the
allocator's slack come on top, and a refusal is never a false alarm, while a batch that passes may still not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from training.config import Config

__all__ = ["available_memory_bytes", "kept_bytes_per_sample", "memory_refusal", "out_of_memory_reason"]

CGROUP_DIR = Path("/sys/fs/cgroup")  # a container's limit, which MemAvailable does not know of
MEMINFO = Path("/proc/meminfo")
PROC_CGROUP = Path("/proc/self/cgroup")  # this process's groups, one line per hierarchy


def kept_bytes_per_sample(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                          make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Bytes one training sample keeps at least until the backward pass: `loss(lr, hr)` is the step's forward (the
    loss under the step's autocast, returning the total), `make_batch(n)` an (lr, hr) pair of n samples as the step
    receives them. Every counted tensor grows with the batch, so one sample's count scales to any batch."""
    lr, hr = make_batch(1)
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in (lr, hr)}
    for saved in _convolution_inputs(loss(lr, hr)):
        storages[saved.untyped_storage().data_ptr()] = saved.untyped_storage().nbytes()  # once, however often saved
    return sum(storages.values())


def _convolution_inputs(total: torch.Tensor) -> list[torch.Tensor]:
    """The inputs that the convolutions of `total`'s autograd graph saved for their weights' gradients."""
    inputs, seen, pending = [], set(), [total.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.name() == "ConvolutionBackward0":
            saved = getattr(node, "_saved_input", None)
            if isinstance(saved, torch.Tensor):  # None for a convolution whose weight is frozen
                inputs.append(saved)
        pending += [child for child, _index in node.next_functions]
    return inputs


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
    of them; cgroup v2 or v1), or None without a limit. The usage leaves out the file cache, active and inactive,
    which counts as used (a training set read fills it) but which the kernel reclaims before it kills anything, as
    MemAvailable counts it free."""
    headrooms = []
    for group in _memory_cgroups():
        try:
            limit = (group.folder / group.limit_file).read_text().strip()
            if limit == "max":  # v2 without a limit (v1 says it with a huge number, which MemAvailable undercuts)
                continue
            usage = int((group.folder / group.usage_file).read_text()) - _stat(group.folder, group.cache_keys)
            headrooms.append(max(int(limit) - usage, 0))
        except (OSError, ValueError):  # a root group has none of the files; a file we cannot read is no limit
            continue
    return min(headrooms) if headrooms else None


def _stat(folder: Path, keys: tuple[str, ...]) -> int:
    """The sum of some values of the group's memory.stat (a key it does not list counts 0)."""
    values = dict(line.partition(" ")[::2] for line in (folder / "memory.stat").read_text().splitlines())
    return sum(int(values.get(key, 0)) for key in keys)


@dataclass(frozen=True)
class _MemoryGroup:
    folder: Path
    limit_file: str
    usage_file: str
    cache_keys: tuple[str, str]  # memory.stat's file cache (of the group and those below it), which can be reclaimed


def _memory_cgroups() -> list[_MemoryGroup]:
    """Each memory cgroup from this process's own up to the root, v2 or v1."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except (OSError, ValueError):
        return []
    groups = []
    for line in lines:
        fields = line.split(":", 2)  # hierarchy id : controllers : path
        if len(fields) != 3:
            continue
        _hierarchy, controllers, path = fields
        if controllers == "":  # v2: one hierarchy for every controller
            root, files = CGROUP_DIR, ("memory.max", "memory.current", ("active_file", "inactive_file"))
        elif "memory" in controllers.split(","):  # v1
            root, files = CGROUP_DIR / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                  ("total_active_file", "total_inactive_file"))
        else:
            continue
        own = root / path.lstrip("/")
        groups += [_MemoryGroup(folder, *files) for folder in (own, *own.parents) if folder.is_relative_to(root)]
    return groups


def out_of_memory_reason(exc: BaseException) -> str | None:
    """The first line of torch's message when `exc` is running out of memory (CUDA's OutOfMemoryError, or the CPU
    allocator refusing under a ulimit or a failed mmap; torch's messages go on with lines of advice), else None."""
    if isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError)
                                                   and "can't allocate memory" in str(exc)):
        return str(exc).strip().split("\n", 1)[0]
    return None


def memory_refusal(config: Config, device: torch.device, per_sample: int, ranks: int, available: int) -> str | None:
    """Why the batch is refused, or None when it fits: `per_sample` bytes a sample on each of the `ranks` processes
    of this host sharing `available` bytes."""
    batch_size, together = config.optim.batch_size, per_sample * ranks
    if batch_size * together <= available:
        return None
    largest = available // together
    who = f"on each of the {ranks} ranks of this host together keep" if ranks > 1 else "keeps"
    fits = (f"a batch over {largest} cannot fit, and a smaller one may not either" if largest
            else "even a batch of 1 does not fit")
    return (f"optim.batch_size {batch_size} of {config.data.patch_size} px patches {who} more than "
            f"{batch_size * together / 2**30:.2f} GiB of {device} memory for one step of {config.stage.name}, and "
            f"{available / 2**30:.2f} GiB is free: {fits} (that count is the patches and the convolutions' inputs "
            f"alone; a smaller data.patch_size needs less too)")

"""The training loop for one stage: model, frozen guides, data, Adam + cosine schedule, AMP,
checkpoints, exact resume, Ctrl-C, NaN detection, DistributedDataParallel.

The loop knows nothing of the stage: it asks `Distillation` for a dict of loss terms and
minimises their total. Every `checkpoint_every` steps (and on Ctrl-C) the full state goes to
RUN_DIR/state.pt; `--resume RUN_DIR` continues from it exactly: batches are a pure function of
(seed, step, rank), so the resumed run sees the same data as an uninterrupted one. Every
`snapshot_every` steps the network alone goes to RUN_DIR/snapshots/step_<N>.safetensors.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from models import save_checkpoint
from training.config import Config, config_from_toml, dump_toml
from training.data import build_train_dataset, end_workers_at_exit, exit_with_trainer, worker_start_method
from training.data.images import DatasetError, write_text_atomic
from training.devices import Dist, autocast_dtype, device_name, init_distributed, stage_device
from training.distill import Distillation, Guide, TrainedModel
from training.environment import arithmetic, environment
from training.latency import usable_cores
from training.memory import available_memory_bytes, kept_bytes_per_sample, memory_refusal, out_of_memory_reason
from training.run_folder import (
    LOCK_FILE,
    SNAPSHOT_DIR,
    pipeline_files,
    remove_leftover_temporaries,
    run_dir_lock,
    truncate_metrics,
)
from training.stages import (
    build_stage_network,
    changed_guides,
    check_guides_fit,
    check_patch_size,
    input_hashes,
    load_guides,
    refuse_oversized,
    stage_blocks,
    stage_data_seed,
    stage_inputs,
    stage_mix,
    stage_steps,
    training_summary,
)
from training.state import (
    FINAL_FILE,
    STATE_FILE,
    data_contents,
    export_state,
    first_line,
    is_arithmetic_segment,
    optimizer_state_mismatch,
    print_changes,
    read_state,
    refuse_older_schedule,
    sources_line,
    state_dict_mismatch,
)

__all__ = [
    "LOCK_FILE", "DataWorkerError", "NonFiniteLossError", "OutOfMemoryError", "StageResult", "TrainingInterrupted",
    "export_state", "read_state", "stage_blocks", "stage_inputs", "train_stage",
]  # fmt: skip

FORCE_AFTER_S = 2.0  # a second stop signal sooner than this after the first is the same stop, delivered twice


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


class OutOfMemoryError(RuntimeError):
    """A step's batch does not fit in the device's memory: refused before training, or met during a step."""


class DataWorkerError(RuntimeError):
    """A data-loader worker died during training (most often the kernel's OOM killer's choice)."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: the state was saved; resume with --resume RUN_DIR."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum  # the signal that stopped training: the command exits 128 + signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class StageResult:
    checkpoint: Path
    steps: int
    seconds: float
    final_loss: float | None  # None: a resume that had no step left to run, of a state saved without its loss
    # the stop signal that came during the last step (the stage is finished; a pipeline stops before the next one)
    stopped_by: int | None = None


class StepBatchSampler(Sampler[list[int]]):
    """Batch k of rank r holds dataset indices ((k * world + r) * B, ... + B): a pure function of
    the step, so resuming at step k needs no sampler state. Endless; the loop stops it."""

    def __init__(self, batch_size: int, start_step: int, dist_info: Dist) -> None:
        self.batch_size, self.start_step, self.dist = batch_size, start_step, dist_info

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            first = (step * self.dist.world + self.dist.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            step += 1


def train_stage(config: Config, run_dir: Path, *, resume: bool = False) -> StageResult:
    """Train the stage described by `config.stage`; returns where the final checkpoint is."""
    return _Trainer(config, run_dir, init_distributed(config.runtime.device)).run(resume)


class _Trainer:
    def __init__(self, config: Config, run_dir: Path, dist_info: Dist) -> None:
        if config.data is None:
            raise ValueError("the config has no [data] section")
        self.config, self.run_dir, self.dist = config, Path(run_dir), dist_info
        self.device = stage_device(config.runtime.device, dist_info)
        if config.runtime.threads:
            torch.set_num_threads(config.runtime.threads)
            cores = usable_cores()
            if config.runtime.threads > cores and self.dist.main:  # 100 on 2 cores made 12 steps take 100 s, not 3
                print(f"note: runtime.threads={config.runtime.threads} is more than the {cores} CPU cores this "
                      "process may use: the threads take turns, which is slower than one per core")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch shapes: pick the fastest conv kernels once
        refuse_oversized(config)
        torch.manual_seed(config.runtime.seed)
        self.steps = stage_steps(config)
        self.network = build_stage_network(config).to(self.device)
        self.guides = [Guide(g.name, g.model.to(self.device), g.mix) for g in load_guides(config.stage.guides)]
        check_guides_fit(self.network, dict(zip(config.stage.guides, self.guides, strict=True)),
                         config.experiment.scale)
        networks = [self.network, *(guide.model for guide in self.guides)]
        check_patch_size(config.data.patch_size, config.experiment.scale, networks)
        self.inputs_sha256 = input_hashes(config.stage)  # the files it starts from and learns from, as they are now
        # where each segment's steps ran ({"from_step", "arithmetic"}): a resume elsewhere adds one
        self.arithmetic_history = [{"from_step": 0, "arithmetic": arithmetic(self.device, dist_info.world)}]
        self.data_sources: list[dict[str, Any]] = []  # what the loader reads (its folders' fingerprints), once built
        self.saved_data_sources: Any = None  # what a resumed state's steps read (None: not resumed, or an old state)
        self.trained = TrainedModel(self.network)
        if config.runtime.channels_last:
            self.trained.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(
            self.trained.parameters(), lr=config.optim.lr, betas=tuple(config.optim.betas)
        )
        self.budget_s = config.runtime.time_budget_s  # 0: no budget
        self.budget_spent = 0.0  # rank 0's elapsed / budget at the last step, the same on every rank
        # Cosine from optim.lr to optim.lr_min over the stage: over its steps, or with a time budget
        # over its wall time (a step rate measured early misleads while caches are cold).
        lr_ratio = config.optim.lr_min / config.optim.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _cosine_factor(self._progress(step), lr_ratio)
        )
        self.autocast_dtype = autocast_dtype(config.runtime.amp, self.device)
        self.stop_requested = False
        self.stop_requested_at = 0.0  # time.monotonic() of the first stop signal
        self.stop_signal = signal.SIGINT  # which signal asked to stop (SIGINT or SIGTERM)
        self.last_log: tuple[int, float] | None = None  # (step, clock) of the last metrics record
        self.last_loss: float | None = None  # the total loss of the last step run (kept in state.pt for a resume)
        self.started = 0.0
        self.seconds_before = 0.0  # wall time of the segments before a resume

    # -- the loop -------------------------------------------------------------------------------

    def run(self, resume: bool) -> StageResult:
        with run_dir_lock(self.run_dir, self.dist.main):  # before the folder's files are looked at
            if self.dist.main:
                remove_leftover_temporaries(self.run_dir)
            if not resume:
                self._refuse_earlier_run()
            start_step = self._load_state() if resume else 0
            if resume:
                self._refuse_finished_resume(start_step)
                self._refuse_fewer_steps(start_step)
            loss_module = self._distillation()
            loader = self._loader(start_step)  # the data is checked before the run's files change
            self._refuse_batch_beyond_memory()  # after the loader: MemAvailable then knows the data cache
            try:
                return self._train(start_step, loss_module, loader)
            except RuntimeError as exc:  # torch's SIGCHLD handler raises it wherever the loop is
                if not str(exc).startswith("DataLoader worker (pid"):
                    raise
                raise self._worker_died(first_line(exc).rstrip(". ")) from None
            except ConnectionError as exc:  # killed while handing a batch's shared memory over, before SIGCHLD came
                if not self.config.runtime.workers:
                    raise
                raise self._worker_died(f"its connection was reset while it handed a batch over: "
                                        f"{exc.strerror or exc}") from None

    def _worker_died(self, how: str) -> DataWorkerError:
        return DataWorkerError(
            f"a data-loader worker of {self.config.stage.name} died ({how}): the kernel's OOM killer ends one so "
            f"when memory runs out (`dmesg` says whether it did); fewer runtime.workers, a smaller data.cache_mb "
            f"(each worker has its own) or optim.batch_size need less{self._resume_hint()}"
        )

    def _train(self, start_step: int, loss_module: Distillation, loader: DataLoader) -> StageResult:
        self.started = time.perf_counter()
        if self.dist.main:
            self._write_run_files(start_step)
        batches = iter(loader)
        previous_handlers = {signum: signal.signal(signum, self._on_stop_signal) for signum in STOP_SIGNALS}
        step = start_step
        progress = tqdm(
            total=self.steps, initial=start_step, desc=self.config.stage.name,
            disable=not (self.dist.main and self.config.runtime.progress), dynamic_ncols=True,
        )  # fmt: skip
        stop = False  # a stop every rank agreed on after the last step
        try:
            while not self._finished(step):
                terms = self._step_within_memory(loss_module, batches, step)
                step += 1
                self.last_loss = total = terms["total"]
                if self.budget_s:
                    self._update_budget()
                self.scheduler.step()  # the lr of the next step, from the progress made
                progress.update(1)
                progress.set_postfix(loss=f"{total:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                self._log(step, terms)
                stop = self._stop_agreed()
                if step % self.config.runtime.checkpoint_every == 0 or stop:
                    self._save_state(step)
                if self._snapshot_due(step):
                    self._save_snapshot(step)
                if stop and not self._finished(step):
                    name = signal.Signals(self.stop_signal).name
                    raise TrainingInterrupted(
                        f"interrupted by {name} at step {step}; resume with `python -m training train --resume "
                        f"{self.run_dir}` (for a pipeline's stage: rerun the same pipeline command)", self.stop_signal
                    )
        finally:
            progress.close()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        if step % self.config.runtime.checkpoint_every:  # the state at the end too: a resume then knows it is done
            self._save_state(step)
        seconds = self._elapsed()
        checkpoint = self._save_final(step, seconds) if self.dist.main else self.run_dir / FINAL_FILE
        if self.dist.world > 1:  # a pipeline's next stage reads this checkpoint on every rank: wait until it is there
            dist.barrier()
        stopped_by = self.stop_signal if stop else None  # during the last step: the stage is done
        return StageResult(checkpoint, step, seconds, self.last_loss, stopped_by)

    def _step(self, loss_module: Distillation, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        lr, hr = (self._to_device(batch[key]) for key in ("lr", "hr"))
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            terms = loss_module(lr, hr)
        total = terms["total"]
        if not torch.isfinite(total):
            raise NonFiniteLossError(f"loss is {total.item()} at step {step + 1} ({self.config.stage.name})")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.config.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.trained.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        return {name: value.item() for name, value in terms.items()}

    def _step_within_memory(self, loss_module: Distillation, batches: Iterator[dict[str, torch.Tensor]],
                            step: int) -> dict[str, float]:
        """`_step` on the next batch, with running out of memory while making the batch or in the step (CUDA, or a
        CPU allocator under a ulimit) as one error that says what to change, instead of an allocator traceback."""
        try:
            return self._step(loss_module, self._next_batch(batches, step), step)
        except RuntimeError as exc:
            if (reason := out_of_memory_reason(exc)) is None:
                raise
            raise OutOfMemoryError(
                f"out of {self.device} memory in step {step + 1} of {self.config.stage.name} (batch "
                f"{self.config.optim.batch_size} of {self.config.data.patch_size} px patches): "
                f"{reason}; a smaller optim.batch_size or data.patch_size needs less{self._resume_hint()}"
            ) from None

    def _next_batch(self, batches: Iterator[dict[str, torch.Tensor]], step: int) -> dict[str, torch.Tensor]:
        """The next batch. A training image that cannot be read any more (deleted, cut short or replaced since the
        scan) saves the state reached, so that a resume goes on from this step once the folder is mended, and is
        said in one line: from a worker it came as torch's "Caught DatasetError in DataLoader worker process N"
        followed by the worker's traceback."""
        try:
            return next(batches)
        except DatasetError as exc:
            self._save_state(step)
            cause = str(exc).rstrip().splitlines()[-1].partition("DatasetError: ")[2] or str(exc)
            raise DatasetError(
                f"{cause} (for step {step + 1} of {self.config.stage.name}); with the folder mended, `python -m "
                f"training train --resume {self.run_dir}` (or the same pipeline command) goes on from step {step}"
            ) from None

    def _resume_hint(self) -> str:
        """How to go on with less memory, when a state was saved to go on from."""
        if not (self.run_dir / STATE_FILE).exists():
            return ""
        return (f"; `python -m training train --resume {self.run_dir} --set optim.batch_size=N` goes on from the "
                f"last saved state")

    def _refuse_batch_beyond_memory(self) -> None:
        """OutOfMemoryError before training when a step of this batch needs more memory than the device has free,
        by a lower bound measured on the networks (training.memory). Under DDP every rank stops when one refuses
        (the others would wait for it in their first backward), and CPU ranks on one host share its memory."""
        available = available_memory_bytes(self.device)
        refusal = None
        if available is not None:
            ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.device.type == "cpu" else 1
            refusal = memory_refusal(self.config, self.device, self._kept_bytes_per_sample(), ranks, available)
        if self.dist.world > 1:
            flags = torch.tensor([float(refusal is not None)],
                                 device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags.item() and refusal is None:
                raise OutOfMemoryError(f"another rank has too little memory free for optim.batch_size "
                                       f"{self.config.optim.batch_size} (its error says how much); no rank trained")
        if refusal is not None:
            raise OutOfMemoryError(refusal)

    def _kept_bytes_per_sample(self) -> int:
        """training.memory's count on the plain network (not compiled, nor DDP-wrapped, whose state a forward
        without backward would upset), on constant patches: their content does not change the size, and the random
        generators stay as a resume expects them."""
        probe = self._loss_module(self.trained)
        patch, scale = self.config.data.patch_size, self.config.experiment.scale

        def make_batch(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
            lr = torch.full((samples, 3, patch // scale, patch // scale), 0.5)
            hr = torch.full((samples, 3, patch, patch), 0.5)
            return self._to_device(lr), self._to_device(hr)

        def total_loss(lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                return probe(lr, hr)["total"]

        return kept_bytes_per_sample(total_loss, make_batch)

    def _finished(self, step: int) -> bool:
        """The stage has run its steps, or spent its time budget."""
        return step >= self.steps or self.budget_spent >= 1.0

    def _progress(self, step: int) -> float:
        """How far the stage is, in [0, 1]: by steps, or by wall time with a budget."""
        return self.budget_spent if self.budget_s else step / max(self.steps, 1)

    def _update_budget(self) -> None:
        spent = torch.tensor(self._elapsed() / self.budget_s, device=self._collective_device())
        if self.dist.world > 1:  # every rank follows rank 0's clock: the same lr, the same last step
            dist.broadcast(spent, src=0)
        self.budget_spent = float(spent)

    def _stop_agreed(self) -> bool:
        """Whether to stop after this step, the same on every rank. A signal may reach one rank only (a worker's own
        kill, or torchrun's SIGTERM passed to each worker in turn): that rank stopped alone, the others died in their
        next step's collective ("Connection closed by peer"), and rank 0, which saves, often saved nothing while
        rank 1 printed a resume command. A late signal counts at the next step, on every rank."""
        if self.dist.world == 1:
            return self.stop_requested
        flag = torch.tensor([int(self.stop_signal) if self.stop_requested else 0], device=self._collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        if signum and not self.stop_requested:  # another rank's signal: this rank stops with it, as if signalled
            self.stop_requested, self.stop_requested_at, self.stop_signal = True, time.monotonic(), signum
        return bool(signum)

    def _collective_device(self) -> torch.device:
        """Where tensors of a collective live: NCCL takes CUDA tensors only, gloo CPU ones."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _elapsed(self) -> float:
        """Training wall time, summed over every segment of a resumed run."""
        return self.seconds_before + time.perf_counter() - self.started

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        """Ctrl-C or SIGTERM (a job scheduler's stop): finish the step, save the state, stop. Only sets flags. A
        second signal forces the stop, unsaved, but only a while after the first: one stop often comes twice at once
        (a scheduler's SIGTERM to every process of a job plus the driver script passing one on), and taken as
        "force" it lost the state."""
        now = time.monotonic()
        if self.stop_requested and now - self.stop_requested_at > FORCE_AFTER_S:
            raise KeyboardInterrupt
        if not self.stop_requested:
            self.stop_requested, self.stop_requested_at, self.stop_signal = True, now, signum

    # -- pieces ---------------------------------------------------------------------------------

    def _distillation(self) -> Distillation:
        model: nn.Module = self.trained
        if self.config.runtime.compile:
            model = torch.compile(model)
        if self.dist.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        return self._loss_module(model)

    def _loss_module(self, model: nn.Module) -> Distillation:
        loss = self.config.loss
        return Distillation(
            model, self.guides, mix=stage_mix(self.config),
            imitation_weight=loss.imitation, feature_weight=loss.feature, output_weight=loss.output,
        )  # fmt: skip

    def _loader(self, start_step: int) -> DataLoader:
        dataset = build_train_dataset(
            self.config.data, self.config.experiment.scale, stage_data_seed(self.config),
            progress=self.dist.main and self.config.runtime.progress,
        )  # fmt: skip
        self.data_sources = [source.fingerprint() for source in dataset.sources]
        saved, now = self.saved_data_sources, self.data_sources
        if saved is not None and data_contents(saved) != data_contents(now) \
                and self.dist.main:  # the same files in a moved folder are the same data
            print(f"note: the training data differ from what the resumed steps read (files added, removed or "
                  f"changed): now {sources_line(now)}; before: {sources_line(saved)}")
        sampler = StepBatchSampler(self.config.optim.batch_size, start_step, self.dist)
        workers = self.config.runtime.workers
        if workers:
            end_workers_at_exit()
        # Scene sources render with OpenGL: their workers must not be forked from a process holding a context.
        return DataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
            multiprocessing_context=worker_start_method(dataset) if workers > 0 else None,
            worker_init_fn=functools.partial(exit_with_trainer, os.getpid()) if workers > 0 else None,
        )  # fmt: skip

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if self.config.runtime.channels_last else torch.contiguous_format
        return tensor.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)

    def _log(self, step: int, terms: dict[str, float]) -> None:
        if not self.dist.main or (step % self.config.runtime.log_every and not self._finished(step)):
            return
        now = time.perf_counter()
        rate = (step - self.last_log[0]) / max(now - self.last_log[1], 1e-9) if self.last_log else 0.0
        self.last_log = (step, now)
        record = {"step": step, "lr": self.scheduler.get_last_lr()[0], "it_per_s": rate, **terms}
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _refuse_earlier_run(self) -> None:
        """A fresh run never starts over a folder holding another's state or final weights: rerunning the same
        `train` command after an interruption would otherwise wipe the saved progress without a word."""
        marks = pipeline_files(self.run_dir)
        if marks:  # `train --run-dir` on a pipeline's folder replaced the config.toml it evaluates with
            raise FileExistsError(
                f"{self.run_dir} holds a pipeline run ({', '.join(marks)}): choose another --run-dir, or "
                f"a stage folder in it such as {self.run_dir / self.config.stage.name}"
            )
        if (self.run_dir / FINAL_FILE).exists():
            raise FileExistsError(
                f"{self.run_dir} holds a finished run ({FINAL_FILE}): choose another --run-dir (or delete that "
                "folder)" + (f"; to train it further, `python -m training train --resume {self.run_dir}` with "
                             f"{self._extension()}" if (self.run_dir / STATE_FILE).exists() else "")
            )
        if (self.run_dir / STATE_FILE).exists():
            raise FileExistsError(
                f"{self.run_dir} holds an interrupted run ({STATE_FILE}): continue it with `python -m training train "
                f"--resume {self.run_dir}`, or choose another --run-dir (or delete that folder)"
            )

    def _refuse_finished_resume(self, start_step: int) -> None:
        """Resuming a finished run with no steps left would only rewrite its final checkpoint (with no final
        loss); a state at its end without the final checkpoint (stopped while saving it) still writes it."""
        if self._finished(start_step) and (self.run_dir / FINAL_FILE).exists():
            raise ValueError(f"{self.run_dir} is finished at step {start_step} of {self.steps}: resume it with "
                             f"{self._extension()} to train it further")

    def _refuse_fewer_steps(self, start_step: int) -> None:
        """A resume whose step count is below the step the state reached would end the run at once: its final
        checkpoint would then hold weights from the middle of the schedule it was saved with, lr not yet decayed."""
        if start_step > self.steps:
            raise ValueError(f"{self.run_dir} is at step {start_step}, past the {self.steps} steps this config gives "
                             f"it ({self._steps_key()}): resuming would end it at once, mid-schedule; give it more "
                             f"than {start_step} steps, or take its weights as they are with python -m training "
                             f"export-state {self.run_dir} --out FILE.safetensors")

    def _steps_key(self) -> str:
        """The key that gives this stage its steps: its own, else the experiment's."""
        return "stage.steps" if self.config.stage.steps else "optim.steps"

    def _extension(self) -> str:
        """The --set that lets a finished run go on: more steps (the stage's own, else the experiment's), or more
        seconds when a time budget may have ended it."""
        steps = f"--set {self._steps_key()}=N (more steps)"
        return f"{steps} or --set runtime.time_budget_s=S (more seconds)" if self.budget_s else steps

    def _write_run_files(self, start_step: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / "config.toml", dump_toml(self.config.to_dict()))  # a kill leaves the old one
        if start_step == 0:
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:  # drop records past the resumed step, so metrics.jsonl reads as one run
            truncate_metrics(self.run_dir / "metrics.jsonl", start_step)

    def _save_state(self, step: int) -> None:
        if not self.dist.main:
            return
        state = {
            "step": step,
            "model": self.trained.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "seconds": self._elapsed(),
            "budget_spent": self.budget_spent,
            "budget_s": self.budget_s,  # what budget_spent is a share of
            "last_loss": self.last_loss,
            "inputs_sha256": self.inputs_sha256,
            "arithmetic_history": self.arithmetic_history,
            "data_sources": self.data_sources,
            # the config it was started with, as text: a state put back without its config.toml (the GPU scripts
            # bring back state.pt alone) is still resumed only with it
            "config": dump_toml(self.config.to_dict()),
        }
        serialized = io.BytesIO()
        torch.save(state, serialized)  # in memory first: torch's file writer calls a full disk "unexpected pos"
        path = self.run_dir / STATE_FILE
        tmp = self.run_dir / (STATE_FILE + ".tmp")
        try:
            tmp.write_bytes(serialized.getbuffer())
            os.replace(tmp, path)
        except OSError as exc:  # a full disk, most likely: the state saved before stays as it was
            tmp.unlink(missing_ok=True)
            kept = "the one saved before is kept" if path.is_file() else "none was saved before"
            raise OSError(exc.errno, f"cannot save the training state ({exc.strerror}); {kept}", str(path)) from None

    def _load_state(self) -> int:
        path = self.run_dir / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {path} " + (
                "is not a regular file" if os.path.lexists(path) else "does not exist"))
        state = read_state(path, self.device, needs=("optimizer", "scheduler", "torch_rng"))
        refuse_older_schedule(path, state["scheduler"], self.run_dir)
        self._refuse_changed_inputs(path, state)
        mismatch = state_dict_mismatch(self.trained, state["model"])
        try:
            if mismatch:
                raise ValueError(mismatch)
            self.trained.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if moments := optimizer_state_mismatch(self.optimizer):
                raise ValueError(moments)
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"].cpu())  # a ByteTensor of the generator's state size
            if self.scheduler.last_epoch != state["step"]:  # the schedule steps once per training step
                raise ValueError(f"its step {str(state['step'])[:40]} is not the {self.scheduler.last_epoch} steps its "
                                 "schedule has run")
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path} does not hold this config's {self.config.stage.name} training state (was the "
                             f"config changed since it was saved?): {first_line(exc)}") from None
        self.seconds_before = float(state.get("seconds", 0.0))
        self.last_loss = state.get("last_loss")
        self.budget_spent = self._resumed_budget_spent(state)
        self._follow_config_optim()
        step = int(state["step"])
        self._note_budget_dropped(path, state, step)
        self.saved_data_sources = state.get("data_sources")
        self._continue_arithmetic_history(path, state.get("arithmetic_history"), step)
        if self.dist.main:
            print_changes(path, state.get("config"), self.config)
        return step

    def _continue_arithmetic_history(self, path: Path, saved: Any, step: int) -> None:
        """Keep the saved segments' arithmetic and add this one's if it differs, saying so: the steps from here then
        differ in their last bits from those an uninterrupted run takes (another thread count, CPU, GPU or torch),
        and the metadata must not say the whole run ran here. States of older versions kept none."""
        now = self.arithmetic_history[0]["arithmetic"]
        if not (isinstance(saved, list) and saved and all(is_arithmetic_segment(segment) for segment in saved)):
            self.arithmetic_history = [{"from_step": step, "arithmetic": now}] if step else self.arithmetic_history
            return
        self.arithmetic_history = [dict(segment) for segment in saved]
        before = saved[-1]["arithmetic"]
        if before != now:
            self.arithmetic_history.append({"from_step": step, "arithmetic": now})
            if self.dist.main:
                print(f"note: resuming {path} on other arithmetic than its last steps ran on ({now}; before: "
                      f"{before}): the run goes on correctly, but its steps from here are not bit-identical to an "
                      "uninterrupted run's; the checkpoint records both")

    def _refuse_changed_inputs(self, path: Path, state: dict[str, Any]) -> None:
        """A stage goes on only with the guides it was started with: a teacher trained again since (its folder
        removed and the pipeline rerun) made a TA resume against another guide than the one it began with, without
        a word. A guide named otherwise by `--set` is a change made on purpose (the resume notes it), and init_from
        does not count: a resume takes its weights from the state. States of older versions kept no hashes."""
        saved, saved_config = state.get("inputs_sha256"), state.get("config")
        if not isinstance(saved, list) or not isinstance(saved_config, str):
            return
        try:
            started_with = config_from_toml(saved_config, path).stage
        except ValueError:  # print_changes says so
            return
        changed = changed_guides(started_with, self.config.stage, saved, self.inputs_sha256)
        if changed:
            raise ValueError(f"{path} was guided by {', '.join(changed)} as it was then, and the file has changed "
                             f"since (trained again?): to train the stage with the new one, remove {self.run_dir}; "
                             "or put the old file back to continue")

    def _resumed_budget_spent(self, state: dict[str, Any]) -> float:
        """The share of this config's time budget that the saved segments spent: the saved share itself under the
        budget it was saved with (a resume goes on exactly where it stopped), else their training seconds over this
        budget. The saved share alone, taken against another budget, kept a run its budget had ended finished
        however many seconds `--set runtime.time_budget_s` added; a larger budget now continues it, and the cosine
        stretches over the new budget."""
        if not self.budget_s:
            return 0.0  # no budget: the stage ends at its steps
        if state.get("budget_s") == self.budget_s:
            return float(state.get("budget_spent", 0.0))
        return self.seconds_before / self.budget_s

    def _note_budget_dropped(self, path: Path, state: dict[str, Any], step: int) -> None:
        """Say so when a stage that ran under a time budget resumes without one: its cosine jumps from the budget's
        share to the steps' (from 95 % of the way back to 2 %, the lr near its peak again), which is right for a run
        that now ends at its steps, but looked like a restarted schedule."""
        saved_budget = state.get("budget_s")
        if self.budget_s or not isinstance(saved_budget, (int, float)) or not saved_budget > 0 or not self.dist.main:
            return
        spent = float(state.get("budget_spent", 0.0))
        print(f"note: {path} ran under a time budget of {saved_budget:g} s ({spent:.0%} spent); without one "
              f"(runtime.time_budget_s = 0) the stage ends at its {self.steps} steps, so its learning-rate cosine now "
              f"follows the steps: {step / max(self.steps, 1):.0%} of the way, not {min(spent, 1.0):.0%}; keep a "
              "budget with --set runtime.time_budget_s=S")

    def _follow_config_optim(self) -> None:
        """Make the resumed optimizer and schedule this config's. The saved ones carry the lr and betas the run
        started with: a resume with ``--set optim.lr=...`` trained with the old base lr times the new lr_min/lr
        ratio, matching neither config, while config.toml recorded the new one."""
        optim = self.config.optim
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)  # the cosine at the resumed step
        for group in self.optimizer.param_groups:
            group.update(initial_lr=optim.lr, lr=optim.lr * factor, betas=tuple(optim.betas))
        self.scheduler.base_lrs = [optim.lr for _ in self.optimizer.param_groups]

    def _snapshot_due(self, step: int) -> bool:
        every = self.config.runtime.snapshot_every
        return self.dist.main and every > 0 and step % every == 0 and not self._finished(step)

    def _save_snapshot(self, step: int) -> None:
        path = self.run_dir / SNAPSHOT_DIR / f"step_{step}.safetensors"
        self._save_network(path, step, self._elapsed(), partial_of=self.steps)

    def _save_final(self, steps: int, seconds: float) -> Path:
        return self._save_network(self.run_dir / FINAL_FILE, steps, seconds, final_loss=self.last_loss,
                                  inputs_sha256=self.inputs_sha256)

    def _save_network(self, path: Path, steps: int, seconds: float, **extra: Any) -> Path:
        """The network alone as a checkpoint, its metadata saying how it was trained (plus `extra`)."""
        summary = training_summary(self.config, steps, seconds)
        summary.update(device=device_name(self.device), world_size=self.dist.world,
                       arithmetic=self.arithmetic_history, data_sources=self.data_sources, environment=environment(),
                       **extra)  # fmt: skip
        return save_checkpoint(self.network, path, role=self.config.stage.role, training=summary)


def _cosine_factor(progress: float, min_ratio: float) -> float:
    """The learning rate as a fraction of the peak: cosine from 1 at progress 0 to min_ratio at 1."""
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

"""Inference engine: uint8 frames in, uint8 frames out. Knows nothing of ZeroMQ or sessions.

An :class:`Engine` upscales one (H, W, C) uint8 array in a pixel format into a caller-provided (H*s, W*s, C) array,
or a :class:`CopiedFrame`, a frame it may reach through copies only (the daemon's shared-memory slots, which a client
could shrink under a direct read). The uint8 <-> float conversion, channel order and alpha handling happen on the
engine's device: ``x = u8 / 255`` in RGB order, ``out = round(clamp(y, 0, 1) * 255)`` written back in the frame's
channel order, alpha upscaled by nearest neighbour (never through the model). Backends:

- :class:`TorchEngine`: a ``models`` network, eager PyTorch, channels_last, under ``inference_mode``. CPU: a thread
  count that fits the usable cores. CUDA: fp16/bf16, pinned staging buffers, its own stream, warm-up (cuDNN
  autotune) per resolution and optionally one CUDA graph per resolution. With ``overlap`` the uploads, the network
  and the downloads run on three streams and two frames may be in flight (:meth:`Engine.start`), so one frame's
  copies overlap the next one's compute.
- :class:`NearestEngine`: nearest-neighbour copy, no model; measures transport alone (benchmarks, tests).

Results are deterministic for a given device, precision and CPU thread count (oneDNN splits work by thread, so a
different thread count may change the last bit of a float and, rarely, a rounded uint8 value).

Faster backends (``torch.compile``, onnxruntime, TensorRT) and ``auto``, which picks the fastest accurate one per
resolution by measurement, live in :mod:`upscaler_server.backends`; :func:`create_engine` builds any of them, on a
network that :mod:`upscaler_server.loading` loads and checks.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import logging
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import cv2
import numpy as np
import torch

from upscaler_server.config import CACHING_BACKENDS, DEFAULT_EDGE_PAD, DEFAULT_SCALE, Config, edge_pad_problem
from upscaler_server.errors import ConfigError, EngineError
from upscaler_server.host import bound_cpu_kernel_caches, resolve_device, return_freed_memory, usable_cores
from upscaler_server.loading import load_network, model_hash, served_network
from upscaler_server.protocol import PIXEL_FORMATS, PixelFormat

__all__ = ["ArrayFrame", "CopiedFrame", "Engine", "NearestEngine", "StageTimes", "TorchEngine", "build_engine",
           "create_engine", "load_network", "model_hash"]

log = logging.getLogger("upscaler_server.engine")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_MAX_PLANS = 8  # resolutions whose CUDA buffers/graphs stay cached
_MAX_STAGING = 4  # resolutions whose staging arrays for copied frames stay allocated
_PlanT = TypeVar("_PlanT")


class PlanCache(Generic[_PlanT]):
    """Per-resolution plans (device buffers, CUDA graphs, TensorRT engines) of the last few frame sizes;
    the least recently used is dropped first, so a client cycling through sizes cannot exhaust memory."""

    def __init__(self, capacity: int = _MAX_PLANS) -> None:
        self.capacity = capacity
        self._plans: collections.OrderedDict[tuple[int, int, str], _PlanT] = collections.OrderedDict()

    def get(self, key: tuple[int, int, str], build: Callable[[], _PlanT]) -> _PlanT:
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        if len(self._plans) >= self.capacity:
            self._plans.popitem(last=False)
        self._plans[key] = plan = build()
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def drop(self, key: tuple[int, int, str]) -> None:
        self._plans.pop(key, None)

    def clear(self) -> None:
        self._plans.clear()


class CopiedFrame(Protocol):
    """A frame the engine reaches through copies only: ``read_into`` fills an (H, W, C) uint8 array with the input,
    ``write_from`` stores an (H*s, W*s, C) uint8 result; both raise UpscalerError when the memory behind is gone."""

    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...

    def read_into(self, lr: np.ndarray) -> None: ...

    def write_from(self, out: np.ndarray) -> None: ...


@dataclass(frozen=True)
class ArrayFrame:
    """A :class:`CopiedFrame` over a caller's arrays, for engines whose array path copies through buffers of their
    own anyway (pinned memory): ``lr`` (H, W, C) is read, ``out`` (H*s, W*s, C) written."""

    lr: np.ndarray
    out: np.ndarray

    @property
    def height(self) -> int:
        return self.lr.shape[0]

    @property
    def width(self) -> int:
        return self.lr.shape[1]

    def read_into(self, lr: np.ndarray) -> None:
        np.copyto(lr, self.lr)

    def write_from(self, out: np.ndarray) -> None:
        np.copyto(self.out, out)


@dataclass
class _Staging:
    """Private arrays a copied frame is read into and its result written from: one pair per frame in flight."""

    pairs: list[tuple[np.ndarray, np.ndarray]]  # (lr (H, W, C), out (sH, sW, C)) uint8
    started: int = 0

    def next_pair(self) -> tuple[np.ndarray, np.ndarray]:
        # the pair was last used max_in_flight frames ago, which the caller has waited for (Engine.start's contract)
        pair = self.pairs[self.started % len(self.pairs)]
        self.started += 1
        return pair


class _StagingCache:
    """Staging pairs per frame size and format. The engine thread takes pairs; :meth:`Engine.release` may drop a
    size from another thread (the daemon's transport thread), hence the lock. Dropping frees nothing in use: a frame
    in flight holds its pair until it is waited for."""

    def __init__(self, pairs_per_size: int) -> None:
        self._lock = threading.Lock()
        self._sizes: PlanCache[_Staging] = PlanCache(_MAX_STAGING)
        self._pairs_per_size = pairs_per_size

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)

    def next_pair(self, lr_shape: tuple[int, int, int], out_shape: tuple[int, int, int],
                  fmt: PixelFormat) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self._sizes.get((lr_shape[0], lr_shape[1], fmt.name), lambda: _Staging(
                [(np.empty(lr_shape, np.uint8), np.empty(out_shape, np.uint8)) for _ in range(self._pairs_per_size)]
            )).next_pair()

    def drop(self, height: int, width: int, fmt: PixelFormat) -> None:
        with self._lock:
            self._sizes.drop((height, width, fmt.name))

    def clear(self) -> None:
        with self._lock:
            self._sizes.clear()


@dataclass(frozen=True)
class StageTimes:
    """Seconds spent per stage on one frame."""

    copy_in: float
    infer: float
    copy_out: float


class Engine(abc.ABC):
    """Upscales uint8 frames; subclasses set the attributes below and implement :meth:`upscale`."""

    name: str  # model architecture, e.g. "rlfn_s"
    scale: int
    min_input_size: int  # smallest height and width accepted
    device: str
    precision: str
    random_weights: bool  # True when the network was not loaded from a checkpoint
    weights: str  # where the weights came from, for logs
    max_in_flight: int = 1  # frames :meth:`start` may have begun whose result was not yet waited for
    _staging: _StagingCache | None = None  # made by the first copied frame (engine thread)

    def output_shape(self, height: int, width: int, fmt: PixelFormat) -> tuple[int, int, int]:
        return height * self.scale, width * self.scale, fmt.channels

    def prepare(self, height: int, width: int, fmt: PixelFormat) -> None:  # noqa: B027 - optional hook
        """Warm up for a resolution (allocate buffers, autotune); a no-op unless the backend gains from it."""

    @abc.abstractmethod
    def upscale(self, lr: np.ndarray, fmt: PixelFormat, out: np.ndarray) -> StageTimes:
        """Upscale ``lr`` (H, W, C) uint8 into ``out`` (H*s, W*s, C) uint8, both in ``fmt``."""

    def start(self, lr: np.ndarray, fmt: PixelFormat, out: np.ndarray) -> Callable[[], StageTimes]:
        """Begin upscaling ``lr`` into ``out``; the returned function waits until ``out`` holds the frame and returns
        the stage times. The caller keeps both arrays alive until then, waits in start order, and has at most
        :attr:`max_in_flight` frames started and not waited for. This default finishes the frame before returning."""
        times = self.upscale(lr, fmt, out)
        return lambda: times

    def start_copied(self, frame: CopiedFrame, fmt: PixelFormat) -> Callable[[], StageTimes]:
        """:meth:`start` for a frame reached through copies: read it into staging arrays, upscale, and write the
        result back when waited for (both copies count in the stage times). Backends that stage frames in buffers of
        their own (pinned memory) override this to read into and write from those, with no extra copy."""
        self.check_input_size(frame.height, frame.width)
        if self._staging is None:
            self._staging = _StagingCache(self.max_in_flight)
        lr, out = self._staging.next_pair((frame.height, frame.width, fmt.channels),
                                          self.output_shape(frame.height, frame.width, fmt), fmt)
        t0 = time.perf_counter()
        frame.read_into(lr)
        read_s = time.perf_counter() - t0
        wait = self.start(lr, fmt, out)

        def finish() -> StageTimes:
            times = wait()
            t1 = time.perf_counter()
            frame.write_from(out)
            return StageTimes(read_s + times.copy_in, times.infer, times.copy_out + time.perf_counter() - t1)

        return finish

    def run(self, lr: np.ndarray, fmt: PixelFormat | str | None = None) -> np.ndarray:
        """Convenience: upscale into a new array. ``fmt`` defaults to RGB8 / RGBA8 by channel count."""
        fmt = _format_for(lr, fmt)
        out = np.empty(self.output_shape(lr.shape[0], lr.shape[1], fmt), np.uint8)
        self.upscale(lr, fmt, out)
        return out

    def release(self, height: int, width: int, fmt: PixelFormat) -> None:
        """Free what is kept only for frames of this size and format (the staging arrays of copied frames); the
        daemon calls it, from its transport thread, when the last session of that size ends. Slow-to-build plans
        (CUDA graphs, TensorRT engines) stay, bounded by their own caches."""
        if self._staging is not None:
            self._staging.drop(height, width, fmt)
        return_freed_memory()

    def close(self) -> None:
        """Release device resources and staging arrays; subclasses that hold more call this too."""
        if self._staging is not None:
            self._staging.clear()

    def check(self, lr: np.ndarray, fmt: PixelFormat, out: np.ndarray) -> None:
        """Raise EngineError unless ``lr`` and ``out`` have the shapes, dtype and layout this engine needs."""
        if lr.dtype != np.uint8 or lr.ndim != 3 or lr.shape[2] != fmt.channels:
            raise EngineError(f"input must be (H, W, {fmt.channels}) uint8 for {fmt.name}, got {lr.shape} {lr.dtype}")
        self.check_input_size(lr.shape[0], lr.shape[1])
        expected = self.output_shape(lr.shape[0], lr.shape[1], fmt)
        if out.dtype != np.uint8 or out.shape != expected or not out.flags.c_contiguous or not out.flags.writeable:
            raise EngineError(f"output must be a writable C-contiguous {expected} uint8 array, got {out.shape}")

    def check_input_size(self, height: int, width: int) -> None:
        """Raise EngineError when a frame is smaller than the model accepts."""
        if min(height, width) < self.min_input_size:
            raise EngineError(f"input {width}x{height} is smaller than the model's minimum "
                              f"{self.min_input_size}x{self.min_input_size}")


def _format_for(lr: np.ndarray, fmt: PixelFormat | str | None) -> PixelFormat:
    if isinstance(fmt, PixelFormat):
        return fmt
    name = fmt or ("RGBA8" if lr.ndim == 3 and lr.shape[2] == 4 else "RGB8")
    if name not in PIXEL_FORMATS:
        raise EngineError(f"unknown pixel format {name!r}; use one of {sorted(PIXEL_FORMATS)}")
    return PIXEL_FORMATS[name]


class NearestEngine(Engine):
    """Nearest-neighbour upscale (OpenCV, SIMD): about the cost of writing the output once, no model at all."""

    def __init__(self, scale: int = 2) -> None:
        self.name, self.scale, self.min_input_size = "nearest", scale, 1
        self.device, self.precision, self.random_weights = "cpu", "uint8", False
        self.weights = "none (nearest-neighbour copy, transport tests only)"

    def upscale(self, lr: np.ndarray, fmt: PixelFormat, out: np.ndarray) -> StageTimes:
        self.check(lr, fmt, out)
        start = time.perf_counter()
        cv2.resize(lr, (out.shape[1], out.shape[0]), dst=out, interpolation=cv2.INTER_NEAREST_EXACT)
        return StageTimes(0.0, time.perf_counter() - start, 0.0)


def _to_model_input(src: torch.Tensor, fmt: PixelFormat, dtype: torch.dtype,
                    memory_format: torch.memory_format) -> torch.Tensor:
    """(H, W, C) uint8 in ``fmt`` -> (1, 3, H, W) RGB in [0, 1] of ``dtype``."""
    chw = src.permute(2, 0, 1)  # (H, W, C) -> (C, H, W), a view
    # stack of views, not chw[list]: list indexing copies an index tensor to the device, which breaks graph capture
    rgb = chw[:3] if fmt.rgb == (0, 1, 2) else torch.stack([chw[i] for i in fmt.rgb])  # (3, H, W)
    x = rgb.unsqueeze(0).to(torch.float32).div_(255.0)  # (1, 3, H, W); divide in fp32 so every path rounds alike
    return x.to(dtype).contiguous(memory_format=memory_format)


def _write_output(y: torch.Tensor, src: torch.Tensor, fmt: PixelFormat, scale: int, dst: torch.Tensor) -> None:
    """Model output (1, 3, sH, sW) -> ``dst`` (sH, sW, C) uint8 in ``fmt``; alpha is ``src``'s, nearest-upscaled."""
    q = y[0].float().clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)  # (3, sH, sW)
    d = dst.permute(2, 0, 1)  # (sH, sW, C) -> (C, sH, sW), a view on dst
    for c, index in enumerate(fmt.rgb):
        d[index].copy_(q[c])
    if fmt.alpha is not None:
        h, w = src.shape[0], src.shape[1]
        a = src[:, :, fmt.alpha]  # (H, W)
        # (sH, sW) -> (H, s, W, s): every LR alpha fills its s x s block
        d[fmt.alpha].unflatten(0, (h, scale)).unflatten(2, (w, scale)).copy_(a[:, None, :, None].expand(h, scale, w,
                                                                                                        scale))


@dataclass
class _CudaBuffers:
    """Static buffers (and optionally a graph) for one frame in flight at one resolution and format."""

    host_in: torch.Tensor  # pinned (H, W, C) uint8
    dev_in: torch.Tensor
    dev_out: torch.Tensor  # (sH, sW, C) uint8
    host_out: torch.Tensor  # pinned
    events: list[torch.cuda.Event]  # timing: upload, compute and download, each a start and an end
    graph: torch.cuda.CUDAGraph | None = None


@dataclass
class _CudaPlan:
    """Everything one resolution and format needs on CUDA: a buffer set per frame that may be in flight."""

    fmt: PixelFormat
    buffers: list[_CudaBuffers]
    started: int = 0  # frames started with this plan: frame i uses buffers[i % len(buffers)]

    def next_buffers(self) -> _CudaBuffers:
        # the set was last used max_in_flight frames ago, which the caller has waited for (Engine.start's contract)
        buffers = self.buffers[self.started % len(self.buffers)]
        self.started += 1
        return buffers


class TorchEngine(Engine):
    """A PyTorch network from ``models`` on CPU or CUDA."""

    def __init__(self, network: torch.nn.Module, *, name: str, device: str, precision: str, weights: str | None,
                 threads: int = 0, cuda_graphs: bool = False, overlap: bool = False) -> None:
        """``weights``: the checkpoint path, or None for a randomly initialised network. ``overlap`` (CUDA only):
        two frames in flight, uploads, compute and downloads on their own streams."""
        self.name, self.device, self.precision = name, device, precision
        self.random_weights = weights is None
        self.weights = weights or "RANDOM (benchmarks only: output is noise)"
        self.scale = int(network.scale)
        self.min_input_size = int(getattr(network, "min_input_size", 1))
        self._dtype = _DTYPES[precision]
        self._cuda = device.startswith("cuda")
        self._memory_format = torch.channels_last  # NHWC: faster on tensor cores and 2-3x faster with oneDNN on CPU
        self._graphs = cuda_graphs and self._cuda
        self._plans: PlanCache[_CudaPlan] = PlanCache()
        self.max_in_flight = 2 if overlap and self._cuda else 1
        if self._cuda:
            torch.backends.cudnn.benchmark = True  # autotuned per resolution during warm-up
            self._stream: torch.cuda.Stream | None = torch.cuda.Stream(device=device)  # the network's
            # without overlap one stream does everything in order; with it, copies wait on events, not on compute
            copies = [torch.cuda.Stream(device=device) for _ in range(2)] if overlap else [self._stream] * 2
            self._upload_stream, self._download_stream = copies
        else:
            self._stream = None
            torch.set_num_threads(threads or usable_cores())
        self._net = network.eval().requires_grad_(False).to(device=device, dtype=self._dtype,
                                                             memory_format=self._memory_format)

    def _compute(self, src: torch.Tensor, fmt: PixelFormat, dst: torch.Tensor) -> None:
        _write_output(self._net(_to_model_input(src, fmt, self._dtype, self._memory_format)), src, fmt, self.scale, dst)

    def upscale(self, lr: np.ndarray, fmt: PixelFormat, out: np.ndarray) -> StageTimes:
        return self.start(lr, fmt, out)()

    def start(self, lr: np.ndarray, fmt: PixelFormat, out: np.ndarray) -> Callable[[], StageTimes]:
        self.check(lr, fmt, out)
        if not self._cuda:
            with _engine_errors(lr.shape[0], lr.shape[1], fmt), torch.inference_mode():
                times = self._upscale_cpu(lr, fmt, out)
            return lambda: times
        return self._start_cuda(ArrayFrame(lr, out), fmt)

    def start_copied(self, frame: CopiedFrame, fmt: PixelFormat) -> Callable[[], StageTimes]:
        if not self._cuda:
            return super().start_copied(frame, fmt)
        self.check_input_size(frame.height, frame.width)
        # the pinned buffers are the staging: the frame is read straight into them and written straight from them
        return self._start_cuda(frame, fmt)

    def _start_cuda(self, frame: CopiedFrame, fmt: PixelFormat) -> Callable[[], StageTimes]:
        """:meth:`_queue_cuda` with backend failures turned into EngineError, at the start and when waited for."""
        with _engine_errors(frame.height, frame.width, fmt), torch.inference_mode():
            finish = self._queue_cuda(frame, fmt)

        def wait() -> StageTimes:
            with _engine_errors(frame.height, frame.width, fmt):  # CUDA reports a failed kernel when it is waited for
                return finish()

        return wait

    def _upscale_cpu(self, lr: np.ndarray, fmt: PixelFormat, out: np.ndarray) -> StageTimes:
        t0 = time.perf_counter()
        src = torch.from_numpy(lr if lr.flags.writeable else lr.copy())  # torch warns on read-only buffers
        x = _to_model_input(src, fmt, self._dtype, self._memory_format)
        t1 = time.perf_counter()
        y = self._net(x)  # (1, 3, H, W) -> (1, 3, sH, sW)
        t2 = time.perf_counter()
        _write_output(y, src, fmt, self.scale, torch.from_numpy(out))
        return StageTimes(t1 - t0, t2 - t1, time.perf_counter() - t2)

    def prepare(self, height: int, width: int, fmt: PixelFormat) -> None:
        if self._cuda:
            with torch.inference_mode():
                self._plan(height, width, fmt)

    def _plan(self, height: int, width: int, fmt: PixelFormat) -> _CudaPlan:
        return self._plans.get((height, width, fmt.name), lambda: self._new_plan(height, width, fmt))

    def _new_plan(self, height: int, width: int, fmt: PixelFormat) -> _CudaPlan:
        out_shape = self.output_shape(height, width, fmt)
        plan = _CudaPlan(fmt=fmt, buffers=[_CudaBuffers(
            host_in=torch.empty((height, width, fmt.channels), dtype=torch.uint8, pin_memory=True),
            dev_in=torch.zeros((height, width, fmt.channels), dtype=torch.uint8, device=self.device),
            dev_out=torch.empty(out_shape, dtype=torch.uint8, device=self.device),
            host_out=torch.empty(out_shape, dtype=torch.uint8, pin_memory=True),
            events=[torch.cuda.Event(enable_timing=True) for _ in range(6)],
        ) for _ in range(self.max_in_flight)])  # fmt: skip
        self._warm_up(plan)
        return plan

    def _warm_up(self, plan: _CudaPlan) -> None:
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the buffers were zeroed there
        first = plan.buffers[0]
        with torch.cuda.stream(self._stream):
            for _ in range(3):  # first runs pick cuDNN algorithms for this shape
                self._compute(first.dev_in, plan.fmt, first.dev_out)
        self._stream.synchronize()
        if not self._graphs:
            return
        for buffers in plan.buffers:  # a graph reads and writes fixed addresses: one per buffer set
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self._stream):
                    self._compute(buffers.dev_in, plan.fmt, buffers.dev_out)
                buffers.graph = graph
            except RuntimeError as exc:  # e.g. an op that cannot be captured: stay eager for this shape
                log.warning("CUDA graph capture failed for %s, running eagerly: %s", tuple(buffers.dev_in.shape), exc)
                return

    def _queue_cuda(self, frame: CopiedFrame, fmt: PixelFormat) -> Callable[[], StageTimes]:
        """Queue upload -> network -> download of one frame on the streams; returns what waits for it. The frame is
        read straight into the pinned upload buffer and its result written straight from the pinned download one."""
        assert self._stream is not None
        plan = self._plan(frame.height, frame.width, fmt)
        buffers = plan.next_buffers()
        t0 = time.perf_counter()
        # an array, or a slot by pread -> pinned; this set's previous frame was waited for
        frame.read_into(buffers.host_in.numpy())
        staged = time.perf_counter() - t0
        up_start, up_end, compute_start, compute_end, down_start, down_end = buffers.events
        upload, download = self._upload_stream, self._download_stream
        with torch.cuda.stream(upload):
            up_start.record(upload)
            buffers.dev_in.copy_(buffers.host_in, non_blocking=True)
            up_end.record(upload)
        self._stream.wait_event(up_end)
        with torch.cuda.stream(self._stream):
            compute_start.record(self._stream)
            if buffers.graph is not None:
                buffers.graph.replay()
            else:
                self._compute(buffers.dev_in, fmt, buffers.dev_out)
            compute_end.record(self._stream)
        download.wait_event(compute_end)
        with torch.cuda.stream(download):
            down_start.record(download)
            buffers.host_out.copy_(buffers.dev_out, non_blocking=True)
            down_end.record(download)

        def finish() -> StageTimes:
            down_end.synchronize()
            t1 = time.perf_counter()
            frame.write_from(buffers.host_out.numpy())
            unstaged = time.perf_counter() - t1
            return StageTimes(staged + up_start.elapsed_time(up_end) / 1e3,
                              compute_start.elapsed_time(compute_end) / 1e3,
                              down_start.elapsed_time(down_end) / 1e3 + unstaged)

        return finish

    def close(self) -> None:
        super().close()
        self._plans.clear()
        if self._cuda:
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _engine_errors(height: int, width: int, fmt: PixelFormat) -> Iterator[None]:
    """Backend failures (CUDA out of memory, a bad kernel) as EngineError, which the daemon sends to the client."""
    try:
        yield
    except (RuntimeError, ValueError) as exc:
        raise EngineError(f"inference failed on a {width}x{height} {fmt.name} frame: {exc}") from exc


def build_engine(config: Config, on_tune: Callable[[str], None] | None = None) -> Engine:
    """The engine the daemon's ``config`` asks for; raises ModelLoadError, ConfigError or EngineError. ``on_tune``:
    see create_engine."""
    return create_engine(checkpoint=config.checkpoint, model=config.model, backend=config.backend,
                         scale=config.scale, device=config.device, precision=config.precision, threads=config.threads,
                         cuda_graphs=config.cuda_graphs, overlap=config.overlap, pad_channels=config.pad_channels,
                         edge_pad=config.edge_pad, cache_dir=config.cache_dir,
                         auto_backends=config.auto_backends, tune_sizes=config.tune_sizes, on_tune=on_tune)


def _refuse_unusable_options(*, backend: str, device: str, precision: str, pad_channels: int,
                             edge_pad: int | None, cuda_graphs: bool, overlap: bool, auto_backends: tuple[str, ...],
                             tune_sizes: tuple[tuple[int, int], ...], cache_dir: pathlib.Path | None) -> None:
    """ConfigError naming options that cannot apply to ``backend`` or an explicit ``device``: each was dropped in
    silence, so a run "with" --tune-sizes measured nothing and one "with" --cuda-graphs on a CPU captured none."""
    unusable = []
    if backend != "auto":
        unusable += [f"{flag} (--backend auto only)" for flag, given in
                     (("--tune-sizes", tune_sizes), ("--auto-backends", auto_backends)) if given]
    if backend not in CACHING_BACKENDS and cache_dir is not None:
        unusable.append(f"--cache-dir (the {backend} backend keeps no files: {', '.join(CACHING_BACKENDS)} do)")
    if backend == "nearest":
        unusable += [f"{flag} (the nearest backend runs no model)" for flag, given in
                     (("--precision", precision != "auto"), ("--pad-channels", pad_channels),
                      ("--edge-pad", edge_pad)) if given]  # 0, as --pad-channels 0, is "off": nothing ignored
    if device == "cpu":
        unusable += [f"{flag} (CUDA only)" for flag, given in
                     (("--cuda-graphs", cuda_graphs), ("--overlap", overlap)) if given]
    if unusable:
        raise ConfigError(f"these options would be ignored: {', '.join(unusable)}; leave them out")


def create_engine(*, checkpoint: pathlib.Path | None = None, model: str | None = None, backend: str = "eager",
                  scale: int | None = None, device: str = "auto", precision: str = "auto", threads: int = 0,
                  cuda_graphs: bool = False, overlap: bool = False, pad_channels: int = 0,
                  edge_pad: int | None = None, cache_dir: pathlib.Path | None = None,
                  auto_backends: tuple[str, ...] = (), tune_sizes: tuple[tuple[int, int], ...] = (),
                  on_tune: Callable[[str], None] | None = None) -> Engine:
    """An engine from explicit settings (the offline CLI and tests use this; see Config for their meaning).
    ``backend``: eager (alias torch), compile, onnxruntime, tensorrt, auto or nearest; ``edge_pad`` None:
    DEFAULT_EDGE_PAD; ``on_tune(what)``: called before each backend that auto measures for ``tune_sizes``."""
    from upscaler_server import backends  # the backends import this module

    _refuse_unusable_options(backend=backend, device=device, precision=precision, pad_channels=pad_channels,
                             edge_pad=edge_pad, cuda_graphs=cuda_graphs, overlap=overlap, auto_backends=auto_backends,
                             tune_sizes=tune_sizes, cache_dir=cache_dir)
    if edge_pad is not None and (problem := edge_pad_problem(edge_pad)) is not None:
        raise ConfigError(problem)
    if backend == "nearest":
        if checkpoint is not None or model is not None:  # it was ignored: a run "with" a checkpoint that used none
            raise ConfigError("the nearest backend runs no model: leave out --checkpoint and --model (--scale sets "
                              "its factor)")
        return NearestEngine(DEFAULT_SCALE if scale is None else scale)
    if backend not in backends.BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(backends.BACKENDS)}")
    resolved = resolve_device(device)
    if resolved == "cpu" and (cuda_graphs or overlap):  # --device auto on a machine without a GPU: said, not refused
        log.warning("--cuda-graphs and --overlap need CUDA: no GPU here, so they are off")
    if resolved == "cpu":
        bound_cpu_kernel_caches()  # before load_network, whose overflow check runs the first convolution
    edge_pixels = DEFAULT_EDGE_PAD if edge_pad is None else edge_pad
    network, name, weights, identity = served_network(checkpoint, model, scale, pad_channels=pad_channels,
                                                      edge_pad=edge_pixels)
    if weights is None:
        log.warning("model %s runs with RANDOM weights: output is noise, for benchmarks and tests only", name)
    settings = backends.Settings(name=name, device=resolved, precision=precision, weights=weights, threads=threads,
                                 cuda_graphs=cuda_graphs, overlap=overlap, cache_dir=backends.cache_dir(cache_dir),
                                 model_hash=identity)
    if backend == "auto":
        return backends.AutoEngine(network, settings, candidates=auto_backends, tune_sizes=tune_sizes,
                                   on_tune=on_tune)
    engine = backends.make_backend(backend, network, settings)
    log.info("backend %s on %s, %s, frame edges repeated %d px (--edge-pad)", backend, engine.device,
             engine.precision, edge_pixels)
    return engine

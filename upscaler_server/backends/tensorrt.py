"""``tensorrt`` backend (CUDA, optional dependency): the uint8-I/O ONNX export built by TensorRT in fp16.

One engine per resolution (an optimisation profile with min = opt = max, TensorRT's fastest tactics for exactly that
shape), serialised into the cache folder keyed by the model hash, TensorRT version, GPU name and resolution, so a
restart deserialises in milliseconds instead of building for a minute. A cached engine is used only if this user owns
it and no other user may write it (a plan records no model hash to check; its name holds it); else it is built again.
Frames go through pinned staging buffers on the engine's own stream; the channel order and alpha are handled on the GPU
with PyTorch around the TensorRT call.

Untested where this was written (no GPU, no ``tensorrt`` package): tests/test_backends.py runs it where both exist.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from upscaler_server.backends.common import Settings, read_private, replace_private
from upscaler_server.backends.onnxrt import onnx_model
from upscaler_server.engine import ArrayFrame, CopiedFrame, Engine, PlanCache, StageTimes
from upscaler_server.errors import EngineError, ModelLoadError
from upscaler_server.protocol import PixelFormat

__all__ = ["TensorRTEngine"]

log = logging.getLogger("upscaler_server.backends.tensorrt")

_WORKSPACE = 1 << 30


@dataclass
class _Plan:
    """Engine, context and static buffers for one resolution and pixel format."""

    engine: Any  # tensorrt.ICudaEngine
    context: Any  # tensorrt.IExecutionContext
    host_in: torch.Tensor  # pinned (H, W, C) uint8
    dev_in: torch.Tensor  # (H, W, C) uint8
    rgb_in: torch.Tensor  # (1, H, W, 3) uint8 RGB, TensorRT's input
    rgb_out: torch.Tensor  # (1, sH, sW, 3) uint8 RGB, TensorRT's output
    dev_out: torch.Tensor  # (sH, sW, C) uint8 in the frame's format
    host_out: torch.Tensor  # pinned


class TensorRTEngine(Engine):
    """fp16 TensorRT engines built from the uint8-I/O ONNX export, one per resolution, cached on disk."""

    def __init__(self, network: torch.nn.Module, settings: Settings) -> None:
        import tensorrt as trt

        self._trt = trt
        self.name, self.device, self.precision = settings.name, settings.device, "fp16"
        self.random_weights = settings.weights is None
        self.weights = settings.weights or "RANDOM (benchmarks only: output is noise)"
        self.scale = int(network.scale)
        self.min_input_size = int(getattr(network, "min_input_size", 1))
        self._settings = settings
        self._onnx = onnx_model(network, settings)  # the checked bytes
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._stream = torch.cuda.Stream(device=self.device)
        self._plans: PlanCache[_Plan] = PlanCache()

    def prepare(self, height: int, width: int, fmt: PixelFormat) -> None:
        self._plan(height, width, fmt)

    def _engine_path(self, height: int, width: int) -> pathlib.Path:
        gpu = torch.cuda.get_device_name(self.device).replace(" ", "_").replace("/", "_")
        name = f"{self._settings.model_hash[:24]}-trt{self._trt.__version__}-{gpu}-{width}x{height}-fp16.plan"
        return self._settings.cache_dir / "tensorrt" / name

    def _load_or_build(self, height: int, width: int) -> Any:
        path = self._engine_path(height, width)
        data, problem = read_private(path)  # another user's plan in a shared cache folder is not run
        if data is None:
            if problem:
                log.warning("not using the cached TensorRT engine %s: %s; building it again", path, problem)
            path.parent.mkdir(parents=True, exist_ok=True)
            log.info("building a TensorRT engine for %dx%d (once per model, GPU and size): %s", width, height, path)
            data = self._build(height, width)
            fd, tmp = tempfile.mkstemp(suffix=".plan", dir=path.parent)  # private (0600) until it replaces `path`
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                replace_private(pathlib.Path(tmp), path)
            finally:
                pathlib.Path(tmp).unlink(missing_ok=True)
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:  # e.g. written by another TensorRT build: rebuild once
            path.unlink(missing_ok=True)
            raise ModelLoadError(f"TensorRT could not load {path}; it was removed, try again")
        return engine

    def _build(self, height: int, width: int) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        explicit_batch = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)  # the default from TensorRT 10
        network = builder.create_network(0 if int(trt.__version__.split(".")[0]) >= 10 else explicit_batch)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(self._onnx):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelLoadError(f"TensorRT cannot parse the ONNX export of {self.name}: {errors}")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE)
        profile = builder.create_optimization_profile()
        shape = (1, height, width, 3)
        profile.set_shape("lr", shape, shape, shape)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelLoadError(f"TensorRT failed to build an engine for {width}x{height}")
        return bytes(serialized)

    def _plan(self, height: int, width: int, fmt: PixelFormat) -> _Plan:
        return self._plans.get((height, width, fmt.name), lambda: self._new_plan(height, width, fmt))

    def _new_plan(self, height: int, width: int, fmt: PixelFormat) -> _Plan:
        engine = self._load_or_build(height, width)
        context = engine.create_execution_context()
        out_shape = self.output_shape(height, width, fmt)
        dev = torch.device(self.device)
        plan = _Plan(engine=engine, context=context,
                     host_in=torch.empty((height, width, fmt.channels), dtype=torch.uint8, pin_memory=True),
                     dev_in=torch.empty((height, width, fmt.channels), dtype=torch.uint8, device=dev),
                     rgb_in=torch.empty((1, height, width, 3), dtype=torch.uint8, device=dev),
                     rgb_out=torch.empty((1, *out_shape[:2], 3), dtype=torch.uint8, device=dev),
                     dev_out=torch.empty(out_shape, dtype=torch.uint8, device=dev),
                     host_out=torch.empty(out_shape, dtype=torch.uint8, pin_memory=True))
        context.set_input_shape("lr", tuple(plan.rgb_in.shape))
        context.set_tensor_address("lr", plan.rgb_in.data_ptr())
        context.set_tensor_address("hr", plan.rgb_out.data_ptr())
        return plan

    def upscale(self, lr: np.ndarray, fmt: PixelFormat, out: np.ndarray) -> StageTimes:
        self.check(lr, fmt, out)
        return self._run(ArrayFrame(lr, out), fmt)

    def start_copied(self, frame: CopiedFrame, fmt: PixelFormat) -> Callable[[], StageTimes]:
        self.check_input_size(frame.height, frame.width)
        # the pinned buffers are the staging: the frame is read straight into them and written straight from them
        times = self._run(frame, fmt)
        return lambda: times

    def _run(self, frame: CopiedFrame, fmt: PixelFormat) -> StageTimes:
        """One frame, read straight into the pinned upload buffer and written straight from the pinned download one."""
        plan = self._plan(frame.height, frame.width, fmt)
        t0 = time.perf_counter()
        frame.read_into(plan.host_in.numpy())
        with torch.cuda.stream(self._stream):
            plan.dev_in.copy_(plan.host_in, non_blocking=True)
            for c, index in enumerate(fmt.rgb):  # frame order -> RGB, on the GPU
                plan.rgb_in[0, :, :, c].copy_(plan.dev_in[:, :, index])
            t1 = time.perf_counter()
            if not plan.context.execute_async_v3(self._stream.cuda_stream):
                raise EngineError(f"TensorRT failed on a {frame.width}x{frame.height} frame")
            self._stream.synchronize()
            t2 = time.perf_counter()
            self._write(plan, fmt)
            plan.host_out.copy_(plan.dev_out, non_blocking=True)
        self._stream.synchronize()
        frame.write_from(plan.host_out.numpy())
        return StageTimes(t1 - t0, t2 - t1, time.perf_counter() - t2)

    def _write(self, plan: _Plan, fmt: PixelFormat) -> None:
        """RGB output -> the frame's channel order; alpha nearest-upscaled from the input."""
        for c, index in enumerate(fmt.rgb):
            plan.dev_out[:, :, index].copy_(plan.rgb_out[0, :, :, c])
        if fmt.alpha is not None:
            alpha = plan.dev_in[:, :, fmt.alpha]  # (H, W)
            h, w = alpha.shape
            blocks = plan.dev_out[:, :, fmt.alpha].unflatten(0, (h, self.scale)).unflatten(2, (w, self.scale))
            blocks.copy_(alpha[:, None, :, None].expand(h, self.scale, w, self.scale))  # (H, s, W, s)

    def close(self) -> None:
        super().close()
        self._plans.clear()
        torch.cuda.empty_cache()

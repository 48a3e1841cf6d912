"""Inference backends behind :class:`~upscaler_server.engine.Engine` (uint8 arrays in, uint8 arrays out).

- ``eager`` (alias ``torch``): :class:`~upscaler_server.engine.TorchEngine`, PyTorch eager, channels_last.
- ``compile``: :class:`CompiledEngine`, the same computation (uint8 conversion and colour order included) through
  ``torch.compile`` (inductor; CPU: weights frozen and prepacked for oneDNN; CUDA: max-autotune).
- ``onnxruntime``: :class:`OnnxRuntimeEngine`, the uint8-I/O ONNX export run by onnxruntime (CPU or CUDA provider).
- ``tensorrt``: :class:`TensorRTEngine`, the same ONNX file built by TensorRT (CUDA, fp16, one engine per resolution).
- ``auto``: :class:`AutoEngine`, the fastest of the available ones whose output stays within :data:`TOLERANCE` of
  fp32 eager, measured per device and resolution and remembered on disk.

Precisions: ``auto`` means fp32 on CPU and fp16 on CUDA for a named backend; ``auto`` the backend also tries bf16
on CPUs with bf16 instructions. onnxruntime runs fp32 only.
"""

from upscaler_server.backends.auto import AutoEngine
from upscaler_server.backends.common import (
    BACKENDS,
    CACHE_ENV,
    TOLERANCE,
    Settings,
    Tolerance,
    cache_dir,
    cpu_bf16,
    unavailable,
)
from upscaler_server.backends.compile import CompiledEngine
from upscaler_server.backends.factory import make_backend
from upscaler_server.backends.onnxrt import OnnxRuntimeEngine
from upscaler_server.backends.tensorrt import TensorRTEngine

__all__ = ["BACKENDS", "CACHE_ENV", "TOLERANCE", "AutoEngine", "CompiledEngine", "OnnxRuntimeEngine", "Settings",
           "TensorRTEngine", "Tolerance", "cache_dir", "cpu_bf16", "make_backend", "unavailable"]

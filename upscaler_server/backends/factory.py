"""Build a named backend."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from upscaler_server.backends.common import BACKENDS, Settings, unavailable
from upscaler_server.backends.compile import CompiledEngine
from upscaler_server.backends.onnxrt import OnnxRuntimeEngine
from upscaler_server.backends.tensorrt import TensorRTEngine
from upscaler_server.engine import Engine, TorchEngine
from upscaler_server.errors import ConfigError
from upscaler_server.host import resolve_precision

__all__ = ["ONLY_PRECISION", "make_backend"]

ONLY_PRECISION = {"onnxruntime": "fp32", "tensorrt": "fp16"}  # backends that run one precision: what "auto" means


def make_backend(backend: str, network: torch.nn.Module, settings: Settings) -> Engine:
    """A named backend (not auto or nearest) on its own copy of ``network``; ConfigError if it cannot run here."""
    # the device first: tensorrt on a CPU was told that "fp16 needs CUDA; use --precision fp32", then refused that
    reason = unavailable(backend, settings.device, "auto")
    if reason is not None:
        raise ConfigError(f"backend {backend} is not available: {reason}")
    asked = ONLY_PRECISION.get(backend, "auto") if settings.precision == "auto" else settings.precision
    precision = resolve_precision(asked, settings.device)
    reason = unavailable(backend, settings.device, precision)
    if reason is not None:
        raise ConfigError(f"backend {backend} ({precision}) is not available: {reason}")
    network = copy.deepcopy(network)  # backends move and cast their network in place
    settings = replace(settings, precision=precision)
    if backend in ("eager", "torch", "compile"):
        engine_class = CompiledEngine if backend == "compile" else TorchEngine
        return engine_class(network, name=settings.name, device=settings.device, precision=precision,
                            weights=settings.weights, threads=settings.threads, cuda_graphs=settings.cuda_graphs,
                            overlap=settings.overlap)
    if backend == "onnxruntime":
        return OnnxRuntimeEngine(network, settings)
    if backend == "tensorrt":
        return TensorRTEngine(network, settings)
    raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")

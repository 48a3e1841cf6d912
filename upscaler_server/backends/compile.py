"""``compile`` backend: the eager engine's whole per-frame computation through ``torch.compile``.

What is compiled is :meth:`TorchEngine._compute`: uint8 (H, W, C) in the frame's channel order -> float -> the
network -> clamp, round -> uint8 written into the output frame, alpha included. Inductor fuses the conversions into
the first and last kernels, so no float copy of the frame exists outside the network. One graph per resolution and
pixel format (static shapes: the fastest kernels; a new size recompiles once, during ``prepare``).

- CPU: ``freezing`` turns the weights into constants so that inductor prepacks them for oneDNN convolutions.
- CUDA: ``max-autotune-no-cudagraphs`` (Triton/cuBLAS autotuning); the engine captures its own CUDA graph per
  resolution when ``cuda_graphs`` is on, around the compiled code and the staging copies' neighbours.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from upscaler_server.engine import StageTimes, TorchEngine
from upscaler_server.protocol import PixelFormat

__all__ = ["CompiledEngine"]

_RECOMPILE_LIMIT = 64  # graphs per engine: resolutions x pixel formats


class CompiledEngine(TorchEngine):
    """:class:`TorchEngine` with the frame conversion and the network compiled by inductor."""

    def __init__(self, network: torch.nn.Module, *, name: str, device: str, precision: str, weights: str | None,
                 threads: int = 0, cuda_graphs: bool = False, overlap: bool = False) -> None:
        super().__init__(network, name=name, device=device, precision=precision, weights=weights, threads=threads,
                         cuda_graphs=cuda_graphs, overlap=overlap)
        for key in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), _RECOMPILE_LIMIT))
        if self._cuda:
            self._compiled = torch.compile(self._eager_compute, dynamic=False, mode="max-autotune-no-cudagraphs")
        else:
            self._compiled = torch.compile(self._eager_compute, dynamic=False, options={"freezing": True})

    def _eager_compute(self, src: torch.Tensor, fmt: PixelFormat, dst: torch.Tensor) -> None:
        TorchEngine._compute(self, src, fmt, dst)

    def _compute(self, src: torch.Tensor, fmt: PixelFormat, dst: torch.Tensor) -> None:
        self._compiled(src, fmt, dst)

    def prepare(self, height: int, width: int, fmt: PixelFormat) -> None:
        if self._cuda:
            super().prepare(height, width, fmt)
            return
        with torch.inference_mode():  # compile now rather than on the first frame
            lr = np.zeros((height, width, fmt.channels), np.uint8)
            self._compute(torch.from_numpy(lr), fmt, torch.from_numpy(np.empty(self.output_shape(height, width, fmt),
                                                                                 np.uint8)))

    def _upscale_cpu(self, lr: np.ndarray, fmt: PixelFormat, out: np.ndarray) -> StageTimes:
        start = time.perf_counter()
        src = torch.from_numpy(lr if lr.flags.writeable else lr.copy())  # torch warns on read-only buffers
        self._compute(src, fmt, torch.from_numpy(out))
        return StageTimes(0.0, time.perf_counter() - start, 0.0)  # one fused call: conversions are inside

"""``onnxruntime`` backend: the uint8-I/O ONNX export (``upscaler_server.export``) run by onnxruntime.

The graph takes (1, H, W, 3) uint8 RGB and returns (1, sH, sW, 3) uint8 RGB: the float conversion, clamp and rounding
run inside onnxruntime, fused with the first and last convolutions where its optimiser can. H and W are symbolic, so
one file serves every resolution; it is exported once per model (keyed by its hash) into the cache folder, and a cached
file is used only if this user owns it, no other user may write it and its metadata records this model's hash
(``onnx_model``; else it is exported again, with a warning that says why). RGB8 frames are bound directly (no copy
in or out); other formats reorder channels with NumPy around the call and upscale alpha by nearest neighbour, as every
backend does.
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile
import time
from typing import Any

import cv2
import numpy as np
import torch

from upscaler_server.backends.common import CACHE_ENV, Settings, read_private, replace_private
from upscaler_server.engine import Engine, StageTimes
from upscaler_server.errors import ConfigError, EngineError, ModelLoadError
from upscaler_server.host import usable_cores
from upscaler_server.protocol import PixelFormat

__all__ = ["OnnxRuntimeEngine", "onnx_model"]

log = logging.getLogger("upscaler_server.backends.onnxrt")


def onnx_model(network: torch.nn.Module, settings: Settings) -> bytes:
    """The uint8-I/O, dynamic-shape ONNX export of ``network``, read from the cache folder when the file there can be
    trusted (:func:`read_private`, and its ``takdsr.sha256`` metadata is ``settings.model_hash``), else exported again
    (a few seconds) to a private temporary file that then replaces it. The bytes are returned, not the path: what was
    checked is what runs, whatever happens to the file afterwards."""
    folder = settings.cache_dir / "onnx"
    path = folder / f"{settings.model_hash[:24]}-uint8-dynamic.onnx"
    data, problem = read_private(path)
    if data is not None:
        problem = _hash_problem(data, settings.model_hash)
        if problem is None:
            return data
    if problem:  # a missing file is exported without a word beyond the info line below
        log.warning("not using the cached ONNX file %s: %s; exporting the model again", path, problem)
    return _export(network, settings, path)


def _hash_problem(data: bytes, model_hash: str) -> str | None:
    """Why the ONNX file ``data`` is not the export of the model whose SHA-256 is ``model_hash``, or None when it is."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        props = {p.key: p.value for p in onnx.load_model_from_string(data).metadata_props}
    except (DecodeError, ValueError, RuntimeError) as exc:
        return f"it is not a readable ONNX file ({exc})"
    recorded = props.get("takdsr.sha256")
    if recorded is None:
        return "it records no model hash (takdsr.sha256): not an export this cache wrote"
    if recorded != model_hash:
        return f"it is the export of another model (sha256 {recorded[:24]}, not {model_hash[:24]})"
    return None


def _export(network: torch.nn.Module, settings: Settings, path: pathlib.Path) -> bytes:
    """Export ``network`` to a private temporary file beside ``path``, read it, move it onto ``path``."""
    from upscaler_server.export import export_onnx

    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=folder)
    except OSError as exc:  # a read-only HOME in a container, or a file where the folder should be
        raise ConfigError(f"cannot write the ONNX cache in {folder}: {exc.strerror or exc}; pass --cache-dir DIR or "
                          f"set ${CACHE_ENV} to a writable folder") from exc
    os.close(fd)
    log.info("exporting %s to %s (once per model)", settings.name, path)
    size = max(64, int(getattr(network, "min_input_size", 1)))
    try:
        for noisy in ("torch.onnx", "onnxscript", "onnx_ir"):  # per-pass notices, "torchvision is not installed"
            logging.getLogger(noisy).setLevel(logging.WARNING if noisy != "torch.onnx" else logging.ERROR)
        export_onnx(network.float().cpu(), pathlib.Path(tmp), io="uint8", height=size, width=size, dynamic=True,
                    metadata={"takdsr.model": settings.name, "takdsr.sha256": settings.model_hash})
        data = pathlib.Path(tmp).read_bytes()
        replace_private(pathlib.Path(tmp), path)
    except (RuntimeError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot export {settings.name} to ONNX for onnxruntime/TensorRT: {exc}") from exc
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)
    return data


class OnnxRuntimeEngine(Engine):
    """A decoder exported to ONNX (uint8 RGB in and out) on onnxruntime's CPU or CUDA provider."""

    def __init__(self, network: torch.nn.Module, settings: Settings) -> None:
        import onnxruntime as ort

        self.name, self.device, self.precision = settings.name, settings.device, "fp32"
        self.random_weights = settings.weights is None
        self.weights = settings.weights or "RANDOM (benchmarks only: output is noise)"
        self.scale = int(network.scale)
        self.min_input_size = int(getattr(network, "min_input_size", 1))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = settings.threads or usable_cores()
        options.inter_op_num_threads = 1  # one chain of convolutions: nothing to run side by side
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Its threads would spin for a while after each frame, burning a core while the daemon waits for the next one
        # (a game's CPU time): 70 ms of CPU per 128x72 frame and 200 ms idle after it, 30 without; no slower
        # per frame without (measured: 398 against 415 ms at 640x360, 16 against 15 ms at 128x72)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        cuda = self.device.startswith("cuda")
        providers: list[Any] = ["CPUExecutionProvider"]
        if cuda:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": _device_index(self.device)}))
        model = onnx_model(network, settings)  # its errors name themselves: an unwritable cache is a setting
        try:  # the bytes checked, not the file's name (which may also not be valid UTF-8: onnxruntime refuses that)
            self._session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise ModelLoadError(f"onnxruntime cannot load the exported model: {exc}") from exc
        self._scratch: dict[tuple[int, int], np.ndarray] = {}

    def upscale(self, lr: np.ndarray, fmt: PixelFormat, out: np.ndarray) -> StageTimes:
        self.check(lr, fmt, out)
        t0 = time.perf_counter()
        direct = fmt.rgb == (0, 1, 2) and fmt.alpha is None
        rgb = lr if direct else np.ascontiguousarray(lr[:, :, list(fmt.rgb)])  # (H, W, C) -> (H, W, 3) RGB
        hr = out if direct else self._buffer(out.shape[0], out.shape[1])  # (sH, sW, 3) RGB
        binding = self._session.io_binding()
        binding.bind_cpu_input("lr", rgb[None])  # (1, H, W, 3), a view
        binding.bind_output("hr", "cpu", 0, np.uint8, [1, *hr.shape], hr.ctypes.data)
        t1 = time.perf_counter()
        try:
            self._session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's own exception types
            raise EngineError(f"onnxruntime failed on a {lr.shape[1]}x{lr.shape[0]} {fmt.name} frame: {exc}") from exc
        t2 = time.perf_counter()
        if not direct:
            for c, index in enumerate(fmt.rgb):
                out[:, :, index] = hr[:, :, c]
            if fmt.alpha is not None:
                out[:, :, fmt.alpha] = cv2.resize(np.ascontiguousarray(lr[:, :, fmt.alpha]),
                                                  (out.shape[1], out.shape[0]), interpolation=cv2.INTER_NEAREST_EXACT)
        return StageTimes(t1 - t0, t2 - t1, time.perf_counter() - t2)

    def _buffer(self, height: int, width: int) -> np.ndarray:
        if (height, width) not in self._scratch:
            if len(self._scratch) >= 8:
                self._scratch.clear()
            self._scratch[height, width] = np.empty((height, width, 3), np.uint8)
        return self._scratch[height, width]

    def close(self) -> None:
        super().close()
        self._scratch.clear()


def _device_index(device: str) -> int:
    return int(device.partition(":")[2] or 0)

"""``python -m upscaler_server.export``: a deployable decoder as a self-contained ONNX file for engines that run it
themselves (TensorRT, DirectML, onnxruntime, ...).

The model comes from a checkpoint (default: the bundled student, ``models.DEFAULT_STUDENT_PATH``) or from a registered
name with random weights (benchmarks). Teachers are refused: their forward needs the HR frame they are meant to
produce. Two I/O layouts (``--io``):

- ``uint8`` (default): input ``lr`` (1, H, W, 3) uint8 RGB, output ``hr`` (1, H*s, W*s, 3) uint8 RGB; the graph does
  what the daemon does around the network: ``x / 255``, the network, ``round(clamp(y, 0, 1) * 255)`` (ONNX Round is
  half to even, like torch.round).
- ``float``: input ``lr`` (1, 3, H, W) float32 RGB in [0, 1], output ``hr`` (1, 3, H*s, W*s) float32, not clamped.

Static shapes fix H x W to ``--height`` x ``--width``; ``--dynamic-shapes`` makes H and W symbolic (at least the
model's minimum input size, 15 for RLFN/RFDN). The batch is 1. Exported with the torch.export-based exporter
(needs ``onnx`` and ``onnxscript``); ``--benchmark N`` also times onnxruntime (CPU) against PyTorch eager.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from upscaler_server.engine import load_network
from upscaler_server.errors import ModelLoadError

__all__ = ["Uint8IO", "export_onnx", "main"]

IO = Literal["uint8", "float"]
DEFAULT_OPSET = 18  # the torch.export-based exporter's own opset; TensorRT 10 and onnxruntime >= 1.14 read it


class Uint8IO(nn.Module):
    """(1, H, W, 3) uint8 RGB -> (1, H*s, W*s, 3) uint8 RGB around a [0, 1] float decoder, as the daemon converts."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        # The uint8 tensors touch nothing but the two Casts: TensorRT accepts uint8 only as I/O next to a Cast.
        x = lr.to(torch.float32).permute(0, 3, 1, 2) / 255.0  # (1, H, W, 3) -> (1, 3, H, W)
        y = self.network(x)  # (1, 3, H, W) -> (1, 3, sH, sW)
        hr = y.clamp(0.0, 1.0).mul(255.0).round().permute(0, 2, 3, 1)  # (1, 3, sH, sW) -> (1, sH, sW, 3)
        return hr.to(torch.uint8)


def example_input(io: IO, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A random input of the exported graph's layout."""
    gen = torch.Generator().manual_seed(seed)
    if io == "uint8":
        return torch.randint(0, 256, (1, height, width, 3), dtype=torch.uint8, generator=gen)
    return torch.rand((1, 3, height, width), generator=gen)


def wrap(network: nn.Module, io: IO) -> nn.Module:
    """The module that is exported: the decoder itself (float I/O) or wrapped in the uint8 conversion."""
    network = network.eval().requires_grad_(False)
    return Uint8IO(network).eval() if io == "uint8" else network


def export_onnx(network: nn.Module, path: pathlib.Path, *, io: IO = "uint8", height: int = 360, width: int = 640,
                dynamic: bool = False, opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None) -> None:
    """Write ``network`` (an LR -> HR decoder, [0, 1] floats) to ``path`` as one ONNX file (weights inside)."""
    import onnx

    module = wrap(network, io)
    min_size = int(getattr(network, "min_input_size", 1))
    if min(height, width) < min_size:
        raise ValueError(f"{width}x{height} is below the model's minimum input size {min_size}x{min_size}")
    axes = (1, 2) if io == "uint8" else (2, 3)
    shapes: tuple[dict[int, torch.export.Dim], ...] | None = None
    if dynamic:
        # H and W are symbolic; the minimum keeps ESA's strided conv + 7x7/3 max-pool well-defined.
        dims = (torch.export.Dim("height", min=max(min_size, 2)), torch.export.Dim("width", min=max(min_size, 2)))
        shapes = (dict(zip(axes, dims, strict=True)),)  # one entry per positional input
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own exporter trips a deprecation inside torch (pytree LeafSpec); nothing a caller can act on.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(module, (example_input(io, height, width),), dynamo=True, opset_version=opset,
                                    input_names=["lr"], output_names=["hr"], dynamic_shapes=shapes, verbose=False)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    # written beside `path`, moved over it only when complete and checked: a failed export leaves an older file alone
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    props = {"takdsr.io": io, "takdsr.scale": str(int(network.scale)), "takdsr.min_size": str(min_size),
             **(metadata or {})}
    try:
        program.save(str(partial), external_data=False)
        _finish(onnx.load(str(partial)), partial, opset, props)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _finish(model: Any, path: pathlib.Path, opset: int, props: dict[str, str]) -> None:
    """Check the exported ``model`` and write it back to ``path`` with its IR version and metadata properties."""
    import onnx

    written = {entry.domain: entry.version for entry in model.opset_import}.get("", opset)
    if written != opset:  # the exporter logs its failed conversion and keeps its own opset
        raise RuntimeError(f"the exporter could not convert the graph to opset {opset} (it stayed at {written}); "
                           f"leave --opset at its default {DEFAULT_OPSET}")
    # the exporter stamps its onnx package's newest IR version (10 with onnx 1.16+), which onnxruntime < 1.16 refuses;
    # the lowest IR version that has these opsets is what every reader of them accepts
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: allocation, oneDNN primitive creation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def benchmark(network: nn.Module, path: pathlib.Path, io: IO, height: int, width: int, repeats: int,
              threads: int) -> dict[str, float]:
    """Median milliseconds per frame: onnxruntime (CPU) on ``path`` and PyTorch eager (fp32, channels_last, like the
    daemon on CPU) on the same module and input, with the same thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = example_input(io, height, width)
    feed = {"lr": x.numpy()}
    if threads:
        torch.set_num_threads(threads)
    module = wrap(network, io).to(memory_format=torch.channels_last)
    eager_x = x.contiguous(memory_format=torch.channels_last) if io == "float" else x
    with torch.inference_mode():
        eager = _median_ms(lambda: module(eager_x), repeats)
    return {"onnxruntime_cpu_ms": _median_ms(lambda: session.run(None, feed), repeats), "torch_eager_ms": eager}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m upscaler_server.export", description="Export a deployable decoder "
                                "(default: the bundled student) for engines; see docs/integration.md.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=pathlib.Path,
                     help="student checkpoint: a file or a bundled name (default: the bundled student)")
    src.add_argument("--model", help="a registered decoder (e.g. rlfn_s) with RANDOM weights, for benchmarks")
    p.add_argument("--scale", type=int, default=2, help="scale of --model (a checkpoint knows its own)")
    p.add_argument("--seed", type=int, default=0, help="seed of --model's random weights")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("-o", "--output", type=pathlib.Path, required=True, help="output file, e.g. student.onnx")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--dynamic-shapes", action="store_true", help="symbolic height and width (batch stays 1)")
    p.add_argument("--io", choices=["uint8", "float"], default="uint8",
                   help="uint8: NHWC RGB uint8 in and out; float: NCHW RGB float32 [0, 1] in and out")
    p.add_argument("--height", type=int, default=360, help="LR height (static shape, or the example for tracing)")
    p.add_argument("--width", type=int, default=640, help="LR width")
    p.add_argument("--benchmark", type=int, default=0, metavar="N",
                   help="then time N frames with onnxruntime (CPU) and PyTorch eager at --height x --width")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for --benchmark (0: library default)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 1 export failed, 2 bad arguments, 3 model not loadable (missing, teacher, corrupt)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    torch.manual_seed(args.seed)
    try:
        network, name, weights = load_network(args.checkpoint, args.model, args.scale)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    # the checkpoint's file name, not its path: the ONNX file travels to other machines
    meta = {"takdsr.model": name, "takdsr.weights": pathlib.Path(weights).name if weights else "random"}
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create the folder of {args.output}: {exc}", file=sys.stderr)
        return 2
    try:
        export_onnx(network, args.output, io=args.io, height=args.height, width=args.width,
                    dynamic=args.dynamic_shapes, opset=args.opset, metadata=meta)
    except (ValueError, RuntimeError, ImportError, OSError) as exc:
        print(f"error: export failed: {exc}", file=sys.stderr)
        return 1
    shape = "dynamic HxW" if args.dynamic_shapes else f"{args.width}x{args.height}"
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes): {name}, x{network.scale}, io={args.io}, {shape}, "
          f"opset {args.opset}")
    if args.benchmark > 0:
        times = benchmark(network, args.output, args.io, args.height, args.width, args.benchmark, args.threads)
        print(f"{args.width}x{args.height}, {args.benchmark} frames, threads={args.threads or 'default'}: "
              f"onnxruntime CPU {times['onnxruntime_cpu_ms']:.1f} ms, PyTorch eager {times['torch_eager_ms']:.1f} ms "
              "(median per frame)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

The output is written through a temporary file beside it, so a failed or interrupted export leaves no partial file.
An existing output is replaced only with ``--overwrite``, and never when it is the checkpoint being exported.

Exit status: 0 written, 1 export failed, 2 bad arguments (checked before exporting: opset, seed, threads, sizes,
output), 3 model not loadable (missing, teacher, corrupt), 130 interrupted (Ctrl-C; pressed while torch's exporter
runs, it takes effect when the exporter returns, or at once when pressed twice).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import pathlib
import signal
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any, Literal

import torch
from torch import nn

from upscaler_server.config import DEFAULT_EDGE_PAD, MAX_THREADS, edge_pad_problem
from upscaler_server.console import add_version_option, escape_unprintable_names, ignore_the_working_folder
from upscaler_server.engine import load_network
from upscaler_server.errors import ConfigError, ModelLoadError
from upscaler_server.files import (
    FolderError,
    check_writable,
    folder_made_for,
    is_stream,
    partial_beside,
    publish,
    written_file,
)
from upscaler_server.loading import edge_padded

__all__ = ["Uint8IO", "export_onnx", "main"]

IO = Literal["uint8", "float"]
DEFAULT_OPSET = 18  # the torch.export-based exporter's own opset; TensorRT 10 and onnxruntime >= 1.14 read it
# the lowest opset the exporter's graph converts down to: below it onnx has no adapter for its ops (Shape-15)
MIN_OPSET = 17
MAX_SEED = 2**64 - 1  # torch.manual_seed's range


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


def _min_size(network: nn.Module, dynamic: bool = False) -> int:
    """The smallest LR height and width ``network`` reads (1 for a network that states none); with ``dynamic``
    shapes at least 2, the smallest symbolic size torch.export takes (1 is specialised as a constant)."""
    return max(int(getattr(network, "min_input_size", 1)), 2 if dynamic else 1)


def wrap(network: nn.Module, io: IO) -> nn.Module:
    """The module that is exported: the decoder itself (float I/O) or wrapped in the uint8 conversion."""
    network = network.eval().requires_grad_(False)
    return Uint8IO(network).eval() if io == "uint8" else network


def export_onnx(network: nn.Module, path: pathlib.Path, *, io: IO = "uint8", height: int = 360, width: int = 640,
                dynamic: bool = False, opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None,
                overwrite: bool = True) -> None:
    """Write ``network`` (an LR -> HR decoder, [0, 1] floats) to ``path`` as one ONNX file (weights inside); an
    existing file there is replaced only with ``overwrite`` (FileExistsError otherwise)."""
    import onnx

    module = wrap(network, io)
    min_size = _min_size(network, dynamic)  # what the file accepts, also written in its metadata
    if min(height, width) < min_size:
        raise ValueError(f"{width}x{height} is below the model's minimum input size {min_size}x{min_size}")
    axes = (1, 2) if io == "uint8" else (2, 3)
    shapes: tuple[dict[int, torch.export.Dim], ...] | None = None
    if dynamic:
        # H and W are symbolic; the minimum keeps ESA's strided conv + 7x7/3 max-pool well-defined.
        dims = (torch.export.Dim("height", min=min_size), torch.export.Dim("width", min=min_size))
        shapes = (dict(zip(axes, dims, strict=True)),)  # one entry per positional input
    with torch.no_grad(), warnings.catch_warnings(), _ctrl_c_held():
        # torch's own exporter trips a deprecation inside torch (pytree LeafSpec); nothing a caller can act on.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(module, (example_input(io, height, width),), dynamo=True, opset_version=opset,
                                    input_names=["lr"], output_names=["hr"], dynamic_shapes=shapes, verbose=False)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    props = {"takdsr.io": io, "takdsr.scale": str(int(network.scale)), "takdsr.min_size": str(min_size),
             **(metadata or {})}
    # written beside `path`, moved onto it only when complete and checked: a failed export leaves an older file alone
    with partial_beside(path) as partial:
        program.save(str(partial), external_data=False)
        _finish(onnx.load(str(partial)), partial, opset, props)
        publish(partial, path, overwrite=overwrite)


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Ctrl-C raised when the block ends, not inside it (a second one at once): torch.onnx.export imports modules as
    it goes, and one interrupted halfway fails the rest of the export as a long, misleading report (exit 1)."""
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if held:
            raise KeyboardInterrupt
        held.append(signum)

    # only Python's default handler raises inside the exporter; a program's own (the daemon's sets a flag) is left
    # alone, and only the main thread may change handlers
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    except Exception as exc:
        if held:  # the exporter failed after a Ctrl-C (perhaps because of it): the interrupt is what the user did
            raise KeyboardInterrupt from exc
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


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
    # the bytes, not the name: onnxruntime takes a name as UTF-8 text only, and one that is not (a Latin-1 folder,
    # held as surrogates) failed with a TypeError after the file had been written
    session = ort.InferenceSession(path.read_bytes(), options, providers=["CPUExecutionProvider"])
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
    add_version_option(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=pathlib.Path,
                     help="student checkpoint: a file or a bundled name (default: the bundled student)")
    src.add_argument("--model", help="a registered decoder (e.g. rlfn_s) with RANDOM weights, for benchmarks")
    p.add_argument("--scale", type=int, help="scale of --model (default 2); with a checkpoint, it must be the "
                   "checkpoint's own")
    p.add_argument("--seed", type=int, default=0, help="seed of --model's random weights")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("-o", "--output", type=pathlib.Path, required=True, help="output file, e.g. student.onnx")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists (never the checkpoint)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} to the installed onnx's newest (default {DEFAULT_OPSET})")
    p.add_argument("--dynamic-shapes", action="store_true", help="symbolic height and width (batch stays 1)")
    p.add_argument("--io", choices=["uint8", "float"], default="uint8",
                   help="uint8: NHWC RGB uint8 in and out; float: NCHW RGB float32 [0, 1] in and out")
    p.add_argument("--edge-pad", type=int, default=DEFAULT_EDGE_PAD, metavar="N",
                   help="repeat the frame's edge pixels N times on every side inside the graph and crop its output, "
                   "as the daemon does (the network's zero padding otherwise darkens and tints the outermost "
                   f"pixels); 0: the bare network (default {DEFAULT_EDGE_PAD})")
    p.add_argument("--height", type=int, default=360, help="LR height (static shape, or the example for tracing)")
    p.add_argument("--width", type=int, default=640, help="LR width")
    p.add_argument("--benchmark", type=int, default=0, metavar="N",
                   help="then time N frames with onnxruntime (CPU) and PyTorch eager at --height x --width")
    p.add_argument("--threads", type=int, default=0,
                   help=f"CPU threads for --benchmark, 0 (library default) to {MAX_THREADS}")
    p.epilog = ("exit status: 0 written, 1 export failed, 2 bad arguments, 3 model not loadable, "
                "130 interrupted (no partial file is left)")
    return p


def _option_problem(args: argparse.Namespace, max_opset: int) -> str | None:
    """What is wrong with the options that need no model, in words, or None."""
    if not MIN_OPSET <= args.opset <= max_opset:
        return f"--opset {args.opset}: use {MIN_OPSET} to {max_opset} (the newest this onnx package knows)"
    if not 0 <= args.seed <= MAX_SEED:
        return f"--seed {args.seed}: use 0 to 2**64 - 1"
    if not 0 <= args.threads <= MAX_THREADS:
        return f"--threads {args.threads}: use 0 (library default) to {MAX_THREADS}"
    if (problem := edge_pad_problem(args.edge_pad)) is not None:
        return problem
    if args.benchmark < 0:
        return f"--benchmark {args.benchmark}: use a number of frames, or 0 for none"
    # options that would be ignored were taken in silence (exit 0), as other commands refuse them
    if args.seed and args.model is None:
        return f"--seed {args.seed} would be ignored: it seeds --model's random weights, and a checkpoint has its own"
    if args.threads and not args.benchmark:
        return f"--threads {args.threads} would be ignored: it sets the threads of --benchmark, which is not asked for"
    if args.benchmark and importlib.util.find_spec("onnxruntime") is None:  # else a traceback after the export
        return "--benchmark needs the onnxruntime package (pip install onnxruntime; the 'export' extra has it)"
    return None


def _model_problem(args: argparse.Namespace, network: nn.Module, weights: str | None) -> str | None:
    """What is wrong with the size and the output for this model and checkpoint, in words, or None."""
    # with dynamic shapes export_onnx declares no size below 2: torch.export refused it after a long report
    min_size = _min_size(network, args.dynamic_shapes)
    if min(args.height, args.width) < min_size:
        return (f"--width x --height {args.width}x{args.height} is below the model's minimum input size "
                f"{min_size}x{min_size}; use at least {min_size} for each")
    output = args.output
    if output.is_dir():
        return f"-o {output} is a folder; name the ONNX file to write"
    # samefile also catches a link to the checkpoint; an absent output cannot be it
    if weights is not None and output.exists() and os.path.samefile(output, weights):
        return f"-o {output} is the checkpoint being exported; write the ONNX file elsewhere"
    # a dangling link too (publishing would fail on its name); /dev/null and the like are written into, not replaced
    if os.path.lexists(output) and not args.overwrite and not is_stream(output):
        return f"-o {output} exists; pass --overwrite to replace it, or choose another file"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 1 export failed, 2 bad arguments, 3 model not loadable (missing, teacher, corrupt),
    130 interrupted (see the module docstring)."""
    escape_unprintable_names()  # before anything prints, argparse's errors included: a name may not be UTF-8
    ignore_the_working_folder()  # before `models` loads: run from any folder
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    # its version converter logs a traceback for an opset it cannot reach and notices of its fallback; _finish says
    # in one line that the conversion failed
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    try:
        return _export(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _export(args: argparse.Namespace) -> int:
    try:
        import onnx
    except ImportError as exc:
        print(f"error: export needs the onnx and onnxscript packages (the 'export' extra): {exc}", file=sys.stderr)
        return 1
    if (problem := _option_problem(args, onnx.defs.onnx_opset_version())) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    try:
        network, name, weights = load_network(args.checkpoint, args.model, args.scale)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except ConfigError as exc:  # --scale other than the checkpoint's
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if (problem := _model_problem(args, network, weights)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    network = edge_padded(network, args.edge_pad)
    # the checkpoint's file name, not its path: the ONNX file travels to other machines
    meta = {"takdsr.model": name, "takdsr.weights": pathlib.Path(weights).name if weights else "random",
            "takdsr.edge_pad": str(args.edge_pad)}
    try:
        with folder_made_for(args.output), _readable_output(args.output) as readable:
            if readable == args.output:  # before the export's seconds, and naming the folder
                check_writable(written_file(args.output).parent)
            export_onnx(network, readable, io=args.io, height=args.height, width=args.width,
                        dynamic=args.dynamic_shapes, opset=args.opset, metadata=meta, overwrite=args.overwrite)
            if readable != args.output:
                publish(readable, args.output, overwrite=True)  # written into the stream
            _report(args, network, name, readable)
    except FileExistsError:  # made since the check at start-up, by someone else
        print(f"error: {args.output} appeared during the export: left as it is (--overwrite replaces it)",
              file=sys.stderr)
        return 2
    except FolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, ImportError, OSError) as exc:
        print(f"error: export failed: {exc}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _readable_output(output: pathlib.Path) -> Iterator[pathlib.Path]:
    """Where the ONNX file is exported to and read back from (its size, --benchmark): ``output`` itself, or for a
    stream such as /dev/null or a FIFO (is_stream), a temporary file, which the caller writes into it."""
    if not is_stream(output):
        yield output
        return
    with tempfile.TemporaryDirectory(prefix="takdsr-export-") as folder:
        yield pathlib.Path(folder) / "model.onnx"


def _report(args: argparse.Namespace, network: nn.Module, name: str, readable: pathlib.Path) -> None:
    """What was written and, with --benchmark, how fast it runs (read from ``readable``: _readable_output)."""
    shape = "dynamic HxW" if args.dynamic_shapes else f"{args.width}x{args.height}"
    print(f"wrote {args.output} ({readable.stat().st_size} bytes): {name}, x{network.scale}, io={args.io}, {shape}, "
          f"opset {args.opset}")
    if args.benchmark > 0:
        times = benchmark(network, readable, args.io, args.height, args.width, args.benchmark, args.threads)
        print(f"{args.width}x{args.height}, {args.benchmark} frames, threads={args.threads or 'default'}: "
              f"onnxruntime CPU {times['onnxruntime_cpu_ms']:.1f} ms, PyTorch eager {times['torch_eager_ms']:.1f} ms "
              "(median per frame)")


if __name__ == "__main__":
    sys.exit(main())

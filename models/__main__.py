"""``python -m models info PATH_OR_NAME [--input WxH]``: architecture, parameters, MACs and FLOPs; for a checkpoint
also its weights' sha256 (what results.json and `evaluate --json` record) and its metadata."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch import nn

from upscaler_server.console import add_version_option, drop_stdout, escape_unprintable_names  # stdlib only

from .checkpoint import CheckpointError, bundled_names, load_checkpoint, resolve_checkpoint, weights_sha256
from .flops import count_flops, count_parameters
from .registry import arch_name, build_model, list_models

MAX_SIDE = 1 << 20  # 1,048,576 px: the counts stay far inside PyTorch's 64-bit sizes for any width and scale


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from exc
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    if max(width, height) > MAX_SIDE:  # PyTorch's tensor sizes overflow (a traceback) far beyond any image
        raise argparse.ArgumentTypeError(f"at most {MAX_SIDE} px a side, got {text!r}")
    return width, height


def _load(target: str) -> tuple[nn.Module, Path | None, dict | None]:
    """The model named by ``target``, with its checkpoint file and metadata (None, None for a registered model)."""
    if not target:  # Path("") is ".": the message named the current folder
        raise ValueError(f"no checkpoint or model named; {_what_may_be_named()}")
    if target in list_models():
        return build_model(target), None, None
    path = resolve_checkpoint(target)
    if not path.exists() and not target.endswith(".safetensors"):
        raise CheckpointError(target, f"neither a file, a bundled checkpoint nor a model name; {_what_may_be_named()}")
    checkpoint = load_checkpoint(path)
    return checkpoint.model, path, checkpoint.metadata


def _what_may_be_named() -> str:
    return (f"bundled checkpoints: {', '.join(bundled_names())}; models (random weights): "
            f"{', '.join(list_models())}")


def info(target: str, width: int, height: int) -> str:
    model, path, metadata = _load(target)
    _check_input(model, width, height)
    flops = count_flops(model, height, width)
    if arch_name(model).endswith("_teacher"):
        cf_size = f"{width // model.scale}x{height // model.scale}"
        reads = f"the teacher reads the {width}x{height} HR image through a {cf_size} CF"
    else:
        reads = f"input {width}x{height} -> output {width * model.scale}x{height * model.scale}"
    lines = [
        f"model        {target}",
        f"architecture {arch_name(model)} {json.dumps(model.arch_args(), sort_keys=True)}",
        f"scale        x{model.scale} ({reads})",
        f"parameters   {count_parameters(model):,}",
        f"MACs         {flops / 2 / 1e9:.3f} G at {width}x{height} input",
        f"FLOPs        {flops / 1e9:.3f} G at {width}x{height} input",
    ]
    if path is not None:  # what results.json and `evaluate --json` record as the weights they scored
        lines.append(f"weights      sha256 {weights_sha256(path)} (the tensors, not the metadata)")
    if metadata is not None:
        lines.append("metadata     " + json.dumps(metadata, indent=2, sort_keys=True).replace("\n", "\n             "))
    return "\n".join(lines)


def _check_input(model: nn.Module, width: int, height: int) -> None:
    """ValueError for a size the model cannot read: below its smallest input, or (a teacher) not a multiple of its
    scale."""
    minimum = int(getattr(model, "min_input_size", 1))
    if min(width, height) < minimum:
        raise ValueError(f"{width}x{height} is smaller than the smallest input {minimum}x{minimum} of this model")
    if arch_name(model).endswith("_teacher") and (width % model.scale or height % model.scale):
        raise ValueError(f"a teacher reads the HR image: {width}x{height} must be a multiple of its scale "
                         f"{model.scale}")


def main(argv: list[str] | None = None) -> int:
    escape_unprintable_names()  # before anything prints, argparse's errors included: a name may not be UTF-8
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    add_version_option(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser(
        "info", help="describe a registered model, a checkpoint file or a bundled checkpoint by name"
    )
    info_parser.add_argument("target", metavar="PATH_OR_NAME", help="a .safetensors checkpoint, a bundled one by "
                             f"name ({', '.join(bundled_names())}), or a registered model (random weights)")
    info_parser.add_argument(
        "--input", type=_parse_size, default=(1920, 1080), help="size WxH of the image the model reads (1920x1080)"
    )
    args = parser.parse_args(argv)
    try:
        text = info(args.target, *args.input)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `| head` closed the pipe: what it read is the answer, not an error to trace
        drop_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a command the pipe ended
    except OSError as exc:  # e.g. a full disk (> /dev/full): said, not a traceback
        drop_stdout()
        print(f"error: cannot write the answer: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

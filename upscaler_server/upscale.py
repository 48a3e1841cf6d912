"""``python -m upscaler_server.upscale``: upscale image files or folders in-process (no daemon), PNG out.

Folders are read one level deep, hidden files (``.name``) left out, as in training. An image over ``--max-pixels``
(by default the daemon's limit, 3840x2160) is refused by name before the model runs, and one whose header declares
over 8K x 8K before it is decoded. The same :class:`~upscaler_server.engine.Engine` as the daemon does the work, so
results are bit-identical to the daemon's for the same checkpoint, device, precision, backend and padding
(``--edge-pad``, ``--pad-channels``). Colour images keep their alpha channel (upscaled by nearest neighbour); grey
images are upscaled as RGB and written as RGB; 16-bit images are rounded to 8 bits and a JPEG is turned upright by
its EXIF orientation first. Pixels are taken as sRGB, as the model was trained: an ICC colour profile in the input
is not carried over to the PNG. An output file that exists already is never replaced without ``--overwrite`` (an
input never); ``--skip-existing`` leaves those images out instead, so that a batch that was stopped goes on with the
rest. Each output is written whole or not at all (a temporary file renamed), so an output that exists is complete.
The output folder must not be one of the input folders (the next run would read the outputs as inputs), and one that
cannot be written into is refused before any image runs. Exit status: 0 if every image was written, 1 if some
failed (each failure is reported), 2 for bad arguments, 3 when the model cannot be loaded, 130 when interrupted
(Ctrl-C; the images written so far stay).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from upscaler_server.decode_limit import decode_limit  # first: it sets OpenCV's decode limit before cv2 loads

# isort: split
import cv2
import numpy as np

from upscaler_server.config import (
    CHECKPOINT_HELP,
    SCALE_HELP,
    Config,
    add_backend_arguments,
    cli_prog,
    engine_setting_problems,
)
from upscaler_server.console import add_version_option, escape_unprintable_names, ignore_the_working_folder
from upscaler_server.errors import ConfigError, ModelLoadError, UpscalerError
from upscaler_server.files import check_writable, make_folder, partial_beside, publish, remove_empty
from upscaler_server.image_bytes import damage, opencv_log_silenced
from upscaler_server.protocol import SCALE_MAX

if TYPE_CHECKING:
    from upscaler_server.engine import Engine

__all__ = ["IMAGE_SUFFIXES", "check_output_folder", "check_targets", "collect_inputs", "main", "output_path",
           "read_8bit", "upscale_file"]

log = logging.getLogger("upscaler_server.upscale")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = Config.max_pixels  # the daemon's default: 3840x2160


def collect_inputs(inputs: Iterable[pathlib.Path]) -> list[pathlib.Path]:
    """Image files named directly, plus those directly inside named folders (sorted; hidden ones, such as macOS's
    ``._name.png`` resource forks, left out), each file once however often it is named. ConfigError on clashes."""
    files: list[pathlib.Path] = []
    for path in inputs:
        if path.is_dir():
            visible = sorted(p for p in path.iterdir() if not p.name.startswith("."))
            files.extend(p for p in visible if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            others = [p.name for p in visible if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES]
            if others:  # a .gif or .exr among the frames was left out without a word
                log.info("%s: %d file(s) left out, not named as an image this tool reads (%s): %s", path, len(others),
                         " ".join(IMAGE_SUFFIXES), _few(others))
            inner = [p.name for p in visible if p.is_dir()]
            if inner:  # training scans folders whole: say that this does not
                log.info("%s: its subfolders are not searched (%s); name them as inputs of their own", path,
                         _few(inner))
        elif path.is_file():
            files.append(path)
        elif not os.path.lexists(path):  # a shell pattern that matched nothing comes here as itself
            raise ConfigError(f"{path} does not exist")
        else:
            raise ConfigError(f"{path} is neither a file nor a folder")
    first_names: dict[tuple[pathlib.Path, str], pathlib.Path] = {}  # (real path, output stem) -> its first naming
    for f in files:  # a link of another name is an output of its own (latest.png -> a.png); the same name, a repeat
        first_names.setdefault((f.resolve(), f.stem), f)
    unique = list(first_names.values())
    stems: dict[str, pathlib.Path] = {}
    for f in unique:
        if f.stem in stems:
            raise ConfigError(f"{f} and {stems[f.stem]} would both be written as {f.stem}.png; rename one, or "
                              "upscale them into different output folders")
        stems[f.stem] = f
    return unique


def _few(names: list[str]) -> str:
    """The first three of ``names``, comma-separated, then "..." if there are more."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def check_output_folder(inputs: Iterable[pathlib.Path], out_dir: pathlib.Path) -> None:
    """ConfigError when ``out_dir`` is not a folder, or is one of the input folders: the PNGs written there would
    be read as inputs by the next run (and clash with the images they came from)."""
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise ConfigError(f"-o {out_dir} exists and is not a folder; -o names the output folder")
    if not os.path.lexists(out_dir) and out_dir.suffix.lower() in IMAGE_SUFFIXES:  # it became a folder of that name
        raise ConfigError(f"-o {out_dir} looks like a file name, but -o names the output folder (each image is "
                          f"written there as <its name>.png): pass a folder, e.g. -o {out_dir.parent / 'upscaled'}")
    if any(path.is_dir() and path.resolve() == out_dir.resolve() for path in inputs):
        raise ConfigError(f"-o {out_dir} is also an input folder: the images written there would be read as inputs "
                          "the next time; choose another output folder")


def output_path(src: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """Where the upscaled ``src`` is written: ``out_dir``/<stem>.png."""
    return out_dir / f"{src.stem}.png"


def check_targets(files: list[pathlib.Path], out_dir: pathlib.Path, overwrite: bool = False) -> None:
    """ConfigError when an output would be one of the inputs (an input PNG inside the output folder: never
    overwritten), or, without ``overwrite``, when outputs exist already (another image of the same stem, or an
    earlier run's), before anything is written."""
    sources = {f.resolve() for f in files}
    for f in files:
        if output_path(f, out_dir).resolve() in sources:
            raise ConfigError(f"{output_path(f, out_dir)} is an input: writing it would overwrite the original; "
                              "choose another output folder")
    existing = [output_path(f, out_dir) for f in files if os.path.lexists(output_path(f, out_dir))]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise ConfigError(f"{existing[0]}{more} exist(s) already: pass --overwrite to replace them, --skip-existing "
                          "to leave them and upscale the rest, or choose another output folder")


def not_done(files: list[pathlib.Path], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """The ``files`` whose output does not exist yet (--skip-existing). Outputs are written whole or not at all, so
    one that exists is a finished image of an earlier run, not half of one."""
    return [f for f in files if not os.path.lexists(output_path(f, out_dir))]


def read_8bit(src: pathlib.Path) -> np.ndarray:
    """The image as OpenCV decodes it, 8 bits per channel: 16-bit rounded to the nearest 8-bit level, a JPEG turned
    upright by its EXIF orientation. UpscalerError for anything else."""
    try:
        # the bytes, not the name: OpenCV's imread and imwrite crash the process on a name that is not valid UTF-8
        data = np.fromfile(src, np.uint8)
    except OSError as exc:
        raise UpscalerError(f"{src}: cannot read it ({exc.strerror or exc})") from None
    problem = damage(data)  # libpng's own "libpng error: ..." line on stderr, or libjpeg's grey rows, otherwise
    if problem:
        raise UpscalerError(f"{src}: {problem}; not read")
    # a JPEG has no alpha, and IMREAD_COLOR (unlike IMREAD_UNCHANGED) applies its EXIF orientation
    flags = cv2.IMREAD_COLOR if bytes(data[:2]) == b"\xff\xd8" else cv2.IMREAD_UNCHANGED
    try:
        with opencv_log_silenced():
            image = cv2.imdecode(data, flags) if data.size else None
    except cv2.error as exc:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):  # refused from its header (upscaler_server/decode_limit.py)
            raise UpscalerError(f"{src}: its header declares more than {decode_limit()} pixels, more than this tool "
                                "decodes; not read") from None
        raise UpscalerError(f"{src}: OpenCV refused it ({exc.err or exc})") from None
    if image is None:
        raise UpscalerError(f"{src}: not an image OpenCV can read")
    if image.dtype == np.uint16:  # x * 255 / 65535, rounded: 65535 -> 255, 32768 -> 128
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if image.dtype != np.uint8:
        raise UpscalerError(f"{src}: {image.dtype} pixels; only 8- and 16-bit images are supported")
    return image


def upscale_file(engine: Engine, src: pathlib.Path, out_dir: pathlib.Path, overwrite: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> pathlib.Path:
    """Upscale one image file into ``out_dir``/<stem>.png and return the written path; an existing file there is
    replaced only with ``overwrite``, an image of more than ``max_pixels`` is refused (UpscalerError for both)."""
    image = read_8bit(src)
    height, width = image.shape[:2]
    if width * height > max_pixels:  # activations grow with it: a 12000x12000 PNG of 420 KB went past 6 GB
        raise UpscalerError(f"{src}: {width}x{height} is more than --max-pixels {max_pixels} pixels; not upscaled")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    fmt = {3: "BGR8", 4: "BGRA8"}.get(image.shape[2])
    if fmt is None:
        raise UpscalerError(f"{src}: {image.shape[2]} channels; expected 1, 3 or 4")
    try:
        hr = engine.run(np.ascontiguousarray(image), fmt)
    except UpscalerError as exc:  # e.g. smaller than the model's minimum: say which file
        raise UpscalerError(f"{src}: {exc}", exc.code) from None
    target = output_path(src, out_dir)
    encoded, png = cv2.imencode(".png", hr)
    try:
        if not encoded:
            raise OSError("PNG encoding failed")
        with partial_beside(target) as partial:
            partial.write_bytes(png.tobytes())
            publish(partial, target, overwrite=overwrite)
    except FileExistsError:  # made since the start-up check, by someone else
        raise UpscalerError(f"{target} appeared during the run: left as it is (--overwrite replaces it)") from None
    except OSError as exc:
        raise UpscalerError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=cli_prog("upscaler_server.upscale", "takdsr-upscale"),
                                description="Upscale images in-process with the daemon's engine (PNG out).",
                                epilog="exit status: 0 every image written, 1 some failed (each is named), 2 bad "
                                "arguments or output folder, 3 model not loadable, 130 interrupted (the images "
                                "written so far stay)")
    add_version_option(p)
    p.add_argument("inputs", nargs="+", type=pathlib.Path, metavar="INPUT", help="image files or folders")
    p.add_argument("-o", "--output", type=_named_folder, required=True, metavar="OUTDIR", help="output folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=pathlib.Path, help=CHECKPOINT_HELP)
    src.add_argument("--model", help="registered model with RANDOM weights (tests and benchmarks only)")
    p.add_argument("--scale", type=int, help=SCALE_HELP)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all usable cores)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace output files that exist already")
    existing.add_argument("--skip-existing", action="store_true",
                          help="leave out the images whose output file exists already (to go on with a batch that "
                               "was stopped)")
    p.add_argument("--max-pixels", type=int, metavar="N",
                   help=f"refuse input images of more than N pixels (default {DEFAULT_MAX_PIXELS}, the daemon's "
                        f"3840x2160; at most OpenCV's decode limit, {decode_limit()})")
    add_backend_arguments(p, "eager")
    return p


def _named_folder(text: str) -> pathlib.Path:
    """Not an empty name, which pathlib reads as the current folder: an unset $OUTDIR wrote the images there."""
    if not text:
        raise argparse.ArgumentTypeError("an empty name; name the output folder (. for the current one)")
    return pathlib.Path(text)


def _check_arguments(args: argparse.Namespace) -> None:
    """The bounds the daemon's settings have (the engine would otherwise fail on them with a traceback)."""
    bad = engine_setting_problems(threads=args.threads, pad_channels=args.pad_channels, edge_pad=args.edge_pad)
    if args.scale is not None and not 1 <= args.scale <= SCALE_MAX:
        bad.append(f"1 <= --scale <= {SCALE_MAX}")
    if args.max_pixels is None:  # OPENCV_IO_MAX_IMAGE_PIXELS set lower than the default lowers the default
        args.max_pixels = min(DEFAULT_MAX_PIXELS, decode_limit())
    elif not 1 <= args.max_pixels <= decode_limit():  # a larger image would be refused from its header anyway
        bad.append(f"1 <= --max-pixels <= {decode_limit()} (OpenCV's decode limit, OPENCV_IO_MAX_IMAGE_PIXELS)")
    # a size no input may have (99999x99999 ended in numpy's MemoryError traceback while auto measured it)
    bad += [f"--tune-sizes {width}x{height} within --max-pixels {args.max_pixels}"
            for width, height in args.tune_sizes or () if width * height > args.max_pixels]
    if bad:
        raise ConfigError(f"invalid arguments: {', '.join(bad)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    escape_unprintable_names()  # before anything prints, argparse's errors included: a name may not be UTF-8
    ignore_the_working_folder()  # before `models` loads: run from any folder
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    made: list[pathlib.Path] = []  # output folders this run created: removed again if it wrote no image there
    try:
        return _run(args, made)
    finally:
        remove_empty(made)  # those holding images are not empty, and stay


def _run(args: argparse.Namespace, made: list[pathlib.Path]) -> int:
    """Check, load the model, upscale; the exit status. The folders it creates for the output go into ``made``."""
    try:
        _check_arguments(args)
        files = collect_inputs(args.inputs)
        if not files:
            raise ConfigError(f"no image in {', '.join(map(str, args.inputs))} (suffixes {', '.join(IMAGE_SUFFIXES)})")
        check_output_folder(args.inputs, args.output)
        check_targets(files, args.output, args.overwrite or args.skip_existing)
        if args.skip_existing:
            remaining = not_done(files, args.output)
            if len(remaining) < len(files):
                log.info("skipping %d of %d image(s) whose output exists already (--skip-existing)",
                         len(files) - len(remaining), len(files))
            if not remaining:
                return 0
            files = remaining
        # before the model loads (seconds): else each image failed on its own, after the model had run on it
        made += make_folder(args.output, f"the output folder {args.output}")
        check_writable(args.output)
        # imported here, within the try: torch takes a second or more to load, and a Ctrl-C meanwhile is a clean
        # "interrupted" (130) like one a moment later, not a traceback from inside torch's import
        from upscaler_server.engine import create_engine

        engine = create_engine(checkpoint=args.checkpoint, model=args.model, scale=args.scale, device=args.device,
                               precision=args.precision, threads=args.threads, backend=args.backend,
                               cache_dir=args.cache_dir, pad_channels=args.pad_channels, edge_pad=args.edge_pad,
                               auto_backends=tuple(args.auto_backends),
                               tune_sizes=tuple(args.tune_sizes))
    except ModelLoadError as exc:
        log.error("%s", exc)
        return 3
    except (UpscalerError, OSError) as exc:  # bad settings, or --tune-sizes the model cannot take
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted before any image was written")
        return 130
    written = failed = 0
    try:
        for src in files:
            try:
                target = upscale_file(engine, src, args.output, args.overwrite, args.max_pixels)
                written += 1  # before the log line: an interrupt inside it must not lose the count
                log.info("%s -> %s", src, target)
            except UpscalerError as exc:
                log.error("%s", exc)
                failed += 1
    except KeyboardInterrupt:
        log.error("interrupted: %d of %d image(s) written to %s; the same command with --skip-existing goes on with "
                  "the rest", written, len(files), args.output)
        return 130
    log.info("%d of %d image(s) written to %s", written, len(files), args.output)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `python -m training.data {povray,scenes} ...` (see docs/data.md)."""

import argparse
import math
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from training import MAX_IMAGE_PIXELS
from training.data.images import DatasetError
from training.data.output import claimed_output
from training.data.povray import SCENE_LIST, canonical_scene, load_scene_list, render_scenes
from training.data.scenes_cmd import frame_pairs, write_scene_frames
from upscaler_server.console import add_version_option, escape_unprintable_names  # standard library only


def _antialias(text: str) -> float | None:
    """`off` or an adaptive antialiasing threshold (POV-Ray's +A<threshold>). POV-Ray 3.7's command line takes
    0 <= threshold < 1 only: any other value failed every scene, and a failed scene loses its earlier render."""
    if text.lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:  # NaN too
        raise argparse.ArgumentTypeError(f"antialias threshold {text!r}: need 0 <= threshold < 1 (POV-Ray's +A), "
                                         "or 'off'")
    return value


def _positive(text: str) -> int:
    """A whole number >= 1 (sizes, jobs, counts): POV-Ray spins forever on +W-8 and fails every scene on +W0."""
    value = _whole(text, "a whole number >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _count(text: str) -> int:
    """A whole number >= 0 (POV-Ray's +WT: 0 means its default)."""
    value = _whole(text, "a whole number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _whole(text: str, wanted: str) -> int:
    """`text` as an int; argparse's own message named the function ("invalid _positive value: 'abc'")."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.data", description=__doc__)
    add_version_option(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    pov = sub.add_parser("povray", help="render the curated POV-Ray example scenes to PNG")
    pov.add_argument("--out", type=Path, required=True, help="output folder (PNGs + manifest.json)")
    pov.add_argument("--width", type=_positive, default=1920, help="render width in pixels (default 1920)")
    pov.add_argument("--height", type=_positive, default=1080, help="render height in pixels (default 1080)")
    pov.add_argument(
        "--jobs", type=_positive, default=os.cpu_count() or 1, help="parallel povray processes (default: one per core)"
    )
    pov.add_argument(
        "--work-threads",
        type=_count,
        default=1,
        help="render threads per povray process (default 1: the same pixels every run; 0: POV-Ray's "
        "default of one per core, whose pixels vary from run to run)",
    )
    pov.add_argument("--timeout", type=_seconds, default=1800.0, help="seconds per scene before it is abandoned")
    pov.add_argument("--antialias", type=_antialias, default=0.3, help="threshold for +A, or 'off' (default 0.3)")
    pov.add_argument("--scenes", type=Path, default=SCENE_LIST, help="scene list (default: the curated list)")
    pov.add_argument("--only", nargs="+", metavar="SCENE",
                     help="render only these scenes of the list (e.g. incdemo/transforms, with or without .pov)")

    scn = sub.add_parser("scenes", help="render HR/LR frame pairs of the procedural scenes")
    scn.add_argument("--out", type=Path, required=True, help="output folder (hr/, lr_x<s>/, manifest.json)")
    scn.add_argument("--count", type=_positive, required=True, help="number of frames (presets in turn)")
    scn.add_argument("--width", type=_positive, default=1920, help="HR width in pixels (default 1920)")
    scn.add_argument("--height", type=_positive, default=1080, help="HR height in pixels (default 1080)")
    scn.add_argument("--scale", type=int, default=2, choices=(2, 3, 4), help="HR / LR size (default 2)")
    scn.add_argument("--lr-kind", choices=("native", "bicubic"), default="native",
                     help="LR rendered at its own size, one sample per pixel (native, the default), or the HR "
                     "frame downscaled (bicubic)")
    scn.add_argument("--supersample", type=_positive, default=2,
                     help="HR rendered with k x k samples per pixel (default 2)")
    scn.add_argument("--split", choices=("train", "val"), default="train",
                     help="train (the default) or val: other times of the scenes, for validation (in its own --out "
                     "folder)")
    scn.add_argument("--presets", nargs="+", help="presets to render (default: all)")
    scn.add_argument("--replace", action="store_true",
                     help="remove the frame pairs the folder holds that this command does not ask for (other "
                          "size, scale, LR kind or supersampling, instead of refusing; a larger --count before)")
    return parser


def _povray(args: argparse.Namespace) -> int:
    scenes = load_scene_list(args.scenes)
    if args.only:
        # the list's spelling is a path with its suffix; the docs and the manifest's readers name scenes without it
        only = {canonical_scene(s if s.endswith(".pov") else f"{s}.pov") for s in args.only}
        missing = sorted(only - set(scenes))
        if missing:
            raise DatasetError(f"not in {args.scenes}: {', '.join(missing)}")
        scenes = [s for s in scenes if s in only]
    stop, signals = threading.Event(), []

    def on_signal(signum: int, frame: FrameType | None) -> None:  # a flag only: the render loop does the stopping
        signals.append(signum)
        stop.set()

    # SIGHUP too: povray runs in its own session, so a closed terminal reaches only this process
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with claimed_output(args.out):
            manifest = render_scenes(
                scenes, args.out, args.width, args.height, jobs=args.jobs, timeout=args.timeout,
                antialias=args.antialias, work_threads=args.work_threads, stop=stop,
            )  # fmt: skip
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signals:
        print(f"stopped by signal {signals[0]}: {_what_was_kept(args.out, 'scene')}", file=sys.stderr)
        return 128 + signals[0]
    failed = {s: why for s, why in manifest["failed"].items() if s in scenes}
    for scene, why in failed.items():
        print(f"failed: {scene}: {why}", file=sys.stderr)
    print(f"{len(scenes) - len(failed)}/{len(scenes)} scenes in {args.out} (manifest: {args.out / 'manifest.json'})")
    return 1 if failed else 0


def _what_was_kept(out: Path, thing: str) -> str:
    """The end of a stop's line: where the finished ``thing``s are, or that there is none (the folders made for them
    were removed: the line named a manifest that did not exist)."""
    manifest = out / "manifest.json"
    if manifest.is_file():
        return f"the {thing}s finished so far are in {manifest}; the same command renders the rest"
    return f"no {thing} was finished, so nothing was kept; the same command starts again"


def _scenes(args: argparse.Namespace) -> int:
    # rendering runs in this process: a stop is raised where it lands (the PNGs and the manifest are written whole),
    # and SIGTERM and SIGHUP stop it as Ctrl-C does (they killed it with nothing said)
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with claimed_output(args.out):
            manifest = write_scene_frames(
                args.out, args.count, width=args.width, height=args.height, scale=args.scale, lr_kind=args.lr_kind,
                supersample=args.supersample, split=args.split, presets=args.presets, replace=args.replace,
            )  # fmt: skip
    except KeyboardInterrupt:
        print(f"stopped: {_what_was_kept(args.out, 'frame')}", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"{frame_pairs(len(manifest['frames']))} in {args.out} (manifest: {args.out / 'manifest.json'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    escape_unprintable_names()  # before anything prints, argparse's errors included: a name may not be UTF-8
    args = _parser().parse_args(argv)
    if args.width * args.height > MAX_IMAGE_PIXELS:  # POV-Ray rendered such a frame for hours, for nothing
        print(f"error: {args.width}x{args.height} is more than {MAX_IMAGE_PIXELS} pixels, the largest image the "
              "trainer reads (it refuses larger files as decompression bombs)", file=sys.stderr)
        return 2
    try:
        return _povray(args) if args.command == "povray" else _scenes(args)
    except (DatasetError, ValueError, OSError) as exc:  # OSError: an output folder that cannot be made or written
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

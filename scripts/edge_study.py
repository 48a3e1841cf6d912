"""How the daemon's edge padding (--edge-pad: the frame's outermost pixels repeated before the network) changes the
frame's border, its inside, and the time per frame.

Each checkpoint runs as the daemon runs it (an fp32 eager engine, uint8 RGB in and out) on the images of a set
(default cg-dev, LR made as `python -m training evaluate` makes it), once per --pads value. Scores, against the HR
image, in dB: the whole frame, the frame without its outer `scale` pixels (the evaluation's shave: the paper's
protocol, which hides the border), and the outer 2- and 8-pixel rings alone; plus the largest error of a corner
pixel, in levels, and of a flat white and a flat mid-grey frame anywhere. Bicubic (OpenCV's, the reports' floor)
is scored the same way. Then the time per frame of each padding against none, interleaved in one run. Prints a
table and writes everything as JSON.

    python scripts/edge_study.py --checkpoint rlfn_s_takdsr_x2 --checkpoint rlfn_s_native_x2 \\
        --pads 0,2,4,8 --json edge_study.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import Config
from training.data import to_uint8
from training.data.images import write_json_atomic
from training.evaluate import BUILTIN_SETS, baseline_predictors, builtin_sets_config, check_output_file, eval_sets
from upscaler_server.config import MAX_EDGE_PAD, MAX_THREADS
from upscaler_server.engine import Engine, create_engine, load_network
from upscaler_server.errors import ModelLoadError

RINGS = (2, 8)  # outer pixels scored alone
TIMED_SIZES = ((320, 180), (640, 360), (1280, 720))  # LR width x height
SCALE = 2  # of the shipped students, and of the LR images the set is read with


def _psnr(sr: np.ndarray, hr: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of two (H, W, 3) uint8 images, over the pixels where `mask` (H, W) is True (all without one)."""
    diff = sr.astype(np.float64) - hr.astype(np.float64)
    squared = diff[mask] if mask is not None else diff
    return float(10 * np.log10(255.0**2 / max(float(np.mean(squared**2)), 1e-12)))


def _ring(height: int, width: int, pixels: int) -> np.ndarray:
    """(H, W) mask of the outer `pixels` rows and columns."""
    mask = np.ones((height, width), dtype=bool)
    mask[pixels:-pixels, pixels:-pixels] = False
    return mask


def image_scores(sr: np.ndarray, hr: np.ndarray, scale: int) -> dict[str, float]:
    """The border study's scores of one (H, W, 3) uint8 upscaled image against its HR image."""
    height, width = hr.shape[:2]
    inside = np.zeros((height, width), dtype=bool)
    inside[scale:-scale, scale:-scale] = True
    scores = {"psnr_whole": _psnr(sr, hr), "psnr_shaved": _psnr(sr, hr, inside)}
    scores |= {f"psnr_ring{pixels}": _psnr(sr, hr, _ring(height, width, pixels)) for pixels in RINGS}
    corners = np.array([sr[0, 0], sr[0, -1], sr[-1, 0], sr[-1, -1]], dtype=int) - np.array(
        [hr[0, 0], hr[0, -1], hr[-1, 0], hr[-1, -1]], dtype=int)
    scores["corner_max_error"] = float(np.abs(corners).max())
    return scores


def _mean_scores(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Means of the PSNRs; the largest corner error."""
    keys = per_image[0].keys()
    return {key: (max if key == "corner_max_error" else statistics.fmean)(s[key] for s in per_image) for key in keys}


def flat_frame_errors(engine: Engine) -> dict[str, int]:
    """Largest error in levels anywhere on a flat 640x360 white and mid-grey frame, and inside (8 pixels in)."""
    errors = {}
    for name, level in (("white", 255), ("grey", 128)):
        error = np.abs(engine.run(np.full((360, 640, 3), level, np.uint8)).astype(int) - level)
        errors[f"{name}_max_error"] = int(error.max())
        errors[f"{name}_inside_max_error"] = int(error[8:-8, 8:-8].max())
    return errors


def score_checkpoint(checkpoint: str, pads: list[int], images: list[Any], threads: int) -> dict[str, Any]:
    """{pad: mean scores and flat-frame errors} of one checkpoint."""
    results: dict[str, Any] = {}
    for pad in pads:
        engine = create_engine(checkpoint=Path(checkpoint), device="cpu", precision="fp32", threads=threads,
                               edge_pad=pad)
        per_image = [image_scores(engine.run(to_uint8(image.lr)), to_uint8(image.hr), SCALE) for image in images]
        results[str(pad)] = {**_mean_scores(per_image), **flat_frame_errors(engine)}
        engine.close()
        print(f"{checkpoint} edge pad {pad}: {_row(results[str(pad)])}", file=sys.stderr, flush=True)
    return results


def score_bicubic(images: list[Any], scale: int) -> dict[str, float]:
    bicubic = baseline_predictors(scale)["bicubic"]
    per_image = []
    for image in images:
        sr = to_uint8(bicubic(image.lr[None], image.hr[None])[0])
        per_image.append(image_scores(sr, to_uint8(image.hr), scale))
    return _mean_scores(per_image)


def time_pads(checkpoint: str, pads: list[int], threads: int, frames: int) -> list[dict[str, Any]]:
    """Median ms per frame of each padding at each size, the engines run in turn frame by frame (one run: a slower
    moment of a noisy machine hits every padding alike), with the ratio to the first of `pads`."""
    engines = {pad: create_engine(checkpoint=Path(checkpoint), device="cpu", precision="fp32", threads=threads,
                                  edge_pad=pad) for pad in pads}
    rows = []
    rng = np.random.default_rng(0)
    for width, height in TIMED_SIZES:
        frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        times: dict[int, list[float]] = {pad: [] for pad in pads}
        for engine in engines.values():
            engine.run(frame)  # warm-up: the size's kernels
        for _ in range(frames):
            for pad, engine in engines.items():
                start = time.perf_counter()
                engine.run(frame)
                times[pad].append((time.perf_counter() - start) * 1e3)
        base = statistics.median(times[pads[0]])
        for pad in pads:
            median = statistics.median(times[pad])
            rows.append({"lr": f"{width}x{height}", "edge_pad": pad, "ms": median, "ratio": median / base})
            print(f"{width}x{height} edge pad {pad}: {median:.1f} ms ({median / base:.3f}x)", file=sys.stderr)
    for engine in engines.values():
        engine.close()
    return rows


def _row(scores: dict[str, float]) -> str:
    return "  ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in scores.items())


def check_checkpoints(checkpoints: list[str]) -> None:
    """ModelLoadError or ValueError for a checkpoint that cannot be scored, before minutes of scoring the others."""
    for checkpoint in checkpoints:
        network, _, _ = load_network(Path(checkpoint), None, instead="--checkpoint FILE or a bundled name")
        if network.scale != SCALE:
            raise ValueError(f"{checkpoint} upscales x{network.scale}; this study scores x{SCALE} students")


def _count(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"use a whole number from {low} to {high}")
        return value

    return parse


def _pads(text: str) -> list[int]:
    parts = text.split(",")
    # a ValueError of int() was shown as "invalid _pads value", naming this function
    if not all(part.strip().isdigit() for part in parts) or any(not 0 <= int(p) <= MAX_EDGE_PAD for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated pixel counts, each 0 to {MAX_EDGE_PAD}")
    return [int(part) for part in parts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a student checkpoint (file or bundled name); repeat for several (default: the bundled "
                        "rlfn_s_takdsr_x2)")
    parser.add_argument("--pads", type=_pads, default=[0, 4], help="edge paddings to compare, the first being the "
                        "reference of the time ratios (default 0,4)")
    parser.add_argument("--set", choices=BUILTIN_SETS, default="cg-dev", help="the images scored (default cg-dev)")
    parser.add_argument("--threads", type=_count(1, MAX_THREADS), default=1,
                        help="CPU threads of each engine (default 1)")
    parser.add_argument("--timed-frames", type=_count(0, 10_000), default=10,
                        help="frames timed per padding and size (0: no timing; default 10)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    checkpoints = args.checkpoint or ["rlfn_s_takdsr_x2"]
    try:
        if args.json:
            check_output_file(args.json, "the results")
        check_checkpoints(checkpoints)
        images = eval_sets(Config(eval=builtin_sets_config([args.set], [])), SCALE)[args.set]
    except (ValueError, OSError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"set": args.set, "images": len(images), "pads": args.pads, "threads": args.threads,
                               "torch": torch.__version__, "bicubic": score_bicubic(images, SCALE), "checkpoints": {}}
    for checkpoint in checkpoints:
        results["checkpoints"][checkpoint] = score_checkpoint(checkpoint, args.pads, images, args.threads)
    if args.json:  # now, and again with the timing: the scores took minutes
        write_json_atomic(args.json, results)
    if args.timed_frames:
        results["timing"] = time_pads(checkpoints[0], args.pads, args.threads, args.timed_frames)
        if args.json:
            write_json_atomic(args.json, results)
    print(f"{args.set}, {len(images)} images; bicubic: {_row(results['bicubic'])}")
    for checkpoint, by_pad in results["checkpoints"].items():
        for pad, scores in by_pad.items():
            print(f"{checkpoint:20s} edge pad {pad:>2s}: {_row(scores)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

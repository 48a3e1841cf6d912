"""Frames per second of the scene renderer, headless, with readback (what the dataset generator pays).

    python -m scenes.bench                      # table on stdout, JSON in ./scenes_bench.json
    python -m scenes.bench --frames 5 --json out.json --anisotropy 16

fps is 1 / median frame time over ``--frames`` frames at distinct times, after one warm-up frame per preset
and size; the median keeps other processes' bursts on a shared machine from skewing the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from scenes import PRESETS, SceneRenderer

SIZES = ((640, 360), (1280, 720), (1920, 1080))


def _frame_times(renderer: SceneRenderer, preset: str, width: int, height: int, frames: int) -> list[float]:
    renderer.render(preset, 0.0, width, height)  # warm-up: first use of this size allocates its framebuffer
    times = []
    for i in range(frames):
        start = time.perf_counter()
        renderer.render(preset, 1.0 + 2.7 * i, width, height)
        times.append(time.perf_counter() - start)
    return times


def run(frames: int, anisotropy: float | None, presets: tuple[str, ...]) -> dict:
    """Benchmark every preset at every size; returns a JSON-ready report."""
    renderer = SceneRenderer(anisotropy=anisotropy)
    setup = {}
    for preset in presets:
        start = time.perf_counter()
        renderer.render(preset, 0.0, 64, 36)  # textures, meshes, instance buffers and the shadow map
        setup[preset] = round(time.perf_counter() - start, 3)
    rows = []
    for width, height in SIZES:
        for preset in presets:
            median = statistics.median(_frame_times(renderer, preset, width, height, frames))
            rows.append(
                {
                    "preset": preset,
                    "width": width,
                    "height": height,
                    "ms": round(median * 1e3, 1),
                    "fps": round(1.0 / median, 2),
                }
            )
    report = {
        "renderer": renderer.ctx.info["GL_RENDERER"],
        "anisotropy": renderer.anisotropy,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "frames": frames,
        "setup_seconds": setup,
        "results": rows,
    }
    renderer.release()
    return report


def format_table(report: dict) -> str:
    """Sizes down, presets across, fps in the cells, plus a mean column."""
    presets = list(report["setup_seconds"])
    lines = [
        f"{report['renderer']} | anisotropy {report['anisotropy']:g} | {report['cpu_count']} CPUs",
        f"{'size':>10} " + " ".join(f"{p:>9}" for p in presets) + f" {'mean':>9}",
    ]
    for width, height in SIZES:
        fps = [r["fps"] for r in report["results"] if (r["width"], r["height"]) == (width, height)]
        cells = " ".join(f"{f:>9.2f}" for f in fps)
        lines.append(f"{f'{width}x{height}':>10} {cells} {statistics.mean(fps):>9.2f}")
    setup = ", ".join(f"{p} {s:.2f}s" for p, s in report["setup_seconds"].items())
    lines.append(f"first-frame setup: {setup}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scenes.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("scenes_bench.json"), help="where to write the report")
    parser.add_argument("--frames", type=int, default=5, help="timed frames per preset and size")
    parser.add_argument("--anisotropy", type=float, default=None, help="texture anisotropy (default: auto)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error("--frames must be at least 1")
    if args.anisotropy is not None and not 1 <= args.anisotropy < float("inf"):  # the renderer's traceback before
        parser.error(f"--anisotropy must be a number >= 1 (1: off; leave it out for automatic), got {args.anisotropy}")
    if not args.json.parent.is_dir() or args.json.is_dir():  # said now, not after a minute of rendering
        parser.error(f"--json {args.json}: name a file in an existing folder")
    report = run(args.frames, args.anisotropy, tuple(args.presets))
    print(format_table(report))
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

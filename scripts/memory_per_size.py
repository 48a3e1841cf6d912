"""What a new frame size costs the engine's memory for good: each backend upscales frames of many different sizes in
a fresh process, against the same number of frames cycling four sizes, and the resident memory (RSS) is read as it
goes. Prints a table and writes JSON.

    python scripts/memory_per_size.py --backends eager,onnxruntime --frames 800 --json memory_per_size.json

The random sizes are 16..128 px a side (the student's minimum is 15), one frame each, as a client that opens a
session per size would send them; in the `random-closed` mode each size is also released after its frame, as the
daemon does when the last session of a size ends (it hands freed heap memory back to the system, at most every
10 s). The last column is read after handing all freed heap memory back (glibc's malloc_trim): what the process
keeps, where the readings before it also count freed memory the heap holds for reuse. The bundled student runs on
the CPU with one thread.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from upscaler_server.bench import check_json_target
from upscaler_server.config import BACKEND_CHOICES

# Runs in a child process per (backend, mode): RSS must start from a process that has seen no other frame.
_CHILD = """
import gc, json, random, sys
import numpy as np
from upscaler_server.engine import create_engine
from upscaler_server.host import trim_heap
from upscaler_server.errors import ConfigError
from upscaler_server.protocol import PIXEL_FORMATS

def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))

backend, mode, frames, points = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
try:
    engine = create_engine(device="cpu", threads=1, backend=backend)
except ConfigError as exc:  # the parent checked the name: a backend this machine cannot run (a package missing)
    print(json.dumps({"unavailable": str(exc)}))
    sys.exit()
rgb, rng = PIXEL_FORMATS["RGB8"], random.Random(0)
fixed = [(64, 64), (96, 54), (128, 72), (80, 80)]
sizes = [fixed[i % 4] if mode == "fixed" else (rng.randint(16, 128), rng.randint(16, 128)) for i in range(frames)]
trace = [(0, rss_mb())]
for index, (width, height) in enumerate(sizes, 1):
    out = np.empty(engine.output_shape(height, width, rgb), np.uint8)
    engine.upscale(np.zeros((height, width, 3), np.uint8), rgb, out)
    if mode == "random-closed":
        engine.release(height, width, rgb)
    if index % (frames // points) == 0:
        trace.append((index, rss_mb()))
gc.collect()
print(json.dumps({"sizes": len(set(sizes)), "trace": trace, "trimmed": rss_mb() if trim_heap() else None}))
"""


def measure(backend: str, mode: str, frames: int, points: int) -> dict:
    """The child's {"sizes", "trace"}, or {"unavailable": why} for a backend it cannot run; RuntimeError with the
    child's last error line when it fails."""
    run = subprocess.run([sys.executable, "-c", _CHILD, backend, mode, str(frames), str(points)], capture_output=True,
                         text=True)  # fmt: skip
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines() or [f"exited with status {run.returncode}"]
        raise RuntimeError(f"{backend}/{mode}: {lines[-1]}")
    return json.loads(run.stdout.splitlines()[-1])


def backend_names(text: str) -> list[str]:
    """--backends: comma-separated names the engine knows (checked here: a child would fail only after the others
    had been measured)."""
    names = text.split(",")
    unknown = [name for name in names if name not in BACKEND_CHOICES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown}; use one of {', '.join(BACKEND_CHOICES)}")
    return names


def measure_all(backends: list[str], frames: int, points: int) -> dict[str, dict]:
    """Every backend in both modes, printed as a table as it goes; RuntimeError when none could run."""
    every = frames // points  # a reading every `every` frames: the last one may come before the last frame
    results = {}
    print(f"| backend | frame sizes | distinct sizes | RSS MB after 0, {every} ... {frames - frames % every} "
          "frames | MB grown after the first reading | RSS MB kept after a trim at the end |")
    print("|---|---|---|---|---|---|")
    for backend in backends:
        for mode in ("fixed", "random", "random-closed"):
            result = measure(backend, mode, frames, points)
            if "unavailable" in result:
                print(f"note: {backend} skipped: {result['unavailable']}", file=sys.stderr)
                break
            results[f"{backend}/{mode}"] = result
            trace = " / ".join(str(round(mb)) for _, mb in result["trace"])
            grown = result["trace"][-1][1] - result["trace"][1][1]  # past the first reading: warm-up is done
            kept = "n/a (no glibc)" if result["trimmed"] is None else round(result["trimmed"])
            print(f"| {backend} | {mode} | {result['sizes']} | {trace} | {grown:.0f} | {kept} |")
    if not results:
        raise RuntimeError(f"none of the backends {', '.join(backends)} can run here")
    return results


def _at_least_one(text: str) -> int:
    """--frames: 0 was blamed on --points ("--points must be 1 to --frames (0)")."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number, at least 1")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", type=backend_names, default="eager,onnxruntime",
                        help="comma-separated (default: %(default)s); one that cannot run here is skipped, with a note")
    parser.add_argument("--frames", type=_at_least_one, default=800, help="frames per run (default: %(default)s)")
    parser.add_argument("--points", type=int, default=4, help="RSS readings per run after the start (default: 4)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not 1 <= args.points <= args.frames:
        parser.error(f"--points must be 1 to --frames ({args.frames})")
    try:
        if args.json:
            check_json_target(args.json)  # before measuring
        results = measure_all(args.backends, args.frames, args.points)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m upscaler_server.bench``: transport overhead and end-to-end speed of the daemon.

Transport: a daemon with the ``nearest`` backend (OpenCV nearest-neighbour x2 instead of a network: the engine
costs about one write of the output) is timed per round trip for each LR size, RGB8:

- ``shm``: ``client.upscale(frame, out=buffer)``: copy into the input slot, submit, wait, copy the output slot out;
- ``shm zero-copy``: submit + wait only, for integrators who render into / read from the slots directly;
- ``mapped``: the same against a daemon with ``--map-slots`` (it copies through its mapping, not through the kernel);
- ``inline``: the pixels inside the ZeroMQ messages (``process`` / ``result``);
- ``memcpy``: one in-process copy of the same input and output bytes, the floor any transport pays once;
- ``nearest``: the "model" alone, in-process.

End to end: a daemon with the real student (the bundled or given checkpoint; random-init ``rlfn_s`` while no
trained weights exist, said so in the output), frames per second and p50/p99 latency of synchronous round trips,
and the frames per second of a client that keeps two frames in flight (what ``--overlap`` speeds up on CUDA).
``--backend`` and ``--precision`` are passed to that daemon (default: its own defaults, eager).

Backends (``--backends eager,compile,onnxruntime,...``): instead of the two parts above, a backend x LR size table
of model-only and end-to-end times, speed-up over fp32 eager and accuracy against it (see ``bench_backends``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np

from upscaler_server.client import UpscalerClient
from upscaler_server.config import BACKEND_CHOICES, Config, cli_prog, parse_size
from upscaler_server.errors import ConfigError, ServerUnavailableError

__all__ = ["end_to_end", "main", "spawn_daemon", "transport"]

SIZES = ((640, 360), (1280, 720), (1920, 1080))
BACKEND_SIZES = ((320, 180), (640, 360), (1280, 720), (1920, 1080))


@contextlib.contextmanager
def spawn_daemon(args: Sequence[str], ready_timeout: float = 180.0) -> Iterator[str]:
    """A daemon subprocess on a private ipc endpoint; yields the endpoint, always stops it."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="ups-bench-", dir="/tmp"))
    endpoint = f"ipc://{tmp}/bench.sock"
    with open(tmp / "daemon.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "upscaler_server", "--endpoint", endpoint, *args],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{(tmp / 'daemon.log').read_text()}")
            try:
                UpscalerClient(endpoint, timeout=0.5, retries=0, heartbeat=False).close()
                break
            except ServerUnavailableError:  # at once while the socket file does not exist yet
                time.sleep(0.05)
        yield endpoint
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _median_ms(call: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples) * 1e3)


def _nearest_into(lr: np.ndarray, out: np.ndarray) -> None:
    """What the nearest backend computes, in-process."""
    cv2.resize(lr, (out.shape[1], out.shape[0]), dst=out, interpolation=cv2.INTER_NEAREST_EXACT)


def transport(sizes: Sequence[tuple[int, int]], repeats: int) -> list[dict[str, Any]]:
    """Round-trip medians (ms) through shared memory, inline messages and a raw memcpy, per LR size."""
    args = ["--backend", "nearest", "--log-level", "WARNING"]
    with spawn_daemon(args) as endpoint, spawn_daemon([*args, "--map-slots"]) as mapped_endpoint, \
            UpscalerClient(endpoint, timeout=60) as client, UpscalerClient(mapped_endpoint, timeout=60) as mapped:
        return [_transport_row(client, mapped, w, h, repeats) for w, h in sizes]


def _zero_copy(client: UpscalerClient, lr: np.ndarray) -> tuple[Callable[[], None], Callable[[], None]]:
    """A one-slot session holding ``lr``: (submit and wait, close)."""
    session = client.open_session(lr.shape[1], lr.shape[0], "RGB8", slots=1)
    session.input(0)[...] = lr

    def round_trip() -> None:
        session.submit(0)
        session.collect()

    return round_trip, session.close


def _transport_row(client: UpscalerClient, mapped: UpscalerClient, w: int, h: int,
                   repeats: int) -> dict[str, Any]:
    lr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    hr = np.empty((h * 2, w * 2, 3), np.uint8)
    _nearest_into(lr, hr)
    if not all(np.array_equal(out, hr) for out in (client.upscale(lr), client.upscale_inline(lr), mapped.upscale(lr))):
        raise RuntimeError("the daemon returned wrong pixels")
    (zero_copy, close), (zero_copy_mapped, close_mapped) = _zero_copy(client, lr), _zero_copy(mapped, lr)
    lr_copy, hr_copy = np.empty_like(lr), np.empty_like(hr)

    def memcpy() -> None:
        np.copyto(lr_copy, lr)
        np.copyto(hr_copy, hr)

    row: dict[str, Any] = {
        "lr": f"{w}x{h}", "hr": f"{2 * w}x{2 * h}", "bytes_in": lr.nbytes, "bytes_out": hr.nbytes,
        "memcpy_ms": _median_ms(memcpy, repeats),
        "nearest_ms": _median_ms(lambda: _nearest_into(lr, hr_copy), repeats),
        "shm_ms": _median_ms(lambda: client.upscale(lr, out=hr_copy), repeats),
        "shm_zero_copy_ms": _median_ms(zero_copy, repeats),
        "shm_zero_copy_mapped_ms": _median_ms(zero_copy_mapped, repeats),
        "inline_ms": _median_ms(lambda: client.upscale_inline(lr), repeats),
    }
    close()
    close_mapped()
    row["shm_over_memcpy"] = row["shm_ms"] / row["memcpy_ms"]
    row["inline_over_memcpy"] = row["inline_ms"] / row["memcpy_ms"]
    row["inline_over_shm"] = row["inline_ms"] / row["shm_ms"]
    return row


def end_to_end(sizes: Sequence[tuple[int, int]], frames: int, budget_s: float,
               daemon_args: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Daemon info and, per LR size, fps and latency percentiles of synchronous frames through shared memory."""
    rows = []
    rng = np.random.default_rng(1)
    with spawn_daemon([*daemon_args, "--log-level", "WARNING"]) as endpoint, \
            UpscalerClient(endpoint, timeout=600) as client:
        info = {"model": client.model, "scale": client.scale, "device": client.device,
                "precision": client.info.precision, "random_weights": client.info.random_weights}
        for w, h in sizes:
            session = client.open_session(w, h, "RGB8", slots=1)
            session.input(0)[...] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            session.submit(0)
            session.collect()  # warm-up
            latencies, infer = [], []
            start = time.perf_counter()
            while len(latencies) < frames and (len(latencies) < 3 or time.perf_counter() - start < budget_s):
                t0 = time.perf_counter()
                session.submit(0)
                result = session.collect()
                latencies.append(time.perf_counter() - t0)
                infer.append(result.timings.infer_us / 1e3)
            session.close()
            lat_ms = np.array(latencies) * 1e3
            rows.append({"lr": f"{w}x{h}", "hr": f"{w * client.scale}x{h * client.scale}", "frames": len(latencies),
                         "fps": len(latencies) / float(np.sum(latencies)), "p50_ms": float(np.percentile(lat_ms, 50)),
                         "p99_ms": float(np.percentile(lat_ms, 99)), "infer_ms": float(np.median(infer)),
                         "fps_2_in_flight": _two_in_flight_fps(client, w, h, frames, budget_s, rng)})
    return info, rows


def _two_in_flight_fps(client: UpscalerClient, w: int, h: int, frames: int, budget_s: float,
                       rng: np.random.Generator) -> float:
    """Frames per second when each finished frame's slot is resubmitted while the other slot's frame runs."""
    session = client.open_session(w, h, "RGB8", slots=2)
    for slot in (0, 1):
        session.input(slot)[...] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        session.submit(slot)
    done, start = 0, time.perf_counter()
    while done < frames and (done < 3 or time.perf_counter() - start < budget_s):
        session.submit(session.collect().slot)
        done += 1
    elapsed = time.perf_counter() - start
    for _ in (0, 1):
        session.collect()
    session.close()
    return done / elapsed


def _student_args(checkpoint: pathlib.Path | None, device: str, threads: int) -> tuple[list[str], str]:
    """Daemon arguments for the end-to-end run and a description of its weights."""
    extra = ["--device", device, "--threads", str(threads)]
    if checkpoint is not None:
        return ["--checkpoint", str(checkpoint), *extra], f"checkpoint {checkpoint}"
    from models import DEFAULT_STUDENT_PATH

    if DEFAULT_STUDENT_PATH.exists():
        return ["--checkpoint", str(DEFAULT_STUDENT_PATH), *extra], f"bundled student {DEFAULT_STUDENT_PATH.name}"
    return ["--model", "rlfn_s", *extra], "random-init rlfn_s (no trained weights shipped yet; same cost)"


def _print_tables(result: dict[str, Any]) -> None:
    print(f"Transport: nearest-neighbour x2 backend, RGB8, median of {result['transport_repeats']} round trips (ms)")
    print(f"{'LR':>10} {'in MB':>6} {'out MB':>6} {'memcpy':>7} {'nearest':>7} {'shm':>7} {'shm 0cp':>7} "
          f"{'mapped':>7} {'inline':>7} {'shm/cpy':>7} {'inl/cpy':>7} {'inl/shm':>7}")
    for r in result["transport"]:
        print(f"{r['lr']:>10} {r['bytes_in'] / 1e6:6.2f} {r['bytes_out'] / 1e6:6.2f} {r['memcpy_ms']:7.2f} "
              f"{r['nearest_ms']:7.2f} {r['shm_ms']:7.2f} {r['shm_zero_copy_ms']:7.2f} "
              f"{r['shm_zero_copy_mapped_ms']:7.2f} {r['inline_ms']:7.2f} "
              f"{r['shm_over_memcpy']:7.1f} {r['inline_over_memcpy']:7.1f} {r['inline_over_shm']:7.2f}")
    e2e = result["end_to_end"]
    print(f"\nEnd to end: {e2e['weights']}; model {e2e['model']} x{e2e['scale']} on {e2e['device']} "
          f"(backend {e2e.get('backend', '-')}, {e2e['precision']}{', overlap' if e2e.get('overlap') else ''}"
          f"{', CUDA graphs' if e2e.get('cuda_graphs') else ''}{', mapped slots' if e2e.get('map_slots') else ''}), "
          "frames through shared memory: "
          "synchronous, then two in flight")
    print(f"{'LR':>10} {'HR':>10} {'frames':>6} {'fps':>7} {'p50 ms':>8} {'p99 ms':>8} {'infer ms':>8} {'fps x2':>7}")
    for r in e2e["rows"]:
        print(f"{r['lr']:>10} {r['hr']:>10} {r['frames']:>6} {r['fps']:7.2f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
              f"{r['infer_ms']:8.1f} {r['fps_2_in_flight']:7.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; prints the tables and optionally writes JSON."""
    # no abbreviations: --backend (the end-to-end daemon's) and --backends (the comparison) must never be confused
    p = argparse.ArgumentParser(prog=cli_prog("upscaler_server.bench", "takdsr-bench"),
                                description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--json", type=pathlib.Path, help="also write the results here")
    p.add_argument("--sizes", type=_sizes, nargs="+", help="LR sizes WxH (space- or comma-separated) for both parts "
                   "(default: 640x360 1280x720 1920x1080; with --backends also 320x180)")
    p.add_argument("--e2e-sizes", type=_sizes, nargs="+", help="LR sizes of the end-to-end part (default: --sizes)")
    p.add_argument("--repeats", type=int, default=30, help="transport round trips per size")
    p.add_argument("--frames", type=int, default=20, help="end-to-end frames per size (at least 3)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per end-to-end size before stopping early")
    p.add_argument("--checkpoint", type=pathlib.Path, help="student for the end-to-end part")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="daemon CPU threads (0: all usable cores)")
    p.add_argument("--backend", choices=[c for c in BACKEND_CHOICES if c != "nearest"], default=Config.backend,
                   help="the end-to-end daemon's --backend (to compare several backends, use --backends)")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default=Config.precision,
                   help="the end-to-end daemon's --precision")
    p.add_argument("--overlap", action="store_true", help="end-to-end daemon with --overlap (CUDA)")
    p.add_argument("--cuda-graphs", action="store_true", help="end-to-end daemon with --cuda-graphs (CUDA)")
    p.add_argument("--map-slots", action="store_true", help="end-to-end daemon with --map-slots (copies through "
                   "its mapping, not through the kernel)")
    p.add_argument("--skip-e2e", action="store_true", help="transport only (with --backends: model-only)")
    p.add_argument("--backends", type=lambda t: [b for b in t.split(",") if b], metavar="B1,B2",
                   help="compare these backends (eager, compile, onnxruntime, tensorrt, auto, each optionally "
                   "-fp32/-bf16/-fp16, -padN for channels zero-padded to a multiple of N and, on CUDA, -graphs for a "
                   "CUDA graph per resolution, e.g. compile-bf16, eager-fp16-pad8-graphs) instead of the transport "
                   "and end-to-end parts")
    p.add_argument("--cache-dir", type=pathlib.Path, help="ONNX/TensorRT cache for --backends")
    args = p.parse_args(argv)
    default_sizes = [list(BACKEND_SIZES if args.backends else SIZES)]
    args.sizes = [s for group in args.sizes or default_sizes for s in group]
    args.e2e_sizes = [s for group in args.e2e_sizes for s in group] if args.e2e_sizes else None
    if args.backends:
        return _backends_main(args)
    if args.cuda_graphs or args.overlap:
        _require_cuda(p, args.device)
    result: dict[str, Any] = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                                          "cpus": os.cpu_count()},
                              "transport_repeats": args.repeats, "transport": transport(args.sizes, args.repeats)}
    if args.skip_e2e:
        result["end_to_end"] = {"weights": "skipped", "model": "-", "scale": 0, "device": "-", "precision": "-",
                                "rows": []}
    else:
        daemon_args, weights = _student_args(args.checkpoint, args.device, args.threads)
        daemon_args += ["--backend", args.backend, "--precision", args.precision]
        daemon_args += ["--overlap"] if args.overlap else []
        daemon_args += ["--cuda-graphs"] if args.cuda_graphs else []
        daemon_args += ["--map-slots"] if args.map_slots else []
        info, rows = end_to_end(args.e2e_sizes or args.sizes, args.frames, args.budget, daemon_args)
        result["end_to_end"] = {"weights": weights, "backend": args.backend, "overlap": args.overlap,
                                "cuda_graphs": args.cuda_graphs, "map_slots": args.map_slots, **info, "rows": rows}
    _print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _require_cuda(parser: argparse.ArgumentParser, device: str) -> None:
    """--cuda-graphs and --overlap: the daemon would drop them on a CPU, and the table would still name them."""
    from upscaler_server.engine import resolve_device

    try:
        resolved = resolve_device(device)
    except ConfigError as exc:
        parser.error(str(exc))
    if not resolved.startswith("cuda"):
        parser.error("--cuda-graphs and --overlap need CUDA (--device cuda, or auto on a machine with a GPU)")


def _sizes(text: str) -> list[tuple[int, int]]:
    return [parse_size(t) for t in text.split(",") if t]


def _backends_main(args: argparse.Namespace) -> int:
    from upscaler_server.bench_backends import compare_backends, parse_label, print_backend_table, unavailable_here
    from upscaler_server.engine import resolve_device

    e2e_sizes = [] if args.skip_e2e else (args.e2e_sizes or args.sizes)
    try:  # a label that cannot run here is refused before anything is measured
        device = resolve_device(args.device)
        variants = [parse_label(label, device) for label in args.backends]
        for variant in variants:
            if (reason := unavailable_here(variant, device)) is not None:
                raise ValueError(f"{variant.label} cannot run here: {reason}")
    except (ValueError, ConfigError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    result = compare_backends(variants, args.sizes, checkpoint=args.checkpoint, device=device, threads=args.threads,
                              frames=args.frames, budget_s=args.budget, e2e_sizes=e2e_sizes, cache_dir=args.cache_dir)
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                         "load": os.getloadavg()}
    print_backend_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

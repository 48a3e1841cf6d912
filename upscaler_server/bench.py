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
of model-only and end-to-end times, speed-up over fp32 eager and accuracy against it (see ``bench_backends``). The
options of those two parts are refused with it (exit 2), not dropped: the labels name the backend, the precision and
the CUDA graphs (``eager-bf16``, ``compile-fp16-graphs``), ``--frames`` the frames timed per row, and ``--overlap``
and ``--map-slots`` are measured without ``--backends``.

Every option is checked, and the student loaded once, before any daemon starts or anything is measured. Exit status:
0 measured, 1 a daemon did not start or a measurement failed (one line says why), 2 bad arguments, 3 the checkpoint
cannot be loaded as a student (as the daemon and the offline CLI), 130 interrupted (Ctrl-C, SIGTERM or SIGHUP; the
daemons are stopped; a daemon also dies with the benchmark when it is killed, SIGKILL included, but then its folder
/tmp/ups-bench-PID-* with the daemon's log is left behind, as nothing of the benchmark runs to remove it: the next
benchmark removes this user's folders whose benchmark PID has ended, and says so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import platform
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np

from upscaler_server import cpu_model, daemon_command, die_with_parent
from upscaler_server.bench_backends import Variant, compare_backends, parse_label, print_backend_table, unavailable_here
from upscaler_server.client import UpscalerClient
from upscaler_server.config import (
    BACKEND_CHOICES,
    CACHING_BACKENDS,
    DEFAULT_EDGE_PAD,
    MAX_THREADS,
    Config,
    cli_prog,
    default_size_problem,
    engine_setting_problems,
    parse_size,
)
from upscaler_server.console import add_version_option, escape_unprintable_names, ignore_the_working_folder
from upscaler_server.errors import ConfigError, ModelLoadError, ServerUnavailableError, UpscalerError
from upscaler_server.files import FolderError, check_writable, is_stream, replace_whole, written_file
from upscaler_server.shm import pid_alive

__all__ = ["DaemonStartError", "bench_folder", "check_json_target", "end_to_end", "main", "remove_stale_folders",
           "spawn_daemon", "transport"]

SIZES = ((640, 360), (1280, 720), (1920, 1080))
BACKEND_SIZES = ((320, 180), (640, 360), (1280, 720), (1920, 1080))
EXIT_FAILED, EXIT_ARGS, EXIT_MODEL, EXIT_INTERRUPTED = 1, 2, 3, 130


# /tmp, not $TMPDIR (which may be long): an ipc:// path in such a folder must fit the 107 bytes of a Unix socket address
BENCH_TMP = pathlib.Path("/tmp")
_FOLDER_PREFIX = "ups-bench-"


def bench_folder() -> pathlib.Path:
    """A new private folder /tmp/ups-bench-PID-XXXXXXXX for the caller to remove; PID (this benchmark's) lets a later
    benchmark remove it when this one is killed with SIGKILL (:func:`remove_stale_folders`)."""
    return pathlib.Path(tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-", dir=BENCH_TMP))


def remove_stale_folders() -> list[pathlib.Path]:
    """Remove this user's benchmark folders whose benchmark has ended (killed: nothing of it ran to remove them);
    returns them. A folder of a benchmark still running, another user's, or a name not made by bench_folder stays."""
    removed = []
    for folder in sorted(BENCH_TMP.glob(f"{_FOLDER_PREFIX}*")):
        owner = re.fullmatch(rf"{_FOLDER_PREFIX}(\d+)-\w+", folder.name)
        try:
            info = folder.lstat()  # a link is never followed into
        except OSError:
            continue
        if owner and stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not pid_alive(int(owner[1])):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class DaemonStartError(RuntimeError):
    """A daemon the benchmark needs did not start; the message is one line, its log's last."""


@contextlib.contextmanager
def spawn_daemon(args: Sequence[str], ready_timeout: float = 180.0) -> Iterator[str]:
    """A daemon subprocess on a private ipc endpoint; yields the endpoint, always stops it and removes its folder
    (except after SIGKILL of the benchmark: see the module docstring)."""
    tmp = bench_folder()
    endpoint = f"ipc://{tmp}/bench.sock"
    with open(tmp / "daemon.log", "wb") as log:
        # the daemon dies with the benchmark, however that ends (SIGKILL, a CI job cancelled)
        proc = subprocess.Popen(daemon_command(["--endpoint", endpoint, *args]), stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent())
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DaemonStartError(_start_failure(proc, ready_timeout, tmp / "daemon.log"))
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


def _start_failure(proc: subprocess.Popen[bytes], ready_timeout: float, log: pathlib.Path) -> str:
    """Why a daemon did not start, in one line: how it ended and the last line it logged (its error)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    ended = f"exited with status {proc.returncode}" if proc.returncode is not None else \
        f"did not answer within {ready_timeout:.0f} s"
    return f"a daemon did not start ({ended}): {lines[-1] if lines else 'nothing logged'}"


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
    if result["end_to_end"]["rows"]:  # none with --skip-e2e: its header and an empty table said nothing
        _print_end_to_end(result["end_to_end"])


def _print_end_to_end(e2e: dict[str, Any]) -> None:
    print(f"\nEnd to end: {e2e['weights']}; model {e2e['model']} x{e2e['scale']} on {e2e['device']} "
          f"(backend {e2e['backend']}, {e2e['precision']}{', overlap' if e2e['overlap'] else ''}"
          f"{', CUDA graphs' if e2e['cuda_graphs'] else ''}{', mapped slots' if e2e['map_slots'] else ''}), "
          "frames through shared memory: "
          "synchronous, then two in flight")
    print(f"{'LR':>10} {'HR':>10} {'frames':>6} {'fps':>7} {'p50 ms':>8} {'p99 ms':>8} {'infer ms':>8} {'fps x2':>7}")
    for r in e2e["rows"]:
        print(f"{r['lr']:>10} {r['hr']:>10} {r['frames']:>6} {r['fps']:7.2f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
              f"{r['infer_ms']:8.1f} {r['fps_2_in_flight']:7.2f}")


def _parser() -> argparse.ArgumentParser:
    # no abbreviations: --backend (the end-to-end daemon's) and --backends (the comparison) must never be confused
    p = argparse.ArgumentParser(prog=cli_prog("upscaler_server.bench", "takdsr-bench"),
                                description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="exit status: 0 measured, 1 a daemon did not start or a measurement failed, "
                                "2 bad arguments, 3 the checkpoint cannot be loaded as a student, 130 interrupted")
    add_version_option(p)
    p.add_argument("--json", type=pathlib.Path, help="also write the results here (in an existing folder; "
                   "/dev/stdout puts the tables on stderr)")
    p.add_argument("--sizes", type=_sizes, nargs="+", help="LR sizes WxH (space- or comma-separated) for both parts "
                   "(default: 640x360 1280x720 1920x1080; with --backends also 320x180)")
    p.add_argument("--e2e-sizes", type=_sizes, nargs="+", help="LR sizes of the end-to-end part (default: --sizes)")
    p.add_argument("--repeats", type=int, default=30, help="transport round trips per size (at least 1)")
    p.add_argument("--frames", type=int, default=20, help="end-to-end frames per size (at least 3)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per end-to-end size before stopping early")
    p.add_argument("--checkpoint", type=pathlib.Path, help="student for the end-to-end part")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--threads", type=int, default=0, help=f"daemon CPU threads, 0 (all usable cores) to {MAX_THREADS}")
    p.add_argument("--backend", choices=[c for c in BACKEND_CHOICES if c != "nearest"], default=Config.backend,
                   help="the end-to-end daemon's --backend (to compare several backends, use --backends)")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default=Config.precision,
                   help="the end-to-end daemon's --precision")
    p.add_argument("--overlap", action="store_true", help="end-to-end daemon with --overlap (CUDA)")
    p.add_argument("--cuda-graphs", action="store_true", help="end-to-end daemon with --cuda-graphs (CUDA)")
    p.add_argument("--map-slots", action="store_true", help="end-to-end daemon with --map-slots (copies through "
                   "its mapping, not through the kernel)")
    p.add_argument("--skip-e2e", action="store_true", help="transport only (with --backends: model-only)")
    p.add_argument("--backends", type=_backend_labels, metavar="B1,B2",
                   help="compare these backends (eager, compile, onnxruntime, tensorrt, auto, each optionally "
                   "-fp32/-bf16/-fp16, -padN for channels zero-padded to a multiple of N and, on CUDA, -graphs for a "
                   "CUDA graph per resolution, e.g. compile-bf16, eager-fp16-pad8-graphs) instead of the transport "
                   "and end-to-end parts (whose options it refuses)")
    p.add_argument("--cache-dir", type=pathlib.Path,
                   help="ONNX/TensorRT files and auto's measurements, for --backends and the end-to-end daemon (a "
                   "folder, created if missing)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; prints the tables and optionally writes JSON. Exit status: see the module
    docstring."""
    escape_unprintable_names()  # before anything prints, argparse's errors included: a name may not be UTF-8
    ignore_the_working_folder()  # before `models` loads: run from any folder
    args = _parser().parse_args(argv)
    default_sizes = [list(BACKEND_SIZES if args.backends else SIZES)]
    args.sizes = [s for group in args.sizes or default_sizes for s in group]
    args.e2e_sizes = [s for group in args.e2e_sizes for s in group] if args.e2e_sizes else None
    # `timeout`, `kill`, a closed terminal: cleaned up as Ctrl-C is (they left the daemons and folders behind)
    previous = {stop: signal.signal(stop, signal.default_int_handler) for stop in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _bench(args)
    except KeyboardInterrupt:  # the daemons were stopped on the way out (spawn_daemon's finally)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def _bench(args: argparse.Namespace) -> int:
    """Check every option, then measure: a bad option must not cost the minutes of measuring before it is used."""
    try:
        _check_options(args)
        backends = _backend_variants(args) if args.backends else None
        _check_student(args)
    except ModelLoadError as exc:  # the daemon's and the offline CLI's exit status for it
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except (ValueError, ConfigError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_ARGS
    for folder in remove_stale_folders():
        print(f"bench: removed {folder}, left by a benchmark that was killed", file=sys.stderr)
    try:
        result = _transport_and_end_to_end(args) if backends is None else _compare(args, *backends)
    except (DaemonStartError, UpscalerError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return EXIT_FAILED
    # with the JSON on stdout (`--json /dev/stdout | jq`), the tables go to stderr: mixed in, they broke the JSON
    tables_to = sys.stderr if args.json and _is_stdout(args.json) else sys.stdout
    with contextlib.redirect_stdout(tables_to):
        (_print_tables if backends is None else print_backend_table)(result)
    if args.json:
        try:
            _write_json(args.json, result)
        except OSError as exc:
            print(f"bench: cannot write --json {args.json}: {exc}", file=sys.stderr)
            return EXIT_FAILED
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """ValueError for an option out of its range (counts, thread count, sizes, the --json and --cache-dir folders),
    or one --backends would ignore; ConfigError for a CUDA-only option without CUDA."""
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: use at least 1 round trip per size")
    if args.frames < 3:
        raise ValueError(f"--frames {args.frames}: use at least 3 (the p99 and the fps need a few frames)")
    if not 0 < args.budget < math.inf:  # NaN too: it failed the JSON at the end, after every measurement
        raise ValueError(f"--budget {args.budget}: use a positive number of seconds")
    if problems := engine_setting_problems(threads=args.threads, pad_channels=0):
        raise ValueError(f"--threads {args.threads}: needs {problems[0]}")
    # the daemons run with the default limits, which the benchmark does not change
    for option, sizes in (("--sizes", args.sizes), ("--e2e-sizes", args.e2e_sizes or [])):
        for w, h in sizes:
            if (problem := default_size_problem(w, h)) is not None:
                raise ValueError(f"{option} {w}x{h}: {problem}")
    if args.backends and args.e2e_sizes:  # the table has end-to-end columns only beside a model-only row
        missing = [f"{w}x{h}" for w, h in args.e2e_sizes if (w, h) not in args.sizes]
        if missing:
            raise ValueError(f"--e2e-sizes {', '.join(missing)}: not in --sizes; with --backends an end-to-end size "
                             "must also be measured model-only (it was measured, then left out of the table)")
    if args.json is not None:
        check_json_target(args.json)
    if args.cache_dir is not None:
        _check_cache_dir(args.cache_dir)
    if args.backends:
        _refuse_options_ignored(args, _IGNORED_BY_BACKENDS, "--backends")
    elif args.skip_e2e:
        _refuse_options_ignored(args, _IGNORED_BY_SKIP_E2E, "--skip-e2e (they set up the end-to-end part)")
    if not args.backends and not args.skip_e2e:
        _check_end_to_end_daemon(args)
    if not args.backends and (args.cuda_graphs or args.overlap):
        _require_cuda(args.device)


# the end-to-end daemon's and the transport part's options, which the backend table has no use for (each was dropped
# in silence, so a table "with" --cuda-graphs had none), and what asks for the same thing there
_IGNORED_BY_BACKENDS = {
    "backend": "name the backends in --backends, e.g. --backends eager,compile",
    "precision": "add it to each label, e.g. --backends eager-bf16",
    "cuda_graphs": "add -graphs to a label on CUDA, e.g. --backends eager-fp16-graphs",
    "overlap": "the table times one frame at a time; measure --overlap without --backends",
    "map_slots": "the table's daemons copy through the kernel; measure --map-slots without --backends",
    "repeats": "the table times --frames frames per backend and size",
}


# the end-to-end part's options, which a transport-only run (--skip-e2e without --backends) has no use for
_IGNORED_BY_SKIP_E2E = {dest: "" for dest in (
    "checkpoint", "threads", "backend", "precision", "overlap", "cuda_graphs", "map_slots", "frames", "budget",
    "e2e_sizes", "cache_dir")}


def _refuse_options_ignored(args: argparse.Namespace, ignored_here: dict[str, str], mode: str) -> None:
    """ValueError naming every option given a value other than its default that ``mode`` would not use."""
    defaults = _parser()
    ignored = [f"--{dest.replace('_', '-')}" + (f" ({instead})" if instead else "")
               for dest, instead in ignored_here.items() if getattr(args, dest) != defaults.get_default(dest)]
    if ignored:
        raise ValueError(f"these options would be ignored with {mode}: {', '.join(ignored)}; leave them out")


def _check_end_to_end_daemon(args: argparse.Namespace) -> None:
    """ConfigError for a --device the daemon cannot resolve here, ValueError for a --backend / --precision it cannot
    run on it: found only when that daemon started, after the transport part had been measured."""
    from upscaler_server.backends import unavailable
    from upscaler_server.host import resolve_device

    device = resolve_device(args.device)
    backend = "eager" if args.backend == "torch" else args.backend
    if backend != "auto" and (why := unavailable(backend, device, args.precision)) is not None:
        raise ValueError(f"--backend {args.backend} --precision {args.precision} on {device}: {why}")
    if args.cache_dir is not None and backend not in CACHING_BACKENDS:  # that daemon would refuse it, after transport
        raise ValueError(f"--cache-dir would be ignored: the end-to-end daemon's --backend {args.backend} keeps no "
                         f"files (only {', '.join(CACHING_BACKENDS)} do); leave it out")


def _is_stdout(path: pathlib.Path) -> bool:
    """Whether ``path`` is (or leads to) what this process's standard output writes to: a pipe, a file, a tty."""
    try:
        target, stdout = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):  # absent (a new file), or stdout closed or replaced by an object without a descriptor
        return False
    return (target.st_dev, target.st_ino) == (stdout.st_dev, stdout.st_ino)


def check_json_target(path: pathlib.Path) -> None:
    """ValueError unless ``path`` can be written: a file (not a folder) in an existing, writable folder (where a
    link leads), or a stream such as /dev/stdout."""
    if is_stream(path):
        if not os.access(path, os.W_OK):
            raise ValueError(f"--json {path} is not writable; choose another")
        return
    try:
        folder = written_file(path).parent
    except PermissionError as exc:  # a link another user planted in /tmp
        raise ValueError(f"--json {exc}") from None
    if path.is_dir():
        raise ValueError(f"--json {path} is a folder; name a file")
    if os.path.lexists(folder) and not folder.is_dir():  # a file there: "does not exist" sent users looking for it
        raise ValueError(f"--json {path}: {folder} is not a folder; choose another")
    if not folder.is_dir():
        raise ValueError(f"--json {path}: the folder {folder} does not exist; create it or choose another")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--json {path}: the folder {folder} is not writable; choose another")


def _check_cache_dir(path: pathlib.Path) -> None:
    """ValueError unless ``path`` is a writable folder or can be created as one. The ONNX export found out only after
    fp32 eager had been measured; nothing is created here (its deepest existing folder is probed instead)."""
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))  # "." or "/" at the latest
    if not existing.is_dir():
        raise ValueError(f"--cache-dir {path}: {existing} is not a folder; name a folder (it is created if missing)")
    try:
        check_writable(existing)
    except FolderError as exc:
        raise ValueError(f"--cache-dir {path}: {exc}; choose another") from None


def _check_student(args: argparse.Namespace) -> None:
    """ModelLoadError for a student that cannot be loaded, ValueError for a size below its minimum; nothing to check
    when no size goes through it."""
    if model_sizes := _model_sizes(args):
        min_size = _student_min_size(args.checkpoint, bundled=not args.backends)
        for option, (w, h) in model_sizes:
            if min(w, h) < min_size:
                raise ValueError(f"{option} {w}x{h} is below the model's minimum input size {min_size}x{min_size}; "
                                 f"use at least {min_size} for each")


def _model_sizes(args: argparse.Namespace) -> list[tuple[str, tuple[int, int]]]:
    """(option, LR size) of every size that goes through the student (the transport part's backend has no minimum)."""
    sizes = [("--sizes", s) for s in args.sizes] if args.backends else []
    if not args.skip_e2e:
        option = "--e2e-sizes" if args.e2e_sizes else "--sizes"
        sizes += [(option, s) for s in args.e2e_sizes or args.sizes]
    return sizes


def _student_min_size(checkpoint: pathlib.Path | None, bundled: bool) -> int:
    """The smallest LR side of the student that will be measured: ``checkpoint``, else the bundled student (when
    ``bundled`` and shipped), else random-init rlfn_s. Loading it (safetensors: nothing unpickled) raises the
    ModelLoadError the daemon would exit with, before anything is measured."""
    import models
    from upscaler_server.engine import load_network

    if checkpoint is None and not (bundled and models.DEFAULT_STUDENT_PATH.exists()):
        network, _, _ = load_network(None, "rlfn_s")
    else:
        # at the checkpoint's own scale
        network, _, _ = load_network(checkpoint, None, instead="--checkpoint PATH or a bundled name, or leave "
                                     "--checkpoint out to measure the default student")
    return models.min_lr_size(network)


def _machine(args: argparse.Namespace, load_before: tuple[float, float, float]) -> dict[str, Any]:
    """What a reader needs to reproduce or discount the numbers: the hardware, the versions, the settings, and the
    load average before the run (after it, it includes the benchmark's own threads)."""
    modules = {"torch": "torch", "numpy": "numpy", "pyzmq": "zmq", "opencv": "cv2", "onnxruntime": "onnxruntime"}
    versions = {name: getattr(sys.modules[module], "__version__", "?") for name, module in modules.items()
                if module in sys.modules}
    torch = sys.modules.get("torch")
    gpu = torch.cuda.get_device_name() if torch is not None and torch.cuda.is_initialized() else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "cpu": cpu_model(), "gpu": gpu, "versions": versions, "load_before": load_before,
            "load_after": os.getloadavg(),
            "settings": {"threads": args.threads or len(os.sched_getaffinity(0)), "repeats": args.repeats,
                         "frames": args.frames, "budget_s": args.budget, "device": args.device,
                         "edge_pad": DEFAULT_EDGE_PAD}}  # the engines' and daemons' (no option here): docs/results.md


def _transport_and_end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    result: dict[str, Any] = {"transport_repeats": args.repeats, "transport": transport(args.sizes, args.repeats)}
    result["machine"] = _machine(args, load_before)
    if args.skip_e2e:
        result["end_to_end"] = {"weights": "skipped", "model": "-", "scale": 0, "device": "-", "precision": "-",
                                "rows": []}
        return result
    daemon_args, weights = _student_args(args.checkpoint, args.device, args.threads)
    daemon_args += ["--backend", args.backend, "--precision", args.precision]
    daemon_args += ["--overlap"] if args.overlap else []
    daemon_args += ["--cuda-graphs"] if args.cuda_graphs else []
    daemon_args += ["--map-slots"] if args.map_slots else []
    daemon_args += ["--cache-dir", str(args.cache_dir)] if args.cache_dir is not None else []
    info, rows = end_to_end(args.e2e_sizes or args.sizes, args.frames, args.budget, daemon_args)
    result["machine"] = _machine(args, load_before)
    result["end_to_end"] = {"weights": weights, "backend": args.backend, "overlap": args.overlap,
                            "cuda_graphs": args.cuda_graphs, "map_slots": args.map_slots, **info, "rows": rows}
    return result


def _write_json(path: pathlib.Path, result: dict[str, Any]) -> None:
    """``result`` as strict JSON (every number finite: repeats and frames are at least 1 and 3), written beside
    ``path`` and moved over it, so that an interrupted write leaves no half file."""
    replace_whole(path, json.dumps(result, indent=2, allow_nan=False) + "\n")  # this run's replace an earlier run's


def _require_cuda(device: str) -> None:
    """--cuda-graphs and --overlap: the daemon would drop them on a CPU, and the table would still name them.
    ValueError without CUDA, ConfigError for a device that cannot be resolved."""
    from upscaler_server.host import resolve_device

    if not resolve_device(device).startswith("cuda"):
        raise ValueError("--cuda-graphs and --overlap need CUDA (--device cuda, or auto on a machine with a GPU)")


def _sizes(text: str) -> list[tuple[int, int]]:
    """--sizes and --e2e-sizes: WxH, comma-separated. Empty (``""``, ``,``), it started daemons for empty tables."""
    sizes = [parse_size(t) for t in text.split(",") if t]
    if not sizes:
        raise argparse.ArgumentTypeError(f"{text!r} names no size; give WxH, e.g. 640x360")
    return sizes


def _backend_labels(text: str) -> list[str]:
    """--backends: labels, comma-separated. Empty, it counted as no --backends: the default minutes-long benchmark."""
    labels = [label for label in text.split(",") if label]
    if not labels:
        raise argparse.ArgumentTypeError(f"{text!r} names no backend; give labels, e.g. eager,compile-bf16")
    return labels


def _backend_variants(args: argparse.Namespace) -> tuple[str, list[Variant]]:
    """The resolved device and the parsed --backends; ValueError or ConfigError for a label that cannot run here."""
    from upscaler_server.host import resolve_device

    device = resolve_device(args.device)
    variants = [parse_label(label, device) for label in args.backends]
    for variant in variants:
        if (reason := unavailable_here(variant, device)) is not None:
            raise ValueError(f"{variant.label} cannot run here: {reason}")
        if problems := engine_setting_problems(threads=args.threads, pad_channels=variant.pad):
            raise ValueError(f"{variant.label}: needs {problems[0]}")
    if args.cache_dir is not None and not any(v.backend in CACHING_BACKENDS for v in variants):
        raise ValueError(f"--cache-dir would be ignored: none of {', '.join(args.backends)} keeps files there (only "
                         f"{', '.join(CACHING_BACKENDS)} do); leave it out")
    return device, variants


def _compare(args: argparse.Namespace, device: str, variants: Sequence[Variant]) -> dict[str, Any]:
    e2e_sizes = [] if args.skip_e2e else (args.e2e_sizes or args.sizes)
    load_before = os.getloadavg()
    result = compare_backends(variants, args.sizes, checkpoint=args.checkpoint, device=device, threads=args.threads,
                              frames=args.frames, budget_s=args.budget, e2e_sizes=e2e_sizes, cache_dir=args.cache_dir)
    result["machine"] = _machine(args, load_before)
    return result


if __name__ == "__main__":
    sys.exit(main())

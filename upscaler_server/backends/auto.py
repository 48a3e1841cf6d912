"""``auto`` backend: per device and resolution, the fastest available backend whose output stays within
:data:`~upscaler_server.backends.common.TOLERANCE` of fp32 eager, measured once and remembered on disk.

Measurement (on the first frame of a resolution, or at start-up for ``tune_sizes``): a seeded random RGB8 frame goes
through fp32 eager (the reference) and every candidate; a candidate whose output differs by more than the tolerance,
or that fails to build, is rejected; the others are timed (median of a few runs within a time budget) and the fastest
wins. The choice and every candidate's numbers are written to ``auto.json`` in the cache folder under a key made of
the hardware (CPU model, flags and usable cores, or GPU name), torch / onnxruntime / TensorRT versions, the model's
SHA-256 (with its channel and edge padding), the thread count, the tolerance and the resolution: the next start
with the same key does not measure again.
A file that cannot be read (permissions) or is malformed is ignored with a warning that says which, and rewritten.
Daemons sharing the folder take turns to write it (a lock file beside it) and merge what the others wrote, so none
loses another's measurements.
"""

from __future__ import annotations

import datetime
import fcntl
import importlib.metadata
import json
import logging
import math
import os
import pathlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from upscaler_server import cpu_model
from upscaler_server.backends.common import TOLERANCE, Settings, Tolerance, cpu_bf16, read_private, unavailable
from upscaler_server.backends.factory import make_backend
from upscaler_server.engine import CopiedFrame, Engine, StageTimes
from upscaler_server.errors import ConfigError, EngineError, ModelLoadError
from upscaler_server.host import usable_cores
from upscaler_server.protocol import PIXEL_FORMATS, PixelFormat

__all__ = ["CACHE_VERSION", "AutoEngine", "accuracy", "candidate_labels"]

log = logging.getLogger("upscaler_server.backends.auto")

CACHE_VERSION = 1
_REFERENCE = "eager-fp32"
_BUDGET_S = 3.0  # timing time per candidate and resolution, after one warm-up frame
# resolutions (times machines and versions) auto.json keeps: a client that changes its frame size all the time must
# not grow the file, which is read and rewritten whole at every new one
_MAX_ENTRIES = 256
_BUILD_ERRORS = (ConfigError, EngineError, ModelLoadError, RuntimeError, ValueError, ImportError, OSError)


def accuracy(reference: np.ndarray, output: np.ndarray) -> tuple[int, float]:
    """(max abs difference in 8-bit levels, PSNR in dB; inf when identical) of ``output`` against ``reference``."""
    diff = reference.astype(np.int16) - output.astype(np.int16)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return int(np.abs(diff).max(initial=0)), (math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse))


def candidate_labels(device: str, precision: str, allowed: tuple[str, ...] = ()) -> list[str]:
    """Labels ``backend-precision`` auto may try on ``device``, available ones only, fp32 eager always first;
    ``allowed`` keeps backend names or labels (empty: all)."""
    cuda = device.startswith("cuda")
    if cuda:  # bf16 only when asked: on GPUs fp16 is at least as fast and more precise
        table = ["eager-fp16", "compile-fp16", "tensorrt-fp16", "onnxruntime-fp32", "eager-bf16", "compile-bf16"]
    else:
        table = ["eager-bf16", "compile-fp32", "compile-bf16", "onnxruntime-fp32"]
    wanted = {precision} if precision != "auto" else {"fp16", "fp32"} if cuda else {"fp32", "bf16"}
    table = [t for t in table if t.partition("-")[2] in wanted
             and (not allowed or t in allowed or t.partition("-")[0] in allowed)]
    table = [t for t in table if unavailable(t.partition("-")[0], device, t.partition("-")[2]) is None]
    for name in allowed:  # a label no table has here, or only unavailable ones: say so, or auto quietly runs eager
        if not any(name in (t, t.partition("-")[0]) for t in [_REFERENCE, *table]):
            log.warning("--auto-backends %s: nothing auto can measure on %s at precision %s here; it picks among %s",
                        name, device, precision, ", ".join([_REFERENCE, *table]))
    return [_REFERENCE, *table]


def _hardware(device: str) -> str:
    if device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    return f"{cpu_model()} x{usable_cores()} {'bf16' if cpu_bf16() else 'no-bf16'}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _newest(entries: dict[str, dict[str, Any]], keep: int) -> dict[str, dict[str, Any]]:
    """The ``keep`` most recently measured entries (ISO timestamps sort by time; one without sorts as oldest)."""
    if len(entries) <= keep:
        return entries
    newest = sorted(entries, key=lambda k: str(entries[k].get("measured", "")), reverse=True)[:keep]
    return {k: entries[k] for k in sorted(newest)}


class _Cache:
    """auto.json: ``{"version": 1, "entries": {key: {"choice": label, "candidates": {label: numbers}, ...}}}``."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = self._read(warn=True)

    def _read(self, *, warn: bool) -> dict[str, dict[str, Any]]:
        """The file's entries; {} when it is missing, malformed or not to be trusted (with a warning when ``warn``).
        Read as the ONNX and TensorRT files are (read_private): a FIFO there hung the daemon's start, a link to
        /dev/zero filled its memory, and another user's file chose for this user's daemon."""
        raw, problem = read_private(self.path)
        if raw is None:
            if problem and warn:
                log.warning("not using the auto-backend cache %s: %s; measuring again, and it will be rewritten",
                            self.path, problem)
            return {}
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not all(
                    isinstance(v, dict) and isinstance(v.get("choice"), str) for v in data["entries"].values()):
                raise ValueError(f"not a version {CACHE_VERSION} auto-backend cache")
            return data["entries"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if warn:
                log.warning("ignoring the corrupt auto-backend cache %s (%s); it will be rewritten", self.path, exc)
            return {}

    def store(self, key: str, entry: dict[str, Any]) -> None:
        self.entries[key] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(self.path.with_name(self.path.name + ".lock"),  # a link there is not followed
                              os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with open(lock_fd, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one writer at a time; released when the file closes
                # merge: another daemon may have stored other resolutions since this one read the file
                self.entries = _newest({**self._read(warn=False), key: entry}, _MAX_ENTRIES)
                fd, tmp = tempfile.mkstemp(suffix=".json", dir=self.path.parent)
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": CACHE_VERSION, "entries": self.entries}, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)  # atomic: a reader never sees half a file
        except OSError as exc:
            log.warning("cannot write the auto-backend cache %s: %s (the choice holds for this run only)", self.path,
                        exc)


class AutoEngine(Engine):
    """Delegates each resolution to the backend measured fastest within tolerance there (see the module doc)."""

    def __init__(self, network: torch.nn.Module, settings: Settings, *, candidates: tuple[str, ...] = (),
                 tune_sizes: tuple[tuple[int, int], ...] = (), tolerance: Tolerance = TOLERANCE,
                 budget_s: float = _BUDGET_S, on_tune: Callable[[str], None] | None = None) -> None:
        """``on_tune(what)`` is called before each candidate is built and measured for ``tune_sizes`` (``"eager-bf16
        at 640x360, 2 of 3"``): the daemon tells systemd it is still starting, a step at a time."""
        self.name, self.device, self.precision = settings.name, settings.device, "auto"
        self.random_weights = settings.weights is None
        self.weights = settings.weights or "RANDOM (benchmarks only: output is noise)"
        self.scale = int(network.scale)
        self.min_input_size = int(getattr(network, "min_input_size", 1))
        self.tolerance, self._budget_s = tolerance, budget_s
        self._network, self._settings = network, settings
        self.labels = candidate_labels(settings.device, settings.precision, candidates)
        self.choices: dict[tuple[int, int], str] = {}  # (height, width) -> label
        self.measured: list[tuple[int, int]] = []  # resolutions measured by this engine (not read from the cache)
        self._engines: dict[str, Engine] = {}
        # fp32 eager alone is chosen without measuring: its cache is neither read nor written (nor warned about)
        self._cache = _Cache(settings.cache_dir / "auto.json") if self.labels != [_REFERENCE] else None
        threads = settings.threads or usable_cores()
        self._key = (f"{_hardware(settings.device)}|{settings.device.partition(':')[0]}|threads={threads}|"
                     f"torch={torch.__version__}|ort={_version('onnxruntime')}|trt={_version('tensorrt')}|"
                     f"model={settings.model_hash[:24]}|precision={settings.precision}|{','.join(self.labels)}|"
                     f"tol={tolerance.max_levels}lv/{tolerance.min_psnr:g}dB")
        self._on_tune = on_tune
        for width, height in tune_sizes:
            try:
                self.check_input_size(height, width)
            except EngineError as exc:  # a setting, not a frame: the daemon and the offline CLI exit 2 with it
                raise ConfigError(f"--tune-sizes {width}x{height}: {exc}") from None
            self.prepare(height, width, PIXEL_FORMATS["RGB8"])
        self._on_tune = None  # a new size's first frame is measured while serving: the watchdog's business

    def prepare(self, height: int, width: int, fmt: PixelFormat) -> None:
        self._engine(self._choose(height, width)).prepare(height, width, fmt)

    def upscale(self, lr: np.ndarray, fmt: PixelFormat, out: np.ndarray) -> StageTimes:
        self.check(lr, fmt, out)
        return self._engine(self._choose(lr.shape[0], lr.shape[1])).upscale(lr, fmt, out)

    def start_copied(self, frame: CopiedFrame, fmt: PixelFormat) -> Callable[[], StageTimes]:
        self.check_input_size(frame.height, frame.width)
        # the chosen backend's own staging (pinned buffers on CUDA); waited for at once, as max_in_flight is 1 here
        return self._engine(self._choose(frame.height, frame.width)).start_copied(frame, fmt)

    def release(self, height: int, width: int, fmt: PixelFormat) -> None:
        for engine in list(self._engines.values()):  # a copy: the engine thread may add a backend meanwhile
            engine.release(height, width, fmt)

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()

    def _engine(self, label: str) -> Engine:
        if label not in self._engines:
            backend, _, precision = label.partition("-")
            self._engines[label] = make_backend(backend, self._network, replace(self._settings, precision=precision))
        return self._engines[label]

    def _choose(self, height: int, width: int) -> str:
        if (height, width) in self.choices:
            return self.choices[height, width]
        self.choices[height, width] = label = self._look_up_or_measure(height, width)
        self._release_unused()
        return label

    def _look_up_or_measure(self, height: int, width: int) -> str:
        if self._cache is None:  # nothing to choose between: measuring would only cost frames
            log.info("auto backend for %dx%d on %s: %s, the only candidate here (not measured)", width, height,
                     self.device, _REFERENCE)
            return _REFERENCE
        key = f"{self._key}|{width}x{height}"
        cached = self._cache.entries.get(key)
        if cached is not None and cached["choice"] in self.labels:
            log.info("auto backend for %dx%d on %s: %s (cached in %s)", width, height, self.device, cached["choice"],
                     self._cache.path)
            return str(cached["choice"])
        label, results = self._measure(height, width)
        measured = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._cache.store(key, {"choice": label, "candidates": results, "tolerance": self.tolerance.__dict__,
                                "measured": measured})
        return label

    def _measure(self, height: int, width: int) -> tuple[str, dict[str, dict[str, Any]]]:
        rgb = PIXEL_FORMATS["RGB8"]
        frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        reference = self._engine(_REFERENCE).run(frame, rgb)
        results = {}
        for number, label in enumerate(self.labels, 1):
            if self._on_tune is not None:
                self._on_tune(f"{label} at {width}x{height}, {number} of {len(self.labels)}")
            results[label] = self._try(label, frame, reference)
        accepted = {label: r["ms"] for label, r in results.items() if r["ok"]}
        label = min(accepted, key=accepted.__getitem__)
        self.measured.append((height, width))
        table = ", ".join(f"{k} {_describe(v)}" for k, v in results.items())
        log.info("auto backend for %dx%d on %s: %s (measured: %s; tolerance <= %d levels, >= %.0f dB PSNR)", width,
                 height, self.device, label, table, self.tolerance.max_levels, self.tolerance.min_psnr)
        return label, results

    def _try(self, label: str, frame: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
        rgb = PIXEL_FORMATS["RGB8"]
        try:
            engine = self._engine(label)
            engine.prepare(frame.shape[0], frame.shape[1], rgb)
            # the reference's own run was its warm-up; its timing below writes into a copy, not the reference
            out = reference.copy() if label == _REFERENCE else engine.run(frame, rgb)
        except _BUILD_ERRORS as exc:
            log.warning("auto: %s cannot run here, skipped: %s", label, exc)
            self._engines.pop(label, None)
            return {"ok": False, "error": str(exc)[:300]}
        max_diff, psnr = accuracy(reference, out)
        ok = max_diff <= self.tolerance.max_levels and psnr >= self.tolerance.min_psnr
        result: dict[str, Any] = {"ok": ok, "max_diff": max_diff, "psnr": None if math.isinf(psnr) else psnr}
        if ok:
            result["ms"] = _median_ms(lambda: engine.upscale(frame, rgb, out), self._budget_s)
        return result

    def _release_unused(self) -> None:
        keep = {_REFERENCE, *self.choices.values()}
        for label in [k for k in self._engines if k not in keep]:
            self._engines.pop(label).close()


def _median_ms(call: Callable[[], object], budget_s: float, repeats: int = 7) -> float:
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < repeats and (len(samples) < 2 or time.perf_counter() < deadline):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples) * 1e3)


def _describe(result: dict[str, Any]) -> str:
    if "error" in result:
        return "failed"
    psnr = "inf" if result["psnr"] is None else f"{result['psnr']:.1f}"
    timing = f"{result['ms']:.1f} ms" if "ms" in result else "REJECTED"
    return f"{timing} (max {result['max_diff']} levels, {psnr} dB)"

"""Backend comparison for ``python -m upscaler_server.bench --backends ...``: backend x LR size.

Per backend label (``eager``, ``compile-bf16``, ``onnxruntime``, ``compile-fp16-pad8``, ...; the precision defaults to
the device's; a ``-padN`` suffix runs the network with its channels zero-padded to a multiple of N) and size:

- model-only: ``engine.upscale`` in-process on an RGB8 frame (uint8 conversion and colour order included, as the
  daemon calls it), median and p99 of the timed frames after one warm-up frame (compilation, autotuning);
- end to end: a daemon started with that backend, synchronous frames through shared memory (median);
- speed-up: fp32 eager's model-only median over this one, measured in the same run;
- accuracy against fp32 eager on the same frame: max abs difference in 8-bit levels and PSNR.

``auto`` (label ``auto``) is measured like the others after its own choice (made during the warm-up frame, or read
from the cache folder); the table names what it picked.

Without ``--checkpoint`` a seeded random-init ``rlfn_s`` is written to a temporary checkpoint so that every backend
and daemon runs the same weights.
"""

from __future__ import annotations

import math
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["compare_backends", "print_backend_table"]

_REFERENCE = "eager-fp32"


def _split(label: str, device: str) -> tuple[str, str, int]:
    """``"compile-fp16-pad8"`` -> ("compile", "fp16", 8): backend, precision (default: the device's), padding."""
    parts = label.split("-")
    pad = int(parts.pop()[3:]) if len(parts) > 1 and parts[-1].startswith("pad") and parts[-1][3:].isdigit() else 0
    backend, precision = ("eager" if parts[0] == "torch" else parts[0]), "-".join(parts[1:])
    if backend == "auto":
        return backend, precision or "auto", pad
    return backend, precision or ("fp32" if backend == "onnxruntime" or device == "cpu" else "fp16"), pad


def _label(backend: str, precision: str, pad: int) -> str:
    return (backend if backend == "auto" else f"{backend}-{precision}") + (f"-pad{pad}" if pad else "")


def _time(engine: Any, frame: np.ndarray, out: np.ndarray, frames: int, budget_s: float) -> list[float]:
    from upscaler_server.protocol import PIXEL_FORMATS

    rgb = PIXEL_FORMATS["RGB8"]
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < frames and (len(samples) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        engine.upscale(frame, rgb, out)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _model_rows(labels: Sequence[str], sizes: Sequence[tuple[int, int]], checkpoint: pathlib.Path, device: str,
                threads: int, frames: int, budget_s: float, cache_dir: pathlib.Path | None) -> list[dict[str, Any]]:
    from upscaler_server.backends.auto import accuracy
    from upscaler_server.engine import create_engine

    rng = np.random.default_rng(3)
    inputs = {s: rng.integers(0, 256, (s[1], s[0], 3), dtype=np.uint8) for s in sizes}
    reference = create_engine(checkpoint=checkpoint, backend="eager", device=device, precision="fp32",
                              threads=threads)
    expected = {s: reference.run(inputs[s]) for s in sizes}
    rows: list[dict[str, Any]] = []
    for label in [_REFERENCE, *[lb for lb in labels if _split(lb, device) != ("eager", "fp32", 0)]]:
        backend, precision, pad = _split(label, device)
        engine = create_engine(checkpoint=checkpoint, backend=backend, device=device, precision=precision,
                               threads=threads, cache_dir=cache_dir, pad_channels=pad)
        for (w, h), frame in inputs.items():
            out = engine.run(frame)  # warm-up: compilation, autotuning, ONNX export
            max_diff, psnr = accuracy(expected[w, h], out)
            ms = _time(engine, frame, out, frames, budget_s)
            picked = getattr(engine, "choices", {}).get((h, w), "")  # what auto chose for this size
            rows.append({"backend": _label(backend, precision, pad), "picked": picked,
                         "lr": f"{w}x{h}", "frames": len(ms),
                         "model_ms": float(np.median(ms)), "model_p99_ms": float(np.percentile(ms, 99)),
                         "max_diff": max_diff, "psnr": None if math.isinf(psnr) else psnr})
            print(f"measured {rows[-1]}", file=sys.stderr, flush=True)  # a crash later keeps what was measured
        engine.close()
    base: dict[str, float] = {r["lr"]: r["model_ms"] for r in rows if r["backend"] == _REFERENCE}
    for r in rows:
        r["speedup"] = base[r["lr"]] / r["model_ms"]
    return rows


def compare_backends(labels: Sequence[str], sizes: Sequence[tuple[int, int]], *, checkpoint: pathlib.Path | None,
                     device: str, threads: int, frames: int, budget_s: float, e2e_sizes: Sequence[tuple[int, int]],
                     cache_dir: pathlib.Path | None) -> dict[str, Any]:
    """Rows (dicts) of the comparison; end-to-end fields only for ``e2e_sizes``."""
    from upscaler_server.bench import end_to_end
    from upscaler_server.engine import resolve_device

    device = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="ups-bench-") as tmp:
        weights = f"checkpoint {checkpoint}" if checkpoint else "random-init rlfn_s, seed 0 (same cost as trained)"
        checkpoint = checkpoint or _random_student(pathlib.Path(tmp) / "rlfn_s_random.safetensors")
        rows = _model_rows(labels, sizes, checkpoint, device, threads, frames, budget_s, cache_dir)
        for label in dict.fromkeys(r["backend"] for r in rows) if e2e_sizes else ():
            backend, precision, pad = _split(label, device)
            args = ["--checkpoint", str(checkpoint), "--backend", backend, "--precision", precision, "--device",
                    device.partition(":")[0], "--threads", str(threads), "--pad-channels", str(pad)]
            if cache_dir is not None:
                args += ["--cache-dir", str(cache_dir)]
            _, e2e = end_to_end(e2e_sizes, frames, budget_s, args)
            for r in rows:
                match = [e for e in e2e if e["lr"] == r["lr"]]
                if r["backend"] == label and match:
                    r.update(e2e_ms=match[0]["p50_ms"], fps=1e3 / match[0]["p50_ms"])
    return {"device": device, "threads": threads, "weights": weights, "rows": rows}


def _random_student(path: pathlib.Path) -> pathlib.Path:
    import torch

    import models

    torch.manual_seed(0)
    return models.save_checkpoint(models.build_model("rlfn_s", scale=2), path, role="student")


def print_backend_table(result: dict[str, Any]) -> None:
    """The comparison as a Markdown table."""
    print(f"\nBackends on {result['device']} ({result['threads'] or 'all'} threads), {result['weights']}; model-only: "
          "engine.upscale in-process (RGB8, conversions included); e2e: daemon round trip through shared memory")
    print("| backend | LR | frames | model ms (median) | model ms (p99) | e2e ms | fps (e2e) | speed-up vs eager fp32 "
          "| max diff (levels) | PSNR dB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        e2e = f"{r['e2e_ms']:.1f} | {r['fps']:.2f}" if "e2e_ms" in r else "- | -"
        psnr = "inf (identical)" if r["psnr"] is None else f"{r['psnr']:.1f}"
        name = f"{r['backend']} ({r['picked']})" if r.get("picked") else r["backend"]
        print(f"| {name} | {r['lr']} | {r['frames']} | {r['model_ms']:.1f} | {r['model_p99_ms']:.1f} | {e2e} "
              f"| {r['speedup']:.2f}x | {r['max_diff']} | {psnr} |")

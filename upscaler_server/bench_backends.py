"""Backend comparison for ``python -m upscaler_server.bench --backends ...``: backend x LR size.

Per backend label (``eager``, ``compile-bf16``, ``onnxruntime``, ``compile-fp16-pad8-graphs``, ...; the precision
defaults to the device's; a ``-padN`` suffix runs the network with its channels zero-padded to a multiple of N, a
``-graphs`` suffix (CUDA, eager and compile) replays one CUDA graph per resolution) and size:

- model-only: ``engine.upscale`` in-process on an RGB8 frame (uint8 conversion and colour order included, as the
  daemon calls it), median and p99 of the timed frames after one warm-up frame (compilation, autotuning);
- where that time goes, from the engine's own stage times (medians): compute (on CUDA the device time between CUDA
  events around the conversions and the network) and copies (host staging, and on CUDA the upload and download);
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
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from upscaler_server.config import CACHING_BACKENDS

__all__ = ["Variant", "compare_backends", "parse_label", "print_backend_table", "unavailable_here"]

_REFERENCE = "eager-fp32"
_BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt", "auto")


class Variant(NamedTuple):
    """One row label of the table: ``backend[-precision][-padN][-graphs]``."""

    backend: str
    precision: str
    pad: int  # channels zero-padded to a multiple of this (0: as trained)
    graphs: bool  # one CUDA graph per resolution (``--cuda-graphs``)

    @property
    def label(self) -> str:
        plain = (self.backend, self.precision) == ("auto", "auto")
        name = self.backend if plain else f"{self.backend}-{self.precision}"
        return name + (f"-pad{self.pad}" if self.pad else "") + ("-graphs" if self.graphs else "")


def parse_label(label: str, device: str) -> Variant:
    """``"compile-fp16-pad8-graphs"`` -> Variant("compile", "fp16", 8, True); the precision defaults to the device's.
    Raises ValueError for a label outside that grammar, and for ``-graphs`` where no CUDA graph can be captured (a
    CPU, or a backend that is not torch's). Whether the backend runs here is :func:`unavailable_here`'s question."""
    parts = label.split("-")
    graphs = len(parts) > 1 and parts[-1] == "graphs"
    if graphs:
        parts.pop()
    pad = int(parts.pop()[3:]) if len(parts) > 1 and parts[-1].startswith("pad") and parts[-1][3:].isdigit() else 0
    backend, precision = ("eager" if parts[0] == "torch" else parts[0]), "-".join(parts[1:])
    if backend not in _BACKENDS or precision not in ("", "fp32", "fp16", "bf16", *(("auto",) if backend == "auto"
                                                                                     else ())):
        raise ValueError(f"{label}: not a label of the form backend[-fp32|-fp16|-bf16][-padN][-graphs] with backend "
                         f"one of {', '.join(_BACKENDS)}")
    if graphs and (not device.startswith("cuda") or backend not in ("eager", "compile")):
        raise ValueError(f"{label}: -graphs needs CUDA and the eager or compile backend")
    if backend == "auto":
        return Variant(backend, precision or "auto", pad, graphs)
    default = "fp32" if backend == "onnxruntime" or device == "cpu" else "fp16"
    return Variant(backend, precision or default, pad, graphs)


def unavailable_here(variant: Variant, device: str) -> str | None:
    """Why ``variant`` cannot run on ``device`` (a package, a CPU feature, CUDA), or None."""
    from upscaler_server.backends import unavailable

    return None if variant.backend == "auto" else unavailable(variant.backend, device, variant.precision)


class _Sample(NamedTuple):
    """One timed frame, in ms: the whole ``engine.upscale`` call and the engine's own stage times."""

    total: float
    compute: float  # StageTimes.infer: on CUDA the on-device time (CUDA events), conversions included
    copies: float  # StageTimes.copy_in + copy_out: host staging and the PCIe upload and download on CUDA


def _time(engine: Any, frame: np.ndarray, out: np.ndarray, frames: int, budget_s: float) -> list[_Sample]:
    from upscaler_server.protocol import PIXEL_FORMATS

    rgb = PIXEL_FORMATS["RGB8"]
    samples: list[_Sample] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < frames and (len(samples) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        stages = engine.upscale(frame, rgb, out)
        total = time.perf_counter() - start
        samples.append(_Sample(total * 1e3, stages.infer * 1e3, (stages.copy_in + stages.copy_out) * 1e3))
    return samples


def _model_rows(variants: Sequence[Variant], sizes: Sequence[tuple[int, int]], checkpoint: pathlib.Path,
                device: str, threads: int, frames: int, budget_s: float,
                cache_dir: pathlib.Path | None) -> list[dict[str, Any]]:
    """Model-only rows, ``variants[0]`` being fp32 eager: the reference of every speed-up."""
    from upscaler_server.backends.auto import accuracy
    from upscaler_server.engine import create_engine

    rng = np.random.default_rng(3)
    inputs = {s: rng.integers(0, 256, (s[1], s[0], 3), dtype=np.uint8) for s in sizes}
    rows: list[dict[str, Any]] = []
    expected: dict[tuple[int, int], np.ndarray] = {}
    for variant in variants:
        engine = create_engine(checkpoint=checkpoint, backend=variant.backend, device=device,
                               precision=variant.precision, threads=threads, cache_dir=_cache_for(variant, cache_dir),
                               pad_channels=variant.pad, cuda_graphs=variant.graphs)
        if variant.label == _REFERENCE:  # variants[0]: its frames are what every row is compared with
            expected = {s: engine.run(inputs[s]) for s in sizes}
        for (w, h), frame in inputs.items():
            out = engine.run(frame)  # warm-up: compilation, autotuning, ONNX export, graph capture
            max_diff, psnr = accuracy(expected[w, h], out)
            samples = _time(engine, frame, out, frames, budget_s)
            total = [s.total for s in samples]
            picked = getattr(engine, "choices", {}).get((h, w), "")  # what auto chose for this size
            rows.append({"backend": variant.label, "picked": picked, "lr": f"{w}x{h}", "frames": len(samples),
                         "model_ms": float(np.median(total)), "model_p99_ms": float(np.percentile(total, 99)),
                         "compute_ms": float(np.median([s.compute for s in samples])),
                         "copies_ms": float(np.median([s.copies for s in samples])),
                         "max_diff": max_diff, "psnr": None if math.isinf(psnr) else psnr})
            print(_progress_line(rows[-1]), file=sys.stderr, flush=True)  # a crash later keeps what was measured
        engine.close()
    base: dict[str, float] = {r["lr"]: r["model_ms"] for r in rows if r["backend"] == _REFERENCE}
    for r in rows:
        r["speedup"] = base[r["lr"]] / r["model_ms"]
    return rows


def _progress_line(row: dict[str, Any]) -> str:
    """One model-only row as a sentence, while the others are still measured (a dict's repr was printed)."""
    name = f"{row['backend']} (auto picked {row['picked']})" if row["picked"] else row["backend"]
    psnr = "identical" if row["psnr"] is None else f"{row['psnr']:.1f} dB PSNR"
    return (f"measured {name} at LR {row['lr']}: {row['model_ms']:.1f} ms median, {row['model_p99_ms']:.1f} ms p99 "
            f"over {row['frames']} frames; against fp32 eager: max diff {row['max_diff']} levels, {psnr}")


def _daemon_args(variant: Variant, checkpoint: pathlib.Path, device: str, threads: int,
                 cache_dir: pathlib.Path | None) -> list[str]:
    """The daemon command line that runs ``variant`` (the end-to-end column)."""
    args = ["--checkpoint", str(checkpoint), "--backend", variant.backend, "--precision", variant.precision,
            "--device", device.partition(":")[0], "--threads", str(threads), "--pad-channels", str(variant.pad)]
    args += ["--cuda-graphs"] if variant.graphs else []
    cache = _cache_for(variant, cache_dir)
    return args + (["--cache-dir", str(cache)] if cache is not None else [])


def _cache_for(variant: Variant, cache_dir: pathlib.Path | None) -> pathlib.Path | None:
    """``cache_dir`` for a backend that keeps files there; None for the others, which refuse one."""
    return cache_dir if variant.backend in CACHING_BACKENDS else None


def compare_backends(variants: Sequence[Variant], sizes: Sequence[tuple[int, int]], *,
                     checkpoint: pathlib.Path | None, device: str, threads: int, frames: int, budget_s: float,
                     e2e_sizes: Sequence[tuple[int, int]], cache_dir: pathlib.Path | None) -> dict[str, Any]:
    """Rows (dicts) of the comparison of ``variants`` (see :func:`parse_label`) on the resolved ``device``;
    end-to-end fields only for ``e2e_sizes``."""
    from upscaler_server.bench import bench_folder, end_to_end

    # fp32 eager first (every speed-up is over it), then each other variant once, in the order given
    variants = list({v.label: v for v in [parse_label(_REFERENCE, device), *variants]}.values())
    tmp = bench_folder()  # a killed benchmark's is removed by the next one
    try:
        weights = f"checkpoint {checkpoint}" if checkpoint else "random-init rlfn_s, seed 0 (same cost as trained)"
        checkpoint = checkpoint or _random_student(tmp / "rlfn_s_random.safetensors")
        rows = _model_rows(variants, sizes, checkpoint, device, threads, frames, budget_s, cache_dir)
        for variant in variants if e2e_sizes else ():
            _, e2e = end_to_end(e2e_sizes, frames, budget_s, _daemon_args(variant, checkpoint, device, threads,
                                                                          cache_dir))
            for r in rows:
                match = [e for e in e2e if e["lr"] == r["lr"]]
                if r["backend"] == variant.label and match:
                    r.update(e2e_ms=match[0]["p50_ms"], e2e_frames=match[0]["frames"], fps=1e3 / match[0]["p50_ms"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
    print("| backend | LR | frames | model ms (median) | model ms (p99) | of which compute | of which copies | e2e ms "
          "| fps (e2e) | speed-up vs eager fp32 | max diff (levels) | PSNR dB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        e2e = f"{r['e2e_ms']:.1f} | {r['fps']:.2f}" if "e2e_ms" in r else "- | -"
        psnr = "inf (identical)" if r["psnr"] is None else f"{r['psnr']:.1f}"
        name = f"{r['backend']} ({r['picked']})" if r.get("picked") else r["backend"]
        print(f"| {name} | {r['lr']} | {r['frames']} | {r['model_ms']:.1f} | {r['model_p99_ms']:.1f} "
              f"| {r['compute_ms']:.2f} | {r['copies_ms']:.2f} | {e2e} | {r['speedup']:.2f}x | {r['max_diff']} "
              f"| {psnr} |")

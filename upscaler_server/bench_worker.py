"""One backend of ``bench --backends`` in a process of its own: ``python -m upscaler_server.bench_worker SETTINGS``.

Why a process each: in one process, onnxruntime's memory arena (2.6 GB held after a 1280x720 frame) made torch's fp32
eager frames next to it 1.5-2.8x slower, an interference no daemon has (it runs one backend). The benchmark keeps one
worker per backend alive and asks them in turn (:mod:`upscaler_server.bench_backends`).

SETTINGS is a JSON object of :func:`upscaler_server.engine.create_engine` keywords (paths as strings). The worker
answers ``{"ready": true}`` once its engine is built, then reads one JSON command per line on stdin and answers each
with one JSON line on stdout:

- ``{"warm": PATH_IN, "out": PATH_OUT}``: upscale the (H, W, 3) uint8 ``.npy`` frame at PATH_IN once (compilation,
  autotuning, ONNX export, graph capture happen here), write the result to PATH_OUT (``.npy``) and answer
  ``{"picked": LABEL}`` (what ``auto`` chose for that size, else ``""``);
- ``{"time": PATH_IN, "frames": N, "budget_s": S}``: upscale that frame up to N times (at least once, no more once S
  seconds have passed) and answer ``{"samples": [[total_ms, compute_ms, copies_ms], ...]}``.

Any failure is answered ``{"error": "..."}``; end of input closes the engine and ends the process.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import time
from typing import Any, TextIO

import numpy as np

_PATH_KEYS = ("checkpoint", "cache_dir")


def _answer(channel: TextIO, reply: dict[str, Any]) -> None:
    channel.write(json.dumps(reply) + "\n")
    channel.flush()


def _timed(engine: Any, frame: np.ndarray, frames: int, budget_s: float) -> list[list[float]]:
    """Up to ``frames`` timed frames, at least one, no more once ``budget_s`` has passed: [total, compute, copies]
    ms each, compute and copies from the engine's own stage times."""
    from upscaler_server.protocol import PIXEL_FORMATS

    rgb = PIXEL_FORMATS["RGB8"]
    out = np.empty(engine.output_shape(frame.shape[0], frame.shape[1], rgb), np.uint8)
    samples: list[list[float]] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < frames and (not samples or time.perf_counter() < deadline):
        start = time.perf_counter()
        stages = engine.upscale(frame, rgb, out)
        total = time.perf_counter() - start
        samples.append([total * 1e3, stages.infer * 1e3, (stages.copy_in + stages.copy_out) * 1e3])
    return samples


def _serve(engine: Any, commands: TextIO, answers: TextIO) -> None:
    """Answer the parent's commands until its end of input (see the module docstring)."""
    frames: dict[str, np.ndarray] = {}  # input path -> frame: loaded once
    for line in commands:
        try:
            command = json.loads(line)
            path = command["warm"] if "warm" in command else command["time"]
            frame = frames.setdefault(path, np.load(path, allow_pickle=False))
            if "warm" in command:
                np.save(command["out"], engine.run(frame), allow_pickle=False)
                picked = getattr(engine, "choices", {}).get(frame.shape[:2], "")
                _answer(answers, {"picked": picked})
            else:
                _answer(answers, {"samples": _timed(engine, frame, int(command["frames"]), float(command["budget_s"]))})
        except Exception as exc:  # any failure goes back to the parent, which says which backend failed
            _answer(answers, {"error": f"{type(exc).__name__}: {exc}"})


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops, closing stdin
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # the replies' own channel: what libraries print on
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stdout (compilers, exporters) goes to stderr instead
    from upscaler_server.engine import create_engine

    settings = json.loads(argv[0])
    settings.update({key: pathlib.Path(settings[key]) for key in _PATH_KEYS if settings.get(key) is not None})
    try:
        engine = create_engine(**settings)
    except Exception as exc:  # told to the parent, which names the backend
        _answer(answers, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _answer(answers, {"ready": True})
    try:
        _serve(engine, sys.stdin, answers)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""training/report.py and training/latency.py on awkward inputs: a stage killed mid-line, a model scored in one set
only, a perfect (infinite PSNR) score, a checkpoint without a final loss; p90 of few timings."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from training import latency
from training.report import write_report


def _metrics(psnr: float) -> dict[str, float]:
    return {"psnr_rgb": psnr, "ssim_rgb": 0.9, "psnr_y": psnr, "ssim_y": 0.9}


def _set(scores: dict[str, float]) -> dict:
    return {"images": ["a"], "scores": {n: {"per_image": {"a": _metrics(v)}, "mean": _metrics(v)}
                                         for n, v in scores.items()}}  # fmt: skip


def test_report_survives_partial_logs_uneven_sets_infinite_scores_and_missing_losses(tmp_path: Path) -> None:
    (tmp_path / "teacher").mkdir()
    lines = [json.dumps({"step": 1, "total": 0.5}), json.dumps({"step": 2, "total": 0.4}), '{"step": 3, "tot']
    (tmp_path / "teacher" / "metrics.jsonl").write_text("\n".join(lines))  # the last line cut by a kill
    results = {
        "scale": 2,
        "sets": {"one": _set({"bicubic": 30.0, "TAKDSR": math.inf}), "two": _set({"bicubic": 28.0, "TA": 31.0})},
        "models": {"TAKDSR": {"params": 10, "macs": 1e9, "training": {"steps": 2, "final_loss": None}},
                   "TA": {"params": 20, "macs": 2e9, "training": {"steps": 2, "final_loss": 0.25}}},
    }  # fmt: skip
    report = write_report(tmp_path, results).read_text()
    assert "| TAKDSR | 2 | None | None | None | - | - |" in report and "| 0.25000 |" in report
    for plot in ("loss_curves.png", "psnr_per_model.png"):
        assert (tmp_path / plot).stat().st_size > 1000


def test_p90_stays_within_the_measured_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three passes of 10, 10 and 20 ms: p90 interpolates (18 ms), it does not extrapolate past 20 ms (26 ms)."""
    clock = iter([0.0, 0.010, 1.0, 1.010, 2.0, 2.020])  # (start, end) of each timed pass, in seconds
    monkeypatch.setattr(latency.time, "perf_counter", lambda: next(clock))

    class Identity:
        def to(self, *args: object, **kwargs: object) -> Identity:
            return self

        def eval(self) -> Identity:
            return self

        def __call__(self, x: object) -> object:
            return x

    timing = latency.measure_latency(Identity(), 4, 4, latency.torch.device("cpu"), repeats=3, warmup=0)
    assert timing["median_ms"] == pytest.approx(10.0) and timing["p90_ms"] == pytest.approx(18.0)
    assert timing["p90_ms"] == pytest.approx(statistics.quantiles([10, 10, 20], n=10, method="inclusive")[-1])

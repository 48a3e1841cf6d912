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
        "report_lr_size": [960, 540],
        "sets": {"one": _set({"bicubic": 30.0, "TAKDSR": math.inf}), "two": _set({"bicubic": 28.0, "TA": 31.0})},
        "models": {"TAKDSR": {"params": 10, "macs": 1e9, "training": {"steps": 2, "final_loss": None}},
                   "TA": {"params": 20, "macs": 2e9, "training": {"steps": 2, "final_loss": 0.25},
                          "latency": {"median_ms": 12.4, "device": "cpu", "threads": 2}}},
    }  # fmt: skip
    report = write_report(tmp_path, results).read_text()
    assert "| TAKDSR | 2 | None | None | None | - | - |" in report and "| 0.25000 | 12 (cpu, 2 threads) |" in report
    for plot in ("loss_curves.png", "psnr_per_model.png"):
        assert (tmp_path / plot).stat().st_size > 1000


def test_captions_name_the_sizes_the_numbers_were_taken_at(tmp_path: Path) -> None:
    """They said "960x540 LR" and "the teacher's 1920x1080 HR input" whatever the scale: at x4 the teacher's MACs
    were counted at 3840x2160."""
    results = {"scale": 4, "report_lr_size": [960, 540], "sets": {"one": _set({"bicubic": 30.0})}, "models": {}}
    report = write_report(tmp_path, results).read_text()
    assert report.startswith(f"# Results: {tmp_path.name} (x4)\n")  # a results.json without its family
    assert write_report(tmp_path, {**results, "family": "pan"}).read_text().startswith(
        f"# Results: {tmp_path.name} (pan x4)\n")  # the title said x4 alone, whatever the backbone (a review)
    report = write_report(tmp_path, results).read_text()
    assert "inference ms (median; 960x540 LR, teachers 3840x2160 HR)" in report
    assert "the teachers' for their 3840x2160 HR input" in report and "1920x1080" not in report


def test_latency_is_taken_on_a_stated_thread_count_and_puts_torchs_back() -> None:
    """The pipeline timed with whatever thread count training had left in the process (1 after training a stage
    with runtime.threads=1, all cores in an evaluation-only rerun) and recorded only the device."""
    before = latency.torch.get_num_threads()
    timing = latency.measure_latency(latency.torch.nn.Conv2d(3, 3, 3), 8, 8, latency.torch.device("cpu"), repeats=1,
                                     threads=1)
    assert timing["threads"] == 1 and timing["device"] == "cpu" and latency.torch.get_num_threads() == before
    assert latency.measure_latency(latency.torch.nn.Conv2d(3, 3, 3), 8, 8, latency.torch.device("cpu"),
                                   repeats=1)["threads"] == latency.usable_cores()


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

"""report.md and the plots of a pipeline run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from training.data.images import write_bytes_atomic, write_text_atomic

__all__ = ["REPORT_LR_SIZE", "latency_where", "write_report"]

MODEL_ORDER = ["bicubic", "lanczos", "X_s", "PISR'", "TAKDSR", "TA", "full backbone", "teacher (continuous)",
               "teacher"]


REPORT_LR_SIZE = (960, 540)  # MACs and latency are reported at this LR input size, as in docs/results.md


def write_report(run_dir: Path, results: dict[str, Any]) -> Path:
    """report.md (the paper-style tables) plus loss_curves.png, psnr_per_model.png, crops_<set>.png."""
    run_dir = Path(run_dir)
    _plot_losses(run_dir)
    _plot_psnr(run_dir, results)
    for set_name, crops in results.get("crops", {}).items():
        if crops.get("GT"):
            _plot_crops(run_dir / f"crops_{set_name}.png", crops)
    path = run_dir / "report.md"
    write_text_atomic(path, _markdown(run_dir, results))  # image names from a user's folder may not be UTF-8
    return path


PER_IMAGE_METRICS = (("psnr_rgb", "PSNR RGB", 2), ("ssim_rgb", "SSIM RGB", 4), ("psnr_y", "PSNR Y", 2),
                     ("ssim_y", "SSIM Y", 4))  # fmt: skip


def _ordered(names: list[str]) -> list[str]:
    """Smallest model first: the baselines, the students, the TAs from the last (TA3, TA2) up to TA, the teachers;
    names the table does not know go last."""

    def rank(name: str) -> tuple[int, int, str]:
        if re.fullmatch(r"TA\d+", name):
            return MODEL_ORDER.index("TA"), -int(name[2:]), name
        return (MODEL_ORDER.index(name), 0, name) if name in MODEL_ORDER else (len(MODEL_ORDER), 0, name)

    return sorted(names, key=rank)


def _markdown(run_dir: Path, results: dict[str, Any]) -> str:
    family = results.get("family")  # results.json written before it was recorded: the scale alone
    lines = [f"# Results: {run_dir.name} ({family + ' ' if family else ''}x{results['scale']})", ""]
    models = results.get("models", {})
    width, height = results["report_lr_size"]
    for set_name, data in results["sets"].items():
        scores = data["scores"]
        lines += [f"## {set_name} ({len(data['images'])} images)", ""]
        lines += [f"| model | params | MACs (G) at {width}x{height} | PSNR RGB | SSIM RGB | PSNR Y | SSIM Y |",
                  "|---" * 7 + "|"]
        for name in _ordered(list(scores)):
            mean, info = scores[name]["mean"], models.get(name, {})
            params = f"{info['params']:,}" if info else "-"
            macs = f"{info['macs'] / 1e9:.2f}" if info else "-"
            lines.append(
                f"| {name} | {params} | {macs} | {mean['psnr_rgb']:.2f} | {mean['ssim_rgb']:.4f} "
                f"| {mean['psnr_y']:.2f} | {mean['ssim_y']:.4f} |"
            )
        names = _ordered(list(scores))
        for metric, label, digits in PER_IMAGE_METRICS:
            lines += ["", f"{label} per image:", ""]
            lines += ["| image | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            for image in data["images"]:
                row = [f"{scores[n]['per_image'][image][metric]:.{digits}f}" for n in names]
                lines.append(f"| {image} | " + " | ".join(row) + " |")
        lines.append("")
    scale = results["scale"]
    hr_size = f"{width * scale}x{height * scale}"
    header = (f"| model | steps | batch | device | seconds | final loss | inference ms (median; {width}x{height} LR, "
              f"teachers {hr_size} HR) |")
    lines += ["## Training and inference time", "", header, "|---" * 7 + "|"]
    for name in _ordered(list(models)):
        t, latency = models[name].get("training", {}), models[name].get("latency")
        timing = f"{latency['median_ms']:.0f} ({latency_where(latency)})" if latency else "-"
        final_loss = t.get("final_loss")  # None for a checkpoint exported from a saved state
        loss = f"{final_loss:.5f}" if final_loss is not None else "-"
        lines.append(f"| {name} | {t.get('steps')} | {t.get('batch_size')} | {t.get('device')} "
                     f"| {t.get('seconds')} | {loss} | {timing} |")
    lines += ["", f"MACs at a {width}x{height} LR input; the teachers' for their {hr_size} HR input. Plots: "
              "loss_curves.png, psnr_per_model.png,",
              "crops_<set>.png (bicubic / X_s / PISR' / TAKDSR / TA / teacher / ground truth).", ""]
    return "\n".join(lines)


def latency_where(latency: dict[str, Any]) -> str:
    """Where a latency was measured: the device, and on a CPU the torch threads."""
    threads = latency.get("threads")
    return f"{latency['device']}, {threads} threads" if threads else latency["device"]


def _plot_losses(run_dir: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for metrics in sorted(run_dir.glob("*/metrics.jsonl")):
        records = _loss_records(metrics)
        if records:
            ax.plot([r["step"] for r in records], [r["total"] for r in records], label=metrics.parent.name)
    ax.set(xlabel="step", ylabel="total loss", yscale="log", title="training loss per stage")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, run_dir / "loss_curves.png")


def _loss_records(path: Path) -> list[dict[str, Any]]:
    """The step/total records of a stage's metrics.jsonl; a line cut short by a killed stage is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record and "total" in record:
            records.append(record)
    return records


def _plot_psnr(run_dir: Path, results: dict[str, Any]) -> None:
    sets = list(results["sets"])
    names = _ordered(list({n: None for s in sets for n in results["sets"][s]["scores"]}))  # every set's models
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(sets))
    all_values = []
    for index, set_name in enumerate(sets):
        scores = results["sets"][set_name]["scores"]
        values = [scores[n]["mean"]["psnr_rgb"] if n in scores else math.nan for n in names]  # not scored: no bar
        values = [v if math.isfinite(v) else math.nan for v in values]  # identical images score inf: no bar either
        ax.bar(np.arange(len(names)) + index * width, values, width, label=set_name)
        all_values += [v for v in values if math.isfinite(v)]
    ax.set_xticks(np.arange(len(names)) + width * (len(sets) - 1) / 2, names, rotation=20, fontsize=8)
    if all_values:
        ax.set_ylim(min(all_values) - 1, max(all_values) + 0.5)
    ax.set(ylabel="mean PSNR RGB (dB)", title="PSNR per model")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, run_dir / "psnr_per_model.png")


def _plot_crops(path: Path, crops: dict[str, list[np.ndarray]]) -> None:
    columns = [n for n in ["bicubic", "X_s", "PISR'", "TAKDSR", "TA", "teacher"] if crops.get(n)] + ["GT"]
    rows = len(crops["GT"])
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.9 * len(columns), 1.9 * rows), squeeze=False)
    for row in range(rows):
        for col, name in enumerate(columns):
            axes[row][col].imshow(crops[name][row], interpolation="nearest")
            axes[row][col].set_xticks([])
            axes[row][col].set_yticks([])
            if row == 0:
                axes[row][col].set_title(name, fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG whole or not at all (a full disk left a cut crops_*.png that no viewer opens), and
    close it."""
    encoded = io.BytesIO()
    try:
        fig.savefig(encoded, format="png", dpi=110)
    finally:
        plt.close(fig)
    write_bytes_atomic(path, encoded.getvalue())

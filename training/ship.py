"""`python -m training ship RUN_DIR --out models/weights`: copy a pipeline run's checkpoints into the
bundled-weights folder, with the run's evaluation scores merged into each file's metadata, and
write weights.json (what each file is, how it was trained, what it scores)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models import load_checkpoint, save_checkpoint
from training.trainer import FINAL_FILE

__all__ = ["SHIPPED", "ship_run"]

# pipeline stage -> (file name stem in models/weights, the name used in reports)
SHIPPED = {
    "student_takdsr": ("s_takdsr", "TAKDSR"),
    "ta1": ("ta_takdsr", "TA"),
    "teacher": ("teacher_takdsr", "teacher"),
    "student_pisr": ("s_pisr", "PISR'"),
    "student_alone": ("s_alone", "X_s"),
}


def ship_run(run_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write the shipped checkpoints and weights.json; returns the index written."""
    results = json.loads((run_dir / "results.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {}
    for stage, (stem, display) in SHIPPED.items():
        source = run_dir / stage / FINAL_FILE
        checkpoint = load_checkpoint(source)
        metadata = checkpoint.metadata
        family = metadata["arch"].split("_")[0]  # "rlfn_teacher" -> "rlfn"
        name = f"{family}_{stem}_x{metadata['scale']}.safetensors"
        scores = {set_name: data["scores"][display]["mean"] for set_name, data in results["sets"].items()}
        training = {**metadata["training"], "metrics": scores, "run": run_dir.name}
        save_checkpoint(checkpoint.model, out_dir / name, role=metadata["role"], training=training)
        index[name] = {
            "stage": stage,
            "report_name": display,
            "role": metadata["role"],
            "arch": metadata["arch"],
            "arch_args": metadata["arch_args"],
            "params": results["models"][display]["params"],
            "macs_960x540": results["models"][display]["macs"],
            "training": {k: training.get(k) for k in ("steps", "batch_size", "device", "seconds", "mix", "init_from")},
            "metrics": scores,
            "bicubic": {set_name: data["scores"]["bicubic"]["mean"] for set_name, data in results["sets"].items()},
            "latency": results["models"][display].get("latency"),
        }
    (out_dir / "weights.json").write_text(json.dumps(index, indent=2) + "\n")
    return index

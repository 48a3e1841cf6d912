"""`python -m training ship RUN_DIR --out models/weights`: copy a pipeline run's checkpoints into the
bundled-weights folder, with the run's evaluation scores merged into each file's metadata, and
update weights.json (what each file is, how it was trained, what it scores).

`python -m training ship-checkpoint FILE --name NAME --scores SCORES.json` does the same for one
checkpoint trained outside a pipeline (e.g. the native-LR student), with the scores written by
`python -m training evaluate --json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models import count_macs, count_parameters, load_checkpoint, save_checkpoint
from training.trainer import FINAL_FILE

__all__ = ["SHIPPED", "lr_kinds", "ship_checkpoint", "ship_run"]

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
    index = _read_index(out_dir)
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
            "lr_kinds": lr_kinds(training["config"]),
        }
    (out_dir / "weights.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def ship_checkpoint(path: Path, name: str, report_name: str, scores_path: Path, out_dir: Path) -> dict[str, Any]:
    """Ship one checkpoint as `out_dir/name.safetensors` with the scores of its label in `scores_path`
    (`python -m training evaluate --json`: {set: {label: {"mean": ...}}}); returns its weights.json entry."""
    checkpoint = load_checkpoint(path)
    metadata = checkpoint.metadata
    all_scores = json.loads(scores_path.read_text())
    label = path.stem
    missing = [set_name for set_name, scores in all_scores.items() if label not in scores]
    if missing or not all_scores:
        raise ValueError(f"{scores_path} has no scores for {label!r} in {missing or 'any set'}")
    scores = {set_name: scores[label]["mean"] for set_name, scores in all_scores.items()}
    training = {**metadata["training"], "metrics": scores, "run": path.parent.name}
    file_name = f"{name}.safetensors"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint.model, out_dir / file_name, role=metadata["role"], training=training)
    index = _read_index(out_dir)
    model = checkpoint.model
    index[file_name] = {
        "stage": training.get("stage"),
        "report_name": report_name,
        "role": metadata["role"],
        "arch": metadata["arch"],
        "arch_args": metadata["arch_args"],
        "params": count_parameters(model),
        "macs_960x540": count_macs(model, 540, 960),
        "training": {k: training.get(k) for k in ("steps", "batch_size", "device", "seconds", "mix", "init_from")},
        "metrics": scores,
        "bicubic": {set_name: scores["bicubic"]["mean"] for set_name, scores in all_scores.items()},
        "latency": None,
        "lr_kinds": lr_kinds(training["config"]),
    }
    (out_dir / "weights.json").write_text(json.dumps(index, indent=2) + "\n")
    return index[file_name]


def lr_kinds(config: dict[str, Any]) -> list[str]:
    """The kinds of LR a checkpoint was trained on ("bicubic", "native"), from its saved training config."""
    sources = config.get("data", {}).get("sources", [])
    return sorted({source.get("lr_kind", "bicubic") for source in sources})


def _read_index(out_dir: Path) -> dict[str, Any]:
    index_path = out_dir / "weights.json"
    return json.loads(index_path.read_text()) if index_path.exists() else {}

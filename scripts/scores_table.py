"""Print a markdown table of mean scores from `python -m training evaluate --json` files, or from a pipeline
run's results.json (its models are labelled `<run folder>/<model>`, e.g. `rfdn/TAKDSR`).

    python scripts/scores_table.py SCORES.json [MORE.json ...] [--rows label=Name,label2=Name2,...] [--plot FILE]
                                   [--info] [--versus LABEL_A LABEL_B ...]

One row per model (bicubic, Lanczos and every checkpoint label, or the --rows chosen, in that order),
one column per evaluation set: PSNR RGB / SSIM RGB / PSNR Y / SSIM Y of the mean over its images.
--plot also draws the rows' mean PSNR RGB as bars, one panel per set, against the first row.
--info adds what a results.json knows of each model: parameters, MACs at 960x540 LR input, training steps and
seconds, and the inference time the evaluation measured (median ms at 960x540 on its device).
--versus A B (repeatable) adds a per-image comparison of two models on every set that scores both: the mean over
their common images of A's PSNR RGB minus B's, and on how many of those images A is ahead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from training.evaluate import check_output_file
from training.report import latency_where

METRICS = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y")


BASELINES = ("bicubic", "lanczos")
SAME_BASELINE_DB = 0.005  # the baselines of one set scored twice: equal but for float rounding across machines


def merged_scores(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """{set: {label: {"mean": ..., "per_image": ...}}} over several files; a label scored twice on one set is an
    error, and so are files whose baselines differ on a set (they scored other images: _refuse_other_images)."""
    merged: dict[str, dict[str, Any]] = {}
    found_in: dict[tuple[str, str], Path] = {}
    for path in paths:
        for set_name, by_label in _scores_by_set(path).items():
            for label, result in by_label.items():
                known = merged.setdefault(set_name, {})
                if label in known and label not in BASELINES:
                    raise ValueError(_scored_twice(label, set_name, found_in[set_name, label], path))
                if label in known:  # the baselines repeat in every file: the same, or the images were not
                    _refuse_other_images(set_name, label, known[label], result, found_in[set_name, label], path)
                known[label] = result
                found_in[set_name, label] = path
    return merged


def _refuse_other_images(set_name: str, label: str, first: dict[str, Any], second: dict[str, Any], first_path: Path,
                         second_path: Path) -> None:
    """ValueError when two files' scores of a baseline on one set differ: they scored other images under the set's
    name (a cut-down evaluation, such as a smoke run's crops of 2 images, another folder, or another scale), and a
    table of both showed one file's baselines beside the other's models, and --versus paired 96 px crops with whole
    frames of the same name."""
    first_db, second_db = first["mean"]["psnr_rgb"], second["mean"]["psnr_rgb"]
    same_names = set(first.get("per_image") or {}) == set(second.get("per_image") or {})
    if same_names and abs(first_db - second_db) <= SAME_BASELINE_DB:
        return
    raise ValueError(f"{first_path} and {second_path} scored other images as {set_name!r}: {label} scores "
                     f"{first_db:.2f} dB in one and {second_db:.2f} dB in the other (a cut-down evaluation, such as a "
                     "smoke run's crops, another folder or another scale); compare scores of the same images: "
                     "evaluate the checkpoints together, or each on the same --sets/--data without crops")


def _scored_twice(label: str, set_name: str, first: Path, second: Path) -> str:
    if first.resolve() == second.resolve():
        return f"{label!r} is scored twice on {set_name}: {second} is given twice"
    # `evaluate` labels a checkpoint evaluated alone by its file name: every run's final.safetensors is `final`
    return (f"{label!r} is scored twice on {set_name}, in {first} and in {second}: to tell two checkpoints apart, "
            "evaluate them together (one `python -m training evaluate` labels them by their folders, a/final and "
            "b/final) or give them different file (or, for a results.json, run folder) names")


def merged_info(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """{label: the model's entry in "models"} of every results.json among `paths` (labels as in merged_scores)."""
    info: dict[str, dict[str, Any]] = {}
    for path in paths:
        for display, entry in _read_json(path).get("models", {}).items():
            info[f"{path.parent.name}/{display}"] = entry
    return info


def _read_json(path: Path) -> Any:
    """The file's JSON, with a null PSNR read as infinite: evaluate writes an image reproduced exactly so (a mean
    over images including one is infinite too), as JSON has no Infinity."""
    try:
        return json.loads(path.read_text(), object_hook=_null_psnr_as_infinite)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ValueError(f"{path} is not a JSON file ({exc})") from None


def _null_psnr_as_infinite(obj: dict[str, Any]) -> dict[str, Any]:
    return {key: math.inf if value is None and key.startswith("psnr") else value for key, value in obj.items()}


def _scores_by_set(path: Path) -> dict[str, dict[str, Any]]:
    """{set: {label: {"mean": ...}}}: an evaluate --json file as it is, a results.json with run-prefixed labels.
    ValueError for a file that is neither, or holds no scores (a table of nothing would look like a result)."""
    data = _read_json(path)
    if isinstance(data, dict) and "sets" in data and "models" in data:  # a pipeline's results.json
        sets = data["sets"]
        if not isinstance(sets, dict) or not all(isinstance(results, dict) and isinstance(results.get("scores"), dict)
                                                 for results in sets.values()):  # fmt: skip
            raise ValueError(f'{path}: a results.json ("sets" and "models") whose sets hold no "scores"')
        data = {
            set_name: {label if label in BASELINES else f"{path.parent.name}/{label}": result
                       for label, result in results["scores"].items()}
            for set_name, results in sets.items()
        }  # fmt: skip
    problem = _layout_problem(data)
    if problem:
        raise ValueError(f"{path} is neither `python -m training evaluate --json` output nor a pipeline's "
                         f"results.json: {problem}")
    if not any(data.values()):
        raise ValueError(f"{path} holds no scores")
    return data


def _layout_problem(data: Any) -> str | None:
    """What keeps `data` from being {set: {label: {"mean": {metric: number}}}}, or None."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object of evaluation sets"
    for set_name, by_label in data.items():
        if not isinstance(by_label, dict):
            return f"{set_name!r} is not an object of scored models"
        for label, result in by_label.items():
            mean = result.get("mean") if isinstance(result, dict) else None
            if not isinstance(mean, dict) or not all(isinstance(mean.get(key), (int, float)) for key in METRICS):
                return f"{label!r} on {set_name!r} has no mean {', '.join(METRICS)}"
    return None


INFO_COLUMNS = ("params", "GMACs", "steps", "train s", "ms at 960x540")


def table(scores: dict[str, dict[str, Any]], rows: list[tuple[str, str]],
          info: dict[str, dict[str, Any]] | None = None) -> str:  # fmt: skip
    sets = list(scores)
    columns = [*(INFO_COLUMNS if info is not None else ()), *sets]
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, name in rows:
        cells = [_cell(scores[set_name].get(label, {}).get("mean")) for set_name in sets]
        if info is not None:
            cells = [*_info_cells(info.get(label)), *cells]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _info_cells(entry: dict[str, Any] | None) -> list[str]:
    if entry is None:  # bicubic, Lanczos, or a label from an evaluate --json file
        return ["-"] * len(INFO_COLUMNS)
    training, latency = entry.get("training", {}), entry.get("latency")
    return [
        f"{entry['params']:,}",
        f"{entry['macs'] / 1e9:.1f}",
        f"{training.get('steps', '-')}",
        f"{training['seconds']:.0f}" if training.get("seconds") is not None else "-",
        f"{latency['median_ms']:.0f} ({latency_where(latency)})" if latency else "-",
    ]


def _cell(mean: dict[str, float] | None) -> str:
    if mean is None:
        return "-"
    return " / ".join(f"{mean[k]:.2f}" if k.startswith("psnr") else f"{mean[k]:.4f}" for k in METRICS)


def _rows(text: str | None, scores: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    if text is None:
        labels = list(dict.fromkeys(label for by_label in scores.values() for label in by_label))
        return [(label, label) for label in labels]
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if not pairs:
        raise ValueError(f"--rows {text!r} names no model")
    _check_labels([label for label, *_ in pairs], scores)
    return [(label, rest[0] if rest else label) for label, *rest in pairs]


def versus(scores: dict[str, dict[str, Any]], pairs: list[tuple[str, str]]) -> str:
    """A table of A minus B in PSNR RGB, image by image, for each pair (A, B) on every set that scores both.
    ValueError for a label with no scores, a pair no set scores both of, or no per-image scores in common."""
    lines = ["| A | B | set | A minus B, PSNR RGB (mean over images) | A ahead on |", "|---|---|---|---|---|"]
    for first, second in pairs:
        _check_labels([first, second], scores)
        shared_sets = [name for name, by_label in scores.items() if first in by_label and second in by_label]
        if not shared_sets:
            raise ValueError(f"--versus {first} {second}: no evaluation set scores both")
        for set_name in shared_sets:
            psnr_a = _per_image_psnr(scores[set_name][first], first, set_name)
            psnr_b = _per_image_psnr(scores[set_name][second], second, set_name)
            images = [name for name in psnr_a if name in psnr_b]
            if not images:
                raise ValueError(f"--versus {first} {second}: no per-image scores of both on {set_name}")
            differences = [psnr_a[name] - psnr_b[name] for name in images]
            ahead = sum(difference > 0 for difference in differences)
            lines.append(f"| {first} | {second} | {set_name} | {sum(differences) / len(differences):+.3f} dB | "
                         f"{ahead} of {len(images)} |")
    return "\n".join(lines)


def _per_image_psnr(result: dict[str, Any], label: str, set_name: str) -> dict[str, float]:
    """{image: PSNR RGB} of one model on one set ({} when the file has no per-image scores); ValueError for
    per-image scores without a number where PSNR RGB should be."""
    per_image = result.get("per_image") or {}
    if not isinstance(per_image, dict):
        raise ValueError(f"{label!r} on {set_name!r}: per_image is not an object of images")
    psnr = {name: image.get("psnr_rgb") if isinstance(image, dict) else None for name, image in per_image.items()}
    broken = [name for name, value in psnr.items() if not isinstance(value, (int, float))]
    if broken:
        raise ValueError(f"{label!r} on {set_name!r} has per-image scores without a PSNR RGB: {broken[:3]}")
    return psnr


def _check_labels(labels: list[str], scores: dict[str, dict[str, Any]]) -> None:
    unknown = [label for label in labels if not any(label in by_label for by_label in scores.values())]
    if unknown:
        raise ValueError(f"no scores for {unknown}")


def plot(scores: dict[str, dict[str, Any]], rows: list[tuple[str, str]], path: Path) -> None:
    """Horizontal bars of each row's mean PSNR RGB minus the first row's, one panel per evaluation set."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    sets = list(scores)
    figure, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 0.45 * len(rows) + 1.2), sharey=True,
                                squeeze=False)  # fmt: skip
    names = [name for _, name in rows]
    for ax, set_name in zip(axes[0], sets, strict=True):
        values = [scores[set_name][label]["mean"]["psnr_rgb"] for label, _ in rows]
        ax.barh(names, [v - values[0] for v in values], color="tab:blue")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(set_name, fontsize=10)
        ax.set_xlabel(f"PSNR RGB minus the first row's ({values[0]:.2f} dB), dB", fontsize=8)
    axes[0][0].invert_yaxis()  # the first row on top
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def check_plot(path: Path, scores: dict[str, dict[str, Any]], rows: list[tuple[str, str]]) -> None:
    """ValueError unless plot() can draw `rows` into `path`: a suffix matplotlib writes (none: it adds .png), an
    existing folder, every row scored on every set."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix and path.suffix[1:].lower() not in formats:
        raise ValueError(f"--plot {path}: matplotlib writes no {path.suffix} files; use one of "
                         f"{', '.join('.' + name for name in sorted(formats))}")
    check_output_file(path, "the plot")
    missing = [label for label, _ in rows if any(label not in by_label for by_label in scores.values())]
    if missing:
        raise ValueError(f"--plot needs every row scored on every set; missing: {missing}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scores", nargs="+", type=Path)
    parser.add_argument("--rows", help="label=Name pairs, comma-separated, in table order")
    parser.add_argument("--plot", type=Path, help="also draw the rows' PSNR RGB as bars into this PNG")
    parser.add_argument("--info", action="store_true", help="add parameters, MACs, steps, seconds, inference ms")
    parser.add_argument("--versus", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="also compare model A with model B image by image (repeatable)")
    args = parser.parse_args(argv)
    try:
        scores = merged_scores(args.scores)
        rows = _rows(args.rows, scores)
        if args.plot:  # before the table: a refused plot leaves no half-done output
            check_plot(args.plot, scores, rows)
        comparison = versus(scores, [tuple(pair) for pair in args.versus]) if args.versus else None
        print(table(scores, rows, merged_info(args.scores) if args.info else None))
        if comparison:
            print(f"\n{comparison}")
        if args.plot:
            plot(scores, rows, args.plot)
    except (ValueError, OSError) as exc:  # OSError: a file that cannot be read, a plot that cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

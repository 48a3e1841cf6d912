"""Probe how a teacher uses its compact feature (CF): is its score carried by the 8-bit levels or by what
lies between and beyond them?

For each teacher checkpoint, on cg-dev (or any --data folder), it prints and writes as JSON:
- PSNR/SSIM RGB of the teacher as trained, and with the CF kind switched at inference only (a discrete
  teacher fed its raw CF; a continuous teacher fed its CF clipped and rounded to 8-bit levels, as TAKDSR
  does): how much of the teacher's quality depends on information finer than 8 bits;
- the raw CF's statistics: share of values outside [0, 1] (which the 8-bit CF' clips), mean distance to
  the nearest level in levels (0.25 for values spread evenly between levels), levels used per channel;
- PSNR of CF' against the bicubic LR image X: how close the teacher's LR-sized input is to an LR image;
- the teacher's decoder fed X instead of CF' (PSNR/SSIM RGB): how much of its score needs the HR information
  in the CF, rather than coming from a decoder of the full backbone's size;
- the entropy of CF' - X in 8-bit levels (bits per LR value): the side information about the HR image the
  8-bit CF' carries beyond an LR image (0: CF' is X), an upper bound for a code of those differences alone.

    python scripts/cf_probe.py models/weights/rlfn_teacher_takdsr_x2.safetensors \\
        models/weights/rlfn_teacher_continuous_x2.safetensors --json probe.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import CheckpointError, Teacher, load_checkpoint, min_lr_size, resolve_checkpoint
from models.encoder import LEVELS, quantize_8bit
from training.config import Config, EvalConfig
from training.evaluate import EvalImage, check_output_file, eval_sets, unique_labels
from training.metrics import image_metrics, psnr


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _thread_count(text: str) -> int:
    """0 (torch's default) to 1024, as `python -m training latency --threads`: far more threads than cores fail in
    libgomp, or crash the process."""
    if not text.isdigit() or int(text) > 1024:
        raise argparse.ArgumentTypeError(f"expected 0 (torch's default) to 1024, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # a file, or a bundled name such as rlfn_teacher_takdsr_x2, as for `python -m training evaluate`
    parser.add_argument("checkpoints", nargs="+", type=resolve_checkpoint,
                        help="teacher checkpoints: files or bundled names such as rlfn_teacher_takdsr_x2")
    parser.add_argument("--data", type=Path, help="an image folder instead of cg-dev")
    parser.add_argument("--max-images", type=_count, default=0, help="only the first N images (0: all)")
    parser.add_argument("--crop", type=_count, default=0, help="HR centre crop side (0: whole images)")
    parser.add_argument("--threads", type=_thread_count, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    return parser.parse_args(argv)


def load_teacher(path: Path) -> Teacher:
    model = load_checkpoint(path).model
    if not isinstance(model, Teacher):
        raise ValueError(f"{path} is not a teacher checkpoint (its arch has no encoder)")
    return model.eval()


def with_cf_kind(teacher: Teacher, discrete: bool) -> Teacher:
    """The same weights, with the decoder reading the 8-bit CF' (discrete) or the raw CF."""
    teacher.encoder.config = dataclasses.replace(teacher.encoder.config, discrete=discrete)
    return teacher


def cf_statistics(cf: torch.Tensor, lr: torch.Tensor) -> dict[str, float]:
    """cf, lr: (1, 3, h, w) in [0, 1] units."""
    outside = ((cf < 0) | (cf > 1)).float().mean().item()
    scaled = cf.clamp(0, 1) * LEVELS
    nearest_level = scaled.round()
    to_level = (scaled - nearest_level).abs().mean().item()
    levels_used = np.mean([torch.unique(nearest_level[0, c]).numel() for c in range(cf.shape[1])])
    cf_prime = quantize_8bit(cf)
    return {
        "share_outside_0_1": outside,
        "mean_distance_to_level": to_level,
        "levels_used_per_channel": float(levels_used),
        "psnr_cf_prime_vs_lr": psnr(cf_prime[0], lr[0], shave=0),
        "side_information_bits": difference_entropy_bits(cf_prime, lr),
    }


def difference_entropy_bits(cf_prime: torch.Tensor, lr: torch.Tensor) -> float:
    """Empirical entropy, in bits per value, of CF' - X counted in 8-bit levels. cf_prime, lr: (1, 3, h, w) in [0, 1];
    both lie on the 8-bit levels (X is stored as 8 bits), so the difference is a whole number of levels."""
    levels = torch.round((cf_prime - lr) * LEVELS).to(torch.int64).flatten()
    counts = torch.unique(levels, return_counts=True)[1].double()
    share = counts / counts.sum()
    return float(-(share * torch.log2(share)).sum())


@torch.no_grad()
def probe(path: Path, images: list[EvalImage], scale: int) -> dict[str, Any]:
    teacher = load_teacher(path)
    trained_discrete = teacher.discrete
    rows: dict[str, list[dict[str, float]]] = {"as_trained": [], "switched": [], "decoder_on_lr": [], "cf": []}
    for image in images:
        lr, hr = image.lr.unsqueeze(0), image.hr.unsqueeze(0)  # (1, 3, h, w), (1, 3, H, W)
        for kind, discrete in (("as_trained", trained_discrete), ("switched", not trained_discrete)):
            output = with_cf_kind(teacher, discrete)(hr)
            rows[kind].append(image_metrics(output.image.clamp(0, 1)[0], image.hr, scale))
        rows["decoder_on_lr"].append(image_metrics(teacher.decoder(lr).clamp(0, 1)[0], image.hr, scale))
        rows["cf"].append(cf_statistics(output.cf, lr))
    with_cf_kind(teacher, trained_discrete)
    mean = {kind: {key: float(np.mean([row[key] for row in values])) for key in values[0]}
            for kind, values in rows.items()}  # fmt: skip
    return {"checkpoint": str(path), "discrete": trained_discrete, "images": len(images), "mean": mean}


def scale_and_min_side(paths: list[Path]) -> tuple[int, int]:
    """(scale, smallest LR side) the teachers in `paths` share; ValueError for teachers of different scales."""
    teachers = [load_teacher(path) for path in paths]
    scales = {teacher.scale for teacher in teachers}
    if len(scales) != 1:
        raise ValueError(f"the teachers upscale by different factors {sorted(scales)}: probe them separately")
    return scales.pop(), max(min_lr_size(teacher) for teacher in teachers)


def run(args: argparse.Namespace) -> int:
    if args.json:  # checked first: the probe takes minutes
        check_output_file(args.json, "the numbers")
    if args.threads:
        torch.set_num_threads(args.threads)
    labels = unique_labels(args.checkpoints)
    scale, min_side = scale_and_min_side(args.checkpoints)
    if args.crop and args.crop // scale < min_side:  # the decoder pools a window of min_side LR pixels (ESA)
        raise ValueError(f"--crop {args.crop} is too small for these teachers: they read an HR crop of at least "
                         f"{scale * min_side} px ({min_side} px LR at x{scale})")
    folders = [str(args.data)] if args.data else []
    eval_config = EvalConfig(
        cg_dev=not folders, rendered_val=False, folders=folders, max_images=args.max_images, crop=args.crop
    )
    # images too small for the teachers are skipped, with a warning, as by `python -m training evaluate`
    images = next(iter(eval_sets(Config(eval=eval_config), scale, min_side).values()))
    results = [{"label": label, **probe(path, images, scale)} for label, path in labels.items()]
    columns = ["teacher", "CF kind", "PSNR as trained", "PSNR, kind switched", "outside [0,1]", "to nearest level",
               "levels/ch", "CF' vs X dB", "decoder on X", "CF' - X bits"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for result in results:
        mean = result["mean"]
        print(f"| {result['label']} | {'discrete' if result['discrete'] else 'continuous'} "
              f"| {mean['as_trained']['psnr_rgb']:.2f} | {mean['switched']['psnr_rgb']:.2f} "
              f"| {mean['cf']['share_outside_0_1']:.2%} | {mean['cf']['mean_distance_to_level']:.3f} "
              f"| {mean['cf']['levels_used_per_channel']:.0f} | {mean['cf']['psnr_cf_prime_vs_lr']:.2f} "
              f"| {mean['decoder_on_lr']['psnr_rgb']:.2f} | {mean['cf']['side_information_bits']:.2f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    # ValueError: not a teacher, an unwritable --json, a small --crop, a folder with no image (DatasetError);
    # OSError: a missing folder
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

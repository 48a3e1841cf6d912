"""The two bicubic floors side by side: OpenCV's INTER_CUBIC (Keys a = -0.75), the "bicubic" of every report here,
and the MATLAB-imresize bicubic (Keys a = -0.5) that SR papers usually mean, which is also the kernel our LR images
are made with (training.data.degrade). Scored like `python -m training evaluate` (same --json layout).

    python scripts/bicubic_floors.py --sets cg-dev,rendered-val --json floors.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from training.evaluate import BUILTIN_SETS, baseline_predictors, builtin_sets_config, parse_set_names, score_sets

LABEL = "bicubic a=-0.5"


def keys_bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """(1, 3, h, w) LR in [0, 1], rounded to 8 bits first like the other floors -> (1, 3, h*s, w*s) upscaled with
    Keys' a = -0.5 kernel: PyTorch's antialiased bicubic, which uses a = -0.5 (PIL/MATLAB) where the plain one
    uses -0.75."""
    lr8 = (lr.clamp(0, 1) * 255).round() / 255
    return F.interpolate(lr8, scale_factor=scale, mode="bicubic", antialias=True, align_corners=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=2, choices=(2, 3, 4))
    parser.add_argument("--sets", type=parse_set_names,
                        help=f"built-in sets, comma-separated: {', '.join(BUILTIN_SETS)} (default: cg-dev, unless "
                             "--data is given, as for `python -m training evaluate`)")
    parser.add_argument("--data", type=Path, action="append", default=[], help="an image folder to score on")
    parser.add_argument("--json", type=Path, help="also write the scores here")
    args = parser.parse_args(argv)
    predictors = {**baseline_predictors(args.scale), LABEL: lambda lr, hr: keys_bicubic(lr, args.scale)}
    try:  # score_sets checks --json and reads every set before it scores anything
        score_sets(predictors, builtin_sets_config(args.sets, args.data), args.scale, args.json)
    # ValueError: an unknown set, an unwritable --json, a folder with no image (DatasetError); OSError: a missing one
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

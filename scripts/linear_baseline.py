"""The best linear upsampler a training set allows: a floor any trained student should clear.

Each HR pixel is fitted as an affine function of the K x K LR window around it (one filter per colour channel and
sub-pixel position, 3*K*K + 1 coefficients each), by least squares over the training patches of a config: the same
data, degradation and seed a `python -m training` run of that config trains on. A student below this floor has not
learned even what a linear filter can; the CPU ablations use it to read their under-trained X_s runs
(docs/results.md). Prints mean PSNR/SSIM beside bicubic and Lanczos and writes them as JSON in the layout of
`python -m training evaluate --json`.

    python scripts/linear_baseline.py --config training/configs/rlfn_x2_ablation_cpu.toml --window 7 \\
        --patches 3000 --sets cg-dev,rendered-val --json linear.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.config import Config, EvalConfig, load_config
from training.data import build_train_dataset
from training.evaluate import (
    BUILTIN_SETS,
    baseline_predictors,
    builtin_sets_config,
    check_eval_folders,
    check_output_file,
    parse_set_names,
    score_sets,
)
from training.trainer import stage_data_seed


class LinearUpsampler(nn.Module):
    """An affine K x K filter bank: (B, 3, h, w) -> (B, 3, h*s, w*s), borders padded by replication."""

    def __init__(self, weights: torch.Tensor, window: int, scale: int) -> None:
        super().__init__()
        if weights.shape != (3 * window * window + 1, 3 * scale * scale):
            raise ValueError(f"weights of shape {tuple(weights.shape)} do not fit window {window}, scale {scale}")
        self.register_buffer("weights", weights.double())
        self.window, self.scale = window, scale

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        half = self.window // 2
        windows = _windows(F.pad(lr.double(), [half] * 4, mode="replicate"), self.window)  # (B, h*w, 3KK+1)
        out = (windows @ self.weights).transpose(1, 2)  # (B, 3*s*s, h*w)
        out = out.reshape(lr.shape[0], -1, *lr.shape[-2:])
        return F.pixel_shuffle(out, self.scale).to(lr.dtype)


def _windows(lr: torch.Tensor, window: int) -> torch.Tensor:
    """Every whole K x K window of `lr` (B, 3, H, W) as a row, with a trailing 1 for the bias: (B, L, 3KK+1)."""
    columns = F.unfold(lr, window)  # (B, 3KK, L), L = (H-K+1)*(W-K+1)
    return torch.cat([columns, torch.ones_like(columns[:, :1])], dim=1).transpose(1, 2)


def fit_linear_upsampler(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], window: int, scale: int
) -> LinearUpsampler:
    """Least squares over (LR (3, h, w), HR (3, h*s, w*s)) pairs, by the normal equations in float64 (their size is
    independent of the number of pairs). Only windows wholly inside an LR patch are used, so padding never enters
    the fit."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the window must be an odd number of LR pixels, got {window}")
    features = 3 * window * window + 1
    gram = torch.zeros(features, features, dtype=torch.float64)
    moments = torch.zeros(features, 3 * scale * scale, dtype=torch.float64)
    half, used = window // 2, 0
    for lr, hr in pairs:
        lr, hr = lr.double().unsqueeze(0), hr.double().unsqueeze(0)
        height, width = lr.shape[-2] - window + 1, lr.shape[-1] - window + 1
        if height < 1 or width < 1:
            raise ValueError(f"an LR patch of {tuple(lr.shape[-2:])} is smaller than the {window}x{window} window")
        rows = _windows(lr, window)[0]  # (L, 3KK+1)
        # the HR pixels as sub-pixel planes (3*s*s, h, w), cut to the centres of the whole windows, one row each
        planes = F.pixel_unshuffle(hr, scale)[0, :, half : half + height, half : half + width]
        targets = planes.reshape(planes.shape[0], -1).T  # (L, 3*s*s), rows in the order of `rows`
        gram += rows.T @ rows
        moments += rows.T @ targets
        used += 1
    if not used:
        raise ValueError("no training pairs to fit")
    # A tiny ridge keeps the solve defined where a window's pixels are collinear (flat patches).
    weights = torch.linalg.solve(gram + 1e-8 * gram.diagonal().mean() * torch.eye(features, dtype=gram.dtype), moments)
    return LinearUpsampler(weights, window, scale)


def _odd_window(text: str) -> int:
    if not text.isdigit() or int(text) % 2 == 0:
        raise argparse.ArgumentTypeError(f"expected an odd number of LR pixels (1, 3, 5, ...), got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="a training config: its [data] gives the patches")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--window", type=_odd_window, default=7, help="LR window side, odd (default 7)")
    parser.add_argument("--patches", type=_positive_int, default=3000,
                        help="training patches to fit on (default 3000)")
    parser.add_argument("--sets", type=parse_set_names,
                        help=f"built-in sets, comma-separated: {', '.join(BUILTIN_SETS)} (default: cg-dev, unless "
                             "--data is given, as for `python -m training evaluate`)")
    parser.add_argument("--data", type=Path, action="append", default=[], help="an image folder to score on")
    parser.add_argument("--json", type=Path, help="also write the scores here")
    return parser.parse_args(argv)


def check_before_fit(config: Config, args: argparse.Namespace) -> EvalConfig:
    """The evaluation config that scores the fitted filter, once everything the fit and the scoring need is known
    to be there: the fit takes minutes, and a mistake found after it loses them. ValueError (DatasetError for a
    folder with no usable image) or FileNotFoundError otherwise."""
    if config.data is None:
        raise ValueError(f"{args.config} has no [data] table: no training patches to fit on")
    lr_patch = config.data.patch_size // config.experiment.scale
    if args.window > lr_patch:
        raise ValueError(f"--window {args.window} is larger than the config's LR patches ({lr_patch} px a side); "
                         "use a smaller window or --set data.patch_size=...")
    scoring = dataclasses.replace(config, eval=builtin_sets_config(args.sets, args.data))
    if args.json:
        check_output_file(args.json, "the scores")
    check_eval_folders(scoring, min_lr_side=1)  # decodes the --data images once more: seconds, not a fit's minutes
    return scoring.eval


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    scale = config.experiment.scale
    eval_config = check_before_fit(config, args)
    dataset = build_train_dataset(config.data, scale, stage_data_seed(config), progress=False)
    count = min(args.patches, len(dataset))
    model = fit_linear_upsampler(((dataset[i]["lr"], dataset[i]["hr"]) for i in range(count)), args.window, scale)
    label = f"linear_{args.window}x{args.window}"
    predictors = {**baseline_predictors(scale), label: lambda lr, hr: model(lr)}
    print(f"{label}: least squares over {count} training patches of {args.config}")
    score_sets(predictors, eval_config, scale, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    # ValueError: a bad config or --set, window, set, --json or image folder (DatasetError); OSError: a missing file
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

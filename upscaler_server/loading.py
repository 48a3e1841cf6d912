"""Loading a network for serving: a checkpoint, the bundled student or a registered model name, checked before it
serves (an LR -> HR decoder, not a teacher assistant that needs the HR frame, no float32 overflow on a test frame),
optionally widened, wrapped to repeat the frame's edge pixels, and hashed to key the backends' cached files. Apart
from :mod:`upscaler_server.engine`, which runs frames: nothing here depends on a device, a precision or a backend,
and the export and the benchmarks load their network through it too.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import torch

from upscaler_server.config import DEFAULT_SCALE
from upscaler_server.errors import ConfigError, ModelLoadError

__all__ = ["EdgePadded", "edge_padded", "load_network", "model_hash", "served_network", "widened"]

# the daemon's, the offline CLI's and the export's options (the benchmark has no --model and names its own)
_INSTEAD_OF_A_MISSING_CHECKPOINT = ("--checkpoint PATH or a bundled name, or --model NAME to run a registered model "
                                    "with random weights")


def load_network(checkpoint: pathlib.Path | None, model: str | None, scale: int | None = None, *,
                 instead: str = _INSTEAD_OF_A_MISSING_CHECKPOINT) -> tuple[torch.nn.Module, str, str | None]:
    """(network, architecture name, checkpoint path or None for random weights) from a checkpoint, the bundled
    student (both None) or a registered model name. `scale`: the model's (None: DEFAULT_SCALE); a checkpoint's must
    equal it (ConfigError otherwise), so that asking for x3 never gets the x2 of the file in silence. `instead`: what
    the message for a missing checkpoint tells to pass, in the options of the calling tool."""
    try:
        import models
    except ImportError as exc:
        raise ModelLoadError(f"cannot import the models package: {exc}") from exc
    if model is not None:
        if model not in models.list_models():
            raise ModelLoadError(f"unknown model {model!r}; registered: {', '.join(models.list_models())}")
        try:
            network = models.build_model(model, scale=DEFAULT_SCALE if scale is None else scale)
        except ValueError as exc:  # a scale the family does not have: a bad argument (exit 2), not a bad model
            raise ConfigError(f"--scale {scale}: cannot build {model!r}: {exc}") from exc
        return _decoder(network, model), model, None
    path = models.resolve_checkpoint(checkpoint) if checkpoint is not None else models.DEFAULT_STUDENT_PATH
    if path.is_dir():
        raise ModelLoadError(f"checkpoint {path} is a folder; pass a .safetensors file or a bundled name "
                             f"({', '.join(models.bundled_names())})")
    if not os.path.lexists(path):  # anything there (a FIFO, a link loop) is for load_checkpoint to name
        hint = "" if checkpoint is not None else " (the bundled student has not shipped yet)"
        raise ModelLoadError(f"checkpoint {path} not found{hint}; pass {instead}")
    try:
        ckpt = models.load_checkpoint(path, device="cpu")
    except (models.CheckpointError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load checkpoint {path}: {exc}") from exc
    # value_range needs no check here: load_checkpoint accepts only [0, 1], what the engine feeds
    _refuse_mixed_input(ckpt.metadata, path)
    if scale is not None and scale != ckpt.model.scale:
        raise ConfigError(f"--scale {scale}: {path} upscales x{ckpt.model.scale} (--scale is for --model; a "
                          "checkpoint knows its own)")
    network = _decoder(ckpt.model, str(path))
    _refuse_overflow(network, path)
    return network, models.describe(ckpt.metadata), str(path)


def _refuse_mixed_input(metadata: dict[str, Any], path: pathlib.Path) -> None:
    """A TA trained on lambda1 * CF' + lambda2 * LR needs CF', which the teacher's encoder makes from the HR frame:
    an upscaler has no HR frame, and on the LR alone the TA scores below the student (1.3 dB in a review)."""
    mix = metadata["training"].get("mix")
    if metadata["role"] == "ta" and mix is not None and mix[0] != 0:
        raise ModelLoadError(f"{path} is a teacher assistant trained on {mix[0]} * CF' + {mix[1]} * LR; CF' comes "
                             "from the high-resolution frame, which an upscaler does not have. Serve a student "
                             "(e.g. the bundled rlfn_s_takdsr_x2)")


def _refuse_overflow(network: torch.nn.Module, path: pathlib.Path) -> None:
    """Finite weights can still overflow float32 in the forward pass (a tampered or diverged file with 1e30
    weights); NaN and inf then become black pixels, served without a word. One small fp32 forward of an ordinary
    frame (a smooth gradient with a fine checkerboard on it, every value in [0, 1]) catches that at load time."""
    side = max(32, int(getattr(network, "min_input_size", 1)))
    ramp = torch.linspace(0.0, 1.0, side)
    checker = (torch.arange(side)[:, None] + torch.arange(side)[None, :]) % 2 * 0.25
    probe = (0.6 * (ramp[:, None] + ramp[None, :]) / 2 + checker).clamp(0.0, 1.0)  # (side, side)
    frame = torch.stack([probe, probe.flip(0), probe.flip(1)])[None]  # (1, 3, side, side)
    with torch.inference_mode():
        output = network.eval()(frame)
    if not bool(torch.isfinite(output).all()):
        raise ModelLoadError(f"checkpoint {path}: its weights are finite but overflow float32 on a test frame (the "
                             "output holds NaN or infinite values), so every frame would come out black; the file "
                             "is damaged or its training diverged")


def _decoder(network: torch.nn.Module, source: str) -> torch.nn.Module:
    import models

    if not isinstance(network, models.SRDecoder):  # a teacher's forward needs the HR frame it is meant to produce
        raise ModelLoadError(f"{source} is a {type(network).__name__}, not an LR -> HR decoder; serve a student "
                             "or a backbone (e.g. rlfn_s)")
    return network


def widened(network: torch.nn.Module, name: str, multiple: int) -> tuple[torch.nn.Module, str]:
    """``network`` with its feature width padded to a multiple of ``multiple`` (same function), and its new name."""
    if not hasattr(network, "widened"):
        raise ConfigError(f"--pad-channels needs an RLFN network; {name} is {type(network).__name__}")
    wide = network.widened(multiple)
    return wide, f"{name}, channels zero-padded to {wide.config.channels}"


class EdgePadded(torch.nn.Module):
    """``network`` run on the frame with its outermost pixels repeated ``pixels`` times on every side, and its output
    cropped back to the frame: (B, 3, H, W) -> (B, 3, sH, sW), as ``network`` itself. A convolution pads with zeros,
    which at a frame's edge reads as a black border next to it: the bundled student turned a flat white 640x360
    frame's corner pixel into (191, 249, 230), and scored 36.8 dB on cg-dev's outermost 2 pixels, against 39.1 for
    bicubic. With 4 pixels repeated the corner is within 2 levels and that ring scores 39.5 dB (docs/results.md, "The
    frame's edges"). The evaluation's PSNR shaves those pixels (the paper's protocol), so it barely moves."""

    def __init__(self, network: torch.nn.Module, pixels: int) -> None:
        super().__init__()
        self.network = network
        self.pixels = pixels
        self.scale = int(network.scale)
        self.min_input_size = int(getattr(network, "min_input_size", 1))  # of the frame: padding only adds to it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, s = self.pixels, self.scale
        y = self.network(_repeat_edges(x, p))  # (B, 3, s(H+2p), s(W+2p))
        return y[..., p * s : y.shape[-2] - p * s, p * s : y.shape[-1] - p * s]


def _repeat_edges(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H+2p, W+2p), the outermost rows and columns repeated: F.pad's "replicate", written as
    slices and concatenations, which the ONNX export converts down to opset 17 (its Pad-18 did not). TensorRT parses
    these ops too (Slice, Expand, Concat), but no GPU here has run it."""
    rows = torch.cat([x[..., :1, :].expand(-1, -1, pixels, -1), x, x[..., -1:, :].expand(-1, -1, pixels, -1)], dim=-2)
    return torch.cat([rows[..., :1].expand(-1, -1, -1, pixels), rows, rows[..., -1:].expand(-1, -1, -1, pixels)],
                     dim=-1)


def edge_padded(network: torch.nn.Module, pixels: int) -> torch.nn.Module:
    """``network`` wrapped in :class:`EdgePadded`, or itself for 0 pixels."""
    return EdgePadded(network, pixels) if pixels else network


def served_network(checkpoint: pathlib.Path | None, model: str | None, scale: int | None = None, *,
                   pad_channels: int = 0, edge_pad: int = 0) -> tuple[torch.nn.Module, str, str | None, str]:
    """What an engine runs: :func:`load_network`'s network, widened to a multiple of ``pad_channels`` channels and
    wrapped to repeat ``edge_pad`` edge pixels (each when not 0), with its name, checkpoint path, and a hash that
    keys the backends' cached files (auto's measurements, ONNX and TensorRT engines): each option changes it, as
    the edge padding changes the output."""
    network, name, weights = load_network(checkpoint, model, scale)
    identity = model_hash(network, weights)
    if pad_channels:
        network, name = widened(network, name, pad_channels)
        identity = hashlib.sha256(f"{identity} widened to a multiple of {pad_channels}".encode()).hexdigest()
    if edge_pad:
        network = edge_padded(network, edge_pad)
        identity = hashlib.sha256(f"{identity} edges repeated {edge_pad} px".encode()).hexdigest()
    return network, name, weights, identity


def model_hash(network: torch.nn.Module, weights: str | None) -> str:
    """SHA-256 of the checkpoint file, or of the architecture and weights of a randomly initialised network."""
    digest = hashlib.sha256()
    if weights is not None:
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    digest.update(repr(network).encode())
    for key, value in network.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()

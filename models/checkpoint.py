"""Self-describing checkpoints: safetensors weights plus one JSON metadata entry.

The metadata (under the safetensors metadata key ``takdsr``) holds everything needed to rebuild the
network from the file alone::

    {"format_version": 1, "arch": "rlfn", "arch_args": {"channels": 52, "blocks": 1, ...},
     "scale": 2, "value_range": [0.0, 1.0], "role": "student", "training": {...}}

safetensors stores raw tensors and a JSON header, so loading never unpickles anything. Every
problem with a file (missing, truncated, not safetensors, bad metadata, unknown architecture,
tensors that do not fit) raises ``CheckpointError`` naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .registry import arch_name, build_model

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "describe",
    "load_checkpoint",
    "load_model",
    "read_metadata",
    "save_checkpoint",
]

FORMAT_VERSION = 1
METADATA_KEY = "takdsr"
ROLES = ("teacher", "ta", "student")
VALUE_RANGE = [0.0, 1.0]


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        super().__init__(f"checkpoint {os.fspath(path)!r}: {problem}")
        self.path = os.fspath(path)
        self.problem = problem


@dataclass
class Checkpoint:
    model: nn.Module
    metadata: dict[str, Any] = field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (``_orig_mod``) and DDP (``module``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], *, role: str, training: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` with its metadata; atomic (temporary file + rename). Returns the path."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    model = unwrap(model)
    metadata = {
        "format_version": FORMAT_VERSION,
        "arch": arch_name(model),
        "arch_args": model.arch_args(),
        "scale": model.scale,
        "value_range": VALUE_RANGE,
        "role": role,
        "training": training or {},
    }
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's metadata, validated, without loading the weights."""
    _check_file(path)
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"not a readable safetensors file ({exc})") from exc
    if raw is None:
        raise CheckpointError(path, f"no '{METADATA_KEY}' metadata: not a checkpoint of this project")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(path, f"metadata is not valid JSON ({exc})") from exc
    _validate_metadata(path, metadata)
    return metadata


def load_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the file alone; the model is returned in eval mode on ``device``."""
    metadata = read_metadata(path)
    try:
        model = build_model(metadata["arch"], **metadata["arch_args"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(path, f"cannot build {metadata['arch']!r} from its arch_args ({exc})") from exc
    state = _read_tensors(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"weights do not fit {metadata['arch']!r}: {exc}") from exc
    if model.scale != metadata["scale"]:
        raise CheckpointError(path, f"metadata scale {metadata['scale']} != the network's scale {model.scale}")
    return Checkpoint(model.to(device).eval(), metadata)


def describe(metadata: dict[str, Any]) -> str:
    """A short human name for a checkpoint, e.g. 'rlfn student 52ch x1 block (student_takdsr)'."""
    args = metadata.get("arch_args", {})
    blocks = args.get("blocks")
    text = f"{metadata.get('arch', '?')} {metadata.get('role', '?')} {args.get('channels', '?')}ch"
    text += f" x{blocks} block{'s' if blocks != 1 else ''}"
    stage = metadata.get("training", {}).get("stage")
    return f"{text} ({stage})" if stage else text


def load_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> nn.Module:
    return load_checkpoint(path, device=device).model


def _check_file(path: str | os.PathLike[str]) -> None:
    if not os.path.exists(path):
        raise CheckpointError(path, "file not found")
    if not os.path.isfile(path):
        raise CheckpointError(path, "not a regular file")


def _read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, f"weights are truncated or corrupt ({exc})") from exc


def _validate_metadata(path: str | os.PathLike[str], metadata: Any) -> None:
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "metadata is not a JSON object")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(path, f"format_version {version!r} is not supported (this code reads {FORMAT_VERSION})")
    expected_types = {"arch": str, "arch_args": dict, "scale": int, "role": str, "training": dict}
    for key, expected in expected_types.items():
        if not isinstance(metadata.get(key), expected):
            raise CheckpointError(path, f"metadata field {key!r} missing or not a {expected.__name__}")
    if metadata["role"] not in ROLES:
        raise CheckpointError(path, f"unknown role {metadata['role']!r}; expected one of {ROLES}")
    if metadata.get("value_range") != VALUE_RANGE:
        raise CheckpointError(path, f"value_range {metadata.get('value_range')!r} is not {VALUE_RANGE}")

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

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize_tensors
from torch import nn

from .registry import arch_name, build_model
from .teacher import Teacher

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "bundled_names",
    "describe",
    "describe_shape_mismatch",
    "load_checkpoint",
    "load_model",
    "read_metadata",
    "resolve_checkpoint",
    "save_checkpoint",
    "size_problem",
    "weights_sha256",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # the bundled checkpoints, installed with the package
FORMAT_VERSION = 1
_MAX_ARCH_INT = 4096  # no width, block count or scale of these networks comes near it
# Even on the meta device each block costs time (4096 blocks: 7-16 s before the file was refused); the full
# backbones have 6 (RLFN, RFDN) and 16 (PAN).
MAX_BLOCKS = 256
# Each argument within its bound still multiplies out (channels 4096: 621 M parameters, 6 GB, from a sparse file of
# 8 KB on disk). The largest shipped network has 0.65 M parameters; 50 M is 200 MB of float32.
MAX_VALUES = 50_000_000
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
    too_large = size_problem(model)
    if too_large:  # every loader refuses such a file
        raise ValueError(f"not writing {path}: {too_large}")
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
    broken = _first_non_finite(tensors)
    if broken is not None:  # every loader refuses such a file: say so now, not when someone tries to use it
        raise ValueError(f"not writing {path}: tensor {broken!r} holds NaN or infinite values")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    # serialised in memory and written by Python: safetensors' own writer reports a full disk as a SafetensorError
    serialized = serialize_tensors(tensors, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    try:
        Path(tmp_name).write_bytes(serialized)
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp_name, target)
    except OSError as exc:  # a full disk, most likely: name the file, which the error alone does not
        raise OSError(exc.errno, f"cannot write the checkpoint ({exc.strerror})", str(target)) from None
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


TRAINING_STATE_NAME = "state.pt"  # what a training run folder keeps to resume (named here for the hint alone)
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a bare pickle (protocol 2 and later)


def _pytorch_file_hint(path: str | os.PathLike[str]) -> str:
    """What to do with a torch.save file (.pt/.pth), which is refused like any other non-safetensors file: unpickling
    it could run any code the file holds."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError:
        return ""
    if not head.startswith(_PICKLE_MAGIC):
        return ""
    hint = ("; it looks like a PyTorch .pt/.pth (pickle) file, which is never loaded, as unpickling may run code: save "
            "the network with models.save_checkpoint, which writes safetensors with the metadata this needs")
    if Path(path).name == TRAINING_STATE_NAME:  # the name the trainer gives its resumable state
        hint += (f" (for a training run's {TRAINING_STATE_NAME}: `python -m training export-state RUN_DIR --out "
                 "FILE.safetensors` writes its network so)")
    return hint


_FD_FOLDER = "/proc/self/fd"


@contextlib.contextmanager
def _open_safetensors(path: str | os.PathLike[str]) -> Iterator[Any]:
    """safe_open on ``path``, which Python opens first: safetensors takes a file name as UTF-8 text only, so a name that
    is not valid UTF-8 (a Latin-1 folder from an old archive, held by Python as surrogates) failed as "not valid UTF-8"
    and a checkpoint the trainer wrote there could never be loaded. Where Linux names open files (/proc/self/fd),
    safetensors is handed that name of the file already open: any path works, and what is read is the file that was
    opened. Elsewhere, the name itself. Nothing is unpickled either way: safe_open reads safetensors only."""
    with open(path, "rb") as file:
        name = os.path.join(_FD_FOLDER, str(file.fileno()))
        if not os.path.exists(name):
            name = os.fspath(path)
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # safetensors' own message called such a file "not a readable safetensors file"
                raise CheckpointError(path, f"its name is not valid UTF-8, which the safetensors library cannot open "
                                            f"here (no {_FD_FOLDER}); rename the file or its folder") from None
        with safe_open(name, framework="pt") as handle:
            yield handle


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's metadata, validated, without loading the weights."""
    _check_file(path)
    try:
        with _open_safetensors(path) as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"not a readable safetensors file ({exc}){_pytorch_file_hint(path)}") from exc
    if raw is None:
        raise CheckpointError(path, f"no '{METADATA_KEY}' metadata: not a checkpoint of this project")
    try:
        metadata = json.loads(raw)
    # ValueError: malformed, or an integer past Python's digit limit; RecursionError: nested thousands deep
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(path, f"metadata is not valid JSON ({type(exc).__name__}: {exc})") from exc
    _validate_metadata(path, metadata)
    return metadata


def load_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the file alone; the model is returned in eval mode on ``device``.

    The network the metadata declares is first built without memory (on the meta device) and its tensor names and
    shapes compared with the file's header, so a small file cannot make the loader allocate a huge network."""
    metadata = read_metadata(path)
    declared = _build(path, metadata, torch.device("meta"))
    too_large = size_problem(declared)
    if too_large:
        raise CheckpointError(path, f"declares {too_large}")
    _check_shapes(path, metadata, declared)
    model = _build(path, metadata, torch.device("cpu"))
    state = _read_tensors(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"weights do not fit {metadata['arch']!r}: {exc}") from exc
    if model.scale != metadata["scale"]:
        raise CheckpointError(path, f"metadata scale {metadata['scale']} != the network's scale {model.scale}")
    return Checkpoint(model.to(device).eval(), metadata)


def size_problem(model: nn.Module) -> str | None:
    """Why a checkpoint of ``model`` would be refused for its size (over MAX_BLOCKS blocks, or MAX_VALUES values:
    what keeps a small file from making a loader build a huge network), else None. The trainer asks before it
    trains, and save_checkpoint before it writes."""
    decoder = model.decoder if isinstance(model, Teacher) else model
    blocks = getattr(getattr(decoder, "config", None), "blocks", 0)
    if blocks > MAX_BLOCKS:
        return f"a network of {blocks} blocks, more than checkpoints of this package may hold ({MAX_BLOCKS})"
    values = sum(t.numel() for t in model.state_dict().values())
    if values > MAX_VALUES:
        return f"a network of {values:,} values, more than checkpoints of this package may hold ({MAX_VALUES:,})"
    return None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it exists; else a bundled checkpoint it names: ``rlfn_s_native_x2``, with or without
    ``.safetensors``, or ``models/weights/<name>`` read from outside a checkout (an installed package). Anything else
    comes back unchanged, for the caller to report as missing."""
    given = Path(path)
    file_name = f"{given.name.removesuffix('.safetensors')}.safetensors"
    if given.exists() or not names_bundled(given):
        return given
    if (given.parent / file_name).is_file():  # the user's own NAME.safetensors, here, before a bundled one
        return given.parent / file_name
    bundled = WEIGHTS_DIR / file_name
    return bundled if bundled.is_file() else given


def bundled_names() -> list[str]:
    """The names of the bundled checkpoints (``rlfn_s_takdsr_x2``, ...), for messages that say what may be given."""
    return sorted(path.stem for path in WEIGHTS_DIR.glob("*.safetensors"))


def names_bundled(path: Path) -> bool:
    """Whether ``path`` has the form of a bundled checkpoint's name: a bare name, or ``models/weights/NAME``
    relative to a checkout (client_demo.cli repeats this rule without importing torch; a test keeps them equal)."""
    return path.parent == Path(".") or (path.parts[-3:-1] == ("models", "weights") and not path.is_absolute())


def describe(metadata: dict[str, Any]) -> str:
    """A short human name for a checkpoint, e.g. 'rlfn student 52ch x1 block (student_takdsr)'."""
    args = metadata.get("arch_args", {})
    blocks = args.get("blocks")
    text = f"{metadata.get('arch', '?')} {metadata.get('role', '?')} {args.get('channels', '?')}ch"
    text += f" x{blocks} block{'s' if blocks != 1 else ''}"
    stage = metadata.get("training", {}).get("stage")
    return f"{text} ({stage})" if stage else text


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a checkpoint's tensors (each one's name, dtype, shape and bytes, in name order), not of the file: a
    checkpoint saved again with other metadata (shipping adds its scores) holds the same weights and hashes the
    same. CheckpointError for a file that is not a readable checkpoint's tensors."""
    _check_file(path)
    digest = hashlib.sha256()
    for name, tensor in sorted(_read_tensors(path).items()):
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> nn.Module:
    return load_checkpoint(path, device=device).model


def _check_file(path: str | os.PathLike[str]) -> None:
    if not os.path.exists(path):
        leads_nowhere = os.path.lexists(path)
        raise CheckpointError(path, "a symbolic link that leads nowhere (broken, or a loop)" if leads_nowhere
                              else "file not found")
    if not os.path.isfile(path):
        raise CheckpointError(path, "not a regular file")
    try:  # safetensors reports an unreadable file as "No such file or directory"
        open(path, "rb").close()
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc


def _build(path: str | os.PathLike[str], metadata: dict[str, Any], device: torch.device) -> nn.Module:
    for key, value in metadata["arch_args"].items():  # even on the meta device, a million blocks take minutes
        bound = MAX_BLOCKS if key == "blocks" else _MAX_ARCH_INT
        if isinstance(value, int) and not isinstance(value, bool) and value > bound:
            raise CheckpointError(path, f"arch_args {key}={value} is beyond any network of this package "
                                        f"(at most {bound})")
    try:
        with device:
            return build_model(metadata["arch"], **metadata["arch_args"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(path, f"cannot build {metadata['arch']!r} from its arch_args ({exc})") from exc


def _check_shapes(path: str | os.PathLike[str], metadata: dict[str, Any], model: nn.Module) -> None:
    """The declared network's tensors against the file's header (names and shapes; nothing is read)."""
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    try:
        with _open_safetensors(path) as handle:
            stored = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, f"weights are truncated or corrupt ({exc})") from exc
    mismatch = describe_shape_mismatch(expected, stored)
    if mismatch:
        raise CheckpointError(path, f"weights do not fit {metadata['arch']!r} {metadata['arch_args']}: {mismatch}")


def describe_shape_mismatch(expected: dict[str, list[int]], stored: dict[str, list[int] | None]) -> str:
    """What keeps tensors of the names and shapes ``stored`` (None: not a tensor) from loading where tensors of
    ``expected`` go, in one short line ("" when they fit): torch's own message lists every key, thousands of
    characters for another network."""
    missing, extra = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
    wrong = [f"{n} {stored[n]} (needs {expected[n]})" for n in sorted(expected.keys() & stored.keys())
             if stored[n] != expected[n]]
    problems = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if items]
    return "; ".join(problems)


def _read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    try:
        with _open_safetensors(path) as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, f"weights are truncated or corrupt ({exc})") from exc
    for name, tensor in state.items():  # load_state_dict would cast ints and bools silently, and NaN runs as NaN
        if not tensor.is_floating_point():
            raise CheckpointError(path, f"tensor {name!r} holds {tensor.dtype}, not floating-point weights")
    broken = _first_non_finite(state)
    if broken is not None:
        raise CheckpointError(path, f"tensor {broken!r} holds NaN or infinite values (as the float32 the model uses)")
    return state


def _first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor with a NaN or infinite value once in float32, the model's dtype
    (a float64 1e300 becomes inf there; isfinite has no float8 kernels), else None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.to(torch.float32)).all()):
            return name
    return None


def _validate_metadata(path: str | os.PathLike[str], metadata: Any) -> None:
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "metadata is not a JSON object")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):  # True == 1 in Python
        raise CheckpointError(path, f"format_version {version!r} is not supported (this code reads {FORMAT_VERSION})")
    expected_types = {"arch": str, "arch_args": dict, "scale": int, "role": str, "training": dict}
    for key, expected in expected_types.items():
        if not isinstance(metadata.get(key), expected):
            raise CheckpointError(path, f"metadata field {key!r} missing or not a {expected.__name__}")
    if metadata["role"] not in ROLES:
        raise CheckpointError(path, f"unknown role {metadata['role']!r}; expected one of {ROLES}")
    if metadata.get("value_range") != VALUE_RANGE:
        raise CheckpointError(path, f"value_range {metadata.get('value_range')!r} is not {VALUE_RANGE}")
    _validate_training(path, metadata["training"])


def _validate_training(path: str | os.PathLike[str], training: dict[str, Any]) -> None:
    """The training fields that loaders act on: the stage name and a TA's input mix."""
    stage, mix = training.get("stage"), training.get("mix")
    if stage is not None and not isinstance(stage, str):
        raise CheckpointError(path, f"training.stage {stage!r} is not a string")
    numbers = isinstance(mix, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mix)
    if mix is not None and not (numbers and len(mix) == 2 and all(_finite(v) for v in mix)):
        raise CheckpointError(path, f"training.mix {mix!r} is not two finite numbers (lambda1 CF', lambda2 X)")


def _finite(number: float) -> bool:
    """math.isfinite, False also for an int too large for a float (JSON allows 10**400; isfinite raises)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False

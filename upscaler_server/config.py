"""Daemon settings (one dataclass) and the default per-user endpoint. Torch-free: the client uses it too."""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import socket
import stat
import sys
import typing
from dataclasses import dataclass
from typing import Literal

from upscaler_server.errors import ConfigError
from upscaler_server.protocol import COUNT_MAX, DIM_MAX, SCALE_MAX, SLOTS_MAX

__all__ = ["BACKEND_CHOICES", "CACHING_BACKENDS", "ENDPOINT_ENV", "Config", "add_backend_arguments", "check_endpoint",
           "cli_prog", "default_endpoint", "default_size_problem", "nobody_listens", "parse_auto_backends",
           "parse_size", "runtime_dir", "unreachable"]

# Overrides the default endpoint for both the daemon and the client (tests, several daemons per user).
ENDPOINT_ENV = "TAKDSR_UPSCALER_ENDPOINT"

Device = Literal["auto", "cuda", "cpu"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
Backend = Literal["auto", "eager", "torch", "compile", "onnxruntime", "tensorrt", "nearest"]
BACKEND_CHOICES: tuple[str, ...] = typing.get_args(Backend)
CACHING_BACKENDS = ("auto", "onnxruntime", "tensorrt")  # what keeps files in --cache-dir: measurements, ONNX, engines


MAX_LEASE_S = 86_400.0
DEFAULT_SCALE = 2  # --model's and the nearest backend's factor when --scale is not given
# pixels of the frame's edge repeated on every side before the network (EdgePadded in loading.py): 4 take the bundled
# student's outer 2 pixels on cg-dev from 36.8 to 39.5 dB; 8 add 0.01 dB for twice the extra pixels
DEFAULT_EDGE_PAD = 4
MAX_EDGE_PAD = 64


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs; built by ``__main__`` from the command line."""

    endpoint: str  # ZeroMQ endpoint the ROUTER binds: ipc://PATH or tcp://127.0.0.1:PORT
    checkpoint: pathlib.Path | None = None  # student checkpoint; None with model=None: the bundled student
    model: str | None = None  # registered architecture with random weights instead of a checkpoint (benchmarks)
    # eager (alias torch): PyTorch; compile: torch.compile; onnxruntime; tensorrt (CUDA); auto: the fastest of those
    # within tolerance of fp32 eager, measured per resolution; nearest: nearest-neighbour copy, no model (tests)
    backend: Backend = "eager"
    # upscale factor of --model and of the nearest backend (None: DEFAULT_SCALE); with a checkpoint, which knows its
    # own, only a check: another value is refused rather than served at the checkpoint's factor without a word
    scale: int | None = None
    device: Device = "auto"  # auto: CUDA when available, else CPU
    precision: Precision = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    threads: int = 0  # CPU intra-op threads; 0: the cores this process may run on
    cuda_graphs: bool = False  # capture one CUDA graph per resolution after warm-up
    overlap: bool = False  # CUDA: two frames in flight, one's copies overlapping the other's compute (eager/compile)
    # the engine reads and writes slots through the daemon's mapping instead of having the kernel copy them (pread,
    # process_vm_writev): faster, but a client that shrinks a segment while its frame is copied kills the daemon
    map_slots: bool = False
    pad_channels: int = 0  # > 0: zero-pad an RLFN's feature width to a multiple of this (same output; tensor cores)
    edge_pad: int | None = None  # edge pixels repeated on every side of a frame; None: DEFAULT_EDGE_PAD (0: none)
    cache_dir: pathlib.Path | None = None  # auto's measurements, ONNX/TensorRT files; None: $TAKDSR_CACHE_DIR or XDG
    auto_backends: tuple[str, ...] = ()  # backends auto may pick from; empty: every available one
    tune_sizes: tuple[tuple[int, int], ...] = ()  # (width, height) auto measures at start-up, not on first frame
    max_width: int = 3840  # largest low-resolution frame width
    max_height: int = 2160  # largest low-resolution frame height
    max_pixels: int = 3840 * 2160  # largest low-resolution width * height
    max_slots: int = 8  # most slots per session
    max_sessions: int = 64  # most open sessions across all clients
    max_shm_bytes: int = 4 << 30  # shared memory all sessions may hold together
    max_queue: int = 16  # frames waiting for the engine; more get a BUSY reply
    # inline results one client may leave unread in the daemon (ZeroMQ's queue) before its next process gets BUSY
    max_unread_bytes: int = 256 << 20
    lease_timeout: float = 10.0  # seconds without a message naming a session before it is closed
    drain_timeout: float = 10.0  # seconds to let the in-flight frame finish at shutdown
    allow_remote: bool = False  # a tcp:// endpoint on an address other hosts can reach (there is no authentication)

    def __post_init__(self) -> None:
        if self.checkpoint is not None and self.model is not None:
            raise ConfigError("give either --checkpoint or --model, not both")
        positive = {"scale": DEFAULT_SCALE if self.scale is None else self.scale, "max_width": self.max_width,
                    "max_height": self.max_height,
                    "max_pixels": self.max_pixels, "max_slots": self.max_slots, "max_sessions": self.max_sessions,
                    "max_shm_bytes": self.max_shm_bytes, "max_queue": self.max_queue,
                    "max_unread_bytes": self.max_unread_bytes}
        bad = [k for k, v in positive.items() if v < 1]
        # the welcome reply carries these, and its schema bounds them
        too_large = max(self.max_width, self.max_height) > DIM_MAX or self.max_slots > SLOTS_MAX
        if too_large or positive["scale"] > SCALE_MAX:
            bad.append(f"max_width/max_height <= {DIM_MAX}, max_slots <= {SLOTS_MAX}, scale <= {SCALE_MAX}")
        if max(self.max_sessions, self.max_queue) > COUNT_MAX:
            bad.append(f"max_sessions/max_queue <= {COUNT_MAX}")
        bad += engine_setting_problems(threads=self.threads, pad_channels=self.pad_channels, edge_pad=self.edge_pad)
        # a size measured at start-up that no frame may have would only cost start-up time (minutes on a CPU)
        bad += [f"--tune-sizes {w}x{h} within 1..max_width x 1..max_height and max_pixels"
                for w, h in self.tune_sizes
                if not (1 <= w <= self.max_width and 1 <= h <= self.max_height and w * h <= self.max_pixels)]
        if bad:
            raise ConfigError(f"invalid settings {bad}: sizes and counts must be positive and within these bounds")
        # the lease travels in milliseconds (welcome.lease_ms, an integer >= 1); a day is longer than any frame
        if not (math.isfinite(self.lease_timeout) and 0.001 <= self.lease_timeout <= MAX_LEASE_S):
            raise ConfigError(f"the lease timeout must be 0.001 to {MAX_LEASE_S:.0f} seconds, got {self.lease_timeout}")
        if not (math.isfinite(self.drain_timeout) and self.drain_timeout >= 0):
            raise ConfigError(f"the drain timeout must be a finite number of seconds >= 0, got {self.drain_timeout}")
        check_endpoint(self.endpoint, self.allow_remote)

    @property
    def max_message_bytes(self) -> int:
        """Largest message the daemon accepts: an inline 4-channel frame at the size limit plus headers."""
        return self.max_pixels * 4 + 4096


_LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")


_PORT_MAX = 65535
_PROBE_S = 0.5  # longest wait of the ipc probe's connect
_IPC_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path holds 108 with its NUL)


def check_endpoint(endpoint: str, allow_remote: bool) -> None:
    """ConfigError unless ``endpoint`` is one the daemon can bind. ipc: a file path short enough for a Unix socket
    (the socket gets mode 0600, so only this user connects); tcp: a host and a numeric port, on loopback unless
    ``allow_remote``, since anyone who reaches the port can open and use sessions (on loopback: any local user).
    Clients check with ``allow_remote``: a malformed endpoint is a mistyped argument, not a daemon that cannot be
    reached."""
    kind, _, address = endpoint.partition("://")
    if kind not in ("ipc", "tcp"):
        raise ConfigError(f"endpoint {endpoint!r} must start with ipc:// or tcp://")
    if kind == "ipc" and (not address or address.startswith("@") or address == "*"):
        raise ConfigError(f"endpoint {endpoint!r}: an ipc endpoint must be a file path (no abstract @names or "
                          "wildcards: those have no file permissions)")
    if kind == "ipc" and len(os.fsencode(address)) > _IPC_PATH_MAX:
        raise ConfigError(f"endpoint {endpoint!r}: an ipc path may be at most {_IPC_PATH_MAX} bytes long (a Unix "
                          "socket's limit); choose a shorter one")
    if kind == "tcp":
        host, _, port = address.rpartition(":")
        # libzmq takes a port modulo 65536 (99999 bound 34463) and binds port 0 to one nobody is told of
        if not host or not port.isdigit() or not 1 <= int(port) <= _PORT_MAX:
            raise ConfigError(f"endpoint {endpoint!r}: a tcp endpoint needs a host and a port 1..{_PORT_MAX}, e.g. "
                              "tcp://127.0.0.1:5555")
        if not (host in _LOOPBACK_HOSTS or host.startswith("127.") or allow_remote):
            raise ConfigError(f"endpoint {endpoint!r} is reachable from other hosts, and the protocol has no "
                              "authentication: bind tcp://127.0.0.1:PORT, or pass --allow-remote on a trusted network")


def parse_size(text: str) -> tuple[int, int]:
    """``"640x360"`` -> (640, 360); argparse.ArgumentTypeError otherwise, whose text argparse shows (for a ValueError
    it showed "invalid parse_size value: 'abc'")."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 640x360")
    return int(w), int(h)


def default_size_problem(width: int, height: int) -> str | None:
    """Why a daemon with the default limits (the ones the benchmark and the study scripts spawn) refuses a WxH frame;
    None when it takes it. Said before such a daemon starts, not by its refusal once it runs."""
    if min(width, height) < 1:
        return "width and height must be at least 1"
    if width > Config.max_width or height > Config.max_height or width * height > Config.max_pixels:
        return f"the daemon takes frames up to {Config.max_width}x{Config.max_height} ({Config.max_pixels} pixels)"
    return None


def cli_prog(module: str, console_script: str) -> str:
    """The name usage lines should show: the console script when it was run as one, else ``python -m module``."""
    # argv[0] is the script's path for a console script and the module's file for `python -m`
    return console_script if pathlib.Path(sys.argv[0]).name == console_script else f"python -m {module}"


# --checkpoint of the daemon and of the offline CLI
MAX_THREADS = 1024  # CPU threads a tool may ask for: libgomp fails (or the process segfaults) far beyond the cores


def engine_setting_problems(*, threads: int, pad_channels: int, edge_pad: int | None = None) -> list[str]:
    """What is wrong with an engine's thread count, channel padding and edge padding (the daemon and the offline
    tools share these bounds), as short phrases; empty when all are fine."""
    bad = []
    if not 0 <= threads <= MAX_THREADS:
        bad.append(f"0 <= threads <= {MAX_THREADS} (0: the usable cores)")
    if not 0 <= pad_channels <= 64:
        bad.append("0 <= pad_channels <= 64")
    if edge_pad is not None and not 0 <= edge_pad <= MAX_EDGE_PAD:
        bad.append(f"0 <= edge_pad <= {MAX_EDGE_PAD}")
    return bad


def edge_pad_problem(pixels: int) -> str | None:
    """What is wrong with ``--edge-pad pixels``, in the words of the engine and the export, or None."""
    return None if 0 <= pixels <= MAX_EDGE_PAD else f"--edge-pad {pixels}: use 0 (off) to {MAX_EDGE_PAD} pixels"


SCALE_HELP = (f"scale of --model and of the nearest backend (default {DEFAULT_SCALE}); with a checkpoint, it must be "
              "the checkpoint's own")
CHECKPOINT_HELP = ("student checkpoint: a .safetensors file or a bundled name such as rlfn_s_native_x2 (default: the "
                   "bundled rlfn_s_takdsr_x2)")


def add_backend_arguments(p: argparse.ArgumentParser, default: str) -> None:
    """--backend, --cache-dir, --auto-backends and --tune-sizes (the daemon and the offline CLI share them)."""
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=default,
                   help="eager (alias torch): PyTorch; compile: torch.compile; onnxruntime; tensorrt (CUDA); auto: the "
                   "fastest of those within 2 levels / 50 dB of fp32 eager, measured per resolution and cached; "
                   "nearest: nearest-neighbour copy without a model, to measure transport alone (default: %(default)s)")
    p.add_argument("--cache-dir", type=pathlib.Path, help="auto's measurements, ONNX and TensorRT files (default: "
                   "$TAKDSR_CACHE_DIR, else $XDG_CACHE_HOME/takdsr or ~/.cache/takdsr)")
    p.add_argument("--auto-backends", type=parse_auto_backends, default=[],
                   metavar="B1,B2", help="what auto may pick from: backends (eager,compile,onnxruntime,tensorrt) or "
                   "labels (eager-bf16, compile-fp32); default all available")
    p.add_argument("--tune-sizes", type=parse_size, nargs="*", default=[], metavar="WxH",
                   help="LR sizes auto measures at start-up instead of on their first frame")
    p.add_argument("--pad-channels", type=int, default=0, metavar="N",
                   help="zero-pad an RLFN student's feature width to a multiple of N (52 -> 56 for N=8): the same "
                   "output, in channel counts fp16 tensor-core convolutions prefer; 0 (default): off")
    p.add_argument("--edge-pad", type=int, default=None, metavar="N",
                   help="repeat the frame's edge pixels N times on every side before the network and crop its "
                   "output (the network's zero padding otherwise darkens and tints the outermost pixels); 0: off "
                   f"(default {DEFAULT_EDGE_PAD})")


_AUTO_BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt")  # what auto measures (not nearest, no aliases)
_PRECISIONS = ("fp32", "fp16", "bf16")


def parse_auto_backends(text: str) -> list[str]:
    """--auto-backends: backend names or backend-precision labels. A typo used to match nothing and was dropped
    in silence, leaving auto fewer backends than asked for (onnxrutime: eager only)."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in _AUTO_BACKENDS
               and not (name.partition("-")[0] in _AUTO_BACKENDS and name.partition("-")[2] in _PRECISIONS)]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}: use backends ({', '.join(_AUTO_BACKENDS)}) "
                                         f"or labels backend-precision ({', '.join(_PRECISIONS)})")
    return names


def _runtime_path() -> pathlib.Path:
    """Where runtime_dir() is, without making or checking it."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return pathlib.Path(base) / "takdsr" if base else pathlib.Path(f"/tmp/takdsr-{os.getuid()}")


def runtime_dir() -> pathlib.Path:
    """A directory only this user can enter: $XDG_RUNTIME_DIR/takdsr or /tmp/takdsr-$UID (created 0700). Anything
    else there (not a directory, a link, another user's, group or other bits) is refused: another user could make
    /tmp/takdsr-<this uid> first and serve a socket in it."""
    path = _runtime_path()
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise ConfigError(f"cannot create the runtime directory {path}: {_not_created(path, exc)}") from exc
    euid, mode = os.geteuid(), stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != euid or mode & 0o077:
        kind = ("a directory" if stat.S_ISDIR(info.st_mode) else
                "a symbolic link" if stat.S_ISLNK(info.st_mode) else "no directory")
        # another user's cannot be removed by this one (/tmp is sticky): naming another endpoint is what helps
        advice = ("remove it or set XDG_RUNTIME_DIR" if info.st_uid == euid else
                  "another user made it and only they (or an administrator) can remove it: do not use a daemon there; "
                  f"set XDG_RUNTIME_DIR to a private folder of yours, or ${ENDPOINT_ENV} (the daemon's --endpoint) "
                  "to an endpoint of your own")
        raise ConfigError(f"{path} must be a directory owned by uid {euid} with mode 0700, but it is {kind} owned by "
                          f"uid {info.st_uid} with mode {mode:04o}; {advice}")
    return path


def _not_created(path: pathlib.Path, exc: OSError) -> str:
    """Why runtime_dir() could not make ``path``; what to do when $XDG_RUNTIME_DIR itself is gone (a variable kept
    from another login, through su or a tmux server)."""
    if isinstance(exc, FileNotFoundError) and not path.parent.is_dir():
        return (f"$XDG_RUNTIME_DIR ({path.parent}) does not exist; unset it or set it to a folder of yours, or set "
                f"${ENDPOINT_ENV} (the daemon's --endpoint) to an endpoint of your own")
    return str(exc)


def default_endpoint() -> str:
    """$TAKDSR_UPSCALER_ENDPOINT, else ipc://<runtime_dir()>/upscaler.sock. ConfigError naming the variable when it
    holds no endpoint, and naming $XDG_RUNTIME_DIR when that makes the socket path too long: the message would quote
    a value nobody typed."""
    from_environment = os.environ.get(ENDPOINT_ENV)
    if not from_environment:
        socket_path = _runtime_path() / "upscaler.sock"
        length = len(os.fsencode(socket_path))
        if length > _IPC_PATH_MAX:  # only a long $XDG_RUNTIME_DIR makes it so: name that, not a path nobody typed
            raise ConfigError(f"the default socket path {socket_path} is {length} bytes long, more than a Unix "
                              f"socket's {_IPC_PATH_MAX}, because $XDG_RUNTIME_DIR is long: set ${ENDPOINT_ENV} to "
                              "a shorter ipc:// path (or pass one with --endpoint), or use a shorter XDG_RUNTIME_DIR")
        return f"ipc://{runtime_dir() / 'upscaler.sock'}"
    try:
        check_endpoint(from_environment, allow_remote=True)  # the daemon checks the host again, without it
    except ConfigError as exc:
        raise ConfigError(f"${ENDPOINT_ENV}: {exc}") from None
    return from_environment


def nobody_listens(endpoint: str) -> str | None:
    """Why no daemon can be listening on an ``ipc://`` endpoint (no socket file, or one left by a daemon that is gone),
    else None: also when the probe cannot tell (a timeout, a name too long) and when this process may not connect to
    the socket (see :func:`unreachable`). ZeroMQ itself would wait for a listener until the timeout, attempt after
    attempt; and the daemon must not bind over a socket that someone listens on."""
    found = unreachable(endpoint)
    return found[1] if found is not None and found[0] == "absent" else None


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:  # gone meanwhile: it was a daemon's socket, removed as it stopped
        return True


def unreachable(endpoint: str) -> tuple[Literal["absent", "denied"], str] | None:
    """Why this process cannot reach a daemon on an ``ipc://`` endpoint, or None (also when the probe cannot tell):
    ("absent", why) when nobody listens (:func:`nobody_listens`), ("denied", why) when the socket file, or a folder
    above it, does not let this process connect: another user's daemon, which serves only its own user (its socket is
    0600 in a 0700 folder). libzmq would retry such a connect in silence until every attempt's timeout had passed."""
    path = endpoint.removeprefix("ipc://")
    if path == endpoint or path.startswith("@"):  # tcp://, or Linux's abstract namespace: no file to look at
        return None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_S)  # a listener whose backlog is full (a stopped daemon) would block connect forever
    try:
        probe.connect(path)  # the daemon's ZeroMQ drops a peer that leaves before its greeting
    except FileNotFoundError:
        return "absent", f"{path} does not exist"
    except ConnectionRefusedError:
        if not _is_socket(path):  # a regular file or a FIFO: no daemon ever listened there
            return "absent", f"{path} is not a socket: check the endpoint"
        return "absent", f"{path} was left by a daemon that is no longer running"
    except PermissionError:
        return "denied", _permission_denied(path)
    except OSError:  # a timeout, a name too long: ZeroMQ's own attempts report what they find
        return None
    finally:
        probe.close()
    return None


def _permission_denied(path: str) -> str:
    """What refused a connect to socket ``path``: the file itself or the first folder above it that this process
    cannot enter (the last one it can look at), with its owner and mode."""
    target = pathlib.Path(path)
    for candidate in (target, *target.parents):
        try:
            info = candidate.lstat()
        except OSError:  # inside a folder this process cannot enter: look at that folder
            continue
        whose = "it" if candidate == target else f"its folder {candidate}"
        return (f"permission denied on {path}: {whose} belongs to uid {info.st_uid} (mode "
                f"{stat.S_IMODE(info.st_mode):04o}) and this process runs as uid {os.geteuid()}; a daemon serves only "
                "its own user's clients: start one of your own, or run as the daemon's user")
    return f"permission denied on {path}; a daemon serves only its own user's clients"

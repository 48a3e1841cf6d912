"""Where the shared (not committed) project data lives, and the scenes reserved for evaluation."""

import contextlib
import os
from pathlib import Path

__all__ = ["REPO_ROOT", "default_eval_dir", "known_shared_dirs", "reserved_scenes", "shared_dir", "shared_hint"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """The shared data folder: $TAKDSR_SHARED, else `<repo>/../shared`."""
    env = os.environ.get("TAKDSR_SHARED")
    return Path(env) if env else REPO_ROOT.parent / "shared"


def known_shared_dirs() -> list[Path]:
    """Every shared data folder the project knows: $TAKDSR_SHARED's, then `<repo>/../shared` (once if the same).
    The training guard checks them all, so that $TAKDSR_SHARED pointing elsewhere, or at nothing, never lets the
    default folder's evaluation data be trained on."""
    return list(dict.fromkeys([shared_dir(), REPO_ROOT.parent / "shared"]))


def shared_hint() -> str:
    """Where the shared data folder was looked for and how to point elsewhere, for error messages."""
    if os.environ.get("TAKDSR_SHARED"):
        return f"the shared data folder is $TAKDSR_SHARED={shared_dir()}"
    if not (REPO_ROOT / "pyproject.toml").is_file():  # an installed package: there is no checkout to sit beside
        return "this is an installed package, not a checkout: set TAKDSR_SHARED to the shared data folder"
    return f"the shared data folder is {shared_dir()}, beside the checkout; set TAKDSR_SHARED to use another"


def default_eval_dir() -> Path:
    """The development evaluation frames (1920x1080 PNG). Never train on them."""
    return shared_dir() / "data" / "cg-dev"


def reserved_scenes(source: str, shared: Path | None = None) -> set[str]:
    """Scenes of `source` ("povray", "openarena", ...) that must never be rendered or trained on.

    Reads `<shared>/data/reserved-scenes.txt` (lines `<source> <scene>`, `#` comments). Without `shared`: the list
    of `shared_dir()`, plus those of the other known shared folders (`known_shared_dirs`), so that $TAKDSR_SHARED
    naming a folder with an older list never lets a scene the default folder reserves through. A missing file
    (`shared_dir()`'s, or `shared`'s) raises FileNotFoundError: without it nothing guarantees that training stays
    off the evaluation scenes.
    """
    if shared is not None:
        return _reserved_in(source, shared)
    scenes = _reserved_in(source, shared_dir())
    for other in known_shared_dirs()[1:]:
        with contextlib.suppress(FileNotFoundError):
            scenes |= _reserved_in(source, other)
    return scenes


def _reserved_in(source: str, shared: Path) -> set[str]:
    path = shared / "data" / "reserved-scenes.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: without it nothing keeps training off the evaluation scenes ({shared_hint()})"
        )
    scenes = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) == 2 and fields[0] == source:
            scenes.add(fields[1])
    return scenes

"""The guard that keeps training off the evaluation data: the cg-dev frames and renders of reserved POV-Ray scenes.

A training folder is refused when it is cg-dev, holds it, or reaches into it (a linked folder), when any file it
holds is a cg-dev frame under another name (a file link or a hard link), or when it holds renders of a reserved
scene (named by a data command's manifest, or by their output name alone).
"""

import json
import os
from pathlib import Path

from training.data.images import MANIFEST_NAME, DatasetError, walk_dataset
from training.data.paths import default_eval_dir, reserved_scenes
from training.data.povray import canonical_scene, output_name, refuse_reserved

__all__ = ["refuse_evaluation_data"]

FileId = tuple[int, int]  # (st_dev, st_ino): one file, whatever name or link reaches it


def refuse_evaluation_data(folder: Path) -> None:
    """DatasetError when training on `folder` would train on evaluation data (see the module docstring). Walks the
    folder as the scan does, so it sees what training would read."""
    eval_dir = default_eval_dir().resolve()
    if folder.resolve() in eval_dir.parents:
        raise DatasetError(f"{folder} holds the evaluation frames {eval_dir}: never train on them")
    eval_files = _file_ids(eval_dir)
    povray_like: list[Path] = []
    for reached, real, names in walk_dataset(folder):
        if real == eval_dir or eval_dir in real.parents:
            raise DatasetError(f"{reached} is the evaluation frames {eval_dir} or lies in them: never train on them")
        if MANIFEST_NAME in names:
            _refuse_reserved_renders(reached / MANIFEST_NAME)
        for name in names:
            _refuse_evaluation_file(reached / name, eval_dir, eval_files)
        povray_like += [reached / name for name in names if "__" in name]
    _refuse_reserved_names(povray_like)


def _file_ids(folder: Path) -> set[FileId]:
    """The identities of the files under `folder` as its scan reaches them (none when it does not exist)."""
    ids = set()
    for reached, _, names in walk_dataset(folder):
        for name in names:
            try:
                stat = (reached / name).stat()
            except OSError:  # a broken link holds no frame
                continue
            ids.add((stat.st_dev, stat.st_ino))
    return ids


def _refuse_evaluation_file(path: Path, eval_dir: Path, eval_files: set[FileId]) -> None:
    """DatasetError when `path` is a cg-dev frame under another name: a link into `eval_dir`, or a hard link to (or
    a link to another link of) one of its files."""
    try:
        stat = path.stat()
    except OSError:
        return  # a broken link: the scan skips it as unreachable
    if eval_dir in Path(os.path.realpath(path)).parents or (stat.st_dev, stat.st_ino) in eval_files:
        raise DatasetError(f"{path} is a link to a frame of the evaluation frames {eval_dir}: never train on them")


def _refuse_reserved_renders(manifest_path: Path) -> None:
    """DatasetError when `manifest_path` is a povray manifest that lists a reserved scene, or cannot be read: a
    damaged manifest would hide which scenes its folder's renders show."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise DatasetError(f"{manifest_path} cannot be read as JSON ({exc}), so the scenes its folder holds are "
                           "unknown: repair it (render the folder again) or move it out of the training data") from None
    scenes = manifest.get("scenes") if isinstance(manifest, dict) and "failed" in manifest else None
    if isinstance(scenes, dict):  # `python -m training.data povray` output
        try:
            refuse_reserved(list(scenes))
        except ValueError as exc:
            raise DatasetError(f"{manifest_path.parent} holds renders of scenes {exc}") from None


def _refuse_reserved_names(paths: list[Path]) -> None:
    """DatasetError for files named like the render of a reserved POV-Ray scene (`advanced__abyss.png`, any
    suffix or case), manifest or not: a render copied out of its folder is still one. `paths` are the files with
    `__` in their names (how output_name flattens a scene's folders; every scene lies in one), so the reserved
    list is read only when a folder holds such files; without the list (no shared folder) names are not checked,
    so any folder of images still trains."""
    if not paths:
        return
    try:
        scenes = reserved_scenes("povray")
    except FileNotFoundError:  # no shared folder here: the render command, which refuses without it, made none
        return
    reserved = {Path(output_name(canonical_scene(scene))).stem.lower(): scene for scene in scenes}
    hits = [path for path in paths if path.stem.lower() in reserved]
    if hits:
        more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
        raise DatasetError(f"{hits[0]}{more} is named like a render of {reserved[hits[0].stem.lower()]}, a scene "
                           "reserved for evaluation: never train on them")

"""The guard that keeps training off the evaluation data: the cg-dev frames and renders of reserved POV-Ray scenes.

A training folder is refused when it is cg-dev, holds it, or reaches into it (a linked folder), when any file it
holds is a cg-dev frame under another name (a file link or a hard link), or when it holds renders of a reserved
scene (named by a data command's manifest, or by their output name alone). cg-dev is guarded in every shared folder
the project knows ($TAKDSR_SHARED's and `<repo>/../shared`) that exists; the reserved list is read from the first
that has one. Without any reserved list (no shared folder, as on a researcher's own machine) names and manifests
are not checked: names with `__` are common in image folders, and would otherwise be refused for a missing list.
"""

import contextlib
import json
import os
import stat
import warnings
from pathlib import Path

from training.data.images import MANIFEST_NAME, DatasetError, walk_dataset
from training.data.paths import known_shared_dirs, reserved_scenes
from training.data.povray import canonical_scene, output_name, refuse_reserved

__all__ = ["refuse_evaluation_data", "refuse_evaluation_output"]

FileId = tuple[int, int]  # (st_dev, st_ino): one file, whatever name or link reaches it


def refuse_evaluation_data(folder: Path) -> None:
    """DatasetError when training on `folder` would train on evaluation data (see the module docstring). Walks the
    folder as the scan does, so it sees what training would read. The cg-dev frames of every shared folder the
    project knows are guarded, and the reserved list is the first of them that has one."""
    eval_dirs = _evaluation_dirs()
    for eval_dir in eval_dirs:
        if folder.resolve() in eval_dir.parents:
            raise DatasetError(f"{folder} holds the evaluation frames {eval_dir}: never train on them")
    eval_files = _file_ids(eval_dirs)
    reserved = _reserved_povray_scenes()
    povray_like: list[Path] = []
    for reached, real, names in walk_dataset(folder):
        _refuse_evaluation_folder(reached, real, eval_dirs)
        if MANIFEST_NAME in names and reserved is not None:
            _refuse_reserved_renders(reached / MANIFEST_NAME, reserved)
        _refuse_evaluation_files(reached, names, eval_dirs, eval_files)
        povray_like += [reached / name for name in names if "__" in name]
    if reserved is not None:
        _refuse_reserved_names(povray_like, reserved)


def refuse_evaluation_output(folder: Path) -> None:
    """DatasetError when a data command writing into `folder` would change evaluation data: `folder` is a cg-dev
    folder or lies in one, however it is spelt (a link, `..`). Its renders went in beside the frames, and the next
    evaluation scored them too."""
    # resolved also for a folder that does not exist yet: its existing part is
    eval_dir = _evaluation_dir_of(folder.resolve(), _evaluation_dirs())
    if eval_dir is not None:
        raise DatasetError(f"--out {folder} is the evaluation frames {eval_dir} or lies in them: never render "
                           "into them (the next evaluation would score the renders too); choose another folder")


def _evaluation_dir_of(real: Path, eval_dirs: list[Path]) -> Path | None:
    """The folder of `eval_dirs` that `real` (a resolved path) is or lies in, else None."""
    return next((eval_dir for eval_dir in eval_dirs if real == eval_dir or eval_dir in real.parents), None)


def _evaluation_dirs() -> list[Path]:
    """The cg-dev folders that exist, resolved, of every known shared folder. Warns when $TAKDSR_SHARED names a
    folder that does not exist: its cg-dev cannot be guarded, and only the default folder's is."""
    env = os.environ.get("TAKDSR_SHARED")
    if env and not Path(env).is_dir():
        others = ", ".join(map(str, known_shared_dirs()[1:])) or "none"
        warnings.warn(f"$TAKDSR_SHARED={env} does not exist: no evaluation data there can be kept out of training; "
                      f"the other shared folders guarded: {others} (set TAKDSR_SHARED to the shared data folder)",
                      UserWarning, stacklevel=3)
    found = [(shared / "data" / "cg-dev").resolve() for shared in known_shared_dirs()]
    return list(dict.fromkeys(path for path in found if path.is_dir()))


def _reserved_povray_scenes() -> set[str] | None:
    """The reserved POV-Ray scenes of every known shared folder that lists them (an older list in one must not let
    a scene another reserves through); None where none does."""
    lists = []
    for shared in known_shared_dirs():
        with contextlib.suppress(FileNotFoundError):
            lists.append(reserved_scenes("povray", shared))
    return set().union(*lists) if lists else None


def _refuse_evaluation_folder(reached: Path, real: Path, eval_dirs: list[Path]) -> None:
    """DatasetError when the scanned folder `reached` (really `real`) is a cg-dev folder or lies in one."""
    eval_dir = _evaluation_dir_of(real, eval_dirs)
    if eval_dir is not None:
        raise DatasetError(f"{reached} is the evaluation frames {eval_dir} or lies in them: never train on them")


def _file_ids(eval_dirs: list[Path]) -> dict[FileId, Path]:
    """The identities of the files under each of `eval_dirs` as its scan reaches them, each with its folder."""
    ids = {}
    for eval_dir in eval_dirs:
        for reached, _, names in walk_dataset(eval_dir):
            for name in names:
                try:
                    stat_result = (reached / name).stat()
                except OSError:  # a broken link holds no frame
                    continue
                ids[(stat_result.st_dev, stat_result.st_ino)] = eval_dir
    return ids


def _refuse_evaluation_files(folder: Path, names: list[str], eval_dirs: list[Path],
                             eval_files: dict[FileId, Path]) -> None:
    """DatasetError when a file `names` of `folder` is a cg-dev frame under another name: a hard link to (or a link
    to another link of) one of its files, or a link into a cg-dev folder. The file identity catches every link to a
    file the scan of cg-dev reads; only symbolic links are also resolved, for the files that scan passes over
    (hidden ones). Runs once per file of the dataset: a realpath of every file made the guard 60 times slower, and
    a Path per file took as long as the stat."""
    base = str(folder)
    for name in names:
        path = os.path.join(base, name)
        try:
            found = os.lstat(path)
            is_link = stat.S_ISLNK(found.st_mode)
            if is_link:
                found = os.stat(path)
        except OSError:
            continue  # a broken link: the scan skips it as unreachable
        eval_dir = eval_files.get((found.st_dev, found.st_ino))
        if eval_dir is None and is_link:
            eval_dir = _evaluation_dir_of(Path(os.path.realpath(path)), eval_dirs)  # a file: never a folder itself
        if eval_dir is not None:
            raise DatasetError(f"{path} is a link to a frame of the evaluation frames {eval_dir}: never train on them")


def _refuse_reserved_renders(manifest_path: Path, reserved: set[str]) -> None:
    """DatasetError when `manifest_path` is a povray manifest that lists a scene of `reserved`, or cannot be read: a
    damaged manifest would hide which scenes its folder's renders show."""
    try:
        # utf-8-sig: a manifest saved again by an editor that adds a byte-order mark is still the same manifest
        manifest = json.loads(manifest_path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise DatasetError(f"{manifest_path} cannot be read as JSON ({exc}), so the scenes its folder holds are "
                           "unknown: repair it (render the folder again) or move it out of the training data") from None
    scenes = manifest.get("scenes") if isinstance(manifest, dict) and "failed" in manifest else None
    if isinstance(scenes, dict):  # `python -m training.data povray` output
        try:
            refuse_reserved(list(scenes), reserved)
        except ValueError as exc:
            raise DatasetError(f"{manifest_path.parent} holds renders of scenes {exc}") from None


def _refuse_reserved_names(paths: list[Path], reserved_list: set[str]) -> None:
    """DatasetError for files named like the render of a scene of `reserved_list` (`advanced__abyss.png`, any
    suffix or case), manifest or not: a render copied out of its folder is still one. `paths` are the files with
    `__` in their names (how output_name flattens a scene's folders; every scene lies in one)."""
    reserved = {Path(output_name(canonical_scene(scene))).stem.lower(): scene for scene in reserved_list}
    hits = [path for path in paths if path.stem.lower() in reserved]
    if hits:
        more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
        raise DatasetError(f"{hits[0]}{more} is named like a render of {reserved[hits[0].stem.lower()]}, a scene "
                           "reserved for evaluation: never train on them")

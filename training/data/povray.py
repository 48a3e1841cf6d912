"""Rendering the curated POV-Ray example scenes (Debian's povray-examples) into a folder of training images.

Each scene renders unmodified, in a temporary copy of its folder (the examples are read-only and include files
relative to their folder), as the development frames were made: `povray +W.. +H.. +A0.3 +FN -D -V +I<scene>`,
plus `+WT1`: one render thread per povray process (parallelism comes from several processes), because POV-Ray's
multi-threaded radiosity, media and adaptive anti-aliasing depend on thread timing, so two multi-threaded renders
of the same scene differ in their pixels (docs/data.md has the measurement). The manifest (`manifest.json` in the
output folder) records per scene its path, command, seconds, the PNG's sha256 (the file, which also holds a render
date), the sha256 of its decoded pixels (equal for equal pictures) and its licence as Debian's copyright file
states it.
"""

import contextlib
import fnmatch
import hashlib
import os
import posixpath
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from training.data.images import MANIFEST_NAME, file_sha256, read_manifest, write_json_atomic
from training.data.paths import reserved_scenes

__all__ = [
    "COPYRIGHT_FILE",
    "EXAMPLES_DIR",
    "INCLUDE_DIR",
    "SCENE_LIST",
    "RenderRecord",
    "RenderStopped",
    "load_scene_list",
    "output_name",
    "pixels_sha256",
    "povray_command",
    "render_scene",
    "render_scenes",
    "scene_licence",
]

EXAMPLES_DIR = Path("/usr/share/doc/povray/examples")
INCLUDE_DIR = Path("/usr/share/povray-3.7/include")
COPYRIGHT_FILE = Path("/usr/share/doc/povray-examples/copyright")
SCENE_LIST = Path(__file__).with_name("povray_scenes.txt")
_STOP_POLL_S = 0.2  # how often a running render and the queue look at the stop flag
# The copyright file names scenes by their path in the upstream source tree.
_UPSTREAM_PREFIX = "distribution/scenes/"


@dataclass
class RenderRecord:
    """One rendered scene, as the manifest stores it."""

    scene: str  # relative to EXAMPLES_DIR
    png: str  # file name inside the output folder
    command: list[str]  # run in a copy of the scene's folder
    seconds: float
    sha256: str  # of the file
    pixels_sha256: str  # of the decoded pixels, see pixels_sha256()
    licence: str
    width: int
    height: int
    povray_version: str = ""  # other builds may round differently (docs/data.md); "" in older manifests


def load_scene_list(path: Path = SCENE_LIST) -> list[str]:
    """Scenes of a list file: one path relative to EXAMPLES_DIR a line, `#` starts a comment; each in its
    canonical spelling (see canonical_scene)."""
    scenes = []
    for line in path.read_text(encoding="utf-8").splitlines():
        scene = line.split("#", 1)[0].strip()
        if scene:
            scenes.append(canonical_scene(scene))
    return scenes


def canonical_scene(scene: str) -> str:
    """`scene` relative to EXAMPLES_DIR and normalised (`./a//b.pov` and `EXAMPLES_DIR/a/b.pov` -> `a/b.pov`): the
    one spelling the reserved list, the manifest and the output names use. ValueError for a path outside it."""
    path = posixpath.normpath(scene)
    root = posixpath.normpath(EXAMPLES_DIR.as_posix())
    if posixpath.isabs(path):
        if not path.startswith(root + "/"):
            raise ValueError(f"scene {scene} is not under {EXAMPLES_DIR}")
        path = path[len(root) + 1 :]
    if path in (".", "..") or path.startswith("../"):
        raise ValueError(f"scene {scene} is not a file under {EXAMPLES_DIR}")
    return path


def refuse_reserved(scenes: list[str], reserved_list: set[str] | None = None) -> None:
    """ValueError naming every scene of `scenes` the evaluation reserves (`reserved_list`, by default the shared
    folder's), however it is spelt (compared in the canonical spelling, and as resolved files, so a symlink to a
    reserved scene is caught too)."""
    reserved = {canonical_scene(s) for s in (reserved_scenes("povray") if reserved_list is None else reserved_list)}
    reserved_files = {(EXAMPLES_DIR / s).resolve() for s in reserved}
    hits = sorted(s for s in scenes if canonical_scene(s) in reserved
                  or (EXAMPLES_DIR / canonical_scene(s)).resolve() in reserved_files)  # fmt: skip
    if hits:
        raise ValueError(f"reserved for evaluation, never render: {', '.join(hits)}")


def _copyright_stanzas(text: str) -> list[tuple[list[str], str]]:
    """Debian machine-readable copyright -> [(file patterns, licence)] of its `Files:` paragraphs, in order."""
    stanzas = []
    for paragraph in text.split("\n\n"):
        fields: dict[str, list[str]] = {}
        key = None
        for line in paragraph.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += line.split()  # continuation line
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.split()
        if "Files" in fields and fields.get("License"):
            stanzas.append((fields["Files"], fields["License"][0]))
    return stanzas


def scene_licence(scene: str, copyright_file: Path = COPYRIGHT_FILE) -> str:
    """The licence of an example scene per the package's copyright file (DEP-5: the last matching paragraph wins)."""
    upstream = _UPSTREAM_PREFIX + scene
    licence = None
    for patterns, name in _copyright_stanzas(copyright_file.read_text(encoding="utf-8")):
        if any(fnmatch.fnmatchcase(upstream, pattern) for pattern in patterns):
            licence = name
    if licence is None:
        raise ValueError(f"no licence for {upstream} in {copyright_file}")
    return licence


def output_name(scene: str) -> str:
    """`advanced/blocks/stackergold.pov` -> `advanced__blocks__stackergold.png` (one flat folder)."""
    return scene.removesuffix(".pov").replace("/", "__") + ".png"


def _threshold_text(threshold: float) -> str:
    """POV-Ray refuses "+A0" and exponents ("+A1e-07"): those are written in fixed point. Others keep the short
    form ("0.3"), which earlier manifests recorded, so their renders still count as done."""
    text = f"{threshold:g}"
    return text if "." in text and "e" not in text else f"{threshold:.6f}"


def povray_command(
    scene: str, width: int, height: int, antialias: float | None, out_name: str, work_threads: int = 1
) -> list[str]:
    """The command line, run from the scene's folder. `antialias`: adaptive threshold (+A), None for none.
    `work_threads`: POV-Ray's render threads (+WT); 1 renders the same pixels every time, 0 leaves POV-Ray's
    default (one per core), which is not reproducible."""
    if work_threads < 0:
        raise ValueError(f"work_threads must be >= 0, got {work_threads}")
    aa = "-A" if antialias is None else f"+A{_threshold_text(antialias)}"
    size = [f"+W{width}", f"+H{height}"]
    threads = [f"+WT{work_threads}"] if work_threads else []
    scene_args = [f"+L{INCLUDE_DIR}", f"+I{Path(scene).name}", f"+O{out_name}"]
    return ["povray", *size, aa, *threads, "+FN", "-D", "-V", *scene_args]


def pixels_sha256(path: Path) -> str:
    """sha256 of an image's decoded pixels and shape: equal for equal pictures, whatever the file's metadata
    (POV-Ray writes the render date into the PNG) or compression."""
    data = np.fromfile(path, np.uint8)  # the bytes, not imread: OpenCV crashes on a name that is not UTF-8
    pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if pixels is None:
        raise ValueError(f"{path}: not a readable image")
    digest = hashlib.sha256(f"{pixels.shape} {pixels.dtype}".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


def render_scene(
    scene: str,
    out_dir: Path,
    width: int,
    height: int,
    *,
    antialias: float | None = 0.3,
    timeout: float = 600.0,
    work_threads: int = 1,
    stop: threading.Event | None = None,
) -> RenderRecord:
    """Render one scene to `out_dir/output_name(scene)`. Raises RuntimeError on failure or timeout, and
    RenderStopped when `stop` is set while povray runs (the process is killed).

    The PNG appears only once complete (rendered in a temporary folder, then moved), so a killed run never
    leaves a partial image that a later run would skip.
    """
    refuse_reserved([scene])
    scene = canonical_scene(scene)
    stop = stop or threading.Event()
    if stop.is_set():
        raise RenderStopped(scene)
    source = EXAMPLES_DIR / scene
    if not source.is_file():
        raise FileNotFoundError(f"no scene {source} (is Debian's povray-examples installed?)")
    command = povray_command(scene, width, height, antialias, "render.png", work_threads)
    with tempfile.TemporaryDirectory(prefix="takdsr-povray-") as tmp:
        workdir = Path(tmp) / "scene"
        shutil.copytree(source.parent, workdir)
        start = time.perf_counter()
        returncode, stderr = _run_povray(command, workdir, scene, timeout, stop)
        seconds = time.perf_counter() - start
        rendered = workdir / "render.png"
        if returncode != 0 or not rendered.is_file():
            raise RuntimeError(f"{scene}: povray exit {returncode}: {stderr.strip()[-400:]}")
        final = out_dir / output_name(scene)
        shutil.move(rendered, final.with_suffix(".part"))
        os.replace(final.with_suffix(".part"), final)
    return RenderRecord(
        scene, final.name, command, round(seconds, 2), file_sha256(final), pixels_sha256(final), scene_licence(scene),
        width, height, povray_version(stderr),
    )  # fmt: skip


def povray_version(banner: str) -> str:
    """POV-Ray's version as a render's banner on stderr gives it ("Ray Tracer Version 3.7.0.10.unofficial"), or
    "unknown" (a wrapper script that prints no banner)."""
    found = re.search(r"Ray Tracer Version (\d\S*)", banner)
    return found[1] if found else "unknown"


class RenderStopped(Exception):
    """A render was stopped on request (Ctrl-C, SIGTERM): not a failure of its scene."""


def _run_povray(command: list[str], workdir: Path, scene: str, timeout: float,
                stop: threading.Event) -> tuple[int, str]:
    """(exit status, stderr) of povray; RuntimeError after `timeout` s, RenderStopped once `stop` is set (killed)."""
    # its own session: a terminal's Ctrl-C reaches only this command, which then stops povray itself
    process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, stderr = process.communicate(timeout=_STOP_POLL_S)  # retrying loses no output
            return process.returncode, stderr
        except subprocess.TimeoutExpired:
            if stop.is_set() or time.monotonic() > deadline:
                # the whole session: a povray that is a wrapper script leaves a child holding the pipes, and
                # communicate() would wait for it however long it runs
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                if stop.is_set():
                    raise RenderStopped(scene) from None
                raise RuntimeError(f"{scene}: timed out after {timeout:g} s") from None


def _load_manifest(path: Path) -> dict:
    return read_manifest(path, ("scenes", "failed"), "povray")


def _is_done(out_dir: Path, record: dict | None, command: list[str]) -> bool:
    """Rendered already with this exact command, and the PNG is the one the manifest hashed."""
    if record is None or record["command"] != command:
        return False
    png = out_dir / record["png"]
    return png.is_file() and file_sha256(png) == record["sha256"]


def render_scenes(
    scenes: list[str],
    out_dir: Path,
    width: int,
    height: int,
    *,
    jobs: int = 1,
    timeout: float = 600.0,
    antialias: float | None = 0.3,
    work_threads: int = 1,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> dict:
    """Render `scenes` into `out_dir` with `jobs` parallel povray processes, skipping those already rendered with
    the same command. Updates `out_dir/manifest.json` after every scene and returns it; failures (errors,
    timeouts) are listed under "failed" and do not stop the others. Setting `stop` (a signal handler's flag)
    kills the running renders, drops the queued ones and returns what is done; so does KeyboardInterrupt, which is
    then raised again."""
    stop = stop or threading.Event()
    refuse_reserved(scenes)
    scenes = list(dict.fromkeys(canonical_scene(s) for s in scenes))  # one spelling: ./a.pov and a.pov are one scene
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    manifest = _load_manifest(manifest_path)
    _refuse_other_size(out_dir, manifest, width, height)

    def command_of(scene: str) -> list[str]:
        return povray_command(scene, width, height, antialias, "render.png", work_threads)

    todo = [s for s in scenes if not _is_done(out_dir, manifest["scenes"].get(s), command_of(s))]
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))  # threads: the work is in povray processes
    bar = tqdm(total=len(scenes), initial=len(scenes) - len(todo), desc="povray", unit="scene", disable=not progress)
    futures: dict[Future, str] = {}
    pending: set[Future] = set()

    def record(finished: set[Future]) -> None:
        for future in finished:
            if _record(manifest, out_dir, futures[future], future):
                write_json_atomic(manifest_path, manifest)
                bar.update()  # a stopped render is not counted: the bar ended on 1/3 with no scene done

    try:
        for scene in todo:
            futures[pool.submit(render_scene, scene, out_dir, width, height, antialias=antialias, timeout=timeout,
                                work_threads=work_threads, stop=stop)] = scene  # fmt: skip
        pending = set(futures)
        while pending and not stop.is_set():
            done, pending = wait(pending, timeout=_STOP_POLL_S, return_when=FIRST_COMPLETED)
            record(done)
    finally:  # stopped by the flag or an exception (KeyboardInterrupt): keep what finished, nothing else runs on
        unfinished = [future for future in futures if not future.done()]
        for future in unfinished:
            future.cancel()  # the queued ones never start
        if unfinished:
            stop.set()  # the running ones kill their povray
        pool.shutdown(wait=True)
        record({future for future in pending if future.done() and not future.cancelled()})  # finished meanwhile
        bar.close()
    return manifest


def _refuse_other_size(out_dir: Path, manifest: dict, width: int, height: int) -> None:
    """ValueError when the folder holds renders of another size: a folder source reads the folder whole, so a rerun
    with another --width or --height left pictures of two sizes to train on (`scenes` refuses the same)."""
    other = {name: record for name, record in manifest["scenes"].items()
             if (record.get("width"), record.get("height")) != (width, height)}  # fmt: skip
    if other:
        name, record = next(iter(other.items()))
        raise ValueError(f"{out_dir} holds renders of another size ({len(other)}, e.g. {name} at "
                         f"{record.get('width')}x{record.get('height')}): render {width}x{height} into another --out "
                         "folder, or remove that folder first")


def _record(manifest: dict, out_dir: Path, scene: str, future: Future) -> bool:
    """One finished render into the manifest: its record, or why it failed; False for a stopped render, which is
    neither. A failed scene loses the picture of an earlier command too, so a folder never trains on what this
    command did not make."""
    try:
        manifest["scenes"][scene] = asdict(future.result())
        manifest["failed"].pop(scene, None)
    except (RuntimeError, OSError) as exc:
        manifest["failed"][scene] = str(exc)
        stale = manifest["scenes"].pop(scene, None)
        if stale is not None:
            (out_dir / stale["png"]).unlink(missing_ok=True)
    except RenderStopped:
        return False
    return True

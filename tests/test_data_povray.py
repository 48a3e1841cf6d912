"""The curated POV-Ray scene list, licences, and one tiny render through the command line."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.data.images import read_image
from training.data.paths import REPO_ROOT, reserved_scenes, shared_dir
from training.data.povray import (
    COPYRIGHT_FILE,
    EXAMPLES_DIR,
    canonical_scene,
    load_scene_list,
    pixels_sha256,
    povray_command,
    render_scenes,
    scene_licence,
)

FAST_SCENE = "objects/wtorus.pov"  # well under a second at 320x180

SETUP_HINT = "bash scripts/setup.sh --dev installs it (Debian packages povray and povray-examples)"


@pytest.fixture
def examples_installed() -> None:
    """A failure, not a skip: the README's test command installs POV-Ray and its example scenes."""
    if not EXAMPLES_DIR.is_dir() or not COPYRIGHT_FILE.is_file():
        pytest.fail(f"Debian's povray-examples is not installed ({EXAMPLES_DIR}); {SETUP_HINT}")


@pytest.fixture
def povray_installed() -> None:
    if shutil.which("povray") is None:
        pytest.fail(f"povray is not installed; {SETUP_HINT}")


needs_examples = pytest.mark.usefixtures("examples_installed")
needs_povray = pytest.mark.usefixtures("povray_installed")


def test_curated_list_is_disjoint_from_reserved_scenes() -> None:
    scenes = load_scene_list()
    reserved = reserved_scenes("povray")
    assert len(reserved) >= 10  # the file was found and parsed
    assert len(scenes) >= 40 and len(set(scenes)) == len(scenes)
    assert not set(scenes) & reserved


def test_reserved_parsing_follows_the_shared_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reserved-scenes.txt").write_text("# c\npovray a/b.pov\nopenarena x\npovray c.pov # d\n")
    monkeypatch.setenv("TAKDSR_SHARED", str(tmp_path))
    assert reserved_scenes("povray", tmp_path) == {"a/b.pov", "c.pov"}
    checkout_shared = REPO_ROOT.parent / "shared"  # the checkout's list, where there is one: an older list adds to it
    has_list = (checkout_shared / "data" / "reserved-scenes.txt").is_file()  # none beside a clone run elsewhere
    default = reserved_scenes("povray", checkout_shared) if has_list else set()
    assert reserved_scenes("povray") == {"a/b.pov", "c.pov"} | default
    monkeypatch.setenv("TAKDSR_SHARED", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="TAKDSR_SHARED"):  # never an empty list: that would allow all
        reserved_scenes("povray")
    monkeypatch.delenv("TAKDSR_SHARED")
    assert shared_dir() == REPO_ROOT.parent / "shared"


def test_a_reserved_scene_is_refused_however_it_is_spelt(tmp_path: Path) -> None:
    reserved = sorted(reserved_scenes("povray"))[0]
    folder, name = reserved.rsplit("/", 1)
    for spelling in (reserved, f"./{reserved}", f"{folder}//{name}", f"{folder}/../{folder}/{name}",
                     str(EXAMPLES_DIR / reserved)):  # fmt: skip
        with pytest.raises(ValueError, match="reserved for evaluation, never render"):
            render_scenes([FAST_SCENE, spelling], tmp_path, 32, 18)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_scene_paths_are_canonical_and_stay_under_the_examples() -> None:
    assert canonical_scene("./objects//wtorus.pov") == canonical_scene(str(EXAMPLES_DIR / "objects/wtorus.pov"))
    assert canonical_scene("./objects//wtorus.pov") == "objects/wtorus.pov"
    for outside in ("../secret.pov", "/etc/passwd", "."):
        with pytest.raises(ValueError, match="not"):
            canonical_scene(outside)


def test_an_output_folder_of_another_command_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"frames": {}}))  # what the scenes command writes
    with pytest.raises(ValueError, match=r"was not written by `python -m training\.data povray`"):
        render_scenes([FAST_SCENE], tmp_path, 32, 18)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        render_scenes([FAST_SCENE], tmp_path, 32, 18)


@needs_examples
def test_curated_scenes_exist_and_keep_the_aspect_ratio() -> None:
    for scene in load_scene_list():
        text = (EXAMPLES_DIR / scene).read_text(encoding="latin-1")
        assert "image_width/image_height" in text.replace(" ", ""), scene


@needs_examples
def test_licences_follow_the_copyright_file() -> None:
    assert scene_licence("advanced/blocks/stackergold.pov") == "CC-BY-SA-3.0"
    assert scene_licence("camera/perspective.pov") == "CC-BY-SA-3.0"  # listed with advanced/ in the file
    assert scene_licence("objects/wtorus.pov") == "CC-BY-3.0"
    assert {scene_licence(s) for s in load_scene_list()} == {"CC-BY-3.0", "CC-BY-SA-3.0"}


def test_reserved_scenes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        render_scenes(["advanced/teapot/teapot.pov"], tmp_path, 32, 18, progress=False)
    assert not list(tmp_path.iterdir())


def _run(out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "training.data", "povray", "--out", str(out), "--width", "48", "--height", "27",
               "--jobs", "1", "--timeout", "60", "--only", FAST_SCENE.removesuffix(".pov")]  # as docs/data.md spells it
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


@needs_povray
@needs_examples
def test_render_one_scene_through_the_command(tmp_path: Path) -> None:
    out = tmp_path / "pov"
    result = _run(out)
    assert result.returncode == 0, result.stderr
    png = out / "objects__wtorus.png"
    image = read_image(png)
    assert image.shape == (3, 27, 48) and image.std() > 0.01  # a picture, not a blank frame
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["scenes"][FAST_SCENE]
    assert record["sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()
    assert record["pixels_sha256"] == pixels_sha256(png)
    assert record["licence"] == "CC-BY-3.0" and record["png"] == png.name and record["seconds"] > 0
    version = subprocess.run(["povray", "--version"], capture_output=True, text=True, timeout=30).stderr
    assert record["povray_version"][0].isdigit() and record["povray_version"] in version  # builds round otherwise
    assert record["command"][0] == "povray" and "+W48" in record["command"] and "+A0.3" in record["command"]
    assert "+WT1" in record["command"]
    assert manifest["failed"] == {}

    mtime = png.stat().st_mtime_ns
    again = _run(out)  # already rendered with the same command: skipped
    assert again.returncode == 0 and png.stat().st_mtime_ns == mtime
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_pixel_digest_ignores_file_bytes_but_not_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (9, 16, 3), dtype=np.uint8)
    fast, small = tmp_path / "fast.png", tmp_path / "small.png"
    cv2.imwrite(str(fast), picture, [cv2.IMWRITE_PNG_COMPRESSION, 0])
    cv2.imwrite(str(small), picture, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert fast.read_bytes() != small.read_bytes()
    assert pixels_sha256(fast) == pixels_sha256(small)
    picture[4, 7, 1] ^= 1
    cv2.imwrite(str(small), picture)
    assert pixels_sha256(fast) != pixels_sha256(small)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        pixels_sha256(tmp_path / "junk.png")


def test_work_threads_reach_the_command_line() -> None:
    assert "+WT1" in povray_command("objects/wtorus.pov", 48, 27, 0.3, "out.png")  # the default: reproducible
    assert "+WT3" in povray_command("objects/wtorus.pov", 48, 27, 0.3, "out.png", work_threads=3)
    assert not any(arg.startswith("+WT") for arg in povray_command("objects/wtorus.pov", 48, 27, 0.3, "o.png", 0))
    with pytest.raises(ValueError, match="work_threads"):
        povray_command("objects/wtorus.pov", 48, 27, 0.3, "out.png", work_threads=-1)
    refused = subprocess.run([sys.executable, "-m", "training.data", "povray", "--out", "x", "--work-threads", "-1"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "--work-threads" in refused.stderr


@pytest.mark.parametrize("threshold", ["1", "2.5", "inf", "nan", "-0.1", "x"])
def test_an_antialias_threshold_povray_refuses_is_an_argument_error(threshold: str, tmp_path: Path) -> None:
    """POV-Ray 3.7 takes +A with 0 <= threshold < 1 in fixed point: "--antialias 1" (or inf, nan) failed every
    scene, and a failed scene deletes its earlier render."""
    command = [sys.executable, "-m", "training.data", "povray", "--out", str(tmp_path / "out"),
               "--antialias", threshold]
    refused = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "need 0 <= threshold < 1" in refused.stderr, refused.stderr
    assert not (tmp_path / "out").exists()


def test_antialias_thresholds_are_written_as_povray_reads_them() -> None:
    """"+A0" and "+A1e-07" (the :g form) are refused by POV-Ray; 0.3 keeps the form earlier manifests recorded."""
    assert "+A0.000000" in povray_command("objects/wtorus.pov", 48, 27, 0.0, "out.png")
    assert "+A0.000000" in povray_command("objects/wtorus.pov", 48, 27, 1e-7, "out.png")
    assert "+A0.3" in povray_command("objects/wtorus.pov", 48, 27, 0.3, "out.png")


@pytest.mark.parametrize("bad", [
    ["povray", "--width", "-8"], ["povray", "--height", "0"], ["povray", "--timeout", "-1"],
    ["povray", "--timeout", "nan"], ["povray", "--jobs", "0"], ["scenes", "--count", "0"],
    ["scenes", "--count", "1", "--supersample", "0"],
])  # fmt: skip
def test_sizes_counts_and_timeouts_must_be_positive(bad: list[str], tmp_path: Path) -> None:
    """POV-Ray spun at full CPU for the whole timeout on +W-8 (writing a state file of hundreds of MB); +W0 failed
    every scene one by one; a negative timeout abandoned every scene."""
    command = [sys.executable, "-m", "training.data", bad[0], "--out", str(tmp_path / "out"), *bad[1:]]
    refused = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and f"argument {bad[-2]}: must be" in refused.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_made_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    command = [sys.executable, "-m", "training.data", "scenes", "--out", str(tmp_path / "a_file" / "sub"), "--count",
               "1", "--width", "64", "--height", "32"]  # fmt: skip
    refused = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "Traceback" not in refused.stderr


_FAKE_POVRAY = """#!/bin/sh
# stands in for povray: with +A0.5 it fails; wtorus "renders" at once (a copy of a PNG); any other scene runs until
# it is killed
case "$*" in
  *+A0.5*) echo "Parse Error" >&2; exit 1 ;;
  *wtorus*) cp "$TAKDSR_FAKE_PNG" render.png ;;
  *) if [ -n "$TAKDSR_FAKE_WRAPPER" ]; then sleep 600 & echo "$!" >> "$TAKDSR_FAKE_PIDS"; fi
     echo "$$" >> "$TAKDSR_FAKE_PIDS"; exec sleep 600 ;;
esac
"""


def _fake_povray_env(tmp_path: Path) -> dict[str, str]:
    fake = tmp_path / "bin" / "povray"
    fake.parent.mkdir()
    fake.write_text(_FAKE_POVRAY)
    fake.chmod(0o755)
    assert cv2.imwrite(str(tmp_path / "frame.png"), np.full((27, 48, 3), 90, np.uint8))
    (tmp_path / "tmp").mkdir()
    return {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "TMPDIR": str(tmp_path / "tmp"),
            "TAKDSR_FAKE_PNG": str(tmp_path / "frame.png"), "TAKDSR_FAKE_PIDS": str(tmp_path / "pids")}  # fmt: skip


@needs_examples
def test_a_failed_rerender_drops_the_picture_of_the_earlier_command(tmp_path: Path) -> None:
    """The old picture stayed, listed both as rendered and as failed, and a folder source trained on it."""
    env, out = _fake_povray_env(tmp_path), tmp_path / "pov"
    command = [sys.executable, "-m", "training.data", "povray", "--out", str(out), "--width", "48", "--height", "27",
               "--jobs", "1", "--only", FAST_SCENE]  # fmt: skip
    first = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and (out / "objects__wtorus.png").is_file(), first.stderr
    again = subprocess.run([*command, "--antialias", "0.5"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert again.returncode == 1 and "Parse Error" in again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scenes"] == {} and list(manifest["failed"]) == [FAST_SCENE]
    assert not (out / "objects__wtorus.png").exists()


@needs_examples
def test_a_rerun_of_another_size_into_the_same_folder_is_refused(tmp_path: Path) -> None:
    """A rerun with another --width left renders of two sizes in one folder, which a folder source reads whole."""
    env, out = _fake_povray_env(tmp_path), tmp_path / "pov"
    command = [sys.executable, "-m", "training.data", "povray", "--out", str(out), "--height", "27", "--jobs", "1",
               "--only", FAST_SCENE]  # fmt: skip
    first = subprocess.run([*command, "--width", "48"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert first.returncode == 0, first.stderr
    manifest = (out / "manifest.json").read_text()
    again = subprocess.run([*command, "--width", "96"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert again.returncode == 2
    assert again.stderr == (f"error: {out} holds renders of another size (1, e.g. {FAST_SCENE} at 48x27): render "
                            "96x27 into another --out folder, or remove that folder first\n")
    assert (out / "manifest.json").read_text() == manifest and (out / "objects__wtorus.png").is_file()


@needs_examples
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_stops_the_renders_and_keeps_what_finished(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM used to orphan the running povray and leave its temporary folder; Ctrl-C ran every queued scene
    to the end and then lost the manifest; a closed terminal (SIGHUP) must not leave povray running in its own
    session. Now: running renders killed, queued ones dropped, finished ones kept."""
    env = _fake_povray_env(tmp_path)
    # in this order, two at a time: wtorus and crater start, wtorus ends, diffract starts, bwstripe waits
    scene_list = tmp_path / "scenes.txt"
    scene_list.write_text(f"{FAST_SCENE}\nadvanced/crater/crater.pov\nadvanced/diffract.pov\nadvanced/bwstripe.pov\n")
    out, pids_file = tmp_path / "pov", tmp_path / "pids"
    command = [sys.executable, "-m", "training.data", "povray", "--out", str(out), "--width", "48", "--height", "27",
               "--jobs", "2", "--scenes", str(scene_list)]  # fmt: skip
    run = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pids_file.exists() and len(pids_file.read_text().split()) == 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    run.send_signal(sig)
    _, stderr = run.communicate(timeout=30)
    assert run.returncode == 128 + sig and "stopped by signal" in stderr, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["scenes"]) == [FAST_SCENE] and manifest["failed"] == {}  # a stopped scene did not fail
    pids = [int(pid) for pid in pids_file.read_text().split()]
    assert len(pids) == 2  # bwstripe, queued, never started
    time.sleep(0.2)
    for pid in pids:  # killed (gone, or a zombie of a parent that has exited: init reaps it)
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not list((tmp_path / "tmp").iterdir())  # the scenes' temporary copies are gone


@needs_examples
def test_a_timed_out_povray_wrapper_is_killed_with_its_children(tmp_path: Path) -> None:
    """A povray that is a wrapper script (xvfb-run, a site script) leaves a child holding its output pipes: killing
    only the wrapper left the command waiting on them far past --timeout (600 s for a 2 s timeout)."""
    env = {**_fake_povray_env(tmp_path), "TAKDSR_FAKE_WRAPPER": "1"}
    command = [sys.executable, "-m", "training.data", "povray", "--out", str(tmp_path / "pov"), "--width", "48",
               "--height", "27", "--jobs", "1", "--timeout", "2", "--only", "advanced/crater/crater.pov"]
    started = time.monotonic()
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "timed out after 2 s" in run.stderr, run.stderr
    assert time.monotonic() - started < 30
    time.sleep(0.2)
    for pid in map(int, (tmp_path / "pids").read_text().split()):  # the wrapper and its child
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@needs_povray
@needs_examples
def test_a_radiosity_scene_renders_the_same_pixels_twice(tmp_path: Path) -> None:
    # With POV-Ray's default threads this scene's radiosity differs from run to run (docs/data.md).
    scene = "radiosity/radiosity_37.pov"
    first = render_scenes([scene], tmp_path / "a", 160, 90, timeout=120, progress=False)["scenes"][scene]
    second = render_scenes([scene], tmp_path / "b", 160, 90, timeout=120, progress=False)["scenes"][scene]
    assert "+WT1" in first["command"]
    assert first["pixels_sha256"] == second["pixels_sha256"]


def test_a_stopped_render_is_neither_recorded_nor_counted_as_done(tmp_path: Path) -> None:
    """The progress bar counted a render stopped by Ctrl-C as done (it ended on 1/3 with no scene in the manifest):
    _record now says whether it recorded anything."""
    from concurrent.futures import Future

    from training.data.povray import RenderStopped, _record

    stopped: Future = Future()
    stopped.set_exception(RenderStopped())
    failed: Future = Future()
    failed.set_exception(RuntimeError("Parse Error"))
    manifest: dict = {"scenes": {}, "failed": {}}
    assert _record(manifest, tmp_path, FAST_SCENE, stopped) is False and manifest == {"scenes": {}, "failed": {}}
    assert _record(manifest, tmp_path, FAST_SCENE, failed) is True and manifest["failed"] == {FAST_SCENE: "Parse Error"}

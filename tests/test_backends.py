"""Every inference backend against fp32 eager, ``auto``'s choice and its on-disk cache, and the daemon serving
frames through ``--backend onnxruntime`` and ``--backend auto``. Unavailable backends (TensorRT, CUDA ones on a CPU
machine) are skipped with the reason."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import subprocess
import sys
import threading
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
import torch

from upscaler_server.backends import TOLERANCE, AutoEngine, Settings, Tolerance, unavailable
from upscaler_server.backends.auto import accuracy, candidate_labels
from upscaler_server.backends.common import cpu_bf16
from upscaler_server.client import UpscalerClient
from upscaler_server.config import CACHING_BACKENDS, DEFAULT_EDGE_PAD
from upscaler_server.engine import Engine, create_engine
from upscaler_server.errors import ConfigError
from upscaler_server.loading import served_network
from upscaler_server.protocol import PIXEL_FORMATS

from server_utils import REPO, ArrayFrame, make_checkpoint, run_server

RNG = np.random.default_rng(5)
ONNXRUNTIME_HINT = "onnxruntime comes with the dev install: bash scripts/setup.sh --dev"
FP32_MAX_LEVELS = 1  # fp32 backends reorder float sums: a value at a rounding boundary may move one level
CASES = [("eager", "cpu", "bf16"), ("compile", "cpu", "fp32"), ("compile", "cpu", "bf16"),
         ("onnxruntime", "cpu", "fp32"), ("eager", "cuda", "fp16"), ("compile", "cuda", "fp16"),
         ("onnxruntime", "cuda", "fp32"), ("tensorrt", "cuda", "fp16")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "student.safetensors")


@pytest.fixture(scope="module", autouse=True)
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # engines set the process-wide count


@pytest.fixture(scope="module")
def reference(checkpoint: pathlib.Path) -> Engine:
    return create_engine(checkpoint=checkpoint, backend="eager", device="cpu", precision="fp32", threads=1)


def _within(out: np.ndarray, expected: np.ndarray, max_levels: int, tolerance: Tolerance = TOLERANCE) -> None:
    max_diff, psnr = accuracy(expected, out)
    assert max_diff <= max_levels and psnr >= tolerance.min_psnr, f"{max_diff} levels, {psnr:.1f} dB"


def test_onnxruntime_threads_do_not_spin_between_frames(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """onnxruntime's threads spun after each frame, burning CPU the daemon's neighbours (a game) could use while it
    waits for the next frame; the same speed without."""
    engine = create_engine(checkpoint=checkpoint, backend="onnxruntime", device="cpu", threads=1, cache_dir=tmp_path)
    options = engine._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    engine.close()


def test_accuracy_measure() -> None:
    a = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert accuracy(a, a) == (0, math.inf)
    b = a.astype(np.int16)
    b[0, 0, 0] = (b[0, 0, 0] + 3) % 256 if b[0, 0, 0] < 253 else b[0, 0, 0] - 3
    max_diff, psnr = accuracy(a, b.astype(np.uint8))
    assert max_diff == 3 and psnr == pytest.approx(10 * math.log10(255**2 / (9 / a.size)))


@pytest.mark.parametrize(("backend", "device", "precision"), CASES, ids=["-".join(c) for c in CASES])
def test_backend_within_tolerance_of_fp32_eager(backend: str, device: str, precision: str, reference: Engine,
                                                checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none on this machine")
    reason = unavailable(backend, "cuda:0" if device == "cuda" else device, precision)
    # what may be missing: GPU packages (tensorrt, onnxruntime's CUDA provider) and bf16 instructions in this CPU;
    # every CPU backend comes with the dev install
    if reason is not None and (device == "cuda" or (precision == "bf16" and not cpu_bf16())):
        pytest.skip(f"{backend}-{precision} unavailable here: {reason}")
    assert reason is None, f"{backend}-{precision}: {reason} (bash scripts/setup.sh --dev installs it)"
    engine = create_engine(checkpoint=checkpoint, backend=backend, device=device, precision=precision, threads=1,
                           cache_dir=tmp_path if backend in CACHING_BACKENDS else None)
    assert engine.precision == precision and engine.scale == 2
    max_levels = FP32_MAX_LEVELS if precision == "fp32" else TOLERANCE.max_levels
    rgba = RNG.integers(0, 256, (24, 40, 4), dtype=np.uint8)
    bgra = np.ascontiguousarray(rgba[..., [2, 1, 0, 3]])
    expected = reference.run(rgba, "RGBA8")
    _within(engine.run(np.ascontiguousarray(rgba[..., :3]), "RGB8"), expected[..., :3], max_levels)
    out = engine.run(bgra, "BGRA8")
    _within(out[..., [2, 1, 0]], expected[..., :3], max_levels)
    np.testing.assert_array_equal(out[..., 3], expected[..., 3])  # alpha: nearest neighbour, never the model
    np.testing.assert_array_equal(engine.run(bgra, "BGRA8"), out)  # deterministic, cached graphs/plans reused
    copied = ArrayFrame(bgra, out.shape)  # the daemon's path: the frame reached through copies only
    engine.start_copied(copied, PIXEL_FORMATS["BGRA8"])()
    np.testing.assert_array_equal(copied.out, out)
    assert (copied.reads, copied.writes) == (1, 1)
    engine.close()


@pytest.fixture
def eager_bf16_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto lists eager bf16 on any CPU: with fp32 eager alone it has nothing to measure, and the tests that read its
    measurements would find none on a CPU without bf16 instructions (there the bf16 engine then fails to build, and
    the measurement records it so)."""
    from upscaler_server.backends import auto

    real = auto.unavailable

    def listed(backend: str, device: str, precision: str) -> str | None:
        return None if (backend, device, precision) == ("eager", "cpu", "bf16") else real(backend, device, precision)

    monkeypatch.setattr(auto, "unavailable", listed)


def _auto(checkpoint: pathlib.Path, cache: pathlib.Path, allowed: tuple[str, ...] = ("eager", "onnxruntime"),
          tolerance: Tolerance = TOLERANCE) -> AutoEngine:
    network, name, weights, identity = served_network(checkpoint, None, 2, edge_pad=DEFAULT_EDGE_PAD)
    settings = Settings(name=name, device="cpu", precision="auto", weights=weights, threads=1, cuda_graphs=False,
                        cache_dir=cache, model_hash=identity)
    return AutoEngine(network, settings, candidates=allowed, tolerance=tolerance, budget_s=0.2)


def test_auto_picks_a_valid_backend_and_reuses_its_cache(checkpoint: pathlib.Path, reference: Engine,
                                                          tmp_path: pathlib.Path) -> None:
    rgb = RNG.integers(0, 256, (20, 32, 3), dtype=np.uint8)
    first = _auto(checkpoint, tmp_path)
    assert first.labels[0] == "eager-fp32" and set(first.labels) <= {"eager-fp32", "eager-bf16", "onnxruntime-fp32"}
    _within(first.run(rgb), reference.run(rgb), TOLERANCE.max_levels)
    assert first.measured == [(20, 32)] and first.choices[20, 32] in first.labels
    entries = json.loads((tmp_path / "auto.json").read_text())["entries"]
    (entry,) = entries.values()
    assert entry["choice"] == first.choices[20, 32] and set(entry["candidates"]) == set(first.labels)
    second = _auto(checkpoint, tmp_path)
    copied = ArrayFrame(rgb, (40, 64, 3))  # the daemon's path goes to the chosen backend too
    second.start_copied(copied, PIXEL_FORMATS["RGB8"])()
    np.testing.assert_array_equal(copied.out, first.run(rgb))
    assert second.measured == [] and second.choices == first.choices  # read from the cache, not measured again
    other_size = _auto(checkpoint, tmp_path)
    other_size.run(RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    assert other_size.measured == [(16, 24)]


def test_auto_with_one_candidate_measures_nothing(checkpoint: pathlib.Path, reference: Engine, tmp_path: pathlib.Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """fp32 eager alone (--auto-backends eager, the demo's, on a CPU without bf16): auto ran it about eight times over
    on the session's first frame (4.7 s at 640x360 here) to choose what it had to choose."""
    (tmp_path / "auto.json").write_text("{not json")  # neither read (a warning said "it will be rewritten") nor written
    rgb = RNG.integers(0, 256, (20, 32, 3), dtype=np.uint8)
    with caplog.at_level(logging.INFO, logger="upscaler_server.backends.auto"):
        engine = _auto(checkpoint, tmp_path, allowed=("eager-fp32",))
        _within(engine.run(rgb), reference.run(rgb), max_levels=1)  # fp32 on other thread counts: rounding
    assert engine.labels == ["eager-fp32"]
    assert engine.measured == [] and engine.choices == {(20, 32): "eager-fp32"}
    assert (tmp_path / "auto.json").read_text() == "{not json"
    assert [r.getMessage() for r in caplog.records] == [
        "auto backend for 32x20 on cpu: eager-fp32, the only candidate here (not measured)"]


@pytest.mark.usefixtures("eager_bf16_listed")
def test_auto_runs_on_the_oldest_python_the_package_allows(checkpoint: pathlib.Path, tmp_path: pathlib.Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """datetime.UTC is Python 3.11+, and pyproject allows 3.10: there auto failed every frame of a new size."""
    import datetime

    monkeypatch.delattr(datetime, "UTC", raising=False)  # as on Python 3.10
    engine = _auto(checkpoint, tmp_path, allowed=("eager",))
    engine.run(RNG.integers(0, 256, (20, 32, 3), dtype=np.uint8))
    (entry,) = json.loads((tmp_path / "auto.json").read_text())["entries"].values()
    assert entry["measured"].endswith("+00:00")


def test_auto_rejects_backends_outside_its_tolerance(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    if unavailable("eager", "cpu", "bf16") is not None:
        pytest.skip("this CPU has no bf16: nothing inexact to reject")
    strict = Tolerance(max_levels=0, min_psnr=math.inf)  # only exact outputs pass; bf16 is off by a level somewhere
    engine = _auto(checkpoint, tmp_path, allowed=("eager-bf16",), tolerance=strict)
    assert engine.labels == ["eager-fp32", "eager-bf16"]
    engine.run(RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    assert engine.choices[24, 40] == "eager-fp32"
    (entry,) = json.loads((tmp_path / "auto.json").read_text())["entries"].values()
    assert entry["candidates"]["eager-bf16"]["ok"] is False and "ms" not in entry["candidates"]["eager-bf16"]


@pytest.mark.usefixtures("eager_bf16_listed")
@pytest.mark.parametrize("content", ["{not json", '{"version": 1, "entries": [1, 2]}', '{"version": 99}'])
def test_corrupt_cache_is_ignored_with_a_warning(checkpoint: pathlib.Path, tmp_path: pathlib.Path, content: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "auto.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="upscaler_server.backends.auto"):
        engine = _auto(checkpoint, tmp_path, allowed=("eager",))
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    engine.run(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert engine.measured == [(16, 16)]
    data = json.loads((tmp_path / "auto.json").read_text())  # rewritten, valid
    assert data["version"] == 1 and len(data["entries"]) == 1


_UNTRUSTED_CACHES = {
    "unreadable": "it cannot be opened (Permission denied",
    "a FIFO": "it is not a regular file",
    "a link to /dev/zero": "it cannot be opened (Too many levels of symbolic links; a symbolic link is never followed)",
    "group-writable": "other users may write it (mode 664)",
}


@pytest.mark.usefixtures("eager_bf16_listed")
@pytest.mark.parametrize("kind", list(_UNTRUSTED_CACHES))
def test_a_cache_file_that_cannot_be_read_or_trusted_is_named_and_measured_again(
    checkpoint: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """auto.json was read with a plain read_text: a FIFO there hung the daemon's start, a link to /dev/zero filled its
    memory (security review), and a file other users may write chose the backend of this user's daemon; an unreadable
    one was once called corrupt. Now it is read as the ONNX and TensorRT files are, and measured again."""
    path = tmp_path / "auto.json"
    if kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a link to /dev/zero":
        path.symlink_to("/dev/zero")
    else:
        path.write_text('{"version": 1, "entries": {}}')
        path.chmod(0o664 if kind == "group-writable" else 0o600)
    if kind == "unreadable":  # the kernel's refusal (root reads any file)
        real_open = os.open

        def refuse(name: object, *args: object, **kwargs: object) -> int:
            if pathlib.Path(name) == path:  # type: ignore[arg-type]
                raise PermissionError(13, "Permission denied", str(name))
            return real_open(name, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", refuse)
    built: list[AutoEngine] = []
    with caplog.at_level(logging.WARNING, logger="upscaler_server.backends.auto"):
        reader = threading.Thread(target=lambda: built.append(_auto(checkpoint, tmp_path, allowed=("eager",))))
        reader.start()
        reader.join(30)
        if reader.is_alive():  # blocked opening the FIFO: give it a writer, then fail
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            reader.join(10)
            pytest.fail("reading the cache blocked on a FIFO")
    monkeypatch.undo()
    (message,) = [r.getMessage() for r in caplog.records if "auto-backend cache" in r.getMessage()]
    assert f"not using the auto-backend cache {path}: {_UNTRUSTED_CACHES[kind]}" in message, message
    assert "corrupt" not in message
    built[0].run(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert built[0].measured == [(16, 16)]
    assert not path.is_symlink() and json.loads(path.read_text())["version"] == 1  # replaced, not written through


@pytest.mark.usefixtures("eager_bf16_listed")
def test_two_engines_sharing_a_cache_keep_each_others_entries(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    first, second = _auto(checkpoint, tmp_path, allowed=("eager",)), _auto(checkpoint, tmp_path, allowed=("eager",))
    first.run(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    second.run(RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8))  # read the file before first wrote its entry
    sizes = {key.rsplit("|", 1)[1] for key in json.loads((tmp_path / "auto.json").read_text())["entries"]}
    assert sizes == {"16x16", "24x20"}


@pytest.mark.usefixtures("eager_bf16_listed")
def test_the_cache_keeps_only_the_newest_resolutions(checkpoint: pathlib.Path, tmp_path: pathlib.Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A client changing its frame size all the time grew auto.json without end (re-read and rewritten whole each
    time); the oldest measurements go first."""
    from upscaler_server.backends import auto

    monkeypatch.setattr(auto, "_MAX_ENTRIES", 3)
    stamps = iter(f"2026-01-01T00:00:0{i}+00:00" for i in range(9))  # one a second: a clear order
    real_store = auto._Cache.store

    def store(cache: auto._Cache, key: str, entry: dict) -> None:
        real_store(cache, key, {**entry, "measured": next(stamps)})

    monkeypatch.setattr(auto._Cache, "store", store)
    engine = _auto(checkpoint, tmp_path, allowed=("eager",))
    for width in (16, 17, 18, 19, 20):
        engine.run(RNG.integers(0, 256, (16, width, 3), dtype=np.uint8))
    sizes = {key.rsplit("|", 1)[1] for key in json.loads((tmp_path / "auto.json").read_text())["entries"]}
    assert sizes == {"18x16", "19x16", "20x16"}


@pytest.mark.usefixtures("eager_bf16_listed")
def test_a_stricter_tolerance_measures_again(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A choice made under one tolerance is not reused under another: the tolerance is part of the cache key."""
    loose = _auto(checkpoint, tmp_path, allowed=("eager",))
    loose.run(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    strict = _auto(checkpoint, tmp_path, allowed=("eager",), tolerance=Tolerance(max_levels=0, min_psnr=math.inf))
    strict.run(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert loose.measured == strict.measured == [(16, 16)]


def test_single_precision_backends_take_auto_as_theirs() -> None:
    """onnxruntime runs fp32 and TensorRT fp16 only: "auto" means that precision, anything else is refused."""
    from upscaler_server.backends.factory import ONLY_PRECISION

    assert ONLY_PRECISION == {"onnxruntime": "fp32", "tensorrt": "fp16"}
    assert unavailable("tensorrt", "cuda:0", "fp32") == "the tensorrt backend builds fp16 engines only"
    assert unavailable("onnxruntime", "cpu", "bf16") == "the onnxruntime backend runs fp32 only"
    assert unavailable("onnxruntime", "cpu", "fp32") is None, ONNXRUNTIME_HINT
    engine = create_engine(checkpoint=None, model="rlfn_s", backend="onnxruntime", device="cpu", precision="auto",
                           threads=1)  # fmt: skip
    assert engine.precision == "fp32"


def test_candidates_follow_device_and_precision() -> None:
    assert candidate_labels("cpu", "fp32", ("eager",)) == ["eager-fp32"]
    assert all(c.endswith("fp32") for c in candidate_labels("cpu", "fp32"))
    assert "tensorrt-fp16" not in candidate_labels("cpu", "auto")



def test_an_auto_backend_that_cannot_run_here_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """onnxruntime-fp16 (no table has it) or eager-fp16 on a CPU were dropped in silence: auto ran eager alone."""
    assert candidate_labels("cpu", "auto", ("onnxruntime-fp16", "eager-fp16")) == ["eager-fp32"]
    assert "--auto-backends onnxruntime-fp16: nothing auto can measure on cpu" in caplog.text
    assert "--auto-backends eager-fp16: nothing auto can measure on cpu" in caplog.text
    caplog.clear()
    candidate_labels("cpu", "auto", ("eager",))
    assert "--auto-backends" not in caplog.text


def _settings(checkpoint: pathlib.Path, cache: pathlib.Path) -> tuple[torch.nn.Module, Settings]:
    network, name, weights, identity = served_network(checkpoint, None, 2, edge_pad=DEFAULT_EDGE_PAD)
    return network, Settings(name=name, device="cpu", precision="fp32", weights=weights, threads=1,
                             cuda_graphs=False, cache_dir=cache, model_hash=identity)


def test_a_cached_onnx_export_of_another_model_is_not_served(checkpoint: pathlib.Path, reference: Engine,
                                                              tmp_path: pathlib.Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The cached ONNX file was trusted by its name alone: another user's export of another checkpoint copied onto the
    name this model's export has (a cache folder shared through $TAKDSR_CACHE_DIR) was served without a word (max
    diff 143 levels against eager). Its takdsr.sha256 metadata is checked: the model is exported again."""
    import onnx

    assert unavailable("onnxruntime", "cpu", "fp32") is None, ONNXRUNTIME_HINT
    other = make_checkpoint(tmp_path / "other.safetensors", seed=7)
    create_engine(checkpoint=other, backend="onnxruntime", device="cpu", threads=1, cache_dir=tmp_path).close()
    (foreign,) = (tmp_path / "onnx").iterdir()
    _, settings = _settings(checkpoint, tmp_path)
    ours = tmp_path / "onnx" / f"{settings.model_hash[:24]}-uint8-dynamic.onnx"
    ours.write_bytes(foreign.read_bytes())
    ours.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="upscaler_server.backends.onnxrt"):
        engine = create_engine(checkpoint=checkpoint, backend="onnxruntime", device="cpu", threads=1,
                               cache_dir=tmp_path)
    assert f"not using the cached ONNX file {ours}: it is the export of another model" in caplog.text
    rgb = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    _within(engine.run(rgb), reference.run(rgb), FP32_MAX_LEVELS)
    engine.close()
    props = {p.key: p.value for p in onnx.load(str(ours)).metadata_props}
    assert props["takdsr.sha256"] == settings.model_hash  # replaced by this model's export
    assert ours.stat().st_mode & 0o777 == 0o600 and not list(tmp_path.glob("onnx/tmp*"))  # private, no leftovers


def _export_with_hash(sha256: str | None) -> bytes:
    """A (tiny, empty) ONNX model whose metadata records ``sha256``: what the cache check reads."""
    import onnx

    model = onnx.ModelProto()
    if sha256 is not None:
        onnx.helper.set_model_props(model, {"takdsr.sha256": sha256})
    return model.SerializeToString()


@pytest.mark.parametrize("case", ["trusted", "another model", "no hash", "not onnx", "another user",
                                  "writable by others", "symbolic link", "folder"])
def test_a_cached_onnx_file_is_used_only_when_trusted(case: str, checkpoint: pathlib.Path, tmp_path: pathlib.Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """What onnx_model checks before it uses a cached export (the export itself is faked here: the test above runs a
    real one); every refusal is a warning naming why, then a fresh export."""
    from upscaler_server.backends import onnxrt

    network, settings = _settings(checkpoint, tmp_path)
    path = tmp_path / "onnx" / f"{settings.model_hash[:24]}-uint8-dynamic.onnx"
    path.parent.mkdir()
    good = _export_with_hash(settings.model_hash)
    contents = {"another model": _export_with_hash("0" * 64), "no hash": _export_with_hash(None),
                "not onnx": b"\xff\xff\xff\xff not protobuf"}
    if case == "symbolic link":
        (tmp_path / "elsewhere.onnx").write_bytes(good)
        path.symlink_to(tmp_path / "elsewhere.onnx")
    elif case == "folder":
        path.mkdir()
    else:
        path.write_bytes(contents.get(case, good))
        path.chmod(0o664 if case == "writable by others" else 0o600)
    if case == "another user":
        monkeypatch.setattr(onnxrt.os, "geteuid", lambda: path.stat().st_uid + 1)
    exports: list[pathlib.Path] = []
    monkeypatch.setattr(onnxrt, "_export", lambda net, s, target: exports.append(target) or b"exported")
    with caplog.at_level(logging.WARNING, logger="upscaler_server.backends.onnxrt"):
        data = onnxrt.onnx_model(network, settings)
    if case == "trusted":
        assert data == good and exports == [] and caplog.text == ""
        return
    why = {"another model": "it is the export of another model", "no hash": "it records no model hash",
           "not onnx": "it is not a readable ONNX file", "another user": "it belongs to another user",
           "writable by others": "other users may write it (mode 664)", "symbolic link": "it cannot be opened",
           "folder": "it is not a regular file"}[case]
    assert data == b"exported" and exports == [path]
    assert f"not using the cached ONNX file {path}: {why}" in caplog.text


def test_a_cached_tensorrt_engine_of_another_user_is_built_again(tmp_path: pathlib.Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A TensorRT plan is code for the GPU, and records no model hash: one in the cache folder that another user owns
    (or may write) is not deserialised but built again and stored privately. Runs without tensorrt or a GPU: the
    build and the runtime are stand-ins."""
    from upscaler_server.backends import onnxrt, tensorrt

    path = tmp_path / "tensorrt" / "model-trt10-GPU-64x32-fp16.plan"
    engine = object.__new__(tensorrt.TensorRTEngine)  # no __init__: it imports tensorrt and needs CUDA
    built: list[tuple[int, int]] = []
    monkeypatch.setattr(engine, "_engine_path", lambda height, width: path, raising=False)
    monkeypatch.setattr(engine, "_build", lambda height, width: built.append((height, width)) or b"built plan",
                        raising=False)

    class Runtime:
        def deserialize_cuda_engine(self, data: bytes) -> bytes:
            return data

    engine._runtime = Runtime()
    assert engine._load_or_build(32, 64) == b"built plan" and built == [(32, 64)]
    assert path.read_bytes() == b"built plan" and path.stat().st_mode & 0o777 == 0o600
    assert engine._load_or_build(32, 64) == b"built plan" and len(built) == 1  # its own cached plan: not built again
    path.write_bytes(b"someone else's plan")
    monkeypatch.setattr(onnxrt.os, "geteuid", lambda: path.stat().st_uid + 1)
    with caplog.at_level(logging.WARNING, logger="upscaler_server.backends.tensorrt"):
        assert engine._load_or_build(32, 64) == b"built plan" and len(built) == 2
    assert f"not using the cached TensorRT engine {path}: it belongs to another user" in caplog.text
    assert path.read_bytes() == b"built plan"


@pytest.mark.parametrize("backend", ["onnxruntime", "auto"])
def test_daemon_serves_a_frame(backend: str, checkpoint: pathlib.Path, reference: Engine,
                               tmp_path: pathlib.Path) -> None:
    assert unavailable("onnxruntime", "cpu", "fp32") is None, ONNXRUNTIME_HINT
    args = ["--checkpoint", str(checkpoint), "--device", "cpu", "--threads", "1", "--backend", backend,
            "--cache-dir", str(tmp_path)]
    args += ["--auto-backends", "eager,onnxruntime"] if backend == "auto" else []
    rgba = RNG.integers(0, 256, (24, 40, 4), dtype=np.uint8)
    with run_server(*args) as daemon, UpscalerClient(daemon.endpoint, timeout=60, name="pytest") as client:
        out = client.upscale(rgba, "RGBA8")
        assert client.info.precision == ("fp32" if backend == "onnxruntime" else "auto")
    expected = reference.run(rgba, "RGBA8")
    _within(out[..., :3], expected[..., :3], FP32_MAX_LEVELS if backend == "onnxruntime" else TOLERANCE.max_levels)
    np.testing.assert_array_equal(out[..., 3], expected[..., 3])
    if backend == "auto":
        (entry,) = json.loads((tmp_path / "auto.json").read_text())["entries"].values()
        assert entry["choice"] in {"eager-fp32", "eager-bf16", "onnxruntime-fp32"}


def test_offline_cli_takes_a_backend(checkpoint: pathlib.Path, reference: Engine, tmp_path: pathlib.Path) -> None:
    assert unavailable("onnxruntime", "cpu", "fp32") is None, ONNXRUNTIME_HINT
    rgb = RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "frame.png"), rgb[..., ::-1])
    cmd = [sys.executable, "-m", "upscaler_server.upscale", "--checkpoint", str(checkpoint), "--device", "cpu",
           "--threads", "1", "--backend", "onnxruntime", "--cache-dir", str(tmp_path / "cache"),
           str(tmp_path / "frame.png"), "-o", str(tmp_path / "out")]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = cv2.imread(str(tmp_path / "out" / "frame.png"), cv2.IMREAD_UNCHANGED)[..., ::-1]
    _within(out, reference.run(rgb), FP32_MAX_LEVELS)


@pytest.mark.gpu
def test_auto_on_cuda_picks_an_accurate_backend(checkpoint: pathlib.Path, reference: Engine,
                                                 tmp_path: pathlib.Path) -> None:
    engine = create_engine(checkpoint=checkpoint, backend="auto", device="cuda", cache_dir=tmp_path)
    rgba = RNG.integers(0, 256, (64, 96, 4), dtype=np.uint8)
    out = engine.run(rgba, "RGBA8")
    assert isinstance(engine, AutoEngine) and engine.choices[64, 96] in engine.labels
    diff = np.abs(out.astype(int) - reference.run(rgba, "RGBA8").astype(int))
    assert diff.max() <= 4, f"auto on CUDA differs from fp32 CPU by {diff.max()} levels"  # as the eager CUDA test
    engine.close()


def test_pad_channels_gives_the_same_frames(tmp_path: pathlib.Path) -> None:
    import models

    torch.manual_seed(1)
    path = models.save_checkpoint(models.build_model("rlfn_s", scale=2), tmp_path / "s52.safetensors", role="student")
    plain = create_engine(checkpoint=path, device="cpu", precision="fp32", threads=1)
    padded = create_engine(checkpoint=path, device="cpu", precision="fp32", threads=1, pad_channels=8)
    widened = padded._net.network  # type: ignore[attr-defined]  # inside the edge padding
    assert widened.config.channels == 56 and "zero-padded to 56" in padded.name
    rgb = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    _within(padded.run(rgb), plain.run(rgb), FP32_MAX_LEVELS)
    with pytest.raises(ConfigError, match="needs an RLFN network"):
        create_engine(model="pan_s", device="cpu", pad_channels=8)


def test_bench_labels_name_backend_precision_padding_and_graphs() -> None:
    from upscaler_server.bench_backends import Variant, parse_label

    assert parse_label("compile-fp16-pad8", "cuda:0") == Variant("compile", "fp16", 8, False)
    assert parse_label("eager-pad8", "cuda:0") == Variant("eager", "fp16", 8, False)  # the device's precision
    assert parse_label("torch-bf16", "cpu") == Variant("eager", "bf16", 0, False)
    assert parse_label("onnxruntime", "cuda:0") == Variant("onnxruntime", "fp32", 0, False)
    assert parse_label("auto", "cpu") == Variant("auto", "auto", 0, False)
    graphs = parse_label("compile-fp16-pad8-graphs", "cuda:0")
    assert graphs == Variant("compile", "fp16", 8, True) and graphs.label == "compile-fp16-pad8-graphs"
    assert parse_label("eager-graphs", "cuda:0").label == "eager-fp16-graphs"
    for label, device in [("eager-graphs", "cpu"), ("onnxruntime-graphs", "cuda:0")]:
        with pytest.raises(ValueError, match="-graphs needs CUDA"):
            parse_label(label, device)
    assert parse_label("auto-bf16", "cpu").label == "auto-bf16" != parse_label("auto", "cpu").label
    for bad in ("eager-fp16-graphs-pad8", "eager-fp8", "cuda-fp16", "compile-fp16-pad"):
        with pytest.raises(ValueError, match="not a label of the form"):
            parse_label(bad, "cuda:0")



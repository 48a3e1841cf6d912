"""The frame's edge pixels repeated around it before the network (upscaler_server.loading.EdgePadded): the same
function as the network on a replicate-padded frame, on every path that serves frames (engine backends, the ONNX
export), on by default, and the shipped student then keeps a flat frame flat up to its corners, which its zero
padding did not (a white frame's corner came out (191, 249, 230))."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import models
from upscaler_server import export
from upscaler_server.config import DEFAULT_EDGE_PAD, Config
from upscaler_server.engine import create_engine
from upscaler_server.errors import ConfigError
from upscaler_server.loading import EdgePadded, served_network

from server_utils import SMALL_DECODERS, small_decoder
from training_utils import load_script

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
RNG = np.random.default_rng(11)


@pytest.mark.parametrize("name", sorted(SMALL_DECODERS))
@pytest.mark.parametrize("pixels", [1, DEFAULT_EDGE_PAD])
def test_the_wrapper_is_the_network_on_a_replicate_padded_frame(name: str, pixels: int) -> None:
    network = small_decoder(name)
    padded = EdgePadded(network, pixels)
    assert padded.scale == network.scale and padded.min_input_size == network.min_input_size
    for h, w in [(17, 23), (24, 32)]:  # odd sizes too: ESA pools with stride 3
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            got = padded(x)  # (1, 3, 2h, 2w)
            whole = network(F.pad(x, (pixels,) * 4, mode="replicate"))  # (1, 3, 2(h+2p), 2(w+2p))
        crop = 2 * pixels
        assert got.shape == (1, 3, 2 * h, 2 * w)
        torch.testing.assert_close(got, whole[..., crop:-crop, crop:-crop], rtol=0, atol=1e-6)


def test_the_bundled_student_keeps_a_flat_frame_flat_to_its_corners() -> None:
    """Its error at the edge is no larger than inside (2 levels); without the padding it was 64 levels at a corner."""
    for edge_pad, worst_edge in ((None, 2), (0, 30)):
        engine = create_engine(device="cpu", precision="fp32", threads=1, edge_pad=edge_pad)
        for level in (255, 128):
            out = engine.run(np.full((48, 64, 3), level, np.uint8)).astype(int)  # (96, 128, 3)
            error = np.abs(out - level)
            interior = error[8:-8, 8:-8].max()
            assert interior <= 2, f"level {level}: {interior} levels inside the frame"
            if edge_pad is None:
                assert error.max() <= worst_edge, f"level {level}, edge pad {edge_pad}: {error.max()} levels"
            elif level == 255:  # the defect the padding removes, so that this test can tell the two apart
                assert error[0, 0].max() > worst_edge, f"corner {out[0, 0]}"
        engine.close()


@pytest.mark.parametrize(("backend", "precision"), [("compile", "fp32"), ("onnxruntime", "fp32")])
def test_every_backend_pads_the_edges(tmp_path: pathlib.Path, backend: str, precision: str) -> None:
    path = models.save_checkpoint(small_decoder("rlfn_s"), tmp_path / "s.safetensors", role="student")
    rgb = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    eager = create_engine(checkpoint=path, device="cpu", precision="fp32", threads=1)
    bare = create_engine(checkpoint=path, device="cpu", precision="fp32", threads=1, edge_pad=0)
    other = create_engine(checkpoint=path, backend=backend, device="cpu", precision=precision, threads=1,
                          cache_dir=tmp_path if backend == "onnxruntime" else None)
    expected, out = eager.run(rgb).astype(int), other.run(rgb).astype(int)
    assert np.abs(out - expected).max() <= 1  # fp32 sums in another order: one level at a rounding boundary
    assert np.abs(out - bare.run(rgb).astype(int)).max() > 1  # the padding changed the frame's edge
    for engine in (eager, bare, other):
        engine.close()


def test_the_export_pads_the_edges_and_says_so(tmp_path: pathlib.Path) -> None:
    path = models.save_checkpoint(small_decoder("rlfn_s"), tmp_path / "s.safetensors", role="student")
    out = tmp_path / "s.onnx"
    # opset 17: the padding is written as slices and concatenations, which convert down (F.pad's Pad-18 did not)
    argv = ["--checkpoint", str(path), "--dynamic-shapes", "--opset", "17", "--height", "16", "--width", "16",
            "-o", str(out)]
    assert export.main(argv) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["takdsr.edge_pad"] == str(DEFAULT_EDGE_PAD)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    engine = create_engine(checkpoint=path, device="cpu", precision="fp32", threads=1)
    for h, w in [(16, 16), (21, 35)]:
        rgb = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = session.run(["hr"], {"lr": rgb[None]})[0][0].astype(int)
        assert np.abs(got - engine.run(rgb).astype(int)).max() <= 1
    engine.close()
    assert export.main([*argv[:-1], str(tmp_path / "bare.onnx"), "--edge-pad", "0"]) == 0
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "bare.onnx")).metadata_props}
    assert props["takdsr.edge_pad"] == "0"


@pytest.mark.parametrize("pixels", [-1, 65])
def test_an_edge_pad_out_of_range_is_refused(pixels: int, tmp_path: pathlib.Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="0 <= edge_pad <= 64"):
        Config(endpoint="ipc:///tmp/edge-pad-test.sock", backend="nearest", edge_pad=pixels)
    with pytest.raises(ConfigError, match=f"--edge-pad {pixels}: use 0 \\(off\\) to 64 pixels"):
        create_engine(device="cpu", edge_pad=pixels)
    assert export.main(["--model", "rlfn_s", "--edge-pad", str(pixels), "-o", str(tmp_path / "s.onnx")]) == 2
    assert f"--edge-pad {pixels}: use 0 (off) to 64 pixels" in capsys.readouterr().err
    assert not (tmp_path / "s.onnx").exists()


def test_the_nearest_backend_takes_edge_pad_0_as_off_and_refuses_more() -> None:
    """As --pad-channels 0: a script that always passes --edge-pad 0 works with every backend."""
    assert create_engine(backend="nearest", edge_pad=0).run(np.zeros((4, 6, 3), np.uint8)).shape == (8, 12, 3)
    with pytest.raises(ConfigError, match=r"--edge-pad \(the nearest backend runs no model\)"):
        create_engine(backend="nearest", edge_pad=1)


def test_the_edge_pad_is_part_of_the_cache_key() -> None:
    """The backends' cached files (auto's choices, ONNX and TensorRT engines) must not serve another padding."""
    keys = {served_network(None, None, edge_pad=pixels)[3] for pixels in (0, 1, DEFAULT_EDGE_PAD)}
    assert len(keys) == 3
    assert served_network(None, None, edge_pad=1)[3] == served_network(None, None, edge_pad=1)[3]


def test_the_edge_study_scores_the_border_apart_from_the_shaved_frame() -> None:
    """scripts/edge_study.py: an error in the outer pixels only shows in the rings and the corner error, not in the
    shaved PSNR the evaluation reports (which is why the border defect went unseen)."""
    study = load_script(pathlib.Path(__file__).resolve().parents[1] / "scripts" / "edge_study.py")
    hr = RNG.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    sr = hr.copy()
    sr[0, 0] = 255 - hr[0, 0]  # one corner pixel wrong
    sr[5:7, 20] = np.clip(hr[5:7, 20].astype(int) + 3, 0, 255)  # a small error inside the 8-pixel ring
    scores = study.image_scores(sr, hr, scale=2)
    assert scores["corner_max_error"] == np.abs(255 - 2 * hr[0, 0].astype(int)).max()
    assert scores["psnr_shaved"] > 60 and scores["psnr_ring2"] < 40  # the shave hides the corner
    assert scores["psnr_ring2"] < scores["psnr_ring8"] < scores["psnr_shaved"]
    assert scores["psnr_whole"] < scores["psnr_shaved"]
    assert study.image_scores(hr, hr, scale=2)["corner_max_error"] == 0

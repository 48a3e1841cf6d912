"""ONNX export (upscaler_server.export): onnxruntime (CPU) reproduces PyTorch for every student family, with static
and dynamic shapes, float and uint8 I/O; the uint8 graph reproduces the daemon's conversion; the CLI refuses what it
cannot export.

Tolerances (docs/integration.md): float I/O max abs diff <= 1e-4; uint8 I/O at most 1 level and < 0.1% of bytes."""

from __future__ import annotations

import importlib.util
import pathlib
import signal
import tempfile
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import models
from upscaler_server import export
from upscaler_server.engine import TorchEngine

from server_utils import SMALL_DECODERS, small_decoder

FLOAT_TOL = 1e-4
UINT8_MAX_FRACTION = 1e-3  # bytes that may differ by one level (a float landing on the other side of .5)
SIZES = [(20, 24), (37, 51)]  # (H, W); RLFN/RFDN need >= 15; odd sizes exercise ESA's pooling and interpolation
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _session(path: pathlib.Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, x: torch.Tensor) -> np.ndarray:
    return session.run(["hr"], {"lr": x.numpy()})[0]


@pytest.mark.parametrize("name", sorted(SMALL_DECODERS))
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_float_io_matches_pytorch(name: str, dynamic: bool, tmp_path: pathlib.Path) -> None:
    network = small_decoder(name)
    path = tmp_path / f"{name}.onnx"
    export.export_onnx(network, path, io="float", height=SIZES[0][0], width=SIZES[0][1], dynamic=dynamic)
    session = _session(path)
    for h, w in SIZES if dynamic else SIZES[:1]:
        x = export.example_input("float", h, w, seed=h)
        with torch.no_grad():
            expected = network(x).numpy()  # (1, 3, 2h, 2w)
        got = _run(session, x)
        assert got.shape == expected.shape == (1, 3, 2 * h, 2 * w)
        assert np.abs(got - expected).max() <= FLOAT_TOL


@pytest.mark.parametrize("name", sorted(SMALL_DECODERS))
def test_uint8_io_matches_the_daemon_conversion(name: str, tmp_path: pathlib.Path) -> None:
    network = small_decoder(name)
    path = tmp_path / f"{name}_u8.onnx"
    export.export_onnx(network, path, io="uint8", height=SIZES[0][0], width=SIZES[0][1], dynamic=True)
    session = _session(path)
    engine = TorchEngine(network, name=name, device="cpu", precision="fp32", weights=None, threads=1)
    for h, w in SIZES:
        x = export.example_input("uint8", h, w, seed=w)  # (1, h, w, 3) RGB
        got = _run(session, x)
        assert got.dtype == np.uint8 and got.shape == (1, 2 * h, 2 * w, 3)
        for expected in (engine.run(x[0].numpy(), "RGB8"), export.Uint8IO(network)(x)[0].numpy()):
            diff = np.abs(got[0].astype(np.int16) - expected.astype(np.int16))
            assert diff.max() <= 1 and (diff > 0).mean() < UINT8_MAX_FRACTION


def test_static_export_fixes_the_size(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "static.onnx"
    export.export_onnx(small_decoder("rlfn_s"), path, io="uint8", height=16, width=18)
    shape = onnx.load(str(path)).graph.input[0].type.tensor_type.shape
    assert [d.dim_value for d in shape.dim] == [1, 16, 18, 3]
    with pytest.raises(ValueError, match="minimum input size"):
        export.export_onnx(small_decoder("rlfn_s"), tmp_path / "tiny.onnx", height=14, width=18)


def test_cli_exports_a_checkpoint_with_metadata(tmp_path: pathlib.Path) -> None:
    ckpt = models.save_checkpoint(small_decoder("rfdn_s"), tmp_path / "student.safetensors", role="student")
    out = tmp_path / "new" / "folder" / "student.onnx"  # folders that do not exist yet are created
    argv = ["--checkpoint", str(ckpt), "--io", "float", "--height", "16", "--width", "20", "-o", str(out)]
    assert export.main(argv) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["takdsr.io"] == "float" and props["takdsr.scale"] == "2" and props["takdsr.min_size"] == "15"
    assert props["takdsr.weights"] == "student.safetensors" and props["takdsr.model"].startswith("rfdn student 16ch")
    # the lowest IR version of its opsets (the exporter's own, 10, is refused by onnxruntime < 1.16)
    model = onnx.load(str(out))
    assert model.ir_version == onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True) < 10


def test_cli_refuses_a_ta_trained_on_a_mixed_input(tmp_path: pathlib.Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A TA trained on a mixed input would export as an LR -> HR graph worse than the student."""
    ta = models.save_checkpoint(models.build_model("rlfn_ta", channels=16), tmp_path / "ta.safetensors", role="ta",
                                training={"mix": [0.3, 0.7]})  # fmt: skip
    assert export.main(["--checkpoint", str(ta), "-o", str(tmp_path / "ta.onnx")]) == 3
    assert "teacher assistant trained on 0.3 * CF' + 0.7 * LR" in capsys.readouterr().err
    lr_only = models.save_checkpoint(models.build_model("rlfn_ta", channels=16), tmp_path / "ta_lr.safetensors",
                                     role="ta", training={"mix": [0.0, 1.0]})  # fmt: skip
    assert export.main(["--checkpoint", str(lr_only), "--height", "16", "--width", "16",
                        "-o", str(tmp_path / "ta_lr.onnx")]) == 0  # fmt: skip


def test_an_opset_the_converter_cannot_reach_leaves_an_existing_file_alone(tmp_path: pathlib.Path) -> None:
    """It used to be reported as written while the file kept opset 18; the CLI refuses such an opset up front."""
    good = tmp_path / "good.onnx"
    export.export_onnx(small_decoder("rlfn_s"), good, height=16, width=16)
    before = good.read_bytes()
    with pytest.raises(RuntimeError, match="could not convert the graph to opset 13"):
        export.export_onnx(small_decoder("rlfn_s"), good, height=16, width=16, opset=13)
    assert good.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]


def test_cli_exports_the_lowest_opset_without_converter_notices(tmp_path: pathlib.Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "s.onnx"
    assert export.main(["--model", "rlfn_s", "--height", "16", "--width", "16", "--opset", "17",
                        "-o", str(out)]) == 0  # fmt: skip
    assert {e.domain: e.version for e in onnx.load(str(out)).opset_import}[""] == 17
    assert [r.getMessage() for r in caplog.records if r.name.startswith("onnxscript")] == []


@pytest.mark.parametrize(("options", "message"), [
    (["--opset", "0"], "--opset 0: use 17 to"),
    (["--opset", "13"], "--opset 13: use 17 to"),
    (["--opset", str(onnx.defs.onnx_opset_version() + 1)], f"to {onnx.defs.onnx_opset_version()}"),
    (["--benchmark", "2", "--threads", "-1"], "--threads -1: use 0"),
    (["--threads", "1025"], "--threads 1025: use 0"),
    # taken in silence before (exit 0), from an operator's review
    (["--threads", "2"], "--threads 2 would be ignored: it sets the threads of --benchmark, which is not asked for"),
    (["--seed", str(2**70)], f"--seed {2**70}: use 0 to 2**64 - 1"),
    (["--seed", "-1"], "--seed -1"),
    (["--benchmark", "-1"], "--benchmark -1"),
    (["--height", "0"], "640x0 is below the model's minimum input size 15x15"),
    (["--height", "-5"], "640x-5 is below"),
    (["--width", "14", "--height", "16"], "14x16 is below"),
])  # fmt: skip
def test_cli_refuses_bad_options_in_one_line_before_exporting(options: list[str], message: str,
                                                              tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 (bad arguments) in one line, instead of a traceback or exit 1 after (part of) the export."""
    monkeypatch.setattr(export, "export_onnx", _must_not_export)
    out = tmp_path / "s.onnx"
    assert export.main(["--model", "rlfn_s", *options, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_cli_refuses_a_seed_for_a_checkpoint(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--seed seeds --model's random weights: with the default checkpoint it was taken in silence (exit 0)."""
    monkeypatch.setattr(export, "export_onnx", _must_not_export)
    assert export.main(["--seed", "5", "-o", str(tmp_path / "s.onnx")]) == 2
    assert "--seed 5 would be ignored: it seeds --model's random weights" in capsys.readouterr().err


def test_cli_refuses_what_fails_only_after_exporting(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """From a review: a 1x1 PAN with dynamic shapes (torch.export declares no size below 2) failed after the export
    with a long report and exit 1; --benchmark without onnxruntime wrote the file, then ended in a traceback."""
    monkeypatch.setattr(export, "export_onnx", _must_not_export)
    out = tmp_path / "s.onnx"
    assert export.main(["--model", "pan_s", "--height", "1", "--width", "1", "--dynamic-shapes", "-o", str(out)]) == 2
    assert "1x1 is below the model's minimum input size 2x2" in capsys.readouterr().err
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    size = ["--height", "16", "--width", "16"]
    assert export.main(["--model", "rlfn_s", *size, "--benchmark", "2", "-o", str(out)]) == 2
    assert "--benchmark needs the onnxruntime package" in capsys.readouterr().err
    assert not out.exists()


def _must_not_export(*args: object, **kwargs: object) -> None:
    raise AssertionError("exported before the options were checked")


def test_cli_never_overwrites_the_checkpoint_and_replaces_a_file_only_when_told(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = models.save_checkpoint(small_decoder("rlfn_s"), tmp_path / "mine.safetensors", role="student")
    (tmp_path / "link.onnx").symlink_to(ckpt)
    monkeypatch.setattr(models, "DEFAULT_STUDENT_PATH", ckpt)  # the bundled student, without risking the real one
    before = ckpt.read_bytes()
    size = ["--height", "16", "--width", "16"]
    for argv in (["--checkpoint", str(ckpt), "-o", str(ckpt)], ["-o", str(ckpt)], ["-o", str(tmp_path / "link.onnx")]):
        for overwrite in ([], ["--overwrite"]):
            assert export.main([*argv, *size, *overwrite]) == 2
            assert "is the checkpoint being exported" in capsys.readouterr().err
    assert ckpt.read_bytes() == before
    out = tmp_path / "s.onnx"
    out.write_bytes(b"older")
    assert export.main(["-o", str(out), *size]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"older"
    assert export.main(["-o", str(out), *size, "--overwrite"]) == 0
    assert onnx.load(str(out)).graph.input[0].name == "lr"


def test_cli_ctrl_c_leaves_no_partial_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(model: object, path: pathlib.Path, *args: object) -> None:
        assert path.exists()  # the exporter's temporary file, beside the output
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_finish", interrupted)
    try:
        status = export.main(["--model", "rlfn_s", "--height", "16", "--width", "16", "-o", str(tmp_path / "s.onnx")])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main (a traceback)")
    assert status == 130 and capsys.readouterr().err == "interrupted\n"
    assert list(tmp_path.iterdir()) == []
    made = tmp_path / "new" / "deeper" / "s.onnx"  # folders the export made for its file go with the interrupt
    assert export.main(["--model", "rlfn_s", "--height", "16", "--width", "16", "-o", str(made)]) == 130
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_folder_it_cannot_write_into_before_exporting(tmp_path: pathlib.Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """An unwritable folder failed after the export's seconds, exit 1, naming the hidden temporary file."""
    monkeypatch.setattr(export, "export_onnx", lambda *args, **kwargs: pytest.fail("exported before the check"))
    real_mkstemp = tempfile.mkstemp

    def refused(*args: Any, dir: str | None = None, **kwargs: Any) -> Any:
        if dir is not None and pathlib.Path(dir) == tmp_path / "locked":
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", refused)  # chmod does not stop root, who runs CI
    assert export.main(["--model", "rlfn_s", "-o", str(tmp_path / "locked" / "s.onnx")]) == 2
    assert capsys.readouterr().err == f"error: cannot write into {tmp_path / 'locked'}: Permission denied\n"


def test_cli_refuses_teachers_and_a_missing_student(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert export.main(["--model", "pan_teacher", "-o", str(tmp_path / "t.onnx")]) == 3
    assert "not an LR -> HR decoder" in capsys.readouterr().err
    monkeypatch.setattr(models, "DEFAULT_STUDENT_PATH", tmp_path / "absent.safetensors")
    assert export.main(["-o", str(tmp_path / "s.onnx")]) == 3
    assert "not found" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert export.main(["--model", "rlfn_s", "-o", str(tmp_path / "a_file" / "s.onnx")]) == 2
    assert "cannot create the folder of" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx"))


def test_cli_ctrl_c_during_the_exporter_lets_it_finish_then_stops(tmp_path: pathlib.Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """torch.onnx.export imports modules as it goes: one interrupted halfway used to fail the export as a long
    'export failed' report (exit 1). The interrupt now waits for the exporter, then nothing is written."""
    real_export, finished = torch.onnx.export, []

    def export_interrupted(*args: Any, **kwargs: Any) -> Any:
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the exporter works
        finished.append(True)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_interrupted)
    try:
        status = export.main(["--model", "rlfn_s", "--height", "16", "--width", "16", "-o", str(tmp_path / "s.onnx")])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main (a traceback)")
    assert finished and status == 130 and capsys.readouterr().err == "interrupted\n"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works as usual again


def test_cli_ctrl_c_that_breaks_the_exporter_is_still_an_interrupt(tmp_path: pathlib.Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A held Ctrl-C was lost when the exporter then failed: exit 1 with the exporter's error, not 130."""

    def export_interrupted_then_failing(*args: Any, **kwargs: Any) -> Any:
        signal.raise_signal(signal.SIGINT)
        raise RuntimeError("the exporter failed after the Ctrl-C")

    monkeypatch.setattr(torch.onnx, "export", export_interrupted_then_failing)
    status = export.main(["--model", "rlfn_s", "--height", "16", "--width", "16", "-o", str(tmp_path / "s.onnx")])
    assert status == 130 and capsys.readouterr().err == "interrupted\n"
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_long_output_name_still_fits_its_temporary_file(tmp_path: pathlib.Path) -> None:
    """The temporary name was the output's plus 15 characters: a 240-character name passed the 255-byte limit."""
    out = tmp_path / f"{'s' * 240}.onnx"
    assert export.main(["--model", "rlfn_s", "--height", "16", "--width", "16", "-o", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_a_dangling_link_as_output_is_refused_before_exporting(tmp_path: pathlib.Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """exists() follows links: a dangling one passed the check, and after the whole export the file could not be
    published on its name ("appeared during the export")."""
    link = tmp_path / "out.onnx"
    link.symlink_to(tmp_path / "missing" / "elsewhere.onnx")
    assert export.main(["--model", "rlfn_s", "--height", "16", "--width", "16", "-o", str(link)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and link.is_symlink()

"""File and folder names that are not valid UTF-8 (Latin-1 names from old archives, which Python holds as surrogate
escapes: b'r\\xe9un' is 'r\\udce9un'): every tool reads and writes them as it does any other name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import CheckpointError, build_model, load_checkpoint, read_metadata, save_checkpoint, weights_sha256
from models import checkpoint as checkpoint_module
from models.checkpoint import METADATA_KEY

LATIN1 = os.fsdecode(b"r\xe9un")  # 'r\udce9un': what Python makes of a Latin-1 name on a UTF-8 system


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    folder = tmp_path / LATIN1
    with pytest.raises(UnicodeEncodeError):
        str(folder).encode("utf-8")  # the point of these tests: safetensors, onnxruntime and print refuse this name
    return folder


def test_a_checkpoint_under_a_name_that_is_not_utf8_loads(odd_folder: Path) -> None:
    """safetensors takes a file name as UTF-8 only: a checkpoint saved under such a folder (the trainer's --run-dir)
    was "not a readable safetensors file (Path ... is not valid UTF-8)" to every loader."""
    torch.manual_seed(3)
    model = build_model("rlfn_s", channels=8)
    path = save_checkpoint(model, odd_folder / f"{LATIN1}.safetensors", role="student")
    assert read_metadata(path)["arch"] == "rlfn"
    loaded = load_checkpoint(path).model
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert len(weights_sha256(path)) == 64
    metadata = read_metadata(path)
    metadata["arch_args"]["channels"] = 16  # the header check still runs on such a file: 8-channel tensors
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata={METADATA_KEY: json.dumps(metadata)})
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_checkpoint(path)

def test_without_proc_such_a_name_is_called_so_not_unreadable(odd_folder: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /proc/self/fd is missing, safetensors gets the name itself: a name it cannot take is said to be the
    problem, not the file."""
    path = save_checkpoint(build_model("rlfn_s", channels=8), odd_folder / "s.safetensors", role="student")
    monkeypatch.setattr(checkpoint_module, "_FD_FOLDER", str(odd_folder.parent / "no-proc"))
    with pytest.raises(CheckpointError, match="its name is not valid UTF-8") as info:
        read_metadata(path)
    assert "not a readable" not in str(info.value)
    plain = save_checkpoint(build_model("rlfn_s", channels=8), odd_folder.parent / "s.safetensors", role="student")
    assert read_metadata(plain)["role"] == "student"  # a UTF-8 name still opens by its name there


def test_the_export_benchmark_reads_such_a_file(odd_folder: Path) -> None:
    """onnxruntime takes a file name as UTF-8 text only: `python -m upscaler_server.export --benchmark N` failed with
    a TypeError traceback (exit 1) after the file had been written under such a name. The session now reads the
    file's bytes. (The command itself, printing the name, is test_console_*.)"""
    from upscaler_server import export

    torch.manual_seed(0)
    network = build_model("rlfn_s", channels=8)
    out = odd_folder / f"m{LATIN1}.onnx"
    odd_folder.mkdir()
    export.export_onnx(network, out, height=16, width=16)
    times = export.benchmark(network, out, "uint8", 16, 16, repeats=1, threads=1)
    assert times["onnxruntime_cpu_ms"] > 0


def test_the_onnxruntime_backend_takes_a_cache_folder_of_such_a_name(odd_folder: Path) -> None:
    """The onnxruntime backend handed onnxruntime the cached file's name: a cache folder (--cache-dir,
    $TAKDSR_CACHE_DIR) of such a name failed to start it ("onnxruntime cannot load the exported model")."""
    import numpy as np

    from upscaler_server.engine import create_engine

    engine = create_engine(model="rlfn_s", backend="onnxruntime", device="cpu", threads=1, cache_dir=odd_folder)
    assert engine.run(np.zeros((16, 24, 3), np.uint8)).shape == (32, 48, 3)
    engine.close()
    assert len(list((odd_folder / "onnx").glob("*.onnx"))) == 1


ENTRY_POINTS = ["upscaler_server.__main__", "upscaler_server.upscale", "upscaler_server.export",
                "upscaler_server.bench", "upscaler_server.status", "client_demo.cli", "models.__main__",
                "training.__main__", "training.data.__main__"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_console_every_entry_point_escapes_what_its_console_cannot_print(module: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command (pyproject's [project.scripts] and every `python -m`) sets stdout and stderr to backslash-escape
    what they cannot encode, before it parses its arguments (argparse's errors print names too): under a strict UTF-8
    locale a name that is not valid UTF-8 crashed the print after the work was done."""
    import importlib
    import io
    import sys

    consoles = [io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict") for _ in range(2)]
    monkeypatch.setattr(sys, "stdout", consoles[0])
    monkeypatch.setattr(sys, "stderr", consoles[1])
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0
    assert [console.errors for console in consoles] == ["backslashreplace", "backslashreplace"]


@pytest.mark.parametrize("module", ["upscaler_server", "upscaler_server.console", "upscaler_server.files",
                                    "upscaler_server.decode_limit", "upscaler_server.image_bytes"])
def test_helpers_training_imports_load_the_standard_library_only(module: str) -> None:
    """Every entry point imports upscaler_server.console, the demo's and `python -m models`' included, and training
    imports `cpu_model`, the output-file rules (upscaler_server.files), the decode limit and the damaged-file checks
    (upscaler_server.image_bytes): they must load neither
    torch (the demo never does) nor the daemon (docs/architecture.md)."""
    import subprocess
    import sys

    code = (f"import sys, {module}; "
            "sys.exit(sorted(m for m in ('torch', 'numpy', 'models', 'zmq', 'upscaler_server.engine') "
            "if m in sys.modules) or None)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr


def test_console_the_export_prints_such_a_name_on_a_strict_console(odd_folder: Path) -> None:
    """`python -m upscaler_server.export -o $'bad/m\\xe9.onnx'` under a strict UTF-8 locale wrote the file, then said
    "error: export failed: 'utf-8' codec can't encode character '\\udce9'" (exit 1)."""
    import subprocess
    import sys

    out = odd_folder / f"m{LATIN1}.onnx"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    command = [sys.executable, "-m", "upscaler_server.export", "--model", "rlfn_s", "--height", "16", "--width", "16",
               "-o", str(out)]
    result = subprocess.run(command, capture_output=True, env=env, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    stdout, stderr = (stream.decode("utf-8") for stream in (result.stdout, result.stderr))  # ASCII escapes: valid
    assert result.returncode == 0, stderr
    assert f"wrote {odd_folder.parent}/r\\udce9un/mr\\udce9un.onnx (" in stdout and out.stat().st_size > 0

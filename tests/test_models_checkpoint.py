"""Checkpoints: bit-exact round trips, self-description, one clear error for every kind of bad file,
and init_from_teacher copying exactly what it should."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import (
    CheckpointError,
    Teacher,
    build_model,
    describe,
    init_from_teacher,
    list_models,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    size_problem,
)
from models.checkpoint import MAX_BLOCKS, METADATA_KEY


def _narrow(name: str) -> torch.nn.Module:
    overrides: dict = {"channels": 8, "blocks": 2}
    if name.startswith("pan"):
        overrides["up_channels"] = 8
    if name.endswith("_teacher"):
        overrides["encoder_channels"] = 8
    return build_model(name, **overrides)


@pytest.mark.parametrize("name", list_models())
def test_round_trip_is_bit_exact(tmp_path: Path, name: str) -> None:
    torch.manual_seed(1)
    model = _narrow(name).eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors", role="teacher" if "teacher" in name else "student",
                           training={"steps": 3})
    loaded = load_checkpoint(path)
    assert type(loaded.model) is type(model)
    for (key, a), (key_b, b) in zip(model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert key == key_b and torch.equal(a, b)
    x = torch.rand(1, 3, 32, 32) if isinstance(model, Teacher) else torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        a_out, b_out = model(x), loaded.model(x)
    a_img = a_out.image if isinstance(model, Teacher) else a_out
    b_img = b_out.image if isinstance(model, Teacher) else b_out
    assert torch.equal(a_img, b_img)
    assert loaded.metadata["training"] == {"steps": 3}
    assert loaded.metadata["scale"] == 2 and loaded.metadata["value_range"] == [0.0, 1.0]


def test_metadata_describes_the_model(tmp_path: Path) -> None:
    model = build_model("rfdn_s", channels=12, scale=3)
    path = save_checkpoint(model, tmp_path / "s.safetensors", role="student")
    meta = read_metadata(path)
    assert meta["arch"] == "rfdn" and meta["arch_args"] == {"channels": 12, "blocks": 1, "scale": 3}
    assert meta["role"] == "student" and meta["format_version"] == 1


def test_save_unwraps_compiled_models(tmp_path: Path) -> None:
    model = build_model("pan_s", channels=8, up_channels=8)
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model  # what torch.compile's OptimizedModule holds
    path = save_checkpoint(wrapped, tmp_path / "c.safetensors", role="student")
    assert not any(k.startswith("_orig_mod") for k in load_checkpoint(path).model.state_dict())


def test_save_rejects_unknown_role(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="role"):
        save_checkpoint(build_model("rlfn_s", channels=8), tmp_path / "x.safetensors", role="boss")


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    return save_checkpoint(build_model("rlfn_s", channels=8), tmp_path / "good.safetensors", role="student")


def _write_with_metadata(path: Path, tensors: dict, metadata: dict | str | None) -> Path:
    raw = None if metadata is None else {METADATA_KEY: metadata if isinstance(metadata, str) else json.dumps(metadata)}
    save_file(tensors, str(path), metadata=raw)
    return path


def _good_meta(path: Path) -> dict:
    return read_metadata(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found") as info:
        load_checkpoint(tmp_path / "absent.safetensors")
    assert "absent.safetensors" in str(info.value)


def test_a_link_loop_is_not_called_missing(tmp_path: Path) -> None:
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(CheckpointError, match="a symbolic link that leads nowhere"):
        load_checkpoint(loop)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(tmp_path)


def test_junk_gets_no_pytorch_hint(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "PyTorch" not in str(info.value)


def test_truncated_file(tmp_path: Path, good_file: Path) -> None:
    data = good_file.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 10):
        truncated = tmp_path / f"cut{cut}.safetensors"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}"):
            load_checkpoint(truncated)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00\x01 definitely not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(path)


def test_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):  # would create the marker file if unpickled
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Exploit()))
    says_what_to_do = r"PyTorch \.pt/\.pth \(pickle\) file, which is never loaded.*models\.save_checkpoint"
    with pytest.raises(CheckpointError, match=says_what_to_do):
        load_checkpoint(path)
    torch_style = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2)}, torch_style)
    with pytest.raises(CheckpointError, match=says_what_to_do):
        load_checkpoint(torch_style)
    assert not marker.exists()
    state = tmp_path / "state.pt"  # a training run's state: its network is one command away
    torch.save({"step": 3, "model": {"w": torch.zeros(2)}}, state)
    with pytest.raises(CheckpointError, match=r"python -m training export-state RUN_DIR --out FILE\.safetensors"):
        load_checkpoint(state)


def test_safetensors_without_our_metadata(tmp_path: Path) -> None:
    path = _write_with_metadata(tmp_path / "plain.safetensors", {"w": torch.zeros(2)}, None)
    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(path)


def test_metadata_not_json(tmp_path: Path) -> None:
    path = _write_with_metadata(tmp_path / "badjson.safetensors", {"w": torch.zeros(2)}, "{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 99}, "format_version"),
        ({"arch": "resnet50"}, "cannot build"),
        ({"arch_args": {"channels": 8, "blocks": 1, "scale": 2, "esa_channels": 16, "depth": 4}}, "cannot build"),
        ({"role": "boss"}, "role"),
        ({"value_range": [0, 255]}, "value_range"),
        ({"scale": 4}, "scale"),
        ({"arch_args": "rlfn"}, "arch_args"),
        ({"arch_args": {"channels": 8, "blocks": 1, "scale": 2, "esa_channels": -3}}, "esa_channels must be an int"),
        ({"arch_args": {"channels": 8, "blocks": "1", "scale": 2, "esa_channels": 16}}, "blocks must be an integer"),
        ({"format_version": True}, "format_version"),  # True == 1 in Python
        ({"training": "x"}, "'training' missing or not a dict"),
        ({"scale": "2"}, "'scale' missing or not a int"),
        ({"arch": 5}, "'arch' missing or not a str"),
        ({"arch": "rlfn_"}, "cannot build"),
        ({"training": {"stage": ["student"]}}, "training.stage"),
        ({"training": {"mix": 5}}, "training.mix"),
        ({"training": {"mix": [0.5]}}, "training.mix"),
        ({"training": {"mix": [0.3, float("nan")]}}, "training.mix"),
        ({"training": {"mix": [10**400, 1]}}, "training.mix"),  # JSON's int past any float: isfinite raised
    ],
)
def test_bad_metadata_fields(tmp_path: Path, good_file: Path, change: dict, message: str) -> None:
    tensors = load_checkpoint(good_file).model.state_dict()
    meta = {**_good_meta(good_file), **change}
    path = _write_with_metadata(tmp_path / "bad.safetensors", {k: v.contiguous() for k, v in tensors.items()}, meta)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_architecture(tmp_path: Path, good_file: Path) -> None:
    tensors = dict(load_checkpoint(good_file).model.state_dict())
    meta = _good_meta(good_file)
    missing = dict(tensors)
    missing.pop("conv_1.weight")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(_write_with_metadata(tmp_path / "missing.safetensors", missing, meta))
    reshaped = {**tensors, "conv_1.weight": torch.zeros(8, 3, 5, 5)}
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(_write_with_metadata(tmp_path / "shape.safetensors", reshaped, meta))


def test_declared_network_is_checked_against_the_header_before_it_is_built(
    tmp_path: Path, good_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small file whose metadata declares a huge network is refused without allocating that network."""
    import models.checkpoint as checkpoint_module

    tensors = {k: v.contiguous() for k, v in load_checkpoint(good_file).model.state_dict().items()}
    meta = _good_meta(good_file)
    built_on: list[str] = []

    def spy(name: str, **args: object) -> torch.nn.Module:
        built_on.append(torch.empty(0).device.type)  # the default device inside the loader's `with device:`
        return build_model(name, **args)

    monkeypatch.setattr(checkpoint_module, "build_model", spy)
    wide = {**meta, "arch_args": {**meta["arch_args"], "channels": 256, "blocks": 6}}
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\..*wrong shape: blocks\.0\.c1_r\.bias \[8\] "
                                              r"\(needs \[256\]\)"):
        load_checkpoint(_write_with_metadata(tmp_path / "wide.safetensors", tensors, wide))
    assert built_on == ["meta"]
    huge = {**meta, "arch_args": {**meta["arch_args"], "blocks": 10**6}}
    with pytest.raises(CheckpointError, match="blocks=1000000 is beyond any network"):
        load_checkpoint(_write_with_metadata(tmp_path / "huge.safetensors", tensors, huge))
    assert built_on == ["meta"]  # refused before even the meta build
    deep = {**meta, "arch_args": {**meta["arch_args"], "blocks": 257}}  # 4096 took 7-16 s on the meta device
    with pytest.raises(CheckpointError, match=r"blocks=257 is beyond any network of this package \(at most 256\)"):
        load_checkpoint(_write_with_metadata(tmp_path / "deep.safetensors", tensors, deep))
    assert built_on == ["meta"]
    # each argument in bounds, together 621 M parameters: a sparse file with a matching header loaded into 6 GB
    vast = {**meta, "arch_args": {**meta["arch_args"], "channels": 4096}}
    with pytest.raises(CheckpointError, match=r"declares a network of 6\d\d,\d{3},\d{3} values, more than "
                                              r"checkpoints of this package may hold \(50,000,000\)"):
        load_checkpoint(_write_with_metadata(tmp_path / "vast.safetensors", tensors, vast))
    assert built_on == ["meta", "meta"]  # built on the meta device only


@pytest.mark.parametrize(("name", "bad", "message"), [
    ("conv_1.weight", lambda t: t.fill_(float("nan")), "NaN or infinite"),
    ("conv_1.bias", lambda t: t.fill_(float("inf")), "NaN or infinite"),
    ("conv_1.weight", lambda t: t.to(torch.int32), "torch.int32, not floating-point"),
    ("conv_1.bias", lambda t: t > 0, "torch.bool, not floating-point"),
])  # fmt: skip
def test_weights_that_are_not_finite_floats(tmp_path: Path, good_file: Path, name: str, bad, message: str) -> None:
    tensors = {k: v.clone().contiguous() for k, v in load_checkpoint(good_file).model.state_dict().items()}
    tensors[name] = bad(tensors[name]).contiguous()
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds .*{message}"):
        load_checkpoint(_write_with_metadata(tmp_path / "bad.safetensors", tensors, _good_meta(good_file)))


def test_unreadable_file_is_named_so(good_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors says "No such file or directory" for a file it may not read; the loader says what it is."""
    import models.checkpoint as checkpoint_module

    def denied(*_: object, **__: object) -> None:
        raise PermissionError(13, "Permission denied")  # what open() raises for a mode-000 file (not for root)

    monkeypatch.setattr(checkpoint_module, "open", denied, raising=False)
    with pytest.raises(CheckpointError, match="cannot be read \\(Permission denied\\)"):
        load_checkpoint(good_file)


@pytest.mark.parametrize("family", ["rlfn", "rfdn", "pan"])
@pytest.mark.parametrize("blocks", [1, 3])
def test_init_from_teacher_copies_shared_tensors_and_keeps_first_blocks(family: str, blocks: int) -> None:
    torch.manual_seed(2)
    extra = {"up_channels": 8} if family == "pan" else {}
    teacher = build_model(f"{family}_teacher", channels=8, blocks=6, encoder_channels=8, **extra)
    small = init_from_teacher(teacher, blocks)
    assert small.config.blocks == blocks and small.config.channels == 8
    teacher_state = teacher.decoder.state_dict()
    small_state = small.state_dict()
    for name, tensor in small_state.items():
        source = teacher_state[name]
        if name == "fuse.0.weight":  # RFDN's fusion conv: the kept blocks' input slices
            assert torch.equal(tensor, source[:, : 8 * blocks])
        else:
            assert torch.equal(tensor, source), name
    dropped = {n for n in teacher_state if n.startswith("blocks.") and int(n.split(".")[1]) >= blocks}
    assert dropped and not dropped & set(small_state)


def test_init_from_teacher_student_is_independent_of_teacher() -> None:
    teacher = build_model("rlfn_teacher", channels=8, blocks=2, encoder_channels=8)
    student = init_from_teacher(teacher, 1)
    with torch.no_grad():
        student.conv_1.weight.add_(1.0)
    assert not torch.equal(student.conv_1.weight, teacher.decoder.conv_1.weight)


def test_init_from_teacher_rejects_bad_block_count() -> None:
    teacher = build_model("rlfn_teacher", channels=8, blocks=2, encoder_channels=8)
    with pytest.raises(ValueError, match="blocks"):
        init_from_teacher(teacher, 3)


def test_describe_names_arch_role_width_blocks_and_stage(tmp_path: Path) -> None:
    path = save_checkpoint(build_model("rlfn_s", channels=8), tmp_path / "d.safetensors", role="student",
                           training={"stage": "student_takdsr"})
    assert describe(read_metadata(path)) == "rlfn student 8ch x1 block (student_takdsr)"


@pytest.mark.parametrize(("change", "message"), [({"encoder_channels": -3}, "encoder_channels|channels must be an int"),
                                                 ({"discrete": "no"}, "discrete must be true or false")])
def test_bad_teacher_arch_args(tmp_path: Path, change: dict, message: str) -> None:
    """A teacher's encoder options are checked too: a negative width or a truthy string is refused, not built."""
    good = save_checkpoint(build_model("rlfn_teacher", channels=8, blocks=2, encoder_channels=8),
                           tmp_path / "teacher.safetensors", role="teacher")  # fmt: skip
    tensors = {k: v.contiguous() for k, v in load_checkpoint(good).model.state_dict().items()}
    meta = _good_meta(good)
    meta["arch_args"] = {**meta["arch_args"], **change}
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_write_with_metadata(tmp_path / "bad.safetensors", tensors, meta))


def test_bundled_checkpoints_resolve_by_name_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed package has no models/weights beside the caller: bundled names still find the files."""
    from models import WEIGHTS_DIR, resolve_checkpoint

    bundled = WEIGHTS_DIR / "rlfn_s_native_x2.safetensors"
    monkeypatch.chdir(tmp_path)
    for name in ("rlfn_s_native_x2", "rlfn_s_native_x2.safetensors", "models/weights/rlfn_s_native_x2.safetensors"):
        assert resolve_checkpoint(name) == bundled, name
    for other in ("/elsewhere/rlfn_s_native_x2.safetensors", "mine/rlfn_s_native_x2.safetensors", "no_such_x2"):
        assert resolve_checkpoint(other) == Path(other), other  # left for the caller to report as missing
    save_checkpoint(build_model("rlfn_s", channels=8), tmp_path / "rlfn_s_native_x2.safetensors", role="student")
    for name in ("rlfn_s_native_x2.safetensors", "rlfn_s_native_x2"):  # the user's own file here wins
        assert resolve_checkpoint(name) == Path("rlfn_s_native_x2.safetensors"), name


def test_the_demo_knows_the_bundled_names_as_the_loader_does() -> None:
    """client_demo checks --checkpoint without importing torch, with its own copy of the loader's rule."""
    from client_demo.cli import _bundled_path
    from models import WEIGHTS_DIR
    from models.checkpoint import names_bundled

    for text in ("rlfn_s_native_x2", "rlfn_s_takdsr_x2.safetensors", "models/weights/pan_s_takdsr_x2.safetensors",
                 "/nonexistent/dir/rlfn_s_takdsr_x2.safetensors", "mine/rlfn_s_native_x2.safetensors",
                 "/x/models/weights/rlfn_s_native_x2", "no_such_student_x2", "models/weights/no_such_x2"):
        path = Path(text)
        bundled_file = WEIGHTS_DIR / f"{path.name.removesuffix('.safetensors')}.safetensors"
        expected = names_bundled(path) and bundled_file.is_file()
        assert (_bundled_path(path) is not None) == expected, text


def test_nothing_is_saved_or_trained_that_the_loader_would_refuse(tmp_path: Path) -> None:
    """A 300-block teacher trained and saved fine, and then no loader took it ("more than this package builds")."""
    deep = build_model("rlfn_s", channels=4, blocks=MAX_BLOCKS + 1)
    assert size_problem(deep) == (f"a network of {MAX_BLOCKS + 1} blocks, more than checkpoints of this package may "
                                  f"hold ({MAX_BLOCKS})")
    with pytest.raises(ValueError, match=r"not writing .*deep\.safetensors: a network of 257 blocks"):
        save_checkpoint(deep, tmp_path / "deep.safetensors", role="student")
    assert not (tmp_path / "deep.safetensors").exists()
    assert size_problem(build_model("rlfn_teacher")) is None

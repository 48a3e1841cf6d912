"""A backbone added with `register_family` works everywhere the paper's three do, with no other edit: the registry's
four roles, the teacher's initialisation of the TA and the student, checkpoints, the three-stage pipeline, the
serving engine and the ONNX export (docs/architecture.md, "Adding a backbone")."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import SRDecoder, build_model, init_from_teacher, list_models, load_checkpoint, register_family
from models.base import conv, pixel_shuffle_upsampler
from models.registry import FAMILIES
from training.pipeline import run_pipeline
from upscaler_server import export
from upscaler_server.config import DEFAULT_EDGE_PAD
from upscaler_server.engine import create_engine

from training_utils import make_image_folder, tiny_config


@dataclass(frozen=True)
class PlainConfig:
    channels: int = 12
    blocks: int = 4
    scale: int = 2


class PlainBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(channels, channels, 3), nn.ReLU(), conv(channels, channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PlainNet(SRDecoder):
    """A plain residual CNN: head conv, blocks, tail conv, pixel shuffle (the smallest decoder that fits)."""

    family = "plain"

    def __init__(self, config: PlainConfig) -> None:
        super().__init__(config)
        self.head = conv(3, config.channels, 3)
        self.blocks = nn.ModuleList(PlainBlock(config.channels) for _ in range(config.blocks))
        self.tail = conv(config.channels, config.channels, 3)
        self.upsampler = pixel_shuffle_upsampler(config.channels, config.scale)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.head(x)  # (B, 3, h, w) -> (B, C, h, w)
        deep = shallow
        for block in self.blocks:
            deep = block(deep)
        return self.tail(deep) + shallow

    def reconstruct(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.upsampler(features)  # (B, C, h, w) -> (B, 3, h*s, w*s)


@pytest.fixture
def plain_family() -> Iterator[None]:
    register_family(PlainNet, PlainConfig, 4)
    try:
        yield
    finally:
        FAMILIES.pop("plain")


def test_the_four_roles_build_run_and_train(plain_family: None) -> None:
    assert {"plain", "plain_ta", "plain_s", "plain_teacher"} <= set(list_models())
    assert [build_model(name).config.blocks for name in ("plain", "plain_ta", "plain_s")] == [4, 2, 1]
    torch.manual_seed(0)
    for name in ("plain", "plain_ta", "plain_s", "plain_teacher"):
        model = build_model(name, channels=8, scale=3)
        x = torch.rand(2, 3, 18, 15) if name.endswith("_teacher") else torch.rand(2, 3, 6, 5)  # teacher reads HR
        out = model(x)
        image = out.image if name.endswith("_teacher") else out
        assert image.shape == (2, 3, 18, 15)
        image.mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), name


def test_the_teacher_initialises_a_smaller_network_of_its_family(plain_family: None) -> None:
    torch.manual_seed(0)
    teacher = build_model("plain_teacher", channels=8)
    student = init_from_teacher(teacher, 1)
    assert isinstance(student, PlainNet) and student.config.blocks == 1
    assert torch.equal(student.head.weight, teacher.decoder.head.weight)
    assert torch.equal(student.blocks[0].body[0].weight, teacher.decoder.blocks[0].body[0].weight)
    assert torch.equal(student.upsampler[0].weight, teacher.decoder.upsampler[0].weight)


def test_pipeline_trains_a_registered_family_and_the_engine_and_export_serve_it(
    plain_family: None, tmp_path: Path
) -> None:
    folder = make_image_folder(tmp_path / "images", count=3)
    config = tiny_config(folder, experiment={"family": "plain"})
    results = run_pipeline(config, tmp_path / "run")
    assert {"X_s", "PISR'", "TAKDSR", "TA", "teacher"} <= set(results["sets"][folder.name]["scores"])
    stages = ("teacher", "ta1", "student_takdsr", "teacher_continuous", "student_pisr", "student_alone")
    archs = [load_checkpoint(tmp_path / "run" / stage / "final.safetensors").metadata["arch"] for stage in stages]
    assert archs == ["plain_teacher", "plain", "plain", "plain_teacher", "plain", "plain"]
    path = tmp_path / "run" / "student_takdsr" / "final.safetensors"
    checkpoint = load_checkpoint(path)
    assert checkpoint.metadata["arch"] == "plain" and isinstance(checkpoint.model, PlainNet)
    assert checkpoint.model.config.blocks == 1

    lr = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)  # (h, w, RGB)
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255  # (1, 3, h, w)
    crop = 2 * DEFAULT_EDGE_PAD  # the engine repeats the frame's edge pixels around it (--edge-pad)
    with torch.no_grad():
        expected = checkpoint.model(F.pad(x, (DEFAULT_EDGE_PAD,) * 4, mode="replicate"))[..., crop:-crop, crop:-crop]
    expected_u8 = (expected[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # (2h, 2w, 3)
    engine = create_engine(checkpoint=path, device="cpu", precision="fp32", threads=1)
    try:
        served = engine.run(lr, "RGB8")
    finally:
        engine.close()
    assert served.shape == (40, 48, 3)
    assert np.abs(served.astype(int) - expected_u8.astype(int)).max() <= 1

    onnx_path = tmp_path / "plain.onnx"
    export.export_onnx(checkpoint.model.eval(), onnx_path, io="float", height=20, width=24, dynamic=True)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["hr"], {"lr": x.numpy()})[0]
    with torch.no_grad():
        bare = checkpoint.model(x)  # (1, 3, 2h, 2w): export_onnx exports the network as given
    assert np.abs(got - bare.numpy()).max() < 1e-4


@dataclass(frozen=True)
class NoBlocksConfig:
    channels: int = 8
    scale: int = 2


@dataclass(frozen=True)
class NoDefaultConfig:
    channels: int
    blocks: int = 2
    scale: int = 2


@dataclass(frozen=True)
class ZeroDefaultConfig:
    channels: int = 8
    blocks: int = 2
    scale: int = 2
    attention: int = 0  # build_model refuses it as a value; as a default it was registered, trained and saved


class Underscored(PlainNet):
    family = "plain_net"


class Rival(PlainNet):
    family = "rlfn"


@pytest.mark.parametrize(
    ("decoder", "config", "full_blocks", "error", "message"),
    [
        (nn.Conv2d, PlainConfig, 4, TypeError, "not an SRDecoder subclass"),
        (Underscored, PlainConfig, 4, ValueError, "no '_'"),
        (Rival, PlainConfig, 4, ValueError, "'rlfn' is already registered"),
        (PlainNet, dict, 4, TypeError, "must be a dataclass"),
        (PlainNet, NoBlocksConfig, 4, ValueError, r"lacks the field\(s\) \['blocks'\]"),
        (PlainNet, NoDefaultConfig, 4, ValueError, r"needs a default.*\['channels'\]"),
        (PlainNet, ZeroDefaultConfig, 4, ValueError, r"the defaults of ZeroDefaultConfig\): attention must be an "
                                                     r"integer >= 1, got 0"),
        (PlainNet, PlainConfig, 1, ValueError, "full_blocks must be an integer >= 2"),
        (PlainNet, PlainConfig, True, ValueError, "full_blocks must be an integer >= 2"),
    ],
)
def test_register_family_refuses_what_the_package_could_not_use(
    decoder: type, config: type, full_blocks: int, error: type[Exception], message: str
) -> None:
    before = dict(FAMILIES)
    with pytest.raises(error, match=message):
        register_family(decoder, config, full_blocks)
    assert dict(FAMILIES) == before


def test_registering_the_same_family_again_changes_nothing(plain_family: None) -> None:
    before = dict(FAMILIES)
    register_family(PlainNet, PlainConfig, 4)  # a module imported twice registers twice
    assert dict(FAMILIES) == before
    with pytest.raises(ValueError, match="'plain' is already registered"):
        register_family(PlainNet, PlainConfig, 6)


class PlainSix(PlainNet):
    family = "plainsix"


class Fused(PlainNet):
    """Its tail reads every block's output, so its shape follows the block count (as RFDN's fusion conv), and it does
    not say how to cut the teacher's down (no adapt_teacher_tensor)."""

    family = "fused"

    def __init__(self, config: PlainConfig) -> None:
        super().__init__(config)
        self.tail = conv(config.channels * config.blocks, config.channels, 1)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        shallow, outputs = self.head(x), []
        deep = shallow
        for block in self.blocks:
            deep = block(deep)
            outputs.append(deep)
        return self.tail(torch.cat(outputs, dim=1)) + shallow  # (B, C * blocks, h, w) -> (B, C, h, w)


def test_the_teacher_has_the_registered_blocks_and_a_shape_mismatch_is_named() -> None:
    """From a researcher's review: `<family>_teacher` took its config's default blocks (4 here), not the full_blocks
    it was registered with (6), which the other three roles follow; and a decoder whose tail follows the block count
    failed init_from_teacher with "The size of tensor a (8) must match the size of tensor b (32)"."""
    register_family(PlainSix, PlainConfig, 6)
    register_family(Fused, PlainConfig, 4)
    try:
        assert [build_model(name).config.blocks for name in ("plainsix", "plainsix_ta", "plainsix_s")] == [6, 3, 1]
        assert build_model("plainsix_teacher").decoder.config.blocks == 6
        assert build_model("plainsix_teacher", blocks=2).decoder.config.blocks == 2
        with pytest.raises(ValueError, match=r"Fused: the teacher's tail.weight is \(8, 32, 1, 1\), a 1-block "
                                             r"decoder's \(8, 8, 1, 1\): .* needs adapt_teacher_tensor"):
            init_from_teacher(build_model("fused_teacher", channels=8), 1)
    finally:
        FAMILIES.pop("plainsix")
        FAMILIES.pop("fused")

"""Every registered model: shapes at x2/x3/x4 on odd sizes, finite values, gradients everywhere;
parameter counts equal the official implementations."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from models import Teacher, build_model, count_parameters, list_models

WIDTH = 32  # RFDN's ESA is WIDTH/4 wide: narrower, its ReLU branch can start out dead


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        ("rlfn", {"channels": 52, "blocks": 6}, 526_856),
        ("rlfn", {"channels": 48, "blocks": 6}, 454_620),  # RLFN-S
        ("rfdn", {"channels": 48, "blocks": 6}, 566_364),
        ("rfdn", {"channels": 50, "blocks": 4}, 417_212),
        ("pan", {"channels": 40, "up_channels": 24, "blocks": 16}, 261_403),
        ("pan", {"channels": 40, "up_channels": 24, "blocks": 16, "scale": 4}, 272_419),
    ],
)
def test_parameter_counts_match_official_implementations(name: str, overrides: dict, expected: int) -> None:
    assert count_parameters(build_model(name, **overrides)) == expected


def test_registry_names_cover_every_paper_model() -> None:
    for family in ("rlfn", "rfdn", "pan"):
        for suffix in ("", "_ta", "_s", "_teacher"):
            assert family + suffix in list_models()


def test_role_names_set_block_counts() -> None:
    assert build_model("rlfn_ta").config.blocks == 3
    assert build_model("rlfn_s").config.blocks == 1
    assert build_model("pan_ta").config.blocks == 8
    assert build_model("rfdn_teacher").decoder.config.blocks == 6


# "nosuchfamily": a name no backbone takes ("resnet" failed the test for a researcher who added that family)
@pytest.mark.parametrize("bad", [{"name": "nosuchfamily"}, {"name": "rlfn_xl"}, {"name": "rlfn", "depth": 3}])
def test_registry_rejects_unknown_names_and_options(bad: dict) -> None:
    name = bad.pop("name")
    with pytest.raises(ValueError, match="unknown"):
        build_model(name, **bad)


def test_registry_rejects_unsupported_scale() -> None:
    with pytest.raises(ValueError, match="scale"):
        build_model("rlfn_s", scale=5)


def _small(name: str, scale: int) -> torch.nn.Module:
    # Narrow networks keep the loop over 12 models x 3 scales fast; the structure is unchanged.
    overrides: dict = {"scale": scale, "channels": WIDTH}
    if name.startswith("pan"):
        overrides["up_channels"] = 8
    if name.endswith("_teacher"):
        overrides["encoder_channels"] = 8
        overrides["blocks"] = 2
    return build_model(name, **overrides)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_model(name: str, scale: int) -> None:
    torch.manual_seed(0)
    model = _small(name, scale)
    # Odd sizes; large enough that ESA's pooled context has several positions (a 1x1 context can
    # leave every unit of ESA's tiny ReLU branch dead, a true zero gradient).
    lr_h, lr_w = 31, 37
    if isinstance(model, Teacher):
        hr = torch.rand(2, 3, lr_h * scale, lr_w * scale)
        out = model(hr)
        assert out.image.shape == hr.shape
        assert out.cf.shape == out.cf_prime.shape == (2, 3, lr_h, lr_w)
        assert out.features.shape == (2, WIDTH, lr_h, lr_w)
        loss = out.image.abs().mean() + out.cf.abs().mean()
        result = out.image
    else:
        x = torch.rand(2, 3, lr_h, lr_w)
        result, features = model.forward_with_features(x)
        assert result.shape == (2, 3, lr_h * scale, lr_w * scale)
        assert features.shape == (2, WIDTH, lr_h, lr_w)
        assert torch.equal(model(x), result)
        loss = result.abs().mean()
    assert torch.isfinite(result).all()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("family", ["rlfn", "rfdn", "pan"])
def test_teacher_ta_student_features_have_the_same_shape(family: str) -> None:
    x = torch.rand(1, 3, 20, 18)
    teacher = build_model(f"{family}_teacher", blocks=2, channels=8, **({"up_channels": 8} if family == "pan" else {}))
    shapes = {teacher(torch.rand(1, 3, 40, 36)).features.shape}
    for suffix in ("_ta", "_s"):
        shapes.add(build_model(family + suffix, channels=8, **({"up_channels": 8} if family == "pan" else {}))
                   .forward_with_features(x)[1].shape)
    assert len(shapes) == 1


def test_min_input_size_is_the_real_limit() -> None:
    model = build_model("rlfn_s", channels=8).eval()
    size = model.min_input_size
    model(torch.rand(1, 3, size, size))
    with pytest.raises(RuntimeError):
        model(torch.rand(1, 3, size - 1, size))


def test_teacher_rejects_hr_not_multiple_of_scale() -> None:
    teacher = build_model("rlfn_teacher", channels=8, blocks=1, encoder_channels=8)
    with pytest.raises(ValueError, match="multiple of the scale"):
        teacher(torch.rand(1, 3, 35, 40))


def test_continuous_teacher_feeds_the_raw_cf() -> None:
    torch.manual_seed(0)
    teacher = build_model("rlfn_teacher", channels=8, blocks=1, encoder_channels=8, discrete=False)
    out = teacher(torch.rand(1, 3, 40, 40))
    assert torch.equal(out.cf, out.cf_prime)
    discrete = build_model("rlfn_teacher", channels=8, blocks=1, encoder_channels=8)
    discrete.load_state_dict(teacher.state_dict())
    out_q = discrete(torch.rand(1, 3, 40, 40))
    assert torch.equal(out_q.cf_prime, torch.round(out_q.cf.clamp(0, 1) * 255) / 255)


def test_models_package_imports_nothing_of_ours() -> None:
    code = "import sys, models; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
    code += "('training', 'upscaler_server', 'client_demo', 'scenes'))))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("name", ["rlfn_s", "rlfn"])
@torch.no_grad()
def test_widened_rlfn_computes_the_same_function(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, scale=2).eval()
    for parameter in model.parameters():  # trained-like weights: no parameter is left at a special value
        parameter.add_(torch.randn_like(parameter) * 0.02)
    wide = model.widened(8)
    assert wide.config.channels == 56 and model.config.channels == 52
    convs = [m for m in wide.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.in_channels % 8 == 0 or c.in_channels == 3 for c in convs)  # 3: the RGB input
    x = torch.rand(2, 3, 24, 20)
    torch.testing.assert_close(wide(x), model(x), atol=1e-5, rtol=1e-5)
    assert model.widened(4) is not model and model.widened(4).config.channels == 52  # already a multiple of 4

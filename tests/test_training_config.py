"""Experiment configs: strict parsing, --set overrides, the shipped configs, the saved resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import apply_overrides, dump_toml, from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "training" / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.data is not None and config.data.sources


def test_shipped_configs_cover_the_paper_experiments() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"rlfn_x2", "rfdn_x2", "pan_x2", "smoke_cpu"} <= names


@pytest.mark.parametrize(
    "raw",
    [
        {"optim": {"stepz": 3}},
        {"typo_section": {}},
        {"data": {"sources": [{"kind": "folder", "path": "x", "colour": 1}]}},
        {"stage": {"role": "boss"}},
        {"runtime": {"amp": "fp8"}},
        {"experiment": {"ta_blocks": [2, 4]}},
    ],
)
def test_unknown_or_invalid_values_are_errors(raw: dict) -> None:
    with pytest.raises(ValueError):
        from_dict(raw)


def test_set_overrides_parse_toml_values() -> None:
    overrides = ["optim.steps=7", "experiment.mix=[0.5, 0.5]", "experiment.name=abc", "runtime.compile=true"]
    raw = apply_overrides({}, overrides)
    config = from_dict(raw)
    assert config.optim.steps == 7 and config.experiment.mix == [0.5, 0.5]
    assert config.experiment.name == "abc" and config.runtime.compile is True


def test_set_override_needs_key_value() -> None:
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["optim.steps"])


@pytest.mark.parametrize("text", ['[{kind="folder",\n path="x"}]', "[0.3, 0.7", '"unclosed'])
def test_set_override_that_looks_like_toml_must_be_toml(text: str) -> None:
    with pytest.raises(ValueError, match=r"data\.sources: .* is not a valid TOML value"):
        apply_overrides({}, [f"data.sources={text}"])
    assert apply_overrides({}, ["runtime.device=cuda:1"]) == {"runtime": {"device": "cuda:1"}}  # bare strings stay


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(CONFIGS[0], ["optim.steps=11"])
    saved = tmp_path / "config.toml"
    saved.write_text(dump_toml(config.to_dict()))
    again = load_config(saved)
    assert again == config

"""Experiment configs: strict parsing, --set overrides, the shipped configs, the saved resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.registry import FAMILIES
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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.steps=abc", "optim.steps must be an integer, got 'abc'"),
        ("optim.batch_size=2.5", "optim.batch_size must be an integer"),
        ("runtime.time_budget_s=abc", "runtime.time_budget_s must be a number"),
        ("runtime.channels_last=1", "runtime.channels_last must be true or false"),
        ("loss.output=abc", "loss.output must be a number"),
        ('experiment.mix=[0.3, "x"]', r"experiment.mix\[1\] must be a number"),
        ("experiment.ta_blocks=3", "experiment.ta_blocks must be a list"),
        ("experiment.ta_blocks=[]", "experiment.ta_blocks must list one or more TAs"),
        ("experiment.extra_args=5", "experiment.extra_args must be a table"),
        ("stage.guides=[1]", r"stage.guides\[0\] must be a string"),
        ("optim.lr=0", "optim.lr must be > 0"),
        ("optim.lr=1e-5", "optim.lr must be > 0 and >= optim.lr_min"),
        ("optim.betas=[0.9]", "optim.betas must be two numbers"),
        ("optim.betas=[0.9, 1.5]", "optim.betas must be two numbers"),
        ("runtime.log_every=0", "runtime.log_every must be >= 1"),
        ("runtime.threads=-1", "runtime.threads must be >= 0"),
        ("runtime.workers=-2", "runtime.workers must be >= 0"),
        ("runtime.device=gpu", "runtime.device must be auto, cpu, cuda or cuda:N"),
        # a KeyError traceback from the pipeline before (models.register_family adds families)
        # (the list is the registry's: a family added to models/ joins it; "nosuchfamily" is none)
        ('experiment.family="nosuchfamily"', f"experiment.family must be one of {', '.join(FAMILIES)}, got "
                                             "'nosuchfamily'"),
        # train's default run folder is runs/<experiment.name>/<stage.name>: '' trained into runs/<experiment.name>
        ('experiment.name=""', "experiment.name must be a plain folder name"),
        ('experiment.name="../elsewhere"', "experiment.name must be a plain folder name"),
        ('stage.name=".."', "stage.name must be a plain folder name"),
        ("loss.feature=-1", "loss.feature must be >= 0"),
        ("experiment.mix=[0, 0]", "experiment.mix must be two weights"),
        ("experiment.channels=0", "experiment.channels must be >= 1"),
        ("eval.rendered_size=[1920]", "eval.rendered_size must be"),
        ("eval.crop=-1", "eval.crop must be >= 0"),
        # nan passed every range check (nan < 0 is false): a loss of nan, or a term silently ignored
        ("runtime.time_budget_s=nan", "runtime.time_budget_s must be a finite number"),
        ("optim.lr=inf", "optim.lr must be a finite number"),
        ("optim.grad_clip=nan", "optim.grad_clip must be a finite number"),
        ("loss.output=nan", "loss.output must be a finite number"),
        ("experiment.mix=[0.3, inf]", r"experiment.mix\[1\] must be a finite number"),
        ("runtime.seed=99999999999999999999", "runtime.seed must be < 2\\*\\*63"),
        ("experiment.extra_args={channels=4}", "experiment.extra_args cannot set channels"),
        # TAs and students start from the teacher's first blocks: the pipeline failed after training the teacher
        ("experiment.ta_blocks=[7, 2]", r"experiment.ta_blocks must be <= experiment.teacher_blocks \(6\).* got 7"),
        ("experiment.student_blocks=7", r"experiment.student_blocks must be <= experiment.teacher_blocks \(6\)"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override: str, message: str) -> None:
    """A wrong type or an out-of-range value fails when the config is read, with the key in the message, not as a
    traceback deep inside training (a zero learning rate used to divide by zero in the scheduler)."""
    with pytest.raises(ValueError, match=message):
        from_dict(apply_overrides({}, [override]))


def test_a_scale_set_for_the_networks_alone_says_to_set_the_datas_too() -> None:
    """`--set experiment.scale=4` on a bundled config said only "data.scale 2 != experiment.scale 4" (a review)."""
    raw = {"data": {"scale": 2, "sources": [{"kind": "folder", "path": "x"}]}}
    with pytest.raises(ValueError, match=r"data.scale 2 != experiment.scale 4: .* set both \(--set "
                                         r"experiment.scale=N --set data.scale=N\)"):
        from_dict(apply_overrides(raw, ["experiment.scale=4"]))


def test_a_stage_initialised_from_the_teacher_has_at_most_its_blocks() -> None:
    """`train` with an init_from teacher and more stage.blocks than experiment.teacher_blocks; without init_from
    the stage starts from scratch and may be larger."""
    with pytest.raises(ValueError, match=r"stage.blocks must be <= experiment.teacher_blocks \(6\)"):
        from_dict(apply_overrides({}, ['stage.init_from="teacher.safetensors"', "stage.blocks=8"]))
    assert from_dict(apply_overrides({}, ["stage.blocks=8"])).stage.blocks == 8


def test_ints_where_floats_are_wanted_become_floats() -> None:
    config = from_dict(apply_overrides({}, ["optim.lr=1", "optim.lr_min=0", "experiment.mix=[1, 0]"]))
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.experiment.mix == [1.0, 0.0] and all(isinstance(w, float) for w in config.experiment.mix)
    assert from_dict(apply_overrides({}, ["runtime.device=cuda:1"])).runtime.device == "cuda:1"


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


def test_bundled_configs_resolve_by_name_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a pip install (no training/configs beside you) `--config training/configs/smoke_cpu.toml`, the README's
    form, and the bare name were "No such file"; a user's own file of that path still comes first."""
    from training.config import CONFIGS_DIR, resolve_config

    monkeypatch.chdir(tmp_path)
    for given in ("smoke_cpu", "smoke_cpu.toml", "training/configs/smoke_cpu.toml"):
        assert resolve_config(given) == CONFIGS_DIR / "smoke_cpu.toml"
        assert load_config(given).experiment.name == load_config(CONFIGS_DIR / "smoke_cpu.toml").experiment.name
    own = tmp_path / "training" / "configs" / "smoke_cpu.toml"
    own.parent.mkdir(parents=True)
    own.write_text((CONFIGS_DIR / "smoke_cpu.toml").read_text().replace('name = "', 'name = "mine_', 1))
    assert resolve_config("training/configs/smoke_cpu.toml") == Path("training/configs/smoke_cpu.toml")
    assert load_config("training/configs/smoke_cpu.toml").experiment.name.startswith("mine_")
    with pytest.raises(FileNotFoundError, match=r"config nope not found; .* bundled config by name \(.*smoke_cpu"):
        load_config("nope")
    assert resolve_config("elsewhere/smoke_cpu.toml") == Path("elsewhere/smoke_cpu.toml")  # not a bundled form


def test_seed_run_reads_the_bundled_weights_by_default() -> None:
    """The default was models/weights relative to the current folder: from a pip install seed-run found nothing."""
    import models
    from training.__main__ import _parser

    args = _parser().parse_args(["seed-run", "runs/x", "--stages", "teacher"])
    assert args.weights == models.WEIGHTS_DIR and args.weights.is_absolute()

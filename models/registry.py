"""Names for every model of the paper: ``build_model(name, **overrides)`` and ``list_models()``.

Per family (rlfn, rfdn, pan): ``<family>`` the full backbone, ``<family>_ta`` half its blocks (the
teacher assistant), ``<family>_s`` one block (the student), ``<family>_teacher`` encoder + full
backbone (pass ``discrete=False`` for the PISR' teacher). Overrides are config fields
(``channels``, ``blocks``, ``scale``, ...; teachers also ``encoder_channels`` and ``discrete``).
A new backbone joins with ``register_family`` (docs/architecture.md, "Adding a backbone").
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any

from torch import nn

from .base import SRDecoder
from .encoder import CompactEncoder, EncoderConfig
from .pan import PAN, PANConfig
from .rfdn import RFDN, RFDNConfig
from .rlfn import RLFN, RLFNConfig
from .teacher import Teacher

__all__ = ["FAMILIES", "arch_name", "build_model", "list_models", "register_family"]


@dataclass(frozen=True)
class _Family:
    decoder: type[SRDecoder]
    config: type
    full_blocks: int


FAMILIES: dict[str, _Family] = {}

# name suffix -> number of blocks as a function of the full backbone's
_ROLES = {"": lambda full: full, "_ta": lambda full: full // 2, "_s": lambda full: 1}
# A family name is one word: "_" separates it from the role in "rlfn_ta".
_FAMILY_NAME = re.compile(r"[a-z][a-z0-9]*")


def register_family(decoder: type[SRDecoder], config: type, full_blocks: int) -> None:
    """Make ``decoder`` (its ``family`` names it) and its four roles buildable by name, as the paper's are.

    `config` is the decoder's config dataclass: int fields ``channels``, ``blocks`` and ``scale`` among others,
    every field with a default. `full_blocks` is the full backbone's (the teacher's) block count; the TA gets
    half of it, the student one. Refuses, with the reason, what the rest of the package could not use.
    """
    name = getattr(decoder, "family", None)
    if not (isinstance(decoder, type) and issubclass(decoder, SRDecoder)) or not isinstance(name, str):
        raise TypeError(f"{decoder!r} is not an SRDecoder subclass with a `family` name")
    if not _FAMILY_NAME.fullmatch(name):
        raise ValueError(f"family name {name!r}: lower-case letters and digits, starting with a letter, no '_'")
    if name in FAMILIES and FAMILIES[name] != _Family(decoder, config, full_blocks):
        raise ValueError(f"family {name!r} is already registered ({FAMILIES[name].decoder.__name__})")
    if not (isinstance(config, type) and is_dataclass(config)):
        raise TypeError(f"{name}: the config must be a dataclass type, got {config!r}")
    config_fields = {f.name: f for f in fields(config)}
    missing = sorted({"channels", "blocks", "scale"} - set(config_fields))
    if missing:
        raise ValueError(f"{name}: the config {config.__name__} lacks the field(s) {missing}")
    no_default = sorted(f.name for f in config_fields.values()
                        if f.default is MISSING and f.default_factory is MISSING)  # fmt: skip
    if no_default:
        raise ValueError(f"{name}: every config field needs a default (build_model(name) uses them): {no_default}")
    # the checks build_model makes of every value, made of the defaults too: an int field defaulting to 0 built and
    # saved a teacher whose checkpoint no loader could rebuild (its arch_args hold that 0)
    _typed_config(config, _defaults(config), f"{name} (the defaults of {config.__name__})")
    if isinstance(full_blocks, bool) or not isinstance(full_blocks, int) or full_blocks < 2:
        raise ValueError(f"{name}: full_blocks must be an integer >= 2 (the TA gets half), got {full_blocks!r}")
    FAMILIES[name] = _Family(decoder, config, full_blocks)


def list_models() -> list[str]:
    names = [family + suffix for family in FAMILIES for suffix in (*_ROLES, "_teacher")]
    return sorted(names)


def build_model(name: str, **overrides: Any) -> nn.Module:
    """A freshly initialised model by registry name; overrides replace config fields."""
    if name not in list_models():  # exact names only: "rlfn_" is no model
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    family_name, _, role = name.partition("_")
    family = FAMILIES[family_name]
    suffix = f"_{role}" if role else ""
    if suffix == "_teacher":
        return _build_teacher(family, dict(overrides))
    defaults = {"blocks": _ROLES[suffix](family.full_blocks)}
    return family.decoder(_make_config(family.config, {**defaults, **overrides}, name))


def arch_name(model: nn.Module) -> str:
    """The registry name that rebuilds ``model`` together with ``model.arch_args()``."""
    if isinstance(model, Teacher):
        return f"{model.decoder.family}_teacher"
    if isinstance(model, SRDecoder):
        return model.family
    raise TypeError(f"{type(model).__name__} is not a model of this package")


def _build_teacher(family: _Family, overrides: dict[str, Any]) -> Teacher:
    """Encoder + the full backbone: ``full_blocks`` blocks unless ``blocks`` is given (the config's own default
    may differ from the registered count)."""
    name = f"{family.decoder.family}_teacher"
    encoder_values = {"channels": overrides.pop("encoder_channels", EncoderConfig.channels)}
    if "discrete" in overrides:
        encoder_values["discrete"] = overrides.pop("discrete")
    decoder = family.decoder(_make_config(family.config, {"blocks": family.full_blocks, **overrides}, name))
    encoder_values["scale"] = decoder.scale
    return Teacher(CompactEncoder(_typed_config(EncoderConfig, encoder_values, f"{name} encoder")), decoder)


def _defaults(config_type: type) -> dict[str, Any]:
    return {f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            for f in fields(config_type)}


def _make_config(config_type: type, values: dict[str, Any], name: str) -> Any:
    config = _typed_config(config_type, values, name)
    if config.scale not in (2, 3, 4) or config.channels < 4:
        raise ValueError(f"{name}: need scale in (2, 3, 4) and channels >= 4, got {config}")
    return config


def _typed_config(config_type: type, values: dict[str, Any], name: str) -> Any:
    """`config_type(**values)` after checking each value: ints (widths, counts, scale) are ints >= 1 and flags
    are bools, so arch_args from a file cannot build a network with negative widths or a truthy string."""
    hints = {f.name: f.type for f in fields(config_type)}  # "int" / "bool": the modules use postponed annotations
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; known: {sorted(hints)}")
    for key, value in values.items():
        if hints[key] in ("bool", bool) and not isinstance(value, bool):
            raise ValueError(f"{name}: {key} must be true or false, got {value!r}")
        if hints[key] in ("int", int) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: {key} must be an integer >= 1, got {value!r}")
    return config_type(**values)


# the paper's three (after the helpers above: registering checks a config with them)
register_family(RLFN, RLFNConfig, 6)
register_family(RFDN, RFDNConfig, 6)
register_family(PAN, PANConfig, 16)

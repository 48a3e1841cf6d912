"""Names for every model of the paper: ``build_model(name, **overrides)`` and ``list_models()``.

Per family (rlfn, rfdn, pan): ``<family>`` the full backbone, ``<family>_ta`` half its blocks (the
teacher assistant), ``<family>_s`` one block (the student), ``<family>_teacher`` encoder + full
backbone (pass ``discrete=False`` for the PISR' teacher). Overrides are config fields
(``channels``, ``blocks``, ``scale``, ...; teachers also ``encoder_channels`` and ``discrete``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from .base import SRDecoder
from .encoder import CompactEncoder, EncoderConfig
from .pan import PAN, PANConfig
from .rfdn import RFDN, RFDNConfig
from .rlfn import RLFN, RLFNConfig
from .teacher import Teacher

__all__ = ["FAMILIES", "arch_name", "build_model", "list_models"]


@dataclass(frozen=True)
class _Family:
    decoder: type[SRDecoder]
    config: type
    full_blocks: int


FAMILIES: dict[str, _Family] = {
    "rlfn": _Family(RLFN, RLFNConfig, 6),
    "rfdn": _Family(RFDN, RFDNConfig, 6),
    "pan": _Family(PAN, PANConfig, 16),
}

# name suffix -> number of blocks as a function of the full backbone's
_ROLES = {"": lambda full: full, "_ta": lambda full: full // 2, "_s": lambda full: 1}


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
    name = f"{family.decoder.family}_teacher"
    encoder_values = {"channels": overrides.pop("encoder_channels", EncoderConfig.channels)}
    if "discrete" in overrides:
        encoder_values["discrete"] = overrides.pop("discrete")
    decoder = family.decoder(_make_config(family.config, overrides, name))
    encoder_values["scale"] = decoder.scale
    return Teacher(CompactEncoder(_typed_config(EncoderConfig, encoder_values, f"{name} encoder")), decoder)


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

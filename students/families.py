"""The student families: one small table that loading and exporting read, instead of per-family branches.

A saved configuration names its family in a `family` field (a SparseFormer config, whose released JSON
has no such field, is the default). Each family gives its config class, its model class and its timm
module (registration, names, pretrained configs; see `timm_models` and `sparsifiner_timm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Mapping

from torch import nn

from . import sparsifiner_timm, timm_models
from .config import ConfigError, SparseFormerConfig
from .sparseformer import SparseFormer
from .sparsifiner import Sparsifiner, SparsifinerConfig

__all__ = ["DEFAULT_FAMILY", "FAMILIES", "Family", "family_of", "student_from_config"]


@dataclass(frozen=True)
class Family:
    name: str
    config: type
    model: type
    timm: ModuleType  # CONFIG_FILE, HEAD, timm_name, released_name, pretrained_cfg_for, export_fields, ...


FAMILIES: dict[str, Family] = {
    "sparseformer": Family("sparseformer", SparseFormerConfig, SparseFormer, timm_models),
    "sparsifiner": Family("sparsifiner", SparsifinerConfig, Sparsifiner, sparsifiner_timm),
}
DEFAULT_FAMILY = "sparseformer"


def family_of(thing: Any) -> Family:
    """The family of a student model, a config object, or a config mapping (its `family` field)."""
    if isinstance(thing, Mapping):
        name = thing.get("family", DEFAULT_FAMILY)
        if name not in FAMILIES:
            raise ConfigError(f"unknown student family {name!r}; the families are {', '.join(FAMILIES)}")
        return FAMILIES[name]
    for family in FAMILIES.values():
        if isinstance(thing, (family.model, family.config)):
            return family
    raise TypeError(f"{type(thing).__name__} is not a student of any family ({', '.join(FAMILIES)}); unwrap a "
                    f"DDP/accelerate-wrapped model first (accelerator.unwrap_model)")


def student_from_config(config: Any) -> nn.Module:
    """A fresh student of the config's family (a config object or its dict)."""
    family = family_of(config)
    return family.model(family.config.from_dict(config))

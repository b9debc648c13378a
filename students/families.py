"""The one table of student families, and building a student of any family from a config, a file or a name.

A family is one package under `students/` (its model, config, named configurations, construction from a
teacher, timm names and training) and one row here. A saved configuration names its family in a `family`
field (a SparseFormer config, whose released JSON has no such field, is the default).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from data.schema import closest
from torch import nn

from . import budget, sparseformer, sparsifiner
from .checkpoints import load_checkpoint_strict, load_state_dict_file
from .family import ConfigError, StudentFamily, read_json

__all__ = ["DEFAULT_FAMILY", "FAMILIES", "create_model", "family_named", "family_of", "load_student",
           "student_from_config"]

FAMILIES: dict[str, StudentFamily] = {f.name: f for f in (sparseformer.FAMILY, sparsifiner.FAMILY, budget.FAMILY)}
DEFAULT_FAMILY = "sparseformer"


def family_named(name: Any) -> StudentFamily:
    """The family called ``name`` (a recipe's ``student.kind``, a config's ``family``), or a ConfigError."""
    if name not in FAMILIES:
        near = closest(str(name), list(FAMILIES), cutoff=0.5)
        hint = f" Did you mean '{near}'?" if near else ""
        raise ConfigError(f"unknown student family {name!r}.{hint} The families are {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(thing: Any) -> StudentFamily:
    """The family of a student model, a config object, a config mapping (its `family` field) or an options object."""
    if isinstance(thing, Mapping):
        return family_named(thing.get("family", DEFAULT_FAMILY))
    for family in FAMILIES.values():
        if isinstance(thing, (*family.models, family.config)) or type(thing) is family.options:
            return family
    raise TypeError(f"{type(thing).__name__} is not a student of any family ({', '.join(FAMILIES)}); unwrap a "
                    f"DDP/accelerate-wrapped model first (accelerator.unwrap_model)")


def student_from_config(config: Any) -> nn.Module:
    """A fresh student of the config's family (a config object or its dict)."""
    return family_of(config).new(config)


def load_student(config_path: str | os.PathLike, weights: str | os.PathLike | None = None) -> nn.Module:
    """Build a student from a config JSON (as a bootstrapping run writes it) and load its weights.

    The config's `family` field picks the model (SparseFormer when absent).
    """
    model = student_from_config(read_json(os.fspath(config_path)))
    if weights:
        load_checkpoint_strict(model, load_state_dict_file(weights), source=str(weights))
    return model


def create_model(name: str, pretrained: str | os.PathLike | None = None, **overrides: Any) -> nn.Module:
    """Build a released SparseFormer by name (`list_models()`); `pretrained` is a local weights file.

    `overrides` replace config fields (e.g. `drop_path_rate=0.1`). The model carries `pretrained_cfg`
    (input size, mean, std, interpolation, crop_pct). Other families' named configurations are timm
    names: `timm.create_model("sparsifiner_deit_small_patch16_224", checkpoint_path=...)`.
    """
    cfg_dict = sparseformer.released.released_config(name)
    model = sparseformer.SparseFormer(sparseformer.SparseFormerConfig.from_dict({**cfg_dict, **overrides}))
    model.pretrained_cfg = sparseformer.get_pretrained_cfg(name).to_timm()
    if pretrained:
        load_checkpoint_strict(model, load_state_dict_file(pretrained), source=str(pretrained))
    return model

"""Student families in timm's model registry (and open_clip's `local-dir:` loading), once for every family.

A family's `timm_names` module makes one `TimmNames` with what is its own (its config class, the
factory that turns timm's keyword arguments into a model, its named configurations, its pretrained
configs, its export fields) and registers three kinds of names:

* one per named configuration (e.g. `sparseformer_btsp_openai_clip_large`,
  `sparsifiner_deit_small_patch16_224`), with its pretrained config; no download location is
  known: weights come from a local file (`pretrained_cfg_overlay=dict(file=...)` or `checkpoint_path`);
* the generic name (the family's name, e.g. `sparseformer`): the architecture comes from the
  `config` argument; a timm export of any other student stores that config under `model_args` in
  its `config.json`, which timm 1.0 passes back to the entrypoint, so `local-dir:` reloads it;
* `<family>_cfg_<hash>`: one name per configuration met at run time, for open_clip. open_clip 3.3
  builds a non-native image tower only through `vision_cfg.timm_model_name` ->
  `timm.create_model(name)`, passing no model arguments, so every architecture needs a name of its
  own. The name is the first 12 hex digits of the SHA-256 of the configuration's canonical JSON
  (`config_hash`): the same in every process and on every machine. A configuration that is a named
  one uses that name instead (`timm_name`).

How a hash name is found when open_clip loads a folder: an OpenCLIP export folder carries the
student's configuration in the family's `config_file` (e.g. `sparseformer_config.json`). `import
students` wraps `open_clip.factory.parse_model_name`, which open_clip calls first in `create_model`
(hence `create_model_and_transforms`, `create_model_from_pretrained`), `get_model_config` and
`get_tokenizer`. For a `local-dir:FOLDER` name, the wrapper asks every family to register the
folder's configuration (`TimmNames.register_folder`; a folder that is not a family's export is left
alone) before open_clip builds the tower; it returns the parser's result unchanged. Code that builds
a CLIP from the folder's config by some other route calls `students.register_folder(FOLDER)` first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from timm.data import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD,
                       OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
from timm.models import build_model_with_cfg, register_model
from timm.models._builder import resolve_pretrained_cfg

from .family import ConfigError

__all__ = ["IMAGENET_MEAN_STD", "INCEPTION_MEAN_STD", "OPENAI_CLIP_MEAN_STD", "TimmNames", "build_with_cfg",
           "pretrained_cfg_from_openclip", "register_folder"]

# The normalisations of the teachers' and students' pretrained configs (timm's constants).
IMAGENET_MEAN_STD = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
INCEPTION_MEAN_STD = (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)
OPENAI_CLIP_MEAN_STD = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def _check_weights_source(variant: str, pretrained_cfg, overlay) -> None:
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    if not (cfg.has_weights or cfg.state_dict is not None):
        raise RuntimeError(
            f"no weights location is known for '{variant}': load a local file with "
            f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file=PATH)) "
            f"or timm.create_model('{variant}', checkpoint_path=PATH)")


def build_with_cfg(variant: str, factory, what: str, accepted: tuple[str, ...], pretrained: bool = False, *,
                   pretrained_cfg=None, pretrained_cfg_overlay=None, pretrained_strict: bool = True,
                   pretrained_model_args=None, cache_dir=None, **kwargs: Any) -> torch.nn.Module:
    """`timm.create_model` for a student family: `factory(**model kwargs)` through timm's
    `build_model_with_cfg` (weights, pretrained_cfg), refusing keyword arguments outside `accepted`
    (`what` names the model in that error)."""
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"timm.create_model('{variant}') got argument(s) {what} does not take: "
                        f"{', '.join(unknown)}. It takes: {', '.join(accepted)}")
    if pretrained:
        _check_weights_source(variant, pretrained_cfg, pretrained_cfg_overlay)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_model_with_cfg(
            factory, variant, pretrained,
            pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay,
            pretrained_strict=pretrained_strict, pretrained_model_args=pretrained_model_args,
            cache_dir=cache_dir, **kwargs)
    if dtype is not None:
        model.to(dtype)
    return model


def pretrained_cfg_from_openclip(preprocess_cfg: Mapping[str, Any]) -> dict:
    """A timm pretrained config (input size, mean, std, interpolation) from an open_clip `preprocess_cfg`."""
    size = preprocess_cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    out = {"input_size": (3, h, w), "crop_pct": 1.0}
    for key in ("mean", "std", "interpolation"):
        if key in preprocess_cfg:
            out[key] = preprocess_cfg[key]
    return out


class TimmNames:
    """One student family's names in timm (see the module docstring).

    Args:
        family: the family's name; also its generic timm name, and `<family>_cfg_` prefixes hash names.
        what: how errors name the model ("SparseFormer", "a Sparsifiner").
        module: the `__name__` of the family's module that registers the names; its `default_cfgs`
            dict (timm's `register_model` reads it) is `default_cfgs`.
        config: the family's config class (`from_dict`, `to_dict`, `replace`).
        factory: `factory(config, **timm keyword arguments) -> model`.
        model_kwargs: the timm keyword arguments the factory takes (others are refused).
        head: the output layer's module name (`proj`, `head`).
        config_file: the student's configuration in an export folder.
        named: name -> (config dict, pretrained-config source for `pretrained_cfg_for`, paper ids).
        architecture: a config dict -> what identifies the architecture (names hash and compare by it).
        pretrained_cfg_for: `(config, source mapping | None) -> timm pretrained config`.
        export_fields: `config -> dict(num_classes, num_features, global_pool, proj_bias)`.
        generic_cfg: the generic name's default pretrained config.
        hash_as_written: hash a config mapping as written (an export folder's config file keeps its
            name even if a later `to_dict` writes more keys) rather than as `to_dict` rewrites it.
    """

    def __init__(self, *, family: str, what: str, module: str, default_cfgs: dict, config: type,
                 factory: Callable[..., torch.nn.Module], model_kwargs: tuple[str, ...], head: str, config_file: str,
                 named: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any] | None, tuple[str, ...]]],
                 architecture: Callable[[Mapping[str, Any]], dict],
                 pretrained_cfg_for: Callable[[Any, Mapping[str, Any] | None], dict],
                 export_fields: Callable[[Any], dict], generic_cfg: Mapping[str, Any], hash_as_written: bool = False):
        self.family, self.what, self.module, self.default_cfgs = family, what, module, default_cfgs
        self.config, self.factory, self.model_kwargs = config, factory, model_kwargs
        self.head, self.config_file, self.named = head, config_file, dict(named)
        self._architecture, self.pretrained_cfg_for, self.export_fields = architecture, pretrained_cfg_for, export_fields
        self.generic_cfg, self.hash_as_written = dict(generic_cfg), hash_as_written
        self.generic_name = family
        self.hash_prefix = f"{family}_cfg_"
        self._registered: set[str] = set()  # the hash names registered in this process

    # ------------------------------------------------------------------ names
    def config_hash(self, config) -> str:
        """12 hex digits of SHA-256 over the canonical JSON of the architecture."""
        if self.hash_as_written and isinstance(config, Mapping):
            d = dict(config)
            self.config.from_dict(d)  # a valid configuration, or a ConfigError naming the problem
        else:
            d = self.config.from_dict(config).to_dict()
        text = json.dumps(self._architecture(d), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def released_name(self, config) -> str | None:
        """The named configuration whose architecture this is (ignoring training-only fields), or None."""
        arch = self._architecture(self.config.from_dict(config).to_dict())
        return next((name for name, (cfg, _, _) in self.named.items()
                     if self._architecture(self.config.from_dict(cfg).to_dict()) == arch), None)

    def timm_name(self, config) -> str:
        """The timm name of a configuration: its named configuration's, else `<family>_cfg_<hash>`."""
        return self.released_name(config) or self.hash_prefix + self.config_hash(config)

    # ------------------------------------------------------------------ construction
    def build(self, variant: str, config, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        return build_with_cfg(variant, functools.partial(self.factory, config), self.what, self.model_kwargs,
                              pretrained, **kwargs)

    def _register(self, name: str, config, pretrained_cfg: dict, doc: str) -> None:
        self.default_cfgs[name] = dict(pretrained_cfg, architecture=name)

        def entrypoint(pretrained: bool = False, **kwargs: Any):
            return self.build(name, config, pretrained, **kwargs)

        entrypoint.__name__ = entrypoint.__qualname__ = name
        entrypoint.__module__ = self.module
        entrypoint.__doc__ = doc
        register_model(entrypoint)

    def generic(self, pretrained: bool = False, config=None, **kwargs: Any):
        """Any configuration: `timm.create_model('<family>', config=config or its dict)`.

        Without an explicit `pretrained_cfg`, mean/std come from the config (`pretrained_cfg_for`).
        """
        if config is None:
            raise TypeError(f"timm.create_model('{self.generic_name}') needs config={self.config.__name__} (or its "
                            f"dict); named models have names of their own: {', '.join(self.named)}")
        cfg = self.config.from_dict(config)
        derived = self.pretrained_cfg_for(cfg, None)
        own = {"num_classes": derived["num_classes"], "classifier": derived["classifier"]}
        if derived["fixed_input_size"]:
            own["input_size"] = derived["input_size"]
        if kwargs.get("pretrained_cfg") is None:
            own.update(mean=derived["mean"], std=derived["std"])
        kwargs["pretrained_cfg_overlay"] = {**own, **(kwargs.get("pretrained_cfg_overlay") or {})}
        return self.build(self.generic_name, cfg, pretrained, **kwargs)

    def install(self) -> "TimmNames":
        """Register the named configurations and the generic name; join the open_clip folder hook."""
        for name, (cfg, source, papers) in self.named.items():
            config = self.config.from_dict(cfg)
            self._register(name, config, dict(self.pretrained_cfg_for(config, source), paper_ids=papers),
                           f"{self.what} '{name}' (weights: a local file).")
        self.default_cfgs[self.generic_name] = dict(self.generic_cfg)

        def entrypoint(pretrained: bool = False, config=None, **kwargs: Any):
            return self.generic(pretrained, config, **kwargs)

        entrypoint.__name__ = entrypoint.__qualname__ = self.generic_name
        entrypoint.__module__ = self.module
        entrypoint.__doc__ = self.generic.__doc__
        register_model(entrypoint)
        if self not in _FAMILIES:
            _FAMILIES.append(self)
        _install_open_clip_hook()
        return self

    # ------------------------------------------------------------------ configurations met at run time
    def register_config(self, config, pretrained_cfg: Mapping[str, Any] | None = None) -> str:
        """Register a configuration under its timm name (`timm_name`) and return the name.

        Named configurations are registered at import; a hash name once per process (the first
        pretrained config stays; it is informational for open_clip, which preprocesses by the
        folder's `preprocess_cfg`).
        """
        name = self.timm_name(config)
        if name.startswith(self.hash_prefix) and name not in self._registered:
            cfg = self.config.from_dict(config).replace(drop_path_rate=0.0)
            self._register(name, cfg, self.pretrained_cfg_for(cfg, pretrained_cfg),
                           f"{self.what} configuration {name} (registered at run time).")
            self._registered.add(name)
        return name

    def register_folder(self, folder: str | Path) -> str | None:
        """Register the configuration an export folder stores (`config_file`); its timm name, or None when
        the folder holds no such file (not this family's export). Raises when the stored configuration is
        unreadable or does not match the name the folder's `open_clip_config.json` asks for."""
        folder = Path(folder)
        path = folder / self.config_file
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
            self.config.from_dict(stored)
        except (ConfigError, ValueError, OSError) as e:
            raise ValueError(f"{path} is not a valid {self.what} configuration ({e}); re-export the model") from e
        expected, pretrained_cfg = None, None
        oc_path = folder / "open_clip_config.json"
        if oc_path.is_file():
            try:
                oc = json.loads(oc_path.read_text())
            except ValueError as e:
                raise ValueError(f"{oc_path} is not valid JSON ({e}); re-export the model") from e
            expected = (oc.get("model_cfg", {}).get("vision_cfg", {}) or {}).get("timm_model_name")
            pretrained_cfg = pretrained_cfg_from_openclip(oc.get("preprocess_cfg", {}))
        name = self.register_config(stored, pretrained_cfg)
        if expected is not None and expected.startswith(self.generic_name) and expected != name:
            raise ValueError(
                f"{path} describes the {self.what} '{name}', but {oc_path} builds '{expected}': the files come "
                f"from different exports or one was edited. Re-export the model (students.export)")
        return name


# The installed families, asked in turn about every open_clip `local-dir:` folder.
_FAMILIES: list[TimmNames] = []


def register_folder(folder: str | Path) -> str | None:
    """Register the student configuration an export folder stores, whatever its family; its timm name or None."""
    names = [name for name in (family.register_folder(folder) for family in _FAMILIES) if name is not None]
    return names[0] if names else None


def _install_open_clip_hook() -> None:
    """Make open_clip's `local-dir:` loading register the folder's student first (see the module docstring)."""
    try:
        import open_clip.factory as factory
    except ImportError:  # open_clip is optional for timm-only use
        return
    parse = getattr(factory, "parse_model_name", None)
    if parse is None or getattr(parse, "_registers_students", False):
        return

    @functools.wraps(parse)
    def parse_model_name(model_name: str):
        schema, identifier = parse(model_name)
        if schema == "local-dir" and identifier:
            register_folder(identifier)
        return schema, identifier

    parse_model_name._registers_students = True
    factory.parse_model_name = parse_model_name

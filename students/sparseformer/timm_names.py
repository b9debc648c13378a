"""SparseFormer in timm's model registry, so that timm and open_clip build it by name.

After `import students`:

    timm.create_model("sparseformer_btsp_openai_clip_large")                       # random weights
    timm.create_model("sparseformer_btsp_openai_clip_large", pretrained=True,
                      pretrained_cfg_overlay=dict(file="weights.safetensors"))     # local weights
    timm.create_model("sparseformer_btsp_openai_clip_large", checkpoint_path="weights.safetensors")
    timm.create_model("sparseformer", config=cfg)      # any SparseFormerConfig (or its dict)
    timm.create_model("local-dir:FOLDER", pretrained=True)     # a folder from students.export.export_timm

Three kinds of names are registered:

* One per released configuration (`students.list_models()`), with its
  pretrained config (input size, mean, std, interpolation, crop_pct, number of
  outputs). No download location is known: weights come from a local file.
* `sparseformer`: the architecture comes from the `config` argument. A timm
  export of any other student stores that config under `model_args` in its
  `config.json`; timm 1.0 passes `model_args` back to the entrypoint, so
  `local-dir:` reloads it with no help from this package beyond the
  registration.
* `sparseformer_cfg_<hash>`: one name per non-released configuration, for
  open_clip. open_clip 3.3.0 builds a non-native image tower only through
  `vision_cfg.timm_model_name` -> `timm.create_model(name)`, passing no model
  arguments, so every architecture needs a name of its own. The name is the
  first 12 hex digits of the SHA-256 of the configuration's canonical JSON
  (`config_hash`): the same architecture gets the same name in every process
  and on every machine. A bootstrapped student whose architecture is a
  released one (e.g. from OpenAI CLIP ViT-B/16 with default options) uses the
  released name instead (`timm_name`).

How a hash name is found when open_clip loads a folder: the OpenCLIP export
folder carries the configuration as `sparseformer_config.json`. `import
students` wraps `open_clip.factory.parse_model_name`, which open_clip calls
first in `create_model` (hence `create_model_and_transforms`,
`create_model_from_pretrained`), `get_model_config` and `get_tokenizer`.
For a `local-dir:FOLDER` name whose folder holds `sparseformer_config.json`,
the wrapper registers that configuration (`register_folder`) before open_clip
builds the tower; it returns the parser's result unchanged and does nothing
for other names. Code that builds a CLIP from the folder's config by some
other route calls `students.timm_models.register_folder(FOLDER)` first.

timm keyword arguments: `num_classes` sets the output width of `proj` (0:
`forward` returns the pooled, normed features; a value other than the
checkpoint's drops its `proj` weights, as timm does for classifiers),
`global_pool` ('' keeps the model's pooling, 'token'/'cls' or 'avg'),
`drop_path_rate`, `in_chans` (3 only), `img_size` (ignored: any resolution
works), `device`, `dtype`, `pretrained_strict`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from timm.models import build_model_with_cfg, register_model
from timm.models._builder import resolve_pretrained_cfg

from .config import HEAD_OP_TO_POOL, POOL_TO_HEAD_OP, ConfigError, SparseFormerConfig
from .registry import IMAGENET_MEAN_STD, RELEASED, get_config
from .sparseformer import SparseFormer

__all__ = [
    "CONFIG_FILE",
    "GENERIC_NAME",
    "HASH_PREFIX",
    "config_hash",
    "pretrained_cfg_for",
    "register_config",
    "register_folder",
    "released_name",
    "timm_name",
]

GENERIC_NAME = "sparseformer"
HASH_PREFIX = "sparseformer_cfg_"
# The student's configuration inside an export folder (SparseFormerConfig JSON, readable by students.load_student).
CONFIG_FILE = "sparseformer_config.json"

_PAPERS = {"v1": ("arXiv:2304.03768",), "btsp": ("arXiv:2304.03768", "arXiv:2312.01987")}
_MODEL_KWARGS = ("num_classes", "global_pool", "in_chans", "drop_path_rate", "drop_rate", "img_size",
                 "device", "dtype")

# Read by timm's `register_model`: the pretrained config of every name registered from this module.
default_cfgs: dict[str, dict] = {}


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------
def _architecture(d: Mapping[str, Any]) -> dict:
    """What identifies an architecture: a config dict without its training-only and naming fields."""
    d = dict(d)
    d.pop("drop_path_rate", None)
    d.pop("model_type", None)
    return d


def config_hash(config: SparseFormerConfig | Mapping[str, Any]) -> str:
    """12 hex digits of SHA-256 over the canonical JSON of the architecture.

    A mapping is hashed as written (an export folder's `sparseformer_config.json`
    keeps its name even if a later version of `SparseFormerConfig.to_dict`
    writes more keys); a `SparseFormerConfig` as `to_dict()` writes it.
    """
    d = config.to_dict() if isinstance(config, SparseFormerConfig) else dict(config)
    SparseFormerConfig.from_dict(d)  # a valid configuration, or a ConfigError naming the problem
    text = json.dumps(_architecture(d), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def released_name(config: SparseFormerConfig | Mapping[str, Any]) -> str | None:
    """The released name whose architecture this is (ignoring drop_path_rate and model_type), or None."""
    arch = _architecture(SparseFormerConfig.from_dict(config).to_dict())
    return next((name for name in RELEASED if _architecture(get_config(name).to_dict()) == arch), None)


def timm_name(config: SparseFormerConfig | Mapping[str, Any]) -> str:
    """The timm name of a configuration: its released name, else `sparseformer_cfg_<hash>`."""
    return released_name(config) or HASH_PREFIX + config_hash(config)


def pretrained_cfg_for(config: SparseFormerConfig, pretrained_cfg: Mapping[str, Any] | None = None) -> dict:
    """A timm pretrained config: input size, normalisation and resize from `pretrained_cfg`.

    `pretrained_cfg` is a student's `pretrained_cfg` (input_size, mean, std,
    interpolation, crop_pct); missing entries fall back to the config's
    `normalization_factor`, else ImageNet mean/std, 224 px, bicubic, crop 1.0.
    """
    p = dict(pretrained_cfg or {})
    mean, std = config.normalization_factor or IMAGENET_MEAN_STD
    out = dict(
        input_size=tuple(p.get("input_size", (3, 224, 224))),
        mean=tuple(p.get("mean", mean)),
        std=tuple(p.get("std", std)),
        interpolation=p.get("interpolation", "bicubic"),
        crop_pct=float(p.get("crop_pct", 1.0)),
        num_classes=config.proj_dim,
        first_conv="feat_extractor.conv1",
        classifier="proj" if config.proj_dim else None,
        fixed_input_size=False,  # nothing in the model depends on the resolution
    )
    if len(out["input_size"]) != 3 or out["input_size"][0] != 3:
        raise ValueError(f"pretrained_cfg input_size must be (3, H, W), got {out['input_size']}")
    return out


HEAD = "proj"  # the output layer's module name (a Sparsifiner's is `head`)


def export_fields(config: SparseFormerConfig) -> dict:
    """What an export needs to know of the output layer: its width, bias, and the pooling."""
    return dict(num_classes=config.proj_dim, num_features=config.embed_dim,
                global_pool=HEAD_OP_TO_POOL[config.head_op], proj_bias=bool(config.proj_bias))


# --------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------
def _sparseformer(config: SparseFormerConfig, num_classes: int | None = None, in_chans: int = 3,
                  global_pool: str | None = None, drop_path_rate: float | None = None,
                  drop_rate: float = 0.0) -> SparseFormer:
    """SparseFormer from a config and timm's keyword arguments."""
    if in_chans != 3:
        raise ValueError(f"SparseFormer's early convolution takes RGB images (in_chans=3), got in_chans={in_chans}; "
                         f"convert the images to 3 channels")
    if drop_rate:
        raise ValueError(f"SparseFormer has no classifier dropout (drop_rate={drop_rate}); use drop_path_rate")
    changes: dict[str, Any] = {}
    if num_classes is not None:
        changes["proj_dim"] = int(num_classes)
    if global_pool and POOL_TO_HEAD_OP.get(global_pool) != config.head_op:
        if global_pool not in POOL_TO_HEAD_OP or "map" in (global_pool, config.head_op):
            raise ValueError(f"global_pool={global_pool!r}: SparseFormer pools by 'token' (class token) or 'avg' "
                             f"(and 'map' where it has a MAP head); '' keeps the model's own "
                             f"({HEAD_OP_TO_POOL[config.head_op]!r})")
        changes["head_op"] = POOL_TO_HEAD_OP[global_pool]
    if drop_path_rate is not None:
        changes["drop_path_rate"] = float(drop_path_rate)
    # A fresh config per model: reset_classifier edits the model's config in place.
    return SparseFormer(config.replace(**changes))


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


def _build(variant: str, config: SparseFormerConfig, pretrained: bool = False, **kwargs: Any) -> SparseFormer:
    kwargs.pop("img_size", None)  # resolution-free: nothing to set
    return build_with_cfg(variant, functools.partial(_sparseformer, config), "SparseFormer", _MODEL_KWARGS,
                          pretrained, **kwargs)


def _register(name: str, config: SparseFormerConfig, pretrained_cfg: dict, doc: str, build=None) -> None:
    """Register `name` with timm; `build(name, config, pretrained, **kwargs)` makes the model (default:
    a SparseFormer; other families pass their own)."""
    default_cfgs[name] = dict(pretrained_cfg, architecture=name)
    build = build or _build

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> SparseFormer:
        return build(name, config, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = doc
    register_model(entrypoint)


def _register_released() -> None:
    for name, (cfg_dict, pcfg) in RELEASED.items():
        config = SparseFormerConfig.from_dict(cfg_dict)
        kind = "btsp" if "btsp" in name else "v1"
        pretrained_cfg = dict(pretrained_cfg_for(config, pcfg.to_timm()), paper_ids=_PAPERS[kind])
        _register(name, config, pretrained_cfg, f"Released SparseFormer '{name}' (weights: a local file).")


# The generic name's defaults; `sparseformer()` replaces mean/std and num_classes with the config's own.
default_cfgs[GENERIC_NAME] = dict(input_size=(3, 224, 224), mean=IMAGENET_MEAN_STD[0], std=IMAGENET_MEAN_STD[1],
                                  interpolation="bicubic", crop_pct=1.0, first_conv="feat_extractor.conv1",
                                  classifier="proj", fixed_input_size=False, paper_ids=_PAPERS["btsp"])


@register_model
def sparseformer(pretrained: bool = False, config: SparseFormerConfig | Mapping[str, Any] | None = None,
                 **kwargs: Any) -> SparseFormer:
    """Any SparseFormer: `timm.create_model('sparseformer', config=SparseFormerConfig or its dict)`.

    Without an explicit `pretrained_cfg`, mean/std come from the config's `normalization_factor`.
    """
    if config is None:
        raise TypeError(f"timm.create_model('{GENERIC_NAME}') needs config=SparseFormerConfig (or its dict); "
                        f"released models have names of their own: {', '.join(RELEASED)}")
    cfg = SparseFormerConfig.from_dict(config)
    own = {"num_classes": cfg.proj_dim, "classifier": "proj" if cfg.proj_dim else None}
    if kwargs.get("pretrained_cfg") is None:
        derived = pretrained_cfg_for(cfg)
        own.update(mean=derived["mean"], std=derived["std"])
    kwargs["pretrained_cfg_overlay"] = {**own, **(kwargs.get("pretrained_cfg_overlay") or {})}
    return _build(GENERIC_NAME, cfg, pretrained, **kwargs)


# --------------------------------------------------------------------------
# Configurations met at run time (exports, open_clip folders)
# --------------------------------------------------------------------------
_REGISTERED: set[str] = set()  # the hash names registered in this process


def register_config(config: SparseFormerConfig | Mapping[str, Any],
                    pretrained_cfg: Mapping[str, Any] | None = None) -> str:
    """Register a configuration under its timm name (`timm_name`) and return the name.

    Released names are registered at import; a hash name is registered once
    per process (the first pretrained config stays; it is informational for
    open_clip, which preprocesses by the folder's `preprocess_cfg`).
    """
    name = timm_name(config)
    if name.startswith(HASH_PREFIX) and name not in _REGISTERED:
        cfg = SparseFormerConfig.from_dict(config).replace(drop_path_rate=0.0)
        _register(name, cfg, pretrained_cfg_for(cfg, pretrained_cfg),
                  f"SparseFormer configuration {name} (registered at run time).")
        _REGISTERED.add(name)
    return name


def _pretrained_cfg_from_openclip(preprocess_cfg: Mapping[str, Any]) -> dict:
    size = preprocess_cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    out = {"input_size": (3, h, w), "crop_pct": 1.0}
    for key in ("mean", "std", "interpolation"):
        if key in preprocess_cfg:
            out[key] = preprocess_cfg[key]
    return out


def register_folder(folder: str | Path) -> str | None:
    """Register the SparseFormer configuration stored in an export folder; return its timm name.

    Returns None when the folder holds no `sparseformer_config.json` (not a
    SparseFormer export). Raises when the stored configuration is unreadable or
    does not match the name the folder's `open_clip_config.json` asks for.
    """
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
        SparseFormerConfig.from_dict(stored)
    except (ConfigError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a valid SparseFormer configuration ({e}); re-export the model") from e
    expected, pretrained_cfg = None, None
    oc_path = folder / "open_clip_config.json"
    if oc_path.is_file():
        try:
            oc = json.loads(oc_path.read_text())
        except ValueError as e:
            raise ValueError(f"{oc_path} is not valid JSON ({e}); re-export the model") from e
        expected = (oc.get("model_cfg", {}).get("vision_cfg", {}) or {}).get("timm_model_name")
        pretrained_cfg = _pretrained_cfg_from_openclip(oc.get("preprocess_cfg", {}))
    name = register_config(stored, pretrained_cfg)
    if expected is not None and expected.startswith(GENERIC_NAME) and expected != name:
        raise ValueError(
            f"{path} describes the SparseFormer '{name}', but {oc_path} builds '{expected}': the files come from "
            f"different exports or one was edited. Re-export the model (students.export)")
    return name


def _install_open_clip_hook() -> None:
    """Make open_clip's `local-dir:` loading register the folder's SparseFormer first (see module docstring)."""
    try:
        import open_clip.factory as factory
    except ImportError:  # open_clip is optional for timm-only use
        return
    parse = getattr(factory, "parse_model_name", None)
    if parse is None or getattr(parse, "_registers_sparseformer", False):
        return

    @functools.wraps(parse)
    def parse_model_name(model_name: str):
        schema, identifier = parse(model_name)
        if schema == "local-dir" and identifier:
            for register in FOLDER_REGISTRARS:  # each family registers the folders it exported
                register(identifier)
        return schema, identifier

    parse_model_name._registers_sparseformer = True
    factory.parse_model_name = parse_model_name


# `register_folder` of every student family, tried on each open_clip `local-dir:` folder (a family's
# returns None for a folder that is not its export).
FOLDER_REGISTRARS = [register_folder]

_register_released()
_install_open_clip_hook()

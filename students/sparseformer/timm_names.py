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

An OpenCLIP export folder carries the configuration as `sparseformer_config.json`,
which `import students` registers when open_clip opens the folder
(`students.timm_registry`).

timm keyword arguments: `num_classes` sets the output width of `proj` (0:
`forward` returns the pooled, normed features; a value other than the
checkpoint's drops its `proj` weights, as timm does for classifiers),
`global_pool` ('' keeps the model's pooling, 'token'/'cls' or 'avg'),
`drop_path_rate`, `in_chans` (3 only), `img_size` (ignored: any resolution
works), `device`, `dtype`, `pretrained_strict`.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..timm_registry import IMAGENET_MEAN_STD, TimmNames
from .config import HEAD_OP_TO_POOL, POOL_TO_HEAD_OP, SparseFormerConfig
from .model import SparseFormer, model_class
from .released import RELEASED

__all__ = ["CONFIG_FILE", "GENERIC_NAME", "HASH_PREFIX", "NAMES", "config_hash", "pretrained_cfg_for",
           "register_config", "register_folder", "released_name", "timm_name"]

_PAPERS = {"v1": ("arXiv:2304.03768",), "btsp": ("arXiv:2304.03768", "arXiv:2312.01987")}
_MODEL_KWARGS = ("num_classes", "global_pool", "in_chans", "drop_path_rate", "drop_rate", "img_size",
                 "device", "dtype")
HEAD = "proj"  # the output layer's module name

# Read by timm's `register_model`: the pretrained config of every name registered from this module.
default_cfgs: dict[str, dict] = {}


def _architecture(d: Mapping[str, Any]) -> dict:
    """What identifies an architecture: a config dict without its training-only and naming fields."""
    d = dict(d)
    d.pop("drop_path_rate", None)
    d.pop("model_type", None)
    return d


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
        classifier=HEAD if config.proj_dim else None,
        fixed_input_size=False,  # nothing in the model depends on the resolution
    )
    if len(out["input_size"]) != 3 or out["input_size"][0] != 3:
        raise ValueError(f"pretrained_cfg input_size must be (3, H, W), got {out['input_size']}")
    return out


def export_fields(config: SparseFormerConfig) -> dict:
    """What an export needs to know of the output layer: its width, bias, and the pooling."""
    return dict(num_classes=config.proj_dim, num_features=config.embed_dim,
                global_pool=HEAD_OP_TO_POOL[config.head_op], proj_bias=bool(config.proj_bias))


def _sparseformer(config: SparseFormerConfig, num_classes: int | None = None, in_chans: int = 3,
                  global_pool: str | None = None, drop_path_rate: float | None = None,
                  drop_rate: float = 0.0, img_size=None) -> SparseFormer:
    """SparseFormer from a config and timm's keyword arguments (`img_size` is ignored: any resolution works)."""
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
    config = config.replace(**changes)
    return model_class(config)(config)


NAMES = TimmNames(
    family="sparseformer", what="SparseFormer", module=__name__, default_cfgs=default_cfgs,
    config=SparseFormerConfig, factory=_sparseformer, model_kwargs=_MODEL_KWARGS, head=HEAD,
    # The student's configuration inside an export folder (SparseFormerConfig JSON, readable by students.load_student).
    config_file="sparseformer_config.json",
    named={name: (cfg, pcfg.to_timm(), _PAPERS["btsp" if "btsp" in name else "v1"])
           for name, (cfg, pcfg) in RELEASED.items()},
    architecture=_architecture, pretrained_cfg_for=pretrained_cfg_for, export_fields=export_fields,
    # The generic name's defaults; `timm.create_model('sparseformer', config=...)` takes mean/std and
    # num_classes from the config.
    generic_cfg=dict(input_size=(3, 224, 224), mean=IMAGENET_MEAN_STD[0], std=IMAGENET_MEAN_STD[1],
                     interpolation="bicubic", crop_pct=1.0, first_conv="feat_extractor.conv1", classifier=HEAD,
                     fixed_input_size=False, paper_ids=_PAPERS["btsp"]),
    # An export folder's sparseformer_config.json keeps its name even if a later to_dict writes more keys.
    hash_as_written=True,
).install()

GENERIC_NAME, HASH_PREFIX, CONFIG_FILE = NAMES.generic_name, NAMES.hash_prefix, NAMES.config_file
config_hash, released_name, timm_name = NAMES.config_hash, NAMES.released_name, NAMES.timm_name
register_config, register_folder = NAMES.register_config, NAMES.register_folder

"""Sparsifiner in timm's model registry (and open_clip's `local-dir:` loading), through the one registration of
`students.timm_registry`.

    timm.create_model("sparsifiner_deit_small_patch16_224")                          # random weights
    timm.create_model("sparsifiner_deit_small_patch16_224", checkpoint_path="w.safetensors")  # e.g. the authors'
    timm.create_model("sparsifiner", config=cfg)          # any SparsifinerConfig (or its dict)

Names: one per named configuration (`NAMED`: the paper's DeiT-S and the natural ViT-B towers), the
generic `sparsifiner` (a timm export stores the config under `model_args`), and `sparsifiner_cfg_<hash>`
(12 hex digits of SHA-256 over the canonical config JSON) for open_clip, which builds a timm tower by name
alone. An OpenCLIP export folder carries the config as `sparsifiner_config.json`; `import students`
registers it when open_clip opens the folder. A Sparsifiner runs at its config's image size only.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..timm_registry import IMAGENET_MEAN_STD, OPENAI_CLIP_MEAN_STD, TimmNames
from .config import SparsifinerConfig, pair
from .model import Sparsifiner

__all__ = ["CONFIG_FILE", "GENERIC_NAME", "HASH_PREFIX", "NAMED", "NAMES", "config_hash", "pretrained_cfg_for",
           "register_config", "register_folder", "released_name", "timm_name"]

HEAD = "head"  # the output layer's module name
_PAPER = ("arXiv:2303.13755",)
_MODEL_KWARGS = ("num_classes", "global_pool", "in_chans", "drop_path_rate", "img_size", "device", "dtype")

# name: (config, mean/std). The authors' DeiT-S setting; OpenAI CLIP ViT-B/16's image tower (ln_pre,
# QuickGELU, a 512-d projection); DINOv2 ViT-B/14 at 518 px (1370 tokens; LayerScale folded).
NAMED: dict[str, tuple[dict, tuple]] = {
    "sparsifiner_deit_small_patch16_224": (dict(embed_dim=384, depth=12, num_heads=6), IMAGENET_MEAN_STD),
    "sparsifiner_vit_base_patch16_clip_224": (
        dict(embed_dim=768, depth=12, num_heads=12, num_classes=512, head_bias=False, act="quick_gelu",
             pre_norm=True, ln_eps=1e-5), OPENAI_CLIP_MEAN_STD),
    "sparsifiner_vit_base_patch14_dinov2": (
        dict(img_size=518, patch_size=14, embed_dim=768, depth=12, num_heads=12, num_classes=0),
        IMAGENET_MEAN_STD),
}

# Read by timm's `register_model`: the pretrained config of every name registered from this module.
default_cfgs: dict[str, dict] = {}


# Keys added to SparsifinerConfig after configurations were first named by hash: left out of the hash at their
# defaults, so that every configuration saved before keeps its name (and its exports their timm_model_name).
_LATER_KEYS = ("class_token", "global_pool", "fc_norm", "mlp_layer", "mlp_hidden_dim", "qk_norm", "pool_spec",
               "pos_embed", "pool_include_prefix", "attn_norm", "mlp_norm", "rope")
_DEFAULTS = SparsifinerConfig().to_dict()


def _architecture(d: Mapping[str, Any]) -> dict:
    d = dict(d)
    d.pop("drop_path_rate", None)
    for key in _LATER_KEYS:
        if key in d and d[key] == _DEFAULTS[key]:
            del d[key]
    return d


def pretrained_cfg_for(config: SparsifinerConfig, pretrained_cfg: Mapping[str, Any] | None = None) -> dict:
    """A timm pretrained config: the model's own input size; mean/std/resize from `pretrained_cfg`."""
    p = dict(pretrained_cfg or {})
    h, w = config.image_size
    size = tuple(p.get("input_size", (3, h, w)))
    if size != (3, h, w):
        raise ValueError(f"pretrained_cfg input_size {size} differs from the Sparsifiner's fixed size (3, {h}, {w})")
    return dict(input_size=size, mean=tuple(p.get("mean", IMAGENET_MEAN_STD[0])),
                std=tuple(p.get("std", IMAGENET_MEAN_STD[1])), interpolation=p.get("interpolation", "bicubic"),
                crop_pct=float(p.get("crop_pct", 1.0)), num_classes=config.num_classes,
                first_conv="patch_embed.proj", classifier=HEAD if config.num_classes else None,
                fixed_input_size=True)


def export_fields(config: SparsifinerConfig) -> dict:
    """What an export needs to know of the output layer: its width, bias, and the pooling."""
    return dict(num_classes=config.num_classes, num_features=config.embed_dim, global_pool=config.global_pool,
                proj_bias=bool(config.head_bias))


def _sparsifiner(config: SparsifinerConfig, num_classes: int | None = None, in_chans: int = 3,
                 global_pool: str | None = None, drop_path_rate: float | None = None,
                 img_size=None) -> Sparsifiner:
    if in_chans != 3:
        raise ValueError(f"a Sparsifiner takes RGB images (in_chans=3), got in_chans={in_chans}")
    if global_pool not in (None, "", config.global_pool):
        raise ValueError(f"global_pool={global_pool!r}: this Sparsifiner pools with {config.global_pool!r} (its "
                         f"config's global_pool); build it with that or leave global_pool unset")
    if img_size is not None and pair(img_size) != config.image_size:
        raise ValueError(f"img_size={img_size}: this Sparsifiner's predictors fix its size to {config.img_size}")
    changes: dict[str, Any] = {}
    if num_classes is not None:
        changes["num_classes"] = int(num_classes)
    if drop_path_rate is not None:
        changes["drop_path_rate"] = float(drop_path_rate)
    return Sparsifiner(config.replace(**changes))


NAMES = TimmNames(
    family="sparsifiner", what="a Sparsifiner", module=__name__, default_cfgs=default_cfgs,
    config=SparsifinerConfig, factory=_sparsifiner, model_kwargs=_MODEL_KWARGS, head=HEAD,
    config_file="sparsifiner_config.json",
    named={name: (cfg, dict(mean=mean, std=std), _PAPER) for name, (cfg, (mean, std)) in NAMED.items()},
    architecture=_architecture, pretrained_cfg_for=pretrained_cfg_for, export_fields=export_fields,
    generic_cfg=dict(input_size=(3, 224, 224), mean=IMAGENET_MEAN_STD[0], std=IMAGENET_MEAN_STD[1],
                     interpolation="bicubic", crop_pct=1.0, first_conv="patch_embed.proj", classifier=HEAD,
                     fixed_input_size=True, paper_ids=_PAPER),
).install()

GENERIC_NAME, HASH_PREFIX, CONFIG_FILE = NAMES.generic_name, NAMES.hash_prefix, NAMES.config_file
config_hash, released_name, timm_name = NAMES.config_hash, NAMES.released_name, NAMES.timm_name
register_config, register_folder = NAMES.register_config, NAMES.register_folder

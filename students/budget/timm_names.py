"""The budget ViT in timm's model registry (and open_clip's `local-dir:` loading), through the one registration of
`students.timm_registry`.

    timm.create_model("budget", config=cfg)      # any BudgetConfig (or its dict); a timm export stores it
                                                 # under `model_args`

and `budget_cfg_<hash>` (12 hex digits of SHA-256 over the canonical config JSON) for open_clip, which builds a
timm tower by name alone. An OpenCLIP export folder carries the config as `budget_config.json`; `import students`
registers it when open_clip opens the folder. A budget ViT takes its config's input size only (it resizes to its
own smaller size inside).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..timm_registry import IMAGENET_MEAN_STD, TimmNames
from .config import BudgetConfig, pair
from .model import BudgetViT

__all__ = ["CONFIG_FILE", "NAMES", "pretrained_cfg_for"]

HEAD = "head"  # the output layer's module name
_MODEL_KWARGS = ("num_classes", "global_pool", "in_chans", "drop_path_rate", "img_size", "device", "dtype")

# Read by timm's `register_model`: the pretrained config of every name registered from this module.
default_cfgs: dict[str, dict] = {}


def _architecture(d: Mapping[str, Any]) -> dict:
    d = dict(d)
    d.pop("drop_path_rate", None)
    return d


def pretrained_cfg_for(config: BudgetConfig, pretrained_cfg: Mapping[str, Any] | None = None) -> dict:
    """A timm pretrained config: the model's input size (its teacher's); mean/std/crop from `pretrained_cfg`."""
    p = dict(pretrained_cfg or {})
    h, w = config.input_hw
    size = tuple(p.get("input_size", (3, h, w)))
    if size != (3, h, w):
        raise ValueError(f"pretrained_cfg input_size {size} differs from the budget ViT's input size (3, {h}, {w})")
    return dict(input_size=size, mean=tuple(p.get("mean", IMAGENET_MEAN_STD[0])),
                std=tuple(p.get("std", IMAGENET_MEAN_STD[1])), interpolation=p.get("interpolation", config.interpolation),
                crop_pct=float(p.get("crop_pct", 1.0)), num_classes=config.num_classes,
                first_conv="patch_embed.proj", classifier=HEAD if config.num_classes else None, fixed_input_size=True)


def export_fields(config: BudgetConfig) -> dict:
    """What an export needs to know of the output layer: its width, bias, and the pooling."""
    return dict(num_classes=config.num_classes, num_features=config.embed_dim, global_pool=config.global_pool,
                proj_bias=bool(config.head_bias))


def _budget(config: BudgetConfig, num_classes: int | None = None, in_chans: int = 3, global_pool: str | None = None,
            drop_path_rate: float | None = None, img_size=None) -> BudgetViT:
    if in_chans != 3:
        raise ValueError(f"a budget ViT takes RGB images (in_chans=3), got in_chans={in_chans}")
    if global_pool not in (None, "", config.global_pool):
        raise ValueError(f"global_pool={global_pool!r}: this budget ViT pools with {config.global_pool!r} (its "
                         f"config's global_pool); build it with that or leave global_pool unset")
    if img_size is not None and pair(img_size) != config.input_hw:
        raise ValueError(f"img_size={img_size}: this budget ViT takes {config.input_size}-px images (its config's "
                         f"input_size)")
    changes: dict[str, Any] = {}
    if num_classes is not None:
        changes["num_classes"] = int(num_classes)
    if drop_path_rate is not None:
        changes["drop_path_rate"] = float(drop_path_rate)
    return BudgetViT(config.replace(**changes))


NAMES = TimmNames(
    family="budget", what="a budget ViT", module=__name__, default_cfgs=default_cfgs, config=BudgetConfig,
    factory=_budget, model_kwargs=_MODEL_KWARGS, head=HEAD, config_file="budget_config.json", named={},
    architecture=_architecture, pretrained_cfg_for=pretrained_cfg_for, export_fields=export_fields,
    generic_cfg=dict(input_size=(3, 224, 224), mean=IMAGENET_MEAN_STD[0], std=IMAGENET_MEAN_STD[1],
                     interpolation="bicubic", crop_pct=1.0, first_conv="patch_embed.proj", classifier=HEAD,
                     fixed_input_size=True),
).install()

CONFIG_FILE = NAMES.config_file

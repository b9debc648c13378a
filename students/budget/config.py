"""Typed configuration of a budget ViT: a teacher's whole tower (timm's VisionTransformer fields), the input size it
takes and the smaller size or larger patch it runs at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

from data.schema import check_keys

from ..blocks import ACTIVATIONS, MLP_LAYERS, POOL_SPEC_KEYS
from ..family import ConfigError, ConfigFile

__all__ = ["FAMILY", "INTERPOLATIONS", "POOLS", "BudgetConfig"]

FAMILY = "budget"
POOLS = ("token", "avg", "map")
INTERPOLATIONS = ("bicubic", "bilinear")


def pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


@dataclass
class BudgetConfig(ConfigFile):
    """A budget ViT: timm's VisionTransformer over ``img_size`` images of ``patch_size`` patches, taking images of
    ``input_size`` (its teacher's) and resizing them to ``img_size`` itself (``interpolation``, antialiased).

    The tower's fields are those of a teacher's tower (open_clip: `pre_norm` = ln_pre, which also drops the patch
    embedding's bias as timm does, QuickGELU, a bias-free projection as `head`; DINOv2: registers and a position
    embedding without the prefix tokens; SigLIP: no class token, a MAP head). `family` tells a saved config apart.
    """

    input_size: Union[int, list[int]] = 224  # the images the model takes (its teacher's input)
    img_size: Union[int, list[int]] = 112  # the images its patch embedding sees (input_size: the patch is larger)
    patch_size: int = 16
    interpolation: str = "bicubic"  # how the input is resized to img_size (the teacher's)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mlp_hidden_dim: int | None = None  # timm's hidden_features when no ratio gives it (SO400M: 4304 of 1152)
    mlp_layer: str = "mlp"  # 'mlp' | 'swiglu' | 'glu' | 'glu_gate_first' (`students.blocks.mlp`)
    act: str = "gelu"
    qk_norm: bool = False
    ln_eps: float = 1e-6
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # the position embedding covers the patches only
    pre_norm: bool = False  # a LayerNorm before the blocks (open_clip's ln_pre); no patch-embedding bias then
    global_pool: str = "token"
    fc_norm: bool = False  # the final LayerNorm after pooling (timm `fc_norm`) instead of on every token (`norm`)
    pool_spec: dict | None = None  # a MAP head's constructor data (`students.blocks.map_pool`); None: timm's own
    num_classes: int = 0  # the head's outputs (a CLIP projection, a classifier); 0: none
    head_bias: bool = True
    drop_path_rate: float = 0.0
    family: str = FAMILY

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "BudgetConfig") -> "BudgetConfig":
        if isinstance(d, BudgetConfig):
            return d
        if not isinstance(d, Mapping):
            raise ConfigError(f"a budget ViT config must be a mapping or BudgetConfig, got {type(d).__name__}")
        check_keys(cls, d, "budget ViT config", error=ConfigError)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        cfg = cls(**d)
        cfg.validate()
        return cfg

    # ----------------------------------------------------------- structure
    @property
    def input_hw(self) -> tuple[int, int]:
        return pair(self.input_size)

    @property
    def image_hw(self) -> tuple[int, int]:
        return pair(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def hidden_dim(self) -> int:
        return self.mlp_hidden_dim if self.mlp_hidden_dim is not None else int(self.embed_dim * self.mlp_ratio)

    @property
    def output_dim(self) -> int:
        return self.num_classes if self.num_classes else self.embed_dim

    def validate(self) -> None:
        for name in ("patch_size", "embed_dim", "depth", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("input_size", "img_size"):
            size = pair(getattr(self, name))
            if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in size):
                raise ConfigError(f"{name} must be a positive int or [H, W], got {getattr(self, name)!r}")
        if any(s < self.patch_size for s in self.image_hw):
            raise ConfigError(f"img_size {self.img_size} is smaller than one patch ({self.patch_size} px)")
        if any(s > i for s, i in zip(self.image_hw, self.input_hw)):
            raise ConfigError(f"img_size {self.img_size} is larger than input_size {self.input_size}: a budget ViT "
                              f"runs at its input size or below")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for name, value, choices in (("interpolation", self.interpolation, INTERPOLATIONS),
                                     ("act", self.act, ACTIVATIONS), ("mlp_layer", self.mlp_layer, MLP_LAYERS),
                                     ("global_pool", self.global_pool, POOLS)):
            if value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.mlp_hidden_dim is not None and (isinstance(self.mlp_hidden_dim, bool)
                                                or not isinstance(self.mlp_hidden_dim, int) or self.mlp_hidden_dim <= 0):
            raise ConfigError(f"mlp_hidden_dim must be a positive integer or null, got {self.mlp_hidden_dim!r}")
        if self.num_classes < 0 or self.reg_tokens < 0:
            raise ConfigError("num_classes and reg_tokens must be >= 0")
        if self.global_pool == "token" and not self.class_token:
            raise ConfigError("global_pool 'token' pools the class token, but class_token is false: pool with 'avg' "
                              "or 'map', or set class_token: true")
        if self.pool_spec is not None and (self.global_pool != "map" or not isinstance(self.pool_spec, Mapping)
                                           or set(self.pool_spec) != set(POOL_SPEC_KEYS)):
            raise ConfigError(f"pool_spec describes a MAP head (global_pool: map) by exactly the keys "
                              f"{', '.join(POOL_SPEC_KEYS)}; got global_pool {self.global_pool!r} and {self.pool_spec!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.family != FAMILY:
            raise ConfigError(f"family must be '{FAMILY}' in a budget ViT config, got {self.family!r}")

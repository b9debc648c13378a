"""Typed Sparsifiner configuration: the ViT (timm's VisionTransformer fields) and its connectivity predictors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Union

from data.schema import check_keys
from teachers.rope import spec_problem

from ..blocks import ACTIVATIONS, MLP_LAYERS, POOL_SPEC_KEYS
from ..family import ConfigError, ConfigFile

__all__ = ["FAMILY", "POOLS", "SparsifinerConfig"]

FAMILY = "sparsifiner"
POOLS = ("token", "avg", "map")


def pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


@dataclass
class SparsifinerConfig(ConfigFile):
    """A Sparsifiner: the ViT (timm's VisionTransformer fields) and its connectivity predictors.

    The first block of fields is the authors' configuration (the keys of the golden fixtures); the second
    lets the model be any supported teacher's whole image tower (open_clip: `pre_norm` = ln_pre and no
    patch-embedding bias, QuickGELU, a bias-free projection as `head`; DINOv2: registers, position
    embedding without the prefix tokens). `family` tells a saved config apart from a SparseFormer's.
    """

    img_size: Union[int, list[int]] = 224
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_classes: int = 1000
    attn_keep_rate: Union[float, list[float]] = 0.25  # one rate, or one per block; 1.0 = dense block
    reduce_n_factor: int = 6  # K = N // reduce_n_factor
    reduce_c_factor: int = 2  # c = head_dim // reduce_c_factor
    share_inout_proj: bool = False  # proj_back_n is proj_n
    basis_threshold: float = 0.02
    basis_coef_topk: int = 8
    ln_eps: float = 1e-6
    # --- the rest of a teacher's tower
    act: str = "gelu"  # 'gelu' | 'quick_gelu' (OpenAI CLIP)
    pre_norm: bool = False  # LayerNorm before the blocks (open_clip ln_pre); the patch embedding has no bias
    reg_tokens: int = 0  # register tokens after the class token (DINOv2 reg4)
    no_embed_class: bool = False  # position embedding covers the patches only (prefix tokens get none)
    head_bias: bool = True  # False for a CLIP projection
    drop_path_rate: float = 0.0
    # --- the newer towers (SigLIP, DINOv2 giant, qk-norm ViTs): timm VisionTransformer's own arguments
    class_token: bool = True  # False (SigLIP): every query row is predicted, none is dense
    global_pool: str = "token"  # 'token' | 'avg' (mean of the patch tokens) | 'map' (a MAP attention head)
    fc_norm: bool = False  # the final LayerNorm after pooling (timm `fc_norm`) instead of on every token (`norm`)
    mlp_layer: str = "mlp"  # 'mlp' | 'swiglu' | 'glu' | 'glu_gate_first' (`students.blocks.mlp`)
    mlp_hidden_dim: int | None = None  # timm's hidden_features when no ratio gives it (SO400M: 4304 of 1152)
    qk_norm: bool = False  # LayerNorm on q and k per head (at ln_eps); the predictor reads the normed ones
    pool_spec: dict | None = None  # the MAP head's constructor data (`students.blocks.map_pool`); None: timm's
    # --- timm Eva towers (PE-Core, EVA-02, DINOv3)
    pos_embed: bool = True  # an absolute position embedding (DINOv3 has none: rotary positions alone)
    pool_include_prefix: bool = False  # the MAP head (or mean) reads the prefix tokens too (PE-Core)
    attn_norm: bool = False  # EVA-02 CLIP's LayerNorm on the attention output before its projection (`attn.norm`)
    mlp_norm: bool = False  # and on the MLP's hidden features before fc2 (`mlp.norm`)
    rope: dict | None = None  # the teacher's rotary module as plain data (`teachers.rope.RotaryPositions.spec`)
    family: str = FAMILY

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "SparsifinerConfig") -> "SparsifinerConfig":
        if isinstance(d, SparsifinerConfig):
            return d
        if not isinstance(d, Mapping):
            raise ConfigError(f"a Sparsifiner config must be a mapping or SparsifinerConfig, got {type(d).__name__}")
        check_keys(cls, d, "Sparsifiner config", error=ConfigError)
        d = dict(d)
        for k in ("img_size", "attn_keep_rate"):
            if isinstance(d.get(k), (list, tuple)):
                d[k] = list(d[k])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    # ----------------------------------------------------------- structure
    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W): the one resolution the model takes."""
        return pair(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.image_size
        return h // self.patch_size, w // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """The rows that attend densely: the class token (if any) and the registers."""
        return int(self.class_token) + self.reg_tokens

    @property
    def hidden_dim(self) -> int:
        """The MLP's hidden_features (timm: int(embed_dim * mlp_ratio) unless given exactly)."""
        return self.mlp_hidden_dim if self.mlp_hidden_dim is not None else int(self.embed_dim * self.mlp_ratio)

    @property
    def num_tokens(self) -> int:
        """N: prefix tokens and patches (fixed by the image size: the predictor holds N x K matrices)."""
        gh, gw = self.grid_size
        return self.num_prefix_tokens + gh * gw

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def reduced_dim(self) -> int:
        """c, the predictor's width per head."""
        return self.head_dim // self.reduce_c_factor

    @property
    def num_basis(self) -> int:
        """K, the rank of the low-rank attention approximation."""
        return self.num_tokens // self.reduce_n_factor

    @property
    def keep_rates(self) -> list[float]:
        r = self.attn_keep_rate
        return [float(x) for x in r] if isinstance(r, list) else [float(r)] * self.depth

    @property
    def budgets(self) -> list[int]:
        """Keys kept per query row in each block: ceil(keep_rate * N)."""
        n = self.num_tokens
        # The tolerance keeps float error (0.1 * 1370 = 137.00000000000003) from adding a key.
        return [min(n, math.ceil(r * n - 1e-9)) for r in self.keep_rates]

    @property
    def output_dim(self) -> int:
        return self.num_classes if self.num_classes else self.embed_dim

    def validate(self) -> None:
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")

        for name in ("patch_size", "embed_dim", "depth", "num_heads", "reduce_n_factor", "reduce_c_factor",
                     "basis_coef_topk"):
            positive_int(name)
        size = pair(self.img_size)
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in size):
            raise ConfigError(f"img_size must be a positive int or [H, W], got {self.img_size!r}")
        if any(s < self.patch_size for s in size):
            raise ConfigError(f"img_size {self.img_size} is smaller than one patch ({self.patch_size} px)")
        # A size that is no multiple of the patch drops the last pixels, as timm's patch embedding does
        # (SigLIP SO400M/14 at 384 px: 27 x 27 patches).
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_classes < 0 or self.reg_tokens < 0:
            raise ConfigError("num_classes and reg_tokens must be >= 0")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        if self.mlp_layer not in MLP_LAYERS:
            raise ConfigError(f"mlp_layer must be one of {', '.join(MLP_LAYERS)}, got {self.mlp_layer!r}")
        if self.mlp_hidden_dim is not None and (isinstance(self.mlp_hidden_dim, bool)
                                                or not isinstance(self.mlp_hidden_dim, int) or self.mlp_hidden_dim <= 0):
            raise ConfigError(f"mlp_hidden_dim must be a positive integer or null, got {self.mlp_hidden_dim!r}")
        if self.mlp_layer.startswith("glu") and self.hidden_dim % 2:
            raise ConfigError(f"a packed GLU MLP needs an even hidden width (value and gate halves), got "
                              f"{self.hidden_dim}")
        if self.global_pool not in POOLS:
            raise ConfigError(f"global_pool must be one of {', '.join(POOLS)}, got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ConfigError("global_pool 'token' pools the class token, but class_token is false: "
                              "pool with 'avg' or 'map', or set class_token: true")
        if self.pool_spec is not None:
            if self.global_pool != "map":
                raise ConfigError(f"pool_spec describes a MAP head, but global_pool is {self.global_pool!r}: "
                                  f"set global_pool: map or drop pool_spec")
            if not isinstance(self.pool_spec, Mapping) or set(self.pool_spec) != set(POOL_SPEC_KEYS):
                raise ConfigError(f"pool_spec must be a mapping with exactly the keys {', '.join(POOL_SPEC_KEYS)} "
                                  f"(a teacher's `pool_spec`), got {self.pool_spec!r}")
        if self.reduced_dim < 1:
            raise ConfigError(f"reduce_c_factor={self.reduce_c_factor} leaves c = head_dim // reduce_c_factor = "
                              f"{self.head_dim} // {self.reduce_c_factor} = 0; valid range: 1..{self.head_dim}")
        if self.num_basis < 1:
            raise ConfigError(f"reduce_n_factor={self.reduce_n_factor} leaves K = N // reduce_n_factor = "
                              f"{self.num_tokens} // {self.reduce_n_factor} = 0; valid range: 1..{self.num_tokens}")
        if self.basis_coef_topk > self.num_basis:
            raise ConfigError(f"basis_coef_topk={self.basis_coef_topk} exceeds K = {self.num_basis} basis rows; "
                              f"valid range: 1..{self.num_basis}")
        rate = self.attn_keep_rate
        if isinstance(rate, list) and len(rate) != self.depth:
            raise ConfigError(f"attn_keep_rate has {len(rate)} rates for {self.depth} blocks: give one rate, "
                              f"or exactly {self.depth}")
        for i, r in enumerate(self.keep_rates):
            if isinstance(r, bool) or not 0.0 < r <= 1.0:
                where = f"attn_keep_rate[{i}]" if isinstance(rate, list) else "attn_keep_rate"
                raise ConfigError(f"{where} = {r} is outside (0, 1]: the fraction of keys each query keeps")
        if not self.basis_threshold >= 0.0:
            raise ConfigError(f"basis_threshold must be >= 0, got {self.basis_threshold}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.rope is not None:
            problem = spec_problem(self.rope)
            if problem:
                raise ConfigError(f"rope: {problem} (`teachers.rope.RotaryPositions.spec`)")
            if tuple(self.rope["grid_size"]) != self.grid_size:
                raise ConfigError(f"rope: its grid {self.rope['grid_size']} is not the {self.grid_size[0]}x"
                                  f"{self.grid_size[1]} patch grid of img_size {self.img_size}")
        if self.family != FAMILY:
            raise ConfigError(f"family must be '{FAMILY}' in a Sparsifiner config, got {self.family!r}")

"""The timm layers a student builds to hold what it inherits from its teacher, by name.

A teacher describes its blocks and pooling head in plain data (`teachers.base.Teacher`: `mlp_layer`,
`mlp_act`, `mlp_hidden_dim`, `qk_norm`, `pool_spec`); student configs carry the same data, and these
functions turn it back into timm's own modules, so that the teacher's weights load under their timm names:

    mlp_layer    'mlp'             Mlp: fc1, act, fc2
                 'swiglu'          SwiGLU: act(fc1_g(x)) * fc1_x(x), fc2
                 'glu'             GluMlp: fc1 packed [value | gate], value * act(gate), fc2
                 'glu_gate_first'  GluMlp(gate_last=False): fc1 packed [gate | value] (DINOv2 giant's SwiGLUPacked)
    mlp_act      'gelu' | 'gelu_tanh' | 'quick_gelu' | 'silu'
    pool_spec    the arguments of a MAP head (timm `AttentionPoolLatent`), see `map_pool`
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

from torch import Tensor, nn

from teachers.base import ACTIVATIONS, MLP_LAYERS

__all__ = ["ACTIVATIONS", "MLP_LAYERS", "act_layer", "attention", "map_pool", "mlp", "pool_and_norm", "pool_tokens"]


def act_layer(name: str) -> type[nn.Module] | partial:
    """The activation class of a name in `ACTIVATIONS`."""
    from timm.layers import QuickGELU

    layers = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"), "quick_gelu": QuickGELU,
              "silu": nn.SiLU}
    if name not in layers:
        raise ValueError(f"unknown MLP activation {name!r}; the activations are {', '.join(ACTIVATIONS)}")
    return layers[name]


def mlp(kind: str, dim: int, hidden_dim: int, act: str, norm_eps: float | None = None) -> nn.Module:
    """An MLP of `kind` (`MLP_LAYERS`) over `dim` channels; `hidden_dim` is timm's `hidden_features` (fc1's
    width: both halves of a packed GLU). `norm_eps`: a LayerNorm (at that eps) on the hidden features before fc2,
    timm's `mlp.norm` (EVA-02 CLIP's `scale_mlp`)."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    layers = {"mlp": Mlp, "swiglu": SwiGLU, "glu": GluMlp, "glu_gate_first": partial(GluMlp, gate_last=False)}
    if kind not in layers:
        raise ValueError(f"unknown MLP kind {kind!r}; the kinds are {', '.join(MLP_LAYERS)}")
    if kind.startswith("glu") and hidden_dim % 2:
        raise ValueError(f"a packed GLU's hidden width must be even (value and gate halves), got {hidden_dim}")
    norm = {} if norm_eps is None else {"norm_layer": partial(nn.LayerNorm, eps=norm_eps)}
    return layers[kind](dim, hidden_features=hidden_dim, act_layer=act_layer(act), **norm)


def attention(dim: int, num_heads: int, qk_norm: bool, eps: float, scale_norm: bool = False,
              rope_prefix: int | None = None, rotate_half: bool = False) -> nn.Module:
    """timm's fused-qkv `Attention` with biases, LayerNorm qk-norm (at `eps`) and a LayerNorm on the attention's
    output before its projection (`scale_norm`, EVA-02 CLIP's `scale_attn_inner`) when asked for. With
    `rope_prefix` (the number of prefix tokens left unrotated), timm's `AttentionRope` with the same weights, whose
    forward takes `rope=` rotations (`teachers.rope.RotaryPositions.rotations`, applied in halves with
    `rotate_half`) for the queries and keys of the tokens after the prefix."""
    from timm.layers import AttentionRope
    from timm.models.vision_transformer import Attention

    norm = partial(nn.LayerNorm, eps=eps)
    if rope_prefix is None:
        return Attention(dim, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm, scale_norm=scale_norm,
                         norm_layer=norm)
    return AttentionRope(dim, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm, scale_norm=scale_norm,
                         norm_layer=norm, num_prefix_tokens=rope_prefix, rotate_half=rotate_half)


POOL_SPEC_KEYS = ("num_heads", "latent_len", "latent_dim", "qkv_bias", "q_proj", "qk_norm", "pool_type",
                  "mlp_hidden_dim", "act", "eps", "qk_norm_eps")


def map_pool(dim: int, spec: Mapping[str, Any]) -> nn.Module:
    """A MAP head (timm `AttentionPoolLatent`) over `dim`-wide tokens from a teacher's `pool_spec`:
    latent queries attend to the tokens, then projection, norm and MLP, as SigLIP's head."""
    from timm.layers import AttentionPoolLatent, Mlp

    unknown = [k for k in spec if k not in POOL_SPEC_KEYS]
    missing = [k for k in POOL_SPEC_KEYS if k not in spec]
    if unknown or missing:
        raise ValueError(f"a MAP head spec has the keys {', '.join(POOL_SPEC_KEYS)}; "
                         f"unknown {unknown}, missing {missing}")
    s = dict(spec)
    norm = None if s["eps"] is None else partial(nn.LayerNorm, eps=s["eps"])
    pool = AttentionPoolLatent(
        dim, num_heads=s["num_heads"], mlp_ratio=s["mlp_hidden_dim"] / dim, qkv_bias=s["qkv_bias"],
        q_proj=s["q_proj"], qk_norm=s["qk_norm"], latent_len=s["latent_len"], latent_dim=s["latent_dim"],
        pool_type=s["pool_type"], norm_layer=norm, act_layer=act_layer(s["act"]))
    if pool.mlp.fc1.out_features != s["mlp_hidden_dim"]:  # the ratio did not round back to the width
        pool.mlp = Mlp(dim, s["mlp_hidden_dim"], out_features=dim, act_layer=act_layer(s["act"]))
    if s["qk_norm"]:
        pool.q_norm = nn.LayerNorm(pool.head_dim, eps=s["qk_norm_eps"])
        pool.k_norm = nn.LayerNorm(pool.head_dim, eps=s["qk_norm_eps"])
    return pool


def pool_tokens(tokens: Tensor, pool: str, num_prefix: int, attn_pool: nn.Module | None = None) -> Tensor:
    """A ViT head's pooling over tokens of any count: the class token ('token'), or the mean ('avg') or
    MAP head ('map') over the tokens after the `num_prefix` prefix tokens (timm's default)."""
    if pool == "token":
        return tokens[:, 0]
    patches = tokens[:, num_prefix:]
    return attn_pool(patches) if pool == "map" else patches.mean(dim=1)


def pool_and_norm(tokens: Tensor, pool: str, num_prefix: int, norm: nn.Module, norm_before_pool: bool,
                  attn_pool: nn.Module | None = None) -> Tensor:
    """The pooled, normed feature: `norm` on every token then pooling (timm's `norm`, SigLIP), or pooling
    then `norm` (timm's `fc_norm`); for the class token the two are the same, and only it is normed."""
    if pool == "token" or not norm_before_pool:
        return norm(pool_tokens(tokens, pool, num_prefix, attn_pool))
    return pool_tokens(norm(tokens), pool, num_prefix, attn_pool)

"""timm `Eva` towers as teachers: EVA-02 (and its CLIP towers), Perception Encoder (PE-Core), DINOv3, RoPE-ViT.

`timm.models.eva.Eva` is a pre-norm ViT like timm's `VisionTransformer` (class token, registers, absolute
position embedding or none, an optional LayerNorm before the blocks, pooling by the class token, the mean or a
MAP head, `norm` or `fc_norm`, a Linear head), whose blocks differ in four ways, all read here:

* rotary position embeddings: each block rotates the queries and keys of the tokens after the prefix by
  their positions on the patch grid (`teachers.rope.RotaryPositions`, `Teacher.rope`);
* attention as `EvaAttention` (fused qkv with q and v biases, or separate q/k/v projections without a k bias)
  or timm's `AttentionRope`; both read into timm `Block`'s fused `attn.qkv` (zeros for the k bias);
* LayerScale as `gamma_1` / `gamma_2` parameters (folded into attn.proj and mlp.fc2, as for `Block`);
* EVA-02 CLIP's extra LayerNorms, one on the attention output before its projection (`scale_attn_inner`;
  timm `Block`'s `scale_attn_norm`: `Teacher.attn_norm`) and one inside the SwiGLU before fc2 (`scale_mlp`;
  `scale_mlp_norm`: `Teacher.mlp_norm`).

Blocks' weights come out in timm `Block` layout (with `attn.norm.*` / `mlp.norm.*` for those norms), which
timm's `AttentionRope` also loads; `Teacher.rope.rotations(positions, block)` is what it then takes as `rope=`.
Post-norm blocks, grouped-query or gated attention, RMSNorm and rotary kinds or options this package does
not know are refused with the reason (`block_problems`).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import BlockModules, _linear, _ln_affine
from .rope import RotaryPositions, rope_kind, rope_problems
from .timm_layers import block_weights, mlp_act, mlp_hidden_dim, mlp_layer

__all__ = ["EvaTower", "block_problems", "eva_block_state_dict", "fused_qkv", "is_eva", "rotary_positions"]


def is_eva(model: nn.Module) -> bool:
    from timm.models.eva import Eva

    return type(model) is Eva


def fused_qkv(attn: nn.Module) -> tuple[Tensor, Tensor | None]:
    """An Eva block's attention as one fused qkv projection: weight [3 * width, width] (q, k, v stacked) and bias
    (None without biases; EVA's key has no bias: zeros there). New tensors where the projections are separate."""
    import torch

    if attn.qkv is not None:
        if getattr(attn, "q_bias", None) is not None:  # EvaAttention: separate q / v biases, a zero k bias
            return attn.qkv.weight, torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        return attn.qkv.weight, attn.qkv.bias
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([p.weight for p in projections])
    if all(p.bias is None for p in projections):
        return weight, None
    return weight, torch.cat([p.bias if p.bias is not None else torch.zeros_like(p.weight[:, 0])
                              for p in projections])


def eva_block_state_dict(blk: nn.Module) -> dict[str, Tensor]:
    """An `EvaBlock` in timm `Block` layout: `norm1`, `attn.qkv` (fused), `attn.q_norm` / `attn.k_norm` (qk-norm),
    `attn.norm` (EVA-02 CLIP's attention-output norm), `attn.proj` (gamma_1 folded), `norm2`, the MLP's own
    names (`mlp.norm` inside EVA-02 CLIP's SwiGLU; gamma_2 folded into `mlp.fc2`). Detached copies."""
    import torch

    attn = blk.attn
    weight, bias = fused_qkv(attn)
    sd = {**_ln_affine(blk.norm1, "norm1."), "attn.qkv.weight": weight,
          "attn.qkv.bias": bias if bias is not None else torch.zeros_like(weight[:, 0])}
    for name in ("q_norm", "k_norm", "norm"):
        if isinstance(getattr(attn, name), nn.LayerNorm):
            sd.update(_ln_affine(getattr(attn, name), f"attn.{name}."))
    sd.update(_linear(attn.proj, "attn.proj.", blk.gamma_1))
    sd.update(_ln_affine(blk.norm2, "norm2."))
    sd.update(block_weights(blk.mlp, "mlp.", {"fc2": blk.gamma_2}))
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------- what can be read
def _attention_problem(attn: nn.Module, width: int) -> str | None:
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention

    if type(attn) not in (EvaAttention, AttentionRope):
        return f"{type(attn).__name__} attention (EvaAttention and AttentionRope are supported)"
    if getattr(attn, "gate", None) is not None:
        return "gated attention"
    if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
        return "grouped-query attention (fewer key/value heads than query heads)"
    if attn.head_dim * attn.num_heads != width or attn.proj.out_features != width:
        return f"attention width {attn.head_dim * attn.num_heads} differs from the model width {width}"
    qk = (attn.q_norm, attn.k_norm)
    if not (all(isinstance(n, nn.Identity) for n in qk) or all(isinstance(n, nn.LayerNorm) for n in qk)):
        return f"qk-norm with {type(attn.q_norm).__name__} (LayerNorm qk-norm is supported)"
    if not isinstance(attn.norm, (nn.Identity, nn.LayerNorm)):
        return f"an attention-output norm that is a {type(attn.norm).__name__}"
    return None


def _block_problem(blk: nn.Module, width: int) -> str | None:
    from timm.models.eva import EvaBlock

    if type(blk) is not EvaBlock:
        return f"{type(blk).__name__} (not the pre-norm EvaBlock: post-norm blocks are unsupported)"
    problem = _attention_problem(blk.attn, width)
    if problem:
        return problem
    mlp = blk.mlp
    if mlp_layer(mlp) is None:
        return f"{type(mlp).__name__} MLP (Mlp, SwiGLU and GluMlp are supported)"
    if mlp_act(mlp.act) is None:
        return f"MLP activation {mlp.act!r} (GELU, GELU-tanh, QuickGELU and SiLU are supported)"
    if not isinstance(mlp.norm, (nn.Identity, nn.LayerNorm)):
        return f"a norm inside the MLP that is a {type(mlp.norm).__name__}"
    if not all(isinstance(n, nn.LayerNorm) for n in (blk.norm1, blk.norm2)):
        return f"{type(blk.norm1).__name__} norms (LayerNorm is supported; not RMSNorm)"
    return None


def _block_kind(blk: nn.Module) -> tuple:
    """What must agree between blocks for one block kind to hold them all."""
    attn, mlp = blk.attn, blk.mlp
    return (mlp_layer(mlp), mlp_act(mlp.act), mlp_hidden_dim(mlp), not isinstance(attn.q_norm, nn.Identity),
            not isinstance(attn.norm, nn.Identity), not isinstance(mlp.norm, nn.Identity),
            blk.gamma_1 is not None, blk.gamma_2 is not None, getattr(attn, "rotate_half", False),
            attn.num_prefix_tokens)


def rotary_positions(model: nn.Module) -> RotaryPositions | None:
    """The rotary positions of an `Eva` whose blocks `block_problems` accepts (None: no rotary embedding)."""
    if model.rope is None:
        return None
    attn = model.blocks[0].attn
    return RotaryPositions(kind=rope_kind(model.rope), grid_size=tuple(model.patch_embed.grid_size),
                           num_prefix_tokens=model.num_prefix_tokens, num_heads=attn.num_heads,
                           head_dim=attn.head_dim, rotate_half=bool(getattr(attn, "rotate_half", False)),
                           depth=len(model.blocks), module=model.rope)


def block_problems(model: nn.Module, final_norm: nn.Module | None = None) -> list[str]:
    """Why an `Eva`'s blocks and rotary embedding cannot be read as a teacher's ([] when they can); the tower
    around them (patch embedding, pooling, norms, head) is checked as a `VisionTransformer`'s is
    (`teachers.timm_vit.structure_problems`), whose `final_norm` must share the blocks' eps."""
    width = model.embed_dim
    for i, blk in enumerate(model.blocks):
        problem = _block_problem(blk, width)
        if problem:
            return [f"block {i} has {problem}"]
    if len({_block_kind(blk) for blk in model.blocks}) > 1:
        return ["its blocks are not all of one kind (MLP, activation, width, norms, LayerScale, rotary layout)"]
    norms = [n for blk in model.blocks for n in (blk.norm1, blk.norm2, blk.attn.q_norm, blk.attn.k_norm,
                                                 blk.attn.norm, blk.mlp.norm, final_norm)
             if isinstance(n, nn.LayerNorm)]
    if len({n.eps for n in norms}) > 1:
        return [f"its LayerNorms use different eps {sorted({n.eps for n in norms})}"]
    if model.rope is None:
        return []
    attn = model.blocks[0].attn
    problems = rope_problems(model.rope, depth=len(model.blocks), num_heads=attn.num_heads, head_dim=attn.head_dim,
                             rotate_half=bool(getattr(attn, "rotate_half", False)))
    if not problems and attn.num_prefix_tokens != model.num_prefix_tokens:
        problems = ["its attention leaves another number of tokens unrotated than it has prefix tokens"]
    if not problems and bool(model.rope_mixed) != (rope_kind(model.rope) == "mixed"):
        problems = ["its rotary embedding is not used per block as its kind needs"]
    if not problems:
        problem = rotary_positions(model).check()
        problems = [problem] if problem else []
    return problems


# --------------------------------------------------------------------------- the tower
def _layer_scale(gamma: Tensor | None) -> nn.Module:
    """An Eva block's gamma as timm's `LayerScale` holding that very parameter (identity without one)."""
    from timm.layers import LayerScale

    if gamma is None:
        return nn.Identity()
    scale = LayerScale(gamma.shape[0], device="meta")
    scale.gamma = gamma
    return scale


class EvaTower:
    """What differs for a teacher whose image tower is a timm `Eva` (`self.vit`): its rotary positions, LayerScale
    and MAP head (read in `_init_blocks`), its blocks' weights, running them with their rotary positions, and the
    embedding before them. Mixed in before `teachers.timm_vit.TimmTower`, which reads the rest as a
    `VisionTransformer`'s."""

    def _init_blocks(self, vit: nn.Module) -> None:
        super()._init_blocks(vit)  # heads, MLP, qk-norm, the extra norms, eps: read as a `Block`'s
        self.rope = rotary_positions(vit)
        self.pool_include_prefix = self.pool == "map"  # Eva.pool hands its MAP head every token

    def _has_layer_scale(self, blk: nn.Module) -> bool:
        return blk.gamma_1 is not None or blk.gamma_2 is not None

    def _block_state_dict(self, i: int) -> dict[str, Tensor]:
        return eva_block_state_dict(self.vit.blocks[i])

    def _grid_rotations(self, i: int) -> Tensor | None:
        """The rotations timm gives block i's patch tokens (None without rotary positions)."""
        if self.rope is None:
            return None
        rotations = self.rope.grid_rotations()
        return rotations[i] if self.rope.per_block else rotations

    def _run_block(self, i: int, tokens: Tensor) -> Tensor:
        if self.rope is not None and tokens.shape[1] != self.num_prefix_tokens + self.num_patches:
            raise ValueError(
                f"teacher {self.name} rotates its tokens by their positions on its {self.grid_size[0]}x"
                f"{self.grid_size[1]} patch grid: run_block takes its {self.num_prefix_tokens} prefix and "
                f"{self.num_patches} patch tokens, got {tokens.shape[1]} tokens; pass positions= for other tokens")
        return self.vit.blocks[i](tokens, rope=self._grid_rotations(i))

    def _run_block_at(self, i: int, tokens: Tensor, positions: Tensor) -> Tensor:
        rotations = self.rope.rotations(positions, i)
        if rotations.shape[-2] != tokens.shape[1] - self.num_prefix_tokens:
            raise ValueError(f"{rotations.shape[-2]} positions for {tokens.shape[1] - self.num_prefix_tokens} "
                             f"tokens after the {self.num_prefix_tokens} prefix tokens of teacher {self.name}")
        return self.vit.blocks[i](tokens, rope=rotations)

    def _block_modules(self, i: int) -> BlockModules:
        blk = self.vit.blocks[i]
        attn = blk.attn
        weight, bias = fused_qkv(attn)
        proj = attn.proj if isinstance(attn.norm, nn.Identity) else nn.Sequential(attn.norm, attn.proj)
        return BlockModules(norm1=blk.norm1, qkv_weight=weight, qkv_bias=bias, num_heads=attn.num_heads, proj=proj,
                            ls1=_layer_scale(blk.gamma_1), norm2=blk.norm2, mlp=blk.mlp, ls2=_layer_scale(blk.gamma_2),
                            q_norm=attn.q_norm, k_norm=attn.k_norm, rotary=self.rope,
                            rotations=self._grid_rotations(i))

    def _embed_tokens(self, images: Tensor) -> Tensor:
        # The steps of Eva.forward_features before the blocks (its _pos_embed also gives the grid's rotations).
        m = self.vit
        return m.norm_pre(m._pos_embed(m.patch_embed(images))[0])

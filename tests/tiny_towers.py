"""Tiny random timm ViTs of the kinds the field's teachers are (SigLIP's MAP head, average pooling without a
class token, DINOv2-giant's SwiGLU with LayerScale and registers, qk-norm), and tiny timm `Eva` towers with
rotary positions (`EVA_TOWERS`: PE-Core, EVA-02 CLIP, DINOv3, RoPE-Mixed and a rope-less EVA), registered with
timm under `tiny_*` names so that open_clip configs can name them as image towers (`vision_cfg.timm_model_name`).

Import this module to register them; `TIMM_SPECS` / `EVA_SPECS` are teacher specs of kind timm over the same
models.
"""

from __future__ import annotations

from functools import partial

from timm.models import register_model
from timm.models.eva import _create_eva
from timm.models.vision_transformer import _create_vision_transformer

# name: VisionTransformer kwargs (32 px images, 8 px patches: 16 patch tokens).
TOWERS = {
    # SigLIP: no class token, MAP head; width 72 = 2 heads of 36 (not a multiple of 64), MLP 4304/1152 of it.
    "tiny_siglip_map": dict(embed_dim=72, depth=3, num_heads=2, mlp_ratio=4304 / 1152, class_token=False,
                            global_pool="map"),
    # SigLIP "gap": no class token, the final norm on every token, then the mean.
    "tiny_siglip_gap": dict(embed_dim=48, depth=3, num_heads=2, class_token=False, global_pool="avg",
                            fc_norm=False),
    # DINOv2 giant: SwiGLUPacked (GluMlp, gate first, SiLU), LayerScale, 4 registers, no class-token pos embed.
    "tiny_dinov2_swiglu": dict(embed_dim=48, depth=3, num_heads=2, mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed",
                               act_layer="silu", init_values=1e-1, reg_tokens=4, no_embed_class=True),
    # qk-norm, unpacked SwiGLU, a class token pooled by the mean with fc_norm, and a classifier head.
    "tiny_qknorm_swiglu_avg": dict(embed_dim=48, depth=3, num_heads=2, mlp_layer="swiglu", act_layer="silu",
                                   qk_norm=True, global_pool="avg", num_classes=7),
}


def _layers(args: dict) -> dict:
    """The layer classes named in a tower's kwargs (plain data above): `mlp_layer` by name, `eps` of the LayerNorms."""
    from timm.layers import LayerNorm, SwiGLU, SwiGLUPacked

    args = dict(args)
    if isinstance(args.get("mlp_layer"), str):
        args["mlp_layer"] = {"swiglu": SwiGLU, "swiglu_packed": SwiGLUPacked}[args["mlp_layer"]]
    if "eps" in args:
        args["norm_layer"] = partial(LayerNorm, eps=args.pop("eps"))
    return args


def _register(name: str, create, kwargs: dict) -> None:
    def entrypoint(pretrained=False, **overrides):
        return create(name, pretrained=pretrained, **{**_layers(kwargs), **overrides})

    entrypoint.__name__ = name
    entrypoint.__module__ = __name__
    register_model(entrypoint)


for _name, _kwargs in TOWERS.items():
    _register(_name, _create_vision_transformer, {"img_size": 32, "patch_size": 8, "num_classes": 0, **_kwargs})

TIMM_SPECS = {name: {"kind": "timm", "model": name, "pretrained": None} for name in TOWERS}

# name: Eva kwargs, the real towers' settings at a tiny size: 32 x 48 px images of 8 px patches, a 4 x 6 grid (not
# square, so that rows and columns cannot be confused), width 48 in 2 heads of 24 (a multiple of 4 for 2-D RoPE).
EVA_IMAGE_SIZE = (32, 48)
EVA_TOWERS = {
    # PE-Core: AttentionRope, 'cat' RoPE on the index grid + 1 in 'xy' order, rescaled to a reference grid
    # (3 x 4 here, so that the rescaling shows), a LayerNorm before the blocks, the MAP head, eps 1e-5.
    "tiny_pe_core": dict(attn_type="rope", use_pre_transformer_norm=True, use_rot_pos_emb=True, ref_feat_shape=(3, 4),
                         rope_grid_offset=1.0, rope_grid_indexing="xy", global_pool="map", attn_pool_num_heads=2,
                         attn_pool_mlp_ratio=4.0, eps=1e-5),
    # EVA-02 CLIP: separate q/k/v projections (no k bias), SwiGLU with a norm inside, an attention-output norm,
    # 'cat' RoPE in 'ij' order rescaled to a reference grid, class-token pooling.
    "tiny_eva02_clip": dict(qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True,
                            scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(2, 2), global_pool="token"),
    # DINOv3: 'dinov3' RoPE (centred coordinates, periods, half layout), 4 registers, no absolute position
    # embedding, no qkv bias, LayerScale, packed SwiGLU (gate first), dynamic image size, norm then the mean.
    "tiny_dinov3": dict(dynamic_img_size=True, qkv_bias=False, init_values=1e-5, rope_type="dinov3",
                        rope_temperature=100, rope_rotate_half=True, use_rot_pos_emb=True, use_abs_pos_emb=False,
                        num_reg_tokens=4, use_fc_norm=False, swiglu_mlp=True, eps=1e-5),
    # RoPE-Mixed (Naver): learned frequencies per block and head in 'xy' order, qk-norm, LayerScale, mean pooling
    # with fc_norm.
    "tiny_rope_mixed": dict(attn_type="rope", init_values=1e-5, rope_type="mixed", rope_temperature=10.0,
                            rope_grid_indexing="xy", use_rot_pos_emb=True, use_abs_pos_emb=False, qk_norm=True,
                            global_pool="avg"),
    # EVA-01 style: an Eva without rotary positions (absolute position embedding, plain blocks).
    "tiny_eva_plain": dict(global_pool="token"),
}


for _name, _kwargs in EVA_TOWERS.items():
    _register(_name, _create_eva, {"img_size": EVA_IMAGE_SIZE, "patch_size": 8, "embed_dim": 48, "depth": 3,
                                   "num_heads": 2, "num_classes": 0, "eps": 1e-6, **_kwargs})

EVA_SPECS = {name: {"kind": "timm", "model": name, "pretrained": None} for name in EVA_TOWERS}

TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


def openclip_spec(tower: str, proj: str | None = "none", logit_bias: float | None = -10.0) -> dict:
    """An open_clip teacher spec whose image tower is `tower` (SigLIP-style: `timm_proj` none, a logit bias;
    PE-Core / EVA-02 style: `timm_proj` None, the timm head as the projection)."""
    kwargs = {**TOWERS, **EVA_TOWERS}[tower]
    embed_dim = kwargs.get("embed_dim", 48) if proj == "none" else 40
    cfg = {"embed_dim": embed_dim, "custom_text": True,
           "vision_cfg": {"image_size": list(EVA_IMAGE_SIZE) if tower in EVA_TOWERS else 32,
                          "timm_model_name": tower, "timm_model_pretrained": False,
                          "timm_pool": kwargs.get("global_pool", "token"), "timm_proj": proj},
           "text_cfg": dict(TEXT_CFG)}
    if logit_bias is not None:
        cfg["init_logit_bias"] = logit_bias
    return {"kind": "openclip", "model": f"{tower}-clip", "pretrained": None, "model_cfg": cfg}


def timm_forward_with_attention(vit, images):
    """timm's own `forward_features(images)` and, from its unfused attention path, every block's attention
    probabilities [B, H, N, N] (the input of each block's `attn_drop`)."""
    import torch

    probs = []
    hooks = [blk.attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(i[0])) for blk in vit.blocks]
    for blk in vit.blocks:
        blk.attn.fused_attn = False
    try:
        with torch.no_grad():
            tokens = vit.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
        for blk in vit.blocks:
            blk.attn.fused_attn = True
    return tokens, probs

"""Tiny random timm ViTs of the kinds the field's teachers are (SigLIP's MAP head, average pooling without a
class token, DINOv2-giant's SwiGLU with LayerScale and registers, qk-norm), registered with timm under
`tiny_*` names so that open_clip configs can name them as image towers (`vision_cfg.timm_model_name`).

Import this module to register them; `TIMM_SPECS` are teacher specs of kind timm over the same models.
"""

from __future__ import annotations

from timm.models import register_model
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


def _mlp_layer(name):
    from timm.layers import SwiGLU, SwiGLUPacked

    return {"swiglu": SwiGLU, "swiglu_packed": SwiGLUPacked}[name]


def _register(name: str, kwargs: dict) -> None:
    def entrypoint(pretrained=False, **overrides):
        args = {"img_size": 32, "patch_size": 8, "num_classes": 0, **kwargs}
        if isinstance(args.get("mlp_layer"), str):
            args["mlp_layer"] = _mlp_layer(args["mlp_layer"])
        return _create_vision_transformer(name, pretrained=pretrained, **{**args, **overrides})

    entrypoint.__name__ = name
    entrypoint.__module__ = __name__
    register_model(entrypoint)


for _name, _kwargs in TOWERS.items():
    _register(_name, _kwargs)

TIMM_SPECS = {name: {"kind": "timm", "model": name, "pretrained": None} for name in TOWERS}

TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


def openclip_spec(tower: str, proj: str = "none", logit_bias: float | None = -10.0) -> dict:
    """An open_clip teacher spec whose image tower is `tower` (SigLIP-style: `timm_proj` none, a logit bias)."""
    embed_dim = TOWERS[tower]["embed_dim"] if proj == "none" else 40
    cfg = {"embed_dim": embed_dim, "custom_text": True,
           "vision_cfg": {"image_size": 32, "timm_model_name": tower, "timm_model_pretrained": False,
                          "timm_pool": TOWERS[tower].get("global_pool", "token"), "timm_proj": proj},
           "text_cfg": dict(TEXT_CFG)}
    if logit_bias is not None:
        cfg["init_logit_bias"] = logit_bias
    return {"kind": "openclip", "model": f"{tower}-clip", "pretrained": None, "model_cfg": cfg}

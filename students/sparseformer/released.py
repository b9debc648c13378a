"""The released SparseFormer configurations and `create_model`.

v1 models (SparseFormer paper) were trained from scratch on ImageNet-1k; the
bootstrapped ("btsp") ones inherit the last 2N/3 blocks of a ViT teacher
(bootstrapping paper). Every configuration here builds exactly the keys and
shapes of the released checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..timm_registry import IMAGENET_MEAN_STD, INCEPTION_MEAN_STD, OPENAI_CLIP_MEAN_STD
from .config import SparseFormerConfig


V1_COMPATIBLE = {
    "type_num_attn_heads": 1,
    "type_op_adjust": 1,
    "mixing_bias": True,
    "transition_ln": True,
    "ln_eps": 1e-6,
    "use_stage_embedding": False,
    "grid_sample_config": {"mode": "bilinear", "padding_mode": "zeros", "align_corners": False},
    "restrict_grad_norm": False,
    "pg_inner_dim": 0.25,
    "clip_quick_gelu": False,
}

BTSP_COMPATIBLE = {
    "pg_inner_dim": 128,
    "grid_sample_config": {"mode": "bilinear", "padding_mode": "border", "align_corners": False},
    "type_num_attn_heads": 2,
    "type_op_adjust": 2,
    "restrict_grad_norm": False,
    "transition_ln": False,
    "mixing_bias": False,
    "ln_eps": 1e-5,
    "use_stage_embedding": True,
    "clip_quick_gelu": False,
}

# The focusing unit of a bootstrapped student: sample, encode RoIs, attend, mix, adjust RoIs.
BTSP_FOCUS_OPS = ["SAMPLING_M", "PE_INJECT", "ATTN", "MLP", "ROI_ADJ"]
# One more sampling step at the teacher's width, before the inherited blocks.
BTSP_SAMPLE_OPS = ["SAMPLING_M", "PE_INJECT"]


def v1_config(name: str, tokens: int, focus_width: int, width: int, depth: int, drop_path_rate: float) -> dict:
    """SparseFormer v1: a focusing unit repeated 4 times, one sampling unit, then plain blocks."""
    n_units = 2 + depth
    return {
        "conv_dim": 96,
        "num_latent_tokens": tokens,
        "num_sampling_points": 36,
        "same_token_embedding": False,
        "width_configs": [focus_width] + [width] * (n_units - 1),
        "repeats": [4] + [1] * (n_units - 1),
        "head_op": "avg",
        "ops_list": [["ATTN", "ROI_ADJ", "SAMPLING_M", "MLP"]] * 2 + [["ATTN", "MLP"]] * depth,
        "compatible_config": dict(V1_COMPATIBLE),
        "proj_dim": 1000,
        "proj_bias": True,
        "drop_path_rate": drop_path_rate,
        "normalization_factor": [list(IMAGENET_MEAN_STD[0]), list(IMAGENET_MEAN_STD[1])],
        "model_type": name,
    }


def btsp_config(
    name: str | None,
    tokens: int,
    focus_width: int,
    width: int,
    inherited_blocks: int,
    proj_dim: int,
    proj_bias: bool,
    quick_gelu: bool,
    mean_std=None,
    conv_dim: int = 64,
    num_points: int = 16,
    focus_repeats: int = 4,
    pg_inner_dim: int = 128,
) -> dict:
    """A bootstrapped SparseFormer: new focusing + sampling units, then the teacher's inherited blocks.

    `tokens` counts the latent tokens only; the class token is inserted before
    the first inherited block (unit index 2).
    """
    compat = dict(BTSP_COMPATIBLE, clip_quick_gelu=quick_gelu, pg_inner_dim=pg_inner_dim)
    cfg = {
        "conv_dim": conv_dim,
        "num_latent_tokens": tokens,
        "num_sampling_points": num_points,
        "same_token_embedding": True,
        "cls_token_insert_layer": 2,
        "width_configs": [focus_width] + [width] * (1 + inherited_blocks),
        "repeats": [focus_repeats] + [1] * (1 + inherited_blocks),
        "head_op": "cls",
        "ops_list": [list(BTSP_FOCUS_OPS), list(BTSP_SAMPLE_OPS)] + [["ATTN", "MLP"]] * inherited_blocks,
        "compatible_config": compat,
        "proj_dim": proj_dim,
        "proj_bias": proj_bias,
    }
    if mean_std is not None:
        cfg["normalization_factor"] = [list(mean_std[0]), list(mean_std[1])]
    if name is not None:
        cfg["model_type"] = name
    return cfg


@dataclass(frozen=True)
class PretrainedCfg:
    """What a user needs to feed the model: input size, normalisation, resize."""

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    def to_timm(self) -> dict:
        return dict(input_size=self.input_size, mean=self.mean, std=self.std,
                    interpolation=self.interpolation, crop_pct=self.crop_pct)


def _cfg(mean_std, size=224, crop_pct=0.875) -> PretrainedCfg:
    return PretrainedCfg((3, size, size), tuple(mean_std[0]), tuple(mean_std[1]), "bicubic", crop_pct)


RELEASED: dict[str, tuple[dict, PretrainedCfg]] = {
    "sparseformer_v1_tiny": (v1_config("sparseformer_v1_tiny", 49, 256, 512, 7, 0.2), _cfg(IMAGENET_MEAN_STD)),
    "sparseformer_v1_small": (v1_config("sparseformer_v1_small", 64, 320, 640, 7, 0.3), _cfg(IMAGENET_MEAN_STD)),
    "sparseformer_v1_base": (v1_config("sparseformer_v1_base", 81, 384, 768, 9, 0.4), _cfg(IMAGENET_MEAN_STD)),
    # AugReg ViT-B/16 (224) and ViT-L/16 (384) teachers: 48 latent tokens + cls.
    "sparseformer_btsp_augreg_base": (
        btsp_config("sparseformer_btsp_augreg_base", 48, 384, 768, 8, 1000, True, False, INCEPTION_MEAN_STD),
        _cfg(INCEPTION_MEAN_STD, 224, 0.9),
    ),
    "sparseformer_btsp_augreg_large": (
        btsp_config("sparseformer_btsp_augreg_large", 48, 512, 1024, 16, 1000, True, False, INCEPTION_MEAN_STD),
        _cfg(INCEPTION_MEAN_STD, 384, 1.0),
    ),
    # OpenAI CLIP ViT-B/16 and ViT-L/14 teachers (QuickGELU in the inherited blocks).
    "sparseformer_btsp_openai_clip_base": (
        btsp_config("sparseformer_btsp_openai_clip_base", 48, 384, 768, 8, 512, False, True, OPENAI_CLIP_MEAN_STD),
        _cfg(OPENAI_CLIP_MEAN_STD, 224, 1.0),
    ),
    "sparseformer_btsp_openai_clip_large": (
        btsp_config("sparseformer_btsp_openai_clip_large", 63, 512, 1024, 16, 768, False, True, OPENAI_CLIP_MEAN_STD),
        _cfg(OPENAI_CLIP_MEAN_STD, 224, 1.0),
    ),
}


# The teacher each released student was bootstrapped from (a `teachers.create_teacher` spec); v1 models
# were trained from scratch. What a LLaVA projector trained on CLIP tokens needs to know.
RELEASED_TEACHERS: dict[str, dict | None] = {
    "sparseformer_v1_tiny": None,
    "sparseformer_v1_small": None,
    "sparseformer_v1_base": None,
    "sparseformer_btsp_augreg_base": {"kind": "timm", "model": "vit_base_patch16_224.augreg_in21k_ft_in1k",
                                      "pretrained": True},
    "sparseformer_btsp_augreg_large": {"kind": "timm", "model": "vit_large_patch16_384.augreg_in21k_ft_in1k",
                                       "pretrained": True},
    "sparseformer_btsp_openai_clip_base": {"kind": "openclip", "model": "ViT-B-16-quickgelu", "pretrained": "openai"},
    "sparseformer_btsp_openai_clip_large": {"kind": "openclip", "model": "ViT-L-14-quickgelu", "pretrained": "openai"},
}


def get_teacher_spec(name: str) -> dict | None:
    """The teacher spec of a released model (None for the v1 models, trained from scratch)."""
    _released(name)
    spec = RELEASED_TEACHERS[name]
    return dict(spec) if spec is not None else None


def list_models() -> list[str]:
    return list(RELEASED)


def get_config(name: str) -> SparseFormerConfig:
    return SparseFormerConfig.from_dict(_released(name)[0])


def released_config(name: str) -> dict:
    """The config dict of a released model (a ValueError naming the nearest name for an unknown one)."""
    return dict(_released(name)[0])


def get_pretrained_cfg(name: str) -> PretrainedCfg:
    return _released(name)[1]


def _released(name: str):
    if name not in RELEASED:
        import difflib

        close = difflib.get_close_matches(name, RELEASED, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown SparseFormer model '{name}'.{hint} Released models: {', '.join(RELEASED)}")
    return RELEASED[name]




# The parameter names of the authors' ImageNet training code (showlab/sparseformer imagenet/models/sparseformer.py,
# whose checkpoints the v1.0.0-imagenet release holds) -> ours (those of their released package).
IMAGENET_CODE_NAMES = (
    ("token_roi.", "initial_roi."), ("token_embedding.", "initial_embedding."), (".ln_attn.", ".norm1."),
    (".attn.in_proj_weight", ".attn.qkv.weight"), (".attn.in_proj_bias", ".attn.qkv.bias"),
    (".attn.out_proj.", ".attn.proj."), (".ffn.0.", ".norm2."), (".ffn.1.", ".mlp.fc1."), (".ffn.3.", ".mlp.fc2."),
    (".adaptive_mixing.tuo_proj.", ".adaptive_mixing.out_proj."), ("head.norm.", "norm."),
    ("head.classifier.", "proj."),
)


def is_imagenet_code_state_dict(state_dict) -> bool:
    """Whether a state dict has the names of the authors' ImageNet training code (`token_roi.weight`)."""
    return "token_roi.weight" in state_dict and "initial_roi.weight" not in state_dict


def from_imagenet_code(state_dict) -> dict:
    """A state dict of the authors' ImageNet training code with our parameter names (the values unchanged)."""
    out = {}
    for key, value in state_dict.items():
        for theirs, ours in IMAGENET_CODE_NAMES:  # a name with a leading dot inside a key, else at its start
            if (theirs in key) if theirs.startswith(".") else key.startswith(theirs):
                key = key.replace(theirs, ours, 1)
                break
        out[key] = value
    return out

"""timm ViT teachers: AugReg / DeiT / DINO / DINOv2 / timm CLIP image towers.

Target: the normalised class-token feature before the head (timm's
`forward_head(..., pre_logits=True)`).

Family: 'dino' for names containing 'dino' and for any other headless ViT
(a feature teacher, evaluated by linear probe); 'supervised' when the model has
a head. timm's CLIP ports (vit_*_clip_*) are image-only teachers here: their
head is the CLIP projection (reported as a `num_classes`-way head), there is no
text tower, and the target is the pre-projection feature. For CLIP semantics
(projected target, zero-shot) use the same weights through kind: openclip.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from . import hub
from .base import (
    Preprocess,
    RandomTeacherWarning,
    Teacher,
    TeacherSpecError,
    TeacherWeightsError,
    UnsupportedTeacherError,
    block_parts,
    closest,
    weights_load_reason,
)

__all__ = ["TimmTeacher", "create_timm_teacher", "structure_problems"]


def _mlp_act(act: nn.Module) -> str | None:
    from open_clip.transformer import QuickGELU as OpenClipQuickGELU
    from timm.layers.activations import GELU, QuickGELU

    if isinstance(act, (QuickGELU, OpenClipQuickGELU)):
        return "quick_gelu"
    if isinstance(act, GELU) or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    return None


def _block_problem(blk: nn.Module, width: int) -> str | None:
    from timm.layers import Attention, LayerScale, Mlp
    from timm.models.vision_transformer import Block

    if type(blk) is not Block:
        return f"{type(blk).__name__} (not the standard pre-norm Block)"
    attn, mlp = blk.attn, blk.mlp
    if type(attn) is not Attention:
        return f"{type(attn).__name__} attention (not fused-qkv Attention)"
    if not all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm)):
        return "qk-norm or attention-output norm"
    if getattr(attn, "gate", None) is not None:
        return "gated attention"
    if attn.attn_dim != width:
        return f"attention width {attn.attn_dim} differs from the model width {width}"
    if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.norm, nn.Identity):
        return f"{type(mlp).__name__} MLP (not the plain fc1-act-fc2 Mlp; SwiGLU/GLU/normed MLPs are unsupported)"
    if _mlp_act(mlp.act) is None:
        return f"MLP activation {mlp.act!r} is neither GELU nor QuickGELU"
    if not all(isinstance(n, nn.LayerNorm) for n in (blk.norm1, blk.norm2)):
        return "norms are not LayerNorm"
    if not all(isinstance(s, (nn.Identity, LayerScale)) for s in (blk.ls1, blk.ls2)):
        return "unknown branch scaling"
    return None


def structure_problems(model: nn.Module) -> list[str]:
    """Why a timm model is not a plain class-token ViT ([] when it is)."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    if type(model) is not VisionTransformer:
        return [f"it is a {type(model).__name__}, not timm's VisionTransformer"]
    problems = []
    if type(model.patch_embed) is not PatchEmbed:
        problems.append(f"its patch embedding is a {type(model.patch_embed).__name__} (hybrid CNN stem)")
    if model.global_pool != "token" or model.attn_pool is not None or not model.has_class_token:
        problems.append(f"it pools with global_pool={model.global_pool!r}, not the class token ('token')")
    final = [m for m in (model.norm, model.fc_norm) if not isinstance(m, nn.Identity)]
    if len(final) != 1 or not isinstance(final[0], nn.LayerNorm):
        problems.append("it needs exactly one final LayerNorm (norm or fc_norm)")
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        problems.append(f"its head is a {type(model.head).__name__}, not a Linear")
    for i, blk in enumerate(model.blocks):
        problem = _block_problem(blk, model.embed_dim)
        if problem:
            problems.append(f"block {i} has {problem}")
            break
    if not problems:
        eps = {blk.norm1.eps for blk in model.blocks} | {blk.norm2.eps for blk in model.blocks} | {final[0].eps}
        if len(eps) > 1:
            problems.append(f"its LayerNorms use different eps {sorted(eps)}")
    return problems


# --------------------------------------------------------------------------- build
def _create(name: str, kwargs: Mapping[str, Any], **extra) -> nn.Module:
    """timm.create_model, with bad model_kwargs reported as a spec error."""
    import timm

    try:
        return timm.create_model(name, **extra, **kwargs)
    except TypeError as exc:
        raise TeacherSpecError(f"timm could not build '{name}' with model_kwargs {dict(kwargs)}: {exc}") from exc


def _pair(size) -> tuple:
    return (size, size) if isinstance(size, int) else tuple(size)


def _probe(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """The architecture without weights: on the meta device (instant even for ViT-L) where timm allows."""
    try:
        return _create(name, kwargs, pretrained=False, device="meta")
    except TeacherSpecError:
        return _create(name, kwargs, pretrained=False)  # entrypoints that take no device argument


def create_timm_teacher(spec: Mapping[str, Any], weights: str, source: Any) -> "TimmTeacher":
    """Build a timm ViT teacher from a resolved spec.

    Args:
        spec: the validated spec (kind, model, pretrained, model_kwargs, cache_dir, image_size).
        weights: 'random' | 'default' (pretrained: true, timm's default tag) | 'tag' | 'file'.
        source: the tag or the file path.
    """
    import timm

    name = spec["model"]
    kwargs = dict(spec.get("model_kwargs") or {})
    if spec.get("image_size") is not None:
        size = spec["image_size"]
        if _pair(kwargs.setdefault("img_size", size)) != _pair(size):
            raise TeacherSpecError(f"image_size {size} and model_kwargs.img_size {kwargs['img_size']} disagree")
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise TeacherSpecError(f"unknown timm model '{arch}'.{closest(arch, timm.list_models())}")
    if weights == "tag":
        if tag and tag != source:
            raise TeacherSpecError(f"model '{name}' names tag '{tag}' but pretrained names tag '{source}'")
        tag, name = source, f"{arch}.{source}"
    available = timm.list_pretrained(f"{arch}.*")
    if (tag and name not in available) or (weights == "default" and not available):
        tags = [n.partition(".")[2] for n in available]
        raise TeacherSpecError(
            f"timm has no pretrained weights '{name}'.{closest(tag, tags) if tag else ''} Tags for {arch}: "
            f"{', '.join(tags) or 'none'}; or give a local weights file (pretrained: /path/to/weights.safetensors)")

    probe = _probe(name, kwargs)
    problems = structure_problems(probe)
    if problems:
        raise UnsupportedTeacherError(f"timm model '{name}'", problems)

    if weights == "random":
        warnings.warn(f"teacher timm:{name} has RANDOM weights (pretrained: {spec['pretrained']!r}); "
                      f"only for tests and demos", RandomTeacherWarning, stacklevel=3)
        model = _create(name, kwargs, pretrained=False)
    elif weights == "file":
        model = _create_from_file(name, kwargs, Path(source), probe.num_classes)
    else:
        model = _create_from_hub(name, kwargs, spec.get("cache_dir"))
    return TimmTeacher(model, name=name, spec=spec)


def _create_from_file(name: str, kwargs: Mapping[str, Any], path: Path, num_classes: int) -> nn.Module:
    # timm's own file route converts checkpoint layouts (original DINOv2, OpenAI CLIP, big_vision .npz)
    # and resamples position embeddings, loading with weights_only=True / safetensors. Telling it the
    # file has the model's own classes keeps it from dropping the head and loading non-strictly.
    overlay = dict(file=str(path), custom_load=path.suffix == ".npz", num_classes=num_classes)
    try:
        return _create(name, kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
    except TeacherSpecError:
        raise
    except Exception as exc:
        raise TeacherWeightsError(
            f"could not load timm '{name}' weights from {path}: {weights_load_reason(exc).rstrip('.')}. The file "
            f"must hold the state dict of "
            f"this architecture with model_kwargs {dict(kwargs)} (a head of {num_classes} classes; set "
            f"model_kwargs.num_classes to match the file's head, 0 for none), as .safetensors, .npz, or a torch "
            f"file loadable with weights_only=True") from exc


def _create_from_hub(name: str, kwargs: Mapping[str, Any], cache_dir) -> nn.Module:
    from timm.models import get_pretrained_cfg

    cfg_classes = get_pretrained_cfg(name).num_classes
    wanted = kwargs.get("num_classes")
    if wanted not in (None, 0, cfg_classes):
        # timm would silently drop the pretrained head and leave a random one: no use for a teacher.
        raise TeacherSpecError(f"model_kwargs.num_classes={wanted} but the '{name}' weights have a "
                               f"{cfg_classes}-class head; drop num_classes, or set 0 to remove the head")
    how = (f"To supply them: on a machine with network access run\n"
           f"  python -c \"import timm; timm.create_model('{name}', pretrained=True, cache_dir='DIR')\"\n"
           f"then copy DIR here and set cache_dir: DIR in the teacher spec (or HF_HUB_CACHE / HF_HOME), "
           f"or pass the weights file itself: pretrained: /path/to/model.safetensors")
    return hub.fetch(lambda: _create(name, kwargs, pretrained=True, cache_dir=cache_dir),
                     f"timm '{name}'", how)


# ------------------------------------------------------------------------- teacher
class TimmTeacher(Teacher):
    """A timm `VisionTransformer` with class-token pooling (see the module docstring)."""

    kind = "timm"
    target = "norm"
    # timm's ImageNet training crops (colour jitter left to the recipe).
    default_train_aug = {"scale": (0.08, 1.0), "hflip": 0.5}

    def __init__(self, model: nn.Module, *, name: str, spec: Mapping[str, Any]):
        import timm

        problems = structure_problems(model)
        if problems:
            raise UnsupportedTeacherError(f"timm model '{name}'", problems)
        data = timm.data.resolve_model_data_config(model)
        has_head = isinstance(model.head, nn.Linear)
        super().__init__(
            kind=self.kind, name=name, family="dino" if "dino" in name.lower() or not has_head else "supervised",
            spec=spec, model=model,
            preprocess=Preprocess(
                # The built size, not the pretrained config's (DINOv2 built with img_size=224 reports 518).
                size=tuple(model.patch_embed.img_size), mean=tuple(data["mean"]), std=tuple(data["std"]),
                interpolation=data["interpolation"], crop_pct=float(data["crop_pct"]),
                resize_mode="squash" if data.get("crop_mode") == "squash" else "shortest"))
        first = model.blocks[0]
        self.depth = len(model.blocks)
        self.width = model.embed_dim
        self.num_heads = first.attn.num_heads
        self.patch_size = tuple(model.patch_embed.patch_size)
        self.grid_size = tuple(model.patch_embed.grid_size)
        self.num_patches = model.patch_embed.num_patches
        self.num_prefix_tokens = model.num_prefix_tokens
        self.mlp_hidden_dim = first.mlp.fc1.out_features
        self.mlp_act = _mlp_act(first.mlp.act)
        self.layer_scale = not isinstance(first.ls1, nn.Identity)
        self.norm_eps = first.norm1.eps
        self.embed_dim = model.embed_dim
        self.num_classes = model.head.out_features if has_head else 0

    def _embed(self, images: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def _block_state_dict(self, i: int) -> dict[str, Tensor]:
        blk = self.model.blocks[i]
        return block_parts(
            blk.norm1, blk.attn.qkv.weight, blk.attn.qkv.bias, blk.attn.proj,
            blk.norm2, blk.mlp.fc1, blk.mlp.fc2,
            getattr(blk.ls1, "gamma", None), getattr(blk.ls2, "gamma", None))

    def _run_block(self, i: int, tokens: Tensor) -> Tensor:
        return self.model.blocks[i](tokens)

    def _embed_tokens(self, images: Tensor) -> Tensor:
        # The steps of VisionTransformer.forward_features before the blocks.
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))

    def _stem_state_dict(self) -> dict[str, Tensor]:
        m = self.model
        parts = {"patch_embed.": m.patch_embed, "norm_pre.": m.norm_pre}
        sd = {prefix + k: v for prefix, mod in parts.items() for k, v in mod.state_dict().items()}
        for name in ("cls_token", "reg_token", "pos_embed"):
            if getattr(m, name, None) is not None:
                sd[name] = getattr(m, name)
        return sd

    def _attention_params(self, i: int):
        blk = self.model.blocks[i]
        return blk.norm1, blk.attn.qkv.weight, blk.attn.qkv.bias

    def _final_norm(self) -> nn.Module:
        return self.model.norm if not isinstance(self.model.norm, nn.Identity) else self.model.fc_norm

    def head_state_dict(self) -> dict[str, Tensor] | None:
        head = self.model.head
        if not isinstance(head, nn.Linear):
            return None
        sd = {"weight": head.weight}
        if head.bias is not None:
            sd["bias"] = head.bias
        return {k: v.detach().clone() for k, v in sd.items()}

    def _pool_norm_head(self, tokens: Tensor) -> Tensor:
        # forward_features ends with `norm`; forward_head pools the class token, applies fc_norm, head.
        return self.model.forward_head(self.model.norm(tokens))

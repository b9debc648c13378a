"""timm ViT teachers: AugReg / DeiT / DINO / DINOv2 / SigLIP / timm CLIP image towers, and timm `Eva` towers
with rotary positions (EVA-02, PE-Core, DINOv3; `teachers.eva`).

Target: the pooled, normalised feature before the head (timm's
`forward_head(..., pre_logits=True)`): the class token, the mean of the patch
tokens, or the MAP head's output. `TimmTower` reads any supported timm
`VisionTransformer` or `Eva` (also inside open_clip's timm towers, `teachers.openclip`).

Family: 'dino' for names containing 'dino' and for any other headless ViT
(a feature teacher, evaluated by linear probe); 'supervised' when the model has
a head. timm's CLIP ports (vit_*_clip_*, eva02_*_clip_*, vit_pe_core_*) are
image-only teachers here: their head is the CLIP projection (reported as a
`num_classes`-way head), there is no text tower, and the target is the
pre-projection feature. For CLIP semantics
(projected target, zero-shot) use the same weights through kind: openclip.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from . import hub
from .base import (
    BlockModules,
    Preprocess,
    RandomTeacherWarning,
    Teacher,
    TeacherSpecError,
    TeacherWeightsError,
    UnsupportedTeacherError,
    closest,
    weights_load_reason,
)
from .eva import EvaTower, is_eva
from .eva import block_problems as eva_block_problems
from .timm_layers import block_weights, mlp_act, mlp_hidden_dim, mlp_layer

__all__ = ["TimmEvaTeacher", "TimmTeacher", "TimmTower", "create_timm_teacher", "map_pool_spec",
           "structure_problems", "timm_block_state_dict"]


def _block_kind(blk: nn.Module) -> tuple:
    """What must agree between blocks for one student block kind to hold them all."""
    return (mlp_layer(blk.mlp), mlp_act(blk.mlp.act), mlp_hidden_dim(blk.mlp),
            not isinstance(blk.attn.q_norm, nn.Identity), not isinstance(blk.ls1, nn.Identity))


def _block_problem(blk: nn.Module, width: int) -> str | None:
    from timm.layers import Attention, LayerScale
    from timm.models.vision_transformer import Block

    if type(blk) is not Block:
        return f"{type(blk).__name__} (not the standard pre-norm Block: parallel, post-norm and scaled-norm " \
               f"blocks are unsupported)"
    attn, mlp = blk.attn, blk.mlp
    if type(attn) is not Attention:
        return f"{type(attn).__name__} attention (not fused-qkv Attention)"
    if not isinstance(attn.norm, nn.Identity):
        return "an attention-output norm (scale_attn_norm)"
    qk = (attn.q_norm, attn.k_norm)
    if not (all(isinstance(n, nn.Identity) for n in qk) or all(isinstance(n, nn.LayerNorm) for n in qk)):
        return f"qk-norm with {type(attn.q_norm).__name__} (LayerNorm qk-norm is supported)"
    if getattr(attn, "gate", None) is not None:
        return "gated attention"
    if attn.attn_dim != width:
        return f"attention width {attn.attn_dim} differs from the model width {width}"
    if mlp_layer(mlp) is None:
        return f"{type(mlp).__name__} MLP (Mlp, SwiGLU and GluMlp are supported)"
    if not isinstance(mlp.norm, nn.Identity):
        return "a norm inside the MLP (scale_mlp_norm)"
    if mlp_act(mlp.act) is None:
        return f"MLP activation {mlp.act!r} (GELU, GELU-tanh, QuickGELU and SiLU are supported)"
    if not all(isinstance(n, nn.LayerNorm) for n in (blk.norm1, blk.norm2)):
        return f"{type(blk.norm1).__name__} norms (LayerNorm is supported; not RMSNorm)"
    if not all(isinstance(s, (nn.Identity, LayerScale)) for s in (blk.ls1, blk.ls2)):
        return "unknown branch scaling"
    return None


def map_pool_spec(pool: nn.Module, width: int) -> tuple[dict | None, str | None]:
    """The constructor arguments of a timm `AttentionPoolLatent` (MAP head) that rebuild it over `width`
    tokens, as plain data (`students.blocks.map_pool` builds it), or a reason it cannot be inherited."""
    from timm.layers import AttentionPoolLatent, Mlp

    if type(pool) is not AttentionPoolLatent:
        return None, f"its attention pool is a {type(pool).__name__} (timm's AttentionPoolLatent is supported)"
    if pool.pos_embed is not None:
        return None, "its MAP head adds its own position embedding"
    if not isinstance(pool.proj, nn.Linear) or pool.proj.out_features != width or type(pool.mlp) is not Mlp:
        return None, "its MAP head is not the standard one (attention, projection to the width, norm, MLP)"
    if mlp_act(pool.mlp.act) is None or not isinstance(pool.mlp.norm, nn.Identity):
        return None, f"its MAP head's MLP activation {pool.mlp.act!r} is unsupported"
    if pool.kv.in_features != width:
        return None, "its MAP head attends at another width than the tokens'"
    norm = pool.norm
    if not isinstance(norm, (nn.Identity, nn.LayerNorm)):
        return None, f"its MAP head's norm is a {type(norm).__name__}"
    qk_norm = not isinstance(pool.q_norm, nn.Identity)
    if qk_norm and not isinstance(pool.q_norm, nn.LayerNorm):
        return None, "its MAP head's qk-norm is not a LayerNorm"
    return dict(num_heads=pool.num_heads, latent_len=pool.latent_len, latent_dim=pool.latent_dim,
                qkv_bias=pool.kv.bias is not None, q_proj=isinstance(pool.q, nn.Linear), qk_norm=qk_norm,
                pool_type=pool.pool, mlp_hidden_dim=pool.mlp.fc1.out_features, act=mlp_act(pool.mlp.act),
                eps=None if isinstance(norm, nn.Identity) else norm.eps,
                qk_norm_eps=pool.q_norm.eps if qk_norm else None), None


# timm model classes that are ViTs in name but not of the kind the students inherit from, with the reason.
_OTHER_VITS = {
    "VisionTransformerDistilled": "it is a distilled DeiT (two heads: class and distillation tokens)",
    "VisionTransformerRelPos": "it uses relative position biases in every block",
    "NaFlexVit": "it is a NaFlex ViT (variable resolution and aspect, patch-level position embeddings)",
    "VisionTransformerSAM": "it is a SAM image encoder (windowed attention, a convolutional neck)",
}


def structure_problems(model: nn.Module, projected: bool = False) -> list[str]:
    """Why a timm model is not a ViT a teacher can be read from ([] when it is): a `VisionTransformer`, or an
    `Eva` (its blocks checked by `teachers.eva.block_problems`).

    `projected`: an open_clip tower applies a Linear projection after the timm model.
    """
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    name = type(model).__name__
    if name in _OTHER_VITS:
        return [_OTHER_VITS[name]]
    eva = is_eva(model)
    if type(model) is not VisionTransformer and not eva:
        what = "a CNN" if any(k in name.lower() for k in ("resnet", "convnext", "efficientnet", "regnet")) else \
            f"a {name}"
        return [f"it is {what}, not timm's VisionTransformer or Eva"]
    problems = []
    if type(model.patch_embed) is not PatchEmbed:
        problems.append(f"its patch embedding is a {type(model.patch_embed).__name__} (hybrid CNN stem)")
    pool = model.global_pool
    if pool not in ("token", "avg", "map"):
        problems.append(f"it pools with global_pool={pool!r} (class token 'token', 'avg' and 'map' are supported)")
    elif pool == "token" and getattr(model, "cls_token", None) is None:
        problems.append("it pools the class token but has none")
    elif pool == "map":
        problem = map_pool_spec(model.attn_pool, model.embed_dim)[1]
        if problem:
            problems.append(problem)
    if pool in ("avg", "map") and model.num_prefix_tokens and getattr(model, "pool_include_prefix", False):
        problems.append("it pools over its prefix tokens too (pool_include_prefix)")
    final = [m for m in (model.norm, model.fc_norm) if not isinstance(m, nn.Identity)]
    if len(final) != 1 or not isinstance(final[0], nn.LayerNorm):
        problems.append("it needs exactly one final LayerNorm (norm or fc_norm)")
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        problems.append(f"its head is a {type(model.head).__name__}, not a Linear")
    if projected and isinstance(model.head, nn.Linear):
        problems.append("it has two heads (the timm model's and the open_clip projection)")
    if eva:
        return problems + eva_block_problems(model, final[0] if len(final) == 1 else None)
    for i, blk in enumerate(model.blocks):
        problem = _block_problem(blk, model.embed_dim)
        if problem:
            problems.append(f"block {i} has {problem}")
            break
    if not problems:
        kinds = {_block_kind(blk) for blk in model.blocks}
        if len(kinds) > 1:
            problems.append("its blocks are not all of one kind (MLP, activation, width, qk-norm, LayerScale)")
        norms = [n for blk in model.blocks for n in (blk.norm1, blk.norm2, blk.attn.q_norm, blk.attn.k_norm)
                 if isinstance(n, nn.LayerNorm)]
        eps = {n.eps for n in norms} | {final[0].eps}
        if len(eps) > 1:
            problems.append(f"its LayerNorms use different eps {sorted(eps)}")
    return problems


def timm_block_state_dict(blk: nn.Module) -> dict[str, Tensor]:
    """A timm `Block`'s weights under its own names, LayerScale folded into attn.proj / mlp.fc2 (exact),
    zeros for missing Linear biases and ones/zeros for missing LayerNorm affines (the students' blocks
    always have them). Detached copies."""
    gammas = {"attn.proj": getattr(blk.ls1, "gamma", None), "mlp.fc2": getattr(blk.ls2, "gamma", None)}
    sd = block_weights(blk, gammas=gammas)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------- build
def _create(name: str, kwargs: Mapping[str, Any], **extra) -> nn.Module:
    """timm.create_model, with bad model_kwargs reported as a spec error."""
    import timm

    try:
        return timm.create_model(name, **extra, **kwargs)
    except (TypeError, AssertionError) as exc:  # timm checks its arguments with asserts
        raise TeacherSpecError(f"timm could not build '{name}' with model_kwargs {dict(kwargs)}: "
                               f"{exc or type(exc).__name__}") from exc


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
    return (TimmEvaTeacher if is_eva(model) else TimmTeacher)(model, name=name, spec=spec)


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
class TimmTower(Teacher):
    """A teacher whose image tower is a timm `VisionTransformer` (`self.vit`), optionally followed by a
    bias-free or biased Linear `projection` (open_clip's timm towers). The kinds (`TimmTeacher`,
    `teachers.openclip.OpenClipTimmTeacher`) say what the target is; everything about the tower is here.
    An `Eva` tower is read the same way but for its blocks (`teachers.eva.EvaTower`, mixed in before this)."""

    def _init_tower(self, vit: nn.Module, projection: nn.Linear | None = None) -> None:
        self.vit = vit
        self.projection = projection
        self.depth = len(vit.blocks)
        self.width = vit.embed_dim
        self.patch_size = tuple(vit.patch_embed.patch_size)
        self.grid_size = tuple(vit.patch_embed.grid_size)
        self.num_patches = vit.patch_embed.num_patches
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.has_class_token = vit.cls_token is not None
        self.pool = vit.global_pool
        self.pool_spec = map_pool_spec(vit.attn_pool, vit.embed_dim)[0] if self.pool == "map" else None
        self.norm_before_pool = not isinstance(vit.norm, nn.Identity)
        self._init_blocks(vit)

    def _init_blocks(self, vit: nn.Module) -> None:
        first = vit.blocks[0]
        self.num_heads = first.attn.num_heads
        self.mlp_layer = mlp_layer(first.mlp)
        self.mlp_hidden_dim = mlp_hidden_dim(first.mlp)
        self.mlp_act = mlp_act(first.mlp.act)
        self.qk_norm = not isinstance(first.attn.q_norm, nn.Identity)
        self.attn_norm = not isinstance(first.attn.norm, nn.Identity)  # (refused in a VisionTransformer's blocks)
        self.mlp_norm = not isinstance(first.mlp.norm, nn.Identity)
        self.layer_scale = self._has_layer_scale(first)
        self.norm_eps = first.norm1.eps

    def _has_layer_scale(self, blk: nn.Module) -> bool:
        return not isinstance(blk.ls1, nn.Identity)

    def _block_state_dict(self, i: int) -> dict[str, Tensor]:
        return timm_block_state_dict(self.vit.blocks[i])

    def _run_block(self, i: int, tokens: Tensor) -> Tensor:
        return self.vit.blocks[i](tokens)

    def _block_modules(self, i: int) -> BlockModules:
        blk = self.vit.blocks[i]
        return BlockModules(norm1=blk.norm1, qkv_weight=blk.attn.qkv.weight, qkv_bias=blk.attn.qkv.bias,
                            num_heads=blk.attn.num_heads, proj=blk.attn.proj, ls1=blk.ls1, norm2=blk.norm2,
                            mlp=blk.mlp, ls2=blk.ls2, q_norm=blk.attn.q_norm, k_norm=blk.attn.k_norm)

    def _embed_tokens(self, images: Tensor) -> Tensor:
        # The steps of VisionTransformer.forward_features before the blocks.
        m = self.vit
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))

    def _stem_state_dict(self) -> dict[str, Tensor]:
        m = self.vit
        parts = {"patch_embed.": m.patch_embed, "norm_pre.": m.norm_pre}
        sd = {prefix + k: v for prefix, mod in parts.items() for k, v in mod.state_dict().items()}
        for name in ("cls_token", "reg_token", "pos_embed"):
            if getattr(m, name, None) is not None:
                sd[name] = getattr(m, name)
        return sd

    def _final_norm(self) -> nn.Module:
        return self.vit.norm if not isinstance(self.vit.norm, nn.Identity) else self.vit.fc_norm

    def _head(self) -> nn.Linear | None:
        head = self.projection if self.projection is not None else self.vit.head
        return head if isinstance(head, nn.Linear) else None

    def head_state_dict(self) -> dict[str, Tensor] | None:
        head = self._head()
        if head is None:
            return None
        sd = {"weight": head.weight}
        if head.bias is not None:
            sd["bias"] = head.bias
        return {k: v.detach().clone() for k, v in sd.items()}

    def pool_state_dict(self) -> dict[str, Tensor] | None:
        if self.vit.attn_pool is None:
            return None
        return {k: v.detach().clone() for k, v in self.vit.attn_pool.state_dict().items()}

    def _pool_norm_head(self, tokens: Tensor) -> Tensor:
        # forward_features ends with `norm`; forward_head pools, applies fc_norm and the head.
        x = self.vit.forward_head(self.vit.norm(tokens))
        return x if self.projection is None else self.projection(x)


class TimmTeacher(TimmTower):
    """A timm `VisionTransformer` (see the module docstring); the target is its pre-logits feature."""

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
        self._init_tower(model)
        self.embed_dim = model.embed_dim
        self.num_classes = model.head.out_features if has_head else 0

    def _embed(self, images: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def _embed_from_tokens(self, tokens: Tensor) -> Tensor:
        return self.model.forward_head(self.model.norm(tokens), pre_logits=True)


class TimmEvaTeacher(EvaTower, TimmTeacher):
    """A timm `Eva` (EVA-02, PE-Core, DINOv3, RoPE-ViT; `teachers.eva`); the target is its pre-logits feature."""

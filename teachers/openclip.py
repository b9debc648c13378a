"""open_clip ViT teachers (target: the projected image embedding)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
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
    _ln_affine,
    block_parts,
    closest,
    weights_load_reason,
)
from .eva import EvaTower, is_eva
from .timm_vit import TimmTower
from .timm_vit import structure_problems as timm_structure_problems

__all__ = ["OpenClipEvaTeacher", "OpenClipTeacher", "OpenClipTimmTeacher", "create_openclip_teacher",
           "local_dir_remote_code", "remote_code_keys", "remote_code_refusal", "supported_openclip_models"]

# vision_cfg switches that select open_clip's CustomResidualAttentionBlock; the
# student's timm-layout block has none of them.
_CUSTOM_BLOCK_FLAGS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
_MODEL_CFG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")



class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _without_random_init_notice():
    """open_clip logs "No pretrained weights loaded ... initialized randomly" on the root logger
    for pretrained=None; a random teacher is asked for explicitly (and the demo trains it next)."""
    notice = _DropRandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)

def config_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Why an open_clip model config is not a ViT the students can inherit from ([] when it is).

    Read from the config (a timm tower is probed on the meta device) so unsupported models fail before
    any download.
    """
    vision = cfg.get("vision_cfg", {})
    problems = []
    if "multimodal_cfg" in cfg:
        problems.append("it is a CoCa model (multimodal decoder, attention-pooled image tower)")
    if vision.get("timm_model_name"):
        return problems + timm_tower_problems(vision)
    if isinstance(vision.get("layers", 12), (list, tuple)):
        problems.append("its image tower is a ModifiedResNet (vision_cfg.layers is a list)")
    if vision.get("attentional_pool"):
        problems.append("its image tower pools with an attentional pooler")
    if vision.get("pool_type", "tok") != "tok":
        problems.append(f"its image tower pools with pool_type '{vision['pool_type']}', not the class token ('tok')")
    custom = [f for f in _CUSTOM_BLOCK_FLAGS if vision.get(f)]
    if custom or vision.get("block_type") not in (None, "default"):
        problems.append(f"its blocks are custom (block_type {vision.get('block_type')!r}, {', '.join(custom) or '-'})")
    return problems


def timm_tower_problems(vision: Mapping[str, Any]) -> list[str]:
    """Why an open_clip timm image tower (`vision_cfg.timm_model_name`) cannot be inherited ([] when it can):
    its head must be none or a Linear projection, and the timm model (built as open_clip's `TimmModel`
    builds it, on the meta device) a ViT that `teachers.timm_vit` supports."""
    import timm

    from .timm_vit import structure_problems as timm_problems

    name, pool, proj = vision["timm_model_name"], vision.get("timm_pool", "avg"), vision.get("timm_proj", "linear")
    if pool in ("abs_attn", "rot_attn"):
        return [f"its image tower '{name}' pools with open_clip's {pool} attention pool"]
    if proj == "mlp":
        return [f"its image tower '{name}' ends in an MLP projection (timm_proj 'mlp')"]
    if not timm.is_model(name):
        return [f"its image tower names the timm model '{name}', which this timm does not have"]
    try:
        if proj in ("linear", "mlp"):
            trunk = timm.create_model(name, pretrained=False, device="meta")
            trunk.reset_classifier(0, **(dict(global_pool=pool) if pool else {}))
        else:
            trunk = timm.create_model(name, pretrained=False, device="meta", num_classes=0 if proj == "none" else 1,
                                      global_pool=pool)
    except Exception as exc:  # timm models that take no device / pool argument are not ViTs we support
        return [f"its image tower '{name}' could not be built as a timm ViT ({type(exc).__name__}: {exc})"]
    return [f"its image tower (timm '{name}'): {p}" for p in
            timm_problems(trunk, projected=proj == "linear")]


@functools.lru_cache(maxsize=1)
def _supported_openclip_models() -> tuple[str, ...]:
    import open_clip

    return tuple(n for n in open_clip.list_models() if not config_problems(open_clip.get_model_config(n)))


def supported_openclip_models() -> list[str]:
    """open_clip's built-in model names this package can use as teachers."""
    return list(_supported_openclip_models())


# --------------------------------------------------------------------------- remote code
def remote_code_keys(cfg: Any, where: str = "") -> list[str]:
    """Where an open_clip config asks transformers to run Python that comes with the model: every
    `trust_remote_code` key with a true value, as a dotted path. open_clip hands `text_cfg.tokenizer_kwargs`
    to `AutoTokenizer.from_pretrained`, which then imports the tokenizer's own Python files (for a
    `local-dir:` model, from that folder); a key of that name anywhere else is counted too."""
    found = []
    items = cfg.items() if isinstance(cfg, Mapping) else enumerate(cfg) if isinstance(cfg, list) else ()
    for key, value in items:
        path = f"{where}.{key}" if where else str(key)
        if key == "trust_remote_code" and value:
            found.append(path)
        else:
            found += remote_code_keys(value, path)
    return found


def local_dir_remote_code(model: str) -> list[str]:
    """`remote_code_keys` of the `open_clip_config.json` of a `local-dir:FOLDER` model name ([] for any other
    name, or a config that cannot be read: open_clip then says what is wrong with it)."""
    if not model.startswith("local-dir:"):
        return []
    try:
        return remote_code_keys(json.loads((Path(model[len("local-dir:"):]) / "open_clip_config.json").read_text()))
    except (OSError, ValueError):
        return []


def remote_code_refusal(source: str, keys: list[str], opt_in: str) -> str:
    """The one line that refuses a config asking for remote code, naming the keys and the opt-in."""
    return (f"{source} asks transformers to run Python files that come with it ({', '.join(keys)}: true), "
            f"which could do anything; refused. If you trust where it came from, opt in with {opt_in}")


# --------------------------------------------------------------------------- build
_CFG_DIR: Path | None = None


def _register_model_cfg(cfg: Mapping[str, Any]) -> str:
    """Register a custom model config with open_clip under a content-hashed name.

    `open_clip.add_model_config` is open_clip's own way to add architectures;
    a hashed name keeps custom configs from shadowing built-in names, and lets
    `open_clip.create_model` / `get_tokenizer` treat them like built-ins.
    """
    import open_clip

    global _CFG_DIR
    missing = [k for k in _MODEL_CFG_KEYS if k not in cfg]
    if missing:
        raise TeacherSpecError(f"model_cfg lacks {', '.join(missing)}: an open_clip model config has "
                               f"{', '.join(_MODEL_CFG_KEYS)} (and optionally quick_gelu, custom_text)")
    try:
        text = json.dumps(cfg, sort_keys=True)
    except TypeError as exc:
        raise TeacherSpecError(f"model_cfg must be plain JSON data (numbers, strings, lists, mappings): {exc}") from exc
    name = "teachers-model-cfg-" + hashlib.sha1(text.encode()).hexdigest()[:16]
    if open_clip.get_model_config(name) is None:
        if _CFG_DIR is None:
            _CFG_DIR = Path(tempfile.mkdtemp(prefix="teachers-open_clip-cfg-"))
            atexit.register(shutil.rmtree, _CFG_DIR, True)
        path = _CFG_DIR / f"{name}.json"
        path.write_text(text)
        open_clip.add_model_config(path)
    return name


def create_openclip_teacher(spec: Mapping[str, Any], weights: str, source: Any) -> "OpenClipTeacher":
    """Build an open_clip teacher from a resolved spec.

    Args:
        spec: the validated spec (kind, model, pretrained, model_cfg, cache_dir, image_size).
        weights: 'random' | 'tag' | 'file' | 'default' (pretrained: true).
        source: the tag or the file path.
    """
    import open_clip

    name = spec["model"]
    if spec.get("model_cfg") is not None:
        cfg = dict(spec["model_cfg"])
        arch = _register_model_cfg(cfg)
    else:
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise TeacherSpecError(
                f"unknown open_clip model '{name}'.{closest(name, open_clip.list_models())} Supported: "
                f"{', '.join(supported_openclip_models())}; or give a model_cfg mapping for a custom ViT")
        arch = name
    asked = remote_code_keys(cfg)
    if asked and not spec.get("trust_remote_code"):
        raise TeacherSpecError(remote_code_refusal(f"the config of open_clip model '{name}'", asked,
                                                   "trust_remote_code: true in the teacher spec"))
    problems = config_problems(cfg)
    if problems:
        raise UnsupportedTeacherError(f"open_clip model '{name}'", problems)

    # pretrained_text=False: a HF text tower must not fetch its own base weights; the CLIP
    # checkpoint (tag or file) holds both towers, and random means random.
    kwargs = dict(cache_dir=spec.get("cache_dir"), force_image_size=spec.get("image_size"), pretrained_text=False)
    if weights == "random":
        warnings.warn(f"teacher openclip:{name} has RANDOM weights (pretrained: {spec['pretrained']!r}); "
                      f"only for tests and demos", RandomTeacherWarning, stacklevel=3)
        with _without_random_init_notice():  # the warning above says it, once and with the spec
            model = open_clip.create_model(arch, pretrained=None, **kwargs)
    elif weights == "file":
        try:
            model = open_clip.create_model(arch, pretrained=str(source), **kwargs)
        except Exception as exc:
            raise TeacherWeightsError(
                f"could not load open_clip '{name}' weights from {source}: {weights_load_reason(exc).rstrip('.')}. "
                f"The file must hold the full "
                f"CLIP state dict of this architecture (safetensors, or a torch file loadable with "
                f"weights_only=True; convert a TorchScript OpenAI .pt with torch.jit.load(f).state_dict())") from exc
    else:
        model = _create_from_tag(name, cfg, source if weights == "tag" else None, spec, kwargs)
    cfg = json.loads(json.dumps(cfg))  # a private copy in plain JSON types
    if spec.get("image_size") is not None:
        cfg["vision_cfg"]["image_size"] = spec["image_size"]
    cls = OpenClipTeacher
    if cfg["vision_cfg"].get("timm_model_name"):
        cls = OpenClipEvaTeacher if is_eva(getattr(model.visual, "trunk", None)) else OpenClipTimmTeacher
    return cls(model, name=name, spec=spec, tokenizer_name=arch, model_cfg=cfg)


def _create_from_tag(name: str, cfg: Mapping[str, Any], tag: str | None, spec: Mapping[str, Any],
                     kwargs: dict) -> nn.Module:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if spec.get("model_cfg") is not None:
        raise TeacherSpecError(f"pretrained tag {tag!r} with a model_cfg: tags belong to built-in models; "
                               f"give a local weights file (pretrained: /path/to/weights.safetensors) instead")
    if tag is None or tag not in tags:
        what = "pretrained: true does not name weights for open_clip" if tag is None else \
            f"unknown pretrained tag '{tag}' for open_clip '{name}'.{closest(tag, tags)}"
        raise TeacherSpecError(f"{what}; tags: {', '.join(tags) or 'none (give a local weights file)'}")
    tag_quick_gelu = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    if tag_quick_gelu != bool(cfg.get("quick_gelu", False)):
        # open_clip only warns; the features would be silently wrong for the student to learn.
        fix = f"'{name}-quickgelu'" if tag_quick_gelu else f"'{name.removesuffix('-quickgelu')}'"
        raise TeacherSpecError(
            f"open_clip '{name}' with tag '{tag}': the weights were trained with "
            f"{'QuickGELU' if tag_quick_gelu else 'GELU'} but the model uses "
            f"{'GELU' if tag_quick_gelu else 'QuickGELU'}; use model {fix}")
    cache = spec.get("cache_dir") or "the Hugging Face cache (HF_HUB_CACHE / HF_HOME)"
    how = (f"To supply them: on a machine with network access run\n"
           f"  python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{tag}', "
           f"cache_dir='DIR')\"\n"
           f"then copy DIR here and set cache_dir: DIR in the teacher spec (currently: {cache}), "
           f"or pass the weights file itself: pretrained: /path/to/open_clip_model.safetensors")
    return hub.fetch(lambda: open_clip.create_model(name, pretrained=tag, **kwargs),
                     f"open_clip '{name}' (tag '{tag}')", how)


# ------------------------------------------------------------------------- teacher
def _mlp_act(act: nn.Module) -> str | None:
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    return None


def structure_problems(model: nn.Module) -> list[str]:
    """Why a built open_clip model is not a plain class-token ViT ([] when it is)."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        return [f"its image tower is {type(visual).__name__}, not open_clip's VisionTransformer"]
    problems = []
    if visual.attn_pool is not None:
        problems.append("its image tower pools with an attentional pooler")
    if visual.pool_type != "tok":
        problems.append(f"its image tower pools with pool_type '{visual.pool_type}'")
    if visual.proj is None:
        problems.append("its image tower has no projection (proj)")
    for i, blk in enumerate(visual.transformer.resblocks):
        if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
            problems.append(f"block {i} is {type(blk).__name__}, not a default ResidualAttentionBlock")
            break
        attn = blk.attn
        if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
            problems.append(f"block {i} attention is not a fused-qkv MultiheadAttention")
            break
        if _mlp_act(blk.mlp.gelu) is None:
            problems.append(f"block {i} MLP activation {blk.mlp.gelu!r} is neither GELU nor QuickGELU")
            break
        norms = (blk.ln_1, blk.ln_2)
        if not all(isinstance(n, nn.LayerNorm) for n in norms):
            problems.append(f"block {i} norms are not LayerNorm")
            break
    return problems


def _preprocess(visual: nn.Module) -> Preprocess:
    pp = visual.preprocess_cfg
    size = pp["size"]
    return Preprocess(size=(size, size) if isinstance(size, int) else tuple(size), mean=tuple(pp["mean"]),
                      std=tuple(pp["std"]), interpolation=pp["interpolation"], crop_pct=1.0,
                      resize_mode=pp.get("resize_mode", "shortest"))


class _ClipText:
    """The text side of an open_clip teacher: tokenizer, `encode_text`, `logit_scale`, `logit_bias`."""

    kind = "openclip"
    target = "proj"
    # open_clip's training defaults: mild crops, no flips.
    default_train_aug = {"scale": (0.9, 1.0), "hflip": 0.0}

    def _init_text(self, model: nn.Module, tokenizer_name: str, model_cfg: Mapping[str, Any] | None) -> None:
        self.logit_scale = float(model.logit_scale.detach().exp())
        bias = getattr(model, "logit_bias", None)
        # SigLIP: sigmoid logits, logit_scale * cos + logit_bias.
        self.logit_bias = None if bias is None else float(bias.detach())
        self._tokenizer_name = tokenizer_name
        self._tokenizer = None
        # The open_clip config the model was built from (image_size override applied), e.g. for exports.
        self.model_cfg = dict(model_cfg) if model_cfg is not None else None

    @property
    def tokenizer(self):
        """open_clip tokenizer (texts -> LongTensor [B, context_length]); built on first use
        because some (HF) tokenizers download files that training does not need."""
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self._tokenizer_name, cache_dir=self.spec.get("cache_dir"))
        return self._tokenizer

    def _embed(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model.encode_text(tokens.to(self.model.logit_scale.device))


class OpenClipTimmTeacher(_ClipText, TimmTower):
    """An open_clip CLIP or SigLIP whose image tower is open_clip's `TimmModel` around a timm ViT
    (`visual.trunk`), e.g. ViT-B-16-SigLIP: the tower is read as a timm teacher's is (MAP or average
    pooling, no class token, SwiGLU/qk-norm blocks), followed by `visual.head.proj` when open_clip adds
    one. Target: `encode_image`; text tower, `logit_scale` and `logit_bias` as `OpenClipTeacher`'s."""

    def __init__(self, model: nn.Module, *, name: str, spec: Mapping[str, Any], tokenizer_name: str,
                 model_cfg: Mapping[str, Any] | None = None):
        visual = getattr(model, "visual", None)
        trunk, projection, problems = _timm_tower(visual)
        if not problems:
            problems = timm_structure_problems(trunk, projected=projection is not None)
        if problems:
            raise UnsupportedTeacherError(f"open_clip model '{name}'", problems)
        super().__init__(kind=self.kind, name=name, family="clip", spec=spec, model=model,
                         preprocess=_preprocess(visual))
        self._init_tower(trunk, projection)
        self.embed_dim = projection.out_features if projection is not None else \
            (trunk.head.out_features if isinstance(trunk.head, nn.Linear) else trunk.embed_dim)
        self.num_classes = 0
        self._init_text(model, tokenizer_name, model_cfg)


class OpenClipEvaTeacher(EvaTower, OpenClipTimmTeacher):
    """An open_clip CLIP whose image tower is a timm `Eva` (PE-Core, EVA-02 CLIP; `teachers.eva`): as
    `OpenClipTimmTeacher`, with rotary positions. In open_clip's configs (`timm_proj` null) the projection is the
    timm tower's own head, a Linear with a bias."""


def _timm_tower(visual: nn.Module) -> tuple[nn.Module | None, nn.Linear | None, list[str]]:
    """open_clip's `TimmModel`: its timm trunk and its Linear projection (None when it adds none)."""
    from open_clip.timm_model import TimmModel

    if not isinstance(visual, TimmModel):
        return None, None, [f"its image tower is {type(visual).__name__}, not open_clip's TimmModel"]
    extra = [n for n, m in visual.head.named_children() if n not in ("drop", "proj")]
    if extra:
        return None, None, [f"its timm tower's head has {', '.join(extra)} (only a Linear projection is supported)"]
    proj = getattr(visual.head, "proj", None)
    if proj is not None and not isinstance(proj, nn.Linear):
        return None, None, [f"its timm tower's projection is a {type(proj).__name__}, not a Linear"]
    return visual.trunk, proj, []


class OpenClipTeacher(_ClipText, Teacher):
    """An open_clip CLIP whose image tower is open_clip's own ViT.

    Target: `encode_image` (projected, not normalised). Head: `visual.proj`
    transposed ([embed_dim, width], no bias). Text tower: `encode_text`,
    `tokenizer` (built on first use), `logit_scale` (exp of the learned
    parameter, 100 for OpenAI CLIP). `model_cfg`: the open_clip config it was
    built from (with the spec's image_size applied).
    """

    def __init__(self, model: nn.Module, *, name: str, spec: Mapping[str, Any], tokenizer_name: str,
                 model_cfg: Mapping[str, Any] | None = None):
        problems = structure_problems(model)
        if problems:
            raise UnsupportedTeacherError(f"open_clip model '{name}'", problems)
        visual = model.visual
        super().__init__(kind=self.kind, name=name, family="clip", spec=spec, model=model,
                         preprocess=_preprocess(visual))
        blocks = visual.transformer.resblocks
        first = blocks[0]
        self.depth = len(blocks)
        self.width = visual.transformer.width
        self.num_heads = first.attn.num_heads
        self.patch_size = tuple(visual.patch_size)
        self.grid_size = tuple(visual.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens = 1
        self.mlp_hidden_dim = first.mlp.c_fc.out_features
        self.mlp_act = _mlp_act(first.mlp.gelu)
        self.layer_scale = hasattr(first.ls_1, "gamma")
        self.norm_eps = first.ln_1.eps
        self.embed_dim = visual.proj.shape[1]
        self.num_classes = 0
        self._init_text(model, tokenizer_name, model_cfg)

    def _blocks(self):
        return self.model.visual.transformer.resblocks

    def _block_state_dict(self, i: int) -> dict[str, Tensor]:
        blk = self._blocks()[i]
        return block_parts(
            blk.ln_1, blk.attn.in_proj_weight, blk.attn.in_proj_bias, blk.attn.out_proj,
            blk.ln_2, blk.mlp.c_fc, blk.mlp.c_proj,
            getattr(blk.ls_1, "gamma", None), getattr(blk.ls_2, "gamma", None))

    def _run_block(self, i: int, tokens: Tensor) -> Tensor:
        blk = self._blocks()[i]
        if blk.attn.batch_first:
            return blk(tokens)
        return blk(tokens.transpose(0, 1)).transpose(0, 1)  # sequence-first MultiheadAttention

    def _block_modules(self, i: int) -> BlockModules:
        blk = self._blocks()[i]
        return BlockModules(norm1=blk.ln_1, qkv_weight=blk.attn.in_proj_weight, qkv_bias=blk.attn.in_proj_bias,
                            num_heads=blk.attn.num_heads, proj=blk.attn.out_proj, ls1=blk.ls_1, norm2=blk.ln_2,
                            mlp=blk.mlp, ls2=blk.ls_2)

    def _embed_tokens(self, images: Tensor) -> Tensor:
        # VisionTransformer._embeds: conv1, class token, positional embedding, patch dropout, ln_pre.
        return self.model.visual._embeds(images)

    def _stem_state_dict(self) -> dict[str, Tensor]:
        # open_clip's conv1 (no bias), class_embedding [C], positional_embedding [N, C], ln_pre in timm's names.
        visual = self.model.visual
        sd = {"patch_embed.proj.weight": visual.conv1.weight,
              "cls_token": visual.class_embedding.reshape(1, 1, -1),
              "pos_embed": visual.positional_embedding.unsqueeze(0)}
        if not isinstance(visual.ln_pre, nn.Identity):
            sd.update({"norm_pre." + k: v for k, v in _ln_affine(visual.ln_pre, "").items()})
        return sd

    def _final_norm(self) -> nn.Module:
        return self.model.visual.ln_post

    def head_state_dict(self) -> dict[str, Tensor]:
        # The tower computes pooled @ proj with proj [width, embed_dim]: a bias-free Linear with weight proj.T.
        return {"weight": self.model.visual.proj.detach().t().contiguous()}

    def _pool_norm_head(self, tokens: Tensor) -> Tensor:
        visual = self.model.visual
        pooled, _ = visual._pool(tokens)
        return pooled @ visual.proj

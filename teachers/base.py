"""The one teacher interface every kind of ViT teacher is wrapped in.

A teacher is a frozen pre-norm ViT: optional class token and registers, blocks,
one final LayerNorm, a pooling (class token, mean of the patch tokens, or a MAP
attention head) and an optional linear head. The student needs three things
from it, whatever library built it:

* the alignment target, `embed(images) -> [B, embed_dim]`;
* its architecture (depth, width, heads, patch grid, MLP kind and activation,
  qk-norm, eps, pooling), and for a tower with rotary position embeddings how
  its blocks rotate a token at any position on the patch grid (`rope`);
* its weights in one layout, timm's ViT layout, so that the last blocks, the
  final norm, the pooling head and the head can be copied into the student
  (`block_state_dict`, `norm_state_dict`, `pool_state_dict`, `head_state_dict`).

`run_block` and `pool_norm_head` run the teacher's *own* modules; tests use
them to prove that the copied weights reproduce the teacher exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from data.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from .rope import RotaryPositions

__all__ = [
    "ACTIVATIONS",
    "BLOCK_KEYS",
    "MLP_LAYERS",
    "BlockModules",
    "Preprocess",
    "RandomTeacherWarning",
    "SUPPORTED_TEACHERS",
    "TEACHER_EXTRAS",
    "Teacher",
    "TeacherSpecError",
    "TeacherWeightsError",
    "UnsupportedTeacherError",
    "closest",
    "hidden_state_index",
    "teacher_extras",
]

# What a teacher can be read from (and where the students cannot yet inherit it). Quoted in every
# "unsupported teacher" error so the user sees the alternatives at once.
SUPPORTED_TEACHERS = """\
Supported teachers are ViTs with pre-norm blocks, pooled by the class token, by the mean of the
patch tokens ('avg') or by a MAP attention head ('map'), with or without a class token:
  kind 'openclip': open_clip models whose image tower is open_clip's own
    VisionTransformer with pool_type 'tok', no attentional pooler and default
    blocks: ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14, ViT-g-14,
    ViT-bigG-14 and their -quickgelu variants (use -quickgelu for 'openai'
    weights), or a model_cfg with an integer vision_cfg.layers; and models
    whose image tower is a timm ViT of the kind below, with their text tower,
    logit_scale and logit_bias: ViT-B-16-SigLIP, ViT-SO400M-14-SigLIP-384,
    ViT-B-16-SigLIP2, ViT-SO400M-16-SigLIP2-384 and the other SigLIP/SigLIP2
    sizes, vit_medium_patch16_gap_256;
  kind 'timm': timm VisionTransformer with global_pool 'token', 'avg' or
    'map', Block/Attention with fused qkv and optional LayerNorm qk-norm,
    Mlp, SwiGLU or GluMlp MLPs with GELU, GELU-tanh, QuickGELU or SiLU,
    LayerScale, register tokens and an optional fc_norm: vit_* (AugReg, e.g.
    vit_large_patch16_384.augreg_in21k_ft_in1k), DeiT without distillation,
    DINO (vit_*_patch16_224.dino), DINOv2 S/B/L/g (vit_*_patch14_dinov2,
    vit_*_patch14_reg4_dinov2, SwiGLU for giant), SigLIP and SigLIP 2 image
    towers (vit_base_patch16_siglip_224, vit_so400m_patch14_siglip_384,
    vit_base_patch16_siglip_224.v2_webli, *_siglip_gap_*), timm's CLIP image
    towers (vit_*_clip_*, as image-only teachers); and timm Eva towers with
    rotary position embeddings of timm's kinds 'cat', 'mixed' and 'dinov3'
    (prefix tokens unrotated), EvaAttention or AttentionRope, LayerScale,
    SwiGLU, qk-norm and EVA-02 CLIP's extra LayerNorms, or without rotary
    positions: PE-Core (vit_pe_core_*), EVA-02 (eva02_*, its CLIP towers
    eva02_*_clip_*), EVA-01 (eva_giant_*), DINOv3 (vit_*_dinov3*), RoPE-ViT
    (vit_*_rope_*, vit_*_rope_mixed_*); as open_clip towers PE-Core-T/S/B/L/bigG
    (PE-Core-L-14-336, ...), EVA02-B-16, EVA02-L-14, EVA02-L-14-336, EVA01-g-14.
    SparseFormer and Sparsifiner students inherit them (a latent token turns
    by its RoI's centre on the patch grid); ToMe cannot merge their tokens
    (a merged token has no single position).
Not supported: ResNet and ConvNeXt CLIPs (RN50, convnext_*, ...), CoCa, hybrid
CNN-ViTs (vit_*_r50_*, vit_tiny_r_s16_p8_*), NaFlex and relative-position ViTs,
ViTamin, MobileCLIP, distilled DeiT, max-pooled ViTs, RMSNorm blocks,
parallel, post-norm or scaled-norm VisionTransformer blocks, post-norm Eva
blocks (EVA02-E-14), grouped-query or gated attention, RMSNorm qk-norm
(Sapiens2), towers without a final norm (PE-Spatial, PE-Lang), rotary
embeddings of other kinds (MRoPE), and open_clip towers with an MLP projection."""

# The MLP kinds and activations a teacher's blocks may have (timm's layers: `Mlp` fc1-act-fc2,
# `SwiGLU` act(fc1_g) * fc1_x, `GluMlp` one packed fc1 whose second half is the gate ('glu') or whose
# first half is ('glu_gate_first': timm's SwiGLUPacked, DINOv2 giant)); `students.blocks` builds them.
MLP_LAYERS = ("mlp", "swiglu", "glu", "glu_gate_first")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu")

# Key layout of one plain block as returned by `Teacher.block_state_dict`: the layout
# of `timm.models.vision_transformer.Block` with qkv and proj biases. Blocks of other kinds
# (qk-norm, SwiGLU/GLU MLPs) have the keys of that timm `Block`.
BLOCK_KEYS = (
    "norm1.weight", "norm1.bias",
    "attn.qkv.weight", "attn.qkv.bias",
    "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
)


class TeacherSpecError(UserError, ValueError):
    """A teacher spec that does not say what to build (unknown kind/key, bad value)."""


class UnsupportedTeacherError(UserError, ValueError):
    """A model that exists but is not a plain class-token ViT the student can inherit from."""

    def __init__(self, what: str, problems: Sequence[str] = ()):
        detail = "".join(f"\n  - {p}" for p in problems)
        super().__init__(f"{what} cannot be a teacher:{detail}\n{SUPPORTED_TEACHERS}")


class TeacherWeightsError(UserError, RuntimeError):
    """Pretrained weights that could not be obtained or loaded."""


def weights_load_reason(exc: BaseException) -> str:
    """``str(exc)``; for a file ``torch.load(weights_only=True)`` refused, only the line saying what it refused
    (e.g. ``Unsupported global: GLOBAL posix.system``), not torch's paragraph of advice around it."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return text
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = text.split(marker, 1)[1].strip()
        if rest:
            return rest.splitlines()[0].split(". ")[0].rstrip(".")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    specific = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))]
    return (specific or lines)[0]


class RandomTeacherWarning(UserWarning):
    """A teacher was built with random weights (`pretrained: false/null`)."""


def closest(word: str, choices: Sequence[str]) -> str:
    """' Did you mean X?' for the nearest choice (difflib), or ''."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def hidden_state_index(layer: int, num_blocks: int, what: str, name: str = "layer") -> int:
    """`layer` as an index into the `num_blocks + 1` hidden states (LLaVA's `mm_vision_select_layer`:
    0 the tokens entering the first block, k after k blocks, negative from the end), or an
    IndexError naming the valid range."""
    n = num_blocks
    if isinstance(layer, bool) or not isinstance(layer, int) or not -(n + 1) <= layer <= n:
        raise IndexError(
            f"{name} {layer!r} is outside {what}: it has {n} blocks, so {name} must be an integer in "
            f"[{-(n + 1)}, {n}] (0: the tokens entering the first block, -2: after the penultimate block)")
    return layer % (n + 1)


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for the teacher.

    Eval: resize the shorter side to `size / crop_pct` and centre-crop `size`
    (resize_mode 'shortest'), or resize straight to `size` (resize_mode
    'squash', used by a few CLIP tags such as ViT-H-14 dfn5b); then scale to
    [0, 1] and normalise with mean/std.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # 'bicubic' | 'bilinear'
    crop_pct: float  # 1.0 for CLIP (resize shorter side to size, then centre crop)
    resize_mode: str = "shortest"  # 'shortest' | 'squash'

    def timm_cfg(self) -> dict:
        """The fields of a timm `pretrained_cfg` that say this preprocessing (a student built from the teacher
        takes the teacher's images)."""
        return dict(input_size=(3, *self.size), mean=tuple(self.mean), std=tuple(self.std),
                    interpolation=self.interpolation, crop_pct=self.crop_pct)


@dataclass(frozen=True)
class BlockModules:
    """The teacher's own modules of one pre-norm block, in timm `Block` terms (no copies).

    The block computes `x + ls1(proj(attention(norm1(x))))`, then `x + ls2(mlp(norm2(x)))`,
    with the attention's fused input projection `qkv_weight` [3 * width, width] / `qkv_bias`
    (q, k, v stacked) over `num_heads` heads and the default 1/sqrt(head_dim) scale. For code
    that needs the inside of a block (its keys, a bias on the attention logits), e.g. token
    merging (`eval.baselines.tome`), without patching the teacher. A rotary teacher's queries and
    keys are rotated after qk-norm: `rotary.rotate(q, rotations)` (`teachers.rope.RotaryPositions`;
    `rotations` those of its patch grid, or of the positions given to `Teacher.block_modules`).
    (The fused qkv of an Eva block with separate projections is a new tensor holding their weights.)
    """

    norm1: nn.Module
    qkv_weight: Tensor
    qkv_bias: Tensor | None
    num_heads: int
    proj: nn.Module
    ls1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    ls2: nn.Module
    q_norm: nn.Module = nn.Identity()  # qk-norm (timm `qk_norm=True`), applied to q and k per head
    k_norm: nn.Module = nn.Identity()
    rotary: "RotaryPositions | None" = None  # a rotary teacher's positions (`Teacher.rope`)
    rotations: Tensor | None = None  # the rotations of the tokens after the prefix (`RotaryPositions.rotations`)

    def qk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The block's queries and keys [B, H, N, head_dim] for tokens x [B, N, C] (qk-norm and rotary
        positions applied)."""
        b, n, c = x.shape
        weight, bias = self.qkv_weight[: 2 * c], None if self.qkv_bias is None else self.qkv_bias[: 2 * c]
        qk = torch.nn.functional.linear(self.norm1(x), weight, bias)
        q, k = qk.reshape(b, n, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rotations is not None:
            q, k = self.rotary.rotate(q, self.rotations), self.rotary.rotate(k, self.rotations)
        return q, k


# Train-time augmentation keys understood by `Teacher.train_transform`.
_AUG_KEYS = ("scale", "ratio", "hflip", "color_jitter")


def _ln_affine(norm: nn.Module, prefix: str) -> dict[str, Tensor]:
    """weight/bias of a LayerNorm, with ones/zeros where it has none."""
    bias = getattr(norm, "bias", None)
    weight = norm.weight if norm.weight is not None else \
        torch.ones(norm.normalized_shape, **({} if bias is None else dict(dtype=bias.dtype, device=bias.device)))
    bias = bias if bias is not None else torch.zeros_like(weight)
    return {f"{prefix}weight": weight, f"{prefix}bias": bias}


def _linear(layer: nn.Linear, prefix: str, scale: Tensor | None = None) -> dict[str, Tensor]:
    """weight/bias of a Linear (zeros for a missing bias), rows optionally scaled.

    Scaling the output rows of weight and bias by `scale` is exactly
    `scale * layer(x)`: this is how LayerScale is folded away.
    """
    weight = layer.weight
    bias = layer.bias if layer.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype,
                                                                 device=weight.device)
    if scale is not None:
        weight = weight * scale[:, None]
        bias = bias * scale
    return {f"{prefix}weight": weight, f"{prefix}bias": bias}


def block_parts(norm1: nn.Module, qkv_weight: Tensor, qkv_bias: Tensor | None, proj: nn.Linear,
                norm2: nn.Module, fc1: nn.Linear, fc2: nn.Linear,
                gamma1: Tensor | None, gamma2: Tensor | None) -> dict[str, Tensor]:
    """One block in timm `Block` layout, LayerScale gammas folded into attn.proj / mlp.fc2."""
    if qkv_bias is None:  # e.g. timm ViTs built with qkv_bias=False: the student block has one
        qkv_bias = torch.zeros(qkv_weight.shape[0], dtype=qkv_weight.dtype, device=qkv_weight.device)
    out = {
        **_ln_affine(norm1, "norm1."),
        "attn.qkv.weight": qkv_weight,
        "attn.qkv.bias": qkv_bias,
        **_linear(proj, "attn.proj.", gamma1),
        **_ln_affine(norm2, "norm2."),
        **_linear(fc1, "mlp.fc1."),
        **_linear(fc2, "mlp.fc2.", gamma2),
    }
    # Detached copies: the student may own and train them without touching the teacher.
    return {k: out[k].detach().clone().contiguous() for k in BLOCK_KEYS}


class Teacher(nn.Module):
    """A frozen ViT teacher (base class; see `OpenClipTeacher`, `TimmTeacher`).

    Attributes (set by the subclasses):
        kind: 'openclip' | 'timm'.
        name: the model name as given in the spec.
        family: 'clip' | 'supervised' | 'dino' (what the target means).
        spec: the resolved spec, to be saved with the run.
        model: the wrapped open_clip CLIP / timm VisionTransformer.
        preprocess: `Preprocess`.
        depth, width, num_heads, patch_size, grid_size, num_patches,
        num_prefix_tokens (class token + registers), has_class_token, mlp_hidden_dim (timm's
        `hidden_features`: the width of fc1's output, both halves for a packed GLU), mlp_layer
        (`MLP_LAYERS`), mlp_act (`ACTIVATIONS`), qk_norm, layer_scale, norm_eps: architecture.
        attn_norm, mlp_norm: a LayerNorm on the attention's output before its projection, and one inside
        the MLP before fc2 (EVA-02 CLIP; timm `Block`'s scale_attn_norm / scale_mlp_norm, keys `attn.norm.*`
        and `mlp.norm.*` in `block_state_dict`).
        rope: how the blocks rotate queries and keys by the tokens' positions on the patch grid
        (`teachers.rope.RotaryPositions`: its kind, `rotations(positions, block)` for any (row, col) on the
        grid; timm `Eva` towers: EVA-02, PE-Core, DINOv3), or None for position-free blocks.
        pool: 'token' | 'avg' (mean of the patch tokens) | 'map' (a MAP attention head over the
        patch tokens, `pool_spec` its constructor arguments, `pool_state_dict` its weights).
        pool_include_prefix: the MAP head reads the prefix tokens too (timm `Eva`'s MAP head: PE-Core).
        norm_before_pool: the final LayerNorm applies to every token before pooling (timm `norm`)
        rather than to the pooled feature (timm `fc_norm`); the same for class-token pooling.
        embed_dim: size of `embed()` output.
        target: 'proj' (CLIP: after the projection) | 'norm' (pre-logits).
        num_classes: classifier classes (timm with a head), else 0.
        tokenizer, logit_scale: CLIP only (None otherwise); logit_bias: SigLIP only (sigmoid logits
        `logit_scale * cos + logit_bias`), None otherwise.

    Teachers never train: `train()` keeps eval mode and no parameter requires grad.
    """

    kind: str
    name: str
    family: str
    target: str
    default_train_aug: Mapping[str, Any] = {}
    # The plain ViT's values; teachers of other kinds set their own.
    has_class_token: bool = True
    mlp_layer: str = "mlp"
    qk_norm: bool = False
    attn_norm: bool = False
    mlp_norm: bool = False
    rope: "RotaryPositions | None" = None
    pool: str = "token"
    pool_include_prefix: bool = False
    pool_spec: Mapping[str, Any] | None = None
    norm_before_pool: bool = True

    def __init__(self, *, kind: str, name: str, family: str, spec: Mapping[str, Any],
                 model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.kind = kind
        self.name = name
        self.family = family
        self.spec = dict(spec)
        self.model = model
        self.preprocess = preprocess
        self.logit_scale = None
        self.logit_bias = None
        model.requires_grad_(False)
        self.train(False)

    # ----------------------------------------------------------- mode / grads
    def train(self, mode: bool = True) -> "Teacher":
        """Teachers stay in eval mode (dropout, drop-path off) whatever is asked."""
        return super().train(False)

    # ------------------------------------------------------------- the target
    def embed(self, images: Tensor) -> Tensor:
        """Alignment target [B, embed_dim] for images already normalised with `preprocess`.

        Runs under `torch.no_grad()` rather than `inference_mode()`: the target
        is later saved for backward by the student's loss, which inference
        tensors do not allow.
        """
        self._check_images(images)
        with torch.no_grad():
            return self._embed(images)

    forward = embed

    def targets(self, images: Tensor, needs: Sequence[str]) -> dict[str, Any]:
        """What a training phase's loss terms read from the teacher (`students.family.Phase`), by name:
        ``embedding`` (`embed`), ``tokens`` (`final_tokens`: every final-normed token) and
        ``attention`` (`attention_maps`: each block's dense map)."""
        unknown = [n for n in needs if n not in ("embedding", "tokens", "attention")]
        if unknown:
            raise ValueError(f"unknown teacher targets {unknown}; the targets are embedding, tokens, attention")
        if not any(n in needs for n in ("tokens", "attention")):
            return {"embedding": self.embed(images)} if "embedding" in needs else {}
        # One pass through the tower gives all of them.
        x, maps = self._tower_pass(images, attention="attention" in needs)
        out: dict[str, Any] = {}
        with torch.no_grad():
            if "embedding" in needs:
                out["embedding"] = self._embed_from_tokens(x)
            if "tokens" in needs:
                out["tokens"] = self._final_norm()(x)
        if "attention" in needs:
            out["attention"] = maps
        return out

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or tuple(images.shape[-2:]) != tuple(self.preprocess.size) or images.shape[1] != 3:
            raise ValueError(
                f"teacher {self.name} expects images [B, 3, {self.preprocess.size[0]}, {self.preprocess.size[1]}] "
                f"(normalised with teacher.preprocess), got {tuple(images.shape)}; use teacher.eval_transform() "
                f"or set image_size in the teacher spec")

    def _embed(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------- architecture
    @property
    def mlp_ratio(self) -> float:
        """mlp_hidden_dim / width, for block constructors that take a ratio (mlp_hidden_dim is exact)."""
        return self.mlp_hidden_dim / self.width

    # --------------------------------------------------------------- weights
    def block_state_dict(self, i: int) -> dict[str, Tensor]:
        """Block i in timm `Block` layout (`BLOCK_KEYS`), LayerScale folded exactly.

        Missing biases are zeros. Tensors are detached copies.
        """
        return self._block_state_dict(self._block_index(i))

    def _block_index(self, i: int) -> int:
        if not -self.depth <= i < self.depth:
            raise IndexError(f"block index {i} out of range for a {self.depth}-block teacher")
        return i % self.depth

    def _block_state_dict(self, i: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def extras(self) -> list[str]:
        """`teacher_extras(self)`."""
        return teacher_extras(self)

    def run_block(self, i: int, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """The teacher's own block i applied to tokens [B, L, width] (batch-first).

        A rotary teacher (`rope`) rotates the tokens after its prefix by their positions: those of its patch
        grid by default (then `tokens` must be its prefix and patch tokens), or `positions` [L - prefix, 2] or
        [B, L - prefix, 2], (row, col) on the patch grid (`RotaryPositions`). Blocks without rotary positions
        ignore `positions`."""
        i = self._block_index(i)
        with torch.no_grad():
            if positions is None or self.rope is None:
                return self._run_block(i, tokens)
            return self._run_block_at(i, tokens, positions)

    def _run_block(self, i: int, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def _run_block_at(self, i: int, tokens: Tensor, positions: Tensor) -> Tensor:
        raise NotImplementedError

    def block_modules(self, i: int, positions: Tensor | None = None) -> BlockModules:
        """Block i's own modules and attention weights (`BlockModules`), shared with the teacher, not copied;
        for a rotary teacher with the rotations of `positions` (as `run_block`) instead of its grid's."""
        i = self._block_index(i)
        parts = self._block_modules(i)
        if positions is None or self.rope is None:
            return parts
        return dataclasses.replace(parts, rotations=self.rope.rotations(positions, i))

    def _block_modules(self, i: int) -> BlockModules:
        raise NotImplementedError

    def embed_tokens(self, images: Tensor) -> Tensor:
        """The teacher's own token sequence entering block 0: [B, num_prefix_tokens + num_patches, width]."""
        self._check_images(images)
        with torch.no_grad():
            return self._embed_tokens(images)

    def _embed_tokens(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_tokens(self, images: Tensor, layer: int = -1, class_token: bool = True) -> Tensor:
        """The teacher's tokens after a block, [B, N, width], from its own modules.

        `layer` indexes the hidden states as LLaVA's `mm_vision_select_layer` and transformers'
        `hidden_states[layer]` do: 0 is the tokens entering block 0 (`embed_tokens`), k the tokens
        after k blocks, negative counts from the end (-2: after the penultimate block, LLaVA's
        choice with CLIP ViT-L/14-336). `layer=-1` alone is the output tokens after the final norm
        (what the library's own forward gives for every token); every other index, `depth`
        included, is a block's raw output. `class_token=False` keeps the patch tokens only (it drops
        every prefix token: the class token and any registers). Blocks after `layer` are not run.
        """
        index = hidden_state_index(layer, self.depth, f"teacher {self.name}")
        x = self.embed_tokens(images)
        with torch.no_grad():
            for i in range(index):
                x = self._run_block(i, x)
            if layer == -1:
                x = self._final_norm()(x)
        return x if class_token else x[:, self.num_prefix_tokens:]

    def norm_state_dict(self) -> dict[str, Tensor]:
        """{'weight', 'bias'} of the final norm (on every token, or on the pooled feature: `norm_before_pool`)."""
        sd = _ln_affine(self._final_norm(), "")
        return {k: v.detach().clone() for k, v in sd.items()}

    def _final_norm(self) -> nn.Module:
        raise NotImplementedError

    def head_state_dict(self) -> dict[str, Tensor] | None:
        """{'weight': [out, width], optional 'bias'} of the output head, or None (no head)."""
        raise NotImplementedError

    def pool_state_dict(self) -> dict[str, Tensor] | None:
        """The MAP head's weights in timm `AttentionPoolLatent` names (detached copies), or None (no MAP head)."""
        return None

    def pool_norm_head(self, tokens: Tensor) -> Tensor:
        """The teacher's own final path on tokens leaving the last block: norm, pooling, head (in its order)."""
        with torch.no_grad():
            return self._pool_norm_head(tokens)

    def _pool_norm_head(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def _embed_from_tokens(self, tokens: Tensor) -> Tensor:
        """What `embed` returns, from the tokens leaving the last block (a pre-logits target stops before
        the head)."""
        return self._pool_norm_head(tokens)

    # ------------------------------------------------- the whole tower (Sparsifiner)
    def stem_state_dict(self) -> dict[str, Tensor]:
        """Everything before block 0 in timm `VisionTransformer` layout (detached copies):
        `patch_embed.proj.{weight, bias?}`, `cls_token` [1, 1, C], `reg_token` [1, R, C] (registers only),
        `pos_embed` [1, N or N - prefix, C] (the latter: no position embedding for prefix tokens; absent for a
        tower positioned by rotary embeddings alone, e.g. DINOv3),
        `norm_pre.{weight, bias}` (a LayerNorm before the blocks, e.g. open_clip's ln_pre) when there is one."""
        return {k: v.detach().clone() for k, v in self._stem_state_dict().items()}

    def _stem_state_dict(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _tower_pass(self, images: Tensor, attention: bool) -> tuple[Tensor, list[Tensor]]:
        """Tokens leaving the last block, and (with `attention`) every block's dense attention
        probabilities [B, H, N, N]: softmax(q kᵀ / sqrt(d)), recomputed from the block's own q and k
        (`BlockModules.qk`: qk-norm and rotary positions applied; fused attention kernels never form
        them) before the block runs."""
        self._check_images(images)
        maps = []
        with torch.no_grad():
            x = self._embed_tokens(images)
            for i in range(self.depth):
                if attention:
                    q, k = self._block_modules(i).qk(x)
                    maps.append(((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1))
                x = self._run_block(i, x)
        return x, maps

    def attention_maps(self, images: Tensor) -> list[Tensor]:
        """Every block's dense attention probabilities [B, H, N, N] (see `_tower_pass`)."""
        return self._tower_pass(images, attention=True)[1]

    def final_tokens(self, images: Tensor) -> Tensor:
        """Every token leaving the last block, after the final norm: [B, N, width], class token first."""
        x, _ = self._tower_pass(images, attention=False)
        with torch.no_grad():
            return self._final_norm()(x)

    # ------------------------------------------------------------------ text
    @property
    def tokenizer(self):
        """CLIP tokenizer; None for teachers without a text tower."""
        return None

    def encode_text(self, tokens: Tensor) -> Tensor:
        """CLIP text embedding [B, embed_dim] (not normalised)."""
        raise NotImplementedError(
            f"teacher {self.kind}:{self.name} has no text tower; zero-shot needs a CLIP teacher "
            f"(kind: openclip)")

    # ------------------------------------------------------------ transforms
    def eval_transform(self) -> Callable:
        """torchvision transform PIL image -> normalised tensor [3, H, W], from `preprocess`.

        Same steps as timm's eval transform (and open_clip's with crop_pct 1).
        """
        from torchvision import transforms as T

        p = self.preprocess
        interpolation = T.InterpolationMode(p.interpolation)
        if p.resize_mode == "squash":
            resize = [T.Resize(p.size, interpolation=interpolation)]
        else:
            scale = tuple(math.floor(s / p.crop_pct) for s in p.size)
            # One int resizes the shorter side (keeps the aspect ratio), as timm/open_clip do.
            resize = [T.Resize(scale[0] if scale[0] == scale[1] else scale, interpolation=interpolation),
                      T.CenterCrop(p.size)]
        return T.Compose([*resize, _to_rgb, T.ToTensor(), T.Normalize(p.mean, p.std)])

    def train_transform(self, decode: str | None = None, **aug_overrides: Any) -> Callable:
        """Train transform: random resized crop, flip, optional colour jitter, normalise.

        Defaults follow the teacher's library (`default_train_aug`: open_clip
        scale (0.9, 1) without flips; timm scale (0.08, 1) with flips).
        Overrides: scale, ratio, hflip (probability), color_jitter (float or
        tuple for torchvision ColorJitter; None for none). Returns a
        `data.transforms.ReplayableTrainTransform`: the same random draws as
        torchvision's Compose of these steps, and its views can be drawn from
        a seed and replayed exactly (cached teacher targets rely on it).
        `decode` picks how it decodes JPEGs (`data.decode.DECODE_PATHS`; None: the default).
        """
        from data.transforms import ReplayableTrainTransform

        for key in aug_overrides:
            if key not in _AUG_KEYS:
                raise TeacherSpecError(
                    f"unknown augmentation '{key}'.{closest(key, _AUG_KEYS)} Valid: {', '.join(_AUG_KEYS)}")
        aug = {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "color_jitter": None,
               **self.default_train_aug, **aug_overrides}
        p = self.preprocess
        return ReplayableTrainTransform(p.size, p.mean, p.std, p.interpolation, scale=aug["scale"],
                                        ratio=aug["ratio"], hflip=aug["hflip"] or 0.0,
                                        color_jitter=aug["color_jitter"],
                                        **({} if decode is None else {"decode": decode}))

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, name={self.name!r}, family={self.family!r}, target={self.target!r}, "
                f"depth={self.depth}, width={self.width}, heads={self.num_heads}, grid={self.grid_size}, "
                f"embed_dim={self.embed_dim}")


# The attributes of a teacher that describe computation beyond a plain ViT (`teacher_extras`).
TEACHER_EXTRAS = ("rope", "attn_norm", "mlp_norm", "pool_include_prefix")


def teacher_extras(teacher: Any, handled: Sequence[str] = ()) -> list[str]:
    """What a teacher computes beyond a ViT of timm `Block`s (with the MLP kinds, qk-norm and LayerScale of
    `Teacher`) pooled over the tokens after its prefix: rotary positions (`rope`), EVA-02 CLIP's extra
    LayerNorms (`attn_norm`, `mlp_norm`), a MAP head that reads the prefix tokens too (`pool_include_prefix`);
    [] for none. `handled`: the attributes (`TEACHER_EXTRAS`) the caller reproduces, left out. Read with the
    plain ViT's defaults, so that any object describing a teacher will do."""
    unknown = [name for name in handled if name not in TEACHER_EXTRAS]
    if unknown:
        raise ValueError(f"unknown teacher extras {unknown}; the extras are {', '.join(TEACHER_EXTRAS)}")
    rope = getattr(teacher, "rope", None) if "rope" not in handled else None
    extras = [f"rotary position embeddings ('{rope.kind}')"] if rope is not None else []
    return extras + [what for what, attr in (("a LayerNorm on the attention output", "attn_norm"),
                                             ("a LayerNorm inside the MLP", "mlp_norm"),
                                             ("a MAP head reading the prefix tokens", "pool_include_prefix"))
                     if attr not in handled and getattr(teacher, attr, False)]


def _to_rgb(image):
    """Grey-scale / RGBA / palette images to RGB (what both libraries' transforms assume)."""
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image

"""Build a SparseFormer student from a ViT teacher, inheriting most of its weights.

The construction of the bootstrapping paper (`../shared/design/bootstrapping.md`):
a teacher with N blocks gives its last 2N/3 blocks, its final norm and its
head to the student; its first N/3 blocks are replaced by the early
convolution and a focusing unit over a few latent tokens. Of the inherited
blocks the first N/3 are fine-tuned and the last N/3 stay frozen.

    student units:  [focus (repeats 4)] [sample at teacher width] [cls] [inherited blocks ...]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from data.schema import load
from teachers.base import teacher_extras

from ..family import ConfigError, InitOptions, ParameterPolicy, policy_from
from ..video import VideoOptions, video_options
from .config import POOL_TO_HEAD_OP, SparseFormerConfig
from .model import SFUnit, SparseFormer
from .released import btsp_config

if TYPE_CHECKING:  # pragma: no cover
    from teachers import Teacher

# Unit index of the first inherited block (after the focusing and sampling units).
FIRST_INHERITED_UNIT = 2
# What the student reproduces of a teacher beyond a plain ViT (`teachers.base.TEACHER_EXTRAS`): rotary positions
# (at the latent tokens' RoI centres, `SparseFormer.block_rotations`), EVA-02 CLIP's extra LayerNorms and a MAP
# head over the class token too.
HANDLED_EXTRAS = ("rope", "attn_norm", "mlp_norm", "pool_include_prefix")


@dataclass
class BootstrapOptions(InitOptions):
    """Everything about the construction a recipe may change. `None` means: derived from the teacher.

    With ``init`` other than teacher (`students.init`), the construction keys below do not apply."""

    tokens: int | None = None  # all tokens incl. the class token; default a quarter of the patch tokens
    num_points: int = 16  # sampling points per token
    focus_width: int | None = None  # default half the teacher width (384 for ViT-B, 512 for ViT-L)
    focus_repeats: int = 4
    conv_dim: int = 64
    pg_inner_dim: int = 128  # width of the adaptive-mixing parameter generator
    drop_blocks: int | None = None  # teacher blocks replaced by the new parts; default N // 3
    finetune_blocks: int | None = None  # inherited blocks that train; default N // 3; the rest stay frozen
    train_head: bool = False  # the inherited final norm and head stay frozen by default
    drop_path_rate: float = 0.0
    # A video student (`students.video.VideoOptions`): the image student above, inflated to clips.
    video: VideoOptions | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "BootstrapOptions":
        return load(cls, d, "student options", error=ConfigError, typed=False)


def _resolve(teacher: "Teacher", opts: BootstrapOptions) -> dict:
    extras = teacher_extras(teacher, handled=HANDLED_EXTRAS)
    if extras:
        raise ValueError(f"a SparseFormer student cannot inherit from teacher {teacher.kind}:{teacher.name}: it has "
                         f"{' and '.join(extras)}; choose a teacher without them")
    n = teacher.depth
    drop = n // 3 if opts.drop_blocks is None else opts.drop_blocks
    if not 0 <= drop < n:
        raise ValueError(f"drop_blocks={drop} must leave at least one of the teacher's {n} blocks to inherit")
    inherited = n - drop
    finetune = n // 3 if opts.finetune_blocks is None else opts.finetune_blocks
    if not 0 <= finetune <= inherited:
        raise ValueError(f"finetune_blocks={finetune} must be between 0 and the {inherited} inherited blocks")
    cls = 1 if teacher.has_class_token else 0
    tokens = max(1 + cls, round(teacher.num_patches / 4)) if opts.tokens is None else opts.tokens
    if tokens < 1 + cls:
        raise ValueError(f"tokens={tokens}: a student needs at least one latent token"
                         f"{' besides the class token' if cls else ''}")
    head_dim = teacher.width // teacher.num_heads
    step = math.lcm(head_dim, 8)
    # The released configs focus at half the teacher's width (384 for ViT-B, 512 for ViT-L); other
    # teachers get the nearest width that splits into their heads and suits the RoI encoding.
    focus_width = max(step, round(teacher.width / 2 / step) * step) if opts.focus_width is None else opts.focus_width
    if focus_width % head_dim or focus_width % 8:
        raise ValueError(
            f"focus_width={focus_width} must be a multiple of the teacher's head width {head_dim} and of 8 "
            f"(the RoI position encoding); e.g. {step * max(1, round(focus_width / step))}"
        )
    return dict(drop=drop, inherited=inherited, finetune=finetune, tokens=tokens, cls=cls, head_dim=head_dim,
                focus_width=focus_width)


def student_config(teacher: "Teacher", opts: BootstrapOptions) -> SparseFormerConfig:
    """The SparseFormer configuration for a teacher (released btsp configs for ViT-B/16 and ViT-L/14).

    The inherited blocks take the teacher's block kind (MLP, its width and activation, qk-norm, EVA-02's
    extra LayerNorms, head width, LayerNorm eps) and its rotary positions (`rope`, with the teacher's grid); the
    head pools as the teacher does (class token, mean or MAP head over the latent tokens, or over the class
    token too, the final norm before or after pooling). A teacher without a class token gives a student
    without one.
    """
    r = _resolve(teacher, opts)
    head = teacher.head_state_dict()
    cfg = btsp_config(
        name=None,
        tokens=r["tokens"] - r["cls"],  # the class token, when there is one, is the last of `tokens`
        focus_width=r["focus_width"],
        width=teacher.width,
        inherited_blocks=r["inherited"],
        proj_dim=0 if head is None else head["weight"].shape[0],
        proj_bias=head is not None and "bias" in head,
        quick_gelu=teacher.mlp_act == "quick_gelu",
        mean_std=(teacher.preprocess.mean, teacher.preprocess.std),
        conv_dim=opts.conv_dim,
        num_points=opts.num_points,
        focus_repeats=opts.focus_repeats,
        pg_inner_dim=opts.pg_inner_dim,
    )
    compat = cfg["compatible_config"]
    # The inherited blocks must compute what they computed in the teacher, so
    # the student takes the teacher's LayerNorm eps (released AugReg students
    # used 1e-5 throughout; timm ViTs use 1e-6).
    compat["ln_eps"] = teacher.norm_eps
    if r["head_dim"] != 64:
        compat["head_dim"] = r["head_dim"]
    if teacher.mlp_layer != "mlp":
        compat["mlp_layer"] = teacher.mlp_layer
    if teacher.mlp_hidden_dim != 4 * teacher.width:
        compat["mlp_hidden_dim"] = teacher.mlp_hidden_dim
    if teacher.mlp_act not in ("gelu", "quick_gelu"):
        compat["mlp_act"] = teacher.mlp_act
    if teacher.qk_norm:
        compat["qk_norm"] = True
    # The extras are read with a plain ViT's defaults (as `teacher_extras` reads them): any object describing a
    # teacher will do.
    if getattr(teacher, "attn_norm", False):
        compat["attn_norm"] = True
    if getattr(teacher, "mlp_norm", False):
        compat["mlp_norm"] = True
    if not r["cls"]:
        cfg["cls_token_insert_layer"] = 0
    cfg["head_op"] = POOL_TO_HEAD_OP[teacher.pool]
    if teacher.pool == "map":
        cfg["pool_spec"] = dict(teacher.pool_spec)
    if teacher.pool != "token" and teacher.norm_before_pool:
        cfg["norm_before_pool"] = True
    if teacher.pool != "token" and getattr(teacher, "pool_include_prefix", False):
        cfg["pool_include_prefix"] = True
    if getattr(teacher, "rope", None) is not None:
        cfg["rope"] = teacher.rope.spec()
    cfg["drop_path_rate"] = opts.drop_path_rate
    return SparseFormerConfig.from_dict(cfg)


def inherited_units(student: SparseFormer) -> list[SFUnit]:
    """The student's inherited blocks, in order."""
    return [student.layers[i] for i in student.unit_layer_index[FIRST_INHERITED_UNIT:]]


@torch.no_grad()
def copy_teacher_weights(student: SparseFormer, teacher: "Teacher", drop_blocks: int) -> None:
    """Copy the teacher's last blocks (and their learned rotary frequencies, RoPE-Mixed's), final norm, MAP head
    (if any) and head into the student (exact)."""
    if student.rope is not None:
        student.rope.load_state_dict(teacher.rope.weights(range(drop_blocks, teacher.depth)))
    for j, unit in enumerate(inherited_units(student)):
        sd = teacher.block_state_dict(drop_blocks + j)
        missing, unexpected = unit.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"teacher block {drop_blocks + j} does not map onto the student block: "
                f"missing {missing}, unexpected {unexpected}"
            )
    student.norm.load_state_dict(teacher.norm_state_dict())
    pool = teacher.pool_state_dict()
    if pool is not None:
        student.attn_pool.load_state_dict(pool)
    head = teacher.head_state_dict()
    if head is not None:
        student.proj.load_state_dict(head)


def parameter_policy(student: SparseFormer, finetune_blocks: int, train_head: bool = False) -> ParameterPolicy:
    """New parts and the first `finetune_blocks` inherited blocks train; the rest is frozen, and so are the
    teacher's rotary frequencies (RoPE-Mixed's; the student's positions are the teacher's)."""
    frozen_prefixes = [
        f"layers.{i}." for i in student.unit_layer_index[FIRST_INHERITED_UNIT + finetune_blocks:]
    ] + ["rope."]
    if not train_head:
        frozen_prefixes += ["norm.", "attn_pool.", "proj."]
    return policy_from(student, lambda name: not name.startswith(tuple(frozen_prefixes)))


def bootstrap_student(teacher: "Teacher", **options: Any) -> tuple[SparseFormer, ParameterPolicy]:
    """A SparseFormer configured from `teacher`, with the teacher's last blocks, norm and head.

    Options are the fields of `BootstrapOptions`. Returns the student (its
    `pretrained_cfg` is the teacher's preprocessing) and the parameter policy,
    already applied (frozen parameters have `requires_grad=False`). With `video`
    (`students.video.VideoOptions` or its dict) the image student (built here, or with
    `video.image_student` the weights of one) is inflated to a `MediaSparseFormer`
    (`students.sparseformer.video`) and the policy carries over by parameter name.
    """
    from .video import inflate, load_image_student

    opts = options.pop("options", None) or BootstrapOptions.from_dict(options)
    video = video_options(opts)
    if video is not None:
        student, policy = bootstrap_student(teacher, options=dataclasses.replace(opts, video=None))
        if video.image_student:
            load_image_student(student, video.image_student)
        return inflate(student, video, policy)
    r = _resolve(teacher, opts)
    student = SparseFormer(student_config(teacher, opts))
    copy_teacher_weights(student, teacher, r["drop"])
    student.pretrained_cfg = teacher.preprocess.timm_cfg()
    policy = parameter_policy(student, r["finetune"], opts.train_head).apply(student)
    return student, policy

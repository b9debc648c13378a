"""Build a Sparsifiner student from any supported teacher: its whole image tower plus fresh predictors.

    student, policy = sparsify(teacher, keep_rate=0.25)
    policy.apply(student, "reconstruct")   # predictors train (on the teacher's attention maps)
    policy.apply(student, "sparse")        # the backbone trains, predictors frozen

The student is the teacher's tower in timm's layout (`Teacher.stem_state_dict`, `block_state_dict`,
`norm_state_dict`, `head_state_dict`): open_clip towers with their ln_pre, QuickGELU and projection
(as a bias-free `head`), timm ViTs (and open_clip's timm towers, SigLIP) with their registers or no class
token, position-embedding layout, MLP kind, qk-norm and pooling head (mean or the MAP head's weights, `norm`
or `fc_norm`), LayerScale folded into the block weights (the same function), and timm `Eva` towers (PE-Core,
EVA-02, DINOv3) with their rotary positions (`rope`: the teacher's module rebuilt, RoPE-Mixed's frequencies
copied and frozen), EVA-02 CLIP's extra LayerNorms, PE-Core's MAP head over the class token too, and no
absolute position embedding where the tower has none (DINOv3). With keep rate 1 it computes what the teacher
computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch

from data.schema import load
from teachers.base import teacher_extras

from ..family import ConfigError, PhasedParameterPolicy, policy_from
from .config import SparsifinerConfig
from .model import PHASES, Sparsifiner

if TYPE_CHECKING:  # pragma: no cover
    from teachers import Teacher

__all__ = ["SparsifyOptions", "sparsifier_config", "sparsify"]

# What a Sparsifiner reproduces of a teacher beyond a plain ViT (`teachers.base.TEACHER_EXTRAS`).
HANDLED_EXTRAS = ("rope", "attn_norm", "mlp_norm", "pool_include_prefix")


@dataclass
class SparsifyOptions:
    """What a recipe's `student:` section may set for a Sparsifiner student (the authors' defaults)."""

    keep_rate: Union[float, list[float]] = 0.25  # one rate, or one per sparsified block
    blocks: list[int] | None = None  # which blocks are sparsified (None: all); the others attend densely
    reduce_n_factor: int = 6
    reduce_c_factor: int = 2
    basis_coef_topk: int = 8
    basis_threshold: float = 0.02
    share_inout_proj: bool = False
    train_head: bool = True  # the sparse phase trains the final norm and head too (as the authors)
    drop_path_rate: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SparsifyOptions":
        return load(cls, d, "Sparsifiner student options", error=ConfigError, typed=False)

    def keep_rates(self, depth: int) -> list[float]:
        """One keep rate per teacher block (1.0 for the blocks left dense)."""
        blocks = list(range(depth)) if self.blocks is None else list(self.blocks)
        bad = [b for b in blocks if isinstance(b, bool) or not isinstance(b, int) or not -depth <= b < depth]
        if bad or len(set(b % depth for b in blocks)) != len(blocks) or not blocks:
            raise ConfigError(f"blocks={self.blocks}: give distinct block indices in {-depth}..{depth - 1} "
                              f"(the teacher has {depth} blocks), or null for all")
        rates = self.keep_rate if isinstance(self.keep_rate, (list, tuple)) else [self.keep_rate] * len(blocks)
        if len(rates) != len(blocks):
            raise ConfigError(f"keep_rate has {len(rates)} rates for {len(blocks)} sparsified blocks: give one "
                              f"rate, or exactly {len(blocks)}")
        out = [1.0] * depth
        for b, r in zip(blocks, rates):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
                raise ConfigError(f"keep_rate {r!r} is outside (0, 1]: the fraction of keys each query keeps")
            out[b % depth] = float(r)
        return out


def parameter_policy(student: Sparsifiner, train_head: bool = True) -> PhasedParameterPolicy:
    """reconstruct: the predictors of the sparsified blocks; sparse: everything else (predictors frozen) but the
    teacher's rotary frequencies (RoPE-Mixed's: the positions stay the teacher's)."""
    sparse_predictors = tuple(f"blocks.{i}.attn.mask_predictor." for i in student.sparse_blocks)
    head = ("norm.", "head.", "fc_norm.")
    return PhasedParameterPolicy({
        "reconstruct": policy_from(student, lambda n: n.startswith(sparse_predictors)),
        "sparse": policy_from(student, lambda n: ".mask_predictor." not in n and not n.startswith("rope.")
                         and (train_head or not n.startswith(head))),
    })


def sparsifier_config(teacher: "Teacher", opts: SparsifyOptions) -> SparsifinerConfig:
    """The Sparsifiner configuration of `teacher`'s whole image tower: its stem (with or without a position
    embedding), blocks (MLP kind, width, activation, qk-norm, EVA-02's extra norms, rotary positions) and head
    (class token or none, pooling, `norm` or `fc_norm`, MAP head, over the prefix tokens too or not)."""
    ph, pw = teacher.patch_size
    if ph != pw:
        raise ValueError(f"teacher patches {ph}x{pw} are not square; a Sparsifiner takes square patches")
    extras = teacher_extras(teacher, handled=HANDLED_EXTRAS)
    if extras:
        raise ValueError(f"a Sparsifiner cannot be made of teacher {teacher.kind}:{teacher.name}: it has "
                         f"{' and '.join(extras)}; choose a teacher without them")
    stem = teacher.stem_state_dict()
    head = teacher.head_state_dict()
    h, w = teacher.preprocess.size
    hidden = teacher.mlp_hidden_dim
    cfg = dict(
        img_size=h if h == w else [h, w], patch_size=ph, embed_dim=teacher.width, depth=teacher.depth,
        num_heads=teacher.num_heads, mlp_ratio=teacher.mlp_ratio, qkv_bias=True,
        # the exact width only where the ratio does not give it back (keeps the plain configs as they were)
        mlp_hidden_dim=None if int(teacher.width * teacher.mlp_ratio) == hidden else hidden,
        mlp_layer=teacher.mlp_layer, qk_norm=teacher.qk_norm, class_token=teacher.has_class_token,
        global_pool=teacher.pool, fc_norm=not teacher.norm_before_pool,
        pool_spec=None if teacher.pool_spec is None else dict(teacher.pool_spec),
        num_classes=0 if head is None else head["weight"].shape[0], head_bias=head is not None and "bias" in head,
        attn_keep_rate=opts.keep_rates(teacher.depth), reduce_n_factor=opts.reduce_n_factor,
        reduce_c_factor=opts.reduce_c_factor, share_inout_proj=opts.share_inout_proj,
        basis_threshold=opts.basis_threshold, basis_coef_topk=opts.basis_coef_topk, ln_eps=teacher.norm_eps,
        act=teacher.mlp_act, pre_norm="norm_pre.weight" in stem,
        reg_tokens=teacher.num_prefix_tokens - int(teacher.has_class_token),
        no_embed_class="pos_embed" in stem and stem["pos_embed"].shape[1] == teacher.num_patches,
        drop_path_rate=opts.drop_path_rate, pos_embed="pos_embed" in stem,
        # the extras read with a plain ViT's defaults (as `teacher_extras` does): any object describing a teacher
        pool_include_prefix=teacher.pool != "token" and getattr(teacher, "pool_include_prefix", False),
        attn_norm=getattr(teacher, "attn_norm", False), mlp_norm=getattr(teacher, "mlp_norm", False),
        rope=None if getattr(teacher, "rope", None) is None else teacher.rope.spec(),
    )
    if len(set(cfg["attn_keep_rate"])) == 1:
        cfg["attn_keep_rate"] = cfg["attn_keep_rate"][0]
    return SparsifinerConfig.from_dict(cfg)


@torch.no_grad()
def copy_teacher_weights(student: Sparsifiner, teacher: "Teacher") -> None:
    """The teacher's whole tower into the student; only the predictors stay fresh."""
    sd = dict(teacher.stem_state_dict())
    own = student.state_dict()
    if "patch_embed.proj.bias" in own and "patch_embed.proj.bias" not in sd:  # a bias-free patch embedding
        sd["patch_embed.proj.bias"] = torch.zeros_like(own["patch_embed.proj.bias"])
    for i in range(teacher.depth):
        sd.update({f"blocks.{i}.{k}": v for k, v in teacher.block_state_dict(i).items()})
    final_norm = "fc_norm." if student.config.fc_norm else "norm."
    sd.update({final_norm + k: v for k, v in teacher.norm_state_dict().items()})
    pool = teacher.pool_state_dict()
    if pool is not None:
        sd.update({f"attn_pool.{k}": v for k, v in pool.items()})
    head = teacher.head_state_dict()
    if head is not None:
        sd.update({f"head.{k}": v for k, v in head.items()})
    if student.rotary is not None:
        sd.update({f"rope.{k}": v for k, v in teacher.rope.weights(range(teacher.depth)).items()})
    missing, unexpected = student.load_state_dict(sd, strict=False)
    missing = [k for k in missing if ".mask_predictor." not in k]
    if missing or unexpected:
        raise RuntimeError(f"the teacher's tower does not map onto the Sparsifiner: missing {missing}, "
                           f"unexpected {unexpected}")


def sparsify(teacher: "Teacher", **options: Any) -> tuple[Sparsifiner, PhasedParameterPolicy]:
    """A Sparsifiner that is `teacher`'s image tower with fresh predictors, and its per-phase policy.

    Options are the fields of `SparsifyOptions` (or `options=SparsifyOptions(...)`). The student starts in
    the reconstruct phase with that phase's policy applied (only the predictors require grad); its
    `pretrained_cfg` is the teacher's preprocessing.
    """
    opts = options.pop("options", None) or SparsifyOptions.from_dict(options)
    student = Sparsifiner(sparsifier_config(teacher, opts))
    copy_teacher_weights(student, teacher)
    student.pretrained_cfg = teacher.preprocess.timm_cfg()
    policy = parameter_policy(student, opts.train_head)
    policy.apply(student, "reconstruct")
    assert set(policy.phases) == set(PHASES)
    return student, policy

"""Build a budget ViT from a teacher: its whole tower, run on fewer tokens, its stem resampled as timm resamples it.

    student, policy = budget_student(teacher, tokens=49)                    # ViT-B/16 at 112 px: 7 x 7 patches
    student, policy = budget_student(teacher, tokens=49, reduce="patch")    # at 224 px with 32-px patches

The student is the teacher's tower in timm's layout (`Teacher.stem_state_dict`, `block_state_dict`,
`norm_state_dict`, `pool_state_dict`, `head_state_dict`) with its stem on the smaller grid
(`teachers.budget.reduced_stem_state_dict`: the position embedding interpolated by timm's `resample_abs_pos_embed`,
for a larger patch the patch embedding resampled by `resample_patch_embed`). Untrained, it computes what the
training-free baselines `eval.baselines.budget.LowResolution` / `LargerPatch` compute; the run then fine-tunes all of
it to the teacher's full-resolution output. At the full budget it is the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

import torch

from data.schema import load
from teachers.base import teacher_extras
from teachers.budget import patch_for, reduced_stem_state_dict, resolution_for

from ..family import ConfigError, ParameterPolicy, policy_from
from .config import BudgetConfig
from .model import BudgetViT

if TYPE_CHECKING:  # pragma: no cover
    from teachers import Teacher

__all__ = ["BudgetOptions", "budget_config", "budget_student"]

HEAD = ("norm.", "fc_norm.", "attn_pool.", "head.")  # what `train_head: false` keeps frozen


@dataclass
class BudgetOptions:
    """A recipe's ``student:`` section for ``kind: budget``: the token budget and how the teacher reaches it."""

    tokens: int | None = None  # patch tokens (the class token and registers on top); default a quarter of the teacher's
    reduce: Literal["resolution", "patch"] = "resolution"  # a lower input resolution, or a larger patch
    image_size: Union[int, list[int], None] = None  # reduce: resolution, the size itself instead of tokens
    patch_size: int | None = None  # reduce: patch, the patch itself instead of tokens
    train_head: bool = True  # the final norm, pooling head and head train too (a pre-logits target: not the head)
    drop_path_rate: float = 0.0

    def __post_init__(self):
        if self.reduce not in ("resolution", "patch"):
            raise ValueError(f"student.reduce must be 'resolution' or 'patch', got {self.reduce!r}")
        other = {"resolution": "patch_size", "patch": "image_size"}[self.reduce]
        if getattr(self, other) is not None:
            raise ValueError(f"student.{other} does not apply to reduce: {self.reduce}; give student.tokens, or "
                             f"student.{'image_size' if other == 'patch_size' else 'patch_size'}")
        if self.tokens is not None and (self.image_size is not None or self.patch_size is not None):
            raise ValueError("give student.tokens or the size itself (student.image_size / patch_size), not both")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"student.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "BudgetOptions":
        return load(cls, d, "budget student options", error=ConfigError, typed=False)


def budget_config(teacher: "Teacher", opts: BudgetOptions) -> BudgetConfig:
    """The configuration of ``teacher``'s whole tower at the options' budget."""
    what = f"teacher {teacher.kind}:{teacher.name}"
    if teacher_extras(teacher):
        raise ValueError(f"a budget ViT cannot be made of {what}: it has {' and '.join(teacher_extras(teacher))}, "
                         f"which timm's VisionTransformer does not hold; choose a teacher without them")
    ph, pw = teacher.patch_size
    if ph != pw:
        raise ValueError(f"{what} has {ph}x{pw} patches; a budget ViT takes square patches")
    tokens = opts.tokens
    if tokens is None and opts.image_size is None and opts.patch_size is None:
        tokens = max(1, teacher.num_patches // 4)
    if opts.reduce == "resolution":
        size, patch = resolution_for(teacher, tokens, opts.image_size), ph
    else:
        size, patch = tuple(teacher.preprocess.size), patch_for(teacher, tokens, opts.patch_size)
    stem = teacher.stem_state_dict()
    head = teacher.head_state_dict()
    hidden = teacher.mlp_hidden_dim
    th, tw = teacher.preprocess.size
    cfg = dict(
        input_size=th if th == tw else [th, tw], img_size=size[0] if size[0] == size[1] else list(size),
        patch_size=patch, interpolation=teacher.preprocess.interpolation, embed_dim=teacher.width,
        depth=teacher.depth, num_heads=teacher.num_heads, mlp_ratio=teacher.mlp_ratio,
        # the exact width only where the ratio does not give it back
        mlp_hidden_dim=None if int(teacher.width * teacher.mlp_ratio) == hidden else hidden,
        mlp_layer=teacher.mlp_layer, act=teacher.mlp_act, qk_norm=teacher.qk_norm, ln_eps=teacher.norm_eps,
        class_token=teacher.has_class_token, reg_tokens=teacher.num_prefix_tokens - int(teacher.has_class_token),
        no_embed_class="pos_embed" in stem and stem["pos_embed"].shape[1] == teacher.num_patches,
        pre_norm="norm_pre.weight" in stem, global_pool=teacher.pool, fc_norm=not teacher.norm_before_pool,
        pool_spec=None if teacher.pool_spec is None else dict(teacher.pool_spec),
        num_classes=0 if head is None else head["weight"].shape[0], head_bias=head is not None and "bias" in head,
        drop_path_rate=opts.drop_path_rate)
    if "pos_embed" not in stem:
        raise ValueError(f"a budget ViT cannot be made of {what}: it has no absolute position embedding")
    return BudgetConfig.from_dict(cfg)


@torch.no_grad()
def copy_teacher_weights(student: BudgetViT, teacher: "Teacher") -> None:
    """The teacher's whole tower into the student, its stem resampled to the student's grid and patch."""
    cfg = student.config
    sd = reduced_stem_state_dict(teacher, cfg.grid_size, cfg.patch_size)
    own = student.state_dict()
    if "patch_embed.proj.bias" in own and "patch_embed.proj.bias" not in sd:  # a bias-free patch embedding
        sd["patch_embed.proj.bias"] = torch.zeros_like(own["patch_embed.proj.bias"])
    for i in range(teacher.depth):
        sd.update({f"blocks.{i}.{k}": v for k, v in teacher.block_state_dict(i).items()})
    final_norm = "fc_norm." if cfg.fc_norm else "norm."
    sd.update({final_norm + k: v for k, v in teacher.norm_state_dict().items()})
    for prefix, part in (("attn_pool.", teacher.pool_state_dict()), ("head.", teacher.head_state_dict())):
        sd.update({prefix + k: v for k, v in (part or {}).items()})
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the teacher's tower does not map onto the budget ViT: missing {missing}, "
                           f"unexpected {unexpected}")


def parameter_policy(student: BudgetViT, teacher: "Teacher", train_head: bool) -> ParameterPolicy:
    """Everything trains, but for the final norm and heads where ``train_head`` is off, and the head where the
    aligned output stops before it (a pre-logits target gives it no gradient; counted on the frozen side)."""
    frozen = () if train_head else HEAD
    if teacher.target != "proj":
        frozen = (*frozen, "head.")
    policy = policy_from(student, lambda name: not name.startswith(frozen) if frozen else True)
    return policy.apply(student)


def budget_student(teacher: "Teacher", **options: Any) -> tuple[BudgetViT, ParameterPolicy]:
    """A budget ViT that is ``teacher``'s tower at the options' budget (the fields of `BudgetOptions`, or
    ``options=BudgetOptions(...)``), and its parameter policy (applied). Its `pretrained_cfg` is the teacher's
    preprocessing: it takes the teacher's images."""
    opts = options.pop("options", None) or BudgetOptions.from_dict(options)
    student = BudgetViT(budget_config(teacher, opts))
    copy_teacher_weights(student, teacher)
    student.pretrained_cfg = teacher.preprocess.timm_cfg()
    return student, parameter_policy(student, teacher, opts.train_head)

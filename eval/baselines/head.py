"""What every training-free baseline shares: the teacher's own head path on tokens of any count, and the outputs a
student gives (`students.family.Student`: ``forward``, ``forward_outputs``; ``embed`` as the teacher's).

A baseline (`eval.baselines.tome.ToMe`, the budget baselines of `eval.baselines.budget`) subclasses `TeacherVariant`
and gives ``forward_features(images)``: the tokens leaving the teacher's last block (and anything else it returns
after them, as a tuple).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from students.blocks import map_pool, pool_and_norm

__all__ = ["TeacherHead", "TeacherVariant"]


class TeacherHead(nn.Module):
    """Copies of the teacher's final norm, pooling and head (`Teacher.norm_state_dict`, `pool`,
    `pool_state_dict`, `head_state_dict`), for tokens of any count: `pre_logits(tokens)` is the pooled,
    normed feature, `proj` the head (identity without one)."""

    def __init__(self, teacher):
        super().__init__()
        norm = teacher.norm_state_dict()
        self.pool = teacher.pool
        self.num_prefix = 0 if teacher.pool_include_prefix else teacher.num_prefix_tokens  # prefix tokens not pooled
        self.norm_before_pool = teacher.norm_before_pool
        self.norm = nn.LayerNorm(teacher.width, eps=teacher.norm_eps)
        self.norm.load_state_dict(norm)
        self.attn_pool = None
        if self.pool == "map":
            self.attn_pool = map_pool(teacher.width, teacher.pool_spec)
            self.attn_pool.load_state_dict(teacher.pool_state_dict())
        head = teacher.head_state_dict()
        if head is None:
            self.proj = nn.Identity()
        else:
            self.proj = nn.Linear(head["weight"].shape[1], head["weight"].shape[0], bias="bias" in head)
            self.proj.load_state_dict(head)
        self.to(norm["weight"].device, norm["weight"].dtype)
        self.requires_grad_(False)

    def pre_logits(self, tokens: Tensor) -> Tensor:
        return pool_and_norm(tokens, self.pool, self.num_prefix, self.norm, self.norm_before_pool, self.attn_pool)


class TeacherVariant(nn.Module):
    """A teacher run another way (fewer tokens), frozen and in eval mode, with a student's outputs:
    ``forward(images, pre_logits=False)`` is the head output (CLIP: the projected embedding; supervised: the
    classifier logits), with ``pre_logits`` the pooled, normed feature; ``embed(images)`` is what ``teacher.embed``
    returns. Subclasses give ``forward_features(images)``."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher
        self.target = teacher.target
        # Copies of the final norm, pooling and head (a few vectors and the MAP head): the teacher's own path
        # ends in the head, the pre-logits feature is the pooled, normed one before it.
        self.head = TeacherHead(teacher)
        self.proj = self.head.proj

    def train(self, mode: bool = True) -> "TeacherVariant":
        """Stays in eval mode, as the teacher does."""
        return super().train(False)

    def forward_features(self, images: Tensor):
        raise NotImplementedError

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """The teacher's pooling and final norm (``pre_logits``), then its head."""
        x = self.head.pre_logits(tokens)
        return x if pre_logits else self.proj(x)

    def _last_tokens(self, images: Tensor) -> Tensor:
        out = self.forward_features(images)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, images: Tensor, pre_logits: bool = False) -> Tensor:
        return self.forward_head(self._last_tokens(images), pre_logits=pre_logits)

    def forward_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(pre_logits, output)`` of one pass, as a student gives them."""
        pre = self.forward(images, pre_logits=True)
        return pre, self.proj(pre)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """What ``teacher.embed`` returns (CLIP: projected; timm: pre-logits), the other way."""
        pre = self.forward(images, pre_logits=True)
        return self.proj(pre) if self.target == "proj" else pre

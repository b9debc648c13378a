"""Training-free video baselines at a video student's budget: the teacher over frames, made cheaper.

* ``ReducedTeacher(teacher, frames=k)``: the teacher on ``k`` of each clip's T frames, spread evenly over the
  clip (frame ``floor((j + 0.5) T / k)`` for j < k), its video embedding the mean of those frames' (CLIP's
  video protocol on a shorter clip).
* ``ReducedTeacher(teacher, keep=n)``: the teacher on every frame, each frame keeping ``n`` of its patch
  tokens, drawn at random anew for every frame (with its prefix tokens: class token, registers); the
  blocks run on the kept tokens (a rotary teacher rotates each by its own grid position). Random dropping
  is the baseline token-reduction methods must beat at equal FLOPs (most video methods do not,
  arXiv 2411.13626).

Both compute the teacher's own path (`Teacher.embed_tokens`, `Teacher.run_block`, its final norm, pooling and
head: `eval.baselines.tome.TeacherHead`) and give what a student gives: ``forward_outputs(clips)`` is
``(pre_logits, output)``, each the mean over the frames it ran. With every frame and every token it computes
what `teachers.frames.VideoTeacher` computes. `budget_baselines` picks ``k`` and ``n`` so that a clip costs at
most what the student's does (FLOPs counted by `eval.cost.count_flops`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cost import count_flops
from ..features import aligned_output, student_outputs
from .tome import TeacherHead

__all__ = ["ReducedTeacher", "budget_baselines", "even_frames"]


def even_frames(total: int, k: int) -> list[int]:
    """``k`` of ``total`` frame indices spread evenly (the centre of each of k equal segments)."""
    if not 1 <= k <= total:
        raise ValueError(f"cannot take {k} of {total} frames")
    return [(2 * j + 1) * total // (2 * k) for j in range(k)]


class ReducedTeacher(nn.Module):
    """The teacher over the frames of a clip, on fewer frames (``frames``) or fewer patch tokens per frame
    (``keep``); see the module docstring. ``seed`` seeds the random choice of tokens (drawn anew per call)."""

    def __init__(self, teacher, frames: int | None = None, keep: int | None = None, seed: int = 0):
        super().__init__()
        if keep is not None and not 1 <= keep <= teacher.num_patches:
            raise ValueError(f"keep={keep}: a frame has {teacher.num_patches} patch tokens to keep 1 to all of")
        if frames is not None and frames < 1:
            raise ValueError(f"frames={frames} must be at least 1")
        self.teacher, self.frames, self.keep = teacher, frames, keep
        self.target = teacher.target
        self.head = TeacherHead(teacher)
        self.proj = self.head.proj
        self.generator = torch.Generator().manual_seed(seed)
        self.train(False)

    def train(self, mode: bool = True) -> "ReducedTeacher":
        return super().train(False)

    @property
    def name(self) -> str:
        if self.keep is not None:
            return f"teacher, {self.keep} of {self.teacher.num_patches} random patches per frame"
        return f"teacher on {self.frames} frame{'s' if self.frames != 1 else ''}"

    def _frame_tokens(self, frames: Tensor) -> Tensor:
        """Every frame's tokens leaving the last block, its patches dropped at random where ``keep`` says."""
        t = self.teacher
        x = t.embed_tokens(frames)
        positions = None
        if self.keep is not None and self.keep < t.num_patches:
            p = t.num_prefix_tokens
            order = torch.rand(x.shape[0], t.num_patches, generator=self.generator).argsort(dim=1)
            kept = order[:, :self.keep].sort(dim=1).values.to(x.device)
            patches = x[:, p:].gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :p], patches], dim=1)
            grid_w = t.grid_size[1]
            positions = torch.stack([kept // grid_w, kept % grid_w], dim=-1)
        for i in range(t.depth):
            x = t.run_block(i, x, positions)
        return x

    def forward_outputs(self, clips: Tensor) -> tuple[Tensor, Tensor]:
        """``(pre_logits, output)`` of clips ``[B, T, 3, H, W]``: the means over the frames that ran."""
        b, total = clips.shape[:2]
        if self.frames is not None:
            clips = clips[:, even_frames(total, min(self.frames, total))]
        pre = self.head.pre_logits(self._frame_tokens(clips.flatten(0, 1)))
        out = self.proj(pre)
        return pre.unflatten(0, (b, -1)).mean(dim=1), out.unflatten(0, (b, -1)).mean(dim=1)

    def forward(self, clips: Tensor, pre_logits: bool = False) -> Tensor:
        pre, out = self.forward_outputs(clips)
        return pre if pre_logits else out

    @torch.no_grad()
    def embed(self, clips: Tensor) -> Tensor:
        return aligned_output(self.target, *self.forward_outputs(clips))


def _clip_flops(model, clip: Tensor) -> float:
    return count_flops(lambda x: student_outputs(model, x), clip)


def budget_baselines(teacher, student, frames: int, size) -> tuple[list[ReducedTeacher], list[str]]:
    """The teacher on fewer frames and with random patch dropping, each at most the student's FLOPs per clip of
    ``frames`` frames at ``size`` (H, W), and notes saying what was chosen."""
    h, w = size
    one = torch.randn(1, frames, 3, h, w, generator=torch.Generator().manual_seed(0))
    budget = _clip_flops(student, one)
    per_frame = _clip_flops(ReducedTeacher(teacher, frames=1), one[:, :1])
    notes = []
    k = max(1, min(frames, int(budget // per_frame)))
    if per_frame > budget:
        notes.append(f"the teacher on one frame ({per_frame / 1e9:.3g} GFLOPs) already costs more than the student's "
                     f"clip ({budget / 1e9:.3g} GFLOPs): its fewer-frames baseline runs one frame")
    # The most patches per frame whose clip stays within the budget (the FLOPs grow with the tokens kept).
    lo, hi = 1, teacher.num_patches
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if frames * _clip_flops(ReducedTeacher(teacher, keep=mid), one[:, :1]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    keep = lo
    if frames * _clip_flops(ReducedTeacher(teacher, keep=1), one[:, :1]) > budget:
        notes.append("the teacher keeping one patch per frame still costs more than the student's clip: its "
                     "random-dropping baseline keeps one")
    return [ReducedTeacher(teacher, frames=k), ReducedTeacher(teacher, keep=keep)], notes

"""The teacher itself at a smaller token budget, untrained: the first thing to hold a token-efficient student against.

Three ways to run a ViT teacher on ``tokens`` patch tokens (the class token and registers kept on top), each on the
teacher's own full-resolution images (normalised with its preprocessing), each reducing them itself:

    LowResolution   the images resized (the teacher's interpolation, antialiased) to the input size whose patch grid
                    has about ``tokens`` patches (the nearest grid of the teacher's aspect: 112 px for 43 to 56
                    tokens of ViT-B/16), the position embedding
                    interpolated by timm's ``resample_abs_pos_embed``: what a timm ViT with ``dynamic_img_size``
                    computes at that size
    LargerPatch     the images as they are, the patch embedding resampled to the patch that tiles them into about
                    ``tokens`` patches (32 px for 49 tokens of ViT-B/16 at 224) by timm's
                    ``resample_patch_embed`` (FlexiViT), the position embedding interpolated as above
    RandomDrop      the teacher's own tokens, ``tokens`` of its patch tokens kept at random per image (a generator
                    seeded with ``seed`` at every call: the same batch always keeps the same patches); the prefix
                    tokens always kept. Random dropping is the baseline that most token-reduction methods do not
                    beat at equal FLOPs (arXiv 2411.13626).

Each runs the teacher's own blocks (`Teacher.run_block`; a rotary teacher's with the positions of its tokens,
`teachers.budget.rotary_grid_positions` for a reduced grid) and then its own final norm, pooling and head
(`eval.baselines.head`), and gives the outputs a student gives. At the full budget each computes what the teacher
computes. A budget larger than the teacher's patch count, an input size that is no multiple of the patch or a patch
that does not tile the input is refused in one line naming the largest valid value (`teachers.budget.BudgetError`).

    from eval.baselines.budget import BASELINES, LowResolution
    low = LowResolution(teacher, tokens=49)          # or size=112
    emb = low.embed(images)                          # what teacher.embed(images) is, at 112 px
    for method in BASELINES.values(): method(teacher, tokens=49)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from teachers.budget import BudgetError, PatchStem, check_budget, patch_for, resolution_for, rotary_grid_positions

from .head import TeacherVariant

__all__ = ["BASELINES", "BudgetError", "LargerPatch", "LowResolution", "RandomDrop", "budget_baselines"]


class _Reduced(TeacherVariant):
    """A teacher on fewer patch tokens: ``_tokens(images)`` gives the tokens entering block 0 and their rotary
    positions on the teacher's grid (None where the teacher has none, or where they are its whole grid)."""

    method: str

    def __init__(self, teacher, num_patches: int):
        super().__init__(teacher)
        self.num_patches = num_patches  # patch tokens entering the blocks

    @property
    def num_tokens(self) -> int:
        """Every token entering the blocks: the prefix tokens and the patches."""
        return self.teacher.num_prefix_tokens + self.num_patches

    def _tokens(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def forward_features(self, images: Tensor) -> Tensor:
        """The tokens leaving the teacher's last block [B, num_tokens, width]."""
        x, positions = self._tokens(images)
        for i in range(self.teacher.depth):
            x = self.teacher.run_block(i, x, positions)
        return x

    def describe(self) -> dict:
        """What the comparison says of it."""
        return dict(method=self.method, budget=self.budget, patch_tokens=self.num_patches,
                    tokens=str(self.num_tokens), how=self.how)


class _ReducedGrid(_Reduced):
    """The teacher's stem on a smaller grid (`teachers.budget.PatchStem`), its blocks positioned on that grid."""

    def __init__(self, teacher, size: tuple[int, int], patch: int):
        stem = PatchStem(teacher, (size[0] // patch, size[1] // patch), patch)
        super().__init__(teacher, stem.grid[0] * stem.grid[1])
        self.stem = stem
        self.size, self.patch = size, patch
        positions = None
        if teacher.rope is not None and stem.grid != tuple(teacher.grid_size):
            positions = rotary_grid_positions(teacher.rope, stem.grid)
        self.register_buffer("positions", positions, persistent=False)
        self.how = f"{stem.grid[0]}x{stem.grid[1]} patches of {patch} px at {size[0]}x{size[1]}"

    def _input(self, images: Tensor) -> Tensor:
        return images

    def _tokens(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        size = tuple(self.teacher.preprocess.size)
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != size:
            raise ValueError(f"{self.name} takes the teacher's images [B, 3, {size[0]}, {size[1]}] and reduces them "
                             f"itself, got {tuple(images.shape)}")
        with torch.no_grad():
            return self.stem(self._input(images)), self.positions


class LowResolution(_ReducedGrid):
    """The teacher at a lower input resolution: ``tokens`` (a budget) or ``size`` (int or [H, W], a multiple of its
    patch); see the module docstring."""

    method = "resolution"

    def __init__(self, teacher, tokens: int | None = None, *, size=None):
        h, w = resolution_for(teacher, tokens, size)
        super().__init__(teacher, (h, w), teacher.patch_size[0])
        self.budget = tokens if tokens is not None else self.num_patches
        self.interpolation = teacher.preprocess.interpolation

    @property
    def name(self) -> str:
        h, w = self.size
        return f"teacher at {h}px" if h == w else f"teacher at {h}x{w}px"

    def _input(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) == tuple(self.size):
            return images
        # Resizing the normalised image is resizing the image, then normalising: both are linear per channel.
        return F.interpolate(images, size=self.size, mode=self.interpolation, antialias=True, align_corners=False)


class LargerPatch(_ReducedGrid):
    """The teacher with its patch embedding resampled to a larger patch: ``tokens`` (a budget) or ``patch``; see the
    module docstring."""

    method = "patch"

    def __init__(self, teacher, tokens: int | None = None, *, patch: int | None = None):
        p = patch_for(teacher, tokens, patch)
        super().__init__(teacher, tuple(teacher.preprocess.size), p)
        self.budget = tokens if tokens is not None else self.num_patches

    @property
    def name(self) -> str:
        return f"teacher patch {self.patch}"


class RandomDrop(_Reduced):
    """The teacher keeping ``tokens`` of its patch tokens at random per image (and every prefix token); see the
    module docstring."""

    method = "random"

    def __init__(self, teacher, tokens: int, *, seed: int = 0):
        n = check_budget(teacher.num_patches, tokens, f"teacher {teacher.kind}:{teacher.name}")
        super().__init__(teacher, n)
        self.budget, self.seed = n, seed
        self.how = f"{n} of {teacher.num_patches} patches kept at random (seed {seed})"

    @property
    def name(self) -> str:
        return f"teacher random {self.num_patches}"

    def keep_indices(self, batch: int) -> Tensor:
        """The patch tokens each of ``batch`` images keeps [batch, tokens], in grid order (from the seed)."""
        scores = torch.rand(batch, self.teacher.num_patches, generator=torch.Generator().manual_seed(self.seed))
        return scores.argsort(dim=1)[:, :self.num_patches].sort(dim=1).values

    def _tokens(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.teacher.embed_tokens(images)
        b, _, c = x.shape
        p = self.teacher.num_prefix_tokens
        keep = self.keep_indices(b).to(x.device)
        x = torch.cat([x[:, :p], x[:, p:].gather(1, keep[..., None].expand(b, -1, c))], dim=1)
        rope = self.teacher.rope
        positions = None if rope is None else rope.grid_positions(x.device)[keep]  # [B, tokens, 2]
        return x, positions


BASELINES = {"resolution": LowResolution, "patch": LargerPatch, "random": RandomDrop}


def budget_baselines(teacher, budgets: Sequence[int], methods: Sequence[str] = tuple(BASELINES),
                     seed: int = 0) -> list[_Reduced]:
    """Each of ``methods`` at each budget, in budget order; a reduced grid that two budgets share is built once
    (e.g. 49 and 50 tokens of a 14 x 14 grid both give 7 x 7). Bad budgets fail here, before any work."""
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise BudgetError(f"unknown budget baseline {unknown[0]!r}; the baselines are {', '.join(BASELINES)}")
    out, names = [], set()
    for tokens in sorted(set(budgets)):
        for method in methods:
            kwargs = {"seed": seed} if method == "random" else {}
            model = BASELINES[method](teacher, tokens, **kwargs)
            if model.name not in names:
                names.add(model.name)
                out.append(model)
    return out

"""A teacher at a smaller token budget: the patch grid a budget allows, the input size or patch size that gives it,
and the teacher's stem (`Teacher.stem_state_dict`) on that grid, resampled as timm resamples it.

Two ways to run a ViT on fewer patch tokens without touching its blocks:

* **a lower resolution**: the image resized to ``grid x patch`` pixels, the patch embedding unchanged, the absolute
  position embedding interpolated to the new grid by ``timm.layers.resample_abs_pos_embed`` (bicubic, antialiased:
  what a timm ViT built with ``dynamic_img_size`` does at that size);
* **a larger patch**: the image as it is, the patch embedding resampled to the larger patch by
  ``timm.layers.resample_patch_embed`` (FlexiViT's pseudo-inverse resize, as timm loads a checkpoint into a model of
  another patch size), the position embedding interpolated to the new grid as above.

A rotary teacher (`Teacher.rope`) positions its tokens by rotations rather than (or besides) the absolute embedding;
`rotary_grid_positions` gives the positions on the teacher's grid whose rotations are those timm's rotary module
computes for a grid of the new size (EVA's rescaling to the reference grid, DINOv3's normalised centres, the mixed
kind's indices), so that `Teacher.run_block(i, tokens, positions)` runs the teacher's blocks as timm would at that
size.

A budget counts patch tokens: the class token and registers come on top. A grid takes the patch count nearest the
budget (48 tokens of ViT-B/16 give 7 x 7 = 49: a SparseFormer of 48 latent tokens and a class token meets 49 patches
and a class token), never more than the teacher's own. A budget larger than the teacher's patch
count, an input size that is no multiple of the patch, or a patch that does not tile the image is refused in one
line naming the largest valid value (`BudgetError`).

    grid = budget_grid(teacher.grid_size, 49)                    # (7, 7) of ViT-B/16's (14, 14)
    size = resolution_for(teacher, tokens=49)                    # (112, 112)
    patch = patch_for(teacher, tokens=49)                        # 32 at 224 px
    stem = PatchStem(teacher, patch=32)                          # images -> the tokens entering block 0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from .base import Teacher
    from .rope import RotaryPositions

__all__ = ["BudgetError", "PatchStem", "budget_grid", "check_budget", "patch_for", "reduced_stem_state_dict",
           "resolution_for", "rotary_grid_positions"]


class BudgetError(UserError, ValueError):
    """A token budget, input size or patch size the teacher cannot be run at."""


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_budget(num_patches: int, tokens, what: str = "the teacher") -> int:
    """``tokens`` as a budget of patch tokens for a tower of ``num_patches``, or a BudgetError naming the range."""
    if not _is_int(tokens) or tokens < 1:
        raise BudgetError(f"a token budget is a positive number of patch tokens, got {tokens!r}; the largest valid "
                          f"budget for {what} is {num_patches}")
    if tokens > num_patches:
        raise BudgetError(f"token budget {tokens} is larger than the {num_patches} patch tokens of {what}; the "
                          f"largest valid budget is {num_patches}")
    return tokens


def budget_grid(grid: Sequence[int], tokens: int, what: str = "the teacher") -> tuple[int, int]:
    """The patch grid of the aspect of ``grid`` (rows, cols) whose patch count is nearest ``tokens`` (the smaller on a
    tie): (7, 7) of a 14 x 14 grid for 48, 49 or 50 tokens, so that a student of 48 tokens and a class token is held
    against 49 patches and a class token. Rows shrink one at a time; the columns follow at the same ratio."""
    gh, gw = grid
    check_budget(gh * gw, tokens, what)
    grids = [(rows, max(1, min(gw, round(rows * gw / gh)))) for rows in range(gh, 0, -1)]
    return min(grids, key=lambda g: (abs(g[0] * g[1] - tokens), g[0] * g[1]))


# ----------------------------------------------------------------------------- lower resolution
def resolution_for(teacher: "Teacher", tokens: int | None = None, size=None) -> tuple[int, int]:
    """The input size (H, W) at which the teacher's own patches give about ``tokens`` patch tokens (`budget_grid`), or
    ``size`` itself (an int or [H, W]) once checked: a multiple of the patch, at most the teacher's input size."""
    ph, pw = teacher.patch_size
    th, tw = teacher.preprocess.size
    what = f"teacher {teacher.kind}:{teacher.name}"
    if (tokens is None) == (size is None):
        raise BudgetError("give a token budget or an input size, not both (or neither)")
    if tokens is not None:
        rows, cols = budget_grid(teacher.grid_size, tokens, what)
        return rows * ph, cols * pw
    h, w = _pair(size)
    for value, patch, top, axis in ((h, ph, th, "height"), (w, pw, tw, "width")):
        if _is_int(value) and patch <= value <= top and value % patch == 0:
            continue
        if not _is_int(value) or value < patch:
            why = f"is smaller than one {patch}-px patch; the smallest valid {axis} is {patch}"
        elif value > top:
            why = f"is larger than its {top}-px input; the largest valid {axis} is {top // patch * patch}"
        else:
            why = f"is no multiple of its {patch}-px patch; the largest valid {axis} up to {value} is " \
                  f"{value // patch * patch}"
        raise BudgetError(f"input {axis} {value!r} for {what} {why}")
    return h, w


# ----------------------------------------------------------------------------- larger patch
def _tiling_patches(teacher: "Teacher") -> list[int]:
    """The square patch sizes, from the teacher's own up, that tile its input exactly."""
    h, w = teacher.preprocess.size
    ph, pw = teacher.patch_size
    return [p for p in range(max(ph, pw), min(h, w) + 1) if h % p == 0 and w % p == 0]


def patch_for(teacher: "Teacher", tokens: int | None = None, patch: int | None = None) -> int:
    """The patch, at least the teacher's and tiling its input exactly, whose patch count is nearest ``tokens`` (as
    `budget_grid`); or ``patch`` itself once checked (a patch the teacher's patch embedding can be resampled to: square, at
    least the teacher's own, tiling the input)."""
    h, w = teacher.preprocess.size
    ph, pw = teacher.patch_size
    what = f"teacher {teacher.kind}:{teacher.name}"
    if (tokens is None) == (patch is None):
        raise BudgetError("give a token budget or a patch size, not both (or neither)")
    if ph != pw:
        raise BudgetError(f"{what} has {ph}x{pw} patches; a patch embedding is resampled only from square patches")
    valid = _tiling_patches(teacher)
    if tokens is not None:
        check_budget(teacher.num_patches, tokens, what)
        # The patch whose token count is nearest the budget (the fewer tokens on a tie), as `budget_grid`.
        return min(valid, key=lambda p: (abs((h // p) * (w // p) - tokens), (h // p) * (w // p)))
    if not _is_int(patch) or patch not in valid:
        below = [p for p in valid if _is_int(patch) and p <= patch]
        if _is_int(patch) and patch < ph:
            hint = f"the smallest valid patch is the teacher's own, {ph}"
        else:
            hint = f"the largest valid patch up to {patch} is {below[-1]}" if below else \
                f"valid patches are {', '.join(map(str, valid))}"
        raise BudgetError(f"patch {patch!r} cannot be the patch of {what}: a resampled patch embedding takes a square "
                          f"patch of at least {ph} px that tiles the {h}x{w} input exactly; {hint}")
    return patch


# ----------------------------------------------------------------------------- the stem on another grid
def reduced_stem_state_dict(teacher: "Teacher", grid: Sequence[int], patch: int | None = None) -> dict[str, Tensor]:
    """`Teacher.stem_state_dict` for a patch grid ``grid`` (rows, cols) of ``patch``-px patches (default: the
    teacher's): ``patch_embed.proj.weight`` resampled by ``timm.layers.resample_patch_embed`` and ``pos_embed``
    by ``timm.layers.resample_abs_pos_embed`` (prefix tokens' entries kept), each left as it is where its size does
    not change. Detached copies."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    sd = teacher.stem_state_dict()
    extra = [k for k in sd if k.startswith("patch_embed.") and k not in ("patch_embed.proj.weight",
                                                                         "patch_embed.proj.bias")]
    if extra:
        raise BudgetError(f"teacher {teacher.kind}:{teacher.name} has a patch embedding with more than a projection "
                          f"({', '.join(extra)}); it cannot be run at another budget")
    weight = sd["patch_embed.proj.weight"]
    if patch is not None and tuple(weight.shape[-2:]) != (patch, patch):
        sd["patch_embed.proj.weight"] = resample_patch_embed(weight, [patch, patch])
    grid = tuple(grid)
    if "pos_embed" in sd and grid != tuple(teacher.grid_size):
        pos = sd["pos_embed"]
        prefix = 0 if pos.shape[1] == teacher.num_patches else teacher.num_prefix_tokens
        sd["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(teacher.grid_size),
                                                 num_prefix_tokens=prefix)
    return sd


class PatchStem(nn.Module):
    """The teacher's tokens entering block 0, on a grid of another size: its patch embedding (resampled to
    ``patch``, default the teacher's own), its class token and registers, its position embedding resampled to the
    grid, and its LayerNorm before the blocks (open_clip's ln_pre), in the order of timm's ``_pos_embed`` (the
    embedding added to the prefix tokens too where it has entries for them). Buffers, not parameters: it is the
    frozen teacher's. At the teacher's patch and input size it is the teacher's own ``embed_tokens``."""

    def __init__(self, teacher: "Teacher", grid: Sequence[int] | None = None, patch: int | None = None):
        super().__init__()
        size = teacher.preprocess.size
        self.patch = patch or teacher.patch_size[0]
        self.grid = tuple(grid) if grid is not None else (size[0] // self.patch, size[1] // self.patch)
        sd = reduced_stem_state_dict(teacher, self.grid, patch)
        for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "reg_token", "pos_embed",
                     "norm_pre.weight", "norm_pre.bias"):
            self.register_buffer(name.replace(".", "_"), sd.get(name))
        self.pos_covers_prefix = "pos_embed" in sd and sd["pos_embed"].shape[1] != self.grid[0] * self.grid[1]
        self.eps = teacher.norm_eps

    def forward(self, images: Tensor) -> Tensor:
        x = F.conv2d(images, self.patch_embed_proj_weight, self.patch_embed_proj_bias, stride=self.patch)
        if tuple(x.shape[-2:]) != self.grid:
            raise ValueError(f"images of {tuple(images.shape[-2:])} px give a {tuple(x.shape[-2:])} grid of "
                             f"{self.patch}-px patches, not the {self.grid} this stem was resampled to")
        x = x.flatten(2).transpose(1, 2)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is not None and not self.pos_covers_prefix:
            x = x + self.pos_embed
        x = torch.cat([*prefix, x], dim=1) if prefix else x
        if self.pos_embed is not None and self.pos_covers_prefix:
            x = x + self.pos_embed
        if self.norm_pre_weight is not None:
            x = F.layer_norm(x, x.shape[-1:], self.norm_pre_weight, self.norm_pre_bias, self.eps)
        return x


# ----------------------------------------------------------------------------- rotary positions on another grid
def rotary_grid_positions(rope: "RotaryPositions", grid: Sequence[int]) -> Tensor:
    """Positions [rows * cols, 2] on the teacher's grid (`RotaryPositions`' (row, col)) whose rotations are those
    timm's rotary module computes for a patch grid of size ``grid`` (what an ``Eva`` built with ``dynamic_img_size``
    gives that grid): 'cat' rescales index + grid_offset to its reference grid (plain indices without one),
    'dinov3' normalises the centres (index + 0.5 + grid_offset) by the grid's size, 'mixed' takes plain indices.
    At the teacher's own grid these are `RotaryPositions.grid_positions`."""
    h, w = grid
    m = rope.module
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    new = [rows.reshape(-1).float(), cols.reshape(-1).float()]
    if tuple(grid) == tuple(rope.grid_size) or rope.kind == "mixed" or \
            (rope.kind == "cat" and m.ref_feat_shape is None):
        return torch.stack(new, dim=-1)
    old_sizes, new_sizes = list(rope.grid_size), [h, w]
    offset = float(m.grid_offset)
    if rope.kind == "cat":  # (t + offset) / size * ref must agree: t = (i + offset) * old / new - offset
        out = [(t + offset) * o / n - offset for t, o, n in zip(new, old_sizes, new_sizes)]
    else:  # 'dinov3': (t + 0.5 + offset) / denominator must agree
        def denominators(sizes):
            return {"separate": sizes, "min": [min(sizes)] * 2, "max": [max(sizes)] * 2}[m.normalize_coords]

        out = [(t + 0.5 + offset) * do / dn - 0.5 - offset
               for t, do, dn in zip(new, denominators(old_sizes), denominators(new_sizes))]
    return torch.stack(out, dim=-1)


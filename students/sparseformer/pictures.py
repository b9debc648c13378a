"""Pictures of where a SparseFormer looks: each token's RoI and sampling points at every stage.

One row per image, one column per sampling stage (the RoIs the stage samples in, and its
sampling points) plus a last column with the final RoIs. RoIs and points are in normalised
image coordinates (``x1, y1, x2, y2`` in [0, 1]); boxes reaching outside the image are clipped
at its border for display (points outside it are cut at the panel's edge). Each token keeps its colour across the row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from data.outputs import replacing

# Pixels per panel side; the PNG is (stages + 1) * PANEL_PX wide and images * PANEL_PX high.
PANEL_PX = 256
_DPI = 100
_MARGIN = 0.03


def student_mean_std(student: nn.Module) -> tuple[Sequence[float], Sequence[float]]:
    """The normalisation the student's inputs carry (to undo it for display)."""
    cfg = getattr(student, "pretrained_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:
        return cfg["mean"], cfg["std"]
    factor = getattr(getattr(student, "config", None), "normalization_factor", None)
    if factor:
        return factor[0], factor[1]
    raise ValueError("the student carries no mean/std (pretrained_cfg or config.normalization_factor); "
                     "pass mean= and std= to draw_rois")


def denormalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``[B, 3, H, W]`` normalised -> ``[B, H, W, 3]`` in [0, 1] for display."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.detach().float().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def draw_rois(student: nn.Module, images: Tensor, path: str | os.PathLike, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None, points: bool = True, max_tokens: int | None = None) -> dict:
    """Write the RoI grid of ``images`` (normalised ``[B, 3, H, W]``) to the PNG ``path``.

    Returns ``dict(path, width, height, rows, columns)`` (pixel size of the PNG).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if not hasattr(student, "forward_details"):
        raise TypeError(f"RoI pictures need a SparseFormer (forward_details); got {type(student).__name__}")
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"draw_rois expects a non-empty batch [B, 3, H, W], got {tuple(images.shape)}")
    if mean is None or std is None:
        mean, std = student_mean_std(student)
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    try:
        details = student.forward_details(images.to(device))
    finally:
        student.train(was_training)
    pictures = denormalise(images, mean, std)
    stages = len(details.points)
    rois = [r.float().cpu() for r in details.rois]  # stages + 1 (the final RoIs)
    pts = [p.float().cpu() for p in details.points]
    n_tokens = rois[-1].shape[1]
    shown = range(n_tokens if max_tokens is None else min(max_tokens, n_tokens))
    colours = _token_colours(n_tokens)

    rows, cols = images.shape[0], stages + 1
    fig = Figure(figsize=(cols * PANEL_PX / _DPI, rows * PANEL_PX / _DPI), dpi=_DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(pictures[r], extent=(0, 1, 1, 0), interpolation="nearest")
            for t in shown:
                x1, y1, x2, y2 = rois[c][r, t].clamp(0, 1).tolist()
                x1, x2 = sorted((x1, x2))
                y1, y2 = sorted((y1, y2))
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.2, ec=colours[t], alpha=0.9))
                if points and c < stages:
                    p = pts[c][r, t]
                    ax.scatter(p[:, 0], p[:, 1], s=6, c=[colours[t]], linewidths=0, clip_on=True)
            # A small margin, so that boxes along the image border stay visible.
            ax.set_xlim(-_MARGIN, 1 + _MARGIN)
            ax.set_ylim(1 + _MARGIN, -_MARGIN)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"stage {c + 1}" if c < stages else "final RoIs", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.1 / rows, wspace=0.03, hspace=0.03)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=_DPI, format="png")
    return dict(path=str(path), width=cols * PANEL_PX, height=rows * PANEL_PX, rows=rows, columns=cols)


def _token_colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["hsv"]
    return [cmap(i / max(n, 1)) for i in range(n)]

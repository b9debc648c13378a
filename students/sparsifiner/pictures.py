"""What a Sparsifiner attends to: for a few query patches of a few images, the keys each keeps, over the image.

    details = student.eval().forward_details(images)
    kept_keys_figure(display_images, details.attn_masks, "kept_keys.png", block=-1)

Each row is an image; its first panel is the image, then one panel per query patch (a red square) with
the patches its query keeps (in the chosen block, head 0 or the union over heads) lit and the rest dimmed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from data.outputs import replacing

__all__ = ["draw_kept_keys", "kept_keys", "kept_keys_figure"]


def kept_keys(masks: list[Tensor], block: int, query: int, num_prefix: int, head: int | None = None) -> Tensor:
    """The patches kept by patch `query`'s row in `block`: [B, num_patches] bool (head None: any head)."""
    m = masks[block][:, :, num_prefix + query, num_prefix:]
    return m.any(dim=1) if head is None else m[:, head]


def kept_keys_figure(images: Tensor, masks: list[Tensor], path: str | Path, *, block: int = -1,
                     queries: list[int] | None = None, num_prefix: int = 1, head: int | None = 0,
                     max_images: int = 4) -> Path:
    """Write the PNG and return its path. `images` [B, 3, H, W] in [0, 1] (for display, not normalised)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, _, h, w = images.shape
    patches = masks[block].shape[-1] - num_prefix
    gh = int(round((patches * h / w) ** 0.5))
    gw = patches // gh
    if gh * gw != patches:
        raise ValueError(f"{patches} patches do not form a grid for {h}x{w} images")
    if queries is None:  # the centre and two corners' neighbours
        queries = [(gh // 2) * gw + gw // 2, (gh // 4) * gw + gw // 4, (3 * gh // 4) * gw + 3 * gw // 4]
    rows = min(b, max_images)
    fig, axes = plt.subplots(rows, 1 + len(queries), figsize=(2.2 * (1 + len(queries)), 2.2 * rows), squeeze=False)
    ph, pw = h / gh, w / gw
    for r in range(rows):
        img = images[r].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        axes[r][0].imshow(img)
        axes[r][0].set_title("image", fontsize=8)
        for j, q in enumerate(queries):
            keep = kept_keys(masks, block, q, num_prefix, head)[r].reshape(gh, gw).float()
            shade = torch.nn.functional.interpolate(keep[None, None], size=(h, w), mode="nearest")[0, 0]
            ax = axes[r][1 + j]
            ax.imshow(img * (0.25 + 0.75 * shade.cpu().numpy()[..., None]))
            y, x = divmod(q, gw)
            ax.add_patch(plt.Rectangle((x * pw, y * ph), pw, ph, fill=False, edgecolor="red", linewidth=1.5))
            ax.set_title(f"query {q}: {int(keep.sum())}/{patches} kept", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    which = "any head" if head is None else f"head {head}"
    fig.suptitle(f"keys kept per query patch (block {block}, {which})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


def draw_kept_keys(student, images: Tensor, path: str | Path, mean, std) -> Path:
    """The evaluation report's picture (`kept_keys.png`): the keys a few query patches keep in the last
    sparse block, head 0, of normalised ``images`` (``mean``, ``std``: their normalisation)."""
    with torch.no_grad():
        masks = student.forward_details(images, attention=False).attn_masks
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    block = student.sparse_blocks[-1] if student.sparse_blocks else -1
    return kept_keys_figure(images * s + m, masks, path, block=block, num_prefix=student.num_prefix_tokens)

"""Text <-> video (or image) retrieval with the CLIP teacher's text tower: recall@1/5/10 in both directions.

Every sample has one caption; caption ``i`` belongs to sample ``i``. ``text_to_video`` R@K: the fraction of
captions whose sample is among the K samples most cosine-similar to the caption's text embedding;
``video_to_text`` R@K: the fraction of samples whose caption is among their K nearest captions. The same
text embeddings (the teacher's) serve teacher and students alike: a bootstrapped CLIP student speaks in
the teacher's embedding space. Chance R@K is ``K / N``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KS", "encode_captions", "recall_at_k", "retrieval_eval"]

KS = (1, 5, 10)


def recall_at_k(queries: Tensor, gallery: Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """``{"R@1": ..., ...}``: the fraction of queries ``i`` whose gallery item ``i`` is among their K most
    cosine-similar (ties counted against: an item scoring as high as the right one ranks before it)."""
    if queries.shape != gallery.shape or queries.dim() != 2:
        raise ValueError(f"queries and gallery must both be [N, D], got {tuple(queries.shape)} and "
                         f"{tuple(gallery.shape)}")
    q, g = F.normalize(queries.float(), dim=1), F.normalize(gallery.float(), dim=1)
    sim = q @ g.T
    own = sim.diagonal()[:, None]
    rank = (sim > own).sum(dim=1) + ((sim == own).sum(dim=1) - 1)  # 0: first
    return {f"R@{k}": float((rank < k).float().mean()) for k in ks}


@torch.no_grad()
def encode_captions(teacher, captions: Sequence[str], device="cpu", batch_size: int = 256) -> Tensor:
    """The teacher's text embeddings of ``captions`` ``[N, embed_dim]`` (float32, on the CPU)."""
    out = []
    for start in range(0, len(captions), batch_size):
        tokens = teacher.tokenizer(list(captions[start:start + batch_size])).to(device)
        out.append(teacher.encode_text(tokens).float().cpu())
    return torch.cat(out)


def retrieval_eval(features: Tensor, text: Tensor, ks: Sequence[int] = KS) -> dict:
    """Both directions of one model's retrieval, and chance (``K / N``)."""
    n = features.shape[0]
    return {"text_to_video": recall_at_k(text, features, ks), "video_to_text": recall_at_k(features, text, ks),
            "chance": {f"R@{k}": min(1.0, k / n) for k in ks}, "num_samples": int(n)}

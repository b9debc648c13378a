"""The alignment loss: how far the student's embedding is from the teacher's, for the same image.

The paper does not state its loss (design notes); cosine distance is the default because
CLIP zero-shot and retrieval only use the direction of an embedding. Smooth-L1 and MSE
also match its length (or, with ``normalize``, compare the unit vectors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("cosine", "smooth_l1", "mse")


def alignment_loss(student: Tensor, teacher: Tensor, type: str = "cosine", beta: float = 1.0,
                   normalize: bool = False) -> Tensor:
    """Mean alignment loss over the batch of embeddings ``student``, ``teacher`` ``[B, D]``.

    Computed in float32 whatever the autocast dtype of the forward passes.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student output {tuple(student.shape)} and teacher target {tuple(teacher.shape)} differ: "
                         "is the student aligned to the right teacher output (proj vs pre-logits)?")
    s, t = student.float(), teacher.float()
    if type == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    if type == "smooth_l1":
        return F.smooth_l1_loss(s, t, beta=beta)
    if type == "mse":
        return F.mse_loss(s, t)
    raise ValueError(f"unknown loss type {type!r}; choose one of {', '.join(LOSS_TYPES)}")


@torch.no_grad()
def batch_cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean cosine similarity student <-> teacher over a batch (a logged metric)."""
    return F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()

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


# --------------------------------------------------------------------------
# Sparsifiner's two phases (design note `sparsifiner.md`)
# --------------------------------------------------------------------------
def attention_reconstruction_loss(approx: list[Tensor], teacher_attention: list[Tensor],
                                  weight: float = 0.01) -> Tensor:
    """The reconstruct phase: ``weight · mean over blocks of Σ (approx − teacher_attention[:, :, P:])²``.

    ``approx[i]`` is block i's low-rank approximation ``[B, H, N−P, N]`` (`Sparsifiner.forward_details`),
    ``teacher_attention[i]`` the teacher's dense post-softmax map ``[B, H, N, N]``
    (`Teacher.attention_maps`). The P prefix query rows (class token, registers), which always attend
    densely, are left out: P is read from the shapes. The sum runs over batch, heads, rows and keys, as
    the authors' loss (so it grows with the batch size).
    """
    if len(approx) != len(teacher_attention) or not approx:
        raise ValueError(f"{len(approx)} approximations for {len(teacher_attention)} teacher attention maps: "
                         f"give one teacher map per student block")
    total = 0.0
    for i, (a, t) in enumerate(zip(approx, teacher_attention)):
        b, h, rows, n = a.shape
        if t.shape[:2] != (b, h) or t.shape[-2:] != (n, n) or rows > n:
            raise ValueError(f"block {i}: approximation {tuple(a.shape)} does not fit the teacher's attention "
                             f"{tuple(t.shape)} (expected [B, H, N, N] with N = {n})")
        total = total + (a.float() - t[:, :, n - rows:].float()).square().sum()
    return weight * total / len(approx)


def token_loss(student_tokens: Tensor, teacher_tokens: Tensor) -> Tensor:
    """The sparse phase's token-level term: MSE of the final-normed patch tokens ``[B, N, C]``."""
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(f"student tokens {tuple(student_tokens.shape)} and teacher tokens "
                         f"{tuple(teacher_tokens.shape)} differ: compare the same tokens (patches, final-normed)")
    return F.mse_loss(student_tokens.float(), teacher_tokens.float())

"""The loss functions the families' training phases are made of, and the alignment term they share.

The alignment loss: how far the student's embedding is from the teacher's, for the same image.
The paper does not state its loss (design notes); cosine distance is the default because
CLIP zero-shot and retrieval only use the direction of an embedding. Smooth-L1 and MSE
also match its length (or, with ``normalize``, compare the unit vectors). A token-level term
compares final-normed tokens; a KL term compares logits (distillation from a classifier).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .family import LossTerm

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


def token_loss(student_tokens: Tensor, teacher_tokens: Tensor) -> Tensor:
    """The sparse phase's token-level term: MSE of the final-normed patch tokens ``[B, N, C]``."""
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(f"student tokens {tuple(student_tokens.shape)} and teacher tokens "
                         f"{tuple(teacher_tokens.shape)} differ: compare the same tokens (patches, final-normed)")
    return F.mse_loss(student_tokens.float(), teacher_tokens.float())


def kl_to_logits(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) of the softened class distributions, times T² (Hinton et al.), batch mean."""
    s_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t_log = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * temperature ** 2


def alignment_term(loss_cfg, weight: float = 1.0) -> LossTerm:
    """The alignment of the student's output with the teacher's embedding (``loss_cfg``: the recipe's
    ``loss:`` section: type, beta, normalize)."""

    def fn(out, target):
        return alignment_loss(out["embedding"], target["embedding"], loss_cfg.type, loss_cfg.beta, loss_cfg.normalize)

    return LossTerm("align", weight, ("embedding",), fn)

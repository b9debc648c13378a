"""How faithfully a student reproduces its teacher's embeddings (pure functions on feature tensors).

For ``N`` images with student embeddings ``s_i`` and teacher embeddings ``t_i`` (rows of
``[N, D]`` tensors, same images in the same order):

* ``cosine``: mean over ``i`` of ``cos(s_i, t_i)``. Easy to pass without learning anything about
  the image: teacher embeddings share a large common component, so a constant student equal
  to the teacher's mean embedding already scores high.
* ``centred_cosine``: the same after removing the teacher's mean embedding
  ``mu = mean_i t_i`` from both sides: mean over ``i`` of ``cos(s_i - mu, t_i - mu)``. It
  measures whether the student follows how each image *differs* from the average image. A
  constant student scores about 0 (exactly 0 where the constant is ``mu``); the teacher itself
  scores 1.
* ``retrieval_top1``: the fraction of images whose own teacher embedding is the nearest (by
  cosine similarity) of all the set's teacher embeddings to the student embedding:
  ``mean_i [argmax_j cos(s_i, t_j) == i]``. A constant student retrieves the same ``j`` for
  every image, so scores ``1/N`` (``retrieval_chance``); the teacher itself scores 1 (unless two
  images have identical teacher embeddings).

The bootstrapping run uses ``fidelity`` for its held-out alignment check; the evaluation
report uses it over the eval set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows of the N x N similarity matrix computed at once (bounds memory for large sets).
_RETRIEVAL_CHUNK = 1024


def _check_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
        raise TypeError("fidelity expects two tensors [N, D] (student, teacher)")
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher features must both be [N, D] with the same shape, got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}; is the student's output the one aligned to the teacher "
            "(its projected embedding for CLIP, its pre-logits feature otherwise)?"
        )
    if student.shape[0] == 0:
        raise ValueError("fidelity needs at least one image; the feature tensors are empty")
    return student.detach().float(), teacher.detach().float()


def mean_cosine(student: Tensor, teacher: Tensor) -> float:
    """Mean of ``cos(s_i, t_i)``."""
    s, t = _check_pair(student, teacher)
    return F.cosine_similarity(s, t, dim=1).mean().item()


def centred_cosine(student: Tensor, teacher: Tensor) -> float:
    """Mean of ``cos(s_i - mu, t_i - mu)`` with ``mu`` the teacher's mean embedding over the set."""
    s, t = _check_pair(student, teacher)
    mu = t.mean(dim=0, keepdim=True)
    return F.cosine_similarity(s - mu, t - mu, dim=1).mean().item()


def retrieval_top1(student: Tensor, teacher: Tensor) -> float:
    """Fraction of images whose own teacher embedding is the most cosine-similar to their student one."""
    s, t = _check_pair(student, teacher)
    s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
    hits = 0
    for start in range(0, s.shape[0], _RETRIEVAL_CHUNK):
        sim = s[start:start + _RETRIEVAL_CHUNK] @ t.T
        own = torch.arange(start, start + sim.shape[0])
        hits += (sim.argmax(dim=1) == own).sum().item()
    return hits / s.shape[0]


def fidelity(student_feats: Tensor, teacher_feats: Tensor) -> dict:
    """All fidelity measures of a student against its teacher over one set of images.

    Returns ``dict(cosine, centred_cosine, retrieval_top1, retrieval_chance, num_images)``.
    """
    s, t = _check_pair(student_feats, teacher_feats)
    return dict(
        cosine=mean_cosine(s, t),
        centred_cosine=centred_cosine(s, t),
        retrieval_top1=retrieval_top1(s, t),
        retrieval_chance=1.0 / s.shape[0],
        num_images=int(s.shape[0]),
    )

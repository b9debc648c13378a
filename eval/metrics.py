"""Accuracy of logits against labels, and how often two models predict the same class."""

from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}``: fraction of rows whose label is among the k highest logits.

    A ``k`` larger than the number of classes is left out (top-5 of a 3-class problem is 1).
    """
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no samples to compute accuracy on (empty evaluation set?)")
    labels = labels.to(logits.device)
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(
            f"labels range over [{labels.min().item()}, {labels.max().item()}] but there are {logits.shape[1]} "
            "classes; do the evaluation set's labels follow the class names' order?"
        )
    out = {}
    for k in ks:
        if k > logits.shape[1]:
            continue
        top = logits.topk(k, dim=1).indices
        out[f"top{k}"] = (top == labels[:, None]).any(dim=1).float().mean().item()
    return out


def per_class_top1(logits: Tensor, labels: Tensor) -> list[float | None]:
    """Top-1 accuracy of each class's samples (None for a class without samples): where a mean hides a
    class the model cannot tell from another (the video demo's two directions of motion)."""
    hits = (logits.argmax(dim=1) == labels.to(logits.device)).float()
    out = []
    for c in range(logits.shape[1]):
        mine = labels.to(logits.device) == c
        out.append(hits[mine].mean().item() if mine.any() else None)
    return out


def agreement(logits_a: Tensor, logits_b: Tensor) -> float:
    """Fraction of rows where both models' top-1 predictions are the same class."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"cannot compare predictions of shapes {tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    return (logits_a.argmax(dim=1) == logits_b.argmax(dim=1).to(logits_a.device)).float().mean().item()


def compare_predictions(logits: Mapping[str, Tensor], labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy for ``teacher`` and ``student`` logits on the same images, and their agreement.

    Returns ``{"teacher": {"top1", "top5"}, "student": {...}, "agreement": ..., "chance_top1": 1/C,
    "num_images": N, "num_classes": C, "per_class_top1": {"teacher": [C], "student": [C]}}``. Without ``teacher``
    logits (a teacher with no classifier over these classes, or none) ``teacher``, ``agreement`` and
    ``per_class_top1["teacher"]`` are None.
    """
    if "student" not in logits:
        raise KeyError("compare_predictions needs 'student' logits (and 'teacher' logits for the agreement)")
    t, s = logits.get("teacher"), logits["student"]
    return dict(
        teacher=None if t is None else topk_accuracy(t, labels, ks),
        student=topk_accuracy(s, labels, ks),
        agreement=None if t is None else agreement(t, s),
        chance_top1=1.0 / s.shape[1],
        num_images=int(s.shape[0]),
        num_classes=int(s.shape[1]),
        per_class_top1={"teacher": None if t is None else per_class_top1(t, labels),
                        "student": per_class_top1(s, labels)},
    )

"""Classification through the inherited head (students of supervised teachers, e.g. AugReg).

The student's ``proj`` is the teacher's classifier, so the student classifies with no training
of its own: ``student(x)`` are logits over the teacher's classes. The teacher's logits are its
own head on its pre-logits embedding (what ``teacher.model(x)`` computes).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor

from .metrics import compare_predictions


def head_applies(teacher, num_classes: int | None) -> str | None:
    """Why classification through the head does not apply (None when it does)."""
    head_classes = getattr(teacher, "num_classes", 0)
    if getattr(teacher, "target", None) != "norm" or not head_classes:
        return f"teacher {getattr(teacher, 'name', '?')} has no classifier head"
    if num_classes is not None and num_classes != head_classes:
        return (f"the evaluation set has {num_classes} classes but the teacher's head has {head_classes}; "
                "classification through the head needs the head's label set (e.g. ImageNet-1k)")
    return None


def classification_eval(features: Mapping[str, Tensor], ks: Sequence[int] = (1, 5)) -> dict:
    """Top-k of teacher and student head logits and their agreement.

    ``features`` needs ``teacher_logits``, ``student_logits`` and ``labels`` (see
    ``features.teacher_student_step(..., logits=True)``).
    """
    missing = [k for k in ("teacher_logits", "student_logits", "labels") if k not in features]
    if missing:
        raise ValueError(f"classification needs {missing}: extract with teacher_student_step(..., logits=True) "
                         "over a loader that yields (images, labels)")
    logits = {"teacher": features["teacher_logits"], "student": features["student_logits"]}
    return compare_predictions(logits, features["labels"], ks)

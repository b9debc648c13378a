"""Classification by a model's own head: students of supervised teachers (their head is the teacher's, e.g.
AugReg) and students trained with labels (their head is their own, over their data's classes).

A student of a supervised teacher classifies with no training of its own: ``student(x)`` are logits over the
teacher's classes, held against the teacher's own head on its pre-logits embedding (what ``teacher.model(x)``
computes). A student trained with labels names its classes (its pretrained_cfg's ``label_names``, timm's key):
it classifies an evaluation set of those classes, beside the teacher where the teacher's head has them too.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor

from .metrics import compare_predictions


def head_applies(teacher, num_classes: int | None) -> str | None:
    """Why classification through the teacher's head does not apply (None when it does)."""
    head_classes = getattr(teacher, "num_classes", 0)
    if getattr(teacher, "target", None) != "norm" or not head_classes:
        return f"teacher {getattr(teacher, 'name', '?')} has no classifier head"
    if num_classes is not None and num_classes != head_classes:
        return (f"the evaluation set has {num_classes} classes but the teacher's head has {head_classes}; "
                "classification through the head needs the head's label set (e.g. ImageNet-1k)")
    return None


def own_head_applies(classes: Sequence[str] | None, num_outputs: int, dataset_classnames: Sequence[str],
                     has_teacher: bool) -> str | None:
    """Why a model's own head does not classify the evaluation set (None when it does): it names its classes
    (trained with labels) and they are the set's, in order; or it names none, there is no teacher to compare
    with, and it has as many outputs as the set has classes (a released classifier evaluated alone)."""
    if classes is not None:
        if list(classes) == list(dataset_classnames):
            return None
        if len(classes) != len(dataset_classnames):
            return (f"its head predicts {len(classes)} classes and the evaluation set has {len(dataset_classnames)}")
        return "its head's classes are not the evaluation set's (or not in its order)"
    if not has_teacher and num_outputs == len(dataset_classnames):
        return None
    return "its head is not a classifier over the evaluation set's classes"


def classification_eval(features: Mapping[str, Tensor], ks: Sequence[int] = (1, 5)) -> dict:
    """Top-k of the student's head logits, and of the teacher's and their agreement where the teacher has them.

    ``features`` needs ``student_logits`` and ``labels`` (and ``teacher_logits`` for the teacher's; see
    ``features.teacher_student_step(..., logits=True)``).
    """
    missing = [k for k in ("student_logits", "labels") if k not in features]
    if missing:
        raise ValueError(f"classification needs {missing}: extract with teacher_student_step(..., logits=True) "
                         "over a loader that yields (images, labels)")
    logits = {"student": features["student_logits"]}
    if "teacher_logits" in features:
        logits["teacher"] = features["teacher_logits"]
    return compare_predictions(logits, features["labels"], ks)

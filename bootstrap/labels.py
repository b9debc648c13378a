"""The supervised term of a run on labelled data (``loss.label_weight``): cross-entropy of the student's zero-shot
logits with the shards' labels.

The classifier is the teacher's own zero-shot classifier (`eval.zeroshot.zero_shot_classifier`) of the training
shards' class names and prompts (their ``dataset.json``; prompts default to OpenAI's), fixed for the run, with the
evaluation's logits (``zero_shot_logits``: scale 100, or a SigLIP teacher's ``logit_scale``). So the term adds no
parameter (checkpoints, resuming, several processes and exports are unchanged), keeps the student in the teacher's
embedding space, and moves exactly what zero-shot evaluation reads. It is added to every phase that aligns the
student's embedding. Labels of -1 (a sample without ``.cls``) do not count.

It is how a video student learns what a teacher that averages its frames cannot see: two classes that differ only
by the direction of motion (`data.video_demo`) get one target embedding from such a teacher, and the labels
tell the clips apart.
"""

from __future__ import annotations

import dataclasses
import os

import torch.nn.functional as F
from torch import Tensor

from data.shards import is_remote, read_dataset_info, resolve_shards
from eval.zeroshot import zero_shot_classifier, zero_shot_logits
from students.family import LossTerm, Phase

from .config import Recipe, RecipeError

__all__ = ["label_term", "training_classes", "with_label_term"]


def training_classes(recipe: Recipe) -> tuple[list[str], list[str] | str]:
    """The class names (in label order) and prompt templates of ``data.train`` (its folders' ``dataset.json``);
    one line naming the fix where they name no classes."""
    d = recipe.data
    folders = sorted({os.path.dirname(u) or "." for u in resolve_shards(d.train, d.allow_pipe) if not is_remote(u)})
    infos = [read_dataset_info(f) or {} for f in folders]
    names = [i["classnames"] for i in infos if i.get("classnames")]
    if not names or len(names) < len(infos) or any(n != names[0] for n in names):
        why = "list different class names" if names and len(names) == len(infos) else \
            "name no classes (no dataset.json with classnames)"
        raise RecipeError(f"loss.label_weight={recipe.loss.label_weight} needs labelled shards, but data.train's "
                          f"folders {folders or [d.train]} {why}: make them with python -m data.make_shards from "
                          f"class sub-folders or a table with labels, or set loss.label_weight=0")
    templates = next((i["templates"] for i in infos if i.get("templates")), "openai")
    return list(names[0]), templates


def label_term(recipe: Recipe, teacher, device) -> LossTerm | None:
    """The supervised term of ``recipe`` (None at ``loss.label_weight=0``), its classifier on ``device``."""
    weight = recipe.loss.label_weight
    if not weight:
        return None
    classnames, templates = training_classes(recipe)
    try:
        classifier = zero_shot_classifier(teacher, classnames, templates, device).to(device)
    except ValueError:
        raise RecipeError(f"loss.label_weight={weight}: the labels are learnt through the teacher's zero-shot "
                          f"classifier of the class names, and teacher {teacher.kind}:{teacher.name} has no text "
                          f"tower; use a CLIP or SigLIP teacher, or set loss.label_weight=0") from None
    bias = getattr(teacher, "logit_bias", None)
    scale = float(teacher.logit_scale) if bias is not None else 100.0  # as the evaluation's zero-shot
    num_classes = len(classnames)

    def fn(out: dict, target: dict) -> Tensor:
        labels = target["labels"]
        if int(labels.max()) >= num_classes:
            raise RecipeError(f"data.train has a label {int(labels.max())}, but its dataset.json names "
                              f"{num_classes} classes: re-create the shards (python -m data.make_shards)")
        known = labels >= 0
        logits = zero_shot_logits(out["embedding"], classifier, scale)
        loss = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        return (loss * known).sum() / known.sum().clamp(min=1)

    return LossTerm("labels", weight, ("labels",), fn)


def with_label_term(phases: list[Phase], term: LossTerm | None) -> list[Phase]:
    """``phases`` with ``term`` added to each phase that aligns the student's embedding."""
    if term is None:
        return phases
    return [dataclasses.replace(p, terms=(*p.terms, term)) if "embedding" in p.outputs else p for p in phases]


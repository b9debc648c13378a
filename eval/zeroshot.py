"""Zero-shot classification with the CLIP teacher's text tower, for teacher and student alike.

The classifier is built once from the teacher's text tower (open_clip's
``build_zero_shot_classifier``: each class's prompt embeddings, normalised, averaged,
normalised again). A bootstrapped CLIP student speaks in the teacher's embedding space
(its head is the teacher's projection), so the same classifier serves both:
``logits = 100 * normalize(image_embedding) @ classifier``.

Templates and class names: `data.prompts`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from data.prompts import (TEMPLATE_SETS, dataset_templates, name_or_list_file, resolve_classnames,
                          resolve_templates, template_set_name)

from .metrics import compare_predictions

__all__ = ["TEMPLATE_SETS", "dataset_templates", "name_or_list_file", "resolve_classnames", "resolve_templates",
           "template_set_name", "zero_shot", "zero_shot_classifier", "zero_shot_eval", "zero_shot_logits"]

def zero_shot_classifier(teacher, classnames: Sequence[str], templates="openai", device="cpu",
                         progress: bool = False) -> Tensor:
    """``[embed_dim, num_classes]`` text classifier from the CLIP teacher's text tower."""
    import open_clip

    model = getattr(teacher, "model", None)
    if getattr(teacher, "target", None) != "proj" or not hasattr(model, "encode_text"):
        raise ValueError(
            f"zero-shot classification needs a CLIP teacher with a text tower (kind: openclip); "
            f"teacher {getattr(teacher, 'name', teacher)} is of family {getattr(teacher, 'family', '?')!r}"
        )
    return open_clip.build_zero_shot_classifier(
        model, teacher.tokenizer, list(classnames), resolve_templates(templates),
        num_classes_per_batch=10, device=device, use_tqdm=progress,
    ).float().cpu()


def zero_shot_logits(features: Tensor, classifier: Tensor, scale: float = 100.0,
                     bias: float | None = None) -> Tensor:
    """``scale * normalize(features) @ classifier (+ bias)``: CLIP's softmax logits (scale 100 by default),
    or SigLIP's sigmoid logits with the teacher's `logit_scale` and `logit_bias`."""
    if features.shape[1] != classifier.shape[0]:
        raise ValueError(
            f"image features of size {features.shape[1]} cannot meet a text classifier of size "
            f"{classifier.shape[0]}: is the student's output the projected CLIP embedding?"
        )
    logits = scale * F.normalize(features.float(), dim=-1) @ classifier.float()
    return logits if bias is None else logits + bias


def zero_shot_eval(features: Mapping[str, Tensor], classifier: Tensor, scale: float = 100.0,
                   bias: float | None = None) -> dict:
    """Top-1/top-5 of teacher and student and their agreement, from extracted features and labels; with
    `bias` (SigLIP) also the mean sigmoid probability of each model's top-1 class (`top1_probability`)."""
    if "labels" not in features:
        raise ValueError("zero-shot accuracy needs labels: the evaluation loader must yield (images, labels)")
    logits = {k: zero_shot_logits(features[k], classifier, scale, bias) for k in ("teacher", "student")}
    result = compare_predictions(logits, features["labels"])
    result["logits"] = {"kind": "softmax" if bias is None else "sigmoid", "scale": float(scale),
                        "bias": None if bias is None else float(bias)}
    if bias is not None:
        result["top1_probability"] = {k: float(torch.sigmoid(v.max(dim=1).values).mean()) for k, v in logits.items()}
    return result


@torch.no_grad()
def zero_shot(features: Mapping[str, Tensor], teacher, classnames: Sequence[str], templates="openai",
              device="cpu") -> dict:
    """Build the classifier and evaluate with the teacher's logits (SigLIP: its logit_scale and logit_bias,
    sigmoid); the result also records the template set."""
    classifier = zero_shot_classifier(teacher, classnames, templates, device)
    bias = getattr(teacher, "logit_bias", None)
    scale = teacher.logit_scale if bias is not None else 100.0
    result = zero_shot_eval(features, classifier, scale, bias)
    result["templates"] = template_set_name(templates)
    result["num_templates"] = len(resolve_templates(templates))
    return result

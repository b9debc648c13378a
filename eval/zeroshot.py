"""Zero-shot classification with the CLIP teacher's text tower, for teacher and student alike.

The classifier is built once from the teacher's text tower (open_clip's
``build_zero_shot_classifier``: each class's prompt embeddings, normalised, averaged,
normalised again). A bootstrapped CLIP student speaks in the teacher's embedding space
(its head is the teacher's projection), so the same classifier serves both:
``logits = 100 * normalize(image_embedding) @ classifier``.

Templates: ``"openai"`` (the 80 prompts of the CLIP paper), ``"simple"`` (7), ``"demo"`` (the
demo data set's), or a list of ``"{}"`` format strings; by default (None) the evaluation set's
own (``templates`` in its shards' ``dataset.json``, as the demo data has) or else ``"openai"``. Class names: ImageNet-1k's (open_clip's
``IMAGENET_CLASSNAMES``) by default or where an eval set's classes are WordNet ids, else the
eval set's own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import compare_predictions

TEMPLATE_SETS = ("openai", "simple", "demo")
_WNID = re.compile(r"^n\d{8}$")


def name_or_list_file(value: str | None):
    """A template set or class-name set by name, or a file with one entry per line (``#``
    comments), as the command lines take them; None stays None."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        return [ln for ln in lines if ln and not ln.startswith("#")]
    return value


def resolve_templates(templates: str | Sequence[str] | None = "openai") -> list:
    """A template list from a name (``openai``, ``simple``, ``demo``) or a list of ``"{}"`` strings."""
    import open_clip

    if templates is None or templates == "openai":
        return list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    if templates == "simple":
        return list(open_clip.SIMPLE_IMAGENET_TEMPLATES)
    if templates == "demo":
        from data.demo import DEMO_TEMPLATES

        return list(DEMO_TEMPLATES)
    if isinstance(templates, str):
        if "{}" in templates:
            return [templates]
        raise ValueError(
            f"unknown template set {templates!r}; use one of {', '.join(TEMPLATE_SETS)} or a list of strings "
            "with '{}' where the class name goes (e.g. ['a photo of a {}.'])"
        )
    templates = list(templates)
    bad = [t for t in templates if not callable(t) and (not isinstance(t, str) or "{}" not in t)]
    if not templates or bad:
        raise ValueError(
            f"zero-shot templates must be a non-empty list of strings with '{{}}' for the class name; bad: {bad[:3]}"
        )
    return templates


def template_set_name(templates) -> str:
    """How to name the templates in a report."""
    if templates is None or isinstance(templates, str):
        return templates or "openai"
    return "custom"


def dataset_templates(source) -> list[str] | None:
    """The prompt templates an evaluation set's ``dataset.json`` lists (shard folders), or None."""
    from data.shards import read_dataset_info

    if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
        return None
    templates = (read_dataset_info(source) or {}).get("templates")
    return list(templates) if templates else None


def resolve_classnames(classnames: str | Sequence[str] | None, dataset_classnames: Sequence[str] | None) -> list[str]:
    """Class names for the prompts.

    ``classnames`` wins when given (``"imagenet"`` or a list). Otherwise the eval set's names,
    except that 1000 WordNet ids (an ImageNet folder like ``n01440764``) become ImageNet-1k's
    names; without an eval set, ImageNet-1k's.
    """
    import open_clip

    if classnames == "imagenet":
        if dataset_classnames is not None and len(dataset_classnames) != len(open_clip.IMAGENET_CLASSNAMES):
            # Labels index the eval set's own classes: ImageNet-1k's names would score against the wrong ones.
            raise ValueError(
                f"classnames 'imagenet' names ImageNet-1k's {len(open_clip.IMAGENET_CLASSNAMES)} classes, but the "
                f"evaluation set has {len(dataset_classnames)} ({', '.join(list(dataset_classnames)[:5])}"
                f"{', ...' if len(dataset_classnames) > 5 else ''}); give its class names in label order instead")
        return list(open_clip.IMAGENET_CLASSNAMES)
    if isinstance(classnames, str):
        raise ValueError(f"classnames {classnames!r}: give 'imagenet' or a list of names in label order")
    if classnames is not None:
        names = list(classnames)
        if dataset_classnames is not None and len(names) != len(dataset_classnames):
            raise ValueError(
                f"{len(names)} class names given for an evaluation set with {len(dataset_classnames)} classes"
            )
        return names
    if dataset_classnames is None:
        return list(open_clip.IMAGENET_CLASSNAMES)
    names = list(dataset_classnames)
    if len(names) == 1000 and all(_WNID.match(n) for n in names):
        return list(open_clip.IMAGENET_CLASSNAMES)
    return names


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

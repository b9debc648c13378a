"""The class names and prompt templates of an evaluation set, as zero-shot classification and the exported
evaluation sets use them.

Templates: ``"openai"`` (the 80 prompts of the CLIP paper), ``"simple"`` (7), ``"demo"`` (the
demo data set's), ``"kinetics"`` (CLIP's 28 for Kinetics, `data.kinetics`), or a list of ``"{}"`` format strings; by default (None) the evaluation set's
own (``templates`` in its shards' ``dataset.json``, as the demo data has) or else ``"openai"``.
Class names: ImageNet-1k's (open_clip's ``IMAGENET_CLASSNAMES``) by default or where an eval set's
classes are WordNet ids, else the eval set's own; ``"kinetics400"``: Kinetics-400's (`data.kinetics`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

__all__ = ["TEMPLATE_SETS", "dataset_templates", "name_or_list_file", "resolve_classnames", "resolve_templates",
           "template_set_name"]

TEMPLATE_SETS = ("openai", "simple", "demo", "kinetics")
CLASSNAME_SETS = ("imagenet", "kinetics400")
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
        from .demo import DEMO_TEMPLATES

        return list(DEMO_TEMPLATES)
    if templates == "kinetics":
        from .kinetics import KINETICS_TEMPLATES

        return list(KINETICS_TEMPLATES)
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
    from .shards import read_dataset_info

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

    if classnames == "kinetics400":
        from .kinetics import KINETICS400_CLASSNAMES

        if dataset_classnames is not None and len(dataset_classnames) != len(KINETICS400_CLASSNAMES):
            raise ValueError(f"classnames 'kinetics400' names Kinetics-400's 400 classes, but the evaluation set has "
                             f"{len(dataset_classnames)}; give its class names in label order instead")
        return list(KINETICS400_CLASSNAMES)
    if classnames == "imagenet":
        if dataset_classnames is not None and len(dataset_classnames) != len(open_clip.IMAGENET_CLASSNAMES):
            # Labels index the eval set's own classes: ImageNet-1k's names would score against the wrong ones.
            raise ValueError(
                f"classnames 'imagenet' names ImageNet-1k's {len(open_clip.IMAGENET_CLASSNAMES)} classes, but the "
                f"evaluation set has {len(dataset_classnames)} ({', '.join(list(dataset_classnames)[:5])}"
                f"{', ...' if len(dataset_classnames) > 5 else ''}); give its class names in label order instead")
        return list(open_clip.IMAGENET_CLASSNAMES)
    if isinstance(classnames, str):
        raise ValueError(f"classnames {classnames!r}: give 'imagenet', 'kinetics400' or a list of names in label "
                         f"order")
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

"""Labels for training: the class names of a shard set, and each batch's labels checked against them.

Labelled shards carry a class index per sample (``KEY.cls``) and list their class names in the shard folder's
``dataset.json`` (``classnames``), as ``python -m data.make_shards`` writes them from an ImageFolder and
``python -m data.demo`` for the demo's shapes. A run that trains with labels reads the class names once
(`shard_classnames`: the head of a student started from scratch gets that many classes, and a head that has
another number is refused) and checks the labels of every batch (`batch_labels`): a sample without a class, or
with one outside the list, stops the run with one line naming its shard and key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from torch import Tensor

from .errors import UserError
from .shards import DATASET_JSON, is_remote, read_dataset_info, resolve_shards

__all__ = ["LabelError", "batch_labels", "check_same_classes", "shard_classnames"]

MAKE_LABELLED = "python -m data.make_shards IMAGEFOLDER OUT writes labelled shards (.cls and the class names)"


class LabelError(UserError, ValueError):
    """Training data whose labels cannot be used (no class names, a sample without a class or outside the list)."""


def shard_classnames(spec, allow_pipe: bool = False, where: str = "data.train") -> list[str]:
    """The class names of the shards ``spec`` (their folders' ``dataset.json``), the same for every folder.

    A folder without ``dataset.json``, or whose ``dataset.json`` lists no ``classnames``, is a `LabelError`
    naming it; so are folders that list different class names."""
    urls = resolve_shards(spec, allow_pipe)
    folders = sorted({os.path.dirname(u) or "." for u in urls if not is_remote(u)})
    if not folders:
        raise LabelError(f"{where}: the shards {urls[0]}... are remote, so their class names cannot be read from "
                         f"a dataset.json beside them; training with labels needs local shards with their "
                         f"dataset.json")
    found: dict[str, list[str]] = {}
    for folder in folders:
        info = read_dataset_info(folder)
        path = Path(folder) / DATASET_JSON
        if info is None:
            raise LabelError(f"{where}: {path} does not exist, so the class names of the shards in {folder} are "
                             f"unknown; {MAKE_LABELLED}")
        names = info.get("classnames")
        if not names:
            raise LabelError(f"{where}: {path} has no 'classnames' (the shards were written without classes); "
                             f"{MAKE_LABELLED}")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise LabelError(f"{where}: {path}'s 'classnames' is not a list of names; re-create the shards")
        found[folder] = names
    first, names = next(iter(found.items()))
    for folder, other in found.items():
        if other != names:
            raise LabelError(f"{where}: {Path(folder) / DATASET_JSON} and {Path(first) / DATASET_JSON} list "
                             f"different 'classnames' ({len(other)} and {len(names)} classes): a class index must "
                             f"mean the same class in every shard; write them with one make_shards call")
    return names


def batch_labels(extras: dict, num_classes: int) -> Tensor:
    """The batch's class indices (``extras["cls"]``, long ``[B]``), each checked to be one of the
    ``num_classes`` classes; the first that is not is a `LabelError` naming its shard and key."""
    labels = extras["cls"]
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0])
        where = f"sample {extras['__key__'][i]!r} of shard {extras['__url__'][i]}"
        if labels[i] < 0:
            raise LabelError(f"{where} has no class (no .cls): training with labels (objective.labels) needs every "
                             f"sample labelled; {MAKE_LABELLED}, or set objective.labels=0")
        raise LabelError(f"{where} has class {int(labels[i])}, outside the {num_classes} classes of its "
                         f"dataset.json 'classnames': the shards' labels and class names do not match; "
                         f"re-create the shards")
    return labels


def check_same_classes(a: Sequence[str], b: Sequence[str], what_a: str, what_b: str) -> None:
    """``a`` and ``b`` name the same classes in the same order (a `LabelError` naming the first difference)."""
    if list(a) == list(b):
        return
    if len(a) != len(b):
        raise LabelError(f"{what_a} has {len(a)} classes and {what_b} {len(b)}: they must be the same classes")
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    raise LabelError(f"{what_a} and {what_b} differ at class {i} ({a[i]!r} against {b[i]!r}): they must be the same "
                     f"classes in the same order")


"""Labelled evaluation sets with class names (zero-shot and linear probe need them).

* ``FolderEvalSet``: an ImageFolder (one sub-folder per class); class names are the folder
  names unless given.
* ``ShardEvalSet``: labelled shards (``cls`` per sample); class names from their
  ``dataset.json`` unless given.

Both yield ``(image_tensor, label)`` and expose ``.classnames``. Every sample is read once, in
order; with several DataLoader workers the shards are divided among them. Evaluation is not
split across ranks: run it on one rank, or on all of them with the same result.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from torchvision.datasets import ImageFolder

from .decode import SkipCounter, decode_sample
from .shards import DATASET_JSON, is_remote, iter_shard, read_dataset_info, resolve_shards, shard_sample_counts


class FolderEvalSet(ImageFolder):
    """``torchvision.datasets.ImageFolder`` with ``.classnames``.

    ``classnames`` replaces the folder names (e.g. ImageNet's ``n01440764`` -> ``"tench"``); it
    must list one name per class folder, in sorted folder order.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 classnames: Sequence[str] | None = None):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"evaluation folder {root} does not exist")
        try:
            super().__init__(str(root), transform=transform)
        except FileNotFoundError as exn:
            raise FileNotFoundError(f"{root} is not an image folder with one sub-folder per class: {exn}") from exn
        if classnames is not None and len(classnames) != len(self.classes):
            raise ValueError(f"{len(classnames)} class names given for the {len(self.classes)} class folders of {root}")
        self.classnames = list(classnames) if classnames is not None else list(self.classes)

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except (OSError, ValueError) as exn:
            raise type(exn)(f"cannot read evaluation image {self.samples[index][0]}: {exn}") from exn


class ShardEvalSet(IterableDataset):
    """Labelled WebDataset shards as ``(image_tensor, label)``, each sample once, shard order.

    Samples that do not decode are skipped and warned about (``skipped`` counts them when
    iterated in this process, i.e. ``num_workers=0``).
    """

    def __init__(self, shards, transform: Callable | None = None, classnames: Sequence[str] | None = None):
        super().__init__()
        self.urls = resolve_shards(shards)
        self.transform = transform
        if classnames is None:
            classnames = _classnames_from_dataset_json(self.urls)
        if classnames is None:
            raise ValueError(
                f"no class names for the shards {self.urls[0]}...: their folder has no {DATASET_JSON} with "
                "'classnames'; pass classnames=[...] (in label order)"
            )
        self.classnames = list(classnames)
        self.skipped = 0
        counts = shard_sample_counts(self.urls)
        self._len = None if any(c is None for c in counts) else sum(counts)

    def __len__(self) -> int:
        if self._len is None:
            raise TypeError("the number of samples of remote shards is unknown (no dataset.json)")
        return self._len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = SkipCounter()
        raw = (s for url in self.urls[worker::num_workers] for s in iter_shard(url))
        try:
            for sample in wds.map(decode_sample, handler=counter)(raw):
                if sample["cls"] < 0:
                    raise ValueError(
                        f"sample {sample['__key__']!r} in shard {sample['__url__']} has no 'cls' label; evaluation "
                        "shards need labels (make them from class folders with python -m data.make_shards)"
                    )
                image = self.transform(sample["image"]) if self.transform else sample["image"]
                yield image, sample["cls"]
        finally:
            self.skipped += counter.count


def _classnames_from_dataset_json(urls: Sequence[str]) -> list[str] | None:
    folders = {os.path.dirname(u) for u in urls if not is_remote(u)}
    names = [(read_dataset_info(f or ".") or {}).get("classnames") for f in sorted(folders)]
    names = [n for n in names if n]
    if names and any(n != names[0] for n in names):
        raise ValueError(f"the shard folders {sorted(folders)} list different class names; pass classnames=")
    return names[0] if names else None


def _is_shard_source(source) -> bool:
    if not isinstance(source, (str, os.PathLike)):
        return True  # a list of shards
    path = Path(source).expanduser()
    if not path.is_dir():
        return True  # a pattern, a URL or a single .tar
    return (path / DATASET_JSON).is_file() or any(path.glob("*.tar"))


def build_eval_loader(source, transform: Callable, batch_size: int = 256, num_workers: int = 4,
                      classnames: Sequence[str] | None = None, pin_memory: bool = False):
    """Loader over an evaluation set; returns ``(loader, classnames)``.

    ``source`` is an ImageFolder root (class sub-folders), or labelled shards (a folder with
    ``.tar`` files / ``dataset.json``, a pattern, or a list). Batches are ``(images [B, 3, H, W],
    labels [B])``; the last batch may be smaller.
    """
    if _is_shard_source(source):
        dataset = ShardEvalSet(source, transform, classnames)
        # More workers than shards would only idle.
        num_workers = min(num_workers, len(dataset.urls))
    else:
        dataset = FolderEvalSet(source, transform, classnames)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=False)
    return loader, dataset.classnames

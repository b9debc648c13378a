"""Labelled evaluation sets with class names (zero-shot and linear probe need them).

* ``FolderEvalSet``: an ImageFolder (one sub-folder per class); class names are the folder
  names unless given.
* ``ShardEvalSet``: labelled shards (``cls`` per sample); class names from their
  ``dataset.json`` unless given.

Both yield ``(image_tensor, label)`` and expose ``.classnames``. Every sample is read once, in
order; with several DataLoader workers the shards are divided among them. Evaluation is not
split across ranks: run it on one rank, or on all of them with the same result.

An image that does not decode (or has more than ``max_pixels`` pixels) is skipped, warned about
and named: the data set yields a ``SkippedSample`` in its place, and ``EvalLoader`` (what
``build_eval_loader`` returns) leaves it out of the batch and records it in ``loader.skipped``
(name -> error), in the main process whatever the number of workers. A shard that turns out
corrupt, or ends before the samples its ``dataset.json`` counts, gives one ``SkippedSample``
per sample it did not deliver (``shard#<unread sample i of n>``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate
from torchvision.datasets import ImageFolder

from .decode import DEFAULT_MAX_PIXELS, DecodeError, SkipCounter, decode_sample, open_image
from .shards import (DATASET_JSON, ShardError, _local, check_command_urls, is_remote, iter_shard, read_dataset_info,
                     resolve_shards, shard_sample_counts, shard_shortfall)


class SkippedSample(NamedTuple):
    """Stands in for a sample that does not decode: ``name`` (file, or ``shard#key``) and ``error``."""

    name: str
    error: str


def _skip(counter: SkipCounter, exn: DecodeError) -> SkippedSample:
    counter(exn)  # warns (the first few, with the whole message) and counts
    counter.drain()
    cause = exn.__cause__
    return SkippedSample(exn.sample_id, f"{type(cause).__name__}: {cause}" if cause is not None else str(exn))


class FolderEvalSet(ImageFolder):
    """``torchvision.datasets.ImageFolder`` with ``.classnames``.

    ``classnames`` replaces the folder names (e.g. ImageNet's ``n01440764`` -> ``"tench"``); it
    must list one name per class folder, in sorted folder order. An image that cannot be read
    (or has more than ``max_pixels`` pixels) gives a ``SkippedSample`` (see the module docstring).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 classnames: Sequence[str] | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS):
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
        self.max_pixels = max_pixels
        self._skips = SkipCounter()

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = open_image(path, self.max_pixels)  # RGB: reads every pixel
        except Exception as exn:  # PIL raises many exception types for bad bytes
            error = DecodeError(f"cannot read evaluation image {path}: {type(exn).__name__}: {exn}", path)
            error.__cause__ = exn
            return _skip(self._skips, error)
        # Outside the try: an error of the transform is a bug to see, not an image to skip.
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


class ShardEvalSet(IterableDataset):
    """Labelled WebDataset shards as ``(image_tensor, label)``, each sample once, shard order.

    Samples that do not decode give a ``SkippedSample`` and are warned about (``skipped`` counts
    them when iterated in this process, i.e. ``num_workers=0``; ``EvalLoader.skipped`` names
    them in any case).
    """

    def __init__(self, shards, transform: Callable | None = None, classnames: Sequence[str] | None = None,
                 allow_pipe: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        super().__init__()
        self.urls = resolve_shards(shards, allow_pipe)
        self.allow_pipe, self.max_pixels = allow_pipe, max_pixels
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
        self.counts = shard_sample_counts(self.urls)
        self._len = None if any(c is None for c in self.counts) else sum(self.counts)

    def __len__(self) -> int:
        if self._len is None:
            raise TypeError("the number of samples of remote shards is unknown (no dataset.json)")
        return self._len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = SkipCounter()
        shards = list(zip(self.urls, self.counts))[worker::num_workers]
        raw = (s for url, count in shards for s in _whole_shard(url, count, counter, self.allow_pipe))
        try:
            for item in raw:
                if isinstance(item, SkippedSample):
                    yield item
                    continue
                try:
                    sample = decode_sample(item, self.max_pixels)
                except DecodeError as exn:
                    yield _skip(counter, exn)
                    continue
                if sample["cls"] < 0:
                    raise ValueError(
                        f"sample {sample['__key__']!r} in shard {sample['__url__']} has no 'cls' label; evaluation "
                        "shards need labels (make them from class folders with python -m data.make_shards)"
                    )
                image = self.transform(sample["image"]) if self.transform else sample["image"]
                yield image, sample["cls"]
        finally:
            self.skipped += counter.count


def _whole_shard(url: str, count: int | None, counter: SkipCounter, allow_pipe: bool) -> Iterator:
    """The raw samples of a shard, then a ``SkippedSample`` for each of the ``count`` it should hold
    that it did not deliver (a corrupt member header, a cut, fewer samples than listed), warned about."""
    read = 0
    try:
        for read, sample in enumerate(iter_shard(url, allow_pipe), 1):
            yield sample
        if count is None or read >= count:
            return
        error = shard_shortfall(url, read, count)
    except (ShardError, FileNotFoundError) as exn:
        error = exn
    counter.bad_shard(url, error, max(0, count - read) if count is not None else 1)
    counter.drain_bad_shards()
    for name in counter.drain():
        yield SkippedSample(name, str(error))


def _classnames_from_dataset_json(urls: Sequence[str]) -> list[str] | None:
    folders = {os.path.dirname(u) for u in urls if not is_remote(u)}
    names = [(read_dataset_info(f or ".") or {}).get("classnames") for f in sorted(folders)]
    names = [n for n in names if n]
    if names and any(n != names[0] for n in names):
        raise ValueError(f"the shard folders {sorted(folders)} list different class names; pass classnames=")
    return names[0] if names else None


_PATTERN_CHARS = "{*?["


def check_eval_source(source, what: str = "evaluation data", allow_pipe: bool = False) -> None:
    """Fail early, naming ``source``, when it cannot be an evaluation set: a local path that does
    not exist (and is no shard pattern), a file that is not a ``.tar`` shard, or a ``pipe:`` URL
    without ``allow_pipe``. Cheap: no image is read (``build_eval_loader`` checks the rest)."""
    sources = source if isinstance(source, (list, tuple)) else [source]
    if not sources:
        raise ValueError(f"{what}: an empty list of shards")
    for src in sources:
        if not isinstance(src, (str, os.PathLike)):
            raise ValueError(f"{what}: {src!r} is not a path; give an ImageFolder root or labelled shards")
        check_command_urls([os.fspath(src)], allow_pipe, what)
        if is_remote(os.fspath(src)):
            continue
        path = Path(_local(os.fspath(src))).expanduser()
        if path.is_file() and not path.name.endswith(".tar"):
            raise ValueError(f"{what} {src} is a file but not a .tar shard: give an ImageFolder root (one sub-folder "
                             "per class) or labelled shards (a folder of .tar files with dataset.json, a pattern, "
                             "or a list)")
        if not path.exists() and not any(c in os.fspath(src) for c in _PATTERN_CHARS):
            raise FileNotFoundError(f"{what} {src} does not exist: give an ImageFolder root (one sub-folder per "
                                    "class) or labelled shards (a folder of .tar files with dataset.json, a "
                                    "pattern, or a list)")


def _is_shard_source(source) -> bool:
    if not isinstance(source, (str, os.PathLike)):
        return True  # a list of shards
    path = Path(source).expanduser()
    if not path.is_dir():
        return True  # a pattern, a URL or a single .tar
    return (path / DATASET_JSON).is_file() or any(path.glob("*.tar"))


def _collate_skipping(batch: list) -> tuple:
    """``default_collate`` of the good samples, and the ``SkippedSample``s apart."""
    skipped = [s for s in batch if isinstance(s, SkippedSample)]
    good = [s for s in batch if not isinstance(s, SkippedSample)]
    return (default_collate(good) if good else None), skipped


class EvalLoader(DataLoader):
    """A ``DataLoader`` of ``(images, labels)`` batches that leaves out samples that do not decode.

    ``skipped`` maps each one's name (image file or ``shard#key``) to its error; iterating again
    (e.g. for a few pictures) names the same samples once.
    """

    def __init__(self, dataset, **kwargs):
        super().__init__(dataset, collate_fn=_collate_skipping, **kwargs)
        self.skipped: dict[str, str] = {}

    def __iter__(self):
        for batch, skipped in super().__iter__():
            self.skipped.update((s.name, s.error) for s in skipped)
            if batch is not None:  # a batch of nothing but unreadable samples yields nothing
                yield batch

    def skipped_report(self) -> list[dict[str, str]]:
        """``[{"name": ..., "error": ...}]`` of the samples skipped so far, for a report."""
        return [{"name": name, "error": error} for name, error in self.skipped.items()]


def eval_dataset(source, transform: Callable | None = None, classnames: Sequence[str] | None = None,
                 allow_pipe: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """The ``FolderEvalSet`` or ``ShardEvalSet`` of ``source`` (see ``build_eval_loader``)."""
    check_eval_source(source, allow_pipe=allow_pipe)
    if _is_shard_source(source):
        return ShardEvalSet(source, transform, classnames, allow_pipe, max_pixels)
    return FolderEvalSet(source, transform, classnames, max_pixels)


def iter_eval_samples(dataset) -> Iterator:
    """Every sample of an evaluation set in order, in this process: ``(image, label)`` or ``SkippedSample``."""
    if isinstance(dataset, IterableDataset):
        return iter(dataset)
    return (dataset[i] for i in range(len(dataset)))


def build_eval_loader(source, transform: Callable, batch_size: int = 256, num_workers: int = 4,
                      classnames: Sequence[str] | None = None, pin_memory: bool = False, allow_pipe: bool = False,
                      max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Loader over an evaluation set; returns ``(loader, classnames)``.

    ``source`` is an ImageFolder root (class sub-folders), or labelled shards (a folder with
    ``.tar`` files / ``dataset.json``, a pattern, or a list). Batches are ``(images [B, 3, H, W],
    labels [B])``; the last batch may be smaller, and so may one that held samples that do not
    decode (``loader.skipped`` names them). ``allow_pipe`` lets ``pipe:`` shard URLs run their
    commands (``data.shards.resolve_shards``); images above ``max_pixels`` are skipped.
    """
    dataset = eval_dataset(source, transform, classnames, allow_pipe, max_pixels)
    if isinstance(dataset, ShardEvalSet):
        num_workers = min(num_workers, len(dataset.urls))  # more workers than shards would only idle
    loader = EvalLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=False)
    return loader, dataset.classnames


def first_images(shards, transform: Callable, limit: int, allow_pipe: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, labels: bool = False):
    """The first ``limit`` images of ``shards`` in shard order, transformed and stacked, with the
    ``shard#key`` of each (a run's fixed held-out set), and with ``labels`` their classes too (long, -1 where
    a sample has none). Images that do not decode are left out with a warning; a shard that turns out
    unreadable raises ``ShardError``."""

    def load(raw):
        sample = decode_sample(raw, max_pixels)
        return transform(sample["image"]), sample

    return first_decoded(shards, load, limit, allow_pipe, labels, DecodeError, "no images that decode")


def first_decoded(shards, load: Callable, limit: int, allow_pipe: bool, labels: bool, skip: type,
                  nothing: str):
    """The held-out set of any media: the first ``limit`` samples of ``shards`` that ``load(raw) -> (tensor,
    sample)`` gives, stacked, with their ``shard#key`` (and with ``labels`` their classes, -1 where none); a
    sample whose ``load`` raises ``skip`` is left out with a warning, and none at all is a ValueError saying
    the shards hold ``nothing``."""
    tensors, keys, classes = [], [], []
    counter = SkipCounter()
    for url in resolve_shards(shards, allow_pipe):
        for raw in iter_shard(url, allow_pipe):
            try:
                tensor, sample = load(raw)
            except skip as exn:
                counter(exn)
                continue
            tensors.append(tensor)
            keys.append(f"{url}#{sample['__key__']}")
            classes.append(sample["cls"])
            if len(tensors) >= limit:
                break
        if len(tensors) >= limit:
            break
    if not tensors:
        raise ValueError(f"the held-out shards {shards} hold {nothing}")
    stacked = torch.stack(tensors)
    return (stacked, keys, torch.tensor(classes, dtype=torch.long)) if labels else (stacked, keys)

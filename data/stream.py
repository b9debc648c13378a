"""The training stream: WebDataset shards -> augmented, fixed-size batches, one loader per rank.

Build one loader per rank with ``build_train_loader`` and move batches to the device yourself;
never give it to ``accelerator.prepare()`` (accelerate would re-shard or dispatch an iterable
dataset on top of the split done here, see the ecosystem notes).

Equal epochs on every rank
--------------------------
Distributed training hangs at the end of an epoch when one rank runs fewer steps than
another, so every rank yields exactly ``len(loader)`` full batches per epoch:

* ``resampled=False`` (default, exact): an epoch is a pass over the shards in an order that
  is shuffled per epoch with ``seed`` (the same order on every rank). The sample counts of the
  shards (``dataset.json``, img2dataset's ``*_stats.json``, or the tar headers) make this
  order one long sequence of samples, which is cut into contiguous, disjoint ranges: one per
  rank of ``len(loader) * batch_size`` samples, and within a rank one per DataLoader worker
  of whole batches. A range may start or end inside a shard (the leading samples of such a
  shard are read and dropped, not decoded). So ranks and workers see distinct samples, and
  with ``N`` samples per epoch each rank gets ``N // (world_size * batch_size)`` batches; the
  at most ``world_size * batch_size - 1`` samples left over are dropped — a different few
  every epoch, because the shard order changes. ``epoch_samples`` larger than the dataset
  wraps around (some samples twice per epoch); smaller takes a prefix of the shuffled order.
* ``resampled=True``: every rank and worker draws shards at random (with replacement, seeded
  by ``seed``, epoch, rank and worker, so streams differ) and stops after exactly its share
  of ``epoch_samples`` — webdataset's ``with_epoch``, with the share computed here so that
  ranks agree. Needs no sample counts when ``epoch_samples`` is given.

A sample that does not decode (or has more than ``max_pixels`` pixels) is skipped, counted and
named in a warning; so are the samples a shard did not deliver because it broke off (a corrupt
member header, a cut) or held fewer than its sample count says. So that a rank
still produces its full count of batches, a worker that comes up short re-uses recently
decoded samples of its own (with fresh augmentation) to fill its last batches;
``loader.stats`` reports how many samples were skipped and how many were filled in.

Cached teacher targets (``targets=``, a ``data.targets.TargetStore``): every image shard is
read side by side with its target shard (so a rank or worker reads only the target shards
of its own image shards), each image becomes the stored view of this epoch (``(epoch +
offset) % K``, rendered with ``transform.apply``) and its target rides in the batch.
"""

from __future__ import annotations

import bisect
import functools
import os
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from .decode import DEFAULT_MAX_PIXELS, SkipCounter, decode_sample
from .shards import (ShardError, is_remote, iter_segments, iter_shard, read_dataset_info, resolve_shards,
                     shard_sample_counts, shard_shortfall)
from .targets import TargetsError


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the arguments when given, else torch.distributed when
    initialised, else the ``RANK``/``WORLD_SIZE`` environment variables, else ``(0, 1)``."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            env_rank, env_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            env_rank, env_world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in range for world_size {world_size}")
    return rank, world_size


def batches_per_rank(epoch_samples: int, world_size: int, batch_size: int) -> int:
    """Full batches each rank yields in an epoch of ``epoch_samples`` samples (all ranks)."""
    n = epoch_samples // (world_size * batch_size)
    if n < 1:
        raise ValueError(
            f"an epoch of {epoch_samples} samples cannot give each of {world_size} rank(s) one full batch "
            f"of {batch_size}: lower batch_size, or use more data / a larger epoch_samples"
        )
    return n


def worker_share(num_batches: int, worker: int, num_workers: int) -> tuple[int, int]:
    """``(first_batch, n_batches)`` of a rank's ``num_batches`` that DataLoader worker ``worker``
    produces; the workers' shares differ by at most one batch and add up to ``num_batches``."""
    base, extra = divmod(num_batches, num_workers)
    return worker * base + min(worker, extra), base + (worker < extra)


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The shard order of an epoch: identical on every rank (it depends on seed and epoch only)."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def plan_segments(counts: Sequence[int], order: Sequence[int], start: int, length: int) -> list[tuple[int, int, int]]:
    """Cut samples ``[start, start + length)`` of the sequence formed by the shards in ``order``
    (wrapping around at its end) into ``(shard_index, first, stop)`` pieces."""
    sizes = [counts[i] for i in order]
    total = sum(sizes)
    if total == 0:
        raise ValueError("the shards hold no samples")
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    out, pos, left = [], start % total, length
    while left > 0:
        # bisect_right skips empty shards: they share their offset with the next shard.
        j = bisect.bisect_right(offsets, pos) - 1
        first = pos - offsets[j]
        take = min(sizes[j] - first, left)
        out.append((order[j], first, first + take))
        left -= take
        pos = (pos + take) % total
    return out


def check_max_size(urls: Sequence[str], size: Sequence[int] | None) -> None:
    """Refuse shards that ``make_shards --max-size`` shrank below the views' ``size`` (their
    dataset.json's ``max_size``, the shorter side): every full-image view would enlarge them."""
    if not size:
        return
    for folder in sorted({os.path.dirname(u) for u in urls if not is_remote(u)}):
        max_size = (read_dataset_info(folder or ".") or {}).get("max_size")
        if max_size is not None and int(max_size) < max(size):
            raise ValueError(f"the shards in {folder} were re-encoded to a shorter side of {max_size} px (make_shards "
                             f"--max-size), below this run's {max(size)} px views: make them again from the originals "
                             f"with --max-size {max(size)} or more")


@dataclass
class LoaderStats:
    """What the main process learned from the batches of a loader (all epochs so far)."""

    skipped: int = 0  #: samples that did not decode
    padded: int = 0  #: samples re-used to fill the batches of workers that came up short
    skipped_samples: list[str] = field(default_factory=list)  #: ``"shard#key"`` of each skip
    bad_shards: list[str] = field(default_factory=list)  #: shards that became unreadable mid-epoch

    def update(self, extras: dict) -> None:
        self.skipped += len(extras["skipped"])
        self.skipped_samples.extend(extras["skipped"])
        self.padded += int(extras["padded"])
        self.bad_shards.extend(extras.get("bad_shards", []))


class TrainStream(IterableDataset):
    """The per-rank training pipeline (an ``IterableDataset`` of ready batches).

    Runs inside each DataLoader worker: choose this worker's samples (see the module doc),
    shuffle raw samples in a buffer, decode (skip and count failures), fill up to the exact
    sample count, augment, batch. Yields ``(images [B, 3, H, W], extras)``; see
    ``build_train_loader`` for ``extras``.
    """

    def __init__(self, urls: Sequence[str], counts: Sequence[int] | None, transform: Callable, batch_size: int,
                 num_batches: int, rank: int, world_size: int, resampled: bool, shuffle_buffer: int, seed: int,
                 shardshuffle: bool, targets=None, allow_pipe: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        super().__init__()
        self.urls, self.counts, self.transform = list(urls), counts, transform
        # data.targets.TargetStore or None: cached teacher targets read beside the image shards.
        self.targets = targets
        self._read = functools.partial(iter_shard, allow_pipe=allow_pipe) if targets is None else targets.iter_shard
        self.max_pixels = max_pixels
        self.batch_size, self.num_batches = batch_size, num_batches
        self.rank, self.world_size = rank, world_size
        self.resampled, self.shuffle_buffer, self.seed, self.shardshuffle = resampled, shuffle_buffer, seed, shardshuffle
        self.epoch = 0  # set by TrainLoader before the workers start (they get a copy)
        # A transform that renders uint8 views (ReplayableTrainTransform.render) is normalised a batch at a time,
        # or by the consumer (uint8_batches, set by build_train_loader).
        self._render = getattr(transform, "render", None) if hasattr(transform, "normalize") else None
        self.uint8_batches = False

    def worker_plan(self, worker: int, num_workers: int) -> tuple[int, list[tuple[int, int, int]] | None]:
        """``(n_samples, segments)`` for one worker this epoch; segments is None when resampling."""
        first, n_batches = worker_share(self.num_batches, worker, num_workers)
        n = n_batches * self.batch_size
        if self.resampled or n == 0:
            return n, None
        order = shard_order(len(self.urls), self.seed, self.epoch, self.shardshuffle)
        start = (self.rank * self.num_batches + first) * self.batch_size
        return n, plan_segments(self.counts, order, start, n)

    def _resampled_source(self, worker: int, counter: SkipCounter) -> Iterator[dict]:
        rng = random.Random(f"resample:{self.seed}:{self.epoch}:{self.rank}:{worker}")
        empty = 0
        while True:
            n = 0
            index = rng.randrange(len(self.urls))
            url, count = self.urls[index], self.counts[index] if self.counts else None
            try:
                for n, sample in enumerate(self._read(url), 1):
                    yield sample
                if count is not None and n < count:  # a whole tar file short of its listed samples
                    raise shard_shortfall(url, n, count)
            except (ShardError, FileNotFoundError) as exn:
                counter.bad_shard(url, exn, max(0, count - n) if count is not None else 0)
            # Guard against spinning forever on shards that are all empty.
            empty = empty + 1 if n == 0 else 0
            if empty > 10 * len(self.urls) + 10:
                raise ValueError(f"the shards {self.urls[:3]}... hold no samples")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n, segments = self.worker_plan(worker, num_workers)
        if n == 0:
            return
        # A shard that turns bad mid-run is skipped (its samples counted), like an undecodable sample.
        counter = SkipCounter()
        raw = (self._resampled_source(worker, counter) if segments is None else
               iter_segments(self.urls, segments, self._read, on_bad_shard=counter.bad_shard))
        if self.shuffle_buffer > 1:
            seed = f"buffer:{self.seed}:{self.epoch}:{self.rank}:{worker}"
            raw = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, seed=seed)(raw)
        decoded = wds.map(self._decode, handler=counter)(raw)
        yield from self._batches(_exactly(decoded, n, self.batch_size, where=f"rank {self.rank} worker {worker}"),
                                 counter)

    def _decode(self, raw: dict) -> dict:
        # An image that does not decode (or is too large) is skipped before its target is read; a transform that
        # decodes JPEGs itself (at the size its view needs) gets their bytes.
        sample = decode_sample(raw, self.max_pixels, lazy=getattr(self.transform, "lazy", False))
        if self.targets is not None:
            sample["targets"] = self.targets.decode(raw)
        # Rendered here, where a JPEG that turns out not to decode is skipped and counted like any other.
        sample["view"] = self._view(sample)
        return sample

    def _view(self, sample: dict) -> tuple[torch.Tensor, dict | None]:
        """The augmented image (before normalisation, where the transform renders views), and with
        cached targets the target of the view it replays."""
        if self.targets is None:
            if self._render is None:
                return self.transform(sample["image"]), None
            return self._render(sample["image"], self.transform.draw(sample["image"])), None
        cached = sample["targets"]
        view = self.targets.view_index(self.epoch, sample["__key__"])
        image = (self.transform.apply if self._render is None else self._render)(sample["image"], cached["views"][view])
        return image, {"view": view, "embed": cached["embed"][view],
                       "tokens": None if cached["tokens"] is None else cached["tokens"][view]}

    def _batches(self, samples: Iterator[tuple[dict, bool]], counter: SkipCounter) -> Iterator[tuple[torch.Tensor, dict]]:
        batch = []
        for sample, padded in samples:
            # A sample re-used to fill the batch gets a fresh view (it decoded before).
            image, target = sample.pop("view") if "view" in sample else self._view(sample)
            batch.append((image, sample, padded, target))
            if len(batch) == self.batch_size:
                images = self._stacked(batch)
                extras = {
                    "__key__": [b[1]["__key__"] for b in batch],
                    "__url__": [b[1]["__url__"] for b in batch],
                    "cls": torch.tensor([b[1]["cls"] for b in batch], dtype=torch.long),
                    "txt": [b[1]["txt"] for b in batch],
                    # Read at batch time: every skip before this batch is shipped with it.
                    "skipped": counter.drain(),
                    "bad_shards": counter.drain_bad_shards(),
                    "padded": sum(b[2] for b in batch),
                }
                if self.targets is not None:
                    extras["view"] = torch.tensor([b[3]["view"] for b in batch], dtype=torch.long)
                    extras["target"] = torch.stack([b[3]["embed"] for b in batch])
                    if self.targets.tokens:
                        extras["target_tokens"] = torch.stack([b[3]["tokens"] for b in batch])
                yield images, extras
                batch = []


    def _stacked(self, batch: list) -> torch.Tensor:
        """The batch's images as one tensor. In a DataLoader worker it is made in shared memory, where the
        DataLoader would otherwise copy it to send it; uint8 views are normalised into their places in it
        (no float copy of each view to stack, and each view's passes stay in the CPU's cache), or sent as
        they are with ``uint8_batches``."""
        views = [b[0] for b in batch]
        as_is = self._render is None or self.uint8_batches
        if as_is and torch.utils.data.get_worker_info() is None:
            return torch.stack(views)
        images = torch.empty((len(views), *views[0].shape), dtype=views[0].dtype if as_is else torch.float32)
        if torch.utils.data.get_worker_info() is not None:
            images.share_memory_()
        if as_is:
            return torch.stack(views, out=images)
        for slot, view in zip(images, views):
            self.transform.normalize(view, out=slot)
        return images


def _without_worker_traceback(exn: Exception) -> Exception:
    """A worker's exception as DataLoader re-raises it carries the worker's traceback in its message
    ("Caught X in DataLoader worker process 0. Original Traceback ..."): the same type with the
    original one-line message, for errors whose message is meant for the user."""
    text = str(exn)
    if "\nOriginal Traceback" not in text:
        return exn
    last = text.rstrip().splitlines()[-1]
    return type(exn)(last.split(": ", 1)[1] if ": " in last else last)


def _exactly(samples: Iterator[dict], n: int, keep: int, where: str) -> Iterator[tuple[dict, bool]]:
    """Yield exactly ``n`` samples as ``(sample, padded)``: those of ``samples``, then — when
    skipped samples left it short — the last ``keep`` good ones again, so that every rank keeps
    its batch count."""
    recent: deque = deque(maxlen=max(1, keep))
    source, got = iter(samples), 0
    while got < n:  # checked before pulling, so an endless (resampled) source is not over-read
        sample = next(source, None)
        if sample is None:
            break
        recent.append(sample)
        got += 1
        yield sample, False
    if got < n and not recent:
        raise RuntimeError(f"{where}: none of its samples could be decoded; check the shards")
    for j in range(n - got):
        yield recent[j % len(recent)], True


class TrainLoader:
    """Iterates one rank's batches, ``len(loader)`` of them per epoch (equal on all ranks).

    Each ``iter()`` is one epoch; the epoch number (which reshuffles shards and buffers) counts
    up by itself and can be set with ``set_epoch`` (e.g. when resuming). ``stats`` collects the
    skipped/filled-in counts that workers ship with their batches.
    """

    def __init__(self, dataset: TrainStream, num_workers: int, pin_memory: bool = False,
                 prefetch_factor: int | None = None):
        self.dataset, self.num_workers = dataset, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.batch_size, self.rank, self.world_size = dataset.batch_size, dataset.rank, dataset.world_size
        self.stats = LoaderStats()
        self.epoch = 0

    def __len__(self) -> int:
        return self.dataset.num_batches

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """A batch's float images: with ``uint8_batches`` the transform's normalisation of its uint8
        views, on the device they are on (the numbers it gives without); otherwise ``images``."""
        return self.dataset.transform.normalize(images) if self.dataset.uint8_batches else images

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        return self.dataset.num_batches * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` run epoch ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        self.dataset.epoch = self.epoch
        self.epoch += 1
        # Non-persistent workers: each epoch's workers are started with the new epoch number.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None)
        count = 0
        try:
            for images, extras in loader:
                self.stats.update(extras)
                count += 1
                yield images, extras
        except TargetsError as exn:  # raised in a worker: its message, without the worker's traceback
            raise _without_worker_traceback(exn) from None
        if count != len(self):  # cannot happen by construction; would hang distributed training
            raise RuntimeError(f"rank {self.rank} produced {count} batches instead of {len(self)}")


def build_train_loader(
    shards,
    transform: Callable,
    batch_size: int,
    num_workers: int = 4,
    epoch_samples: int | None = None,
    resampled: bool = False,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    shardshuffle: bool = True,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    targets=None,
    allow_pipe: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    make_stream: Callable[..., TrainStream] = TrainStream,
    uint8_batches: bool = False,
) -> TrainLoader:
    """Build the training loader of one rank.

    Args:
        shards: anything ``resolve_shards`` takes (brace pattern, glob, folder, list).
        transform: PIL image -> tensor ``[3, H, W]`` (e.g. ``data.transforms.train_transform``).
        batch_size: samples per batch on this rank; every batch is full.
        num_workers: DataLoader worker processes (0: decode in this process).
        epoch_samples: samples per epoch summed over all ranks. Default: the dataset size
            (required with ``resampled=True`` when shard sample counts are unknown).
        resampled: draw shards with replacement (for streams with no notion of a pass);
            without it each epoch is an exact pass (see the module doc).
        shuffle_buffer: raw samples held for shuffling per worker (0 or 1: no shuffling).
        seed: seeds shard order, shuffle buffers and resampling (same on every rank).
        rank, world_size: default to torch.distributed, else the RANK/WORLD_SIZE environment.
        shardshuffle: shuffle the shard order every epoch.
        pin_memory, prefetch_factor: passed to the DataLoader.
        targets: a ``data.targets.TargetStore`` (cached teacher targets, made for these shards):
            each image is the view of this epoch that the cache stores, rendered with
            ``transform.apply`` (a ``ReplayableTrainTransform``), and the batch carries its target.
        allow_pipe: let ``pipe:`` shard URLs run their shell commands (see ``resolve_shards``).
        max_pixels: images with more pixels are skipped and counted before decoding (None: no limit).
        make_stream: builds the per-rank ``TrainStream`` from its arguments (the video stream,
            ``data.video_stream``, passes a subclass that decodes clips).
        uint8_batches: yield the views as uint8, to be normalised where they are used:
            ``loader.normalize(images.to(device))`` gives the float batch, bit for bit. A worker
            then sends a quarter of the bytes and does not normalise (a ``ReplayableTrainTransform``
            only).

    Returns:
        A ``TrainLoader``; iterating it gives ``(images, extras)`` with ``images`` a float tensor
        ``[batch_size, 3, H, W]`` (uint8 with ``uint8_batches``) and ``extras`` a dict of ``__key__`` and ``__url__`` (lists of
        str), ``cls`` (long tensor, -1 where a sample has no class), ``txt`` (list of captions,
        ``""`` where none), ``skipped`` (``"shard#key"`` of the samples that failed to decode since
        that worker's previous batch) and ``padded`` (int, re-used samples in this batch). With
        ``targets`` also ``target`` (float32 ``[batch_size, D]``), ``view`` (long, the view index of
        each image) and, when the cache has tokens, ``target_tokens`` (``[batch_size, L, width]``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if uint8_batches and not (hasattr(transform, "render") and hasattr(transform, "normalize")):
        raise TypeError("uint8_batches needs a transform that renders uint8 views and normalises them (a data."
                        f"transforms.ReplayableTrainTransform), got {type(transform).__name__}")
    if targets is not None and not hasattr(transform, "apply"):
        raise TypeError("cached targets replay their views: the transform must be a data.transforms."
                        f"ReplayableTrainTransform (teacher.train_transform() gives one), got {type(transform).__name__}")
    rank, world_size = dist_info(rank, world_size)
    urls = resolve_shards(shards, allow_pipe)
    check_max_size(urls, getattr(transform, "size", None))
    counts = None
    if not resampled or epoch_samples is None:
        counts = shard_sample_counts(urls)
        unknown = [u for u, c in zip(urls, counts) if c is None]
        if unknown:
            raise ValueError(
                f"the sample count of {len(unknown)} shard(s) is unknown (e.g. {unknown[0]}"
                f"{', a remote shard' if is_remote(unknown[0]) else ''}): put a dataset.json with per-shard "
                "counts next to them (data.make_shards writes one), or use resampled=True with epoch_samples"
            )
    if epoch_samples is None:
        epoch_samples = sum(counts)
    num_batches = batches_per_rank(epoch_samples, world_size, batch_size)
    dataset = make_stream(urls, counts, transform, batch_size, num_batches, rank, world_size, resampled,
                          shuffle_buffer, seed, shardshuffle, targets, allow_pipe, max_pixels)
    dataset.uint8_batches = uint8_batches
    return TrainLoader(dataset, num_workers, pin_memory, prefetch_factor)

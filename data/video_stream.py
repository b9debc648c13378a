"""Video shards as training batches and evaluation sets of clips.

* ``build_video_train_loader``: the training stream of ``data.stream`` (equal batch counts on every
  rank, exact passes or resampling, skip-and-fill, cached targets) over video shards; batches are
  ``(clips [B, T, 3, H, W], extras)`` with ``extras`` as for images (``__key__``, ``__url__``, ``cls``,
  ``txt``, ``skipped``, ``padded``; with cached targets ``target``, ``view``, ``target_tokens``) plus
  ``frames`` (long ``[B, T]``: the frame indices of each clip).
* ``VideoEvalSet`` / ``build_video_eval_loader``: every video once, in order, as
  ``{"video": [V, T, 3, H, W], "cls": int, "txt": str, "__key__": str}`` (V = clips x crops views).

A video that does not decode, has no video stream, an unsupported codec, or fewer frames than a
clip needs is skipped, counted and named like a corrupt image (``loader.stats`` in training,
``loader.skipped`` in evaluation). When every video a worker (or an evaluation set) reads was
skipped the error says why, e.g. that the clip is longer than every video.

Raw videos are held in the shuffle buffer before decoding: keep ``shuffle_buffer`` to what fits
in memory (video samples are megabytes, not kilobytes).
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from typing import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset

from .decode import SkipCounter
from .evalsets import EvalLoader, SkippedSample, _classnames_from_dataset_json
from .shards import DATASET_JSON, is_remote, iter_shard, read_dataset_info, resolve_shards, shard_sample_counts
from .stream import TrainLoader, TrainStream, build_train_loader
from .video import VideoBackend, VideoDecodeError, decode_video_sample, video_backend
from .video_transforms import ClipEvalTransform, ClipSampling, ReplayableClipTransform


def skip_summary(reasons: Counter, sampling: ClipSampling, longest: int | None = None) -> str:
    """Why every video was skipped, and the fix, in one sentence."""
    total = sum(reasons.values())
    if reasons["too_short"] == total:
        has = f"the longest has {longest} frames, " if longest is not None else ""
        return (f"all {total} videos are shorter than {sampling.describe()} ({has}a clip needs {sampling.needed}): "
                f"use fewer frames{' or a smaller stride' if sampling.mode == 'stride' else ''}")
    if reasons["no_video_member"] == total:
        return (f"none of the {total} samples holds a video: these are not video shards (make them with python -m "
                "data.make_shards VIDEO_FOLDER OUT)")
    parts = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in reasons.most_common())
    return f"all {total} videos were skipped ({parts}); see the warnings above for each one"


def check_clip_fits(urls: Sequence[str], sampling: ClipSampling) -> None:
    """Fail before reading any video when the shards' ``dataset.json`` (written by ``data.make_shards``)
    says that no video has the frames a clip needs."""
    longest = None
    for folder in sorted({os.path.dirname(u) for u in urls if not is_remote(u)}):
        frames = ((read_dataset_info(folder or ".") or {}).get("video") or {}).get("max_frames")
        if frames is None:
            return  # unknown for some shards: the stream finds out
        longest = max(longest or 0, int(frames))
    if longest is not None and longest < sampling.needed:
        raise ValueError(f"{sampling.describe()} needs {sampling.needed} frames but the longest video in "
                         f"{urls[0]}{' ...' if len(urls) > 1 else ''} has {longest} (its {DATASET_JSON}): use fewer "
                         f"frames{' or a smaller stride' if sampling.mode == 'stride' else ''}")


class VideoTrainStream(TrainStream):
    """``data.stream.TrainStream`` over video shards: samples are clips ``[T, 3, H, W]``.

    A video is opened and only the frames of its clip are decoded (in the DataLoader worker); the
    clip's crop and flip are drawn when it is rendered, so a video re-used to fill a short worker's
    last batch gets a fresh crop. With cached targets the clip is the stored view of this epoch.
    """

    def __init__(self, *args, backend: VideoBackend, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        self._reasons: Counter = Counter()
        self._longest = 0
        self._decoded = 0

    def _decode(self, raw: dict) -> dict:
        try:
            sample = decode_video_sample(raw, self.backend)
            with sample.pop("video") as video:
                info = video.info
                self._longest = max(self._longest, info.num_frames)
                if self.targets is None:
                    self.transform.sampling.check(info.num_frames, video.name)
                    frames = self.transform.sampling.train_indices(info.num_frames)
                else:
                    cached = self.targets.decode(raw)
                    view = self.targets.view_index(self.epoch, sample["__key__"])
                    sample["targets"] = {"view": view, "embed": cached["embed"][view],
                                         "tokens": None if cached["tokens"] is None else cached["tokens"][view]}
                    sample["params"] = cached["views"][view]
                    frames = sample["params"]["frames"]
                sample["clip"] = video.get_frames(frames)
        except VideoDecodeError as exn:
            self._reasons[exn.reason] += 1
            raise
        sample["info"], sample["frames"] = info, frames
        self._decoded += 1
        return sample

    def _view(self, sample: dict) -> tuple[torch.Tensor, dict | None]:
        if self.targets is None:
            params = {"frames": sample["frames"], **self.transform.image_transform.draw(sample["info"])}
            return self.transform.apply(sample["clip"], params), None
        return self.transform.apply(sample["clip"], sample["params"]), sample["targets"]

    def _batches(self, samples, counter: SkipCounter):
        # The frame indices of each clip ride along (a check, and what a cache of video targets stores).
        held = []

        def remember(source):
            for sample, padded in source:
                held.append(sample["frames"])
                yield sample, padded

        for clips, extras in super()._batches(remember(samples), counter):
            extras["frames"] = torch.tensor(held[:len(clips)], dtype=torch.long)
            del held[:len(clips)]
            yield clips, extras

    def __iter__(self):
        self._reasons, self._longest, self._decoded = Counter(), 0, 0
        try:
            yield from super().__iter__()
        except RuntimeError as exn:
            if self._decoded or not self._reasons:
                raise
            raise RuntimeError(f"{exn}: {skip_summary(self._reasons, self.transform.sampling, self._longest)}") from None


def build_video_train_loader(shards, transform: ReplayableClipTransform, batch_size: int, num_workers: int = 4,
                             backend: str | VideoBackend = "auto", shuffle_buffer: int = 64, **kwargs) -> TrainLoader:
    """The training loader of one rank over video shards: ``build_train_loader``'s arguments and behaviour
    (see ``data.stream``), with a ``ReplayableClipTransform`` and a video ``backend`` (a name for
    ``data.video.video_backend`` or a backend). Batches are ``(clips [B, T, 3, H, W], extras)``; see the
    module docstring for ``extras``.

    Raises:
        ValueError: the shards' ``dataset.json`` says every video is shorter than a clip (naming the fix).
    """
    if not isinstance(transform, ReplayableClipTransform):
        raise TypeError("video training needs a data.video_transforms.ReplayableClipTransform (frame sampling + "
                        f"the teacher's train_transform()), got {type(transform).__name__}")
    check_clip_fits(resolve_shards(shards), transform.sampling)
    backend = video_backend(backend) if isinstance(backend, str) else backend
    return build_train_loader(shards, transform, batch_size, num_workers, shuffle_buffer=shuffle_buffer,
                              make_stream=functools.partial(VideoTrainStream, backend=backend), **kwargs)


class VideoEvalSet(IterableDataset):
    """Video shards as evaluation samples, each once, in shard order (DataLoader workers split the shards).

    Yields ``{"video": [V, T, 3, H, W], "cls": int, "txt": str, "__key__": str}`` (``transform``: a
    ``ClipEvalTransform``), or a ``SkippedSample`` for a video that cannot be used.
    ``require_labels`` (zero-shot, linear probe) refuses samples without ``cls``; retrieval sets
    need captions only. ``classnames`` default to the shards' ``dataset.json`` (None if it has none).
    """

    def __init__(self, shards, transform: ClipEvalTransform, classnames: Sequence[str] | None = None,
                 require_labels: bool = True, backend: str | VideoBackend = "auto"):
        super().__init__()
        self.urls = resolve_shards(shards)
        self.transform, self.require_labels = transform, require_labels
        self.backend = video_backend(backend) if isinstance(backend, str) else backend
        check_clip_fits(self.urls, transform.sampling)
        if classnames is None:
            classnames = _classnames_from_dataset_json(self.urls)
        if classnames is None and require_labels:
            raise ValueError(f"no class names for the video shards {self.urls[0]}...: their folder has no "
                             f"{DATASET_JSON} with 'classnames'; pass classnames=[...] (in label order)")
        self.classnames = None if classnames is None else list(classnames)
        counts = shard_sample_counts(self.urls)
        self._len = None if any(c is None for c in counts) else sum(counts)

    def __len__(self) -> int:
        if self._len is None:
            raise TypeError("the number of samples of remote shards is unknown (no dataset.json)")
        return self._len

    def __iter__(self) -> Iterator[dict | SkippedSample]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = SkipCounter()
        for raw in (s for url in self.urls[worker::num_workers] for s in iter_shard(url)):
            try:
                sample = decode_video_sample(raw, self.backend)
                with sample.pop("video") as video:
                    views = self.transform(video)
            except VideoDecodeError as exn:
                counter(exn)  # warns (the first few) and counts; the loader names it
                counter.drain()
                yield SkippedSample(exn.sample_id, f"{exn.reason}: {exn}")
                continue
            if self.require_labels and sample["cls"] < 0:
                raise ValueError(f"sample {sample['__key__']!r} in shard {sample['__url__']} has no 'cls' label; "
                                 "zero-shot and linear-probe sets need labels (make them from class folders or a "
                                 "CSV/JSONL with a label column with python -m data.make_shards)")
            yield {"video": views, "cls": sample["cls"], "txt": sample["txt"], "__key__": sample["__key__"]}


class VideoEvalLoader(EvalLoader):
    """``EvalLoader`` of video samples; when every video was skipped it says why (e.g. all too short)."""

    def __iter__(self):
        count = 0
        for batch in super().__iter__():
            count += 1
            yield batch
        if count == 0 and self.skipped:
            reasons = Counter(error.split(":", 1)[0] for error in self.skipped.values())
            where = f"{self.dataset.urls[0]}{' ...' if len(self.dataset.urls) > 1 else ''}"
            raise ValueError(f"no video of {where} could be evaluated: "
                             f"{skip_summary(reasons, self.dataset.transform.sampling)}")


def build_video_eval_loader(shards, transform: ClipEvalTransform, batch_size: int = 16, num_workers: int = 4,
                            classnames: Sequence[str] | None = None, require_labels: bool = True,
                            backend: str | VideoBackend = "auto", pin_memory: bool = False):
    """Loader over video evaluation shards; returns ``(loader, classnames)``. Batches are dicts:
    ``video`` ``[B, V, T, 3, H, W]``, ``cls`` long ``[B]`` (-1 where none), ``txt`` and ``__key__`` lists;
    ``loader.skipped`` names the videos left out."""
    dataset = VideoEvalSet(shards, transform, classnames, require_labels, backend)
    num_workers = min(num_workers, len(dataset.urls))
    loader = VideoEvalLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                             pin_memory=pin_memory, drop_last=False)
    return loader, dataset.classnames

"""What a sample is: an image, or a clip of a video. One object per kind, so that the run, the target cache and
the evaluation bench stay one path for both.

``ImageMedia()`` and ``VideoMedia(sampling, backend, num_clips, num_crops)`` give the same calls:

    train_transform(image_transform)       the training view (a clip: the image view on every frame, `frames` drawn)
    train_loader(shards, transform, ...)   `data.stream.build_train_loader` / `data.video_stream.build_video_train_loader`
    eval_transform(preprocess, image_eval) the evaluation view(s) of a sample
    eval_loader(source, transform, ...)    batches ``(inputs, labels)``: images ``[B, 3, H, W]``, or videos
                                           ``[B, V, 3, ...]`` of V views (clips x crops) ``[B, V, T, 3, H, W]``;
                                           ``captions`` (video) and ``skipped_report()``
    first_samples(shards, transform, n)    the fixed held-out set: the first n samples, one view each, their keys
                                           (and with ``labels`` their classes)
    draw_views(raw, transform, gens)       K random views of a raw sample, with their parameters (target caching)
    replay(raw, transform, params)         the view a cache stored, rendered again
    example(batch, size, generator)        random inputs of a batch (cost)

A clip is ``[T, 3, H, W]`` and a batch of clips ``[B, T, 3, H, W]``, as `teachers.frames` takes them.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .decode import DEFAULT_MAX_PIXELS, decode_sample
from .evalsets import build_eval_loader, first_decoded, first_images
from .shards import is_remote, read_dataset_info, resolve_shards
from .stream import build_train_loader

__all__ = ["ImageMedia", "Media", "VideoMedia"]


def declared_media(urls: Sequence[str]) -> str | None:
    """What the shards' ``dataset.json`` says they hold: ``"video"`` (``data.make_shards`` of videos), ``"image"``
    (a ``dataset.json`` without ``media``), or None where no local folder says (video2dataset's, remote shards)."""
    kinds = set()
    for folder in sorted({os.path.dirname(u) for u in urls if not is_remote(u)}):
        info = read_dataset_info(folder or ".")
        if info is not None:
            kinds.add(info.get("media") or "image")
    return kinds.pop() if len(kinds) == 1 else None


class ImageMedia:
    """Samples are images (the default)."""

    kind = "image"
    unit = "image"  # what one sample is called in reports ("images / s", "GFLOPs per image")
    video = False

    def check_shards(self, urls: Sequence[str]) -> None:
        """Refuse shards that say they hold videos (one line, the fix)."""
        if declared_media(urls) == "video":
            raise ValueError(f"{urls[0]}{' ...' if len(urls) > 1 else ''} holds videos (its dataset.json says "
                             f"media: video), and the student takes images: make it a video student "
                             f"(student.video: {{frames: 8}}) or give image shards")

    def train_transform(self, image_transform):
        return image_transform

    def eval_transform(self, preprocess, image_transform):
        return image_transform

    def train_loader(self, shards, transform, batch_size: int, num_workers: int, **kwargs):
        return build_train_loader(shards, transform, batch_size, num_workers, **kwargs)

    def eval_loader(self, source, transform, batch_size: int, num_workers: int, allow_pipe: bool = False,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS, classnames: Sequence[str] | None = None):
        """``(loader, classnames)``; batches ``(images, labels)``."""
        from .evalsets import _is_shard_source, check_eval_source

        check_eval_source(source, allow_pipe=allow_pipe)
        if _is_shard_source(source):
            self.check_shards(resolve_shards(source, allow_pipe))
        return build_eval_loader(source, transform, batch_size, num_workers, classnames=classnames,
                                 allow_pipe=allow_pipe, max_pixels=max_pixels)

    def first_samples(self, shards, transform, limit: int, allow_pipe: bool = False,
                      max_pixels: int | None = DEFAULT_MAX_PIXELS, labels: bool = False):
        return first_images(shards, transform, limit, allow_pipe, max_pixels, labels=labels)

    def draw_views(self, raw: dict, transform, generators: Sequence[torch.Generator],
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[str, list[dict], list[torch.Tensor]]:
        """``(key, params, views)`` of one raw sample; raises ``DecodeError`` for one that does not decode."""
        sample = decode_sample(raw, max_pixels, lazy=getattr(transform, "lazy", False))
        params = [transform.draw(sample["image"], g) for g in generators]
        return sample["__key__"], params, [transform.apply(sample["image"], p) for p in params]

    def replay(self, raw: dict, transform, params: Sequence[dict],
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[torch.Tensor]:
        sample = decode_sample(raw, max_pixels)
        return [transform.apply(sample["image"], p) for p in params]

    def example(self, batch: int, size: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch, 3, *size, generator=generator)

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind}


class VideoMedia:
    """Samples are clips of videos (`data.video_transforms.ClipSampling`), decoded by ``backend``; evaluation
    takes ``num_clips`` x ``num_crops`` views of each video and averages the embeddings of its views."""

    kind = "video"
    unit = "clip"
    video = True

    def __init__(self, sampling, backend: str = "auto", num_clips: int = 1, num_crops: int = 1):
        from .video_transforms import ClipSampling

        if not isinstance(sampling, ClipSampling):
            raise TypeError(f"VideoMedia takes a data.video_transforms.ClipSampling, got {type(sampling).__name__}")
        self.sampling, self.backend = sampling, backend
        self.num_clips, self.num_crops = int(num_clips), int(num_crops)

    @property
    def frames(self) -> int:
        return self.sampling.frames

    def with_frames(self, frames: int) -> "VideoMedia":
        """The same media with clips of ``frames`` frames (segments: spread over the video as before)."""
        from .video_transforms import ClipSampling

        return VideoMedia(ClipSampling(frames, self.sampling.mode, self.sampling.stride), self.backend, self.num_clips,
                          self.num_crops)

    def _backend(self):
        from .video import video_backend

        return video_backend(self.backend)

    def check_shards(self, urls: Sequence[str]) -> None:
        """Refuse shards that say they hold images, or whose every video is shorter than a clip (one line each)."""
        from .video_stream import check_clip_fits

        if declared_media(urls) == "image":
            raise ValueError(f"{urls[0]}{' ...' if len(urls) > 1 else ''} holds images (its dataset.json has no "
                             f"media: video), and the student takes clips: give video shards (python -m "
                             f"data.make_shards VIDEO_FOLDER OUT) or drop student.video")
        check_clip_fits(urls, self.sampling)

    def train_transform(self, image_transform):
        from .video_transforms import ReplayableClipTransform

        return ReplayableClipTransform(self.sampling, image_transform)

    def eval_transform(self, preprocess, image_transform=None):
        from .video_transforms import ClipEvalTransform

        return ClipEvalTransform.from_preprocess(preprocess, self.sampling, self.num_clips, self.num_crops)

    def train_loader(self, shards, transform, batch_size: int, num_workers: int, **kwargs):
        from .video_stream import build_video_train_loader

        return build_video_train_loader(shards, transform, batch_size, num_workers, backend=self.backend, **kwargs)

    def eval_loader(self, source, transform, batch_size: int, num_workers: int, allow_pipe: bool = False,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS, classnames: Sequence[str] | None = None):
        """``(loader, classnames)``: batches ``(videos [B, V, T, 3, H, W], labels [B])`` (-1 where a video has no
        label); ``loader.captions`` holds the captions in order (``""`` where none)."""
        from .evalsets import check_eval_source
        from .video_stream import build_video_eval_loader

        check_eval_source(source, "video evaluation data", allow_pipe)
        self.check_shards(resolve_shards(source, allow_pipe))  # (a pipe: URL without the opt-in is refused here)
        loader, names = build_video_eval_loader(source, transform, batch_size, num_workers, classnames=classnames,
                                                require_labels=False, backend=self.backend)
        return VideoBatches(loader), names

    def first_samples(self, shards, transform, limit: int, allow_pipe: bool = False,
                      max_pixels: int | None = DEFAULT_MAX_PIXELS, labels: bool = False):
        """The first ``limit`` videos that give a clip, one evaluation view each ``[N, T, 3, H, W]``, and their
        ``shard#key`` (and with ``labels`` their classes, -1 where none); videos that do not decode or are too
        short are left out with a warning."""
        from .video import VideoDecodeError, decode_video_sample

        backend = self._backend()

        def load(raw):
            sample = decode_video_sample(raw, backend)
            with sample.pop("video") as video:
                return transform(video)[0], sample

        return first_decoded(shards, load, limit, allow_pipe, labels, VideoDecodeError,
                             f"no video that gives {self.sampling.describe()}")

    def draw_views(self, raw: dict, transform, generators: Sequence[torch.Generator],
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[str, list[dict], list[torch.Tensor]]:
        """``(key, params, clips)``: K random views of one video (each frame decoded once); raises
        ``VideoDecodeError`` (a ``DecodeError``) for a video that does not decode or is too short."""
        from .video import decode_video_sample

        sample = decode_video_sample(raw, self._backend())
        with sample.pop("video") as video:
            params = [transform.draw(video, g) for g in generators]
            return sample["__key__"], params, self._render(video, transform, params)

    def replay(self, raw: dict, transform, params: Sequence[dict],
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[torch.Tensor]:
        from .video import decode_video_sample

        sample = decode_video_sample(raw, self._backend())
        with sample.pop("video") as video:
            return self._render(video, transform, params)

    @staticmethod
    def _render(video, transform, params: Sequence[dict]) -> list[torch.Tensor]:
        wanted = sorted({i for p in params for i in p["frames"]})
        frames = dict(zip(wanted, video.get_frames(wanted)))
        return [transform.apply(torch.stack([frames[i] for i in p["frames"]]), p) for p in params]

    def example(self, batch: int, size: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch, self.frames, 3, *size, generator=generator)

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "sampling": self.sampling.settings(), "backend": self.backend,
                "num_clips": self.num_clips, "num_crops": self.num_crops}


Media = ImageMedia | VideoMedia


class VideoBatches:
    """A video evaluation loader as ``(videos, labels)`` batches, collecting the captions in order."""

    def __init__(self, loader):
        self.loader = loader
        self.dataset = loader.dataset
        self.captions: list[str] = []
        self.keys: list[str] = []

    @property
    def skipped(self) -> dict[str, str]:
        return self.loader.skipped

    def skipped_report(self) -> list[dict[str, str]]:
        return self.loader.skipped_report()

    def __iter__(self):
        self.captions, self.keys = [], []
        for batch in self.loader:
            self.captions.extend(batch["txt"])
            self.keys.extend(batch["__key__"])
            yield batch["video"], batch["cls"]

    def __len__(self) -> int:
        return len(self.loader)


"""Clips: which frames of a video make a clip, and the clip's training and evaluation views.

Frame sampling (``ClipSampling``, chosen per call — later per recipe):

* ``mode="segments"`` (TSN): the video's ``n`` frames are cut into ``frames`` equal segments
  (segment ``k`` is ``[floor(k n / T), floor((k + 1) n / T))``) and one frame is taken from each:
  a uniformly random one in training, the centre one in evaluation. Needs ``n >= T``.
* ``mode="stride"``: ``frames`` frames ``stride`` apart, a window of ``(T - 1) * stride + 1``
  frames that starts anywhere (training, uniformly) or in the middle (evaluation). Needs ``n`` at
  least the window.

A video shorter than that is not looped or padded: it is skipped, counted and named
(``ClipTooShort``), as a corrupt image is.

Evaluation with ``num_clips`` clips: clip ``c`` of ``C`` takes frame ``lo + floor(L (2c + 1) / 2C)``
of each segment ``[lo, lo + L)`` (segments), or starts its window at ``floor(S (2c + 1) / 2C)`` of
the ``S = n - window + 1`` possible starts (stride); ``C = 1`` is the centre.

Views:

* ``ReplayableClipTransform`` (training): one random view = frame indices + one
  RandomResizedCrop box + one flip (+ the image transform's colour jitter / grayscale), the same on
  every frame of the clip. ``draw(video, generator)`` gives its parameters as a JSON-able dict,
  ``apply(frames, params)`` renders exactly that view, ``__call__(video)`` does both from torch's
  global generator. Cached teacher targets store these parameters and replay them, as for images
  (``data.transforms.ReplayableTrainTransform``, which renders every frame).
* ``ClipEvalTransform`` (evaluation): ``num_clips x num_crops`` views ``[V, T, 3, H, W]``: the
  shorter side resized to ``size / crop_pct``, then the centre crop (``num_crops=1``, the teacher's
  own eval preprocessing frame by frame) or three crops along the longer side (start, centre, end).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from PIL import Image
from torchvision.transforms import functional as F

from .transforms import ReplayableTrainTransform, _size2, interpolation_mode
from .video import VideoDecodeError, VideoInfo, VideoSource

SAMPLING_MODES = ("segments", "stride")


class ClipTooShort(VideoDecodeError):
    """A video with fewer frames than a clip needs (skipped, counted and named)."""

    def __init__(self, message: str, sample_id: str, num_frames: int, needed: int):
        super().__init__(message, sample_id, "too_short")
        self.num_frames, self.needed = num_frames, needed


@dataclass(frozen=True)
class ClipSampling:
    """``frames`` frames per clip, by ``mode`` ``"segments"`` (TSN) or ``"stride"`` (``stride`` apart)."""

    frames: int
    mode: str = "segments"
    stride: int = 1

    def __post_init__(self):
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise ValueError(f"a clip needs frames >= 1 (an integer), got {self.frames!r}")
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"unknown clip sampling mode {self.mode!r}; choose 'segments' (TSN: one frame per "
                             "segment) or 'stride' (frames a fixed stride apart)")
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride must be an integer >= 1, got {self.stride!r}")

    @property
    def needed(self) -> int:
        """The fewest frames a video must have for one clip."""
        return self.frames if self.mode == "segments" else (self.frames - 1) * self.stride + 1

    def describe(self) -> str:
        if self.mode == "segments":
            return f"a clip of {self.frames} frames (one per segment)"
        return f"a clip of {self.frames} frames {self.stride} apart"

    def check(self, num_frames: int, name: str = "<video>") -> None:
        """Raise ``ClipTooShort`` (naming ``name``) when a video of ``num_frames`` frames cannot give a clip."""
        if num_frames < self.needed:
            raise ClipTooShort(f"video {name} has {num_frames} frames, fewer than the {self.needed} of "
                               f"{self.describe()}: skipped", name, num_frames, self.needed)

    def train_indices(self, num_frames: int, generator: torch.Generator | None = None) -> list[int]:
        """Random frame indices of one training clip (from ``generator``; None: torch's global one)."""
        self.check(num_frames)
        if self.mode == "stride":
            start = int(torch.randint(0, num_frames - self.needed + 1, (1,), generator=generator))
            return [start + k * self.stride for k in range(self.frames)]
        bounds = self._segment_bounds(num_frames)
        offsets = torch.rand(self.frames, generator=generator)
        # floor(u * length) is uniform over the segment's frames; min() guards u's float rounding.
        return [lo + min(int(u * (hi - lo)), hi - lo - 1) for lo, hi, u in zip(bounds, bounds[1:], offsets.tolist())]

    def eval_indices(self, num_frames: int, clip: int = 0, num_clips: int = 1) -> list[int]:
        """Frame indices of evaluation clip ``clip`` of ``num_clips`` (deterministic)."""
        self.check(num_frames)
        if not 0 <= clip < num_clips:
            raise ValueError(f"clip {clip} is not one of {num_clips} clips")
        if self.mode == "stride":
            start = (num_frames - self.needed + 1) * (2 * clip + 1) // (2 * num_clips)
            return [start + k * self.stride for k in range(self.frames)]
        bounds = self._segment_bounds(num_frames)
        # The frame at fraction (clip + 0.5) / num_clips of each segment's frames.
        return [lo + (hi - lo) * (2 * clip + 1) // (2 * num_clips) for lo, hi in zip(bounds, bounds[1:])]

    def _segment_bounds(self, num_frames: int) -> list[int]:
        return [k * num_frames // self.frames for k in range(self.frames + 1)]

    def settings(self) -> dict[str, Any]:
        return asdict(self)


def _info(video: VideoSource | VideoInfo) -> VideoInfo:
    return video if isinstance(video, VideoInfo) else video.info


def frames_to_images(frames: torch.Tensor | Sequence) -> list[Image.Image]:
    """uint8 ``[T, H, W, 3]`` frames (any device) as PIL images; PIL images pass through."""
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3] (what VideoSource.get_frames gives), got "
                             f"{frames.dtype} {tuple(frames.shape)}")
        return [Image.fromarray(f.numpy()) for f in frames.cpu()]
    return list(frames)


class ReplayableClipTransform:
    """A training view of a clip: sampled frames + one crop box + one flip, the same on every frame.

    ``image_transform`` is the teacher's image augmentation (``teacher.train_transform()``); its
    parameters are drawn once per clip. Parameters of one view (JSON-able)::

        {"frames": [i0, ..., i(T-1)], "crop": [top, left, h, w], "flip": bool, "jitter": [...], "gray": bool}

    drawn in that order (frames first) from one generator.
    """

    def __init__(self, sampling: ClipSampling, image_transform: ReplayableTrainTransform):
        if not hasattr(image_transform, "draw") or not hasattr(image_transform, "apply"):
            raise TypeError("the image transform must be a data.transforms.ReplayableTrainTransform (teacher."
                            f"train_transform() gives one), got {type(image_transform).__name__}")
        self.sampling, self.image_transform = sampling, image_transform

    @property
    def size(self) -> tuple[int, int]:
        return self.image_transform.size

    def draw(self, video: VideoSource | VideoInfo, generator: torch.Generator | None = None) -> dict[str, Any]:
        """The parameters of one random view of ``video`` (its ``info`` is enough: nothing is decoded).

        Raises:
            ClipTooShort: the video has fewer frames than a clip needs.
        """
        info = _info(video)
        name = getattr(video, "name", "<video>")
        self.sampling.check(info.num_frames, name)
        frames = self.sampling.train_indices(info.num_frames, generator)
        # The image transform reads only the size of what it is given.
        return {"frames": frames, **self.image_transform.draw(info, generator)}

    def apply(self, frames: torch.Tensor | Sequence[Image.Image], params: dict[str, Any]) -> torch.Tensor:
        """Render view ``params`` from its frames (``video.get_frames(params["frames"])``, or PIL images in that
        order): a normalised float tensor ``[T, 3, H, W]``."""
        images = frames_to_images(frames)
        if len(images) != len(params["frames"]):
            raise ValueError(f"view has {len(params['frames'])} frames, got {len(images)} images")
        image_params = {k: v for k, v in params.items() if k != "frames"}
        return torch.stack([self.image_transform.apply(image, image_params) for image in images])

    def __call__(self, video: VideoSource) -> torch.Tensor:
        params = self.draw(video)
        return self.apply(video.get_frames(params["frames"]), params)

    def settings(self) -> dict[str, Any]:
        """What decides the views (JSON-able; for cache manifests)."""
        return {"sampling": self.sampling.settings(), **self.image_transform.settings()}

    def __repr__(self) -> str:
        return f"ReplayableClipTransform(sampling={self.sampling}, image_transform={self.image_transform!r})"


def crop_boxes(height: int, width: int, size: tuple[int, int], num_crops: int) -> list[tuple[int, int]]:
    """``(top, left)`` of ``num_crops`` crops of ``size`` from an image ``height x width``: 1 is the centre
    (torchvision's CenterCrop), 3 are start, centre and end along the longer side."""
    th, tw = size
    if th > height or tw > width:
        raise ValueError(f"a {th}x{tw} crop does not fit a {height}x{width} frame")
    centre = (int(round((height - th) / 2.0)), int(round((width - tw) / 2.0)))
    if num_crops == 1:
        return [centre]
    if num_crops != 3:
        raise ValueError(f"num_crops must be 1 (centre) or 3 (along the longer side), got {num_crops}")
    if height - th > width - tw:
        return [(0, centre[1]), centre, (height - th, centre[1])]
    return [(centre[0], 0), centre, (centre[0], width - tw)]


class ClipEvalTransform:
    """Evaluation views of a video: ``num_clips`` clips x ``num_crops`` crops -> ``[V, T, 3, H, W]`` (clip-major).

    Per frame: shorter side resized to ``floor(size / crop_pct)`` (``resize_mode="squash"``: resized to
    ``size``), then the crop(s), ``to_tensor`` and normalisation, as ``Teacher.eval_transform``.
    ``from_preprocess(teacher.preprocess, sampling)`` takes the teacher's settings.
    """

    def __init__(self, sampling: ClipSampling, size, mean, std, interpolation: str = "bicubic",
                 crop_pct: float = 1.0, resize_mode: str = "shortest", num_clips: int = 1, num_crops: int = 1):
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {resize_mode!r}")
        if num_clips < 1:
            raise ValueError(f"num_clips must be at least 1, got {num_clips}")
        if num_crops not in (1, 3) or (resize_mode == "squash" and num_crops != 1):
            raise ValueError(f"num_crops must be 1 or 3 (1 with resize_mode 'squash', whose frames are the crop), "
                             f"got {num_crops}")
        self.sampling, self.size = sampling, _size2(size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.interpolation = interpolation_mode(interpolation)
        self.crop_pct, self.resize_mode = float(crop_pct), resize_mode
        self.num_clips, self.num_crops = int(num_clips), int(num_crops)

    @classmethod
    def from_preprocess(cls, preprocess, sampling: ClipSampling, num_clips: int = 1, num_crops: int = 1):
        """From a teacher's ``Preprocess`` (size, mean, std, interpolation, crop_pct, resize_mode)."""
        p = preprocess
        return cls(sampling, p.size, p.mean, p.std, p.interpolation, p.crop_pct, getattr(p, "resize_mode", "shortest"),
                   num_clips, num_crops)

    @property
    def num_views(self) -> int:
        return self.num_clips * self.num_crops

    def clip_indices(self, video: VideoSource | VideoInfo) -> list[list[int]]:
        """The frame indices of each clip (raises ``ClipTooShort`` for a video too short for one)."""
        info = _info(video)
        self.sampling.check(info.num_frames, getattr(video, "name", "<video>"))
        return [self.sampling.eval_indices(info.num_frames, c, self.num_clips) for c in range(self.num_clips)]

    def _resize(self, image: Image.Image) -> Image.Image:
        if self.resize_mode == "squash":
            return F.resize(image, list(self.size), self.interpolation)
        h, w = self.size
        if h == w:  # one int resizes the shorter side, keeping the aspect ratio (timm / open_clip)
            return F.resize(image, math.floor(h / self.crop_pct), self.interpolation)
        return F.resize(image, [math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)], self.interpolation)

    def frame_views(self, image: Image.Image) -> list[torch.Tensor]:
        """The ``num_crops`` normalised crops ``[3, H, W]`` of one frame."""
        resized = self._resize(image)
        tensor = F.normalize(F.to_tensor(resized), self.mean, self.std)
        return [tensor[:, top:top + self.size[0], left:left + self.size[1]]
                for top, left in crop_boxes(resized.height, resized.width, self.size, self.num_crops)]

    def __call__(self, video: VideoSource) -> torch.Tensor:
        clips = self.clip_indices(video)
        wanted = sorted({i for clip in clips for i in clip})
        images = dict(zip(wanted, frames_to_images(video.get_frames(wanted))))
        crops = {i: self.frame_views(images[i]) for i in wanted}  # each frame resized once
        return torch.stack([torch.stack([crops[i][k] for i in clip]) for clip in clips for k in range(self.num_crops)])

    def settings(self) -> dict[str, Any]:
        return {"sampling": self.sampling.settings(), "size": list(self.size), "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation.value, "crop_pct": self.crop_pct,
                "resize_mode": self.resize_mode, "num_clips": self.num_clips, "num_crops": self.num_crops}

    def __repr__(self) -> str:
        return f"ClipEvalTransform({', '.join(f'{k}={v}' for k, v in self.settings().items())})"

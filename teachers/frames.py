"""Image teachers over video: clips are embedded frame by frame, in one batched pass.

    from teachers.frames import VideoTeacher
    video_teacher = VideoTeacher(create_teacher(spec))
    target = video_teacher.embed(clips)                          # clips [B, T, 3, H, W] -> [B, embed_dim]
    out = video_teacher.targets(clips, ["embedding", "tokens"])  # {"embedding": [B, D], "tokens": [B, T, N, width]}

The ``B * T`` frames of a batch of clips go through the image teacher as one batch of images
(``max_frames`` splits it into chunks when memory asks). The video target is the mean of the
frame embeddings — the protocol of CLIP's and PE-Core's zero-shot video classification — and
the token-level targets keep the frame axis: tokens ``[B, T, N, width]``, attention maps
``[B, T, heads, N, N]`` per block. Every image teacher works this way, whatever its kind: only
its public interface (``targets``, ``embed``, ``forward_tokens``, ``final_tokens``) is used.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .base import Teacher

__all__ = ["VideoTeacher", "check_clips", "embed_frames", "frame_targets", "frames_forward_tokens", "media_teacher",
           "video_embedding"]


def check_clips(clips: Tensor, teacher: Teacher) -> None:
    """Clips must be ``[B, T, 3, H, W]`` at the teacher's image size; otherwise one line saying what to pass."""
    h, w = teacher.preprocess.size
    if clips.ndim == 5 and clips.shape[2] == 3:
        return  # the teacher checks H and W, naming its size
    hint = ""
    if clips.ndim == 5 and clips.shape[1] == 3:
        hint = " (this looks like [B, 3, T, H, W], the video student's layout: pass clips.transpose(1, 2))"
    elif clips.ndim == 4:
        hint = " (one clip? pass clips[None]; images? use the image teacher)"
    raise ValueError(f"teacher {teacher.name} over frames expects clips [B, T, 3, {h}, {w}], got "
                     f"{tuple(clips.shape)}{hint}")


def _over_frames(fn: Callable[[Tensor], Any], clips: Tensor, max_frames: int | None) -> list[Any]:
    """``fn`` on the ``B * T`` frames of ``clips`` as one batch of images, or ``max_frames`` at a time."""
    frames = clips.flatten(0, 1)
    step = frames.shape[0] if not max_frames else int(max_frames)
    if step < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    return [fn(frames[i:i + step]) for i in range(0, frames.shape[0], step)] if frames.shape[0] else [fn(frames)]


def _unflatten(x: Tensor, b: int, t: int) -> Tensor:
    return x.reshape(b, t, *x.shape[1:])


def frame_targets(teacher: Teacher, clips: Tensor, needs: Sequence[str], max_frames: int | None = None) -> dict:
    """``teacher.targets`` for clips ``[B, T, 3, H, W]``: ``embedding`` ``[B, D]`` (the mean of the frame
    embeddings), ``tokens`` ``[B, T, N, width]``, ``attention`` a list (one per block) of ``[B, T, heads, N, N]``."""
    check_clips(clips, teacher)
    b, t = clips.shape[:2]
    parts = _over_frames(lambda frames: teacher.targets(frames, needs), clips, max_frames)
    out: dict[str, Any] = {}
    if "embedding" in parts[0]:
        out["embedding"] = _unflatten(torch.cat([p["embedding"] for p in parts]), b, t).mean(dim=1)
    if "tokens" in parts[0]:
        out["tokens"] = _unflatten(torch.cat([p["tokens"] for p in parts]), b, t)
    if "attention" in parts[0]:
        out["attention"] = [_unflatten(torch.cat(maps), b, t) for maps in zip(*(p["attention"] for p in parts))]
    return out


def embed_frames(teacher: Teacher, clips: Tensor, max_frames: int | None = None) -> Tensor:
    """The teacher's embedding of every frame: ``[B, T, embed_dim]``."""
    check_clips(clips, teacher)
    b, t = clips.shape[:2]
    return _unflatten(torch.cat(_over_frames(teacher.embed, clips, max_frames)), b, t)


def video_embedding(teacher: Teacher, clips: Tensor, max_frames: int | None = None) -> Tensor:
    """The video target: the mean of the frame embeddings, ``[B, embed_dim]``."""
    return embed_frames(teacher, clips, max_frames).mean(dim=1)


def frames_forward_tokens(teacher: Teacher, clips: Tensor, layer: int = -1, class_token: bool = True,
                          max_frames: int | None = None) -> Tensor:
    """``teacher.forward_tokens`` of every frame: ``[B, T, N, width]`` (see ``Teacher.forward_tokens`` for
    ``layer`` and ``class_token``)."""
    check_clips(clips, teacher)
    b, t = clips.shape[:2]
    fn = lambda frames: teacher.forward_tokens(frames, layer, class_token)  # noqa: E731
    return _unflatten(torch.cat(_over_frames(fn, clips, max_frames)), b, t)


class VideoTeacher(nn.Module):
    """An image ``Teacher`` answering for clips ``[B, T, 3, H, W]`` (the module docstring says how).

    ``embed``, ``targets``, ``forward_tokens``, ``final_tokens``, ``attention_maps`` and ``embed_frames`` take
    clips; everything else (``embed_dim``, ``preprocess``, ``tokenizer``, ``encode_text``, the weights'
    state dicts, ...) is the image teacher's, which ``teacher`` holds. ``clip_train_transform`` and
    ``clip_eval_transform`` give the clip views made with the image teacher's preprocessing.
    """

    def __init__(self, teacher: Teacher, max_frames: int | None = None):
        super().__init__()
        if not isinstance(teacher, Teacher):
            raise TypeError(f"VideoTeacher wraps an image teachers.Teacher, got {type(teacher).__name__}")
        self.teacher = teacher
        self.max_frames = max_frames

    def train(self, mode: bool = True) -> "VideoTeacher":
        """Teachers stay in eval mode whatever is asked."""
        return super().train(False)

    def embed(self, clips: Tensor) -> Tensor:
        """The video target ``[B, embed_dim]``: the mean of the frame embeddings."""
        return video_embedding(self.teacher, clips, self.max_frames)

    forward = embed

    def embed_frames(self, clips: Tensor) -> Tensor:
        """Every frame's embedding ``[B, T, embed_dim]``."""
        return embed_frames(self.teacher, clips, self.max_frames)

    def targets(self, clips: Tensor, needs: Sequence[str]) -> dict[str, Any]:
        """What the loss terms read (see ``Teacher.targets``), for clips: see ``frame_targets``."""
        return frame_targets(self.teacher, clips, needs, self.max_frames)

    def forward_tokens(self, clips: Tensor, layer: int = -1, class_token: bool = True) -> Tensor:
        """The teacher's tokens of every frame after a block: ``[B, T, N, width]``."""
        return frames_forward_tokens(self.teacher, clips, layer, class_token, self.max_frames)

    def final_tokens(self, clips: Tensor) -> Tensor:
        """Every frame's final-normed tokens ``[B, T, N, width]``."""
        return frame_targets(self.teacher, clips, ["tokens"], self.max_frames)["tokens"]

    def attention_maps(self, clips: Tensor) -> list[Tensor]:
        """Every block's dense attention per frame, ``[B, T, heads, N, N]`` each."""
        return frame_targets(self.teacher, clips, ["attention"], self.max_frames)["attention"]

    def clip_train_transform(self, sampling, **aug_overrides):
        """A ``data.video_transforms.ReplayableClipTransform``: ``sampling`` (a ``ClipSampling``) + the image
        teacher's ``train_transform(**aug_overrides)``, one crop and flip per clip."""
        from data.video_transforms import ReplayableClipTransform

        return ReplayableClipTransform(sampling, self.teacher.train_transform(**aug_overrides))

    def clip_eval_transform(self, sampling, num_clips: int = 1, num_crops: int = 1):
        """A ``data.video_transforms.ClipEvalTransform`` with the image teacher's eval preprocessing."""
        from data.video_transforms import ClipEvalTransform

        return ClipEvalTransform.from_preprocess(self.teacher.preprocess, sampling, num_clips, num_crops)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (the teacher itself)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if name == "teacher" or "teacher" not in modules:
                raise
            return getattr(modules["teacher"], name)

    def extra_repr(self) -> str:
        return f"frames of {self.teacher.kind}:{self.teacher.name}, max_frames={self.max_frames}"


def media_teacher(teacher, media) -> Teacher | VideoTeacher:
    """The teacher as it answers for the samples of ``media`` (`data.media`): over frames for clips, else itself."""
    if not getattr(media, "video", False) or isinstance(teacher, VideoTeacher):
        return teacher
    return VideoTeacher(teacher)

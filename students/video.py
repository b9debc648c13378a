"""Video students, as every family, the run and the evaluation see them.

A recipe makes a video student with ``student.video`` (`VideoOptions`)::

    student:
      video:
        frames: 8            # frames per clip (the teacher embeds each; the student sees the clip at once)
        sampling: segments   # segments (TSN: one frame per equal segment) | stride (frames `stride` apart)
        stride: 1
        replicates: 1        # each latent token copied over as many time segments (SparseFormer's tubes)
        image_student: null  # a finished run folder whose image student is inflated; or, in a run, a recipe (with
                             #   key=value overrides) whose run is trained first (`bootstrap.image_stage`); null:
                             #   the image student is built from the teacher as for images, then inflated

Video is a property of the data and the student, not a new loop: a family whose options have a ``video``
field takes video (`video_options`), and its video students carry the clips they were trained on in their
config's ``video`` section (``frames``, ``sampling``, ``stride``; `student_clip`), which evaluation takes by
default as it takes an image student's input size from its pretrained config. Clips are ``[B, T, 3, H, W]``,
as the data and the teachers over frames (`teachers.frames`) give them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union

from data.video_transforms import ClipSampling

from .family import ConfigError

__all__ = ["VideoOptions", "input_shape", "student_clip", "video_options", "video_refusal"]


@dataclass(frozen=True)
class VideoOptions:
    """A recipe's ``student.video`` (see the module docstring)."""

    frames: int = 8
    sampling: Literal["segments", "stride"] = "segments"
    stride: int = 1
    replicates: int = 1
    image_student: Union[str, None] = None

    def __post_init__(self):
        for name in ("frames", "stride", "replicates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"video.{name} must be an integer >= 1, got {value!r}")
        if self.sampling not in ("segments", "stride"):
            raise ValueError(f"video.sampling must be 'segments' (TSN) or 'stride', got {self.sampling!r}")
        if self.replicates > self.frames:
            raise ValueError(f"video.replicates={self.replicates} copies each token over more time segments than "
                             f"the clip has frames ({self.frames}): use replicates <= frames")

    def clip_sampling(self) -> ClipSampling:
        return ClipSampling(self.frames, self.sampling, self.stride)


def video_options(options: Any) -> VideoOptions | None:
    """The ``video`` section of a family's options (None: an image student, or a family that takes images only)."""
    video = getattr(options, "video", None)
    if isinstance(video, dict):  # options loaded untyped (`BootstrapOptions.from_dict`)
        from data.schema import load

        video = load(VideoOptions, video, "student.video", error=ConfigError, dotted=True)
    return video


def video_refusal(family_name: str) -> str:
    """The one line for ``student.video`` with a family that takes images only."""
    return (f"recipe key 'student.video': {family_name} students take images only (their attention is over a "
            f"fixed patch grid); video students are SparseFormers: set student.kind=sparseformer, or drop "
            f"student.video")


def student_clip(student_or_config: Any) -> ClipSampling | None:
    """The clips a video student was trained on (its config's ``video`` section), or None for an image student."""
    config = getattr(student_or_config, "config", student_or_config)
    video = getattr(config, "video", None)
    if video is None or not getattr(video, "frames", None):
        return None
    return ClipSampling(int(video.frames), str(video.sampling), int(video.stride))


def input_shape(student: Any, size: tuple[int, int], frames: int | None = None) -> tuple[int, ...]:
    """One input of ``student`` at ``size`` (H, W): ``(3, H, W)``, or a clip ``(T, 3, H, W)`` of a video student
    (``frames`` or the clip it was trained on)."""
    clip = student_clip(student)
    if clip is None and frames is None:
        return (3, *size)
    return (frames or clip.frames, 3, *size)

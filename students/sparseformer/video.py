"""Video students: an image SparseFormer inflated to a `MediaSparseFormer` (design note, section 7).

The image student is built from the teacher as for images (or its weights come from a run's image student),
then inflated: the early convolution's kernels gain a time axis of size 1, each RoI becomes a tube over
the whole clip (or, with ``replicates = r``, r tubes over the r time segments), the sampling offsets and
RoI adjustments gain a time coordinate that starts at zero. The tubes' spatial boxes are encoded as the
image model encodes its RoIs (`VideoConfig.roi_encoding` ``xy``), so the inflated student computes on a
clip of one still frame exactly what the image student computes on that frame; the time axis is then
learned from clips. Parameter names do not change, so the image student's policy (what trains, what is
frozen) carries over by name.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from ..checkpoints import CheckpointMismatchError, load_checkpoint_strict, load_state_dict_file
from ..family import ConfigError, ParameterPolicy, policy_from
from ..video import VideoOptions
from .config import VideoConfig
from .model import MediaSparseFormer, SparseFormer

__all__ = ["inflate", "load_image_student", "start_time_axis", "video_config"]


def video_config(video: VideoOptions) -> VideoConfig:
    """The config section of a video student made with ``video`` (frames first, spatial RoI encoding)."""
    return VideoConfig(frames=video.frames, sampling=video.sampling, stride=video.stride,
                       replicates=video.replicates, layout="frames_first", roi_encoding="xy")


def inflate(image: SparseFormer, video: VideoOptions | VideoConfig, policy: ParameterPolicy | None = None):
    """The video student of ``image`` (a `MediaSparseFormer` with the same weights, inflated), and with
    ``policy`` the same policy by parameter name (applied). Returns the student, or ``(student, policy)``."""
    if type(image) is not SparseFormer:
        raise TypeError(f"inflate takes an image SparseFormer, got {type(image).__name__}")
    section = video if isinstance(video, VideoConfig) else video_config(video)
    student = MediaSparseFormer(image.config.replace(video=asdict(section)))
    student.load_2d_state_dict(image.state_dict())
    start_time_axis(student, section.frames)
    student.train(image.training)
    if hasattr(image, "pretrained_cfg"):
        student.pretrained_cfg = dict(image.pretrained_cfg)
    if policy is None:
        return student
    trains = set(policy.trainable)
    return student, policy_from(student, lambda name: name in trains).apply(student)


def time_ticks(num_points: int) -> torch.Tensor:
    """``num_points`` time offsets spread evenly over [-0.5, 0.5], in an order that walks the points' k x k
    spatial grid (row-major, `SparseFormer._offset_grid`) diagonally, so that points close in time lie apart
    in space."""
    k = int(round(math.sqrt(num_points)))
    order = torch.arange(num_points)
    if k * k == num_points:  # point (row i, column j) takes slot (j + i * (k // 2 + 1)) mod k of its row's k
        i, j = order // k, order % k
        order = ((j + i * (k // 2 + 1)) % k) * k + i
    return (order.float() + 0.5) / num_points - 0.5


@torch.no_grad()
def start_time_axis(student: MediaSparseFormer, frames: int) -> None:
    """Tubes one frame long, centred on their time segments, and sampling points spread over that time (see the
    module docstring); the spatial boxes and offsets are left as they are."""
    roi = student.initial_roi.weight
    centre = (roi[:, 2] + roi[:, 5]) / 2
    half = 0.5 / frames
    roi[:, 2], roi[:, 5] = centre - half, centre + half
    for layer in student.layers:
        bias = getattr(layer, "roi_offset_bias", None)
        if bias is not None:
            bias.view(layer.num_points, 3)[:, 2] = time_ticks(layer.num_points).to(bias.dtype)


def load_image_student(student: SparseFormer, path: str) -> None:
    """Load the weights of an image student (``path``: its ``.safetensors``, as a run writes ``student.safetensors``)
    into ``student``, which the same recipe built from the same teacher; one line when they do not fit."""
    try:
        load_checkpoint_strict(student, load_state_dict_file(path), source=path)
    except FileNotFoundError:
        raise ConfigError(f"student.video.image_student: {path} does not exist; give a finished run folder or its "
                          f"student.safetensors") from None
    except CheckpointMismatchError as exn:
        first = str(exn).splitlines()[0]
        raise ConfigError(f"student.video.image_student: {first}: that image student was built with other student "
                          f"options or another teacher; use the recipe of its run (teacher and student sections) "
                          f"with student.video added") from None

"""Image transforms: the teacher's training augmentation and its evaluation preprocessing.

Both take a PIL RGB image and return a normalised float tensor ``[3, size, size]``. Use the
teacher's own ``mean``/``std``/``interpolation`` (open_clip's ``preprocess_cfg`` or timm's
data config; ``transforms_from_config`` reads either) so the student sees what the teacher saw.
"""

from __future__ import annotations

import math
from typing import Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def interpolation_mode(name: str | InterpolationMode) -> InterpolationMode:
    """``"bicubic"`` -> ``InterpolationMode.BICUBIC`` (also bilinear, nearest, lanczos, box, hamming)."""
    if isinstance(name, InterpolationMode):
        return name
    try:
        return InterpolationMode(str(name).lower())
    except ValueError:
        choices = ", ".join(m.value for m in InterpolationMode)
        raise ValueError(f"unknown interpolation {name!r}; choose one of {choices}") from None


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) == 3:  # timm's input_size (C, H, W)
        size = size[1:]
    return int(size[0]), int(size[1])


def train_transform(
    size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float | Sequence[float] | None = None,
    grayscale: float = 0.0,
) -> T.Compose:
    """RandomResizedCrop + horizontal flip (+ colour jitter, random grayscale), then normalise.

    Args:
        size: output side (or ``(H, W)``).
        mean, std: per-channel normalisation of the teacher.
        interpolation: resize filter of the crop.
        scale, ratio: RandomResizedCrop area fraction and aspect-ratio ranges.
        hflip: probability of a horizontal flip (0 disables).
        color_jitter: None/0 disables; a float ``x`` jitters brightness, contrast and saturation
            by ``x``; a sequence is ``(brightness, contrast, saturation[, hue])``.
        grayscale: probability of converting to grayscale.
    """
    steps = [T.RandomResizedCrop(_size2(size), scale=tuple(scale), ratio=tuple(ratio),
                                 interpolation=interpolation_mode(interpolation), antialias=True)]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if color_jitter:
        jitter = (float(color_jitter),) * 3 if isinstance(color_jitter, (int, float)) else tuple(color_jitter)
        if len(jitter) not in (3, 4):
            raise ValueError(f"color_jitter must be a number or (brightness, contrast, saturation[, hue]), got {color_jitter!r}")
        steps.append(T.ColorJitter(*jitter))
    if grayscale > 0:
        steps.append(T.RandomGrayscale(grayscale))
    steps += [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    return T.Compose(steps)


def eval_transform(
    size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
) -> T.Compose:
    """Resize the shorter side to ``size / crop_pct``, centre-crop ``size``, normalise.

    ``crop_pct=1.0`` is CLIP's preprocessing (resize to ``size``, centre crop); 0.875 is the
    classic ImageNet evaluation.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    h, w = _size2(size)
    resize = math.floor(h / crop_pct) if h == w else (math.floor(h / crop_pct), math.floor(w / crop_pct))
    return T.Compose([
        T.Resize(resize, interpolation=interpolation_mode(interpolation), antialias=True),
        T.CenterCrop((h, w)),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])


def transforms_from_config(cfg: dict, train: bool = False, **overrides):
    """Build ``train_transform``/``eval_transform`` from a teacher's preprocessing config.

    Reads open_clip's ``preprocess_cfg`` (``size``, ``mean``, ``std``, ``interpolation``) or timm's
    data config (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``); open_clip
    configs get ``crop_pct=1.0`` as open_clip does. ``overrides`` go to the transform.
    """
    size = cfg.get("size", cfg.get("input_size"))
    if size is None or "mean" not in cfg or "std" not in cfg:
        raise ValueError(f"preprocessing config needs size/input_size, mean and std; got keys {sorted(cfg)}")
    args = dict(size=size, mean=cfg["mean"], std=cfg["std"], interpolation=cfg.get("interpolation", "bicubic"))
    if not train:
        args["crop_pct"] = cfg.get("crop_pct", 1.0 if "size" in cfg else 0.875)
    args.update(overrides)
    return train_transform(**args) if train else eval_transform(**args)

"""Image transforms: the teacher's training augmentation and its evaluation preprocessing.

Both take a PIL RGB image and return a normalised float tensor ``[3, size, size]``. Use the
teacher's own ``mean``/``std``/``interpolation`` (open_clip's ``preprocess_cfg`` or timm's
data config; ``transforms_from_config`` reads either) so the student sees what the teacher saw.

The training augmentation is a ``ReplayableTrainTransform``: called on an image it draws its
parameters (crop box, flip, colour-jitter order and factors, grayscale) from torch's global
generator with exactly torchvision's calls, so it gives what the equivalent
``T.Compose([RandomResizedCrop, RandomHorizontalFlip, ColorJitter, RandomGrayscale, ...])``
gives; ``draw(image, generator)`` draws the same parameters from a given generator (a seed
per image and view) and ``apply(image, params)`` applies given parameters exactly. Cached
teacher targets (``data.targets``) store the parameters of every view and replay them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

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


def _jitter_ranges(color_jitter) -> list[tuple[float, float] | None]:
    """ColorJitter's (brightness, contrast, saturation, hue) ranges, as torchvision computes them."""
    if not color_jitter:
        return [None] * 4
    jitter = (float(color_jitter),) * 3 if isinstance(color_jitter, (int, float)) else tuple(color_jitter)
    if len(jitter) not in (3, 4):
        raise ValueError(f"color_jitter must be a number or (brightness, contrast, saturation[, hue]), got {color_jitter!r}")
    cj = T.ColorJitter(*jitter)  # torchvision checks the values and turns them into ranges
    return [None if r is None else (float(r[0]), float(r[1])) for r in (cj.brightness, cj.contrast, cj.saturation, cj.hue)]


_JITTER_OPS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def _to_rgb(image):
    """Grey-scale / RGBA / palette images to RGB (what both libraries' transforms assume)."""
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


class ReplayableTrainTransform:
    """RandomResizedCrop + flip (+ colour jitter, grayscale), normalise; parameters drawable and replayable.

    ``transform(image)`` draws from torch's global generator (torchvision's very calls and
    order, so results equal torchvision's Compose); ``draw(image, generator)`` returns the
    parameters of one view as a JSON-able dict::

        {"crop": [top, left, height, width], "flip": bool, "jitter": [[op, factor], ...], "gray": bool}

    (``jitter``: torchvision's random order of brightness 0 / contrast 1 / saturation 2 /
    hue 3 with their factors) and ``apply(image, params)`` renders exactly that view.
    ``settings()`` names everything that decides what a view looks like (for cache manifests).
    """

    def __init__(self, size, mean, std, interpolation="bicubic", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, color_jitter=None, grayscale: float = 0.0, antialias: bool = True):
        self.size = _size2(size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.interpolation = interpolation_mode(interpolation)
        self.scale, self.ratio = tuple(float(x) for x in scale), tuple(float(x) for x in ratio)
        self.hflip, self.grayscale, self.antialias = float(hflip), float(grayscale), bool(antialias)
        self.color_jitter = color_jitter
        self.jitter = _jitter_ranges(color_jitter)
        if not (0 <= self.hflip <= 1 and 0 <= self.grayscale <= 1):
            raise ValueError(f"hflip and grayscale are probabilities in [0, 1], got {hflip} and {grayscale}")

    # ------------------------------------------------------------------ parameters
    def draw(self, image, generator: torch.Generator | None = None) -> dict[str, Any]:
        """The parameters of one random view of ``image`` (PIL), drawn from ``generator``
        (None: torch's global generator), in torchvision's order of random calls."""
        g = generator
        width, height = image.size
        crop = self._crop_box(height, width, g)
        # A step that is switched off draws nothing, as in torchvision's Compose.
        flip = bool(torch.rand(1, generator=g) < self.hflip) if self.hflip > 0 else False
        jitter = []
        if any(r is not None for r in self.jitter):
            order = torch.randperm(4, generator=g).tolist()
            factors = [None if r is None else float(torch.empty(1).uniform_(r[0], r[1], generator=g))
                       for r in self.jitter]
            jitter = [[op, factors[op]] for op in order if factors[op] is not None]
        gray = bool(torch.rand(1, generator=g) < self.grayscale) if self.grayscale > 0 else False
        return {"crop": list(crop), "flip": flip, "jitter": jitter, "gray": gray}

    def _crop_box(self, height: int, width: int, g) -> tuple[int, int, int, int]:
        # torchvision's RandomResizedCrop.get_params, with a generator.
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=g).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
                j = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
                return i, j, h, w
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    # ------------------------------------------------------------------ rendering
    def apply(self, image, params: dict[str, Any]) -> torch.Tensor:
        """Render the view ``params`` (from ``draw``) of ``image`` (PIL): normalised ``[3, H, W]``."""
        top, left, h, w = params["crop"]
        image = F.resized_crop(image, top, left, h, w, list(self.size), self.interpolation, antialias=self.antialias)
        if params["flip"]:
            image = F.hflip(image)
        for op, factor in params["jitter"]:
            image = _JITTER_OPS[op](image, factor)
        if params["gray"]:
            image = F.rgb_to_grayscale(image, num_output_channels=len(image.getbands()))
        return F.normalize(F.to_tensor(_to_rgb(image)), self.mean, self.std)

    def __call__(self, image) -> torch.Tensor:
        return self.apply(image, self.draw(image))

    def settings(self) -> dict[str, Any]:
        """What decides the views (JSON-able): size, normalisation, filter and the random ranges."""
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation.value, "antialias": self.antialias,
                "scale": list(self.scale), "ratio": list(self.ratio), "hflip": self.hflip,
                "color_jitter": [None if r is None else list(r) for r in self.jitter], "grayscale": self.grayscale}

    def __repr__(self) -> str:
        return f"ReplayableTrainTransform({', '.join(f'{k}={v}' for k, v in self.settings().items())})"


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
) -> ReplayableTrainTransform:
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

    Returns a ``ReplayableTrainTransform`` (its views can be drawn from a seed and replayed).
    """
    return ReplayableTrainTransform(size, mean, std, interpolation, scale, ratio, hflip, color_jitter, grayscale)


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

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

Its ``decode`` path (``data.decode.DECODE_PATHS``) says how a JPEG given as an
``EncodedImage`` (``decode_sample(..., lazy=True)``) becomes pixels. ``reduced`` draws the
crop box in full-image coordinates from the header's size, decodes at the largest
DCT reduction (8, 4 or 2) that still leaves the crop at least the output size (``reduction``),
and resizes the crop's exact, fractional box of the reduced image: the same geometry as the
full decode, pixels within a few grey levels of it (BENCHMARKS.md has the measured bound). A
view whose crop is smaller than twice the output (most views of ImageNet's 500 x 375 images at
224) decodes whole and gives exactly the full path's pixels, as do images that are not JPEGs.
``fast`` (the default) decodes as ``reduced`` does, with libjpeg-turbo through simplejpeg (the
same decoded pixels), and resizes the crops it did not reduce with torch's antialiased uint8
kernels (``resized_crop_uint8``: PIL's resize to one grey level but for a few pixels in a
million, and the very pixels on every CPU); its reduced views are ``reduced``'s pixels exactly.
``full`` decodes whole. A PIL image is always rendered the ``full`` way.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from .decode import DEFAULT_DECODE, EncodedImage, check_decode_path

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

# JPEG's DCT-domain reductions (libjpeg's 1/2, 1/4, 1/8), largest first.
_REDUCTIONS = (8, 4, 2)


def reduction(crop_height: int, crop_width: int, out_height: int, out_width: int) -> int:
    """The largest JPEG reduction (8, 4, 2, else 1) at which a crop of ``crop_height x crop_width``
    full-image pixels still covers at least ``out_height x out_width`` pixels, so that the
    resize after it still shrinks (or keeps) the crop and never enlarges it."""
    for factor in _REDUCTIONS:
        if crop_height >= factor * out_height and crop_width >= factor * out_width:
            return factor
    return 1


def _reduced_box(factor: int, top: int, left: int, height: int, width: int, image_width: int,
                 image_height: int) -> tuple[tuple[int, int, int, int], tuple[float, float, float, float]]:
    """The full image's box ``(top, left, height, width)`` on the image decoded ``factor`` times
    smaller: the whole pixels around it ``(x0, y0, x1, y1)``, and the box inside them (fractional)."""
    x0, y0 = left / factor, top / factor
    x1, y1 = (left + width) / factor, (top + height) / factor
    ix0, iy0 = math.floor(x0), math.floor(y0)
    ix1, iy1 = min(image_width, math.ceil(x1)), min(image_height, math.ceil(y1))
    return (ix0, iy0, ix1, iy1), (x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0)


def resized_crop_reduced(image: Image.Image | np.ndarray, factor: int, top: int, left: int, height: int, width: int,
                         size: Sequence[int], interpolation: InterpolationMode) -> Image.Image:
    """``F.resized_crop`` of the full image's box ``(top, left, height, width)``, done on ``image``
    (PIL, or a ``[H, W, 3]`` uint8 array), that image decoded ``factor`` times smaller (its pixel
    ``i`` covers full pixels ``[i * factor, (i + 1) * factor)``): the box becomes fractional there,
    and PIL resizes exactly that box.

    As ``F.resized_crop`` does on the full image, the filter sees only the crop's pixels: the
    reduced image is first cut at the whole pixels around the box."""
    if isinstance(image, np.ndarray):
        (ix0, iy0, ix1, iy1), box = _reduced_box(factor, top, left, height, width, image.shape[1], image.shape[0])
        region = Image.fromarray(image[iy0:iy1, ix0:ix1])
    else:
        (ix0, iy0, ix1, iy1), box = _reduced_box(factor, top, left, height, width, image.width, image.height)
        region = image.crop((ix0, iy0, ix1, iy1))
    return region.resize((int(size[1]), int(size[0])), F.pil_modes_mapping[interpolation], box=box)


# The filters torch resizes uint8 images with, antialiased as PIL's (bit for bit on the same kernels everywhere).
_TORCH_FILTERS = {InterpolationMode.BICUBIC: "bicubic", InterpolationMode.BILINEAR: "bilinear"}


def resized_crop_uint8(pixels: np.ndarray, top: int, left: int, height: int, width: int, size: Sequence[int],
                       interpolation: InterpolationMode) -> torch.Tensor:
    """``F.resized_crop`` of a PIL image, done on its ``[H, W, 3]`` uint8 array by torch's
    antialiased uint8 resize (channels-last, AVX2 where the CPU has it, 4-5x PIL's speed there):
    a ``[3, h, w]`` uint8 tensor, PIL's pixels to one grey level but for a few in a million (at
    most 3 levels off on ImageNet-like JPEGs; its fixed-point arithmetic is PIL's, its rounding
    not everywhere). The same pixels with and without the SIMD kernel. Bicubic and bilinear only
    (``_TORCH_FILTERS``); the box must lie inside the image."""
    crop = torch.from_numpy(pixels[top:top + height, left:left + width]).permute(2, 0, 1).unsqueeze(0)
    crop = crop.contiguous(memory_format=torch.channels_last)  # the layout the SIMD kernel reads
    out = torch.nn.functional.interpolate(crop, size=(int(size[0]), int(size[1])), mode=_TORCH_FILTERS[interpolation],
                                          align_corners=False, antialias=True)
    return out[0]


def _uint8_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image's pixels as a contiguous ``[3, H, W]`` uint8 tensor."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _to_normalized_tensor(image: Image.Image | torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``F.normalize(F.to_tensor(image), mean, std)`` for an RGB PIL image (or its ``[3, H, W]``
    uint8 tensor), bit for bit, with fewer copies (to_tensor copies the pixels twice, normalize
    clones the result)."""
    pixels = _uint8_pixels(image) if isinstance(image, Image.Image) else image.contiguous()
    return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)


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
    hue 3 with their factors) and ``apply(image, params)`` renders exactly that view:
    ``normalize(render(image, params))``, ``render`` giving its uint8 pixels (the training stream
    normalises them a batch at a time, or leaves that to the device: ``uint8_batches``).
    ``settings()`` names everything that decides what a view looks like (for cache manifests),
    the decode path included. ``image`` is a PIL image or an ``EncodedImage`` (JPEG bytes,
    decoded as ``decode`` says; see the module doc); ``lazy`` tells a loader which to give.
    """

    def __init__(self, size, mean, std, interpolation="bicubic", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5, color_jitter=None, grayscale: float = 0.0, antialias: bool = True,
                 decode: str = DEFAULT_DECODE):
        self.size = _size2(size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.interpolation = interpolation_mode(interpolation)
        self.scale, self.ratio = tuple(float(x) for x in scale), tuple(float(x) for x in ratio)
        self.hflip, self.grayscale, self.antialias = float(hflip), float(grayscale), bool(antialias)
        self.color_jitter = color_jitter
        self.jitter = _jitter_ranges(color_jitter)
        if not (0 <= self.hflip <= 1 and 0 <= self.grayscale <= 1):
            raise ValueError(f"hflip and grayscale are probabilities in [0, 1], got {hflip} and {grayscale}")
        try:
            check_decode_path(decode)
        except ValueError as exn:
            raise ValueError(f"decode {exn}") from None
        self.decode = decode
        self._mean = torch.tensor(self.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.std).view(-1, 1, 1)
        # torchvision's float32 logarithms of the aspect ratios, computed once instead of per draw.
        self._log_ratio = tuple(float(x) for x in torch.log(torch.tensor(self.ratio)))

    @property
    def lazy(self) -> bool:
        """Whether this transform wants JPEGs as ``EncodedImage`` (``decode_sample(raw, lazy=...)``)."""
        return self.decode in ("reduced", "fast")

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
        log_ratio = self._log_ratio
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
        """Render the view ``params`` (from ``draw``) of ``image`` (PIL or ``EncodedImage``):
        normalised ``[3, H, W]`` (``normalize(render(image, params))``). A JPEG that does not
        decode raises ``data.decode.DecodeError``."""
        return self.normalize(self.render(image, params))

    def render(self, image, params: dict[str, Any]) -> torch.Tensor:
        """The view ``params`` of ``image`` before normalisation: ``[3, H, W]`` uint8, contiguous.
        The training stream renders its samples so and normalises whole batches (the same numbers)."""
        top, left, h, w = params["crop"]
        if isinstance(image, EncodedImage):
            factor = reduction(h, w, *self.size) if self.decode in ("reduced", "fast") else 1
            if self.decode == "fast":
                pixels, factor = image.pixels(factor)
                if factor == 1 and self.interpolation in _TORCH_FILTERS:
                    return self._finish_uint8(resized_crop_uint8(pixels, top, left, h, w, self.size,
                                                                 self.interpolation), params)
                image = pixels if factor > 1 else Image.fromarray(pixels)
            else:
                image, factor = image.decode(factor)
            if factor > 1:
                image = resized_crop_reduced(image, factor, top, left, h, w, self.size, self.interpolation)
                return self._finish(image, params)
        image = F.resized_crop(image, top, left, h, w, list(self.size), self.interpolation, antialias=self.antialias)
        return self._finish(image, params)

    def normalize(self, pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 views ``[..., 3, H, W]`` -> float32, normalised (into ``out`` when given, e.g. a
        view's place in its batch), on the device they are on: ``F.normalize(F.to_tensor(view))``
        bit for bit (a conversion, a division and a subtraction, each rounded as IEEE says)."""
        mean, std = self._mean, self._std
        if pixels.device != mean.device:
            mean, std = mean.to(pixels.device), std.to(pixels.device)
        out = pixels.to(torch.float32) if out is None else out.copy_(pixels)
        return out.div_(255).sub_(mean).div_(std)

    def _finish_uint8(self, pixels: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        """``_finish`` of a resized crop given as a ``[3, H, W]`` uint8 tensor: the same pixels."""
        if params["jitter"] or params["gray"]:  # PIL's colour operations, as on every other path
            return self._finish(Image.fromarray(pixels.permute(1, 2, 0).numpy()), params)
        return (pixels.flip(-1) if params["flip"] else pixels).contiguous()

    def _finish(self, image, params: dict[str, Any]) -> torch.Tensor:
        """Flip, jitter and grayscale a resized PIL crop: its ``[3, H, W]`` uint8 pixels."""
        if params["flip"]:
            image = F.hflip(image)
        for op, factor in params["jitter"]:
            image = _JITTER_OPS[op](image, factor)
        if params["gray"]:
            image = F.rgb_to_grayscale(image, num_output_channels=len(image.getbands()))
        return _uint8_pixels(_to_rgb(image))

    def __call__(self, image) -> torch.Tensor:
        return self.apply(image, self.draw(image))

    def settings(self) -> dict[str, Any]:
        """What decides the views (JSON-able): size, normalisation, filter and the random ranges."""
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation.value, "antialias": self.antialias,
                "scale": list(self.scale), "ratio": list(self.ratio), "hflip": self.hflip,
                "color_jitter": [None if r is None else list(r) for r in self.jitter], "grayscale": self.grayscale,
                "decode": self.decode}

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
    decode: str = DEFAULT_DECODE,
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
        decode: how JPEGs given as ``EncodedImage`` are decoded: ``fast``, ``reduced`` or ``full``
            (see the module doc).

    Returns a ``ReplayableTrainTransform`` (its views can be drawn from a seed and replayed).
    """
    return ReplayableTrainTransform(size, mean, std, interpolation, scale, ratio, hflip, color_jitter, grayscale,
                                    decode=decode)


class EvalTransform:
    """Resize (the shorter side to ``resize``, or to ``(h, w)``), centre-crop ``size``, normalise.

    On a PIL image these are torchvision's ``Resize``, ``CenterCrop``, ``ToTensor`` and
    ``Normalize`` (``steps``). An ``EncodedImage`` is decoded as ``decode`` says: ``reduced``
    decodes at the largest DCT reduction that keeps the resized size (the whole image is the
    crop here), ``fast`` does so with libjpeg-turbo and resizes with torch's uint8 kernels. The
    evaluation loaders give PIL images (whole decodes, as published accuracies are measured);
    ``benchmarks/data_speed.py`` measures what ``reduced`` and ``fast`` would gain there.
    """

    def __init__(self, size, mean, std, interpolation="bicubic", resize=None, decode: str = "full"):
        self.size = _size2(size)
        self.resize = resize if resize is not None else self.size[0]
        self.interpolation = interpolation_mode(interpolation)
        check_decode_path(decode)
        self.decode = decode
        self._mean = torch.tensor(tuple(float(m) for m in mean)).view(-1, 1, 1)
        self._std = torch.tensor(tuple(float(s) for s in std)).view(-1, 1, 1)
        self.steps = T.Compose([T.Resize(self.resize, interpolation=self.interpolation, antialias=True),
                                T.CenterCrop(self.size), T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(h, w)`` of an image of ``width x height`` after ``Resize`` (torchvision's rounding)."""
        if not isinstance(self.resize, int):
            return tuple(self.resize)
        short, long = (width, height) if width <= height else (height, width)
        long = int(self.resize * long / short)
        return (long, self.resize) if width <= height else (self.resize, long)

    @property
    def lazy(self) -> bool:
        return self.decode in ("reduced", "fast")

    def __call__(self, image) -> torch.Tensor:
        if not isinstance(image, EncodedImage):
            return self.steps(image)
        width, height = image.size
        out_h, out_w = self.resized_size(width, height)
        factor = reduction(height, width, out_h, out_w) if self.decode in ("reduced", "fast") else 1
        if self.decode == "fast":
            pixels, factor = image.pixels(factor)
            if factor == 1 and self.interpolation in _TORCH_FILTERS:
                resized = resized_crop_uint8(pixels, 0, 0, height, width, (out_h, out_w), self.interpolation)
                return _to_normalized_tensor(F.center_crop(resized, list(self.size)), self._mean, self._std)
            if factor == 1:
                return self.steps(Image.fromarray(pixels))
        else:
            pixels, factor = image.decode(factor)
            if factor == 1:
                return self.steps(pixels)
        pixels = resized_crop_reduced(pixels, factor, 0, 0, height, width, (out_h, out_w), self.interpolation)
        return _to_normalized_tensor(F.center_crop(pixels, list(self.size)), self._mean, self._std)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, resize={self.resize}, {self.interpolation.value}, decode={self.decode})"


def eval_transform(
    size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    decode: str = "full",
) -> EvalTransform:
    """Resize the shorter side to ``size / crop_pct``, centre-crop ``size``, normalise.

    ``crop_pct=1.0`` is CLIP's preprocessing (resize to ``size``, centre crop); 0.875 is the
    classic ImageNet evaluation. ``decode`` applies to ``EncodedImage`` inputs (``EvalTransform``).
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    h, w = _size2(size)
    resize = math.floor(h / crop_pct) if h == w else (math.floor(h / crop_pct), math.floor(w / crop_pct))
    return EvalTransform((h, w), mean, std, interpolation, resize, decode)


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

"""Decoding raw WebDataset samples, and skipping (and counting) the ones that do not decode.

``decode_sample`` turns ``{"jpg": bytes, "cls": b"3", "txt": b"...", ...}`` into a PIL image,
a label and a caption; it raises ``DecodeError`` naming the sample key and shard. A
``SkipCounter`` is the webdataset exception handler (``wds.map(decode_sample,
handler=counter)``): it skips such samples, counts them, remembers their names and warns.

Counting happens where decoding happens — inside DataLoader workers — so a worker's counts
cannot be read from the main process directly. The training stream therefore ships the
names of the samples skipped since its previous batch inside that batch
(``extras["skipped"]``) and ``data.stream.TrainLoader.stats`` adds them up in the main process.

Decode paths (``DECODE_PATHS``, the recipe's ``data.decode``, ``DEFAULT_DECODE`` unless set):
``full`` decodes every image whole with PIL before the augmentation; ``reduced`` keeps a JPEG's
bytes until the crop of its view is known (``decode_sample(..., lazy=True)`` gives an
``EncodedImage``) and then decodes it 2, 4 or 8 times smaller in the DCT domain when the crop
still covers the output size at that scale (``data.transforms``); ``fast`` (the default) does
what ``reduced`` does with libjpeg-turbo called through simplejpeg (``EncodedImage.pixels``: the
same pixels as PIL's decoding, without its copies) and resizes the crops that are not reduced
with torch's antialiased uint8 kernels (PIL's resize to one grey level but for a few pixels in a
million; BENCHMARKS.md has the measured bound).
``check_decode_path`` says in one line what is wrong with a path name and how to fix it
(benchmarks/data_speed.py also times torchvision's and torchcodec's CPU decoders and batched
GPU decoding, which are not paths of the training stream).
"""

from __future__ import annotations

import difflib
import io
import warnings

import numpy as np
from PIL import Image

from .shards import IMAGE_KEYS

#: Training and evaluation images with more pixels than this are skipped (and counted) before
#: they are decoded (recipe key ``data.max_pixels``). 64 MP is above what cameras write (the
#: largest full-frame sensors give 61 MP) and well below PIL's own limits (a warning at 89 MP,
#: an error at 179 MP), so no photograph is lost, while a panorama, scan or hostile file of
#: 144 MP (seconds and 1.4 GB to decode, per sample) is. Decoding 64 MP takes about 200 MB.
DEFAULT_MAX_PIXELS = 64_000_000

# PIL's modes of 16-bit grey images (PNG, TIFF: I;16...; 16-bit PGM: I), which convert("RGB") clips at 255.
_WIDE_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class DecodeError(ValueError):
    """A sample whose image (or label) cannot be decoded. ``sample_id`` is ``"shard#key"``."""

    def __init__(self, message: str, sample_id: str = ""):
        super().__init__(message)
        self.sample_id = sample_id


DECODE_PATHS = ("fast", "reduced", "full")
DEFAULT_DECODE = "fast"

# The colour spaces whose conversion to RGB libjpeg-turbo does as PIL does (CMYK and YCCK files are left to PIL).
_TURBO_COLORSPACES = ("YCbCr", "Gray", "RGB")


def _simplejpeg():
    """The simplejpeg module (libjpeg-turbo, a dependency of this package), or None where it is missing."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def check_decode_path(name: str) -> None:
    """Raise ``ValueError`` (one line: the problem and the fix) unless ``name`` is a decode path.
    The message starts with the value, so callers can prefix the key."""
    choose = f"choose {', '.join(DECODE_PATHS[:-1])} or {DECODE_PATHS[-1]} (default {DEFAULT_DECODE})"
    if name in ("cuda", "gpu", "nvjpeg", "torchcodec-cuda"):
        raise ValueError(f"{name!r} is not a training decode path: the training stream decodes in CPU loader workers "
                         f"(GPU decoding is measured by python benchmarks/data_speed.py --paths cuda, on a machine "
                         f"with a CUDA GPU); {choose}")
    if name in ("torchvision", "torchcodec"):
        raise ValueError(f"{name!r} is not a training decode path: benchmarks/data_speed.py measures its CPU decoder, "
                         f"no faster than PIL here (torchvision.io's decoders are deprecated since torchvision 0.29); "
                         f"{choose}")
    if name == "fast" and _simplejpeg() is None:
        raise ValueError("'fast' needs simplejpeg (libjpeg-turbo), which is not installed: pip install simplejpeg, "
                         "or choose reduced (PIL, the same decoded pixels, slower)")
    if name not in DECODE_PATHS:
        close = difflib.get_close_matches(str(name), DECODE_PATHS, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"{name!r} is not a decode path; {choose}.{hint}")


class EncodedImage:
    """A JPEG's bytes with only its header read: ``size`` (width, height) is known, the pixels
    are decoded when a view asks for them, whole or reduced.

    ``decode(reduce)`` returns ``(RGB PIL image, factor)``: with ``reduce`` 2, 4 or 8, libjpeg
    decodes the image that many times smaller in the DCT domain (pixel ``i`` of the result
    covers pixels ``[i * factor, (i + 1) * factor)`` of the full image); ``factor`` is the
    reduction it applied. ``pixels(reduce)`` returns the same pixels as a ``[height, width, 3]``
    uint8 array, decoded by libjpeg-turbo through simplejpeg (faster: no PIL image, no copies).
    A decoding failure raises ``DecodeError`` naming the sample. Decoded pixels are kept per
    reduction, so several views of one image decode it once per reduction.
    """

    __slots__ = ("data", "size", "sample_id", "_decoded")

    def __init__(self, data: bytes, size: tuple[int, int], sample_id: str = ""):
        self.data, self.size, self.sample_id = data, tuple(size), sample_id
        self._decoded: dict = {}

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def decode(self, reduce: int = 1) -> tuple[Image.Image, int]:
        if reduce not in self._decoded:
            try:
                img = Image.open(io.BytesIO(self.data))
                factor = 1
                if reduce > 1:
                    # draft() picks the largest of 8, 4, 2 not above min(width // w, height // h).
                    drafted = img.draft("RGB", (self.size[0] // reduce, self.size[1] // reduce))
                    if drafted is not None:
                        factor = round(self.size[0] / drafted[1][2])
                img.load()  # truncated data fails here
                # convert() would copy an RGB image; the decoded one serves as it is.
                image = img if img.mode == "RGB" else img.convert("RGB")
            except Exception as exn:  # PIL raises many exception types for bad bytes
                raise DecodeError(f"cannot decode image {self.sample_id}: {type(exn).__name__}: {exn}",
                                  self.sample_id) from exn
            self._decoded[reduce] = (image, factor)
        return self._decoded[reduce]

    def pixels(self, reduce: int = 1) -> tuple[np.ndarray, int]:
        """``decode(reduce)``'s pixels, bit for bit, as a ``[height, width, 3]`` uint8 array, and the
        reduction applied. libjpeg-turbo decodes them through simplejpeg; a file it refuses (or
        only warns about) and CMYK files are decoded by PIL, which decides whether they decode."""
        key = ("pixels", reduce)
        if key not in self._decoded:
            self._decoded[key] = self._turbo(reduce) or self._pil_pixels(reduce)
        return self._decoded[key]

    def _turbo(self, reduce: int) -> tuple[np.ndarray, int] | None:
        simplejpeg = _simplejpeg()
        if simplejpeg is None:
            return None
        width, height = self.size
        factor = reduce if reduce in (2, 4, 8) else 1
        # simplejpeg picks the smallest of libjpeg-turbo's scales that gives at least this size: 1 / factor.
        want = (-(-height // factor), -(-width // factor))
        try:
            if simplejpeg.decode_jpeg_header(self.data)[2] not in _TURBO_COLORSPACES:
                return None
            # strict: a warning (extraneous bytes, a premature end) is an error here, and PIL then decides.
            out = simplejpeg.decode_jpeg(self.data, "RGB", min_height=want[0] if factor > 1 else 0,
                                         min_width=want[1] if factor > 1 else 0, strict=True)
        except ValueError:
            return None
        return (out, factor) if out.shape[:2] == want else None

    def _pil_pixels(self, reduce: int) -> tuple[np.ndarray, int]:
        image, factor = self.decode(reduce)
        return np.array(image, dtype=np.uint8), factor

    def __repr__(self) -> str:
        return f"EncodedImage({self.sample_id or 'JPEG'}, size={self.size}, {len(self.data)} bytes)"


def decode_sample(sample: dict, max_pixels: int | None = DEFAULT_MAX_PIXELS, lazy: bool = False) -> dict:
    """Decode a raw sample into ``{"image": PIL RGB, "cls": int (-1 if none), "txt": str, ...}``.

    The image is the first of ``IMAGE_KEYS`` present (``jpg`` for img2dataset and ImageNet
    shards, ``png`` for the demo). ``cls`` is -1 and ``txt`` empty when the sample has none.
    See ``open_image`` for ``max_pixels`` and 16-bit images.
    ``lazy=True`` reads only the header of a JPEG and gives an ``EncodedImage`` (decoded by the
    transform, at the size its view needs; a truncated JPEG then fails there, with a
    ``DecodeError``); other formats are decoded here as without it.

    Raises:
        DecodeError: no image key, undecodable/truncated image, one above ``max_pixels``, or
            malformed ``cls``.
    """
    key, url = sample.get("__key__"), sample.get("__url__")
    try:
        ext = next((k for k in IMAGE_KEYS if k in sample), None)
        if ext is None:
            raise ValueError(f"no image in sample (keys: {sorted(k for k in sample if not k.startswith('__'))})")
        image = open_image(sample[ext], max_pixels, lazy_id=f"{url}#{key}" if lazy else None)
        label = int(sample["cls"]) if "cls" in sample else -1
        text = sample["txt"].decode("utf-8") if "txt" in sample else ""
    except Exception as exn:  # PIL raises many exception types for bad bytes
        raise DecodeError(f"cannot decode sample {key!r} in shard {url}: {type(exn).__name__}: {exn}",
                          f"{url}#{key}") from exn
    return {"image": image, "cls": label, "txt": text, "__key__": key, "__url__": url}


class TooManyPixels(ValueError):
    """An image larger than the pixel limit (checked from its header, before decoding)."""


def open_image(source, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               lazy_id: str | None = None) -> Image.Image | EncodedImage:
    """Decode an image (bytes, a path or a file object) to RGB, after checking its size against
    ``max_pixels`` (None: no limit of ours) from its header.

    16-bit grey images are scaled to 8 bits by their high byte, as PIL and libpng do for 48-bit
    RGB, so a 16-bit grey picture and its 48-bit RGB copy give the same pixels. With ``lazy_id``
    (the sample's name), a JPEG given as bytes is not decoded here: it comes back as an
    `EncodedImage`, which a view decodes at the size it needs.

    Raises:
        TooManyPixels: the image is larger than ``max_pixels``.
        Exception: whatever PIL raises for bytes it cannot decode (truncated, corrupt).
    """
    if lazy_id is not None and isinstance(source, bytes) and source[:3] == b"\xff\xd8\xff":
        encoded = _encoded_jpeg(source, max_pixels, lazy_id)
        if encoded is not None:
            return encoded
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with warnings.catch_warnings():
        # PIL warns of decompression bombs when it opens one: the size is checked here instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(source)
    with img:
        _check_pixels(*img.size, max_pixels)
        if lazy_id is not None and img.format == "JPEG" and isinstance(source, io.BytesIO):
            return EncodedImage(source.getvalue(), img.size, lazy_id)
        if img.mode in _WIDE_GREY:
            grey = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
            return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
        return img.convert("RGB")  # convert() loads the pixels: truncated data fails here


def _encoded_jpeg(data: bytes, max_pixels: int | None, sample_id: str) -> EncodedImage | None:
    """A JPEG's header read by libjpeg-turbo (a microsecond; PIL's parser takes a hundred):
    its ``EncodedImage``, or None where simplejpeg is missing or refuses the header (PIL then reads it)."""
    simplejpeg = _simplejpeg()
    if simplejpeg is None:
        return None
    try:
        height, width = simplejpeg.decode_jpeg_header(data)[:2]
    except ValueError:
        return None
    _check_pixels(width, height, max_pixels)
    return EncodedImage(data, (width, height), sample_id)


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixels(f"{width}x{height} is {width * height:,} pixels, more than the limit of {max_pixels:,} "
                            f"(data.max_pixels / eval.max_pixels); it is not decoded")


class SkipCounter:
    """webdataset exception handler: skip, count and warn about undecodable samples.

    Any exception other than ``DecodeError`` is re-raised — bugs in a transform must not be
    silently skipped. At most ``max_warnings`` warnings are given per counter (one process),
    after which samples are still counted.
    """

    def __init__(self, max_warnings: int = 20):
        self.count = 0
        self.max_warnings = max_warnings
        self._pending: list[str] = []
        self._bad_shards: list[str] = []

    def bad_shard(self, url: str, exn: Exception, lost: int) -> None:
        """A shard that became unreadable in the middle of a run: its remaining `lost` samples are
        skipped (counted), it is named, and the stream goes on with the next shard."""
        self.count += lost
        self._pending.extend(f"{url}#<unread sample {i + 1} of {lost}>" for i in range(lost))
        self._bad_shards.append(url)
        warnings.warn(f"skipping the rest of shard {url} ({lost} samples): {exn}", RuntimeWarning, stacklevel=2)

    def drain_bad_shards(self) -> list[str]:
        """The shards found unreadable since the last call."""
        out, self._bad_shards = self._bad_shards, []
        return out

    def __call__(self, exn: Exception) -> bool:
        if not isinstance(exn, DecodeError):
            raise exn
        self.count += 1
        self._pending.append(exn.sample_id)
        if self.count <= self.max_warnings:
            more = " (further skips are counted but not warned about)" if self.count == self.max_warnings else ""
            warnings.warn(f"skipping: {exn}{more}", RuntimeWarning, stacklevel=2)
        return True  # continue with the next sample

    def drain(self) -> list[str]:
        """The ``"shard#key"`` names skipped since the last call."""
        out, self._pending = self._pending, []
        return out

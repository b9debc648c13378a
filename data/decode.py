"""Decoding raw WebDataset samples, and skipping (and counting) the ones that do not decode.

``decode_sample`` turns ``{"jpg": bytes, "cls": b"3", "txt": b"...", ...}`` into a PIL image,
a label and a caption; it raises ``DecodeError`` naming the sample key and shard. A
``SkipCounter`` is the webdataset exception handler (``wds.map(decode_sample,
handler=counter)``): it skips such samples, counts them, remembers their names and warns.

Counting happens where decoding happens — inside DataLoader workers — so a worker's counts
cannot be read from the main process directly. The training stream therefore ships the
names of the samples skipped since its previous batch inside that batch
(``extras["skipped"]``) and ``data.stream.TrainLoader.stats`` adds them up in the main process.
"""

from __future__ import annotations

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


def decode_sample(sample: dict, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict:
    """Decode a raw sample into ``{"image": PIL RGB, "cls": int (-1 if none), "txt": str, ...}``.

    The image is the first of ``IMAGE_KEYS`` present (``jpg`` for img2dataset and ImageNet
    shards, ``png`` for the demo). ``cls`` is -1 and ``txt`` empty when the sample has none.
    See ``open_image`` for ``max_pixels`` and 16-bit images.

    Raises:
        DecodeError: no image key, undecodable/truncated image, one above ``max_pixels``, or
            malformed ``cls``.
    """
    key, url = sample.get("__key__"), sample.get("__url__")
    try:
        ext = next((k for k in IMAGE_KEYS if k in sample), None)
        if ext is None:
            raise ValueError(f"no image in sample (keys: {sorted(k for k in sample if not k.startswith('__'))})")
        image = open_image(sample[ext], max_pixels)
        label = int(sample["cls"]) if "cls" in sample else -1
        text = sample["txt"].decode("utf-8") if "txt" in sample else ""
    except Exception as exn:  # PIL raises many exception types for bad bytes
        raise DecodeError(f"cannot decode sample {key!r} in shard {url}: {type(exn).__name__}: {exn}",
                          f"{url}#{key}") from exn
    return {"image": image, "cls": label, "txt": text, "__key__": key, "__url__": url}


class TooManyPixels(ValueError):
    """An image larger than the pixel limit (checked from its header, before decoding)."""


def open_image(source, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image (bytes, a path or a file object) to RGB, after checking its size against
    ``max_pixels`` (None: no limit of ours) from its header.

    16-bit grey images are scaled to 8 bits by their high byte, as PIL and libpng do for 48-bit
    RGB, so a 16-bit grey picture and its 48-bit RGB copy give the same pixels.

    Raises:
        TooManyPixels: the image is larger than ``max_pixels``.
        Exception: whatever PIL raises for bytes it cannot decode (truncated, corrupt).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with warnings.catch_warnings():
        # PIL warns of decompression bombs when it opens one: the size is checked here instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(source)
    with img:
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise TooManyPixels(f"{width}x{height} is {width * height:,} pixels, more than the limit of {max_pixels:,} "
                                f"(data.max_pixels / eval.max_pixels); it is not decoded")
        if img.mode in _WIDE_GREY:
            grey = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
            return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
        return img.convert("RGB")  # convert() loads the pixels: truncated data fails here


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

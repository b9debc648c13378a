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

from PIL import Image

from .shards import IMAGE_KEYS


class DecodeError(ValueError):
    """A sample whose image (or label) cannot be decoded. ``sample_id`` is ``"shard#key"``."""

    def __init__(self, message: str, sample_id: str = ""):
        super().__init__(message)
        self.sample_id = sample_id


def decode_sample(sample: dict) -> dict:
    """Decode a raw sample into ``{"image": PIL RGB, "cls": int (-1 if none), "txt": str, ...}``.

    The image is the first of ``IMAGE_KEYS`` present (``jpg`` for img2dataset and ImageNet
    shards, ``png`` for the demo). ``cls`` is -1 and ``txt`` empty when the sample has none.

    Raises:
        DecodeError: no image key, undecodable/truncated image, or malformed ``cls``.
    """
    key, url = sample.get("__key__"), sample.get("__url__")
    try:
        ext = next((k for k in IMAGE_KEYS if k in sample), None)
        if ext is None:
            raise ValueError(f"no image in sample (keys: {sorted(k for k in sample if not k.startswith('__'))})")
        with Image.open(io.BytesIO(sample[ext])) as img:
            image = img.convert("RGB")  # convert() loads the pixels: truncated data fails here
        label = int(sample["cls"]) if "cls" in sample else -1
        text = sample["txt"].decode("utf-8") if "txt" in sample else ""
    except Exception as exn:  # PIL raises many exception types for bad bytes
        raise DecodeError(f"cannot decode sample {key!r} in shard {url}: {type(exn).__name__}: {exn}",
                          f"{url}#{key}") from exn
    return {"image": image, "cls": label, "txt": text, "__key__": key, "__url__": url}


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

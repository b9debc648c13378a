"""Shrinking large JPEGs while shards are written (``python -m data.make_shards --max-size S``).

As img2dataset's ``resize_mode="keep_ratio"`` with ``resize_only_if_bigger``: a JPEG whose
SHORTER side exceeds ``S`` is resized, keeping its aspect ratio, so that its shorter side is
``S``, and re-encoded as a JPEG at quality 95 with the source's chroma subsampling (4:4:4 stays
4:4:4) and ICC profile; smaller JPEGs and other formats are stored byte for byte. The shorter
side is the one that bounds what training can see: RandomResizedCrop's largest crop and the
evaluation resize both scale the shorter side, so ``S`` at least the training crop (224 for most
teachers; ``size / crop_pct``, 256, for shards that evaluation reads) never makes a view enlarge
pixels that the original had.

The resize decodes at the largest DCT reduction that keeps at least twice the target size
(``Image.draft``, as ``Image.thumbnail`` does), then resamples with Lanczos; EXIF (so its
orientation tag) and the ICC profile are kept.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, JpegImagePlugin

QUALITY = 95

# PIL's subsampling codes, from JpegImagePlugin.get_sampling: 0 4:4:4, 1 4:2:2, 2 4:2:0.
_KNOWN_SAMPLING = (0, 1, 2)


def check_max_size(max_size: int | None, crop: int) -> None:
    """Raise ``ValueError`` (one line with the fix) when ``max_size`` is below the training crop."""
    if max_size is not None and max_size < crop:
        raise ValueError(f"--max-size {max_size} is below the training crop {crop}: every full-image view would be "
                         f"enlarged from fewer pixels than the originals have; use --max-size {crop} or more "
                         f"(or --crop N for a teacher with a smaller input)")


def shrink_jpeg(data: bytes, max_size: int) -> bytes | None:
    """The JPEG ``data`` re-encoded with its shorter side ``max_size``, or None when it is no JPEG
    or its shorter side is not larger than ``max_size`` (then it is kept as it is)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "JPEG" or min(img.size) <= max_size:
            return None
        width, height = img.size
        scale = max_size / min(width, height)
        size = (max_size, round(height * scale)) if width <= height else (round(width * scale), max_size)
        sampling = JpegImagePlugin.get_sampling(img)
        extra = {k: img.info[k] for k in ("icc_profile", "exif") if img.info.get(k)}
        # As Image.thumbnail: a DCT reduction that keeps at least twice the target size, then Lanczos.
        img.draft(None, (2 * size[0], 2 * size[1]))
        image = img.resize(size, Image.Resampling.LANCZOS)  # JPEG modes (L, RGB, CMYK) are kept
    out = io.BytesIO()
    options = {"quality": QUALITY, "optimize": True, **extra}
    if sampling in _KNOWN_SAMPLING:
        options["subsampling"] = sampling
    image.save(out, format="JPEG", **options)
    return out.getvalue()


def read_image_at_most(args: tuple[str, str], max_size: int, read) -> tuple[bytes | None, str]:
    """``read(args)`` (``data.shards._read_image``: the file's bytes and extension, or None and the
    error), with a JPEG larger than ``max_size`` re-encoded (``shrink_jpeg``)."""
    data, ext = read(args)
    if data is None:
        return data, ext
    try:
        smaller = shrink_jpeg(data, max_size)
    except Exception as exn:  # noqa: BLE001 - a file that reads but does not re-encode is reported and skipped
        return None, f"cannot re-encode at --max-size {max_size}: {type(exn).__name__}: {exn}"
    return (data, ext) if smaller is None else (smaller, "jpg")


def summary(before: list[int], after: list[int]) -> dict:
    """``dataset.json``'s ``reencoded``: images re-encoded, and the bytes of all images and of the
    re-encoded ones, before and after (``before``/``after``: each written image's bytes)."""
    changed = [(b, a) for b, a in zip(before, after) if b != a]
    return {"images": len(changed), "of": len(before), "bytes_before": sum(before), "bytes_after": sum(after),
            "reencoded_bytes_before": sum(b for b, _ in changed), "reencoded_bytes_after": sum(a for _, a in changed)}


def saved_line(max_size: int, s: dict) -> str:
    """What re-encoding saved, in one line (``s``: a ``summary``)."""
    saved = s["bytes_before"] - s["bytes_after"]
    return (f"--max-size {max_size}: re-encoded {s['images']} of {s['of']} images (shorter side above {max_size} px); "
            f"all images {_mb(s['bytes_before'])} -> {_mb(s['bytes_after'])} ({saved / max(s['bytes_before'], 1):.0%}, "
            f"{_mb(saved)} saved); the re-encoded ones {_mb(s['reencoded_bytes_before'])} -> "
            f"{_mb(s['reencoded_bytes_after'])}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if abs(n) >= 1e5 else f"{n / 1e3:.1f} KB"


def file_size(path: str | os.PathLike) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0

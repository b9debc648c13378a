"""Writing video shards: a folder of videos or a CSV/JSONL table of them -> WebDataset shards.

``python -m data.make_shards SRC OUT`` comes here when SRC holds videos (or with ``--media video``).
SRC is a folder with one sub-folder per class, a flat folder of videos, or a ``.csv`` / ``.jsonl``
table with a ``path`` column and optional ``caption`` and ``label`` columns (other columns are
kept in each sample's json, as video2dataset keeps ``save_additional_columns``). Relative paths
are relative to the table. Labels are class names (numbered in sorted order), or — when every
label is an integer — class indices as they are.

Each sample is what video2dataset writes — ``KEY.mp4`` (the file's bytes as they are, under its
own extension: ``webm``, ``mkv``, ...), ``KEY.txt`` (the caption, when there is one), ``KEY.json``
(source path, class name, caption, extra columns, and ``video``: frames, fps, width, height,
codec) — plus ``KEY.cls`` when the class is known. ``dataset.json`` is the image shards' (per-shard
counts, class names) with ``"media": "video"`` and ``video``: the fewest and most frames of a video
(the loaders refuse, before reading a video, a clip longer than every video). Shards video2dataset
wrote (``00000.tar`` + ``00000_stats.json``) are read as they are by ``data.video_stream``.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter
from multiprocessing import Pool
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from .shards import DATASET_JSON, IMAGE_EXTENSIONS, ShardSink, list_source, prepare_out_dir, write_dataset_json
from .video import VIDEO_EXTENSIONS, VideoDecodeError, video_backend

TABLE_SUFFIXES = (".csv", ".jsonl")
TABLE_COLUMNS = ("path", "caption", "label")


class VideoItem(NamedTuple):
    """One source video: file, its path as recorded, class name, label, caption, extra columns."""

    path: str
    rel: str
    classname: str | None = None
    label: int | None = None
    caption: str | None = None
    extra: dict | None = None


def detect_media(src: str | os.PathLike, probe: int = 1000) -> str:
    """``"video"`` for a CSV/JSONL table or a folder of videos, ``"image"`` for a folder of images or a
    text file of paths. A folder is judged by the first ``probe`` media files found in it.

    Raises:
        ValueError: a folder holding both images and videos (naming both and the fix).
    """
    src = Path(src).expanduser()
    if src.is_file():
        return "video" if src.suffix.lower() in TABLE_SUFFIXES else "image"
    if not src.is_dir():
        return "image"  # list_source names the missing path
    seen: dict[str, Path] = {}
    count = 0
    for path in src.rglob("*"):
        suffix = path.suffix.lower()
        kind = "video" if suffix in VIDEO_EXTENSIONS else "image" if suffix in IMAGE_EXTENSIONS else None
        if kind is None or path.name.startswith(".") or not path.is_file():
            continue
        seen.setdefault(kind, path)
        count += 1
        if len(seen) == 2:
            raise ValueError(f"{src} holds both images (e.g. {seen['image']}) and videos (e.g. {seen['video']}): "
                             "pass --media image or --media video (the other kind is left out)")
        if count >= probe:
            break
    return next(iter(seen), "image")


def _read_table(path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(line, row)`` of a CSV (header row) or JSONL (one object per line) table."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
        return [(n, {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}) for n, row in rows]
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exn:
            raise ValueError(f"{path}:{n}: not a JSON object ({exn}); write one object per line, e.g. "
                             '{"path": "a.mp4", "caption": "...", "label": "dancing"}') from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: not a JSON object; write one object per line")
        rows.append((n, {k: "" if v is None else str(v).strip() for k, v in row.items()}))
    return rows


def list_video_table(path: str | os.PathLike) -> tuple[list[VideoItem], list[str] | None]:
    """The videos of a CSV/JSONL table (see the module docstring) and their class names (None if unlabelled
    or labelled by integer indices)."""
    path = Path(path).expanduser()
    rows = _read_table(path)
    if not rows:
        raise ValueError(f"{path} lists no videos (a 'path' column, optional 'caption' and 'label')")
    missing = [n for n, row in rows if not row.get("path")]
    if missing:
        columns = sorted(rows[0][1])
        raise ValueError(f"{path}:{missing[0]}: no 'path' (columns found: {columns}); every row needs the video's "
                         "path in a column named 'path' (optional: 'caption', 'label')")
    labelled = [n for n, row in rows if row.get("label")]
    if labelled and len(labelled) != len(rows):
        unlabelled = next(n for n, row in rows if not row.get("label"))
        raise ValueError(f"{path}:{unlabelled}: some rows have a label and this one has none; give every row a "
                         "label or none")
    labels = [row.get("label") or None for _, row in rows]
    as_index = bool(labelled) and all(label.lstrip("-").isdigit() for label in labels)
    classnames = sorted(set(labels)) if labelled and not as_index else None
    number = {name: i for i, name in enumerate(classnames or [])}
    items = []
    for (_, row), label in zip(rows, labels):
        full = Path(row["path"]).expanduser()
        if not full.is_absolute():
            full = path.parent / full
        extra = {k: v for k, v in row.items() if k not in TABLE_COLUMNS}
        items.append(VideoItem(str(full), row["path"], None if as_index else label,
                               None if label is None else int(label) if as_index else number[label],
                               row.get("caption") or None, extra or None))
    return items, classnames


def list_video_source(src: str | os.PathLike, classes: bool | None = None) -> tuple[list[VideoItem], list[str] | None]:
    """The videos of ``src`` (class folders, a flat folder, a text file of paths, or a CSV/JSONL table) and
    the class names (None when unlabelled)."""
    src = Path(src).expanduser()
    if src.is_file() and src.suffix.lower() in TABLE_SUFFIXES:
        return list_video_table(src)
    found, classnames = list_source(src, classes, extensions=VIDEO_EXTENSIONS, what="videos")
    number = {name: i for i, name in enumerate(classnames or [])}
    return [VideoItem(path, rel, name, number.get(name)) for path, rel, name in found], classnames


def _read_video(args: tuple[str, str]) -> tuple[bytes | None, str, dict]:
    """Read a video file and check it (``verify``); returns ``(bytes, ext, video info)`` or ``(None, error, {})``."""
    path, verify = args
    ext = Path(path).suffix.lower()[1:]
    try:
        data = Path(path).read_bytes()
        if verify == "none":
            return data, ext, {}
        with video_backend("pyav").open(data, path) as video:
            info = video.info
            if verify == "full":
                decoded = video.decode_all()
                if decoded != info.num_frames:
                    raise VideoDecodeError(f"only {decoded} of its {info.num_frames} frames decode", path)
            else:
                video.get_frames([0])
        return data, ext, {"num_frames": info.num_frames, "fps": info.fps, "width": info.width,
                           "height": info.height, "codec": info.codec}
    except Exception as exn:  # any unreadable file is reported and skipped
        return None, f"{type(exn).__name__}: {exn}", {}


def make_video_shards(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    maxcount: int = 10000,
    maxsize: int = 1_000_000_000,
    *,
    classes: bool | None = None,
    shuffle: bool = True,
    seed: int = 0,
    verify: str = "header",
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the videos of ``src`` into WebDataset shards in ``out_dir`` (see the module docstring).

    Args:
        src: class folders, a flat folder, a text file of paths, or a CSV/JSONL table (``list_video_source``).
        out_dir: output folder; gets ``shard-000000.tar``, ... and ``dataset.json``.
        maxcount, maxsize: most samples / bytes per shard.
        classes: use sub-folders as classes (None: detect).
        shuffle, seed: shuffle the sample order before writing (class folders would otherwise put
            one or two classes in each shard).
        verify: ``"header"`` (default) opens each video with PyAV and decodes its first frame (no video
            stream, an unsupported codec, a file that is not a video are caught), ``"full"`` decodes every
            frame (also catches damaged streams), ``"none"`` stores files unchecked (no frame counts).
        workers: processes reading and checking videos (0: this one).
        overwrite: replace shards already in ``out_dir``.
        progress: show a progress bar.

    Returns:
        The dataset.json content (``num_samples``, ``shards``, ``classnames``, ``skipped``, ``video``, ...).
    """
    if verify not in ("full", "header", "none"):
        raise ValueError(f"verify must be 'full', 'header' or 'none', got {verify!r}")
    if verify != "none":
        video_backend("pyav")  # an ImportError saying how to install PyAV, before any work
    items, classnames = list_video_source(src, classes)
    out = prepare_out_dir(out_dir, overwrite)
    if shuffle:
        random.Random(seed).shuffle(items)
    skipped: list[dict[str, str]] = []
    keys: set[str] = set()
    frames: list[int] = []
    codecs: Counter = Counter()
    pool = Pool(workers) if workers > 0 else None
    try:
        jobs = [(item.path, verify) for item in items]
        results = pool.imap(_read_video, jobs, chunksize=4) if pool else map(_read_video, jobs)
        bar = tqdm(zip(items, results), total=len(items), desc="writing shards", unit="video", disable=not progress)
        with ShardSink(out, maxcount, maxsize) as sink:
            written = 0
            for item, (data, ext, info) in bar:
                if data is None:
                    tqdm.write(f"skipping unreadable video {item.path}: {ext}")
                    skipped.append({"path": item.path, "error": ext})
                    continue
                sample = _sample(f"{written:09d}", item, data, ext, info)
                sink.write(sample)
                keys.update(k for k in sample if not k.startswith("__"))
                written += 1
                if info:
                    frames.append(info["num_frames"])
                    codecs[info["codec"]] += 1
            shards = sink.close()
    finally:
        if pool:
            pool.close()
            pool.join()
    if skipped:
        print(f"make_shards: skipped {len(skipped)} unreadable video(s) of {len(items)}; see 'skipped' in "
              f"{out / DATASET_JSON}")
    if not shards:
        raise ValueError(f"none of the {len(items)} files of {src} could be read as a video")
    labels = [item.label for item in items if item.label is not None]
    info: dict[str, Any] = {
        "format": "webdataset",
        "created_by": "data.make_shards",
        "media": "video",
        "source": str(Path(src).expanduser().resolve()),
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
        "classnames": classnames,
        "num_classes": len(classnames) if classnames else (max(labels) + 1 if labels else None),
        "keys": sorted(keys),
        "skipped": skipped,
        "video": {"min_frames": min(frames), "max_frames": max(frames), "codecs": dict(codecs)} if frames else None,
    }
    return write_dataset_json(out, info)


def _sample(key: str, item: VideoItem, data: bytes, ext: str, info: dict) -> dict:
    meta = {"path": item.rel, "classname": item.classname, "caption": item.caption, **(item.extra or {})}
    if info:
        meta["video"] = info
    sample = {"__key__": key, ext: data, "json": json.dumps(meta, sort_keys=True).encode()}
    if item.caption:
        sample["txt"] = item.caption.encode("utf-8")
    if item.label is not None:
        sample["cls"] = str(item.label).encode()
    return sample

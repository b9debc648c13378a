"""WebDataset shards: writing them, finding them, counting and reading their samples.

A shard folder written by this project holds ``shard-000000.tar``, ``shard-000001.tar``, ...
and a ``dataset.json`` describing it::

    {"format": "webdataset", "created_by": "data.make_shards",
     "num_samples": 1281167, "classnames": ["tench", ...] or null,
     "shards": [{"name": "shard-000000.tar", "num_samples": 10000}, ...], ...}

Each sample is ``KEY.jpg`` (or ``.png``, ... — the image bytes as they were), ``KEY.cls`` (the
class index, when known) and ``KEY.json`` (source path and class name). img2dataset's output
(``KEY.jpg``, ``KEY.txt``, ``KEY.json`` plus ``NNNNN_stats.json`` files) is read as well.

The per-shard sample counts in ``dataset.json`` are what lets the training stream give every
rank exactly the same number of batches without resampling (see ``data.stream``).
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import sys
import tarfile
import warnings
import zlib
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import braceexpand
import webdataset as wds
from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext, group_by_keys

from .errors import UserError
from .outputs import write_text

from .reencode import file_size, read_image_at_most, summary

DATASET_JSON = "dataset.json"
SHARD_PATTERN = "shard-%06d.tar"

#: File extensions recognised as images in source folders (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

#: Sample keys that can hold the image, in order of preference.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")

# PIL format name -> the extension the bytes are stored under (what the reader looks for).
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff", "PPM": "ppm"}

# Fixed tar metadata: shards of the same samples are byte-identical (the demo relies on it).
_TAR_MTIME = 0.0

# Errors a damaged tar stream can raise while it is read.
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, ValueError)


class ShardError(UserError, RuntimeError):
    """A shard exists but cannot be read as a tar archive (truncated, corrupt, not a tar)."""


class UnsafeURLError(UserError, ValueError):
    """A shard URL that would run a shell command (``pipe:``), given without the opt-in."""


#: The opt-ins that let ``pipe:`` shard URLs run their commands, as users spell them.
PIPE_OPT_IN = "data.allow_pipe: true in the recipe, --allow-pipe on the eval command line"

# URL schemes whose URL is a command that webdataset's gopen runs through the shell. Its other
# schemes (http, https, gs, ais, ...) run a fixed program with the URL as one argument.
_COMMAND_SCHEMES = ("pipe",)


# ----------------------------------------------------------------------------- finding shards


def runs_command(url: str) -> bool:
    """Whether opening ``url`` runs a shell command (``pipe:CMD``; webdataset reads schemes in any case)."""
    scheme, sep, _ = url.partition(":")
    return bool(sep) and scheme.lower() in _COMMAND_SCHEMES


def is_remote(url: str) -> bool:
    """Whether ``url`` is read through a pipe or a network scheme rather than a local path."""
    return runs_command(url) or ("://" in url and not url.startswith("file://"))


def check_command_urls(urls: Sequence[str], allow_pipe: bool, what: str = "shard URL") -> None:
    """Refuse URLs that run a shell command unless ``allow_pipe``; with it, print each command
    (once per process) before anything runs it.

    Raises:
        UnsafeURLError: naming the URL, its command and the opt-in.
    """
    commands = [u for u in urls if runs_command(u)]
    if not commands:
        return
    if not allow_pipe:
        scheme, _, command = commands[0].partition(":")
        raise UnsafeURLError(
            f"{what} {scheme}:`{_shorter(command)}` runs a shell command; a shard URL in a recipe, a run folder or on "
            f"a command line runs nothing unless you opt in ({PIPE_OPT_IN})")
    new = [u for u in commands if u not in _ANNOUNCED]
    _ANNOUNCED.update(new)
    for url in new[:3]:
        print(f"{what}: running the shell command `{url.partition(':')[2]}` (pipe: allowed)", file=sys.stderr,
              flush=True)
    if len(new) > 3:
        print(f"{what}: ... and {len(new) - 3} more such commands", file=sys.stderr, flush=True)


_ANNOUNCED: set[str] = set()  # pipe: URLs already printed by this process


def _shorter(text: str) -> str:
    return text if len(text) <= 200 else text[:197] + "..."


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def read_dataset_info(folder: str | os.PathLike) -> dict | None:
    """The ``dataset.json`` of a shard folder, or None when the folder has none."""
    path = Path(folder) / DATASET_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exn:
        raise ValueError(f"cannot read {path}: {exn}; delete it or re-create the shards") from exn


def _shards_in_folder(folder: Path) -> list[str]:
    info = read_dataset_info(folder)
    if info is not None and info.get("shards"):
        urls = [str(folder / s["name"]) for s in info["shards"]]
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(
                f"{folder / DATASET_JSON} lists shards that do not exist: {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; re-create the shard folder"
            )
        return urls
    urls = [str(p) for p in folder.iterdir() if p.is_file() and p.name.endswith((".tar", ".tar.gz", ".tgz"))]
    if not urls:
        hint = ""
        subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*.tar")))
        if subs:
            hint = f"; its sub-folders {subs} hold shards: pass one of those (e.g. {folder / subs[0]})"
        elif _holds_images(folder):
            hint = (f"; it holds images: write them into shards first with `python -m data.make_shards {folder} "
                    f"OUT` and pass OUT")
        raise FileNotFoundError(f"shard folder {folder} contains no .tar shards{hint}")
    return urls


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` or one of its sub-folders (an ImageNet class folder) holds an image file."""
    for sub in (folder, *(p for p in folder.iterdir() if p.is_dir())):
        if any(_is_media_file(p) for p in sub.iterdir() if p.is_file()):
            return True
    return False


def resolve_shards(spec: str | os.PathLike | Sequence[str | os.PathLike], allow_pipe: bool = False) -> list[str]:
    """Resolve a shard specification to a sorted list of shard URLs.

    ``spec`` may be a brace pattern (``"/data/shard-{000000..000146}.tar"``), a glob
    (``"/data/*.tar"``), several of these joined by ``::``, a folder of shards (its
    ``dataset.json`` listing is used when present), the path of a ``dataset.json``, a
    ``http://`` URL, a ``pipe:`` URL (its command runs when the shard is read: refused unless
    ``allow_pipe``, and then printed), or a list of any of these. Local shards must exist.

    Raises:
        FileNotFoundError: naming the pattern when it matches nothing, or the missing shards.
        UnsafeURLError: a ``pipe:`` URL without ``allow_pipe``.
        ValueError: when ``spec`` is empty.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec or [])
    if not specs:
        raise ValueError("no shards given: pass a brace pattern, a glob, a folder or a list of .tar files")
    urls: list[str] = []
    for item in specs:
        text = os.fspath(item)
        for part in text.split("::"):
            urls.extend(_resolve_one(part, text))
    urls = sorted(set(urls))
    check_command_urls(urls, allow_pipe)
    return urls


def _resolve_one(part: str, spec: str) -> list[str]:
    if is_remote(part):
        return list(braceexpand.braceexpand(part))
    path = Path(_local(part)).expanduser()
    if path.is_dir():
        return _shards_in_folder(path)
    if path.name == DATASET_JSON and path.is_file():
        return _shards_in_folder(path.parent)
    found, missing = [], []
    for name in braceexpand.braceexpand(str(path)):
        if glob.has_magic(name):
            found.extend(sorted(glob.glob(name)))
        elif os.path.isfile(name):
            found.append(name)
        else:
            missing.append(name)
    if missing and found:
        raise FileNotFoundError(
            f"shard pattern {spec!r}: {len(missing)} shard(s) do not exist, e.g. {missing[0]}"
        )
    if not found:
        what = "shard" if missing == [str(path)] else "shard pattern"
        raise FileNotFoundError(f"{what} {spec!r} matches no files; check the path (and the brace range)")
    return found


# ----------------------------------------------------------------------------- reading tar headers


class CorruptMemberError(tarfile.ReadError):
    """A member header in the middle of a tar archive that does not decode."""


class _StrictTarInfo(tarfile.TarInfo):
    """A tar header that fails to decode after the first one is an error.

    ``tarfile`` takes such a header for the end of the archive and stops without a word, so a
    damaged header in the middle of a shard would silently drop every sample after it.
    """

    @classmethod
    def fromtarfile(cls, tar):
        offset = tar.offset
        try:
            return super().fromtarfile(tar)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exn:
            if offset == 0:
                raise  # the first header: tarfile reports "not a tar file" itself
            raise CorruptMemberError(f"the member header at byte {offset} is corrupt ({exn}): the rest of the "
                                     f"archive cannot be read") from None


_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, which it skips


def _tar_files(stream, url: str) -> Iterator[dict]:
    """The regular files of a tar stream as ``{"fname", "data", "__url__"}`` (webdataset's
    ``tar_file_iterator``, with a corrupt header mid-archive raising instead of ending it)."""
    tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo)
    for info in tar:
        if not info.isreg() or info.name is None or _SKIP_META.match(info.name):
            continue
        yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
        tar.members = []  # a stream is read once: keep no headers


# ----------------------------------------------------------------------------- counting samples


def count_tar_samples(path: str) -> int:
    """Count the samples of a local tar shard from its headers (no member data is read)."""
    keys = 0
    last = None
    try:
        with tarfile.open(_local(path), "r:*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                if not member.isreg():
                    continue
                prefix, _ = base_plus_ext(member.name)
                if prefix is None or os.path.basename(member.name).startswith("__"):
                    continue
                # Samples are consecutive runs of one key, as webdataset groups them.
                if prefix != last:
                    keys += 1
                    last = prefix
    except _TAR_ERRORS as exn:
        raise ShardError(f"shard {path} is not a readable tar file ({exn}); re-create it") from exn
    return keys


def shard_sample_counts(urls: Sequence[str], scan: bool = True) -> list[int | None]:
    """Number of samples in each shard.

    Looked up, in order, in the ``dataset.json`` next to the shard, in img2dataset's
    ``NNNNN_stats.json`` (``successes``), and (``scan=True``, local shards only) by reading
    the tar headers. None where unknown.
    """
    infos: dict[str, dict[str, int]] = {}
    counts: list[int | None] = []
    to_scan = []
    for url in urls:
        folder, name = os.path.split(_local(url))
        if folder not in infos:
            info = None if is_remote(url) else read_dataset_info(folder or ".")
            listed = (info or {}).get("shards") or []
            infos[folder] = {s["name"]: int(s["num_samples"]) for s in listed
                             if isinstance(s, dict) and "name" in s and "num_samples" in s}
        count = infos[folder].get(name)
        if count is None and not is_remote(url):
            stats = os.path.join(folder, name.split(".")[0] + "_stats.json")
            if os.path.isfile(stats):
                with open(stats) as f:
                    count = json.load(f).get("successes")
        if count is None and scan and not is_remote(url):
            to_scan.append(len(counts))
        counts.append(count)
    if to_scan:
        for i in tqdm(to_scan, desc="counting samples", disable=len(to_scan) < 16, leave=False):
            counts[i] = count_tar_samples(urls[i])
    return counts


# ----------------------------------------------------------------------------- reading


def iter_shard(url: str, allow_pipe: bool = False) -> Iterator[dict]:
    """Yield the raw samples of one shard: dicts of ``{ext: bytes}`` plus ``__key__``/``__url__``.

    A ``pipe:`` URL runs its command only with ``allow_pipe`` (see ``resolve_shards``).

    Raises:
        FileNotFoundError: the shard cannot be opened (naming it).
        ShardError: the shard is not a readable tar archive, or a member header in it is
            corrupt (naming it; the samples before it have been yielded).
        UnsafeURLError: a ``pipe:`` URL without ``allow_pipe``.
    """
    check_command_urls([url], allow_pipe)
    try:
        stream = open(_local(url), "rb") if not is_remote(url) else wds.gopen(url, "rb")
    except OSError as exn:
        raise FileNotFoundError(f"cannot open shard {url}: {exn.strerror or exn}") from exn
    with stream:
        yield from iter_tar_stream(stream, url)


def iter_tar_stream(stream, url: str) -> Iterator[dict]:
    """The raw samples of an open tar stream (``url`` names it); raises ``ShardError`` as ``iter_shard``."""
    try:
        yield from group_by_keys(_tar_files(stream, url))
    except _TAR_ERRORS as exn:
        raise ShardError(
            f"shard {url} is corrupt or not a tar file ({exn}); re-create it with "
            "`python -m data.make_shards` or leave it out of the shard list"
        ) from exn


def shard_shortfall(url: str, read: int, expected: int) -> ShardError:
    """The error of a shard that ended (as a whole tar file) before the samples its listing counts."""
    return ShardError(f"shard {url} ended after {read} samples, fewer than the {expected} its {DATASET_JSON} "
                      f"(or sample count) gives it; re-create it with `python -m data.make_shards` or leave it out")


def iter_segments(urls: Sequence[str], segments: Iterable[tuple[int, int, int]],
                  reader: Callable[[str], Iterator[dict]] | None = None,
                  on_bad_shard: Callable[[str, Exception, int], None] | None = None) -> Iterator[dict]:
    """Yield samples ``start:stop`` of shard ``urls[i]`` for each ``(i, start, stop)`` segment.

    Skipped leading samples are read but not decoded, so skipping costs only I/O. ``reader``
    reads one shard (default ``iter_shard``; cached targets read image and target shard together).
    A shard that turns out unreadable (`ShardError`, or gone: `FileNotFoundError`) raises, unless
    `on_bad_shard(url, error, samples_lost)` is given: then it is reported and the next
    segment follows.
    """
    reader = reader or iter_shard
    for index, start, stop in segments:
        read = 0  # samples of the shard read so far
        try:
            for sample in reader(urls[index]):
                if read >= stop:
                    break
                read += 1
                if read > start:
                    yield sample
            else:
                if read < stop:  # a whole tar file that holds fewer samples than counted
                    raise shard_shortfall(urls[index], read, stop)
        except (ShardError, FileNotFoundError) as exn:
            if on_bad_shard is None:
                raise
            on_bad_shard(urls[index], exn, stop - max(start, read))


def check_shard(url: str) -> None:
    """A cheap look at a local shard before a long run: it exists, starts with a tar header and
    ends with the tar end-of-archive blocks (a truncated or half-copied shard does not).

    Raises:
        FileNotFoundError: the shard cannot be opened (naming it).
        ShardError: it is not a tar file, or it is cut short (naming it).
    """
    if is_remote(url):
        return
    path = _local(url)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(tarfile.BLOCKSIZE)
            f.seek(max(0, size - 2 * tarfile.BLOCKSIZE))
            tail = f.read()
    except OSError as exn:
        raise FileNotFoundError(f"cannot open shard {url}: {exn.strerror or exn}") from exn
    fix = "re-create it with `python -m data.make_shards` or leave it out of the shard list"
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as exn:
        if head.strip(b"\0") or size == 0:
            raise ShardError(f"shard {url} is not a tar file ({exn}); {fix}") from exn
    if size % tarfile.BLOCKSIZE or len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
        raise ShardError(f"shard {url} is cut short ({size} bytes, no tar end-of-archive blocks): it was truncated or "
                         f"not completely copied; {fix}")


def check_shards(urls: Sequence[str]) -> None:
    """`check_shard` on each shard (a few reads each)."""
    for url in tqdm(urls, desc="checking shards", disable=len(urls) < 500, leave=False):
        check_shard(url)


# ----------------------------------------------------------------------------- writing


class ShardSink:
    """Write samples into numbered tar shards, starting a new one at ``maxcount`` samples or
    ``maxsize`` bytes, and remember how many samples each shard got.

    Tar metadata (mtime, owner) is fixed, so the same samples always give the same bytes.
    """

    def __init__(self, out_dir: str | os.PathLike, maxcount: int = 10000, maxsize: int = 1_000_000_000,
                 pattern: str = SHARD_PATTERN):
        if maxcount < 1:
            raise ValueError(f"maxcount must be at least 1, got {maxcount}")
        if maxsize < 1:
            raise ValueError(f"maxsize must be positive, got {maxsize}")
        self.out_dir = Path(out_dir)
        self.maxcount, self.maxsize, self.pattern = maxcount, maxsize, pattern
        self.shards: list[dict] = []
        self._writer = None
        self._count = self._size = 0

    def write(self, sample: dict) -> None:
        """Write one sample: ``__key__`` plus ``{ext: bytes | str}``."""
        # Tar headers take 512 bytes per member; count them so maxsize bounds the file size.
        size = sum(len(v) + 512 for k, v in sample.items() if not k.startswith("__"))
        if self._writer is None or self._count >= self.maxcount or (
            self._count > 0 and self._size + size > self.maxsize
        ):
            self._next_shard()
        self._writer.write(sample)
        self._count += 1
        self._size += size
        self.shards[-1]["num_samples"] = self._count

    def _next_shard(self) -> None:
        self._close_current()
        name = self.pattern % len(self.shards)
        self._writer = wds.TarWriter(str(self.out_dir / name), mtime=_TAR_MTIME, encoder=False)
        self.shards.append({"name": name, "num_samples": 0})
        self._count = self._size = 0

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[dict]:
        """Finish the last shard; returns ``[{"name": ..., "num_samples": ...}, ...]``."""
        self._close_current()
        return self.shards

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Create ``out_dir``; with ``overwrite`` remove shards and dataset.json left in it by an
    earlier run (stale shards would otherwise be streamed with the new ones)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("shard-*.tar")) + ([out / DATASET_JSON] if (out / DATASET_JSON).exists() else [])
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds shards ({old[0].name}, ...); pass overwrite=True (--overwrite) "
            "or choose an empty folder"
        )
    for path in old:
        path.unlink()
    return out


def write_dataset_json(out_dir: str | os.PathLike, info: dict) -> dict:
    """Write ``info`` as the folder's dataset.json (last, so a crashed run leaves none)."""
    write_text(Path(out_dir) / DATASET_JSON, json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


def _is_media_file(path: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bool:
    return path.suffix.lower() in extensions and not path.name.startswith(".")


def list_source(src: str | os.PathLike, classes: bool | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                what: str = "images") -> tuple[list[tuple[str, str, str | None]], list[str] | None]:
    """List the images of a source as ``[(path, json_path, classname | None)]`` plus class names.

    ``src`` is a folder with class sub-folders (ImageNet layout: each sub-folder is a class,
    images anywhere below it), a flat folder of images, or a text file with one image path
    per line, optionally followed by a TAB and a class name (relative paths are relative to
    the text file; lines starting with ``#`` are comments). ``classes=False`` treats a folder with
    sub-folders as unlabelled (all images below it); None detects the layout. ``extensions`` and
    ``what`` list other files the same way (videos: ``data.video.VIDEO_EXTENSIONS``, ``"videos"``).
    """
    src = Path(src).expanduser()
    if src.is_file():
        return _list_text_file(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source {src} is neither a folder of {what} nor a text file of paths")
    subdirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    top = sorted(p for p in src.iterdir() if p.is_file() and _is_media_file(p, extensions))
    if classes is None:
        classes = bool(subdirs) and not top
        if subdirs and top:
            warnings.warn(f"{src} holds both {what} and sub-folders: treating it as unlabelled "
                          "(pass classes=True / --classes to use the sub-folders as classes)")
    items: list[tuple[str, str, str | None]] = []
    if not classes:
        files = sorted(p for p in src.rglob("*") if p.is_file() and _is_media_file(p, extensions))
        items = [(str(p), str(p.relative_to(src)), None) for p in files]
        classnames = None
    else:
        classnames = []
        for sub in subdirs:
            files = sorted(p for p in sub.rglob("*") if p.is_file() and _is_media_file(p, extensions))
            if not files:
                warnings.warn(f"class folder {sub} holds no {what}; it is left out of the classes")
                continue
            classnames.append(sub.name)
            items.extend((str(p), str(p.relative_to(src)), sub.name) for p in files)
        if top:
            warnings.warn(f"{len(top)} {what} directly in {src} have no class folder and are left out")
    if not items:
        raise ValueError(f"no {what} found in {src} (looked for {', '.join(extensions)})")
    return items, classnames


def _list_text_file(path: Path) -> tuple[list[tuple[str, str, str | None]], list[str] | None]:
    entries = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, classname = line.partition("\t")
        name = name.strip()
        full = Path(name).expanduser()
        if not full.is_absolute():
            full = path.parent / full
        entries.append((str(full), name, classname.strip() or None, lineno))
    if not entries:
        raise ValueError(f"{path} lists no image paths (one path per line, optionally TAB class name)")
    labelled = [e for e in entries if e[2] is not None]
    if labelled and len(labelled) != len(entries):
        unlabelled = next(e for e in entries if e[2] is None)
        raise ValueError(f"{path}:{unlabelled[3]}: some lines have a class name and this one has none; "
                         "give every line a class (PATH<TAB>CLASS) or none")
    classnames = sorted({e[2] for e in labelled}) if labelled else None
    return [(p, name, c) for p, name, c, _ in entries], classnames


def _read_image(args: tuple[str, str]) -> tuple[bytes | None, str]:
    """Read an image file and check it decodes; returns (bytes, ext) or (None, error)."""
    path, verify = args
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            if verify == "full":
                img.load()  # a truncated file only fails here
            elif verify == "header":
                img.verify()
        return data, _FORMAT_EXT.get(fmt, fmt.lower() or "jpg")
    except Exception as exn:  # any unreadable file is reported and skipped
        return None, f"{type(exn).__name__}: {exn}"


def make_shards(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    maxcount: int = 10000,
    maxsize: int = 1_000_000_000,
    *,
    classes: bool | None = None,
    shuffle: bool = True,
    seed: int = 0,
    verify: str = "full",
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    max_size: int | None = None,
) -> dict:
    """Write the images of ``src`` into WebDataset shards in ``out_dir``.

    Args:
        src: image folder (class sub-folders or flat) or text file of paths; see ``list_source``.
        out_dir: output folder; gets ``shard-000000.tar``, ... and ``dataset.json``.
        maxcount: most samples per shard.
        maxsize: most bytes per shard (approximate: image bytes plus tar headers).
        classes: use sub-folders as classes (None: detect).
        shuffle: shuffle the sample order with ``seed`` before writing. Class folders listed in
            order would put one or two classes in each shard, which a shuffle buffer of a
            few thousand samples cannot mix.
        verify: ``"full"`` decodes every image (catches truncated files), ``"header"`` only
            checks the header, ``"none"`` stores files unchecked.
        workers: processes reading and verifying images (0: in this process).
        overwrite: replace shards already in ``out_dir``.
        progress: show a progress bar.
        max_size: re-encode JPEGs whose shorter side is larger, to that shorter side
            (``data.reencode``); dataset.json then records ``max_size`` and ``reencoded``
            (images, bytes before and after).

    Returns:
        The dataset.json content: ``num_samples``, ``shards`` (name and sample count each),
        ``classnames`` (None when the source has no classes), ``skipped`` (unreadable files).
    """
    if verify not in ("full", "header", "none"):
        raise ValueError(f"verify must be 'full', 'header' or 'none', got {verify!r}")
    items, classnames = list_source(src, classes)
    out = prepare_out_dir(out_dir, overwrite)
    if shuffle:
        random.Random(seed).shuffle(items)
    label = {name: i for i, name in enumerate(classnames or [])}
    skipped, keys = [], set()
    pool = Pool(workers) if workers > 0 else None
    try:
        jobs = [(path, verify) for path, _, _ in items]
        read = _read_image if max_size is None else partial(read_image_at_most, max_size=max_size, read=_read_image)
        results = pool.imap(read, jobs, chunksize=16) if pool else map(read, jobs)
        before, after = [], []  # bytes of each written image, as read and as stored (--max-size)
        bar = tqdm(zip(items, results), total=len(items), desc="writing shards", unit="img", disable=not progress)
        with ShardSink(out, maxcount, maxsize) as sink:
            written = 0
            for (path, rel, classname), (data, ext) in bar:
                if data is None:
                    tqdm.write(f"skipping unreadable file {path}: {ext}")
                    skipped.append({"path": path, "error": ext})
                    continue
                sample = {"__key__": f"{written:09d}", ext: data,
                          "json": json.dumps({"path": rel, "classname": classname}, sort_keys=True).encode()}
                if classname is not None:
                    sample["cls"] = str(label[classname]).encode()
                sink.write(sample)
                if max_size is not None:
                    before.append(file_size(path))
                    after.append(len(data))
                keys.update(k for k in sample if not k.startswith("__"))
                written += 1
            shards = sink.close()
    finally:
        if pool:
            pool.close()
            pool.join()
    if skipped:
        print(f"make_shards: skipped {len(skipped)} unreadable file(s) of {len(items)}; see 'skipped' in "
              f"{out / DATASET_JSON}")
    if not shards:
        raise ValueError(f"none of the {len(items)} files in {src} could be read as an image")
    info = {
        "format": "webdataset",
        "created_by": "data.make_shards",
        "source": str(Path(src).expanduser().resolve()),
        "num_samples": sum(s["num_samples"] for s in shards),
        "shards": shards,
        "classnames": classnames,
        "num_classes": len(classnames) if classnames else None,
        "keys": sorted(keys),
        "skipped": skipped,
    }
    if max_size is not None:
        info["max_size"] = int(max_size)
        info["reencoded"] = summary(before, after)
    return write_dataset_json(out, info)

"""Decode + augment throughput per loader worker on ImageNet-sized JPEGs, for each decode path.

    python benchmarks/data_speed.py [--images 400] [--rounds 5] [--size 224] [--paths full reduced ...]

Generates JPEG shards whose sizes follow ImageNet-1k's (`imagenet_like_size`: 72 % of the
images 500 px on the longer side, most of them 500 x 375 or 500 x 333, 21.5 % smaller, 6.5 %
larger, up to 2000 px; a mean of about 467 x 400) with natural-image-like content
(`natural_image`: a 1/f^a spectrum, so that JPEG entropy coding costs what photographs cost;
quality 96 without chroma subsampling for four in five, as most of ImageNet is stored, 90
with 4:2:0 for the rest; about 110 KB a file on average), then for each decode path measures
images per second of ONE process with ONE thread, as one DataLoader worker runs (per second of
its CPU time by default, which the load of a shared machine moves little; ``--clock wall`` for
elapsed time):

* train: the training stream (``build_train_loader``, in-process: shard reading, shuffle
  buffer, decode, RandomResizedCrop to ``--size`` + flip + normalise, batching), timed after
  its first batch;
* train, 1 worker: the same in one DataLoader worker, timed by the worker's own clock, which
  also counts sending each batch to the main process; "uint8 batches": the worker sends the
  uint8 views and the consumer normalises them (``uint8_batches``, as bootstrapping does);
* eval: shard reading, decode, resize the shorter side to ``size / 0.875``, centre crop,
  normalise (``data.transforms.eval_transform``).

Decode paths: ``today`` (the stream before data.decode existed: PIL decodes the whole JPEG,
torchvision's to_tensor and normalize per view, stacked), ``full`` (``data.decode=full``: the
same pixels, fewer copies), ``reduced`` (``data.decode=reduced``: PIL decodes 2, 4 or 8 times
smaller in the DCT domain when the crop still covers the output at that scale), ``fast``
(``data.decode=fast``, the default: as reduced, with libjpeg-turbo through simplejpeg, and the
crops it decodes whole resized by torch's antialiased uint8 kernels), ``torchvision``
(``torchvision.io.decode_jpeg`` on the CPU, deprecated since torchvision 0.29, then tensor
kernels) and ``torchcodec`` (its ``decode_jpeg``, when installed; also tensor kernels), and on a
CUDA GPU ``cuda`` / ``torchcodec-cuda``: batched ``decode_jpeg(..., device="cuda")`` of
``--batch-size`` files with crops and resizes on the GPU (its rate is the GPU's with one CPU
thread feeding it, not a worker's). Paths that cannot run here are listed as skipped; one
named in ``--paths`` stops the script with one line saying what it needs. ``--max-size S``
adds the fast path on the same images re-encoded as ``make_shards --max-size S`` does.

The paths run interleaved, ``--rounds`` times in a rotating order; the table gives each
path's median and range, and its speed relative to ``today`` as the median of the per-round
ratios (the machine's load moves both alike). It also gives, over ``--diff-views`` views per
image drawn from fixed seeds, how far the reduced and fast paths' pixels are from the full
path's, in grey levels (0-255) of the resized crop: over the views they decoded smaller, those
they decoded whole, and all.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.decode import EncodedImage, decode_sample  # noqa: E402
from data.shards import ShardSink, iter_shard, resolve_shards, write_dataset_json  # noqa: E402
from data.stream import TrainStream, build_train_loader  # noqa: E402
from data.transforms import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ReplayableTrainTransform, eval_transform,  # noqa: E402
                             train_transform)

CPU_PATHS = ("today", "full", "reduced", "fast", "torchvision", "torchcodec")
GPU_PATHS = ("cuda", "torchcodec-cuda")
PATHS = CPU_PATHS + GPU_PATHS
CROP_PCT = 0.875


# ----------------------------------------------------------------------------- the images


def imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
    """``(height, width)`` drawn from a mixture shaped like ImageNet-1k's train set: 72 % with a
    500 px longer side (mostly 4:3 and 3:2), 21.5 % smaller, 6.5 % larger (log-uniform up to
    2000 px); one in four portrait. Its mean is about 467 x 400 px (ImageNet's is usually quoted
    as about 470 x 390), and the larger images hold 29 % of its pixels."""
    u = rng.random()
    if u < 0.72:
        long = 500
        short = int(rng.choice([375, 333, 500, 281, int(rng.integers(250, 500))], p=[0.45, 0.3, 0.05, 0.05, 0.15]))
    elif u < 0.935:
        long = int(rng.integers(150, 500))
        short = int(long * rng.uniform(0.6, 1.0))
    else:
        long = int(np.exp(rng.uniform(np.log(500), np.log(2000))))
        short = int(long * rng.uniform(0.6, 0.8))
    return (long, short) if rng.random() < 0.25 else (short, long)


def natural_image(height: int, width: int, rng: np.random.Generator, slope: float) -> np.ndarray:
    """An RGB image with a 1/f^slope amplitude spectrum (natural images have slope ~1-2) and
    correlated channels: JPEG spends on it about the bits it spends on a photograph."""
    fy = np.fft.fftfreq(height).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(width).astype(np.float32)[None, :]
    freq = np.sqrt(fy ** 2 + fx ** 2)
    freq[0, 0] = 1.0
    amplitude = freq ** -slope
    shape = (height, width // 2 + 1)

    def noise():
        return rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(shape, dtype=np.float32)

    shared = noise()
    x = np.stack([np.fft.irfft2((shared + 0.5 * noise()) * amplitude, s=(height, width)) for _ in range(3)], -1)
    x = (x - x.mean()) / (x.std() + 1e-9)
    return np.clip(120 + 55 * x, 0, 255).astype(np.uint8)


def imagenet_like_jpeg(rng: np.random.Generator) -> bytes:
    height, width = imagenet_like_size(rng)
    pixels = natural_image(height, width, rng, slope=rng.uniform(1.4, 1.8))
    quality, subsampling = (96, 0) if rng.random() < 0.8 else (90, 2)  # 0: 4:4:4, 2: 4:2:0
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def make_jpeg_shards(folder: Path, num: int, seed: int = 0, per_shard: int = 100) -> dict:
    """``num`` ImageNet-like JPEGs in shards of ``per_shard``; returns their size statistics."""
    rng = np.random.default_rng(seed)
    sizes, nbytes = [], []
    folder.mkdir(parents=True, exist_ok=True)
    with ShardSink(folder, maxcount=per_shard) as sink:
        for i in range(num):
            data = imagenet_like_jpeg(rng)
            with Image.open(io.BytesIO(data)) as img:
                sizes.append(img.size)
            nbytes.append(len(data))
            sink.write({"__key__": f"{i:06d}", "jpg": data, "cls": b"0"})
        shards = sink.close()
    write_dataset_json(folder, {"num_samples": num, "shards": shards, "classnames": ["texture"]})
    w, h = np.array(sizes).T
    return {"width": float(w.mean()), "height": float(h.mean()), "kb": float(np.mean(nbytes)) / 1e3,
            "large": float(np.mean(np.maximum(w, h) > 500)), "max_side": int(np.maximum(w, h).max())}


# ----------------------------------------------------------------------------- paths


def unavailable(path: str) -> str | None:
    """Why ``path`` cannot run here (one line with the fix), or None."""
    import torch

    if path in ("torchcodec", "torchcodec-cuda"):
        try:
            from torchcodec.decoders import decode_jpeg  # noqa: F401
        except Exception as exn:  # noqa: BLE001 - ImportError, or its libraries failing to load
            return f"torchcodec is not installed or does not load ({type(exn).__name__}): pip install torchcodec"
    if path in ("torchvision", "cuda"):
        try:
            tensor_decoder("torchvision")(_tiny_jpeg())
        except Exception as exn:  # noqa: BLE001 - an ImportError, or the missing C++ extension's RuntimeError
            return (f"torchvision.io.decode_jpeg fails here ({type(exn).__name__}): install a torchvision wheel with "
                    f"its image extension")
    if path in GPU_PATHS and not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False here): run it on a GPU machine"
    return None


def _tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def gpu_decoder(path: str):
    if path == "torchcodec-cuda":
        from torchcodec.decoders import decode_jpeg
    else:
        from torchvision.io import decode_jpeg
    return decode_jpeg


def tensor_decoder(path: str):
    """JPEG bytes -> uint8 RGB tensor [3, H, W] with torchvision's or torchcodec's CPU decoder."""
    import torch

    if path == "torchcodec":
        from torchcodec.decoders import decode_jpeg

        return decode_jpeg
    from torchvision.io import ImageReadMode, decode_jpeg

    return lambda data: decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


class _TensorTrain:
    """The training view from a tensor decoder: the same drawn parameters, torchvision's tensor
    kernels (antialiased resize of the uint8 crop, flip), then normalise."""

    lazy = True

    def __init__(self, transform, path: str):
        self.transform, self.decode_jpeg = transform, tensor_decoder(path)

    def __call__(self, image):
        from torchvision.transforms import functional as F

        params = self.transform.draw(image)
        if not isinstance(image, EncodedImage):
            return self.transform.apply(image, params)
        t = self.transform
        x = F.resized_crop(self.decode_jpeg(image.data), *params["crop"], list(t.size), t.interpolation, antialias=True)
        if params["flip"]:
            x = F.hflip(x)
        return x.to(torch.float32).div_(255).sub_(t._mean).div_(t._std)


class _TensorEval:
    """The evaluation view from a tensor decoder: resize, centre crop, normalise on the tensor."""

    def __init__(self, transform, path: str):
        self.transform, self.decode_jpeg = transform, tensor_decoder(path)

    def __call__(self, image):
        from torchvision.transforms import functional as F

        t = self.transform
        if not isinstance(image, EncodedImage):
            return t(image)
        x = F.resize(self.decode_jpeg(image.data), list(t.resized_size(*image.size)), t.interpolation, antialias=True)
        return F.center_crop(x, list(t.size)).to(torch.float32).div_(255).sub_(t._mean).div_(t._std)


def read_jpegs(folder: Path) -> list[bytes]:
    return [raw["jpg"] for url in resolve_shards(str(folder)) for raw in iter_shard(url)]


# ----------------------------------------------------------------------------- timing


def train_rate(folder: Path, path: str, size: int, batch_size: int, clock=time.perf_counter, workers: int = 0,
               uint8: bool = False) -> float:
    """Images per second (of ``clock``) of the training stream after its first batch: in this
    process (``workers=0``), or in one DataLoader worker (``workers=1``: the worker's own clock,
    its sending of each batch to this process included). ``uint8``: the batches are the uint8
    views, normalised by their consumer (``uint8_batches``, as bootstrapping runs), for the paths
    that render them (``today`` stays as it was)."""
    if path in GPU_PATHS:
        return gpu_rate(folder, path, size, batch_size, train=True)
    if path == "today":
        transform = _Today(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    elif path in ("torchvision", "torchcodec"):
        transform = _TensorTrain(train_transform(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, decode="full"), path)
    else:
        transform = train_transform(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, decode=path)
    stream = functools.partial(_TimedStream, clock=clock, old_stack=path == "today")
    loader = build_train_loader(folder, transform, batch_size, num_workers=workers, shuffle_buffer=64, rank=0,
                                world_size=1, make_stream=stream, uint8_batches=uint8 and hasattr(transform, "render"))
    clocks = [extras["clock"] for batch, extras in loader]
    return (len(clocks) - 1) * batch_size / (clocks[-1] - clocks[0])


class _TimedStream(TrainStream):
    """The training stream with the clock of the process that makes the batches (a worker's own)
    read as each batch is made (``extras["clock"]``); ``old_stack`` stacks the views as the stream
    did before data.decode (a copy of each float view, and in a worker another copy to send it)."""

    def __init__(self, *args, clock=time.perf_counter, old_stack: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock, self.old_stack = clock, old_stack

    def _stacked(self, batch: list) -> torch.Tensor:
        return torch.stack([b[0] for b in batch]) if self.old_stack else super()._stacked(batch)

    def _batches(self, samples, counter):
        for images, extras in super()._batches(samples, counter):
            extras["clock"] = self.clock()
            yield images, extras


class _Today:
    """The training view as rendered before data.decode: whole PIL decode (``full``), PIL's crop
    and resize, then torchvision's ``to_tensor`` and ``normalize`` per view, stacked into batches
    (the same pixels as ``full``)."""

    lazy = False

    def __init__(self, size, mean, std):
        self.transform = ReplayableTrainTransform(size, mean, std, decode="full")

    def __call__(self, image):
        from torchvision.transforms import functional as F

        t, params = self.transform, self.transform.draw(image)
        image = F.resized_crop(image, *params["crop"], list(t.size), t.interpolation, antialias=True)
        if params["flip"]:
            image = F.hflip(image)
        return F.normalize(F.to_tensor(image), t.mean, t.std)


def eval_rate(folder: Path, path: str, size: int, batch_size: int, clock=time.perf_counter) -> float:
    """Images per second (of ``clock``) of the evaluation preprocessing in this process (after the first batch)."""
    if path in GPU_PATHS:
        return gpu_rate(folder, path, size, batch_size, train=False)
    import torch

    transform = eval_transform(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, crop_pct=CROP_PCT,
                               decode=path if path in ("reduced", "fast") else "full")
    run = _TensorEval(transform, path) if path in ("torchvision", "torchcodec") else transform
    images, batch, start = 0, [], None
    for url in resolve_shards(str(folder)):
        for raw in iter_shard(url):
            batch.append(run(decode_sample(raw, lazy=path not in ("today", "full"))["image"]))
            if len(batch) == batch_size:
                torch.stack(batch)
                batch = []
                if start is None:
                    start = clock()
                else:
                    images += batch_size
    return images / (clock() - start)


def gpu_rate(folder: Path, path: str, size: int, batch_size: int, train: bool, device: str = "cuda") -> float:
    """Images per second of batched GPU decoding (``decode_jpeg(list, device=...)``) with the
    view's crop, resize, flip and normalisation on the device (after the first batch)."""
    import torch
    from torchvision.transforms import functional as F

    decode_jpeg = gpu_decoder(path)
    files = read_jpegs(folder)
    train_t = train_transform(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    eval_t = eval_transform(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, crop_pct=CROP_PCT)
    mean, std = train_t._mean.to(device), train_t._std.to(device)

    def views(batch: list[bytes]) -> torch.Tensor:
        encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch]
        decoded = decode_jpeg(encoded, device=device)
        out = []
        for x in decoded:
            height, width = x.shape[-2:]
            if train:
                top, left, h, w = train_t._crop_box(height, width, None)
                x = F.resized_crop(x, top, left, h, w, [size, size], train_t.interpolation, antialias=True)
                if torch.rand(1).item() < train_t.hflip:
                    x = F.hflip(x)
            else:
                x = F.resize(x, list(eval_t.resized_size(width, height)), eval_t.interpolation, antialias=True)
                x = F.center_crop(x, [size, size])
            out.append(x)
        return torch.stack(out).to(torch.float32).div_(255).sub_(mean).div_(std)

    batches = [files[i:i + batch_size] for i in range(0, len(files) - batch_size + 1, batch_size)]
    views(batches[0])
    torch.cuda.synchronize() if device == "cuda" else None
    start = time.perf_counter()
    for batch in batches[1:]:
        views(batch)
    torch.cuda.synchronize() if device == "cuda" else None
    return (len(batches) - 1) * batch_size / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- pixel differences


def path_difference(folder: Path, size: int, views: int, path: str) -> dict:
    """How far ``path``'s views are from the full path's, in grey levels of the resized crop, over
    ``views`` seeded training views per image and the evaluation view: separately for the views it
    decoded smaller and those it decoded whole, and over all of them."""
    import torch

    from data.transforms import reduction

    std = torch.tensor(OPENAI_CLIP_STD).view(-1, 1, 1) * 255
    out = {}
    for name in ("train", "eval"):
        full_t, path_t = ((train_transform(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, decode=d) for d in ("full", path))
                          if name == "train" else
                          (eval_transform(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, crop_pct=CROP_PCT, decode=d)
                           for d in ("full", path)))
        diffs: dict[str, list] = {"decoded smaller": [], "decoded whole": []}
        for url in resolve_shards(str(folder)):
            for raw in iter_shard(url):
                whole, lazy = decode_sample(raw)["image"], decode_sample(raw, lazy=True)["image"]
                for v in range(views if name == "train" else 1):
                    if name == "train":
                        params = full_t.draw(whole, torch.Generator().manual_seed(v))
                        factor = reduction(*params["crop"][2:], size, size)
                        a, b = full_t.apply(whole, params), path_t.apply(lazy, params)
                    else:
                        factor = reduction(whole.height, whole.width, *path_t.resized_size(*whole.size))
                        a, b = full_t(whole), path_t(lazy)
                    diffs["decoded smaller" if factor > 1 else "decoded whole"].append(((a - b) * std).abs().round().flatten())
        diffs["all"] = diffs["decoded smaller"] + diffs["decoded whole"]
        out[name] = {}
        for group, values in diffs.items():
            levels = torch.cat(values) if values else torch.zeros(1)
            out[name][group] = {"views": len(values), "mean": float(levels.mean()), "max": float(levels.max()),
                                "p999": float(torch.quantile(levels[:2 ** 24].float(), 0.999))}
    return out


# ----------------------------------------------------------------------------- main


def reencode_shards(src: Path, dst: Path, max_size: int) -> dict:
    """The shards of ``src`` with their JPEGs re-encoded as ``make_shards --max-size`` does."""
    from data.reencode import shrink_jpeg

    before = after = 0
    dst.mkdir(parents=True, exist_ok=True)
    with ShardSink(dst, maxcount=100) as sink:
        for raw in (r for url in resolve_shards(str(src)) for r in iter_shard(url)):
            data = shrink_jpeg(raw["jpg"], max_size) or raw["jpg"]
            before, after = before + len(raw["jpg"]), after + len(data)
            sink.write({"__key__": raw["__key__"], "jpg": data, "cls": raw["cls"]})
        shards = sink.close()
    write_dataset_json(dst, {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
                             "classnames": ["texture"], "max_size": max_size})
    return {"kb_before": before / 1e3, "kb_after": after / 1e3}


KINDS = {"train": train_rate, "train, 1 worker": functools.partial(train_rate, workers=1),
         "train, 1 worker, uint8 batches": functools.partial(train_rate, workers=1, uint8=True), "eval": eval_rate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400, help="ImageNet-like JPEGs to generate (default 400)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per path (default 5)")
    parser.add_argument("--size", type=int, default=224, help="output side of the views (default 224)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), metavar="PATH",
                        help=f"decode paths to time, of {', '.join(PATHS)} (default: all; unavailable ones are skipped "
                             f"unless named)")
    parser.add_argument("--max-size", type=int, nargs="*", default=[], metavar="S",
                        help="also time the fast path on the shards re-encoded as make_shards --max-size S does")
    parser.add_argument("--diff-views", type=int, default=4, help="training views per image for the pixel "
                        "differences of the reduced and fast paths (default 4; 0: skip)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu (default): images per CPU-second of this one-thread process, what a worker with a "
                             "core of its own reaches, steady on a shared machine; wall: elapsed time (GPU paths "
                             "always use it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    import torch

    unknown = [p for p in args.paths if p not in PATHS]
    if unknown:
        print(f"data_speed.py: error: unknown decode path {unknown[0]!r}; choose from {', '.join(PATHS)}", file=sys.stderr)
        return 2
    try:
        from data.reencode import check_max_size

        for max_size in args.max_size:
            check_max_size(max_size, args.size)
    except ValueError as exn:
        print(f"data_speed.py: error: {exn}", file=sys.stderr)
        return 2
    named = "--paths" in (argv if argv is not None else sys.argv[1:])
    skipped = {p: why for p in args.paths if (why := unavailable(p))}
    if named and skipped:  # asked for by name: say why it cannot run, with the fix, and stop
        path, why = next(iter(skipped.items()))
        print(f"data_speed.py: error: decode path {path!r} {why}, or leave it out of --paths", file=sys.stderr)
        return 2
    paths = [p for p in args.paths if p not in skipped]
    baseline = "today" if "today" in paths else None
    torch.set_num_threads(1)  # one thread per process: the number is one loader worker's
    warnings.filterwarnings("ignore", message=".*not writable.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "original"
        t0 = time.perf_counter()
        stats = make_jpeg_shards(folder, args.images, args.seed)
        # (label, shard folder, decode path): the paths on the generated shards, then the re-encoded ones.
        cases = [(path, folder, path) for path in paths]
        for max_size in args.max_size:
            shrunk = reencode_shards(folder, Path(tmp) / f"max{max_size}", max_size)
            print(f"--max-size {max_size}: {shrunk['kb_before'] / args.images:.0f} KB -> "
                  f"{shrunk['kb_after'] / args.images:.0f} KB per image")
            cases.append((f"fast, --max-size {max_size} shards", Path(tmp) / f"max{max_size}", "fast"))
        load = os.getloadavg()
        print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.0f} s: mean {stats['width']:.0f} x "
              f"{stats['height']:.0f} px, {stats['kb']:.0f} KB, {stats['large']:.0%} larger than 500 px (up to "
              f"{stats['max_side']} px); {os.cpu_count()} CPU(s), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
              f"output {args.size} px, batch {args.batch_size}, one thread, {args.clock} clock")
        for _, where, path in cases:  # warm-up: first imports, caches and allocations are not timed
            train_rate(where, path, args.size, args.batch_size)
        rates: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            order = cases[r % len(cases):] + cases[:r % len(cases)]
            for kind, fn in KINDS.items():
                for label, where, path in order:
                    if (kind.startswith("train, 1 worker") and path in GPU_PATHS
                            or kind.endswith("uint8 batches") and path in ("torchvision", "torchcodec")):
                        continue
                    rates.setdefault((kind, label), []).append(fn(where, path, args.size, args.batch_size, clock))
        diff = {path: path_difference(folder, args.size, args.diff_views, path)
                for path in ("reduced", "fast") if path in paths and args.diff_views > 0}
        load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print(f"| transform | decode path | img/s per worker (median) | range | x {baseline or '-'} (median of rounds) | range |")
    print("|---|---|---:|---:|---:|---:|")
    for kind in KINDS:
        for label, _, path in cases:
            if (kind, label) not in rates:
                continue
            values = rates[(kind, label)]
            line = f"| {kind} | {label}{' (GPU)' if path in GPU_PATHS else ''} | {statistics.median(values):.0f} | " \
                   f"{min(values):.0f}-{max(values):.0f} |"
            if baseline:
                ratios = [v / b for v, b in zip(values, rates[(kind, baseline)])]
                line += f" {statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} |"
            else:
                line += " | |"
            print(line)
    for path, why in skipped.items():
        print(f"| train, eval | {path} | skipped: {why} | | | |")
    for path, d in diff.items():
        print(f"\n{path} path against full decoding (grey levels 0-255 of the resized crop, mean / 99.9th percentile / "
              f"max):")
        for kind, rows in d.items():
            print(f"  {kind}: " + "; ".join(f"{name} ({r['views']} views) {r['mean']:.2f} / {r['p999']:.0f} / {r['max']:.0f}"
                                          for name, r in rows.items() if r["views"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

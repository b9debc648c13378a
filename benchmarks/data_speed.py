"""Decode + augment throughput of the training stream, in images per second per worker.

    python benchmarks/data_speed.py [--images 256] [--size 224] [--workers 0 1 2] [--batch-size 32]

Generates JPEG shards of 256-ish pixel images (smooth colour fields with texture, so JPEG
decoding costs what photographs cost) in a temporary folder, then streams them through
``build_train_loader`` with the teacher's augmentation (RandomResizedCrop to ``--size``,
flip, normalise) for each worker count and prints a table. Nothing else is recorded.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.shards import ShardSink, write_dataset_json  # noqa: E402
from data.stream import build_train_loader  # noqa: E402
from data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, train_transform  # noqa: E402


def make_jpeg_shards(folder: Path, num: int, seed: int = 0, per_shard: int = 64) -> None:
    """``num`` JPEGs of 240-300 px a side (quality 90) in shards of ``per_shard``."""
    rng = np.random.default_rng(seed)
    with ShardSink(folder, maxcount=per_shard) as sink:
        for i in range(num):
            h, w = rng.integers(240, 300, 2)
            yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
            field = np.stack([np.sin(xx * rng.uniform(2, 9) + c) * np.cos(yy * rng.uniform(2, 9)) for c in range(3)], -1)
            pixels = np.clip(127 + 90 * field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "cls": b"0"})
        shards = sink.close()
    write_dataset_json(folder, {"num_samples": num, "shards": shards, "classnames": ["texture"]})


def measure(folder: Path, size: int, workers: int, batch_size: int) -> tuple[float, int]:
    """Images per second over one epoch, after the first batch (worker start-up excluded)."""
    transform = train_transform(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    loader = build_train_loader(folder, transform, batch_size, num_workers=workers, shuffle_buffer=100,
                                rank=0, world_size=1)
    images, start = 0, None
    for batch, _ in loader:
        if start is None:
            start = time.perf_counter()
            continue
        images += batch.shape[0]
    elapsed = time.perf_counter() - start
    return images / elapsed, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images to generate (default 256)")
    parser.add_argument("--size", type=int, default=224, help="crop size (default 224)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (default 0 1 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    args = parser.parse_args(argv)
    import torch

    # One thread per process: the per-worker number then means one core's worth of work.
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        make_jpeg_shards(folder, args.images)
        print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPU(s); "
              f"crop {args.size}, batch {args.batch_size}")
        print(f"{'workers':>8} {'img/s':>9} {'img/s/worker':>13} {'images':>7}")
        for workers in args.workers:
            rate, n = measure(folder, args.size, workers, args.batch_size)
            print(f"{workers:>8} {rate:>9.1f} {rate / max(1, workers):>13.1f} {n:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small labelled video–caption dataset: the demo's shapes, moving. Generated procedurally and deterministically.

    python -m data.video_demo OUT_DIR [--num 600 --frames 16 --size 64 --seed 0 --val-fraction 0.25]

Each video is a demo image (`data.demo`: a shape in a colour and size on a patterned background) whose
shape slides across the frame in a straight line, one step per frame, from one side of the room the
frame leaves it to the other; the background stays. The class of a video is its shape
(``VIDEO_DEMO_CLASSNAMES``), moving left, right, up or down at random, except for the last two classes,
``heart moving left`` and ``heart moving right``: the same shape, told apart only by the direction of
its motion. Their frames are the same set of pictures in opposite orders, so a teacher that embeds
frames one by one and averages them (`teachers.frames`: the CLIP protocol of video zero-shot) cannot
tell them apart, nor can a student that learns to match it: only a model that sees the frames in order
(a video student with a supervised objective) can. Captions name the motion: ``"a video of a small
red star moving up on bluish and grey stripes"``. Zero-shot uses the demo's prompts
(``DEMO_TEMPLATES``), which the demo teacher knows.

Writes ``OUT_DIR/train/shard-*.tar`` and ``OUT_DIR/val/shard-*.tar`` (``mp4``: MPEG-4 part 2, ``cls``,
``txt``, ``json``: what ``python -m data.make_shards`` writes for videos), each folder with its
``dataset.json`` (``media: video``, class names, templates, frame counts), and ``OUT_DIR/video_demo.json``.
The same arguments give the same bytes (one random generator per video, single-threaded encoding).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .demo import DEMO_BACKGROUNDS, DEMO_CLASSNAMES, DEMO_TEMPLATES, render_sample
from .locks import cache_lock
from .outputs import write_text
from .shards import ShardSink, prepare_out_dir, write_dataset_json

#: Classes: shapes moving any way, then one shape told apart only by the direction of its motion.
VIDEO_DEMO_CLASSNAMES = ["circle", "square", "triangle", "star", "cross", "ring", "moon", "diamond",
                         "heart moving left", "heart moving right"]
#: The classes a frame-averaging teacher cannot tell apart (the same pictures in opposite orders).
MOTION_ONLY_CLASSES = ("heart moving left", "heart moving right")
#: direction -> unit step (x right, y down).
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
#: Bumped whenever the same arguments would give other videos (the demo cache keys on it).
VIDEO_DEMO_VERSION = 1
FPS = 8


def _shape_and_direction(label: int, rng: np.random.Generator) -> tuple[str, str]:
    name = VIDEO_DEMO_CLASSNAMES[label]
    if name in MOTION_ONLY_CLASSES:
        shape, _, direction = name.split()
        return shape, direction
    return name, list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]


def render_video(index: int, seed: int = 0, size: int = 64, frames: int = 16) -> tuple[list[Image.Image], dict]:
    """The frames of demo video ``index`` (class ``index % 10``) and its attributes (``cls``, ``shape``,
    ``direction``, the still image's attributes, ``caption``)."""
    if frames < 2:
        raise ValueError(f"a moving shape needs at least 2 frames, got {frames}")
    label = index % len(VIDEO_DEMO_CLASSNAMES)
    rng = np.random.default_rng([seed, index, 1])  # the motion's draws; the picture's are data.demo's
    shape, direction = _shape_and_direction(label, rng)
    dx, dy = DIRECTIONS[direction]
    across = rng.uniform(0.15, 0.85)  # where the path runs, across the motion
    start, end = 0.05, 0.95
    pictures, attrs = [], {}
    for t in range(frames):
        along = start + (end - start) * t / (frames - 1)
        if dx + dy < 0:  # left or up: from the far side
            along = 1.0 - along
        position = (along, across) if dx else (across, along)
        image, attrs = render_sample(index, seed, size, DEMO_CLASSNAMES.index(shape), position=position)
        pictures.append(image)
    background = DEMO_BACKGROUNDS[attrs["background"]].format(" and ".join(attrs["tints"]))
    caption = f"a video of a {attrs['size']} {attrs['colour']} {shape} moving {direction} {background}"
    info = {k: v for k, v in attrs.items() if k not in ("cls", "caption", "centre", "index")}
    return pictures, {"index": index, "cls": label, "classname": VIDEO_DEMO_CLASSNAMES[label], "shape": shape,
                      "direction": direction, "frames": frames, "caption": caption, **info}


def encode_mp4(pictures: list[Image.Image], fps: int = FPS) -> bytes:
    """MPEG-4 part 2 in an mp4 container, near-lossless at these sizes, single-threaded (the same bytes every run)."""
    import av

    buf = io.BytesIO()
    width, height = pictures[0].size
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate, stream.gop_size = 2_000_000, 8
        stream.codec_context.thread_count = 1
        for picture in pictures:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(picture), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_video_demo_dataset(out_dir, num: int = 600, seed: int = 0, size: int = 64, frames: int = 16,
                            val_fraction: float = 0.25, shard_size: int = 100, progress: bool = False) -> dict:
    """Generate the demo videos in ``out_dir`` (see the module docstring); returns what ``video_demo.json`` holds.

    Videos ``0 .. n_val-1`` form the val split, the rest the train split; classes cycle with the index.
    """
    n_val = int(round(num * val_fraction))
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if not 0 < n_val < num:
        raise ValueError(f"num={num} with val_fraction={val_fraction} leaves no training or no val videos")
    out = Path(out_dir)
    with cache_lock(out / ".video_demo.lock", f"the demo videos in {out}"):
        return _write(out, n_val, num, seed, size, frames, val_fraction, shard_size, progress)


def _write(out: Path, n_val: int, num: int, seed: int, size: int, frames: int, val_fraction: float,
           shard_size: int, progress: bool) -> dict:
    from tqdm import tqdm

    result = {"format": "data.video_demo", "version": VIDEO_DEMO_VERSION, "classnames": list(VIDEO_DEMO_CLASSNAMES),
              "templates": list(DEMO_TEMPLATES), "motion_only_classes": list(MOTION_ONLY_CLASSES), "num": num,
              "seed": seed, "size": size, "frames": frames, "val_fraction": val_fraction, "out_dir": str(out)}
    bar = tqdm(total=num, desc="demo videos", unit="video", disable=not progress)
    for split, indices in {"val": range(0, n_val), "train": range(n_val, num)}.items():
        folder = prepare_out_dir(out / split, overwrite=True)
        with ShardSink(folder, maxcount=shard_size) as sink:
            for i in indices:
                pictures, attrs = render_video(i, seed, size, frames)
                attrs["video"] = {"num_frames": frames, "fps": float(FPS), "width": size, "height": size,
                                  "codec": "mpeg4"}
                sink.write({"__key__": f"{i:06d}", "mp4": encode_mp4(pictures), "cls": str(attrs["cls"]).encode(),
                            "txt": attrs["caption"].encode(), "json": json.dumps(attrs, sort_keys=True).encode()})
                bar.update(1)
            shards = sink.close()
        result[split] = write_dataset_json(folder, {
            "format": "webdataset", "created_by": "data.video_demo", "media": "video", "split": split, "seed": seed,
            "size": size, "num_samples": len(indices), "shards": shards, "classnames": list(VIDEO_DEMO_CLASSNAMES),
            "num_classes": len(VIDEO_DEMO_CLASSNAMES), "templates": list(DEMO_TEMPLATES),
            "keys": ["cls", "json", "mp4", "txt"],
            "video": {"min_frames": frames, "max_frames": frames, "codecs": {"mpeg4": len(indices)}},
        })
    bar.close()
    write_text(out / "video_demo.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.video_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="output folder (gets train/, val/ and video_demo.json)")
    parser.add_argument("--num", type=int, default=600, help="videos in total (default 600)")
    parser.add_argument("--frames", type=int, default=16, help="frames per video (default 16)")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="fraction held out for val (default 0.25)")
    parser.add_argument("--shard-size", type=int, default=100, help="videos per shard (default 100)")
    args = parser.parse_args(argv)
    try:
        info = make_video_demo_dataset(args.out_dir, args.num, args.seed, args.size, args.frames, args.val_fraction,
                                       args.shard_size, progress=True)
    except (ValueError, ImportError) as exn:
        print(f"data.video_demo: error: {exn}", file=sys.stderr)
        return 2
    print(f"wrote {info['train']['num_samples']} train and {info['val']['num_samples']} val videos "
          f"({len(VIDEO_DEMO_CLASSNAMES)} classes, {args.frames} frames of {args.size} px) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

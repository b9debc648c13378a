"""Convert an image or video folder, or a list of image or video paths, into WebDataset shards.

    python -m data.make_shards SRC OUT_DIR [--maxcount N] [--maxsize BYTES] [--max-size S] [--media auto|image|video]

SRC is a folder with one sub-folder per class (ImageNet layout), a flat folder of images, or
a text file with one image path per line (optionally ``PATH<TAB>CLASS``). OUT_DIR receives
``shard-000000.tar``, ... (image bytes as they are, ``cls`` when the class is known, ``json``
with source path and class name) and ``dataset.json`` (samples per shard, class names).
Unreadable files are reported and skipped. ``--max-size S`` re-encodes JPEGs whose shorter side
is above S px to a shorter side of S (quality 95, as img2dataset's keep_ratio; ``data.reencode``)
and prints the bytes it saved; S below the training crop (``--crop``, 224) is refused.

Videos (a folder of them, with or without class sub-folders, or a ``.csv`` / ``.jsonl`` table of
``path``, ``caption``, ``label``) become video shards in video2dataset's layout: see
``data.video_shards``.
"""

from __future__ import annotations

import argparse
import sys

from .reencode import check_max_size, saved_line
from .shards import make_shards
from .video_shards import detect_media, make_video_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.make_shards", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="image or video folder (class sub-folders or flat), text file of paths, or "
                        "CSV/JSONL table of videos (path, caption, label)")
    parser.add_argument("out_dir", help="output folder for shard-NNNNNN.tar and dataset.json")
    parser.add_argument("--maxcount", type=int, default=10000, help="most samples per shard (default 10000)")
    parser.add_argument("--maxsize", type=float, default=1e9, help="most bytes per shard (default 1e9)")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--classes", dest="classes", action="store_true", default=None,
                        help="use the sub-folders of SRC as classes (default: detect)")
    layout.add_argument("--no-classes", dest="classes", action="store_false",
                        help="treat SRC as unlabelled, taking images from all sub-folders")
    parser.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                        help="keep the source order (default: shuffle, so shards mix classes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    parser.add_argument("--verify", choices=("full", "header", "none"), default=None,
                        help="decode every image / video frame (full; default for images), check headers only "
                        "(videos: decode the first frame; default for videos), or nothing")
    parser.add_argument("--workers", type=int, default=0, help="processes reading images (default 0: this one)")
    parser.add_argument("--media", choices=("auto", "image", "video"), default="auto",
                        help="what SRC holds (default: detect from the files)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--max-size", type=int, default=None, metavar="S",
                        help="re-encode JPEGs whose shorter side is above S px to shorter side S (quality 95)")
    parser.add_argument("--crop", type=int, default=224, help="the training crop the shards are for: --max-size "
                        "must not be below it (default 224)")
    args = parser.parse_args(argv)
    try:
        video = (args.media if args.media != "auto" else detect_media(args.src)) == "video"
        if video and args.max_size is not None:
            raise ValueError("--max-size re-encodes images; video shards store each video as it is: leave it out")
        check_max_size(args.max_size, args.crop)
        common = dict(classes=args.classes, shuffle=args.shuffle, seed=args.seed, workers=args.workers,
                      overwrite=args.overwrite, progress=not args.quiet)
        if video:
            info = make_video_shards(args.src, args.out_dir, args.maxcount, int(args.maxsize),
                                     verify=args.verify or "header", **common)
        else:
            info = make_shards(args.src, args.out_dir, args.maxcount, int(args.maxsize), verify=args.verify or "full",
                               max_size=args.max_size, **common)
    except (OSError, ValueError, ImportError) as exn:  # user errors (ImportError: no PyAV): a message, not a traceback
        print(f"make_shards: error: {exn}", file=sys.stderr)
        return 2
    classes = f", {info['num_classes']} classes" if info["classnames"] else ", no classes"
    print(f"wrote {info['num_samples']} samples in {len(info['shards'])} shard(s){classes} to {args.out_dir}")
    if args.max_size is not None:
        print(saved_line(args.max_size, info["reencoded"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

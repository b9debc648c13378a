"""A small labelled image–caption dataset, generated procedurally and deterministically.

    python -m data.demo OUT_DIR [--num 2400 --seed 0 --size 64 --val-fraction 0.1667]

No dataset can be downloaded here, so the tests and the demo recipe use this one. The class of
an image is the SHAPE drawn on it (``DEMO_CLASSNAMES``); colour, size, position, rotation and
background vary as nuisance attributes. The background is a pattern (plain, stripes, dots,
checkerboard, noise) in one or two tints (``DEMO_TINTS``), and the caption names all but
position and rotation: ``"a photo of a small red star on bluish and grey stripes"``. Shapes are
large (35-80 % of the image side), so a tiny CLIP (ViT width 128, 4 layers, patch 8 at 64 px)
learns the classes within minutes on a CPU; ``DEMO_TEMPLATES`` serve zero-shot classification.

The tints are there for the demo's held-out retrieval (does a student's embedding find its own
image's teacher embedding among 400?): with the shape colour alone, about 50 of 400 images
share the attribute a tiny teacher encodes most strongly, and a student confused them; two
named tints split those groups into images that a student, which samples colours easily,
tells apart (retrieval 0.665 -> 0.825 with the 6-layer teacher of the time). The two-tint
patterns are stronger clutter, for which the demo recipe tunes its teacher
(``demo.teacher.uniformity_weight``; see ``bootstrap.demo_teacher``).

Writes ``OUT_DIR/train/shard-*.tar`` and ``OUT_DIR/val/shard-*.tar`` (keys ``png``, ``cls``,
``txt``, ``json``), each folder with its ``dataset.json``, and ``OUT_DIR/demo.json`` with both.
The same arguments give the same bytes: each image draws from its own random generator seeded
by ``(seed, index)``, PNG encoding is deterministic and tar metadata is fixed.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .locks import cache_lock
from .outputs import write_text

from .shards import ShardSink, prepare_out_dir, write_dataset_json

DEMO_CLASSNAMES = ["circle", "square", "triangle", "star", "cross", "ring", "heart", "moon", "arrow", "diamond"]

#: Zero-shot prompt templates for the demo classes.
DEMO_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {} shape.",
    "a photo of a {} on a background.",
]

#: name -> (RGB, is_light). Light colours go on darker backgrounds and vice versa, for contrast.
DEMO_COLOURS = {
    "red": ((215, 35, 35), False),
    "green": ((35, 160, 55), False),
    "blue": ((40, 75, 215), False),
    "purple": ((135, 45, 185), False),
    "black": ((25, 25, 25), False),
    "yellow": ((240, 210, 35), True),
    "orange": ((245, 140, 25), True),
    "white": ((250, 250, 250), True),
}

#: size word -> range of the shape's extent as a fraction of the image side.
DEMO_SIZES = {"small": (0.35, 0.5), "medium": (0.5, 0.65), "large": (0.65, 0.8)}

#: background -> how the caption names it, with its tints in place of ``{}``.
DEMO_BACKGROUNDS = {
    "plain": "on a plain {} background",
    "stripes": "on {} stripes",
    "dots": "on {} dots",
    "checkerboard": "on a {} checkerboard",
    "noise": "on {} noise",
}

#: tint -> (RGB behind a light shape, RGB behind a dark shape). A plain background has one
#: tint; a pattern is drawn in a second, different one ("on bluish and grey stripes").
DEMO_TINTS = {
    "grey": ((80, 80, 80), (195, 195, 195)),
    "bluish": ((45, 65, 120), (170, 195, 240)),
    "greenish": ((50, 100, 55), (180, 230, 175)),
    "reddish": ((120, 45, 50), (240, 185, 185)),
    "yellowish": ((110, 95, 35), (240, 230, 160)),
}

#: Bumped whenever the same arguments would render different images (the demo cache keys on it).
DEMO_DATA_VERSION = 2

_CAPTION_PREFIXES = ("a photo of", "a picture of", "an image of")
# Shapes are drawn at 4x and backgrounds at 2x, then box-downsampled: anti-aliased edges at
# little cost, and deterministic.
_SHAPE_SS = 4
_BG_SS = 2


# ----------------------------------------------------------------------------- shapes
# Each shape is one or more polygons in unit coordinates (within [-1, 1]); the second
# element says whether a polygon is filled (True) or cut out as a hole (False).


def _circle(n: int = 96, r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    t = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 120, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


_A = 0.33  # half-width of the cross's arms
_SHAPES: dict[str, list[tuple[np.ndarray, bool]]] = {
    "circle": [(_circle(), True)],
    "square": [(np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float), True)],
    "triangle": [(np.array([(0, -1), (0.866, 0.5), (-0.866, 0.5)]), True)],  # apex up (y points down)
    "star": [(_star(), True)],
    "cross": [(np.array([(-_A, -1), (_A, -1), (_A, -_A), (1, -_A), (1, _A), (_A, _A), (_A, 1), (-_A, 1),
                         (-_A, _A), (-1, _A), (-1, -_A), (-_A, -_A)], float), True)],
    "ring": [(_circle(), True), (_circle(r=0.55), False)],
    "heart": [(_heart(), True)],
    "moon": [(_circle(), True), (_circle(r=0.85, cx=0.5, cy=-0.2), False)],
    "arrow": [(np.array([(-1, -0.25), (0.1, -0.25), (0.1, -0.7), (1, 0), (0.1, 0.7), (0.1, 0.25), (-1, 0.25)],
                        float), True)],
    "diamond": [(np.array([(0, -1), (1, 0), (0, 1), (-1, 0)], float), True)],
}
assert list(_SHAPES) == DEMO_CLASSNAMES

# Rotation jitter in degrees. Square and diamond are 45 degrees apart, so they stay near upright.
_ROTATION = {"square": 10.0, "diamond": 10.0, "circle": 0.0, "ring": 0.0}


def _rotation(shape: str, rng: np.random.Generator) -> float:
    if shape == "arrow":  # any of the four directions
        return 90.0 * rng.integers(4) + rng.uniform(-10, 10)
    jitter = _ROTATION.get(shape, 20.0)
    return rng.uniform(-jitter, jitter)


# ----------------------------------------------------------------------------- backgrounds


@lru_cache(maxsize=4)
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a ``side`` x ``side`` canvas in output pixels."""
    c = (np.arange(side, dtype=np.float32) + 0.5) / _BG_SS
    return np.meshgrid(c, c)  # x, y


def _tint_rgb(tint: str, light_shape: bool, rng: np.random.Generator) -> np.ndarray:
    rgb = np.array(DEMO_TINTS[tint][0 if light_shape else 1], np.float64)
    return np.clip(rgb + rng.uniform(-15, 15) + rng.uniform(-8, 8, 3), 0, 255).astype(np.float32)


def _background(kind: str, tints: list[str], side: int, light_shape: bool, rng: np.random.Generator) -> np.ndarray:
    """A ``[side, side, 3]`` float background in ``tints`` (the pattern in the second); dark when
    the shape is light, light otherwise."""
    base = _tint_rgb(tints[0], light_shape, rng)
    other = _tint_rgb(tints[-1], light_shape, rng)
    x, y = _grid(side)
    if kind == "plain":
        mask = np.zeros_like(x)
    elif kind == "stripes":
        angle = np.deg2rad(45.0 * rng.integers(4) + rng.uniform(-8, 8))
        period = rng.uniform(6, 12)
        phase = (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform()
        mask = (phase % np.float32(1.0) < 0.5).astype(np.float32)
    elif kind == "dots":
        period, radius = rng.uniform(6, 10), rng.uniform(1.2, 2.2)
        ox, oy = rng.uniform(0, period, 2)
        dx = (x - ox + period / 2) % period - period / 2
        dy = (y - oy + period / 2) % period - period / 2
        mask = (dx * dx + dy * dy < radius * radius).astype(np.float32)
    elif kind == "checkerboard":
        period = rng.uniform(6, 12)
        ox, oy = rng.uniform(0, period, 2)
        mask = ((np.floor((x + ox) / period) + np.floor((y + oy) / period)) % 2).astype(np.float32)
    elif kind == "noise":
        out_side = side // _BG_SS
        blotches = rng.normal(0, 1, (out_side // 8 + 1, out_side // 8 + 1)).astype(np.float32)
        low = np.asarray(Image.fromarray(blotches).resize((side, side), Image.BILINEAR))
        fine = np.repeat(np.repeat(rng.normal(0, 1, (out_side, out_side)), _BG_SS, 0), _BG_SS, 1)
        mask = np.clip(0.5 + 0.3 * low + 0.15 * fine, 0, 1).astype(np.float32)
    else:
        raise ValueError(f"unknown background {kind!r}; choose one of {list(DEMO_BACKGROUNDS)}")
    mask = mask[..., None]
    return base + (other - base) * mask


# ----------------------------------------------------------------------------- rendering


def render_sample(index: int, seed: int = 0, size: int = 64, label: int | None = None, *,
                  position: tuple[float, float] | None = None) -> tuple[Image.Image, dict]:
    """Render demo image ``index`` for ``seed``; returns the PIL image and its attributes
    (``cls``, ``shape``, ``colour``, ``size``, ``scale``, ``background``, ``tints``, ``caption``, ...).

    The class is ``index % len(DEMO_CLASSNAMES)`` unless ``label`` is given. ``position`` places the
    shape's box at that fraction ``(x, y)`` of the room the image leaves it (0: left / top, 1: right /
    bottom) instead of at random, all else unchanged: the frames of a moving shape (`data.video_demo`).
    """
    rng = np.random.default_rng([seed, index])
    label = index % len(DEMO_CLASSNAMES) if label is None else label
    shape = DEMO_CLASSNAMES[label]
    colour = list(DEMO_COLOURS)[rng.integers(len(DEMO_COLOURS))]
    size_word = list(DEMO_SIZES)[rng.integers(len(DEMO_SIZES))]
    background = list(DEMO_BACKGROUNDS)[rng.integers(len(DEMO_BACKGROUNDS))]
    tints = [str(t) for t in rng.choice(list(DEMO_TINTS), 1 if background == "plain" else 2, replace=False)]
    scale = rng.uniform(*DEMO_SIZES[size_word])
    angle = _rotation(shape, rng)

    # Rotate, then scale so the larger side of the bounding box is `scale` of the image.
    theta = np.deg2rad(angle)
    rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    polys = [(pts @ rot, fill) for pts, fill in _SHAPES[shape]]
    outline = polys[0][0]  # the first polygon is the outer one
    lo, hi = outline.min(0), outline.max(0)
    factor = scale * size / (hi - lo).max()
    extent = (hi - lo) * factor
    margin = 1.0
    centre = np.array([rng.uniform(margin, size - margin - extent[0]), rng.uniform(margin, size - margin - extent[1])])
    if position is not None:
        centre = margin + np.asarray(position, dtype=float) * np.maximum(size - 2 * margin - extent, 0.0)
    offset = centre - lo * factor  # top-left of the box lands at `centre`

    side = size * _SHAPE_SS
    mask_img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask_img)
    for pts, fill in polys:
        xy = (pts * factor + offset) * _SHAPE_SS
        draw.polygon([tuple(p) for p in xy.tolist()], fill=255 if fill else 0)
    bg_side = size * _BG_SS
    mask_img = mask_img.resize((bg_side, bg_side), Image.BOX)
    mask = np.asarray(mask_img, dtype=np.float32)[..., None] / np.float32(255.0)

    rgb, light = DEMO_COLOURS[colour]
    paint = np.clip(np.array(rgb, float) + rng.uniform(-12, 12, 3), 0, 255).astype(np.float32)
    bg = _background(background, tints, bg_side, light, rng)
    pixels = bg + (paint - bg) * mask
    image = Image.fromarray(np.round(pixels).astype(np.uint8), "RGB").resize((size, size), Image.BOX)

    prefix = _CAPTION_PREFIXES[rng.integers(len(_CAPTION_PREFIXES))]
    caption = f"{prefix} a {size_word} {colour} {shape} {DEMO_BACKGROUNDS[background].format(' and '.join(tints))}"
    attrs = {"index": index, "cls": label, "shape": shape, "colour": colour, "size": size_word,
             "scale": round(float(scale), 4), "rotation": round(float(angle), 2), "background": background,
             "tints": tints,
             "centre": [round(float(c), 2) for c in centre + extent / 2], "caption": caption}
    return image, attrs


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)  # no metadata, fixed level: same bytes every run
    return buf.getvalue()


def make_demo_dataset(out_dir, num: int = 2400, seed: int = 0, size: int = 64, val_fraction: float = 1 / 6,
                      shard_size: int = 250) -> dict:
    """Generate the demo dataset in ``out_dir`` (see the module doc); returns what demo.json holds:
    ``classnames``, ``templates``, the arguments, and ``train``/``val`` (each split's dataset.json).

    Images ``0 .. n_val-1`` (``n_val = round(num * val_fraction)``) form the val split, the rest
    the train split; classes cycle with the index, so both splits are balanced. Existing demo
    shards in ``out_dir/train`` and ``out_dir/val`` are replaced.
    """
    n_val = int(round(num * val_fraction))
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if not 0 <= n_val < num:
        raise ValueError(f"num={num} with val_fraction={val_fraction} leaves no training images")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    out = Path(out_dir)
    with cache_lock(out / ".demo.lock", f"the demo dataset in {out}"):  # two processes would write the same files
        return _write_demo_dataset(out, n_val, num, seed, size, val_fraction, shard_size)


def _write_demo_dataset(out: Path, n_val: int, num: int, seed: int, size: int, val_fraction: float,
                        shard_size: int) -> dict:
    splits = {"val": range(0, n_val), "train": range(n_val, num)}
    result = {"format": "data.demo", "version": DEMO_DATA_VERSION, "classnames": list(DEMO_CLASSNAMES),
              "templates": list(DEMO_TEMPLATES), "num": num, "seed": seed, "size": size,
              "val_fraction": val_fraction, "out_dir": str(out)}
    for split, indices in splits.items():
        folder = prepare_out_dir(out / split, overwrite=True)
        with ShardSink(folder, maxcount=shard_size) as sink:
            for i in indices:
                image, attrs = render_sample(i, seed, size)
                sink.write({"__key__": f"{i:06d}", "png": _png(image), "cls": str(attrs["cls"]).encode(),
                            "txt": attrs["caption"].encode(), "json": json.dumps(attrs, sort_keys=True).encode()})
            shards = sink.close()
        result[split] = write_dataset_json(folder, {
            "format": "webdataset", "created_by": "data.demo", "split": split, "seed": seed, "size": size,
            "num_samples": len(indices), "shards": shards, "classnames": list(DEMO_CLASSNAMES),
            "num_classes": len(DEMO_CLASSNAMES), "templates": list(DEMO_TEMPLATES),
            "keys": ["cls", "json", "png", "txt"] if len(indices) else [],
        })
    write_text(out / "demo.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="output folder (gets train/, val/ and demo.json)")
    parser.add_argument("--num", type=int, default=2400, help="images in total (default 2400)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--val-fraction", type=float, default=1 / 6, help="fraction held out for val (default 1/6)")
    parser.add_argument("--shard-size", type=int, default=250, help="images per shard (default 250)")
    args = parser.parse_args(argv)
    try:
        info = make_demo_dataset(args.out_dir, args.num, args.seed, args.size, args.val_fraction, args.shard_size)
    except ValueError as exn:
        print(f"data.demo: error: {exn}", file=sys.stderr)
        return 2
    print(f"wrote {info['train']['num_samples']} train and {info['val']['num_samples']} val images "
          f"({len(DEMO_CLASSNAMES)} classes) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

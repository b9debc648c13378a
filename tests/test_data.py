"""Tests of the data package: shards, the training stream, evaluation sets, the demo set.

Images are tiny solid-colour squares: each file gets its own colour, so a streamed image can be
traced back to the file (and class) it came from.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.demo import (DEMO_BACKGROUNDS, DEMO_CLASSNAMES, DEMO_COLOURS, DEMO_SIZES, DEMO_TEMPLATES, DEMO_TINTS,
                       make_demo_dataset)
from data.evalsets import FolderEvalSet, build_eval_loader
from data.make_shards import main as make_shards_main
from data.shards import (ShardError, ShardSink, check_shard, check_shards, iter_shard, make_shards, resolve_shards,
                         shard_sample_counts)
from data.stream import build_train_loader, plan_segments, shard_order, worker_share
from data.transforms import eval_transform, train_transform, transforms_from_config

ROOT = Path(__file__).resolve().parents[1]
SIDE = 8


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Identity-like transform: exact pixels, so images can be identified by colour."""
    return torch.from_numpy(__import__("numpy").asarray(image).copy()).permute(2, 0, 1).float()


def colour(i: int) -> tuple[int, int, int]:
    """A distinct colour per index, far enough apart to survive JPEG."""
    return (40 * (i % 6) + 20, 40 * ((i // 6) % 6) + 20, 40 * (i // 36) + 20)


def image_bytes(i: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), colour(i)).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def identify(image: torch.Tensor, n: int) -> int:
    """Index of the colour nearest to the mean colour of a [3, H, W] image."""
    mean = image.float().mean((1, 2))
    return min(range(n), key=lambda i: float(((mean - torch.tensor(colour(i), dtype=torch.float)) ** 2).sum()))


@pytest.fixture
def class_folder(tmp_path):
    """3 classes x 5 images (PNG, with a JPEG and an upper-case extension in the mix)."""
    root = tmp_path / "images"
    sources = {}
    for i in range(15):
        cls = ["cat", "dog", "fox"][i % 3]
        fmt, ext = ("JPEG", ".JPEG") if i % 5 == 0 else ("PNG", ".png")
        path = root / cls / f"img{i:02d}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(i, fmt))
        sources[i] = (path, cls)
    (root / "dog" / "notes.txt").write_text("not an image, ignored")
    return root, sources


def write_shards(folder: Path, samples: list[dict], maxcount: int, with_json: bool = True) -> list[dict]:
    with ShardSink(folder, maxcount=maxcount) as sink:
        for sample in samples:
            sink.write(sample)
        shards = sink.close()
    if with_json:
        (folder / "dataset.json").write_text(json.dumps({"shards": shards, "classnames": ["a", "b", "c"]}))
    return shards


def numbered_samples(n: int) -> list[dict]:
    return [{"__key__": f"{i:05d}", "png": image_bytes(i), "cls": str(i % 3).encode()} for i in range(n)]


def collect(loader) -> tuple[list[str], int]:
    keys, batches = [], 0
    for images, extras in loader:
        assert images.shape == (loader.batch_size, 3, SIDE, SIDE)
        keys += extras["__key__"]
        batches += 1
    return keys, batches


# ----------------------------------------------------------------------------- make_shards


def test_class_folder_to_shards_to_stream_round_trip(class_folder, tmp_path):
    root, sources = class_folder
    info = make_shards(root, tmp_path / "shards", maxcount=4, progress=False)
    assert info["classnames"] == ["cat", "dog", "fox"]
    assert info["num_samples"] == 15 and [s["num_samples"] for s in info["shards"]] == [4, 4, 4, 3]
    assert json.loads((tmp_path / "shards" / "dataset.json").read_text()) == info
    assert shard_sample_counts(resolve_shards(tmp_path / "shards")) == [4, 4, 4, 3]

    # Image bytes are stored as they are, under the extension of their real format.
    stored = {}
    for url in resolve_shards(tmp_path / "shards"):
        for sample in iter_shard(url):
            meta = json.loads(sample["json"])
            ext = "jpg" if meta["path"].endswith(".JPEG") else "png"
            assert sample[ext] == (root / meta["path"]).read_bytes()
            assert info["classnames"][int(sample["cls"])] == meta["classname"] == Path(meta["path"]).parent.name
            stored[sample["__key__"]] = meta["path"]
    assert sorted(stored.values()) == sorted(str(p.relative_to(root)) for p, _ in sources.values())

    loader = build_train_loader(tmp_path / "shards", to_tensor, batch_size=5, num_workers=0, world_size=1, rank=0)
    seen = {}
    for images, extras in loader:
        for image, key, label in zip(images, extras["__key__"], extras["cls"].tolist()):
            i = identify(image, 15)
            assert info["classnames"][label] == sources[i][1]
            assert stored[key] == str(sources[i][0].relative_to(root))
            seen[key] = i
    assert len(loader) == 3 and sorted(seen.values()) == list(range(15))


def test_flat_folder_and_text_file_sources(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(6):
        (flat / f"{i}.png").write_bytes(image_bytes(i))
    (flat / "broken.png").write_bytes(image_bytes(6)[:30])  # truncated: reported and skipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = make_shards(flat, tmp_path / "flat_shards", progress=False)
    assert info["classnames"] is None and info["num_samples"] == 6
    assert [Path(s["path"]).name for s in info["skipped"]] == ["broken.png"]
    loader = build_train_loader(tmp_path / "flat_shards", to_tensor, batch_size=3, num_workers=0, world_size=1, rank=0)
    labels = [label for _, extras in loader for label in extras["cls"].tolist()]
    assert labels == [-1] * 6

    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nflat/0.png\tzebra\nflat/1.png\tant\n\n" + f"{flat / '2.png'}\tzebra\n")
    info = make_shards(listing, tmp_path / "list_shards", progress=False, shuffle=False)
    assert info["classnames"] == ["ant", "zebra"] and info["num_samples"] == 3
    got = [(json.loads(s["json"])["path"], int(s["cls"])) for s in iter_shard(resolve_shards(tmp_path / "list_shards")[0])]
    assert got == [("flat/0.png", 1), ("flat/1.png", 0), (str(flat / "2.png"), 1)]

    with pytest.raises(FileExistsError, match="overwrite"):
        make_shards(listing, tmp_path / "list_shards", progress=False)
    with pytest.raises(ValueError, match="no images found"):
        make_shards(tmp_path / "list_shards", tmp_path / "out", progress=False)


def test_make_shards_cli(class_folder, tmp_path):
    root, _ = class_folder
    out = tmp_path / "cli_shards"
    proc = subprocess.run([sys.executable, "-m", "data.make_shards", str(root), str(out), "--maxcount", "6", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "dataset.json").read_text())
    assert [s["num_samples"] for s in info["shards"]] == [6, 6, 3] and info["classnames"] == ["cat", "dog", "fox"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_make_shards_cli_reports_user_errors(tmp_path, capsys):
    assert make_shards_main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("num_samples", [50, 53])
def test_two_ranks_two_workers_see_every_sample_once(tmp_path, num_samples):
    # Uneven shards (7 samples each, the last one short) and more shards than slots.
    write_shards(tmp_path, numbered_samples(num_samples), maxcount=7)
    per_rank = {}
    for rank in range(2):
        loader = build_train_loader(tmp_path, to_tensor, batch_size=5, num_workers=2, rank=rank, world_size=2,
                                    shuffle_buffer=8, seed=1)
        assert len(loader) == 5
        per_rank[rank] = [collect(loader) for _ in range(2)]  # two epochs
    for epoch in range(2):
        (keys0, n0), (keys1, n1) = per_rank[0][epoch], per_rank[1][epoch]
        assert n0 == n1 == 5
        counts = Counter(keys0 + keys1)
        assert max(counts.values()) == 1 and not set(keys0) & set(keys1)
        # 50 = 2 ranks x 5 batches x 5: every sample once; of 53 the 3 left over are dropped.
        assert len(counts) == 50
    assert per_rank[0][0][0] != per_rank[0][1][0]  # the next epoch reshuffles


def test_worker_plans_partition_the_epoch():
    """The plan itself: contiguous, disjoint ranges over shards of any size, wrapping around."""
    counts = [7, 0, 3, 11, 1, 9, 5]
    total = sum(counts)
    for world in (1, 2, 3):
        for workers in (1, 2, 3):
            for batch in (1, 2, 4):
                nb = total // (world * batch)
                seen = Counter()
                for rank in range(world):
                    for w in range(workers):
                        first, n = worker_share(nb, w, workers)
                        start = (rank * nb + first) * batch
                        for shard, a, b in plan_segments(counts, shard_order(len(counts), 0, 5, True), start, n * batch):
                            assert 0 <= a < b <= counts[shard]
                            seen.update((shard, j) for j in range(a, b))
                assert sum(seen.values()) == world * nb * batch and max(seen.values()) == 1
    # epoch_samples beyond the dataset wraps around: everything once, then again.
    wrapped = Counter((s, j) for s, a, b in plan_segments(counts, list(range(7)), 30, 2 * total) for j in range(a, b))
    assert set(wrapped.values()) == {2}


def test_resampled_stream_gives_equal_batches(tmp_path):
    write_shards(tmp_path, numbered_samples(20), maxcount=7)
    counts = []
    for rank in range(2):
        loader = build_train_loader(str(tmp_path / "shard-{000000..000002}.tar"), to_tensor, batch_size=4, num_workers=0,
                                    epoch_samples=40, resampled=True, rank=rank, world_size=2)
        keys, n = collect(loader)
        counts.append(n)
        assert set(keys) <= {f"{i:05d}" for i in range(20)}
    assert counts == [5, 5]


def test_rank_defaults_come_from_the_environment(tmp_path, monkeypatch):
    write_shards(tmp_path, numbered_samples(12), maxcount=4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    loader = build_train_loader(tmp_path, to_tensor, batch_size=2, num_workers=0)
    assert (loader.rank, loader.world_size, len(loader)) == (1, 3, 2)


def test_img2dataset_layout_streams(tmp_path):
    samples = [{"__key__": f"{i:09d}", "jpg": image_bytes(i % 6, "JPEG"), "txt": f"caption {i % 6}".encode(),
                "json": json.dumps({"url": f"http://x/{i}.jpg"}).encode()} for i in range(12)]
    with ShardSink(tmp_path, maxcount=6, pattern="%05d.tar") as sink:
        for s in samples:
            sink.write(s)
    for shard in range(2):
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": 6}))
    assert shard_sample_counts(resolve_shards(tmp_path)) == [6, 6]  # from img2dataset's stats files
    loader = build_train_loader(tmp_path, to_tensor, batch_size=4, num_workers=0, world_size=1, rank=0)
    texts, labels = [], []
    for _, extras in loader:
        texts += extras["txt"]
        labels += extras["cls"].tolist()
    assert len(loader) == 3 and sorted(texts) == sorted(f"caption {i}" for i in range(6) for _ in range(2))
    assert set(labels) == {-1}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_skipped_counted_and_named(tmp_path, num_workers):
    samples = numbered_samples(20)
    bad = {"00003", "00008", "00015"}
    for s in samples:
        if s["__key__"] in bad:
            s["png"] = s["png"][: len(s["png"]) // 2]  # truncated image
    samples[11]["png"] = b"this is not an image"
    bad.add("00011")
    write_shards(tmp_path, samples, maxcount=10)
    loader = build_train_loader(tmp_path, to_tensor, batch_size=4, num_workers=num_workers, world_size=1, rank=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys, batches = collect(loader)
    # The rank still yields its full epoch: the skipped samples are filled in with good ones.
    assert batches == len(loader) == 5 and loader.stats.padded == 4
    assert loader.stats.skipped == 4 and not set(keys) & bad
    assert sorted(name.rsplit("#", 1)[1] for name in loader.stats.skipped_samples) == sorted(bad)
    assert all(str(tmp_path / "shard-00000") in name for name in loader.stats.skipped_samples)
    if num_workers == 0:  # warnings raised in worker processes go to their stderr
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 4 and any("'00011'" in m and "shard-000001.tar" in m for m in messages)


def test_eval_shards_count_skipped_samples(tmp_path):
    samples = numbered_samples(6)
    samples[2]["png"] = samples[2]["png"][:20]
    write_shards(tmp_path, samples, maxcount=4)
    loader, classnames = build_eval_loader(tmp_path, to_tensor, batch_size=4, num_workers=0)
    with pytest.warns(RuntimeWarning, match="'00002'"):
        labels = [y for _, ys in loader for y in ys.tolist()]
    assert classnames == ["a", "b", "c"] and labels == [0, 1, 0, 1, 2] and loader.dataset.skipped == 1


# ----------------------------------------------------------------------------- errors


def test_missing_shards_and_empty_patterns_are_clear_errors(tmp_path):
    write_shards(tmp_path, numbered_samples(4), maxcount=2, with_json=False)
    with pytest.raises(FileNotFoundError, match=re.escape("nothing-{0..3}.tar")):
        resolve_shards(str(tmp_path / "nothing-{0..3}.tar"))
    with pytest.raises(FileNotFoundError, match="shard-000002.tar"):
        resolve_shards(str(tmp_path / "shard-{000000..000002}.tar"))
    with pytest.raises(FileNotFoundError, match=re.escape("*.tgz")):
        build_train_loader(str(tmp_path / "*.tgz"), to_tensor, batch_size=1, num_workers=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="contains no .tar shards"):
        resolve_shards(empty)
    with pytest.raises(ValueError, match="no shards given"):
        resolve_shards([])
    assert resolve_shards([tmp_path / "shard-000001.tar", str(tmp_path / "shard-000000.tar")]) == [
        str(tmp_path / "shard-000000.tar"), str(tmp_path / "shard-000001.tar")]
    with pytest.raises(ValueError, match="cannot give each of 2 rank"):
        build_train_loader(tmp_path, to_tensor, batch_size=4, num_workers=0, rank=0, world_size=2)


def test_unreadable_shard_is_a_clear_error(tmp_path):
    bad = tmp_path / "shard-000000.tar"
    bad.write_bytes(b"garbage, not a tar archive" * 40)
    with pytest.raises(ShardError, match=re.escape(str(bad))):
        list(iter_shard(str(bad)))
    with pytest.raises(FileNotFoundError, match="cannot open shard .*missing.tar"):
        list(iter_shard(str(tmp_path / "missing.tar")))
    good = tmp_path / "good"
    good.mkdir()
    write_shards(good, numbered_samples(4), maxcount=4)
    loader = build_train_loader([good / "shard-000000.tar", bad], to_tensor, epoch_samples=8, resampled=True,
                                batch_size=2, num_workers=0, rank=0, world_size=1)
    # Mid-run, an unreadable shard is skipped with a warning and named; the epoch stays whole.
    with pytest.warns(RuntimeWarning, match=f"skipping the rest of shard {re.escape(str(bad))}"):
        keys, batches = collect(loader)
    assert batches == len(loader) == 4 and str(bad) in loader.stats.bad_shards
    # Before a run, check_shard finds it (and a missing one) with a few reads.
    with pytest.raises(ShardError, match=f"shard {re.escape(str(bad))} is not a tar file"):
        check_shard(str(bad))
    with pytest.raises(FileNotFoundError, match="cannot open shard .*missing.tar"):
        check_shard(str(tmp_path / "missing.tar"))
    check_shard(str(good / "shard-000000.tar"))


@pytest.mark.parametrize("cut", [1000, 3 * 512])
def test_a_truncated_shard_is_found_before_the_run_and_skipped_during_it(tmp_path, cut):
    write_shards(tmp_path, numbered_samples(12), maxcount=6)
    second = tmp_path / "shard-000001.tar"
    loader = build_train_loader(tmp_path, to_tensor, batch_size=3, num_workers=0, rank=0, world_size=1,
                                shuffle_buffer=0, shardshuffle=False)
    check_shards(resolve_shards(tmp_path))
    second.write_bytes(second.read_bytes()[:cut])  # cut short after the loader counted its samples
    with pytest.raises(ShardError, match=f"shard {re.escape(str(second))} is cut short"):
        check_shard(str(second))
    with pytest.warns(RuntimeWarning, match="skipping the rest of shard"):
        keys, batches = collect(loader)
    assert batches == len(loader) == 4  # the lost samples are filled in, as for undecodable ones
    assert loader.stats.bad_shards == [str(second)]
    lost = 6 - len([k for k in set(keys) if int(k) >= 6])
    assert loader.stats.skipped == lost >= 5 and loader.stats.padded == lost


# ----------------------------------------------------------------------------- eval sets, transforms


def test_eval_sets_expose_class_names(class_folder, tmp_path):
    root, _ = class_folder
    loader, classnames = build_eval_loader(root, to_tensor, batch_size=4, num_workers=0)
    assert classnames == ["cat", "dog", "fox"] and isinstance(loader.dataset, FolderEvalSet)
    assert sorted(y for _, ys in loader for y in ys.tolist()) == sorted([0, 1, 2] * 5)
    renamed = FolderEvalSet(root, classnames=["a cat", "a dog", "a fox"])
    assert renamed.classnames == ["a cat", "a dog", "a fox"]

    make_shards(root, tmp_path / "shards", maxcount=4, progress=False)
    loader, classnames = build_eval_loader(tmp_path / "shards", to_tensor, batch_size=4, num_workers=2)
    assert classnames == ["cat", "dog", "fox"] and len(loader.dataset) == 15
    assert sorted(y for _, ys in loader for y in ys.tolist()) == sorted([0, 1, 2] * 5)

    make_shards(root, tmp_path / "unlabelled", classes=False, progress=False)
    with pytest.raises(ValueError, match="no class names"):
        build_eval_loader(tmp_path / "unlabelled", to_tensor)


def test_transforms():
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = train_transform(24, mean, std, color_jitter=0.4, grayscale=0.1)(image)
    assert x.shape == (3, 24, 24)
    y = eval_transform(24, mean, std, interpolation="bilinear", crop_pct=1.0)(image)
    assert y.shape == (3, 24, 24) and torch.allclose(y[0], torch.full((24, 24), (200 / 255 - 0.5) / 0.25), atol=1e-3)
    with pytest.raises(ValueError, match="unknown interpolation"):
        train_transform(24, mean, std, interpolation="cubic-ish")
    clip_cfg = {"size": 16, "mean": mean, "std": std, "interpolation": "bicubic"}  # open_clip preprocess_cfg
    assert transforms_from_config(clip_cfg)(image).shape == (3, 16, 16)
    timm_cfg = {"input_size": (3, 20, 20), "mean": mean, "std": std, "crop_pct": 0.9}  # timm data config
    assert transforms_from_config(timm_cfg, train=True, scale=(0.5, 1.0))(image).shape == (3, 20, 20)


# ----------------------------------------------------------------------------- demo dataset


def test_demo_dataset_is_deterministic_labelled_and_split(tmp_path):
    a = make_demo_dataset(tmp_path / "a", num=60, seed=3, shard_size=20)
    make_demo_dataset(tmp_path / "b", num=60, seed=3, shard_size=20)
    make_demo_dataset(tmp_path / "c", num=60, seed=4, shard_size=20)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    assert [str(f) for f in files] == ["train/shard-000000.tar", "train/shard-000001.tar", "train/shard-000002.tar",
                                      "val/shard-000000.tar"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / files[0]).read_bytes() != (tmp_path / "c" / files[0]).read_bytes()

    assert a["classnames"] == DEMO_CLASSNAMES and 8 <= len(DEMO_CLASSNAMES) <= 10
    assert all(t.format("star") != t for t in DEMO_TEMPLATES)
    assert (a["train"]["num_samples"], a["val"]["num_samples"]) == (50, 10)
    pattern = re.compile(r"^(a photo of|a picture of|an image of) a (\w+) (\w+) (\w+) (.+)$")
    keys = {}
    for split in ("train", "val"):
        info = json.loads((tmp_path / "a" / split / "dataset.json").read_text())
        assert info["classnames"] == DEMO_CLASSNAMES
        keys[split] = set()
        for url in resolve_shards(tmp_path / "a" / split):
            for sample in iter_shard(url):
                assert {"png", "cls", "txt", "json"} <= set(sample)
                image = Image.open(io.BytesIO(sample["png"]))
                assert image.size == (64, 64) and image.mode == "RGB"
                size, colour, shape, background = pattern.match(sample["txt"].decode()).groups()[1:]
                assert shape == DEMO_CLASSNAMES[int(sample["cls"])]
                assert size in DEMO_SIZES and colour in DEMO_COLOURS
                attrs = json.loads(sample["json"])
                # A plain background has one tint, a pattern two different ones; the caption names them.
                tints = attrs["tints"]
                assert set(tints) <= set(DEMO_TINTS) and len(set(tints)) == len(tints)
                assert len(tints) == (1 if attrs["background"] == "plain" else 2)
                assert background == DEMO_BACKGROUNDS[attrs["background"]].format(" and ".join(tints))
                keys[split].add((sample["__key__"], int(sample["cls"])))
    assert not {k for k, _ in keys["train"]} & {k for k, _ in keys["val"]}
    assert {c for _, c in keys["val"]} == set(range(10))  # the val split holds every class


def test_demo_cli(tmp_path):
    from data.demo import main

    assert main([str(tmp_path / "d"), "--num", "24", "--seed", "1", "--size", "32", "--val-fraction", "0.25"]) == 0
    demo = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert (demo["train"]["num_samples"], demo["val"]["num_samples"], demo["size"]) == (18, 6, 32)
    assert main([str(tmp_path / "e"), "--num", "3", "--val-fraction", "1.0"]) == 2

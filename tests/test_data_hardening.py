"""The data package against files a user receives or did not expect (issue 32, items 7, 13-17).

Each test reproduced its problem first: a ``pipe:`` shard URL that ran its command, a corrupt
member header that silently ended a shard, 16-bit PNGs decoded saturated, an export that deleted
its own input, a second process that waited on a cache without a word, a 72-megapixel image
decoded in full, and a folder of images answered with "contains no .tar shards" alone.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import tarfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.decode import DecodeError, decode_sample
from data.evalsets import FolderEvalSet, build_eval_loader, check_eval_source
from data.shards import ShardError, ShardSink, count_tar_samples, iter_shard, resolve_shards
from data.stream import build_train_loader
from test_data import collect, image_bytes, numbered_samples, to_tensor, write_shards


# ----------------------------------------------------------------------------- item 7: pipe: URLs


def _pipe(tmp_path: Path) -> tuple[str, Path]:
    """A shard folder and a pipe: URL that streams its shard after planting a marker file."""
    write_shards(tmp_path, numbered_samples(6), maxcount=6)
    marker = tmp_path / "pwned"
    return f"pipe:touch {marker}; cat {tmp_path / 'shard-000000.tar'}", marker


def test_a_pipe_url_runs_nothing_without_the_opt_in(tmp_path):
    url, marker = _pipe(tmp_path)
    refused = r"(?i)pipe:`touch .*pwned; cat .*` runs a shell command.*opt in \(data.allow_pipe: true .*--allow-pipe"
    # Spelled in capitals (webdataset reads the scheme in any case), in a list, or after a local pattern.
    for spec in (url, [url], "PIPE:" + url[5:], f"{tmp_path / 'shard-000000.tar'}::{url}"):
        with pytest.raises(ValueError, match=refused):
            resolve_shards(spec)
    with pytest.raises(ValueError, match=refused):
        list(iter_shard(url))
    with pytest.raises(ValueError, match=refused):
        build_train_loader(url, to_tensor, batch_size=2, num_workers=0, resampled=True, epoch_samples=6, rank=0,
                           world_size=1)
    with pytest.raises(ValueError, match=refused):
        check_eval_source(url)
    with pytest.raises(ValueError, match=refused):
        build_eval_loader(url, to_tensor, batch_size=2, num_workers=0, classnames=["a", "b", "c"])
    assert not marker.exists()


def test_a_pipe_url_runs_with_the_opt_in_and_is_printed_first(tmp_path, capfd):
    url, marker = _pipe(tmp_path)
    loader = build_train_loader(url, to_tensor, batch_size=2, num_workers=0, resampled=True, epoch_samples=6,
                                rank=0, world_size=1, allow_pipe=True)
    err = capfd.readouterr().err
    assert f"running the shell command `touch {marker}; cat" in err and not marker.exists()  # said before it runs
    keys, batches = collect(loader)
    assert batches == 3 and marker.exists()
    marker.unlink()
    eval_loader, _ = build_eval_loader(url, to_tensor, batch_size=4, num_workers=0, classnames=["a", "b", "c"],
                                       allow_pipe=True)
    assert [y for _, ys in eval_loader for y in ys.tolist()] == [0, 1, 2, 0, 1, 2] and marker.exists()


# ----------------------------------------------------------------------------- item 13: corrupt member headers


def _member_offsets(shard: Path) -> list[int]:
    with tarfile.open(shard) as tar:
        return [m.offset for m in tar.getmembers()]


def _corrupt_header(shard: Path, member: int) -> None:
    """Spoil the checksum of the header of member `member` (two members per sample: png, cls)."""
    data = bytearray(shard.read_bytes())
    offset = _member_offsets(shard)[member]
    data[offset + 148:offset + 156] = b"9999999\0"
    shard.write_bytes(bytes(data))


def test_a_corrupt_member_header_mid_shard_is_counted_and_named(tmp_path):
    write_shards(tmp_path, numbered_samples(20), maxcount=10)
    shard = tmp_path / "shard-000000.tar"
    _corrupt_header(shard, 10)  # the header of sample 5 of 10: samples 5-9 cannot be read, and
    lost = {f"{i:05d}" for i in range(4, 10)}  # sample 4, whose end only the next header would have shown
    with pytest.raises(ShardError, match=rf"shard {re.escape(str(shard))} .*member header at byte"):
        count_tar_samples(str(shard))

    loader = build_train_loader(tmp_path, to_tensor, batch_size=4, num_workers=0, rank=0, world_size=1,
                                shuffle_buffer=0, shardshuffle=False)
    with pytest.warns(RuntimeWarning, match=rf"skipping the rest of shard {re.escape(str(shard))} \(6 samples\)"):
        keys, batches = collect(loader)
    assert batches == len(loader) == 5 and not set(keys) & lost
    assert loader.stats.skipped == loader.stats.padded == 6 and loader.stats.bad_shards == [str(shard)]

    eval_loader, _ = build_eval_loader(tmp_path, to_tensor, batch_size=4, num_workers=0)
    with pytest.warns(RuntimeWarning, match="skipping the rest of shard"):
        labels = [y for _, ys in eval_loader for y in ys.tolist()]
    assert len(labels) == 14 and len(eval_loader.skipped) == 6
    assert all(name.startswith(f"{shard}#") and "member header" in error for name, error in eval_loader.skipped.items())


def test_a_shard_short_of_its_listed_samples_is_counted_exactly(tmp_path):
    write_shards(tmp_path, numbered_samples(20), maxcount=10)
    first, second = tmp_path / "shard-000000.tar", tmp_path / "shard-000001.tar"
    # A whole tar file with 7 of the 10 samples dataset.json lists, and one cut inside sample 2's second member.
    (tmp_path / "short").mkdir()
    with ShardSink(tmp_path / "short", maxcount=10) as sink:
        for sample in numbered_samples(7):
            sink.write(sample)
    first.write_bytes((tmp_path / "short" / "shard-000000.tar").read_bytes())
    second.write_bytes(second.read_bytes()[:_member_offsets(second)[5] + 100])
    loader = build_train_loader(tmp_path, to_tensor, batch_size=4, num_workers=0, rank=0, world_size=1,
                                shuffle_buffer=0, shardshuffle=False)
    with warnings_caught() as caught:
        keys, batches = collect(loader)
    assert batches == 5 and loader.stats.skipped == 3 + 8 == loader.stats.padded
    assert sorted(loader.stats.bad_shards) == [str(first), str(second)]
    assert any(f"shard {first} ended after 7 samples, fewer than the 10" in m for m in caught)

    eval_loader, _ = build_eval_loader(tmp_path, to_tensor, batch_size=4, num_workers=0)
    with warnings_caught():
        labels = [y for _, ys in eval_loader for y in ys.tolist()]
    assert len(labels) == 7 + 2 and len(eval_loader.skipped) == 11


@contextlib.contextmanager
def warnings_caught():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages: list[str] = []
        yield messages
    messages.extend(str(w.message) for w in caught)


# ----------------------------------------------------------------------------- item 14: 16-bit images


def _png16(array: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL writes no 48-bit RGB): colour type 0 grey, 2 RGB."""
    height, width = array.shape[:2]
    raw = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16_bit_images_decode_to_8_bits_by_their_high_byte(tmp_path):
    grey = (np.arange(16 * 256, dtype=np.uint32).reshape(16, 256) * 16).astype(np.uint16)  # 0 .. 65520
    rgb = np.stack([grey, 65535 - grey, np.full_like(grey, 0x1234)], axis=-1)
    tiff, pgm = io.BytesIO(), b"P5 256 16 65535\n" + grey.astype(">u2").tobytes()
    Image.fromarray(grey).save(tiff, format="TIFF")
    grey8 = np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    cases = {"png": (_png16(grey, 0), grey8), "tiff": (tiff.getvalue(), grey8), "pgm": (pgm, grey8),
             "48-bit png": (_png16(rgb, 2), (rgb >> 8).astype(np.uint8))}
    for name, (data, want) in cases.items():
        ext = name.split()[-1]
        image = decode_sample({"__key__": "k", "__url__": "u", ext: data})["image"]
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), want), name
    assert len(np.unique(grey8)) == 256  # a gradient, not two values
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "grey.png").write_bytes(_png16(grey, 0))
    image, label = FolderEvalSet(tmp_path, transform=np.asarray)[0]
    assert np.array_equal(image, grey8) and label == 0


# ----------------------------------------------------------------------------- item 15: export onto its input


def test_an_export_never_writes_over_or_into_its_input(tmp_path, capsys):
    from data.export_eval_set import main

    out = tmp_path / "out"
    src = out / "test"
    src.mkdir(parents=True)
    write_shards(src, numbered_samples(6), maxcount=3)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for source, target in ((src, out), (src, src), (src / "shard-000000.tar", out)):
        assert main([str(source), str(target), "--overwrite", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "holds the evaluation set being exported" in err and "choose an OUT apart" in err
        assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    folder = tmp_path / "images"
    for i, cls in enumerate(("cat", "dog")):
        (folder / cls).mkdir(parents=True)
        (folder / cls / f"{i}.png").write_bytes(image_bytes(i))
    assert main([str(folder), str(folder / "export"), "--quiet"]) == 2
    assert "lies inside the evaluation set being exported" in capsys.readouterr().err
    assert not (folder / "export").exists()
    assert main([str(folder), str(tmp_path / "apart"), "--quiet"]) == 0


# ----------------------------------------------------------------------------- item 16: cache locks


class _Said(io.StringIO):
    """stderr that signals when something is written to it (the waiting message)."""

    def __init__(self):
        super().__init__()
        self.event = threading.Event()

    def write(self, text):
        self.event.set()
        return super().write(text)


def hold_until_waited_for(lock_path: Path, said: _Said, then=lambda: None) -> threading.Thread:
    """Hold `lock_path` in another thread until the process has said it waits (at most 60 s), run `then`,
    release. Returns the started thread, once it holds the lock."""
    from filelock import FileLock

    held = threading.Event()

    def hold():
        with FileLock(str(lock_path)):
            held.set()
            said.event.wait(60)
            then()

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(60)
    return thread


def test_a_cache_lock_makes_the_second_process_wait_and_say_so(tmp_path):
    from data.locks import cache_lock

    lock, said, order = tmp_path / "cache.lock", _Said(), []
    holder = hold_until_waited_for(lock, said, then=lambda: order.append("filled"))
    with contextlib.redirect_stderr(said):
        with cache_lock(lock, "the test cache"):
            order.append("used")
    holder.join()
    assert order == ["filled", "used"]
    assert said.getvalue() == f"waiting for another process that is making the test cache (lock file {lock}) ...\n"


def test_the_demo_caches_wait_for_each_other_and_say_so(tmp_path):
    from bootstrap.config import DemoConfig
    from bootstrap.demo_teacher import _data_key, _digest, ensure_demo_data

    demo = DemoConfig(cache_dir=str(tmp_path), num_images=24, image_size=16, val_fraction=0.25)
    folder = tmp_path / "demo-data" / _digest(_data_key(demo))
    said = _Said()
    holder = hold_until_waited_for(folder.with_name(folder.name + ".lock"), said)
    with contextlib.redirect_stderr(said):
        assert ensure_demo_data(demo, verbose=False) == folder
    holder.join()
    assert "waiting for another process that is making the cached demo-data" in said.getvalue()
    assert (folder / "demo.json").is_file()


# ----------------------------------------------------------------------------- item 17: pixel limit, folders of images


def test_images_above_the_pixel_limit_are_skipped_from_their_header(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (9000, 8000)).save(buf, format="PNG", compress_level=1)  # 72 MP, a valid image
    big = buf.getvalue()
    with pytest.raises(DecodeError, match=r"9000x8000 is 72,000,000 pixels, more than the limit of 64,000,000 "
                                          r"\(data.max_pixels"):
        decode_sample({"__key__": "big", "__url__": "u", "png": big})
    with pytest.raises(DecodeError, match="more than the limit of 50"):
        decode_sample({"__key__": "small", "__url__": "u", "png": image_bytes(0)}, max_pixels=50)
    samples = numbered_samples(8)
    samples[3]["png"] = big
    write_shards(tmp_path, samples, maxcount=8)
    loader = build_train_loader(tmp_path, to_tensor, batch_size=4, num_workers=0, rank=0, world_size=1)
    with pytest.warns(RuntimeWarning, match="'00003'.*72,000,000 pixels"):
        keys, batches = collect(loader)
    assert batches == 2 and loader.stats.skipped == 1 and loader.stats.skipped_samples[0].endswith("#00003")
    eval_loader, _ = build_eval_loader(tmp_path, to_tensor, batch_size=4, num_workers=0, max_pixels=50)
    with pytest.warns(RuntimeWarning):
        assert [x for x in eval_loader] == [] and len(eval_loader.skipped) == 8
    folder = tmp_path / "folder" / "a"
    folder.mkdir(parents=True)
    (folder / "big.png").write_bytes(big)
    with pytest.warns(RuntimeWarning, match="72,000,000 pixels"):
        item = FolderEvalSet(folder.parent)[0]
    assert item.name == str(folder / "big.png") and "72,000,000 pixels" in item.error


def test_a_folder_of_images_names_the_command_that_shards_it(tmp_path):
    flat, classes = tmp_path / "flat", tmp_path / "classes"
    (classes / "cat").mkdir(parents=True)
    flat.mkdir()
    (flat / "a.jpg").write_bytes(image_bytes(0, "JPEG"))
    (classes / "cat" / "b.JPEG").write_bytes(image_bytes(1, "JPEG"))
    for folder in (flat, classes):
        with pytest.raises(FileNotFoundError, match=rf"contains no .tar shards; it holds images: write them into "
                                                    rf"shards first with `python -m data.make_shards "
                                                    rf"{re.escape(str(folder))} OUT` and pass OUT"):
            resolve_shards(folder)

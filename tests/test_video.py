"""Video data and teachers over frames (issue 30, items 1 and 2).

Videos are made here with PyAV: tiny clips whose frame ``i`` has red value ``RED[i]`` everywhere (so a
decoded or streamed frame can be traced back to its index) over green/blue gradients (so crops differ).
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

av = pytest.importorskip("av", reason="video needs PyAV: pip install -e '.[video]'")

from data.make_shards import main as make_shards_main  # noqa: E402
from data.shards import ShardSink, iter_shard  # noqa: E402
from data.transforms import ReplayableTrainTransform  # noqa: E402
from data.video import (PyAVBackend, VideoDecodeError, available_video_backends, decode_video_sample,  # noqa: E402
                        torchcodec_problem, video_backend)
from data.video_shards import detect_media, list_video_table, make_video_shards  # noqa: E402
from data.video_stream import build_video_eval_loader, build_video_train_loader  # noqa: E402
from data.video_transforms import ClipEvalTransform, ClipSampling, ClipTooShort, ReplayableClipTransform  # noqa: E402
from teachers import RandomTeacherWarning, create_teacher  # noqa: E402
from teachers.frames import VideoTeacher, frame_targets  # noqa: E402

SIDE = 32


def red(i: int, n: int) -> int:
    return round(i * 240 / max(n - 1, 1))


def video_bytes(n: int = 16, width: int = SIDE, height: int = SIDE, codec: str = "libx264", fmt: str = "mp4",
                gop: int = 4, bframes: int = 2) -> bytes:
    """A tiny video: frame i is red(i) over a green (x) and blue (y) gradient."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = gop
        stream.codec_context.max_b_frames = bframes
        stream.bit_rate = 4_000_000  # near-lossless: frames stay identifiable by their red value
        x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
        y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
        for i in range(n):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[..., 0] = red(i, n)
            frame[..., 1] = np.broadcast_to(x, (height, width))
            frame[..., 2] = np.broadcast_to(y, (height, width))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def audio_only_bytes() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return buf.getvalue()


def all_frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def frame_index(frame: torch.Tensor, n: int) -> int:
    """Index of a [H, W, 3] uint8 (or [3, H, W] float in [0, 1]) frame by its red value."""
    value = float(frame[..., 0].float().mean()) if frame.shape[-1] == 3 else float(frame[0].mean()) * 255
    return min(range(n), key=lambda i: abs(red(i, n) - value))


def identity_clip_transform(sampling: ClipSampling, side: int = SIDE) -> ReplayableClipTransform:
    """Whole frame, no flip, no normalisation: output pixels are the decoded ones / 255."""
    image = ReplayableTrainTransform(side, (0, 0, 0), (1, 1, 1), scale=(1, 1), ratio=(1, 1), hflip=0)
    return ReplayableClipTransform(sampling, image)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("codec,fmt,gop,bframes", [("libx264", "mp4", 4, 2), ("mpeg4", "mp4", 5, 0),
                                                   ("libx264", "mp4", 250, 2), ("libvpx-vp9", "webm", 6, 0)])
def test_pyav_gives_exactly_the_frames_asked_decoding_only_what_it_must(codec, fmt, gop, bframes):
    data = video_bytes(40, codec=codec, fmt=fmt, gop=gop, bframes=bframes)
    reference = all_frames(data)
    source = PyAVBackend().open(data, "test.mp4")
    assert source.info.num_frames == len(reference) == 40  # webm has no frame count in its header: demuxed
    assert (source.info.width, source.info.height, source.info.fps) == (SIDE, SIDE, 8.0)
    rng = np.random.default_rng(0)
    for _ in range(8):
        indices = [int(i) for i in rng.integers(0, 40, size=5)]  # unsorted, possibly repeated
        frames = source.get_frames(indices)
        assert frames.shape == (5, SIDE, SIDE, 3) and frames.dtype == torch.uint8
        for frame, i in zip(frames, indices):
            assert torch.equal(frame, torch.from_numpy(reference[i]))
    in_order = PyAVBackend().open(data, "test.mp4")
    in_order._by_pts = False  # as for files without timestamps: frames numbered as the decoder gives them
    assert torch.equal(in_order.get_frames([5, 2, 39]), source.get_frames([5, 2, 39]))
    sparse = PyAVBackend().open(data, "test.mp4")
    sparse.get_frames([1, 38])
    if gop < 40:  # whole groups of pictures without a wanted frame are not decoded
        assert sparse.frames_decoded < 20
    assert [frame_index(f, 40) for f in source.get_frames([0, 13, 39])] == [0, 13, 39]


def test_bad_videos_raise_one_line_with_the_reason():
    backend = PyAVBackend()
    good = video_bytes(8)
    cases = {
        "undecodable": b"not a video at all" * 50,
        "no_video": audio_only_bytes(),
        "unsupported_codec": good.replace(b"avc1", b"zzzz"),  # a fourcc no decoder knows
    }
    for reason, data in cases.items():
        with pytest.raises(VideoDecodeError) as info:
            backend.open(data, "shard.tar#k1")
        assert info.value.reason == reason and "shard.tar#k1" in str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(IndexError, match="frame 8 is outside video v"):
        backend.open(good, "v").get_frames([8])


def test_backends_are_chosen_by_name():
    assert isinstance(video_backend("pyav"), PyAVBackend)
    assert available_video_backends()["pyav"] is None
    if torchcodec_problem() is not None:
        assert isinstance(video_backend("auto"), PyAVBackend)
    with pytest.raises(ValueError, match="unknown video backend 'decord'"):
        video_backend("decord")
    with pytest.raises(ValueError, match="CPU only"):
        video_backend("pyav", device="cuda")


@pytest.mark.skipif(torchcodec_problem() is not None, reason=f"torchcodec unusable here: {torchcodec_problem()}")
def test_torchcodec_gives_the_frames_pyav_gives():
    data = video_bytes(24)
    indices = [3, 0, 23, 11]
    ours = video_backend("torchcodec").open(data, "v").get_frames(indices)
    reference = PyAVBackend().open(data, "v").get_frames(indices)
    assert ours.shape == reference.shape
    assert (ours.int() - reference.int()).abs().max() <= 2  # same FFmpeg decoders; RGB conversion may round apart


# ----------------------------------------------------------------------------- clip sampling


def test_segment_and_stride_indices_are_exact():
    tsn, stride = ClipSampling(4), ClipSampling(4, "stride", 2)
    assert tsn.eval_indices(16) == [2, 6, 10, 14]
    assert tsn.eval_indices(10) == [1, 3, 6, 8]  # segments [0,2) [2,5) [5,7) [7,10)
    assert [tsn.eval_indices(16, c, 2) for c in range(2)] == [[1, 5, 9, 13], [3, 7, 11, 15]]
    assert tsn.eval_indices(4) == [0, 1, 2, 3]
    assert stride.needed == 7
    assert stride.eval_indices(16) == [5, 7, 9, 11]
    assert [stride.eval_indices(16, c, 2) for c in range(2)] == [[2, 4, 6, 8], [7, 9, 11, 13]]
    assert stride.eval_indices(7) == [0, 2, 4, 6]


def test_training_clips_are_seeded_and_cover_their_segments():
    tsn, stride = ClipSampling(4), ClipSampling(3, "stride", 3)
    draw = lambda s, n, seed: s.train_indices(n, torch.Generator().manual_seed(seed))  # noqa: E731
    assert draw(tsn, 10, 5) == draw(tsn, 10, 5) and draw(stride, 20, 5) == draw(stride, 20, 5)
    seen = [Counter() for _ in range(4)]
    for seed in range(200):
        for k, i in enumerate(draw(tsn, 10, seed)):
            seen[k][i] += 1
    assert [sorted(c) for c in seen] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    starts = Counter()
    for seed in range(200):
        indices = draw(stride, 20, seed)
        assert [b - a for a, b in zip(indices, indices[1:])] == [3, 3]
        starts[indices[0]] += 1
    assert sorted(starts) == list(range(14))  # every start of the 20 - 7 + 1 possible


def test_short_videos_and_bad_settings_are_named():
    with pytest.raises(ClipTooShort, match="video s#k has 5 frames, fewer than the 7 of a clip of 4 frames 2 apart"):
        ClipSampling(4, "stride", 2).check(5, "s#k")
    with pytest.raises(ValueError, match="unknown clip sampling mode 'tsn'"):
        ClipSampling(4, "tsn")
    with pytest.raises(ValueError, match="frames >= 1"):
        ClipSampling(0)


# ----------------------------------------------------------------------------- views


def test_training_view_is_one_box_and_flip_on_every_frame_and_replays():
    data = video_bytes(16, width=48, height=40)
    source = PyAVBackend().open(data, "v")
    image = ReplayableTrainTransform(24, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), scale=(0.2, 0.6), hflip=0.5,
                                     color_jitter=0.3)
    transform = ReplayableClipTransform(ClipSampling(4), image)
    for seed in range(6):
        params = transform.draw(source, torch.Generator().manual_seed(seed))
        assert params == transform.draw(source.info, torch.Generator().manual_seed(seed))  # info is enough
        params = json.loads(json.dumps(params))  # as a cache stores them
        clip = transform.apply(source.get_frames(params["frames"]), params)
        assert clip.shape == (4, 3, 24, 24)
        # Each frame rendered on its own with the one crop box / flip / jitter gives the same pixels.
        spatial = {k: v for k, v in params.items() if k != "frames"}
        frames = [Image.fromarray(f) for f in all_frames(data)]
        alone = torch.stack([image.apply(frames[i], spatial) for i in params["frames"]])
        assert torch.equal(clip, alone)
    flips = [transform.draw(source, torch.Generator().manual_seed(s))["flip"] for s in range(20)]
    assert any(flips) and not all(flips)
    torch.manual_seed(3)
    first = transform(source)
    torch.manual_seed(3)
    assert torch.equal(transform(source), first)


def _tiny_teacher(spec):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomTeacherWarning)
        return create_teacher(copy.deepcopy(spec))


CLIP_SPEC = {"kind": "openclip", "model": "tiny-clip", "pretrained": None, "model_cfg": {
    "embed_dim": 16, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}
DINO_SPEC = {"kind": "timm", "model": "vit_small_patch14_reg4_dinov2", "pretrained": False, "image_size": 28,
             "model_kwargs": {"patch_size": 7, "depth": 2, "embed_dim": 32, "num_heads": 2}}


def test_eval_views_are_the_teachers_preprocessing_per_frame():
    teacher = _tiny_teacher(DINO_SPEC)  # crop_pct 0.875: a real resize then centre crop
    data = video_bytes(12, width=52, height=36)
    source = PyAVBackend().open(data, "v")
    video_teacher = VideoTeacher(teacher)
    one = video_teacher.clip_eval_transform(ClipSampling(3), num_clips=2)
    views = one(source)
    assert views.shape == (2, 3, 3, 28, 28)
    per_frame = teacher.eval_transform()
    frames = [Image.fromarray(f) for f in all_frames(data)]
    for v, clip in enumerate([ClipSampling(3).eval_indices(12, c, 2) for c in range(2)]):
        assert torch.equal(views[v], torch.stack([per_frame(frames[i]) for i in clip]))
    three = video_teacher.clip_eval_transform(ClipSampling(3), num_clips=2, num_crops=3)(source)
    assert three.shape == (6, 3, 3, 28, 28)
    assert torch.equal(three[1], views[0]) and torch.equal(three[4], views[1])  # clip-major, centre crop second
    assert not torch.equal(three[0], three[2])  # left and right crops along the wider side


# ----------------------------------------------------------------------------- shards


def write_video_folder(root: Path, lengths: dict[str, list[int]]) -> None:
    for cls, ns in lengths.items():
        for j, n in enumerate(ns):
            path = root / cls / f"v{j}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(video_bytes(n, codec="mpeg4", gop=4, bframes=0))


def test_class_folders_to_video_shards_and_back(tmp_path):
    write_video_folder(tmp_path / "videos", {"jump": [8, 9], "run": [10, 11, 12]})
    (tmp_path / "videos" / "run" / "broken.mp4").write_bytes(b"\0" * 100)
    assert detect_media(tmp_path / "videos") == "video"
    out = tmp_path / "shards"
    assert make_shards_main([str(tmp_path / "videos"), str(out), "--maxcount", "2", "--quiet"]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["media"] == "video" and info["classnames"] == ["jump", "run"] and info["num_samples"] == 5
    assert info["video"]["min_frames"] == 8 and info["video"]["max_frames"] == 12
    assert [s["path"].endswith("broken.mp4") for s in info["skipped"]] == [True]
    assert len(info["shards"]) == 3
    loader, classnames = build_video_eval_loader(out, ClipEvalTransform(ClipSampling(4), SIDE, (0,) * 3, (1,) * 3),
                                                 batch_size=2, num_workers=0)
    assert classnames == ["jump", "run"]
    labels = {}
    for batch in loader:
        assert batch["video"].shape[1:] == (1, 4, 3, SIDE, SIDE)
        for key, cls in zip(batch["__key__"], batch["cls"].tolist()):
            labels[key] = cls
    by_key = {s["__key__"]: json.loads(s["json"]) for url in sorted(out.glob("*.tar")) for s in iter_shard(str(url))}
    assert {by_key[k]["classname"] for k, c in labels.items() if c == 0} == {"jump"}
    assert sorted(Counter(labels.values()).items()) == [(0, 2), (1, 3)]
    assert all(m["video"]["codec"] == "mpeg4" for m in by_key.values())


@pytest.mark.parametrize("table", ["csv", "jsonl"])
def test_tables_of_videos_to_shards_and_training_batches(tmp_path, table):
    rows = [{"path": f"clips/c{i}.mp4", "caption": f"clip number {i}", "label": ["wave", "clap"][i % 2],
             "source": f"cam{i}"} for i in range(4)]
    for i in range(4):
        (tmp_path / "clips").mkdir(exist_ok=True)
        (tmp_path / "clips" / f"c{i}.mp4").write_bytes(video_bytes(10 + i))
    src = tmp_path / f"list.{table}"
    if table == "csv":
        src.write_text("path,caption,label,source\n" + "".join(
            f"{r['path']},{r['caption']},{r['label']},{r['source']}\n" for r in rows))
    else:
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = make_video_shards(src, tmp_path / "out", progress=False, verify="full" if table == "jsonl" else "header")
    assert info["classnames"] == ["clap", "wave"] and info["keys"] == ["cls", "json", "mp4", "txt"]
    sampling = ClipSampling(5, "stride", 2)
    loader = build_video_train_loader(tmp_path / "out", identity_clip_transform(sampling), batch_size=2,
                                      num_workers=0, shuffle_buffer=0)
    seen = {}
    for clips, extras in loader:
        assert clips.shape == (2, 5, 3, SIDE, SIDE)
        for clip, frames, text, cls in zip(clips, extras["frames"].tolist(), extras["txt"], extras["cls"].tolist()):
            i = int(text.split()[-1])
            n = 10 + i
            assert [frame_index(f, n) for f in clip] == frames  # the streamed pixels are those frames
            assert [b - a for a, b in zip(frames, frames[1:])] == [2] * 4 and frames[-1] < n
            seen[i] = cls
    assert seen == {0: 1, 1: 0, 2: 1, 3: 0}
    sample = next(iter_shard(str(tmp_path / "out" / "shard-000000.tar")))
    assert json.loads(sample["json"])["source"].startswith("cam")


def test_bad_tables_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,caption\na.mp4,hello\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: no 'path' \(columns found: \['caption', 'file'\]\)"):
        list_video_table(bad)
    half = tmp_path / "half.jsonl"
    half.write_text('{"path": "a.mp4", "label": "x"}\n{"path": "b.mp4"}\n')
    with pytest.raises(ValueError, match="half.jsonl:2: some rows have a label and this one has none"):
        list_video_table(half)
    numbered = tmp_path / "numbered.jsonl"
    numbered.write_text('{"path": "a.mp4", "label": 3}\n{"path": "b.mp4", "label": 0}\n')
    items, classnames = list_video_table(numbered)
    assert classnames is None and [it.label for it in items] == [3, 0]


def write_video2dataset_shard(folder: Path, videos: list[bytes]) -> None:
    """What video2dataset writes: 00000.tar of KEY.mp4 / KEY.txt / KEY.json, and 00000_stats.json."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        for i, data in enumerate(videos):
            key = f"{i:09d}"
            sink.write({"__key__": key, "mp4": data, "txt": f"caption {i}",
                        "json": json.dumps({"key": key, "status": "success", "caption": f"caption {i}"})})
    (folder / "00000_stats.json").write_text(json.dumps({"count": len(videos), "successes": len(videos)}))


def test_video2dataset_shards_are_read_as_they_are(tmp_path):
    write_video2dataset_shard(tmp_path / "v2d", [video_bytes(8 + i) for i in range(3)])
    # In a worker process: backend, transform and stream travel to it.
    loader = build_video_train_loader(tmp_path / "v2d", identity_clip_transform(ClipSampling(4)), batch_size=3,
                                      num_workers=1, shuffle_buffer=0)
    clips, extras = next(iter(loader))
    assert clips.shape == (3, 4, 3, SIDE, SIDE)
    assert sorted(extras["txt"]) == ["caption 0", "caption 1", "caption 2"] and extras["cls"].tolist() == [-1] * 3
    eval_loader, classnames = build_video_eval_loader(
        tmp_path / "v2d", ClipEvalTransform(ClipSampling(4), SIDE, (0,) * 3, (1,) * 3), num_workers=1,
        require_labels=False)
    batch = next(iter(eval_loader))
    assert classnames is None and batch["txt"] == ["caption 0", "caption 1", "caption 2"]


# ----------------------------------------------------------------------------- skipping


def test_bad_videos_are_skipped_counted_and_named(tmp_path):
    good = [video_bytes(12) for _ in range(3)]
    samples = [{"__key__": f"good{i}", "mp4": g, "cls": b"0"} for i, g in enumerate(good)] + [
        {"__key__": "garbage", "mp4": b"\x00\x01" * 300, "cls": b"0"},
        {"__key__": "short", "mp4": video_bytes(3), "cls": b"0"},
        {"__key__": "audio", "mp4": audio_only_bytes(), "cls": b"0"},
        {"__key__": "codec", "mp4": good[0].replace(b"avc1", b"zzzz"), "cls": b"0"},
        {"__key__": "image", "jpg": b"\xff\xd8", "cls": b"0"},
    ]
    with ShardSink(tmp_path, maxcount=100) as sink:
        for sample in samples:
            sink.write(sample)
        shards = sink.close()
    (tmp_path / "dataset.json").write_text(json.dumps({"shards": shards, "classnames": ["a"]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loader = build_video_train_loader(tmp_path, identity_clip_transform(ClipSampling(6)), batch_size=4,
                                          num_workers=0, shuffle_buffer=0)
        batches = list(loader)
        eval_loader, _ = build_video_eval_loader(
            tmp_path, ClipEvalTransform(ClipSampling(6), SIDE, (0,) * 3, (1,) * 3), num_workers=0)
        keys = [k for batch in eval_loader for k in batch["__key__"]]
    assert len(batches) == 2 and loader.stats.skipped == 5 and loader.stats.padded == 5
    bad = {name.split("#")[1] for name in loader.stats.skipped_samples}
    assert bad == {"garbage", "short", "audio", "codec", "image"}
    assert keys == ["good0", "good1", "good2"]
    reasons = {name.split("#")[1]: error.split(":")[0] for name, error in eval_loader.skipped.items()}
    assert reasons == {"garbage": "undecodable", "short": "too_short", "audio": "no_video",
                       "codec": "unsupported_codec", "image": "no_video_member"}


def test_a_clip_longer_than_every_video_is_one_line(tmp_path):
    write_video_folder(tmp_path / "videos", {"a": [6, 7]})
    make_video_shards(tmp_path / "videos", tmp_path / "ours", progress=False)
    with pytest.raises(ValueError, match=r"a clip of 4 frames 3 apart needs 10 frames but the longest video .* has "
                                         r"7 .*use fewer frames or a smaller stride"):
        build_video_train_loader(tmp_path / "ours", identity_clip_transform(ClipSampling(4, "stride", 3)), 1)
    # Without a dataset.json (video2dataset's shards) the stream finds out, and says so.
    write_video2dataset_shard(tmp_path / "v2d", [video_bytes(6), video_bytes(7)])
    loader = build_video_train_loader(tmp_path / "v2d", identity_clip_transform(ClipSampling(8)), batch_size=1,
                                      num_workers=0, shuffle_buffer=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RuntimeError, match="all 2 videos are shorter than a clip of 8 frames .*the longest has 7 "
                                               "frames, a clip needs 8.*: use fewer frames"):
            list(loader)
        eval_loader, _ = build_video_eval_loader(
            tmp_path / "v2d", ClipEvalTransform(ClipSampling(8), SIDE, (0,) * 3, (1,) * 3), num_workers=0,
            require_labels=False)
        with pytest.raises(ValueError, match="no video of .*00000.tar could be evaluated: all 2 videos are shorter"):
            list(eval_loader)


def test_image_shards_read_as_video_say_so(tmp_path):
    with ShardSink(tmp_path, maxcount=10) as sink:
        for i in range(2):
            sink.write({"__key__": f"k{i}", "jpg": b"\xff\xd8", "cls": b"0"})
    loader = build_video_train_loader(str(tmp_path / "shard-000000.tar"), identity_clip_transform(ClipSampling(2)),
                                      batch_size=1, num_workers=0, shuffle_buffer=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RuntimeError, match="none of the 2 samples holds a video: these are not video shards"):
            list(loader)
    with pytest.raises(VideoDecodeError, match=r"sample 'k0' in shard s.tar has no video member \(it holds \['cls', "
                                               r"'jpg'\]"):
        decode_video_sample({"__key__": "k0", "__url__": "s.tar", "jpg": b"", "cls": b"0"}, PyAVBackend())


class FakeTargets:
    """Cached targets as data.targets.TargetStore gives them: K views per video (drawn from a seed), a target each."""

    tokens = False

    def __init__(self, transform, views=3):
        self.transform, self.views, self.stored = transform, views, {}

    def iter_shard(self, url):
        for sample in iter_shard(url):
            source = PyAVBackend().open(sample["mp4"], "v")
            params = [self.transform.draw(source, torch.Generator().manual_seed(v)) for v in range(self.views)]
            self.stored[sample["__key__"]] = (sample["mp4"], params)
            yield sample

    def view_index(self, epoch, key):
        return (epoch + int(key[-1])) % self.views

    def decode(self, raw):
        _, params = self.stored[raw["__key__"]]
        return {"views": json.loads(json.dumps(params)), "embed": torch.arange(self.views, dtype=torch.float)[:, None],
                "tokens": None}


def test_cached_video_views_are_replayed_exactly(tmp_path):
    with ShardSink(tmp_path, maxcount=10) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "mp4": video_bytes(10 + i, width=40)})
    image = ReplayableTrainTransform(24, (0.5,) * 3, (0.25,) * 3, scale=(0.3, 1.0))
    transform = ReplayableClipTransform(ClipSampling(3), image)
    targets = FakeTargets(transform)
    loader = build_video_train_loader(str(tmp_path / "shard-000000.tar"), transform, batch_size=2, num_workers=0,
                                      shuffle_buffer=0, targets=targets)
    for epoch in range(2):
        for clips, extras in loader:
            for clip, key, view, target in zip(clips, extras["__key__"], extras["view"].tolist(), extras["target"]):
                assert view == targets.view_index(epoch, key) and float(target) == view
                data, params = targets.stored[key]
                expected = transform.apply(PyAVBackend().open(data, "v").get_frames(params[view]["frames"]),
                                           params[view])
                assert torch.equal(clip, expected)


# ----------------------------------------------------------------------------- teachers over frames


@pytest.mark.parametrize("spec", [CLIP_SPEC, DINO_SPEC], ids=["openclip", "timm_dinov2_registers"])
def test_frame_batched_targets_equal_the_per_frame_loop(spec):
    teacher = _tiny_teacher(spec)
    video_teacher = VideoTeacher(teacher)
    size = teacher.preprocess.size[0]
    clips = torch.randn(2, 3, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = video_teacher.targets(clips, ["embedding", "tokens", "attention"])
    per_frame = [teacher.targets(clips[:, t], ["embedding", "tokens", "attention"]) for t in range(3)]
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["embedding"], torch.stack([p["embedding"] for p in per_frame], 1).mean(1), **close)
    torch.testing.assert_close(out["tokens"], torch.stack([p["tokens"] for p in per_frame], 1), **close)
    assert len(out["attention"]) == teacher.depth
    for block, maps in enumerate(out["attention"]):
        torch.testing.assert_close(maps, torch.stack([p["attention"][block] for p in per_frame], 1), **close)
    assert out["tokens"].shape == (2, 3, teacher.num_prefix_tokens + teacher.num_patches, teacher.width)
    torch.testing.assert_close(video_teacher.embed(clips), out["embedding"], **close)
    torch.testing.assert_close(video_teacher.embed_frames(clips),
                               torch.stack([teacher.embed(clips[:, t]) for t in range(3)], 1), **close)
    tokens = video_teacher.forward_tokens(clips, layer=-2, class_token=False)
    torch.testing.assert_close(tokens, torch.stack([teacher.forward_tokens(clips[:, t], -2, False)
                                                    for t in range(3)], 1), **close)
    chunked = VideoTeacher(teacher, max_frames=4).targets(clips, ["embedding", "tokens"])
    torch.testing.assert_close(chunked["tokens"], out["tokens"], **close)
    assert frame_targets(teacher, clips, ["embedding"]).keys() == {"embedding"}


def test_video_teacher_is_the_image_teacher_otherwise():
    teacher = _tiny_teacher(CLIP_SPEC)
    video_teacher = VideoTeacher(teacher)
    assert video_teacher.embed_dim == teacher.embed_dim and video_teacher.preprocess is teacher.preprocess
    assert video_teacher.tokenizer is teacher.tokenizer and not video_teacher.train().training
    train = video_teacher.clip_train_transform(ClipSampling(8), hflip=0.0)
    assert isinstance(train, ReplayableClipTransform) and train.image_transform.hflip == 0.0
    with pytest.raises(ValueError, match=r"this looks like \[B, 3, T, H, W\].*clips.transpose\(1, 2\)"):
        video_teacher.embed(torch.zeros(2, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="expects images"):
        video_teacher.embed(torch.zeros(1, 2, 3, 16, 16))

"""JPEG decode paths (data.decode): reduced and fast decoding against full decoding, replay of
cached views decoded those ways, uint8 batches, the recipe key, and shards re-encoded at a
maximum size.

Images are small JPEGs with a natural-image-like 1/f spectrum (textured at every scale, so a
crop box off by a pixel, or a wrong reduction, shows as a large difference).
"""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, JpegImagePlugin

from data.decode import DecodeError, EncodedImage, decode_sample
from data.shards import ShardSink, iter_shard, make_shards, resolve_shards, write_dataset_json
from data.transforms import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, eval_transform, reduction, train_transform)

STD_LEVELS = torch.tensor(OPENAI_CLIP_STD).view(-1, 1, 1) * 255


def natural_jpeg(height: int, width: int, seed: int, quality: int = 92, subsampling: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    freq = np.sqrt(fy ** 2 + fx ** 2)
    freq[0, 0] = 1
    spectrum = rng.standard_normal((3, height, width // 2 + 1)) + 1j * rng.standard_normal((3, height, width // 2 + 1))
    x = np.fft.irfft2(spectrum * freq ** -1.5, s=(height, width)).transpose(1, 2, 0)
    x = (x - x.mean()) / x.std()
    buf = io.BytesIO()
    Image.fromarray(np.clip(120 + 55 * x, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality,
                                                                          subsampling=subsampling)
    return buf.getvalue()


def raw_sample(data: bytes, key: str = "k") -> dict:
    return {"__key__": key, "__url__": "mem.tar", "jpg": data}


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of two normalised views, in grey levels (0-255) of the resized crop."""
    return ((a - b) * STD_LEVELS).abs()


# ----------------------------------------------------------------------------- reduced decoding


def test_reduction_is_the_largest_that_keeps_the_crop_at_least_the_output():
    assert reduction(447, 900, 224, 224) == 1  # 447 / 2 < 224
    assert reduction(448, 448, 224, 224) == 2
    assert reduction(900, 1000, 224, 224) == 4 and reduction(1792, 1792, 224, 224) == 8
    assert reduction(5000, 5000, 224, 224) == 8  # libjpeg reduces at most 8 times
    assert reduction(300, 700, 100, 300) == 2  # both sides count


def test_reduced_views_draw_the_full_image_box_and_stay_within_the_bound():
    """The reduced path draws the crop in full-image coordinates (the header's size), identical
    to the full path's box; its pixels equal the full path's where it does not reduce and stay
    within a few grey levels where it does."""
    full, reduced = (train_transform(48, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, scale=(0.1, 1.0), decode=d)
                     for d in ("full", "reduced"))
    factors = set()
    for n, (height, width) in enumerate([(300, 400), (517, 389), (250, 250)]):
        data = natural_jpeg(height, width, seed=n)
        whole = decode_sample(raw_sample(data))["image"]
        lazy = decode_sample(raw_sample(data), lazy=True)["image"]
        assert isinstance(lazy, EncodedImage) and lazy.size == whole.size == (width, height)
        for seed in range(12):
            params = reduced.draw(lazy, torch.Generator().manual_seed(seed))
            assert params == full.draw(whole, torch.Generator().manual_seed(seed))  # the same box, same draws
            a, b = full.apply(whole, params), reduced.apply(lazy, params)
            factor = reduction(*params["crop"][2:], 48, 48)
            factors.add(factor)
            if factor == 1:
                assert torch.equal(a, b)
            else:  # closer to the full decode than the same crop moved by one pixel
                top, left, h, w = params["crop"]
                moved = full.apply(whole, {**params, "crop": [top + 1, left + 1, h, w]})
                assert float(levels(a, b).mean()) < float(levels(a, moved).mean()), (params, factor)
    assert factors == {1, 2, 4}


@pytest.mark.parametrize("path", ["reduced", "fast"])
def test_reduced_geometry_puts_a_feature_where_the_full_decode_does(path):
    """A bright square at a known place lands on the same output pixels, whatever the reduction."""
    pixels = np.full((640, 800, 3), 40, np.uint8)
    pixels[300:364, 500:564] = 230
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    full, reduced = (train_transform(64, (0, 0, 0), (1, 1, 1), hflip=0.0, decode=d) for d in ("full", path))
    whole, lazy = Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), EncodedImage(buf.getvalue(), (800, 640))
    for crop in ([100, 200, 512, 512], [0, 0, 640, 800], [250, 450, 260, 300], [280, 480, 110, 120]):  # 8, 8, 4, 1
        params = {"crop": crop, "flip": False, "jitter": [], "gray": False}
        a, b = full.apply(whole, params)[0], reduced.apply(lazy, params)[0]
        centre = [torch.nonzero(x > 0.5).float().mean(0) for x in (a, b)]
        assert torch.allclose(centre[0], centre[1], atol=0.5), (crop, centre)


def test_eval_reduced_path_matches_the_full_decode():
    """Reduced evaluation views: the full path's pixels where the image is below twice the
    resize, and closer to them than the same image shifted by one pixel where it is not."""
    full = eval_transform(112, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # resize the shorter side to 128, crop 112
    reduced = eval_transform(112, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, decode="reduced")
    for height, width, factor in [(700, 560, 4), (300, 420, 2), (250, 260, 1)]:
        data = natural_jpeg(height, width, seed=height)
        whole = decode_sample(raw_sample(data))["image"]
        lazy = decode_sample(raw_sample(data), lazy=True)["image"]
        assert reduction(height, width, *reduced.resized_size(width, height)) == factor
        reference = full(whole)
        assert torch.equal(full(lazy), reference)  # an EncodedImage decoded whole: the very pixels
        out = reduced(lazy)
        if factor == 1:
            assert torch.equal(out, reference)
        else:
            shifted = full(whole.crop((1, 1, width, height)))
            assert float(levels(out, reference).mean()) < float(levels(shifted, reference).mean())


# ----------------------------------------------------------------------------- fast decoding


def _jpeg_variants() -> dict[str, bytes]:
    """JPEGs of the kinds a dataset holds: 4:4:4, 4:2:0, progressive, grey, CMYK, and one with bytes
    libjpeg warns about (extraneous data before a marker) that PIL decodes all the same."""
    rgb = Image.open(io.BytesIO(natural_jpeg(203, 317, seed=7))).convert("RGB")
    out = {"444": natural_jpeg(203, 317, seed=7), "420": natural_jpeg(203, 317, seed=8, quality=85, subsampling=2)}
    for name, image, kwargs in (("progressive", rgb, {"progressive": True, "quality": 90}),
                                ("grey", rgb.convert("L"), {"quality": 90}), ("cmyk", rgb.convert("CMYK"), {})):
        buf = io.BytesIO()
        image.save(buf, "JPEG", **kwargs)
        out[name] = buf.getvalue()
    out["extraneous"] = out["444"][:-2] + b"\x00\x00" + out["444"][-2:]
    return out


@pytest.mark.parametrize("kind", ["444", "420", "progressive", "grey", "cmyk", "extraneous"])
def test_fast_decoding_gives_pils_pixels_at_every_reduction(kind):
    """libjpeg-turbo through simplejpeg decodes what PIL decodes, bit for bit, whole and 2, 4, 8 times
    smaller (a CMYK file, or one libjpeg warns about, is left to PIL)."""
    data = _jpeg_variants()[kind]
    lazy = decode_sample(raw_sample(data), lazy=True)["image"]
    assert isinstance(lazy, EncodedImage) and lazy.size == Image.open(io.BytesIO(data)).size
    for reduce in (1, 2, 4, 8):
        pixels, factor = lazy.pixels(reduce)
        image, pil_factor = EncodedImage(data, lazy.size).decode(reduce)
        assert factor == pil_factor == reduce and pixels.dtype == np.uint8
        assert np.array_equal(pixels, np.asarray(image)), (kind, reduce)


def test_fast_decoding_refuses_what_pil_refuses():
    data = natural_jpeg(120, 90, seed=3)
    lazy = decode_sample(raw_sample(data[: len(data) // 2], "cut"), lazy=True)["image"]
    with pytest.raises(DecodeError, match="cannot decode image mem.tar#cut"):
        lazy.pixels(1)
    with pytest.raises(DecodeError, match="cannot decode sample 'junk'"):  # no JPEG header: PIL says what it is
        decode_sample(raw_sample(b"\xff\xd8\xff" + b"junk" * 50, "junk"), lazy=True)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_fast_views_are_within_one_grey_level_of_full_decoding(interpolation):
    """The views the fast path decodes whole (resized by torch's uint8 kernels) are the full path's
    to one grey level, but for a few pixels in a million (at most 3 levels off); those it decodes
    smaller are the reduced path's pixels exactly. The crop box and the draws are the full path's."""
    full, reduced, fast = (train_transform(48, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, interpolation=interpolation,
                                           scale=(0.05, 1.0), decode=d) for d in ("full", "reduced", "fast"))
    factors, off = set(), []
    for n, (height, width) in enumerate([(300, 400), (97, 61), (250, 250)]):  # 97 x 61: enlarged views
        data = natural_jpeg(height, width, seed=20 + n)
        whole = decode_sample(raw_sample(data))["image"]
        lazy = decode_sample(raw_sample(data), lazy=True)["image"]
        for seed in range(10):
            params = fast.draw(lazy, torch.Generator().manual_seed(seed))
            assert params == full.draw(whole, torch.Generator().manual_seed(seed))
            a, b = full.apply(whole, params), fast.apply(lazy, params)
            assert torch.equal(fast.normalize(fast.render(lazy, params)), b)
            factor = reduction(*params["crop"][2:], 48, 48)
            factors.add(factor)
            if factor > 1:
                assert torch.equal(b, reduced.apply(lazy, params))
            else:
                off.append(levels(a, b).round().flatten())
    off = torch.cat(off)
    assert factors >= {1, 2} and 0 < off.max() <= 3 and float((off > 1).float().mean()) < 1e-4
    assert float(off.mean()) < 0.1


def test_fast_views_with_colour_jitter_and_grayscale_use_pils_colour_operations():
    jitter = dict(color_jitter=0.4, grayscale=0.3, scale=(0.1, 1.0))
    full, reduced, fast = (train_transform(40, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, decode=d, **jitter)
                           for d in ("full", "reduced", "fast"))
    data = natural_jpeg(150, 170, seed=4)
    whole, lazy = decode_sample(raw_sample(data))["image"], decode_sample(raw_sample(data), lazy=True)["image"]
    grays, factors = set(), set()
    for seed in range(10):
        params = full.draw(whole, torch.Generator().manual_seed(seed))
        grays.add(params["gray"])
        factors.add(reduction(*params["crop"][2:], 40, 40))
        if reduction(*params["crop"][2:], 40, 40) > 1:
            assert torch.equal(fast.apply(lazy, params), reduced.apply(lazy, params))
        else:  # one grey level of the resize, grown by each rounded colour operation (factors up to 1.4)
            assert float(levels(full.apply(whole, params), fast.apply(lazy, params)).max()) <= 4.0 + 1e-3
    assert grays == {True, False} and factors == {1, 2}


def test_fast_eval_views_are_within_one_grey_level_of_full_decoding():
    full = eval_transform(112, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    reduced, fast = (eval_transform(112, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, decode=d) for d in ("reduced", "fast"))
    for height, width, factor in [(700, 560, 4), (250, 260, 1)]:
        data = natural_jpeg(height, width, seed=height)
        whole = decode_sample(raw_sample(data))["image"]
        lazy = decode_sample(raw_sample(data), lazy=True)["image"]
        if factor > 1:
            assert torch.equal(fast(lazy), reduced(lazy))
        else:
            assert float(levels(fast(lazy), full(whole)).max()) <= 1.0 + 1e-3


def test_torch_resizes_alike_with_and_without_its_simd_kernels():
    """The fast path's resize gives the same pixels on every CPU: torch's AVX2 uint8 kernel and its
    portable one (ATEN_CPU_CAPABILITY=default, what a CPU without AVX2 runs) agree bit for bit."""
    import subprocess
    import sys

    code = ("import io, sys, numpy as np, torch; from PIL import Image; "
            "from data.transforms import resized_crop_uint8, interpolation_mode; "
            "x = np.asarray(Image.open(io.BytesIO(sys.stdin.buffer.read())).convert('RGB')); "
            "outs = [resized_crop_uint8(x, t, l, h, w, (56, 48), interpolation_mode(m)) for m in ('bicubic', 'bilinear') "
            "for t, l, h, w in ((0, 0, 200, 300), (13, 7, 150, 41), (50, 60, 30, 20))]; "
            "sys.stdout.buffer.write(torch.stack(outs).numpy().tobytes())")
    data = natural_jpeg(200, 300, seed=5)
    outs = {}
    for capability in ("default", None):
        env = {k: v for k, v in __import__("os").environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        proc = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, env=env, check=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=120)
        outs[capability] = proc.stdout
    assert len(outs[None]) == 6 * 3 * 56 * 48 and outs["default"] == outs[None]


def test_without_simplejpeg_the_fast_path_is_refused_in_one_line_and_pil_reads_the_headers(monkeypatch):
    import data.decode as decode

    monkeypatch.setattr(decode, "_simplejpeg", lambda: None)
    with pytest.raises(ValueError, match=r"^'fast' needs simplejpeg \(libjpeg-turbo\), which is not installed: pip "
                                         r"install simplejpeg, or choose reduced \(PIL, the same decoded pixels, "
                                         r"slower\)$"):
        decode.check_decode_path("fast")
    data = natural_jpeg(64, 80, seed=6)
    lazy = decode_sample(raw_sample(data), lazy=True)["image"]
    assert lazy.size == (80, 64) and np.array_equal(lazy.pixels(2)[0], np.asarray(lazy.decode(2)[0]))


def test_uint8_batches_normalised_where_they_are_used_equal_the_float_batches(tmp_path):
    """A worker that sends uint8 views (uint8_batches) gives, after loader.normalize, the very float
    batches of one that normalises them itself."""
    from data.stream import build_train_loader

    with ShardSink(tmp_path, maxcount=8) as sink:
        for i in range(8):
            sink.write({"__key__": f"{i:03d}", "jpg": natural_jpeg(70 + 9 * i, 90, seed=i), "cls": b"0"})
        shards = sink.close()
    write_dataset_json(tmp_path, {"num_samples": 8, "shards": shards})
    transform = train_transform(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    batches = {}
    for uint8 in (False, True):
        torch.manual_seed(0)  # the workers' seeds
        loader = build_train_loader(tmp_path, transform, 4, 1, rank=0, world_size=1, shuffle_buffer=0,
                                    uint8_batches=uint8)
        batches[uint8] = [(images, loader.normalize(images)) for images, _ in loader]
    assert [b[0].dtype for b in batches[True]] == [torch.uint8] * 2
    assert [b[0].dtype for b in batches[False]] == [torch.float32] * 2
    for (floats, same), (_, normalised) in zip(batches[False], batches[True]):
        assert same is floats and torch.equal(normalised, floats)
    with pytest.raises(TypeError, match="uint8_batches needs a transform that renders uint8 views"):
        build_train_loader(tmp_path, eval_transform(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), 4, 0, rank=0,
                           world_size=1, uint8_batches=True)


@pytest.mark.parametrize("path", ["reduced", "fast"])
def test_a_truncated_jpeg_decoded_late_is_skipped_and_counted(tmp_path, path):
    from data.stream import build_train_loader

    samples = [{"__key__": f"{i:03d}", "jpg": natural_jpeg(90, 120, seed=i), "cls": b"0"} for i in range(8)]
    samples[3]["jpg"] = samples[3]["jpg"][: len(samples[3]["jpg"]) // 2]
    with ShardSink(tmp_path, maxcount=8) as sink:
        for s in samples:
            sink.write(s)
        shards = sink.close()
    write_dataset_json(tmp_path, {"num_samples": 8, "shards": shards})
    assert isinstance(decode_sample({**samples[3], "__url__": "x"}, lazy=True)["image"], EncodedImage)  # header ok
    transform = train_transform(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, decode=path)
    loader = build_train_loader(tmp_path, transform, 4, 0, rank=0, world_size=1, shuffle_buffer=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = [k for _, extras in loader for k in extras["__key__"]]
    assert len(keys) == 8 and "003" not in keys
    assert loader.stats.skipped == 1 and loader.stats.skipped_samples[0].endswith("#003") and loader.stats.padded == 1


# ----------------------------------------------------------------------------- cached targets replay


@pytest.fixture(scope="module")
def jpeg_recipe(tmp_path_factory) -> Path:
    """The tiny recipe of test_targets (32 px views, scale 0.5-1) on 24 JPEGs of 100-300 px and 6
    of 40-90 px: views decode whole, 2x and 4x smaller."""
    from test_bootstrap import TINY_RECIPE

    root = tmp_path_factory.mktemp("jpegs")
    (root / "train").mkdir()
    rng = np.random.default_rng(0)
    with ShardSink(root / "train", maxcount=12) as sink:
        for i in range(30):
            height, width = (int(v) for v in (rng.integers(100, 300, 2) if i < 24 else rng.integers(40, 90, 2)))
            sink.write({"__key__": f"{i:06d}", "jpg": natural_jpeg(height, width, seed=i), "cls": b"0"})
        shards = sink.close()
    write_dataset_json(root / "train", {"num_samples": 30, "shards": shards})
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["data"].update(train=str(root / "train"), val=None)
    recipe["run"]["cpu_threads"] = 1
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("path", ["fast", "reduced"])
def test_cached_views_replay_exactly_with_reduced_decoding(jpeg_recipe, tmp_path, path):
    """The caching pass and the training stream decode the same way (data.decode=fast, the default,
    or reduced): each replayed view is exactly the pixels the teacher embedded, whether the loader
    normalises them or sends uint8 views normalised afterwards (as bootstrapping does), and a cache
    made with another decode path is refused, naming the field and the fix."""
    from bootstrap.config import load_recipe
    from bootstrap.target_source import target_source
    from data.stream import build_train_loader
    from data.targets import TargetsError, view_generator
    from test_targets import K, cache_here, tiny_teacher

    class _Acc:  # what target_source reads of an Accelerator
        device, num_processes, is_main_process = torch.device("cpu"), 1, True

    torch.set_num_threads(1)
    out = tmp_path / "targets"
    chosen = [] if path == "fast" else [f"data.decode={path}"]
    assert cache_here(jpeg_recipe, out, *chosen, "--views", str(K), "--dtype", "float32", "--batch-size", "6") == 0
    assert json.loads((out / "targets.json").read_text())["augment"]["decode"] == path
    recipe = load_recipe(jpeg_recipe, [f"data.targets={out}", *chosen])
    assert recipe.data.decode == path
    teacher = tiny_teacher()
    transform = teacher.train_transform(decode=recipe.data.decode, **recipe.data.augment)
    source = target_source(recipe, teacher, transform, _Acc(), say=lambda t: None)
    assert transform.decode == path
    train = recipe.data.train
    raws = {s["__key__"]: s for u in resolve_shards(train) for s in iter_shard(u)}
    factors = set()
    for uint8 in (False, True):
        loader = build_train_loader(train, transform, 6, 0, shuffle_buffer=10, seed=0, rank=0, world_size=1,
                                    targets=source.store, uint8_batches=uint8)
        for images, extras in loader:
            assert images.dtype == (torch.uint8 if uint8 else torch.float32)
            images = loader.normalize(images)
            for image, key, view in zip(images, extras["__key__"], extras["view"].tolist()):
                lazy = decode_sample(raws[key], lazy=True)["image"]
                drawn = transform.draw(lazy, view_generator(0, key, view))
                assert torch.equal(image, transform.apply(lazy, drawn))  # the very pixels the teacher saw
                factors.add(reduction(*drawn["crop"][2:], *transform.size))
            with torch.inference_mode():
                assert torch.equal(extras["target"], teacher.embed(images))
    assert {1, 2, 4} <= factors  # the replayed views include whole and reduced decodes

    other = "full" if path == "fast" else "fast"
    recipe = load_recipe(jpeg_recipe, [f"data.targets={out}", f"data.decode={other}"])
    with pytest.raises(TargetsError, match=rf"made for another run: augment.decode: the cache has '{path}', this run "
                                           rf"has '{other}' \(set data.decode={path} to replay it\)"):
        target_source(recipe, teacher, teacher.train_transform(decode=other, **recipe.data.augment), _Acc(),
                      say=lambda t: None)


def test_caches_from_before_the_decode_key_count_as_full_decoding(tmp_path):
    from data.targets import read_manifest

    (tmp_path / "targets.json").write_text(json.dumps({"augment": {"size": [32, 32]}, "views": 1}))
    assert read_manifest(tmp_path)["augment"]["decode"] == "full"


# ----------------------------------------------------------------------------- the recipe key


def test_recipe_key_picks_the_decode_path_and_bad_values_get_one_line():
    from bootstrap.config import RecipeError, load_recipe

    assert load_recipe("recipes/demo.yaml").data.decode == "fast"
    for path in ("fast", "reduced", "full"):
        assert load_recipe("recipes/demo.yaml", [f"data.decode={path}"]).data.decode == path
    choose = r"choose fast, reduced or full \(default fast\)"
    with pytest.raises(RecipeError, match=rf"^data.decode='redcued' is not a decode path; {choose}. Did you mean "
                                          r"'reduced'\?$"):
        load_recipe("recipes/demo.yaml", ["data.decode=redcued"])
    # A GPU decoder asked of the CPU workers: one line that says where GPU decoding is measured.
    with pytest.raises(RecipeError, match=r"^data.decode='cuda' is not a training decode path: the training stream "
                                          rf"decodes in CPU loader workers \(.*--paths cuda.*\); {choose}$"):
        load_recipe("recipes/demo.yaml", ["data.decode=cuda"])
    with pytest.raises(RecipeError, match=r"^data.decode='torchcodec' is not a training decode path: .*no faster "
                                          rf"than PIL.*; {choose}"):
        load_recipe("recipes/demo.yaml", ["data.decode=torchcodec"])
    with pytest.raises(ValueError, match="decode 'turbo' is not a decode path"):
        train_transform(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, decode="turbo")


def test_the_demo_pngs_render_as_before():
    """The demo's PNGs are no JPEGs: every path renders them exactly as full decoding does."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    sample = {"__key__": "a", "__url__": "demo.tar", "png": buf.getvalue()}
    image = decode_sample(sample, lazy=True)["image"]
    assert isinstance(image, Image.Image)
    full, reduced, fast = (train_transform(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, decode=d)
                           for d in ("full", "reduced", "fast"))
    params = full.draw(image, torch.Generator().manual_seed(0))
    assert torch.equal(full.apply(image, params), reduced.apply(image, params))
    assert torch.equal(full.apply(image, params), fast.apply(image, params))


# ----------------------------------------------------------------------------- --max-size


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    (root / "large.jpg").write_bytes(natural_jpeg(180, 300, seed=1, quality=97, subsampling=0))
    (root / "tall.jpg").write_bytes(natural_jpeg(400, 120, seed=2, quality=90, subsampling=2))
    (root / "small.jpg").write_bytes(natural_jpeg(60, 90, seed=3))
    Image.new("RGB", (200, 200), (1, 2, 3)).save(root / "flat.png")
    return root


def test_max_size_reencodes_larger_jpegs_to_that_shorter_side(mixed_folder, tmp_path):
    info = make_shards(mixed_folder, tmp_path / "out", classes=False, shuffle=False, progress=False, max_size=96)
    stored = {json.loads(s["json"])["path"]: s for u in resolve_shards(str(tmp_path / "out")) for s in iter_shard(u)}
    for name in ("small.jpg",):
        assert stored[name]["jpg"] == (mixed_folder / name).read_bytes()  # not larger than 96: kept
    assert stored["flat.png"]["png"] == (mixed_folder / "flat.png").read_bytes()  # no JPEG: kept
    for name, size in (("large.jpg", (160, 96)), ("tall.jpg", (96, 320))):
        with Image.open(io.BytesIO(stored[name]["jpg"])) as new, Image.open(mixed_folder / name) as old:
            assert new.size == size and new.format == "JPEG"
            assert JpegImagePlugin.get_sampling(new) == JpegImagePlugin.get_sampling(old)  # 4:4:4 stays 4:4:4
            reference = np.asarray(old.convert("RGB").resize(size, Image.Resampling.LANCZOS), dtype=float)
            error = np.abs(np.asarray(new.convert("RGB"), dtype=float) - reference).mean()
            assert error < 4, (name, error)  # quality 95: close to a Lanczos resize of the original
    sizes = {p.name: p.stat().st_size for p in mixed_folder.iterdir()}
    r = info["reencoded"]
    assert info["max_size"] == 96 and r["images"] == 2 and r["of"] == 4
    assert r["bytes_before"] == sum(sizes.values())
    assert r["bytes_after"] == sum(len(v) for s in stored.values() for k, v in s.items() if k in ("jpg", "png"))
    assert r["bytes_after"] < r["bytes_before"]


def test_max_size_cli_says_what_it_saved_and_refuses_a_size_below_the_crop(mixed_folder, tmp_path, capsys):
    from data.make_shards import main

    assert main([str(mixed_folder), str(tmp_path / "out"), "--max-size", "100", "--crop", "96", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("wrote 4 samples in 1 shard(s), no classes")
    assert re.fullmatch(r"--max-size 100: re-encoded 2 of 4 images \(shorter side above 100 px\); all images "
                        r"[\d.]+ KB -> [\d.]+ KB \(\d+%, [\d.]+ KB saved\); the re-encoded ones [\d.]+ KB -> [\d.]+ KB",
                        out[1]), out[1]
    assert main([str(mixed_folder), str(tmp_path / "out2"), "--max-size", "128", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["make_shards: error: --max-size 128 is below the training crop 224: every full-image view would be "
                   "enlarged from fewer pixels than the originals have; use --max-size 224 or more (or --crop N for a "
                   "teacher with a smaller input)"]


def test_training_refuses_shards_shrunk_below_its_views(mixed_folder, tmp_path):
    from data.stream import build_train_loader

    make_shards(mixed_folder, tmp_path / "out", classes=False, progress=False, max_size=96)
    build_train_loader(tmp_path / "out", train_transform(96, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), 2, 0, rank=0,
                       world_size=1)
    with pytest.raises(ValueError, match=r"re-encoded to a shorter side of 96 px \(make_shards --max-size\), below "
                                         r"this run's 128 px views: make them again from the originals with "
                                         r"--max-size 128 or more"):
        build_train_loader(tmp_path / "out", train_transform(128, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), 2, 0, rank=0,
                           world_size=1)

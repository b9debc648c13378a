"""Cached teacher targets: replayable views, the caching command, training from the cache, bad input.

The tiny setting of test_bootstrap (a 3-block random CLIP at 32 px, 72 demo images) with
K = 3 views: caching it takes a few seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from data.targets import (MANIFEST, TARGET_SHARD, TargetsError, first_difference, view_generator, view_index)
from test_bootstrap import TINY_RECIPE, assert_same_weights, run_here, run_subprocess, weights

K = 3


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def cache_here(recipe: Path, out: Path, *args: str) -> int:
    """`python -m bootstrap.cache_targets RECIPE ...` in this process."""
    from bootstrap.cache_targets import main

    _reset_accelerate()
    try:
        return main([str(recipe), *args, "--out", str(out), "--no-progress"])
    finally:
        _reset_accelerate()


@pytest.fixture(autouse=True)
def _keep_threads():
    """Runs here pin one thread (run.cpu_threads=1); other test files keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from data.demo import make_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(out, num=72, size=32, val_fraction=1 / 6, shard_size=20)
    return out


def write_recipe(path: Path, demo_data: Path, **data) -> Path:
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["data"].update(train=str(demo_data / "train"), val=str(demo_data / "val"), **data)
    # One thread: then the teacher's kernels round a view's target the same whatever else is in
    # its batch (two threads split the work by batch position), which bit-exact comparisons need.
    recipe["run"]["cpu_threads"] = 1
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def recipe_file(demo_data, tmp_path_factory) -> Path:
    return write_recipe(tmp_path_factory.mktemp("recipe") / "tiny.yaml", demo_data)


@pytest.fixture(scope="module")
def cache32(recipe_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("targets") / "fp32"
    # Teacher batches of 6 views, the run's batch size: the float32 targets are then bit-identical.
    assert cache_here(recipe_file, out, "--views", str(K), "--dtype", "float32", "--tokens", "--batch-size", "6") == 0
    return out


@pytest.fixture(scope="module")
def cache16(recipe_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("targets") / "fp16"
    assert cache_here(recipe_file, out, "--views", str(K)) == 0
    return out


def tiny_teacher(seed: int = 0):
    """The random teacher a run with run.seed=`seed` builds (the caching command builds the same)."""
    from accelerate.utils import set_seed

    from teachers import create_teacher

    set_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_teacher(TINY_RECIPE["teacher"])


def store_of(folder: Path, recipe_file: Path):
    from bootstrap.config import load_recipe
    from bootstrap.target_source import target_source

    class _Acc:  # what target_source reads of an Accelerator
        device, num_processes, is_main_process = torch.device("cpu"), 1, True

    recipe = load_recipe(recipe_file, [f"data.targets={folder}"])
    teacher = tiny_teacher()
    return target_source(recipe, teacher, teacher.train_transform(**recipe.data.augment), _Acc(), say=lambda t: None), teacher


# ----------------------------------------------------------------------------- replayable views


def test_train_transform_draws_like_torchvision_and_replays_from_a_seed():
    from torchvision import transforms as T

    from data.transforms import ReplayableTrainTransform, _to_rgb

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    t = ReplayableTrainTransform(32, (0.5,) * 3, (0.25,) * 3, "bicubic", scale=(0.3, 1.0), hflip=0.5,
                                 color_jitter=(0.4, 0.4, 0.4, 0.1), grayscale=0.2)
    reference = T.Compose([T.RandomResizedCrop(32, scale=(0.3, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                           T.RandomHorizontalFlip(0.5), T.ColorJitter(0.4, 0.4, 0.4, 0.1), T.RandomGrayscale(0.2),
                           _to_rgb, T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)])
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        online = t(image)
        torch.manual_seed(seed)
        assert torch.equal(online, reference(image)), seed  # the same draws as torchvision's Compose
        params = json.loads(json.dumps(t.draw(image, torch.Generator().manual_seed(seed))))  # stored as JSON
        assert torch.equal(t.apply(image, params), online), seed  # replayed exactly
        flips.add(params["flip"])
    assert flips == {True, False}
    a, b = (t.draw(image, view_generator(0, "000001", v)) for v in (0, 1))
    assert a != b and a == t.draw(image, view_generator(0, "000001", 0))


def test_view_choice_cycles_through_the_views_from_a_per_image_offset():
    keys = [f"{i:06d}" for i in range(200)]
    for key in keys[:20]:
        assert sorted(view_index(e, key, K) for e in range(K)) == list(range(K))  # K epochs: every view once
        assert view_index(K + 1, key, K) == view_index(1, key, K)
    # The offsets differ between images, so one epoch mixes the views.
    assert {view_index(0, key, K) for key in keys} == set(range(K))


# ----------------------------------------------------------------------------- the caching command


def test_cache_folder_layout_and_manifest(cache32, demo_data):
    manifest = json.loads((cache32 / MANIFEST).read_text())
    info = json.loads((demo_data / "train" / "dataset.json").read_text())
    assert manifest["complete"] and manifest["views"] == K and manifest["dtype"] == "float32"
    assert manifest["train_shards"] == [{"name": s["name"], "num_samples": s["num_samples"]} for s in info["shards"]]
    assert manifest["target_shape"] == [32] and manifest["tokens_shape"] == [17, 64]
    assert manifest["teacher"]["model"] == "tiny-clip" and "pretrained" not in manifest["teacher"]
    assert len(manifest["weights_sha256"]) == 64
    assert manifest["augment"]["scale"] == [0.5, 1.0] and manifest["augment"]["size"] == [32, 32]
    names = sorted(p.name for p in cache32.iterdir())
    shards = [TARGET_SHARD % i for i in range(len(info["shards"]))]
    assert names == sorted([".lock", MANIFEST, "heldout.safetensors"] + shards)  # .lock: one process fills it
    assert manifest["version"] == 2 and manifest["max_pixels"] == 64_000_000
    assert manifest["shard_sha256"] == [hashlib.sha256((cache32 / name).read_bytes()).hexdigest() for name in shards]


def test_replayed_views_and_their_targets_equal_the_cached_ones(cache32, cache16, recipe_file, demo_data):
    """The loader's images are the views drawn when caching; the teacher's online targets of them are
    the cached ones (exact in float32, float16-rounded in float16); the tokens too."""
    from bootstrap.cache_targets import final_tokens
    from data.decode import decode_sample
    from data.shards import iter_shard, resolve_shards
    from data.stream import build_train_loader

    torch.set_num_threads(1)  # as the recipe's run.cpu_threads, which the caching pass used
    source, teacher = store_of(cache32, recipe_file)
    source16, _ = store_of(cache16, recipe_file)
    transform = teacher.train_transform(scale=[0.5, 1.0], hflip=0.5)
    originals = {s["__key__"]: decode_sample(s)["image"] for u in resolve_shards(str(demo_data / "train"))
                 for s in iter_shard(u)}
    for epoch in (0, 1):
        loader32 = build_train_loader(str(demo_data / "train"), transform, 6, 0, shuffle_buffer=10, seed=0,
                                      rank=0, world_size=1, targets=source.store)
        loader16 = build_train_loader(str(demo_data / "train"), transform, 6, 0, shuffle_buffer=10, seed=0,
                                      rank=0, world_size=1, targets=source16.store)
        loader32.set_epoch(epoch)
        loader16.set_epoch(epoch)
        for n, ((images, extras), (images16, extras16)) in enumerate(zip(loader32, loader16)):
            assert torch.equal(images, images16) and extras["__key__"] == extras16["__key__"]
            for image, key, view in zip(images, extras["__key__"], extras["view"].tolist()):
                assert view == view_index(epoch, key, K)
                drawn = transform.draw(originals[key], view_generator(0, key, view))
                assert torch.equal(image, transform.apply(originals[key], drawn))  # the very pixels
            with torch.inference_mode():
                online = teacher.embed(images)
                tokens = final_tokens(teacher, images)
            assert torch.equal(extras["target"], online)  # float32: exact
            assert torch.equal(extras16["target"], online.half().float())  # float16: its rounding
            assert extras16["target"].dtype == torch.float32
            assert torch.equal(extras["target_tokens"], tokens)
            assert "target_tokens" not in extras16
            if n == 2:
                break


def test_ranks_and_workers_read_their_own_shards(cache32, recipe_file, demo_data):
    from data.stream import build_train_loader

    source, teacher = store_of(cache32, recipe_file)
    transform = teacher.train_transform(scale=[0.5, 1.0], hflip=0.5)
    seen = []
    for rank in (0, 1):
        loader = build_train_loader(str(demo_data / "train"), transform, 6, 2, shuffle_buffer=10, seed=0,
                                    rank=rank, world_size=2, targets=source.store)
        for images, extras in loader:
            assert extras["target"].shape == (6, 32)
            seen.extend(extras["__key__"])
    assert len(seen) == len(set(seen)) == 60  # disjoint ranks and workers, every image once


def test_rerun_continues_where_it_stopped(recipe_file, cache32, tmp_path):
    """A killed pass leaves temporary files and missing shards; the same command finishes it, writing
    only the missing shards, byte-identical to an uninterrupted pass; training refuses it until then."""
    import shutil

    out = tmp_path / "targets"
    shutil.copytree(cache32, out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["complete"] = False
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / (TARGET_SHARD % 1)).unlink()
    (out / (TARGET_SHARD % 1 + ".0.tmp")).write_bytes(b"half a shard")
    kept = (out / (TARGET_SHARD % 0)).stat().st_mtime_ns
    with pytest.raises(TargetsError, match=r"not complete \(2 of 3 shards\).*run the same bootstrap.cache_targets"):
        store_of(out, recipe_file)
    assert cache_here(recipe_file, out, "--views", str(K), "--dtype", "float32", "--tokens", "--batch-size", "6") == 0
    assert not list(out.glob("*.tmp"))
    assert (out / (TARGET_SHARD % 0)).stat().st_mtime_ns == kept  # not redone
    for i in range(3):
        assert (out / (TARGET_SHARD % i)).read_bytes() == (cache32 / (TARGET_SHARD % i)).read_bytes()
    assert json.loads((out / MANIFEST).read_text())["complete"]
    store_of(out, recipe_file)
    # Other settings never mix into a folder: the rerun names what differs.
    assert cache_here(recipe_file, out, "--views", "4", "--dtype", "float32", "--tokens", "--batch-size", "6") == 2


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("override, field", [
    ("teacher.model_cfg.vision_cfg.layers=2", "teacher.model_cfg"),
    ("run.seed=1", "weights_sha256"),  # another random teacher: other weights, same spec
    ("data.augment.scale=[0.3,1.0]", "augment.scale"),
    ("data.augment.hflip=0.0", "augment.hflip"),
])
def test_targets_for_another_run_are_refused_naming_the_field(cache16, recipe_file, override, field):
    from bootstrap.config import load_recipe
    from bootstrap.target_source import target_source

    class _Acc:
        device, num_processes, is_main_process = torch.device("cpu"), 1, True

    recipe = load_recipe(recipe_file, [f"data.targets={cache16}", override])
    teacher = tiny_teacher(recipe.run.seed)
    if override.startswith("teacher."):
        from teachers import create_teacher

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            teacher = create_teacher(recipe.teacher)
    with pytest.raises(TargetsError, match=rf"made for another run: {field}"):
        target_source(recipe, teacher, teacher.train_transform(**recipe.data.augment), _Acc(), say=lambda t: None)


def test_targets_for_other_image_shards_are_refused(cache16, tmp_path):
    other = {"train_shards": [{"name": "shard-000000.tar", "num_samples": 20}]}
    cached = {"train_shards": [{"name": "shard-000000.tar", "num_samples": 20},
                               {"name": "shard-000001.tar", "num_samples": 20}]}
    assert first_difference(cached, other) == "train_shards: the cache has 2 image shards, this run has 1"
    other["train_shards"].append({"name": "shard-000001.tar", "num_samples": 19})
    assert first_difference(cached, other).startswith("train_shards[1]: the cache has {'name': 'shard-000001.tar', "
                                                      "'num_samples': 20}")


def _rewrite_shard(path: Path, change, rehash: bool = True) -> None:
    """Rewrite a target shard's members through `change(name, data) -> (name, data) | None`; `rehash`
    records the new shard's SHA-256 in the manifest (as someone forging a cache would)."""
    members = []
    with tarfile.open(path) as tar:
        for m in tar:
            members.append((m.name, tar.extractfile(m).read()))
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            new = change(name, data)
            if new is None:
                continue
            info = tarfile.TarInfo(new[0])
            info.size = len(new[1])
            import io

            tar.addfile(info, io.BytesIO(new[1]))
    if rehash:
        manifest_path = path.parent / MANIFEST
        manifest = json.loads(manifest_path.read_text())
        manifest["shard_sha256"][int(path.name[len("targets-"):-len(".tar")])] = \
            hashlib.sha256(path.read_bytes()).hexdigest()
        manifest_path.write_text(json.dumps(manifest))


def _copy(cache: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "targets"
    shutil.copytree(cache, out)
    return out


def _first_batches(store, demo_data, teacher):
    from data.stream import build_train_loader

    loader = build_train_loader(str(demo_data / "train"), teacher.train_transform(scale=[0.5, 1.0], hflip=0.5), 6, 0,
                                shuffle_buffer=0, seed=0, rank=0, world_size=1, shardshuffle=False, targets=store)
    return list(loader)


def test_an_image_without_a_target_names_its_key_and_shard(cache16, recipe_file, demo_data, tmp_path):
    out = _copy(cache16, tmp_path)
    # The second sample's target carries another key (as if the image shards had changed); in the second
    # shard, which the start's check against the teacher does not read (that would find it first).
    with tarfile.open(demo_data / "train" / "shard-000001.tar") as tar:
        key = tar.getnames()[4].split(".")[0]
    _rewrite_shard(out / (TARGET_SHARD % 1), lambda n, d: (n.replace(key, "x" + key), d))
    source, teacher = store_of(out, recipe_file)
    with pytest.raises(TargetsError, match=rf"no cached target for image '{key}' \(sample 1\) of shard "
                                           r".*shard-000001.tar: target shard .*targets-000001.tar"):
        _first_batches(source.store, demo_data, teacher)


def test_a_corrupt_target_shard_is_named(cache16, recipe_file, demo_data, tmp_path):
    out = _copy(cache16, tmp_path)
    path = out / (TARGET_SHARD % 2)
    path.write_bytes(path.read_bytes()[:3000])  # truncated
    with pytest.raises(TargetsError, match=r"target shard .*targets-000002.tar (is corrupt|holds \d+ targets)"):
        store_of(out, recipe_file)
    out = _copy(cache16, tmp_path / "b")
    # A damaged target inside an intact tar (and a fitting checksum): named with its key and shard when read.
    with tarfile.open(out / (TARGET_SHARD % 1)) as tar:
        key = tar.getnames()[4].split(".")[0]
    _rewrite_shard(out / (TARGET_SHARD % 1), lambda n, d: (n, d[:40]) if n == f"{key}.emb.npy" else (n, d))
    source, teacher = store_of(out, recipe_file)
    with pytest.raises(TargetsError, match=rf"target of '{key}' in .*targets-000001.tar is corrupt"):
        _first_batches(source.store, demo_data, teacher)


def test_a_folder_without_targets_is_refused(cache16, recipe_file, tmp_path):
    with pytest.raises(TargetsError, match="holds no targets.json: make the targets with"):
        store_of(tmp_path, recipe_file)
    out = _copy(cache16, tmp_path)
    (out / (TARGET_SHARD % 1)).unlink()
    with pytest.raises(TargetsError, match=r"target shard .*targets-000001.tar \(for image shard shard-000001.tar\) "
                                           r"is missing"):
        store_of(out, recipe_file)


def test_more_epochs_than_views_warns_once(cache16, recipe_file):
    from bootstrap.config import load_recipe
    from bootstrap.target_source import target_source

    class _Acc:
        device, num_processes, is_main_process = torch.device("cpu"), 1, True

    # 60 images, batch 6: 10 steps per epoch; 40 steps are 4 epochs of 3 views.
    recipe = load_recipe(recipe_file, [f"data.targets={cache16}", "optim.steps=40"])
    teacher = tiny_teacher()
    with pytest.warns(RuntimeWarning, match="takes 4 epochs but the targets hold 3 view") as caught:
        target_source(recipe, teacher, teacher.train_transform(**recipe.data.augment), _Acc(), say=lambda t: None)
    assert len([w for w in caught if "epochs" in str(w.message)]) == 1


# ----------------------------------------------------------------------------- training from the cache


def test_cached_run_equals_online_steps_on_the_same_views(cache32, recipe_file, tmp_path, monkeypatch):
    """8 steps with float32 cached targets end with the weights of 8 steps that replay the same views
    and run the teacher online; the cached run never calls the teacher's forward."""
    import bootstrap.train as train_module
    from bootstrap.target_source import CachedTargets
    from data.targets import CHECK_SAMPLES
    from teachers.base import Teacher

    cached_out = tmp_path / "cached"
    calls = []
    original = Teacher.embed
    monkeypatch.setattr(Teacher, "embed", lambda self, x: calls.append(x.shape[0]) or original(self, x))
    assert run_here(recipe_file, cached_out, f"data.targets={cache32}") == 0
    # Only the check of a few cached views and held-out targets at the start: held-out targets come from the cache.
    assert calls == [CHECK_SAMPLES, CHECK_SAMPLES]

    class OnlineOnTheSameViews(CachedTargets):
        def embed(self, images, extras):
            return self.teacher.embed(images)

    real = train_module.target_source

    def replay_online(*args, **kwargs):
        source = real(*args, **kwargs)
        return OnlineOnTheSameViews(source.teacher, source.device, source.store)

    monkeypatch.setattr(train_module, "target_source", replay_online)
    online_out = tmp_path / "online"
    assert run_here(recipe_file, online_out, f"data.targets={cache32}") == 0
    assert sum(calls) == 2 * CHECK_SAMPLES + 8 * 6 + 2 * CHECK_SAMPLES  # the online run's teacher embedded every batch
    assert_same_weights(weights(cached_out), weights(online_out))
    held = [json.loads(line) for line in (cached_out / "metrics.jsonl").read_text().splitlines()
            if "heldout/cosine" in line]
    assert held[-1]["heldout/cosine"] > held[0]["heldout/cosine"]


def test_cached_run_resumes_to_the_same_weights(cache16, recipe_file, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_here(recipe_file, straight, f"data.targets={cache16}") == 0
    assert run_here(recipe_file, resumed, f"data.targets={cache16}", "run.stop_after=3") == 0
    assert run_here(recipe_file, resumed, f"data.targets={cache16}") == 0
    assert_same_weights(weights(straight), weights(resumed))


def test_targets_auto_caches_on_first_use(recipe_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFORMER_CACHE", str(tmp_path / "cache"))
    assert run_here(recipe_file, tmp_path / "a", "data.targets=auto") == 0
    folders = list((tmp_path / "cache" / "targets").iterdir())
    assert len(folders) == 1
    manifest = json.loads((folders[0] / MANIFEST).read_text())
    assert manifest["complete"] and manifest["views"] == 1  # 8 steps of 6: within one epoch of 60
    mtime = (folders[0] / MANIFEST).stat().st_mtime_ns
    assert run_here(recipe_file, tmp_path / "b", "data.targets=auto") == 0
    assert (folders[0] / MANIFEST).stat().st_mtime_ns == mtime  # found, not made again
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_two_processes_cache_what_one_does(cache16, recipe_file, tmp_path):
    """Under a 2-process launch every rank caches its own image shards; the folder is the one-process one."""
    out = tmp_path / "targets"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "bootstrap/cache_targets.py", str(recipe_file), "--views", str(K), "--out", str(out), "--no-progress"]
    result = run_subprocess(cmd, {"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for i in range(3):
        assert (out / (TARGET_SHARD % i)).read_bytes() == (cache16 / (TARGET_SHARD % i)).read_bytes()
    assert json.loads((out / MANIFEST).read_text())["complete"]


def test_bad_targets_stop_the_run_with_one_line(recipe_file, tmp_path, capsys):
    from bootstrap.config import RecipeError, load_recipe

    assert run_here(recipe_file, tmp_path / "run", f"data.targets={tmp_path}") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data.targets=") and "holds no targets.json" in err[-1]
    with pytest.raises(RecipeError, match="data.targets must be a targets folder"):
        load_recipe(recipe_file, ["data.targets=' '"])


# ----------------------------------------------------------------------------- issue 32, item 11: trusted by manifest alone


def _negated(name: str, data: bytes):
    if not name.endswith(".emb.npy"):
        return name, data
    import io

    buf = io.BytesIO()
    np.save(buf, -np.load(io.BytesIO(data)), allow_pickle=False)
    return name, buf.getvalue()


def test_a_changed_or_swapped_target_shard_is_refused_when_read(cache16, cache32, recipe_file, demo_data, tmp_path,
                                                                 monkeypatch):
    import data.targets

    out = _copy(cache16, tmp_path)
    _rewrite_shard(out / (TARGET_SHARD % 1), _negated, rehash=False)  # float16 signs flipped: cosine -1
    source, teacher = store_of(out, recipe_file)  # the start checks shard 0 only
    with pytest.raises(TargetsError, match=r"targets-000001.tar is not the one cached \(its SHA-256 differs from "
                                           r"targets.json\): it was changed or replaced after caching"):
        _first_batches(source.store, demo_data, teacher)
    from data.stream import build_train_loader

    loader = build_train_loader(str(demo_data / "train"), teacher.train_transform(scale=[0.5, 1.0], hflip=0.5), 6, 2,
                                shuffle_buffer=0, seed=0, rank=0, world_size=1, targets=source.store)
    with pytest.raises(TargetsError) as caught:  # found in a worker process: the same one line
        list(loader)
    assert str(caught.value).startswith(f"target shard {out / (TARGET_SHARD % 1)} is not the one cached")
    assert "\n" not in str(caught.value)
    out = _copy(cache16, tmp_path / "swapped")
    shutil.copy(cache32 / (TARGET_SHARD % 2), out / (TARGET_SHARD % 2))  # from another cache (float32, tokens)
    source, teacher = store_of(out, recipe_file)
    with pytest.raises(TargetsError, match=r"targets-000002.tar is not the one cached"):
        _first_batches(source.store, demo_data, teacher)
    # An intact cache: each shard is hashed once in this process, however often it is read.
    hashed = []
    original = data.targets.sha256_of
    monkeypatch.setattr(data.targets, "sha256_of", lambda f: hashed.append(f.name) or original(f))
    out = _copy(cache16, tmp_path / "intact")
    source, teacher = store_of(out, recipe_file)
    for _ in range(2):
        _first_batches(source.store, demo_data, teacher)
    assert sorted(hashed) == [str(out / (TARGET_SHARD % i)) for i in range(3)]


def test_a_forged_cache_is_told_apart_by_the_teacher(cache16, recipe_file, tmp_path):
    """Manifests can be edited: targets of another teacher, or negated ones, with fitting checksums and weights
    hash are refused by re-embedding a few cached views and held-out images, naming what differs."""
    from safetensors.torch import load_file, save_file

    out = _copy(cache16, tmp_path)
    for i in range(3):
        _rewrite_shard(out / (TARGET_SHARD % i), _negated)
    with pytest.raises(TargetsError, match=r"were not made by this run's teacher: the target of image '\d+' \(view 0, "
                                           r"shard shard-000000.tar\) differs from the teacher's embedding by 2.000 "
                                           r"\(relative; cosine -1.000, at most 0.1 expected\)"):
        store_of(out, recipe_file)
    out = _copy(cache16, tmp_path / "heldout")
    held = load_file(str(out / "heldout.safetensors"))
    from safetensors import safe_open

    with safe_open(str(out / "heldout.safetensors"), "pt") as f:
        metadata = f.metadata()
    save_file({"embed": held["embed"].roll(1, 0)}, str(out / "heldout.safetensors"), metadata=metadata)
    with pytest.raises(TargetsError, match=r"the held-out target of .*#\d+ differs from the teacher's embedding"):
        store_of(out, recipe_file)
    # A whole cache of another (random) teacher, its manifest given this teacher's weights hash.
    other = tmp_path / "other"
    assert cache_here(recipe_file, other, "run.seed=1", "--views", str(K)) == 0
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["weights_sha256"] = json.loads((cache16 / MANIFEST).read_text())["weights_sha256"]
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TargetsError, match="were not made by this run's teacher"):
        store_of(other, recipe_file)


def test_a_manifest_without_checksums_is_refused(cache16, recipe_file, tmp_path):
    out = _copy(cache16, tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["shard_sha256"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TargetsError, match="does not list the SHA-256 of each target shard: it is damaged or was "
                                           "edited; delete"):
        store_of(out, recipe_file)
    manifest["version"] = 1  # as an earlier version wrote it
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TargetsError, match=rf"were made by an older version, without the SHA-256 of each shard, so "
                                           rf"they cannot be verified: delete {out} and make them again"):
        store_of(out, recipe_file)


# ----------------------------------------------------------------------------- item 13: a corrupt image shard


def test_a_corrupt_image_shard_is_cached_as_skipped_and_named(demo_data, tmp_path, capsys):
    from data.stream import build_train_loader

    data = tmp_path / "train"
    shutil.copytree(demo_data / "train", data)
    shard = data / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[4 * 5].offset  # the first header of sample 5 (cls, json, png, txt each)
    raw = bytearray(shard.read_bytes())
    raw[offset + 148:offset + 156] = b"9999999\0"
    shard.write_bytes(bytes(raw))
    recipe = write_recipe(tmp_path / "recipe.yaml", demo_data)
    recipe.write_text(recipe.read_text().replace(str(demo_data / "train"), str(data)))
    out = tmp_path / "targets"
    capsys.readouterr()
    assert cache_here(recipe, out, "--views", "1") == 0
    said = capsys.readouterr().out
    assert (f"skipped 16 of the 20 samples of image shard {shard}, which could not be read (shard {shard} is corrupt "
            f"or not a tar file (the member header at byte {offset} is corrupt") in said
    source, teacher = store_of(out, recipe)
    loader = build_train_loader(str(data), teacher.train_transform(scale=[0.5, 1.0], hflip=0.5), 6, 0,
                                shuffle_buffer=0, seed=0, rank=0, world_size=1, targets=source.store)
    with pytest.warns(RuntimeWarning, match=rf"skipping the rest of shard {shard} \(16 samples\)"):
        batches = list(loader)
    assert len(batches) == 10 and loader.stats.skipped == 16 and loader.stats.bad_shards == [str(shard)]


# ----------------------------------------------------------------------------- item 16: one cache folder, two processes


class _WaitSaid:
    """stderr that signals once the waiting message is written."""

    def __init__(self):
        import io
        import threading

        self.text, self.event = io.StringIO(), threading.Event()

    def write(self, text):
        if "waiting for another process" in text:
            self.event.set()
        return self.text.write(text)

    def flush(self):
        pass


def test_a_second_caching_process_waits_then_finds_the_folder_done(cache16, recipe_file, tmp_path, capsys):
    """What two runs with data.targets=auto in one cache folder meet: one fills it (here: a thread holding the
    lock, that copies a finished cache in once the other waits), the other waits, says so, then uses it."""
    import threading

    from filelock import FileLock

    out = tmp_path / "targets"
    out.mkdir()
    said, held = _WaitSaid(), threading.Event()

    def fill():
        with FileLock(str(out / ".lock")):
            held.set()
            said.event.wait(60)
            for path in cache16.iterdir():
                if not path.name.startswith("."):
                    shutil.copy2(path, out / path.name)

    filler = threading.Thread(target=fill)
    filler.start()
    assert held.wait(60)
    with contextlib.redirect_stderr(said):
        assert cache_here(recipe_file, out, "--views", str(K)) == 0
    filler.join()
    assert f"waiting for another process that is making the targets in {out}" in said.text.getvalue()
    assert f"targets: {out} is complete already" in capsys.readouterr().out
    for path in cache16.iterdir():
        if not path.name.startswith("."):
            assert (out / path.name).read_bytes() == path.read_bytes()  # used as it was, not made again
            assert (out / path.name).stat().st_mtime_ns == path.stat().st_mtime_ns


def test_the_caching_command_refuses_a_pipe_url_with_one_line(recipe_file, demo_data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    url = f"pipe:touch {marker}; cat {demo_data / 'train' / 'shard-000000.tar'}"
    assert cache_here(recipe_file, tmp_path / "targets", f"data.train='{url}'", "--views", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs a shell command" in err[0] and "data.allow_pipe: true" in err[0]
    assert not marker.exists()

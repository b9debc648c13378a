"""Video students (issue 30, items 3-7): inflation, the run on clips, cached video targets, evaluation and baselines.

Tiny random teachers at 32 px and the demo's moving shapes (`data.video_demo`, encoded here with PyAV) at 32 px,
8 frames per video.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

av = pytest.importorskip("av", reason="video needs PyAV: pip install -e '.[video]'")

from data.media import VideoMedia  # noqa: E402
from data.video_demo import MOTION_ONLY_CLASSES, make_video_demo_dataset, render_video  # noqa: E402
from data.video_transforms import ClipSampling  # noqa: E402
from students import MediaSparseFormer, SparseFormer, bootstrap_student, load_student  # noqa: E402
from students.sparseformer.video import inflate  # noqa: E402
from students.video import VideoOptions  # noqa: E402
from teachers import RandomTeacherWarning, create_teacher  # noqa: E402
from teachers.frames import VideoTeacher  # noqa: E402
from test_bootstrap import ROOT, assert_same_weights, run_here, run_subprocess, weights  # noqa: E402

TEACHER = {"kind": "openclip", "model": "tiny-clip", "pretrained": None, "model_cfg": {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}
STUDENT = {"tokens": 5, "focus_width": 32, "conv_dim": 16, "num_points": 4, "pg_inner_dim": 16, "focus_repeats": 2}
RECIPE = {
    "teacher": TEACHER,
    "student": {**STUDENT, "video": {"frames": 4}},
    "data": {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 8, "heldout_samples": 6,
             "augment": {"scale": [0.5, 1.0], "hflip": 0.5}},
    "optim": {"lr": 1e-3, "warmup_steps": 2, "steps": 6},
    "run": {"log_every": 2, "eval_every": 3, "checkpoint_every": 3, "keep_checkpoints": 2, "progress": False,
            "final_report": False},
    "eval": {"batch_size": 4, "num_workers": 0, "cost_batch_size": 2, "cost_iters": 1},
    "export": {"enabled": False},
}


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomTeacherWarning)
        return create_teacher(copy.deepcopy(TEACHER))


def _perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every weight moved a little: the zero-initialised RoI and offset heads matter too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("videos")
    make_video_demo_dataset(out, num=32, size=32, frames=8, val_fraction=0.25, shard_size=6)
    return out


@pytest.fixture(scope="module")
def recipe_file(videos, tmp_path_factory) -> Path:
    recipe = copy.deepcopy(RECIPE)
    recipe["data"].update(train=str(videos / "train"), val=str(videos / "val"))
    recipe["eval"]["data"] = str(videos / "val")
    path = tmp_path_factory.mktemp("recipe") / "tiny_video.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ----------------------------------------------------------------------------- inflation


def test_a_video_student_on_a_still_clip_is_its_image_student(teacher):
    image = _perturbed(bootstrap_student(teacher, **STUDENT)[0])
    video = inflate(image, VideoOptions(frames=4)).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for frames in (1, 4):  # one frame, and a clip of one still frame
            clip = x[:, None].expand(-1, frames, -1, -1, -1)
            torch.testing.assert_close(video(clip), image(x), rtol=0, atol=2e-5)
            torch.testing.assert_close(video(clip, pre_logits=True), image(x, pre_logits=True), rtol=0, atol=2e-5)
            torch.testing.assert_close(video.forward_tokens(clip, layer=-2), image.forward_tokens(x, layer=-2),
                                       rtol=0, atol=2e-5)
        moving = torch.stack([x.roll(4 * t, dims=-1) for t in range(4)], dim=1)
        assert (video(moving) - image(x)).abs().max() > 1e-3  # the clip's other frames are seen


def test_the_time_axis_starts_one_frame_long_and_well_conditioned(teacher):
    """A video student's tubes start one frame long around their segments' centres, with their points spread over
    that frame's time (each time on points all over the RoI); a small change to the time offsets then changes the
    output a little, where the authors' inflation (every point at time offset 0) blows the same change up."""
    from students.sparseformer.video import time_ticks

    image = _perturbed(bootstrap_student(teacher, **STUDENT)[0])
    video = inflate(image, VideoOptions(frames=4, replicates=2)).eval()
    roi = video.initial_roi.weight.detach()
    torch.testing.assert_close(roi[:, 5] - roi[:, 2], torch.full((roi.shape[0],), 0.25))
    n = roi.shape[0] // 2  # two tubes per latent token: the first and the second half of the clip
    torch.testing.assert_close((roi[:, 2] + roi[:, 5]) / 2, torch.tensor([0.25] * n + [0.75] * n))
    ticks = time_ticks(16).view(4, 4)
    assert sorted(ticks.flatten().tolist()) == [(i + 0.5) / 16 - 0.5 for i in range(16)]
    quarters = (ticks + 0.5).mul(4).floor()  # which quarter of the time each grid point samples
    assert all(len(set(row.tolist())) == 4 for row in quarters) and all(len(set(c.tolist())) == 4 for c in quarters.T)

    authors = MediaSparseFormer(video.config)
    authors.load_2d_state_dict(image.state_dict())
    authors.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    moving = torch.stack([x.roll(3 * t, dims=-1) for t in range(4)], dim=1)

    def nudged(model):
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():
            before = model(moving)
            for name, p in model.named_parameters():
                if name.endswith("roi_offset_bias"):
                    p.view(-1, 3)[:, 2] += 1e-4 * torch.randn(p.numel() // 3, generator=g)
            return (model(moving) - before).abs().max().item()

    ours, theirs = nudged(video), nudged(authors)
    assert ours < 1e-3 < theirs, (ours, theirs)


def test_video_students_are_built_saved_and_exported_as_image_ones(teacher, tmp_path):
    from students.export import export_openclip, export_timm
    from students.run_folder import RunFolder

    image, image_policy = bootstrap_student(teacher, **STUDENT)
    video, policy = bootstrap_student(teacher, **STUDENT, video={"frames": 4, "replicates": 2})
    assert type(video) is MediaSparseFormer and video.config.video.frames == 4 and video.replicates == 2
    assert video.num_tokens == 2 * image.num_tokens  # every latent token, twice: two tubes over time
    assert policy.trainable == image_policy.trainable and not any(
        p.requires_grad for n, p in video.named_parameters() if n in policy.frozen)
    clips = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert video.forward_tokens(clips).shape == (2, 2 * 4 + 1, 64)  # the whole clip's tokens, class token first
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.write_student(video, video.state_dict())
    reloaded = load_student(folder.file("student_config.json"), folder.file("student.safetensors")).eval()
    assert type(reloaded) is MediaSparseFormer and reloaded.config.video == video.config.video
    with torch.no_grad():
        torch.testing.assert_close(reloaded(clips), video.eval()(clips), rtol=0, atol=0)
    export_timm(video, tmp_path / "timm")  # reloads with timm.create_model("local-dir:...") and compares
    export_openclip(video, teacher, tmp_path / "openclip")  # encode_image of clips, the teacher's text tower
    with pytest.raises(ValueError, match=r"takes clips \[B, T, 3, H, W\].*pass clips.transpose\(1, 2\)"):
        video(clips.transpose(1, 2))
    pytest.importorskip("transformers")
    from students.transformers_model import StudentVisionModel

    with pytest.raises(ValueError, match="is not an image student .* forward_tokens\\(clips"):
        StudentVisionModel.from_student(video)


def test_a_runs_image_student_is_the_starting_point(teacher, tmp_path):
    from bootstrap.config import RecipeError, load_recipe
    from bootstrap.resolve import with_image_student
    from students.run_folder import RunFolder

    image = _perturbed(bootstrap_student(teacher, **STUDENT)[0])
    folder = RunFolder(tmp_path / "image_run")
    folder.path.mkdir()
    folder.write_student(image, image.state_dict())
    folder.write_recipe(yaml.safe_dump({"teacher": TEACHER}))
    recipe = load_recipe(base=copy.deepcopy(RECIPE), overrides=["data.train=x", f"student.video.image_student="
                                                                 f"{folder.path}"])
    weights_file = with_image_student(recipe).student.video.image_student
    assert weights_file == str(folder.file("student.safetensors").resolve())
    video, _ = bootstrap_student(teacher, **STUDENT, video={"frames": 4, "image_student": weights_file})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(video.eval()(x[:, None]), image(x), rtol=0, atol=2e-5)
    other = {**TEACHER, "model": "another-clip"}
    folder.write_recipe(yaml.safe_dump({"teacher": other}))
    with pytest.raises(RecipeError, match="image_student: the run .* learned from teacher openclip:another-clip"):
        with_image_student(recipe)
    with pytest.raises(RecipeError, match="image_student: .* is not a finished bootstrapping run"):
        with_image_student(load_recipe(base=copy.deepcopy(RECIPE), overrides=[
            "data.train=x", f"student.video.image_student={tmp_path}"]))
    with pytest.raises(ValueError, match="image_student: .* does not fit SparseFormer: that image student was built "
                                         "with other student options"):
        bootstrap_student(teacher, **{**STUDENT, "tokens": 9}, video={"image_student": weights_file})



def _image_recipe(tmp_path: Path, name: str = "image.yaml", **changes) -> Path:
    """RECIPE as an image recipe (no student.video) on demo images, with ``changes`` to its sections."""
    from data.demo import make_demo_dataset

    images = tmp_path / "images"
    if not images.exists():
        make_demo_dataset(images, num=12, size=32, val_fraction=1 / 4, shard_size=6)
    recipe = copy.deepcopy(RECIPE)
    recipe["student"].pop("video")
    recipe["data"].update(train=str(images / "train"), val=str(images / "val"), heldout_samples=3)
    recipe["eval"]["data"] = str(images / "val")
    recipe["run"]["output_dir"] = str(tmp_path / "image_run")
    for section, values in changes.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("changes,message", [
    (None, r"image_student: recipe .*nope.yaml does not exist \(give a recipe file"),
    ({"student": {"video": {"frames": 4}}}, r"image_student: .*image.yaml makes a video student \(student.video\)"),
    ({"student": {"conv_dim": 8}}, r"image_student: .*image.yaml builds another student: student.conv_dim \(8 there, "
                                   r"16 here\); add student.conv_dim=16 after the recipe"),
    ({"teacher": {**TEACHER, "model": "another-clip"}}, r"image.yaml learns from another teacher than this recipe"),
    ({"run": {"mixed_precision": "bf16"}}, r"image.yaml has run.mixed_precision=bf16 and this recipe no: one process "),
    ({"run": {"output_dir": "SAME"}}, r"image.yaml writes to .*video_run, this run's folder: add run.output_dir="),
])
def test_an_image_recipe_that_does_not_fit_is_one_line_before_anything_trains(tmp_path, changes, message):
    from bootstrap.config import RecipeError, load_recipe
    from bootstrap.image_stage import image_stage

    if changes is None:
        spec = str(tmp_path / "nope.yaml")
    else:
        if changes.get("run", {}).get("output_dir") == "SAME":
            changes = {"run": {"output_dir": str(tmp_path / "video_run")}}
        spec = str(_image_recipe(tmp_path, **changes))
    recipe = load_recipe(base=copy.deepcopy(RECIPE), overrides=[
        "data.train=x", f"run.output_dir={tmp_path / 'video_run'}", f"student.video.image_student={spec}"])
    with pytest.raises(RecipeError, match=message) as info:
        image_stage(recipe)
    assert "\n" not in str(info.value)


def test_a_run_started_without_bootstrap_run_names_the_image_recipe_it_cannot_train(tmp_path):
    from bootstrap.config import RecipeError, load_recipe
    from bootstrap.resolve import with_image_student

    recipe = load_recipe(base=copy.deepcopy(RECIPE), overrides=[
        "data.train=x", f"student.video.image_student={_image_recipe(tmp_path)} optim.steps=3"])
    with pytest.raises(RecipeError, match=r"image_student='.*image.yaml optim.steps=3' names a recipe, which "
                                          r"bootstrap/run.py trains first .* give the finished image run's folder$"):
        with_image_student(recipe)


@pytest.mark.slow
def test_an_image_recipe_is_trained_first_and_its_student_inflated(recipe_file, tmp_path, capsys):
    """student.video.image_student naming a recipe (with overrides): one command trains that image run, then the
    video run from its student; the same command again finds the image run finished and leaves it alone."""
    from students.sparseformer.video import load_image_student

    image_yaml = _image_recipe(tmp_path, run={"output_dir": str(tmp_path / "elsewhere")})
    spec = f"student.video.image_student={image_yaml} run.output_dir={tmp_path / 'image_run'} optim.steps=4"
    assert run_here(recipe_file, tmp_path / "video", spec, "optim.steps=2") == 0
    out = capsys.readouterr().out
    assert f"training the image student first ({image_yaml} run.output_dir={tmp_path / 'image_run'}" in out
    image_run = tmp_path / "image_run"
    assert json.loads((image_run / "train_summary.json").read_text())["steps"] == 4  # the override applied
    assert not (tmp_path / "elsewhere").exists()
    recipe = yaml.safe_load((tmp_path / "video" / "recipe.yaml").read_text())
    assert recipe["student"]["video"]["image_student"] == str((image_run / "student.safetensors").resolve())
    # The video run started from that image student: loading it into the same construction works as the run did.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomTeacherWarning)
        image = bootstrap_student(create_teacher(copy.deepcopy(TEACHER)), **STUDENT)[0]
    load_image_student(image, recipe["student"]["video"]["image_student"])

    stamp = (image_run / "student.safetensors").stat().st_mtime_ns
    assert run_here(recipe_file, tmp_path / "video2", spec, "optim.steps=2") == 0
    assert f"the image student is the finished run {image_run}" in capsys.readouterr().out
    assert (image_run / "student.safetensors").stat().st_mtime_ns == stamp


def test_a_teacher_with_rotary_positions_has_no_video_student():
    from test_rope_teachers import _teacher

    with pytest.raises(ValueError, match=r"MediaSparseFormer cannot hold rotary position embeddings .* or drop "
                                         r"student.video$") as info:
        bootstrap_student(_teacher("timm:tiny_dinov3"), **{**STUDENT, "focus_width": 48}, video={"frames": 4})
    assert "\n" not in str(info.value)

# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides,message", [
    (["student.kind=sparsifiner", "student.video={frames: 8}"],
     r"^recipe key 'student.video': sparsifiner students take images only .*set student.kind=sparseformer"),
    (["student.kind=budget", "student.video={frames: 8}"],
     r"^recipe key 'student.video': budget students take images only .*set student.kind=sparseformer"),
    (["student.video.frames=0"], r"video.frames must be an integer >= 1, got 0"),
    (["student.video.replicates=9"], r"video.replicates=9 .* use replicates <= frames"),
    (["student.video.sampling=tsn"], r"student.video.sampling' must be one of segments, stride, got 'tsn'"),
    (["student.video.frame=8"], r"unknown recipe key 'student.video.frame'. Did you mean 'student.video.frames'"),
    (["data.video_backend=ffmpeg"], r"data.video_backend' must be one of auto, pyav, torchcodec"),
    (["data.target_views=0"], r"data.target_views must be at least 1 or null \(one per epoch\), got 0"),
    (["demo={video: {frames: 8}}", "student.video=null"], r"demo.video makes demo videos, but the student takes "),
    # Video runs always have a teacher; loss.label_weight (zero-shot logits) is not objective.labels (the head).
    (["teacher={}", "objective.align=0", "objective.labels=1"],
     r"^the recipe has no teacher, but a video student \(student.video\) learns from its teacher's frames"),
    (["student.init=scratch"], r"^student.init=scratch: a video student is its teacher's image student inflated"),
    (["teacher={}", "student.video=null", "loss.label_weight=1", "objective.align=0", "objective.labels=1"],
     r"^loss.label_weight=1.0 learns the labels through the teacher's zero-shot classifier, and the recipe has no "),
    (["loss.label_weight=1", "objective.labels=1", "objective.mixup=0.8"],
     r"^Mixup/CutMix mix the labels, and loss.label_weight's zero-shot term takes one class a sample"),
])
def test_bad_video_recipes_are_one_line(overrides, message):
    from bootstrap.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(base=copy.deepcopy(RECIPE), overrides=["data.train=x", *overrides])
    assert "\n" not in str(info.value)


def test_data_that_does_not_fit_the_student_is_named_before_the_teacher_is_built(videos, tmp_path):
    from bootstrap.config import RecipeError, load_recipe
    from bootstrap.launch import check_data
    from data.demo import make_demo_dataset

    make_demo_dataset(tmp_path / "images", num=12, size=32, shard_size=6)
    cases = [
        ([f"data.train={tmp_path / 'images' / 'train'}"], r"data.train: .* holds images .* the student takes clips: "
                                                          r"give video shards"),
        ([f"data.train={videos / 'train'}", "student.video=null"], r"data.train: .* holds videos .* make it a video "
                                                                   r"student \(student.video"),
        ([f"data.train={videos / 'train'}", "student.video.frames=12"], r"data.train: a clip of 12 frames .* needs 12 "
                                                                        r"frames but the longest video .* has 8"),
    ]
    for overrides, message in cases:
        with pytest.raises(RecipeError, match=message):
            check_data(load_recipe(base=copy.deepcopy(RECIPE), overrides=overrides))


# ----------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def straight_run(recipe_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run_here(recipe_file, out) == 0
    return out


@pytest.mark.slow
def test_the_run_trains_a_video_student_and_resumes_exactly(straight_run, recipe_file, tmp_path):
    student = load_student(straight_run / "student_config.json", straight_run / "student.safetensors")
    assert type(student) is MediaSparseFormer and student.config.video.frames == 4
    summary = json.loads((straight_run / "train_summary.json").read_text())
    assert summary["heldout_end"]["cosine"] > summary["heldout_start"]["cosine"]
    out = tmp_path / "run"
    assert run_here(recipe_file, out, "run.stop_after=3") == 0
    assert run_here(recipe_file, out) == 0
    assert_same_weights(weights(out), weights(straight_run))


def test_clips_are_the_same_at_the_same_position(recipe_file):
    """Frames, crop and flip of a batch are a function of (seed, epoch, rank, batch): a resumed run sees them again."""
    from bootstrap.batches import TrainBatches
    from bootstrap.checkpoint import TrainState
    from bootstrap.config import load_recipe

    recipe = load_recipe(recipe_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomTeacherWarning)
        transform = recipe.train_transform(create_teacher(copy.deepcopy(TEACHER)))
    seen = []
    for _ in range(2):
        loader = recipe.media.train_loader(recipe.data.train, transform, 4, 0, shuffle_buffer=8, seed=0, rank=0,
                                           world_size=1)
        batches = TrainBatches(loader, TrainState(), seed=0, rank=0)
        seen.append([batches.next() for _ in range(3)])
    for (a, ea), (b, eb) in zip(*seen):
        assert torch.equal(a, b) and torch.equal(ea["frames"], eb["frames"]) and ea["__key__"] == eb["__key__"]
    frames = torch.cat([e["frames"] for _, e in seen[0]])
    assert len({tuple(f) for f in frames.tolist()}) > 1  # clips are drawn, not fixed


@pytest.mark.slow
def test_two_processes_train_one_video_student(recipe_file, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "bootstrap/run.py", str(recipe_file), f"run.output_dir={out}", "optim.steps=3", "run.eval_every=3",
           "run.checkpoint_every=3", "data.batch_size=2"]
    result = run_subprocess(cmd, {"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 4
    assert len(set(summary["rank_checksums"])) == 1


@pytest.mark.slow
def test_two_processes_train_the_image_stage_then_the_video_student(recipe_file, tmp_path):
    image_yaml = _image_recipe(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "bootstrap/run.py", str(recipe_file), f"run.output_dir={out}", "optim.steps=3", "run.eval_every=3",
           "run.checkpoint_every=3", "data.batch_size=2", f"student.video.image_student={image_yaml} optim.steps=3 "
           f"data.batch_size=2 run.eval_every=3 run.checkpoint_every=3"]
    result = run_subprocess(cmd, {"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("training the image student first") == 1  # said once, by the main process
    image = json.loads((tmp_path / "image_run" / "train_summary.json").read_text())
    video = json.loads((out / "train_summary.json").read_text())
    for summary in (image, video):
        assert summary["processes"] == 2 and summary["global_batch"] == 4 and len(set(summary["rank_checksums"])) == 1
    assert result.stdout.count("image stage done in") == 1


def test_cached_video_targets_replay_the_teachers_clips(recipe_file, tmp_path):
    """The caching pass stores each view's frames, crop and flip; rendering them again and embedding the clip with
    the teacher over frames gives the stored target (float32 storage: to rounding), and a run trains on them."""
    from bootstrap.cache_targets import cache_targets
    from bootstrap.config import load_recipe
    from data.shards import iter_shard, resolve_shards
    from data.targets import TARGET_SHARD, open_targets, read_manifest

    recipe = load_recipe(recipe_file)
    out = tmp_path / "targets"
    manifest = cache_targets(recipe, 2, out, dtype="float32", tokens=True, progress=False)
    assert manifest["complete"] and manifest["augment"]["sampling"]["frames"] == 4
    assert manifest["tokens_shape"] == [4, 17, 64]  # per frame
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomTeacherWarning)
        torch.manual_seed(recipe.run.seed)
        teacher = create_teacher(copy.deepcopy(TEACHER))
    transform, media = recipe.train_transform(teacher), recipe.media
    store = open_targets(out, read_manifest(out), resolve_shards(recipe.data.train))
    url = store.image_urls[0]
    checked = 0
    for raw in store.iter_shard(url):
        cached = store.decode(raw)
        clips = torch.stack(media.replay(raw, transform, cached["views"]))
        assert [len(v["frames"]) for v in cached["views"]] == [4, 4]
        out_teacher = VideoTeacher(teacher).targets(clips, ["embedding", "tokens"])
        torch.testing.assert_close(cached["embed"], out_teacher["embedding"], rtol=0, atol=1e-5)
        torch.testing.assert_close(cached["tokens"], out_teacher["tokens"], rtol=0, atol=1e-5)
        checked += 1
    assert checked == 6 and (out / (TARGET_SHARD % 0)).is_file()
    run = tmp_path / "run"
    assert run_here(recipe_file, run, f"data.targets={out}", "optim.steps=2") == 0
    assert (run / "student.safetensors").is_file()


def test_auto_targets_cache_the_views_a_recipe_asks_for(recipe_file, tmp_path, monkeypatch):
    """data.target_views: fewer views than epochs, chosen (no warning about repeated views)."""
    monkeypatch.setenv("SPARSEFORMER_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert run_here(recipe_file, tmp_path / "run", "data.targets=auto", "data.target_views=1", "optim.steps=8") == 0
    (folder,) = (tmp_path / "cache" / "targets").iterdir()
    assert json.loads((folder / "targets.json").read_text())["views"] == 1


# ----------------------------------------------------------------------------- the supervised term


def test_the_label_term_is_cross_entropy_of_the_zero_shot_logits(teacher, recipe_file):
    """loss.label_weight: the teacher's zero-shot classifier of data.train's class names and prompts, the
    evaluation's logits (scale 100), labels of -1 left out; a batch without labels gives 0, not NaN."""
    import torch.nn.functional as F

    from bootstrap.config import load_recipe
    from bootstrap.labels import label_term, training_classes, with_label_term
    from eval.zeroshot import zero_shot_classifier
    from students.family import Phase

    recipe = load_recipe(recipe_file, ["loss.label_weight=0.5"])
    classnames, templates = training_classes(recipe)
    assert classnames[-2:] == list(MOTION_ONLY_CLASSES) and len(templates) == 5  # the demo's dataset.json
    term = label_term(recipe, teacher, "cpu")
    assert term.name == "labels" and term.weight == 0.5 and term.needs == ("labels",)
    classifier = zero_shot_classifier(teacher, classnames, templates)
    embedding = torch.randn(4, 32, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([9, 8, -1, 0])
    expected = F.cross_entropy(100 * F.normalize(embedding[[0, 1, 3]], dim=-1) @ classifier, labels[[0, 1, 3]])
    torch.testing.assert_close(term.fn({"embedding": embedding}, {"labels": labels}), expected, rtol=1e-6, atol=1e-6)
    assert term.fn({"embedding": embedding}, {"labels": torch.full((4,), -1)}).item() == 0
    align = Phase("align", 6, 1e-3, 0.0, 1, ("embedding",), ())
    tokens = Phase("tokens", 6, 1e-3, 0.0, 1, ("tokens",), ())
    assert [p.terms for p in with_label_term([align, tokens], term)] == [(term,), ()]
    assert label_term(load_recipe(recipe_file), teacher, "cpu") is None


@pytest.mark.slow
def test_the_run_learns_the_labels_with_its_alignment(recipe_file, straight_run, tmp_path):
    out = tmp_path / "run"
    assert run_here(recipe_file, out, "loss.label_weight=1") == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    labels = [row["train/labels"] for row in logged if "train/labels" in row]
    assert labels and all(value > 0 for value in labels)
    assert not all(torch.equal(a, b) for a, b in zip(weights(out).values(), weights(straight_run).values()))


def test_labels_need_labelled_shards_and_a_teacher_with_a_text_tower(recipe_file, tmp_path):
    from bootstrap.config import RecipeError, load_recipe
    from bootstrap.labels import label_term
    from bootstrap.launch import check_data

    with pytest.raises(RecipeError, match=r"loss.label_weight must be a finite number >= 0 .* got -1"):
        load_recipe(recipe_file, ["loss.label_weight=-1"])
    recipe = load_recipe(recipe_file, ["loss.label_weight=1"])
    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    for shard in Path(recipe.data.train).glob("*.tar"):
        (unnamed / shard.name).write_bytes(shard.read_bytes())
    with pytest.raises(RecipeError, match=r"^loss.label_weight=1.0 needs labelled shards, but data.train's folders .* "
                                          r"name no classes .* or set loss.label_weight=0$") as info:
        check_data(load_recipe(recipe_file, ["loss.label_weight=1", f"data.train={unnamed}"]))
    assert "\n" not in str(info.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomTeacherWarning)
        timm_teacher = create_teacher({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
                                       "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32,
                                                        "num_heads": 2, "num_classes": 10}})
    with pytest.raises(RecipeError, match=r"teacher timm:vit_tiny_patch16_224 has no text tower; use a CLIP or "
                                          r"SigLIP teacher, or set loss.label_weight=0"):
        label_term(recipe, timm_teacher, "cpu")


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_holds_a_video_student_against_the_teacher_over_frames(straight_run, videos, tmp_path):
    from eval import evaluate_run

    report = evaluate_run(straight_run, out_dir=tmp_path / "report", progress=False, clips=2,
                          train_data=str(videos / "train"))
    assert report["media"]["kind"] == "video" and report["eval_set"]["views_per_video"] == 2
    probe = report["linear_probe"]  # on clip features, the train split's 24 videos
    assert {"teacher", "student"} <= set(probe) and report["fidelity"]["cosine"] > -1
    assert report["eval_set"]["num_images"] == 8 and report["eval_set"]["num_classes"] == 10
    z = report["zero_shot"]
    assert z["num_templates"] == 5 and z["num_classes"] == 10  # the demo's prompts, from the shards' dataset.json
    r = report["retrieval"]
    assert set(r["teacher"]["text_to_video"]) == {"R@1", "R@5", "R@10"} and r["teacher"]["chance"]["R@1"] == 1 / 8
    cost = report["cost"]
    assert cost["teacher"]["frames"] == 4 and cost["teacher"]["gflops_per_video"] == 2 * cost["teacher"]["gflops"]
    assert cost["student"]["gflops"] < cost["teacher"]["gflops"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Text <-> video retrieval" in text and "GFLOPs per clip of 4 frames" in text and "8 videos" in text
    from data.demo import make_demo_dataset

    make_demo_dataset(tmp_path / "images", num=12, size=32, shard_size=6)
    with pytest.raises(ValueError, match=r"holds images .* the student takes clips: give video shards"):
        evaluate_run(straight_run, eval_source=str(tmp_path / "images" / "val"), out_dir=tmp_path / "r2",
                     progress=False)


def test_video_baselines_are_the_teacher_made_cheaper_within_the_students_budget(teacher):
    from eval.baselines.video import ReducedTeacher, budget_baselines, even_frames
    from eval.cost import count_flops

    clips = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    reference = VideoTeacher(teacher).embed(clips)
    torch.testing.assert_close(ReducedTeacher(teacher, frames=4).embed(clips), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(ReducedTeacher(teacher, keep=16).embed(clips), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(ReducedTeacher(teacher, frames=2).embed(clips),
                               VideoTeacher(teacher).embed(clips[:, even_frames(4, 2)]), rtol=0, atol=1e-6)
    assert even_frames(8, 2) == [2, 6] and even_frames(8, 8) == list(range(8))
    student, _ = bootstrap_student(teacher, **{**STUDENT, "tokens": 3}, video={"frames": 4})
    (fewer, dropped), _ = budget_baselines(teacher, student, 4, (32, 32))
    budget = count_flops(student, clips[:1])
    assert count_flops(dropped, clips[:1]) <= budget < count_flops(ReducedTeacher(teacher, keep=dropped.keep + 1),
                                                                     clips[:1])
    assert fewer.frames >= 1 and dropped.keep < teacher.num_patches


@pytest.mark.slow
def test_compare_adds_the_video_baselines(straight_run, tmp_path):
    from eval.compare import CompareError, compare_runs

    report = compare_runs([straight_run], out_dir=tmp_path / "compare", progress=False, link=False)
    kinds = {name: m["kind"] for name, m in report["models"].items()}
    assert sorted(kinds.values()) == ["baseline", "baseline", "student", "teacher"]
    assert all("text_r1" in row for row in report["table"])
    assert "Baselines: the teacher on fewer frames" in (tmp_path / "compare" / "compare.md").read_text()
    assert "Budget baselines" not in (tmp_path / "compare" / "compare.md").read_text()
    with pytest.raises(CompareError, match="--tome merges the tokens of images"):
        compare_runs([straight_run], tome=[2], out_dir=tmp_path / "c2", progress=False, link=False)
    with pytest.raises(CompareError, match="^--budget runs the teacher on images .* drop --budget$"):
        compare_runs([straight_run], budgets=[4], out_dir=tmp_path / "c3", progress=False, link=False)


# ----------------------------------------------------------------------------- the demo's data


def test_demo_videos_move_and_two_classes_differ_only_by_direction():
    left_index = 8  # classes cycle with the index: 8 is "heart moving left", 9 "heart moving right"
    left, attrs = render_video(left_index, size=32, frames=6)
    assert attrs["classname"] == MOTION_ONLY_CLASSES[0] and attrs["direction"] == "left"
    assert len(left) == 6 and left[0].tobytes() != left[-1].tobytes()
    right, attrs = render_video(left_index + 1, size=32, frames=6)
    assert attrs["classname"] == MOTION_ONLY_CLASSES[1] and "moving right" in attrs["caption"]
    again, _ = render_video(left_index, size=32, frames=6)
    assert [f.tobytes() for f in again] == [f.tobytes() for f in left]  # deterministic
    media = VideoMedia(ClipSampling(4))
    assert media.example(2, (32, 32)).shape == (2, 4, 3, 32, 32)


@pytest.mark.slow
def test_the_video_demo_bootstraps_from_the_image_demos_teacher(tmp_path, capsys):
    """recipes/demo_video.yaml in miniature: the image demo's data and teacher, its image stage (recipes/demo.yaml
    with this student, trained first), the demo videos, the run from the inflated image student, the report
    (zero-shot of teacher and student, printed) and the export."""
    import shlex

    cache = tmp_path / "cache"
    student = ("{tokens: 5, drop_blocks: 1, finetune_blocks: 1, focus_width: 16, focus_repeats: 1, num_points: 4, "
               "pg_inner_dim: 16, conv_dim: 8}")
    demo = ["demo.num_images=48", "demo.image_size=32", f"demo.cache_dir={cache}",
            "demo.teacher={width: 32, layers: 2, heads: 2, patch_size: 8, embed_dim: 16, text_width: 16, "
            "text_layers: 1, text_heads: 1, steps: 4, batch_size: 8, min_zero_shot: 0}"]
    small = ["data.batch_size=4", "data.heldout_samples=5", "optim.steps=2", "optim.warmup_steps=1",
             "run.progress=false", "run.eval_every=2", "eval.batch_size=5", "eval.cost_batch_size=2",
             "eval.cost_iters=1"]
    image_stage = shlex.join([str(ROOT / "recipes" / "demo.yaml"), *demo, f"student={student}", *small,
                              f"run.output_dir={tmp_path / 'image'}", "export.enabled=false"])
    tiny = [*demo, "demo.video={num_videos: 20, frames: 6}",
            f"student={student[:-1]}, video: {{frames: 4, image_student: {json.dumps(image_stage)}}}}}", *small]
    assert run_here(ROOT / "recipes" / "demo_video.yaml", tmp_path / "run", *tiny) == 0
    out, err = capsys.readouterr()
    assert "training the demo teacher" in out and "making the demo videos (20 videos of 6 frames of 32 px)" in out
    assert "demo teacher:" not in out + err and "demo videos:" not in out + err  # run.progress=false: no bars
    assert out.index("training the image student first") < out.index("making the demo videos")
    assert "held-out: start cosine" in out and "zero-shot top-1: teacher" in out and "GFLOPs per clip" in out
    recipe = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert "demo-videos" in recipe["data"]["train"] and "demo-teacher" in recipe["teacher"]["pretrained"]
    assert recipe["student"]["video"]["image_student"] == str((tmp_path / "image" / "student.safetensors").resolve())
    image_recipe = yaml.safe_load((tmp_path / "image" / "recipe.yaml").read_text())
    assert image_recipe["teacher"] == recipe["teacher"] and "demo-data" in image_recipe["data"]["train"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["zero_shot"]["num_classes"] == 10 and report["eval_set"]["num_images"] == 5
    assert (tmp_path / "run" / "export_openclip" / "open_clip_config.json").is_file()

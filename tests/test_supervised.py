"""Training with labels: the loss terms, Mixup/CutMix targets, layer-wise lr decay, the labelled data's checks,
how a student starts, runs with labels alone and beside a teacher (distillation, alignment), resuming mid-epoch
with the EMA bit-identical, fine-tuning a run, and the evaluation of supervised students (raw and EMA, beside
the teacher and the bootstrapped students of one teacher)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from bootstrap.config import RecipeError, load_recipe
from labelled import run_here, write_labelled_shards

# A v1-like SparseFormer small enough for the CPU: a focusing unit (twice) and a sampling unit over 4 tokens.
TINY_V1 = {"conv_dim": 8, "num_latent_tokens": 4, "num_sampling_points": 4, "width_configs": [32, 32, 32],
           "repeats": [2, 1, 1], "ops_list": [["ATTN", "ROI_ADJ", "SAMPLING_M", "MLP"]] * 2 + [["ATTN", "MLP"]],
           "head_op": "avg", "proj_dim": 1000, "drop_path_rate": 0.1,
           "compatible_config": {"type_num_attn_heads": 2, "head_dim": 16, "type_op_adjust": 1, "mixing_bias": True,
                                 "transition_ln": True, "ln_eps": 1e-6, "use_stage_embedding": False,
                                 "restrict_grad_norm": True, "imagenet_code_norms": True}}
SUPERVISED_TEACHER = {"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
                      "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2,
                                       "num_classes": 10}}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from data.demo import make_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(out, num=72, size=32, val_fraction=1 / 6, shard_size=20)  # 60 train (10 classes), 12 val
    return out


def supervised_recipe(demo_data: Path, **sections) -> dict:
    """Labels alone, no teacher: the tiny v1 from scratch with RandAugment, random erasing, Mixup/CutMix, EMA."""
    recipe = {
        "student": {"init": "scratch", "config": TINY_V1, "image_size": 32},
        "objective": {"align": 0, "labels": 1, "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0},
        "data": {"train": str(demo_data / "train"), "val": str(demo_data / "val"), "batch_size": 6, "num_workers": 0,
                 "shuffle_buffer": 10, "heldout_samples": 12,
                 "augment": {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}},
        "optim": {"lr": 2e-3, "warmup_lr": 1e-5, "min_lr": 1e-5, "schedule": "timm_cosine", "epochs": 1,
                  "warmup_epochs": 0.2, "ema_decay": 0.9, "grad_clip": 5.0},
        "run": {"log_every": 2, "eval_every": 5, "checkpoint_every": 5, "keep_checkpoints": 2, "progress": False,
                "final_report": False},
        "export": {"enabled": False},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- loss terms and batch transforms


def test_label_loss_is_timm_s_label_smoothing_and_soft_target_cross_entropy():
    from students.losses import label_loss

    logits, labels = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    log_p = F.log_softmax(logits, dim=-1)
    smoothed = (0.9 * -log_p.gather(1, labels[:, None])[:, 0] + 0.1 * -log_p.mean(-1)).mean()
    torch.testing.assert_close(label_loss(logits, labels, 0.1), smoothed)
    torch.testing.assert_close(label_loss(logits, labels, 0.0), F.cross_entropy(logits, labels))
    soft = torch.softmax(torch.randn(5, 7), dim=-1)
    torch.testing.assert_close(label_loss(logits, soft, 0.1), (-soft * log_p).sum(-1).mean())


def test_distillation_is_the_kl_to_the_teacher_s_logits_at_a_temperature():
    from students.losses import distill_term
    from teachers import create_teacher

    teacher = create_teacher(SUPERVISED_TEACHER)
    term = distill_term(teacher, weight=0.5, temperature=2.0)
    assert term.needs == ("embedding",) and term.reads == ("logits",) and term.weight == 0.5
    embedding, student = torch.randn(4, 32), torch.randn(4, 10)
    teacher_logits = teacher.model.head(embedding)
    t, s = F.softmax(teacher_logits / 2, -1), F.log_softmax(student / 2, -1)
    expected = (t * (t.log() - s)).sum(-1).mean() * 4
    torch.testing.assert_close(term.fn({"logits": student}, {"embedding": embedding}), expected)
    clip = create_teacher({"kind": "openclip", "model": "tiny", "pretrained": None, "model_cfg": {
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 1, "layers": 1}}})
    with pytest.raises(ValueError, match="distillation needs a supervised teacher with a classifier head"):
        distill_term(clip)


def test_the_objective_makes_the_terms_and_what_they_read():
    from bootstrap.config import LossConfig, ObjectiveConfig
    from students.family import PhaseContext
    from students.losses import objective_outputs, objective_terms

    def terms(**o):
        return objective_terms(PhaseContext(None, None, None, LossConfig(), None, ObjectiveConfig(**o)))

    assert [t.name for t in terms()] == ["align"]
    labels = terms(align=0, labels=1, label_smoothing=0.2)
    assert [(t.name, t.needs) for t in labels] == [("labels", ("labels",))]
    assert objective_outputs(labels) == ("embedding", "logits") and objective_outputs(terms()) == ("embedding",)
    both = terms(align=0.5, labels=2)
    assert [(t.name, t.weight) for t in both] == [("align", 0.5), ("labels", 2)]


def test_mixup_and_cutmix_targets_are_timm_s_of_the_mixed_images():
    from bootstrap.config import ObjectiveConfig
    from bootstrap.stepper import batch_mixer

    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 1])
    np.random.seed(0)
    mixed, targets = batch_mixer(ObjectiveConfig(labels=1, mixup=0.8, label_smoothing=0.1), 5)(images.clone(), labels)
    lam = ((mixed - images.flip(0)) / (images - images.flip(0))).mean().item()  # Mixup: one lambda per batch
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0), rtol=1e-4, atol=1e-5)
    one_hot = torch.full((6, 5), 0.1 / 5).scatter_(1, labels[:, None], 1 - 0.1 + 0.1 / 5)
    torch.testing.assert_close(targets, lam * one_hot + (1 - lam) * one_hot.flip(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(targets.sum(-1), torch.ones(6))
    np.random.seed(1)
    cut, targets = batch_mixer(ObjectiveConfig(labels=1, cutmix=1.0, label_smoothing=0.0), 5)(images.clone(), labels)
    pasted = (cut != images).any(dim=1)[0]  # the box pasted from the flipped batch
    lam = 1 - pasted.float().mean().item()  # timm corrects lambda to the box's area
    torch.testing.assert_close(targets, lam * F.one_hot(labels, 5) + (1 - lam) * F.one_hot(labels.flip(0), 5),
                               rtol=1e-5, atol=1e-6)


def test_randaugment_random_erasing_and_colour_jitter_are_timm_s_transforms():
    """data.augment with RandAugment or random erasing is timm's create_transform: RandAugment (colour jitter dropped
    under a rand-* policy, as timm and the authors' code do), random erasing on the normalised tensor; colour jitter
    where no policy is given; without either, the replayable view."""
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from torchvision.transforms import ColorJitter

    from data.transforms import ReplayableTrainTransform, augmented_view

    def steps(augment):
        return [type(t) for t in augmented_view(32, (0.5,) * 3, (0.5,) * 3, "bicubic", augment).transforms]

    policy = steps({"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "color_jitter": 0.4})
    assert RandAugment in policy and ColorJitter not in policy and policy[-1] is RandomErasing
    jitter = steps({"re_prob": 0.25, "color_jitter": 0.4})
    assert ColorJitter in jitter and RandAugment not in jitter and jitter[-1] is RandomErasing
    assert isinstance(augmented_view(32, (0.5,) * 3, (0.5,) * 3, "bicubic", {"color_jitter": 0.4}),
                      ReplayableTrainTransform)


def test_layer_wise_lr_decay_scales_each_layer_and_keeps_the_exemptions():
    from bootstrap.stepper import TrainingForward, layer_decay_param_groups, optimizer_param_groups
    from students import SparseFormer

    student = SparseFormer(TINY_V1)
    module = TrainingForward(student, None, (), False)
    groups = layer_decay_param_groups(module, 0.05, 0.5)
    names = {id(p): n for n, p in student.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    exempt = {names[id(p)] for g in groups for p in g["params"] if g["weight_decay"] == 0}
    decay, no_decay = optimizer_param_groups(module, 0.05)
    assert exempt == {n.removeprefix("student.") for n, p in module.named_parameters()
                      if any(p is q for q in no_decay["params"])}
    # stem, then layers 0..2 (the transition is none: equal widths), then norm and head at 1
    assert scale["feat_extractor.conv1.weight"] == scale["initial_roi.weight"] == 0.5 ** 4
    assert scale["layers.0.attn.qkv.weight"] == 0.5 ** 3 and scale["layers.2.mlp.fc1.weight"] == 0.5
    assert scale["norm.weight"] == scale["proj.weight"] == 1.0


# ----------------------------------------------------------------------------- labelled data and starts


def test_labelled_shards_give_their_class_names_and_bad_labels_are_named(tmp_path):
    from data.labels import LabelError, batch_labels, shard_classnames

    pixels = np.zeros((3, 8, 8, 3), np.uint8)
    good = write_labelled_shards(tmp_path / "good", pixels, [0, 1, 1], ["a", "b"])
    assert shard_classnames(good) == ["a", "b"]
    plain = write_labelled_shards(tmp_path / "plain", pixels, [None] * 3, None)
    with pytest.raises(LabelError, match=r"data.train: .*plain/dataset.json has no 'classnames'.*make_shards"):
        shard_classnames(plain)
    other = write_labelled_shards(tmp_path / "other", pixels, [0, 1, 2], ["a", "b", "c"])
    with pytest.raises(LabelError, match="list different 'classnames'"):
        shard_classnames([f"{good}/shard-000000.tar", f"{other}/shard-000000.tar"])
    extras = {"cls": torch.tensor([0, -1]), "__key__": ["k0", "k1"], "__url__": ["u0", "u1"]}
    with pytest.raises(LabelError, match=r"sample 'k1' of shard u1 has no class \(no .cls\)"):
        batch_labels(extras, 2)
    with pytest.raises(LabelError, match=r"sample 'k1' of shard u1 has class 5, outside the 2 classes"):
        batch_labels({**extras, "cls": torch.tensor([0, 5])}, 2)


@pytest.mark.parametrize("student,message", [
    ({"init": "teacher"}, "student.init=teacher builds the student from its teacher, and the recipe has no teacher"),
    ({"init": "scratch"}, "student.init=scratch without a teacher needs the architecture"),
    ({"init": "/no/such/file.safetensors"}, r"neither teacher, scratch.*\(is it a path\?"),
    ({"init": "sparseformer_v1_tiny"}, "set student.weights to the file of its weights"),
    ({"kind": "sparsifiner", "init": "scratch"}, "a sparsifiner student cannot start from scratch"),
    ({"kind": "budget", "init": "scratch"}, "a budget student cannot start from scratch .*teacher's tower"),
    ({"init": "scratch", "config": "sparseformer_v1_tiny", "weights": "x.pth"}, "student.weights is the weights"),
    ({"init": "scratch", "config": "sparseformer_v1_tiny", "image_size": 4}, "student.image_size must be at least 8"),
])
def test_how_a_student_starts_is_checked_before_anything_is_built(student, message):
    recipe = {"student": student, "objective": {"align": 0, "labels": 1}, "data": {"train": "/data/train"}}
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, base=recipe)


def test_a_named_configuration_starts_from_its_weights_file(tmp_path):
    """student.init: a released name, with student.weights: the named architecture with that file's weights and its
    preprocessing, every parameter training; a file of another architecture is one line naming the key."""
    from students import FAMILIES
    from students.init import build_student

    family = FAMILIES["sparseformer"]
    config, pcfg = family.named("sparseformer_v1_tiny")
    model = family.new(config)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    start = build_student(family, None, family.options(init="sparseformer_v1_tiny",
                                                       weights=str(tmp_path / "w.safetensors")))
    ours, theirs = start.student.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert tuple(start.student.pretrained_cfg["input_size"]) == tuple(pcfg["input_size"])
    assert start.policy.num_frozen == 0
    save_file(family.new(TINY_V1).state_dict(), str(tmp_path / "tiny.safetensors"))
    with pytest.raises(ValueError, match=r"^student.weights=.*tiny.safetensors does not fit the sparseformer "
                                         r"architecture of the named configuration sparseformer_v1_tiny"):
        build_student(family, None, family.options(init="sparseformer_v1_tiny",
                                                   weights=str(tmp_path / "tiny.safetensors")))


@pytest.mark.parametrize("override,message", [
    ("objective.mixup=0.8", r"data.batch_size must be even, got 7"),
    ("optim.ema_decay=1.0", r"optim.ema_decay must be between 0 and 1 \(e.g. 0.9999\), got 1.0"),
    ("optim.ema_decay=0", r"optim.ema_decay must be between 0 and 1"),
    ("objective.labels=0", "the objective has no term"),
    ("objective.distill=1", "the recipe has no teacher"),
    ("optim.warmup_lr=1e-5", "optim.warmup_lr is where optim.schedule=timm_cosine's warm-up starts"),
    ("optim.warmup_epochs=2", r"optim.warmup_epochs=2.0 needs optim.epochs"),
    ("objective.label_smoothing=1", "objective.label_smoothing must be below 1"),
    ("data.augment.re_prob=2", r"data.augment.re_prob \(random erasing\) is a probability"),
    ("data.augment.auto_augment=strong", "data.augment.auto_augment must be a timm auto-augment policy"),
    ("optim.layer_decay=1.5", r"optim.layer_decay must be in \(0, 1\]"),
])
def test_bad_supervised_keys_are_one_line_naming_them(override, message):
    base = {"student": {"init": "scratch", "config": "sparseformer_v1_tiny"}, "objective": {"align": 0, "labels": 1},
            "data": {"train": "/data/train", "batch_size": 7}}
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [override], base=base)


def test_cached_targets_refuse_mixup_and_randaugment():
    base = {"teacher": SUPERVISED_TEACHER, "data": {"train": "/data/train", "targets": "auto", "batch_size": 8}}
    for override in ("objective.mixup=0.8", "data.augment.auto_augment=rand-m9-mstd0.5-inc1"):
        with pytest.raises(RecipeError, match="cached targets .* cannot follow Mixup/CutMix or RandAugment"):
            load_recipe(None, ["objective.labels=1", override], base=base)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def supervised_run(demo_data, tmp_path_factory) -> tuple[Path, Path]:
    """Labels alone, from scratch, 10 steps (one epoch of 60 images), uninterrupted: the resume reference."""
    tmp = tmp_path_factory.mktemp("supervised")
    recipe = write_recipe(tmp / "supervised.yaml", supervised_recipe(demo_data))
    out = tmp / "run"
    assert run_here(recipe, out) == 0
    return recipe, out


def test_a_run_with_labels_alone_trains_its_head_and_keeps_an_ema(supervised_run):
    recipe, run = supervised_run
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["optim"]["steps"] == 10 and saved["optim"]["warmup_steps"] == 2  # one epoch of 10 batches
    assert not saved["teacher"]
    pcfg = json.loads((run / "pretrained_cfg.json").read_text())
    assert pcfg["num_classes"] == 10 and pcfg["label_names"][0] == "circle" and pcfg["input_size"] == [3, 32, 32]
    assert json.loads((run / "student_config.json").read_text())["proj_dim"] == 10  # the data's classes
    raw, ema = load_file(str(run / "student.safetensors")), load_file(str(run / "student_ema.safetensors"))
    assert raw.keys() == ema.keys() and not all(torch.equal(raw[k], ema[k]) for k in raw)
    lines = metrics(run)
    train = [r for r in lines if "train/labels" in r]
    assert all(math.isfinite(r["train/labels"]) and "train/cosine" not in r for r in train)
    held = [r for r in lines if "heldout/top1" in r]
    assert [r["step"] for r in held] == [0, 5, 10] and all("heldout/ema_top1" in r for r in held)
    assert (run / "accuracy.png").is_file() and not (run / "alignment.png").exists()
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["heldout_end"]["top1"] == held[-1]["heldout/top1"]
    assert summary["teacher"] == {"description": "none (the run learns from labels alone)"}  # not "None:None"


def test_resuming_mid_epoch_gives_the_same_weights_and_ema(supervised_run, tmp_path):
    """RandAugment (Python's and numpy's generators), random erasing, Mixup/CutMix (numpy's), drop path (torch's)
    and the EMA: stopped at step 3 of a 10-batch epoch and resumed, the run ends bit-identical."""
    recipe, straight = supervised_run
    out = tmp_path / "run"
    assert run_here(recipe, out, "run.stop_after=3", "run.checkpoint_every=3") == 0
    assert {p.name for p in (out / "checkpoints" / "step-0000003").iterdir()} >= {"ema.safetensors"}
    assert run_here(recipe, out) == 0
    for name in ("student.safetensors", "student_ema.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(straight / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_run_that_keeps_no_ema_cannot_resume_one_that_did_and_back(supervised_run, tmp_path):
    recipe, straight = supervised_run
    with pytest.raises(RecipeError, match="optim.ema_decay"):  # another recipe: refused before anything runs
        from bootstrap.train import train

        train(load_recipe(recipe, [f"run.resume={straight / 'checkpoints' / 'step-0000010'}", "optim.ema_decay=null",
                                   f"run.output_dir={tmp_path / 'x'}"]))


def test_a_fine_tuning_source_of_another_family_is_one_line(supervised_run, demo_data, tmp_path, capsys):
    _, first = supervised_run
    recipe = supervised_recipe(demo_data)
    recipe["student"] = {"kind": "sparsifiner", "init": str(first)}
    assert run_here(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert f"student.init={first} is a run of a sparseformer student and student.kind is sparsifiner" in err
    assert len(err.splitlines()) == 1


def test_labels_outside_the_class_list_or_missing_stop_the_run_naming_shard_and_key(demo_data, tmp_path, capsys):
    pixels = np.random.default_rng(0).integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 1]  # sample 10 has a class the list does not have
    shards = write_labelled_shards(tmp_path / "bad", pixels, labels, [f"c{i}" for i in range(10)])
    recipe = write_recipe(tmp_path / "r.yaml", supervised_recipe(demo_data, data={"train": str(shards), "val": None,
                                                                                  "shuffle_buffer": 0}))
    assert run_here(recipe, tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert "error: sample '000010' of shard" in err and "has class 12, outside the 10 classes" in err
    unlabelled = write_labelled_shards(tmp_path / "plain", pixels, [None] * 12, None)
    recipe = write_recipe(tmp_path / "r2.yaml", supervised_recipe(demo_data, data={"train": str(unlabelled),
                                                                                   "val": None}))
    assert run_here(recipe, tmp_path / "run2") == 2
    err = capsys.readouterr().err
    assert "error: data.train:" in err and "has no 'classnames'" in err and len(err.strip().splitlines()) == 1


def test_a_head_of_other_classes_and_weights_of_another_shape_are_one_line(demo_data, tmp_path, capsys):
    from students import SparseFormer

    save_file(SparseFormer(TINY_V1).state_dict(), str(tmp_path / "w.safetensors"))  # a 1000-class head
    (tmp_path / "config.json").write_text(json.dumps(TINY_V1))
    recipe = supervised_recipe(demo_data, student={"init": str(tmp_path / "w.safetensors"),
                                                   "config": str(tmp_path / "config.json")})
    assert run_here(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert "the student's head predicts 1000 classes and the training data lists 10" in err
    assert len(err.splitlines()) == 1
    recipe["student"]["config_overrides"] = {"conv_dim": 16}
    assert run_here(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit the sparseformer architecture of student.config" in err and "mis-shaped" in err


def test_a_run_without_a_teacher_refuses_unlabelled_held_out_images(demo_data, tmp_path, capsys):
    """Its held-out check is the accuracy on data.val's labels alone: unlabelled val shards are one line, before
    any model is built."""
    pixels = np.zeros((4, 32, 32, 3), np.uint8)
    plain = write_labelled_shards(tmp_path / "plain_val", pixels, [None] * 4, None)
    recipe = write_recipe(tmp_path / "r.yaml", supervised_recipe(demo_data, data={"val": str(plain)}))
    assert run_here(recipe, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert "data.val:" in err and "has no 'classnames'" in err and "give labelled val shards, or leave data.val out" \
        in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_folder_without_its_preprocessing_and_no_teacher_is_one_line(supervised_run, demo_data, tmp_path,
                                                                           capsys):
    import shutil

    _, first = supervised_run
    source = tmp_path / "source"  # a finished run's folder, its pretrained_cfg.json left out
    source.mkdir()
    for name in ("student_config.json", "student.safetensors", "recipe.yaml"):
        shutil.copy(first / name, source / name)
    recipe = supervised_recipe(demo_data, optim={"epochs": 0.3, "warmup_epochs": 0})
    recipe["student"] = {"init": str(source)}
    assert run_here(write_recipe(tmp_path / "ft.yaml", recipe), tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert f"student.init={source}: the student has no preprocessing of its own" in err
    assert "write that pretrained_cfg.json, or give a teacher" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def teacher_runs(demo_data, tmp_path_factory) -> tuple[Path, Path]:
    """Two students of one supervised teacher: bootstrapped (alignment alone), and trained on labels + DeiT's soft
    distillation + alignment, its inherited head (train_head) training on the labels."""
    tmp = tmp_path_factory.mktemp("teacher_runs")
    student = {"init": "teacher", "tokens": 5, "focus_width": 16, "conv_dim": 8, "num_points": 4, "pg_inner_dim": 16,
               "focus_repeats": 2, "train_head": True}
    runs = []
    for name, objective in (("bootstrapped", {"align": 1.0, "labels": 0, "mixup": 0, "cutmix": 0}),
                            ("supervised", {"align": 1.0, "distill": 0.5, "temperature": 2.0})):
        recipe = supervised_recipe(demo_data, objective=objective, optim={"epochs": 0.5, "warmup_epochs": 0})
        recipe["student"], recipe["teacher"] = student, SUPERVISED_TEACHER
        out = tmp / name
        assert run_here(write_recipe(tmp / f"{name}.yaml", recipe), out) == 0
        runs.append(out)
    return tuple(runs)


def test_labels_with_distillation_and_alignment_beside_a_supervised_teacher(teacher_runs):
    bootstrapped, supervised = teacher_runs
    train = [r for r in metrics(supervised) if "train/loss" in r]
    assert all({"train/align", "train/labels", "train/distill", "train/cosine"} <= set(r) for r in train)
    for r in train:
        assert r["train/loss"] == pytest.approx(r["train/align"] + r["train/labels"] + 0.5 * r["train/distill"])
    teacher_head = load_file(str(supervised / "teacher_weights.safetensors"))["head.weight"]
    assert not torch.equal(load_file(str(supervised / "student.safetensors"))["proj.weight"], teacher_head)
    # Alignment alone leaves the head (before which the aligned output stops) the teacher's.
    assert torch.equal(load_file(str(bootstrapped / "student.safetensors"))["proj.weight"], teacher_head)


def test_a_run_with_a_teacher_checks_unlabelled_held_out_images_by_alignment_alone(demo_data, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    plain = write_labelled_shards(tmp_path / "plain_val", pixels, [None] * 4, None)
    recipe = supervised_recipe(demo_data, objective={"align": 1.0}, optim={"epochs": 0.2, "warmup_epochs": 0},
                               data={"val": str(plain), "heldout_samples": 4})
    recipe["student"] = {"init": "teacher", "tokens": 5, "focus_width": 16, "conv_dim": 8, "num_points": 4,
                         "pg_inner_dim": 16, "focus_repeats": 2, "train_head": True}
    recipe["teacher"] = SUPERVISED_TEACHER
    assert run_here(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "run") == 0
    held = [r for r in metrics(tmp_path / "run") if "heldout/cosine" in r]
    assert len(held) == 2 and not any("heldout/top1" in r for r in held)
    assert any("train/labels" in r for r in metrics(tmp_path / "run"))


def test_compare_puts_bootstrapped_and_supervised_students_of_one_teacher_side_by_side(teacher_runs, demo_data,
                                                                                      tmp_path):
    from eval.compare import compare_runs

    bootstrapped, supervised = teacher_runs
    report = compare_runs([bootstrapped, supervised], out_dir=tmp_path / "compare", eval_source=str(demo_data / "val"),
                          budgets=[], progress=False, num_workers=0, probe=False, cost=False, rois=False, link=False)
    rows = {r["model"]: r for r in report["table"]}
    assert set(rows) == {"teacher", str(bootstrapped), f"{bootstrapped} (EMA)", str(supervised), f"{supervised} (EMA)"}
    head = report["classification"]["models"]
    assert set(head) == set(rows) and all(0 <= head[m]["top1"] <= 1 for m in head)
    assert all(0 <= rows[m]["agreement"] <= 1 for m in rows)  # with the teacher's head
    assert "head top-1" in (tmp_path / "compare" / "compare.md").read_text()


def test_a_budget_student_trains_on_labels_and_alignment_its_head_too(demo_data, tmp_path):
    """The third family takes the recipe's objective as the others do: labels beside the alignment, the head
    (frozen for a pre-logits alignment) training on the labels."""
    recipe = supervised_recipe(demo_data, objective={"align": 1.0}, optim={"epochs": 0.2, "warmup_epochs": 0})
    recipe["student"], recipe["teacher"] = {"kind": "budget", "tokens": 4}, SUPERVISED_TEACHER
    out = tmp_path / "run"
    assert run_here(write_recipe(tmp_path / "r.yaml", recipe), out) == 0
    train = [r for r in metrics(out) if "train/loss" in r]
    assert train and all({"train/align", "train/labels"} <= set(r) for r in train)
    assert all("heldout/top1" in r for r in metrics(out) if "heldout/cosine" in r)
    teacher_head = load_file(str(out / "teacher_weights.safetensors"))["head.weight"]
    assert not torch.equal(load_file(str(out / "student.safetensors"))["head.weight"], teacher_head)


def test_budget_baselines_need_a_teacher():
    from eval.compare import CompareError, compare
    from students import SparseFormer

    with pytest.raises(CompareError, match="the budget baselines run the teacher at fewer tokens: the runs compared "
                                           "have no teacher"):
        compare({"run": SparseFormer(TINY_V1)}, None, "/nowhere", budgets=[4])


def test_fine_tuning_a_run_and_the_evaluation_of_supervised_students(supervised_run, demo_data, tmp_path):
    """A run folder as student.init (every parameter trains, the head's classes kept); `python -m eval` of a run
    with labels reports top-1/top-5 of the student and its EMA; eval.compare puts runs side by side."""
    from eval import evaluate_run
    from eval.compare import compare_runs

    _, first = supervised_run
    recipe = supervised_recipe(demo_data, student={"init": str(first)}, optim={"epochs": 0.3, "warmup_epochs": 0,
                                                                               "layer_decay": 0.7})
    recipe["student"] = {"init": str(first)}
    out = tmp_path / "finetuned"
    assert run_here(write_recipe(tmp_path / "ft.yaml", recipe), out) == 0
    before, after = load_file(str(first / "student.safetensors")), load_file(str(out / "student.safetensors"))
    assert before.keys() == after.keys() and not torch.equal(before["proj.weight"], after["proj.weight"])
    quick = dict(progress=False, num_workers=0, probe=False, cost=False, rois=False)
    report = evaluate_run(out, str(demo_data / "val"), **quick)
    c = report["classification"]
    assert report["teacher"] is None and c["teacher"] is None and c["agreement"] is None
    assert {"top1", "top5"} <= set(c["student"]) and {"top1", "top5"} <= set(c["student_ema"])
    markdown = (out / "report.md").read_text()
    assert "## Classification by the student's own head" in markdown and "| | student | student (EMA) |" in markdown
    compared = compare_runs([first, out], out_dir=tmp_path / "compare", eval_source=str(demo_data / "val"), **quick)
    rows = {r["model"]: r for r in compared["table"]}
    assert set(rows) == {str(first), f"{first} (EMA)", str(out), f"{out} (EMA)"}
    assert rows[str(out)]["top1"] == c["student"]["top1"] and rows[f"{out} (EMA)"]["top1"] == c["student_ema"]["top1"]

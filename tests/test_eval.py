"""Evaluation: teacher and student side by side on tiny models and the demo data."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from data.demo import DEMO_CLASSNAMES, make_demo_dataset
from data.evalsets import build_eval_loader
from eval import EvalConfig, count_flops, count_params, evaluate, evaluate_run, fidelity, model_cost, peak_memory
from eval.__main__ import main as cli_main
from eval.classify import classification_eval
from eval.features import extract, teacher_student_step
from eval.linear_probe import fit_probe, linear_probe
from eval.metrics import agreement, per_class_top1, topk_accuracy
from students.sparseformer.pictures import PANEL_PX, draw_rois
from eval.zeroshot import resolve_classnames, resolve_templates, zero_shot
from students.sparseformer.construct import bootstrap_student
from teachers import create_teacher

DEMO_TEACHER = Path(__file__).resolve().parent / "fixtures" / "demo_teacher"
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLIP_SPEC = {"kind": "openclip", "model": "tiny-eval-clip", "model_cfg": TINY_CLIP, "pretrained": None}
TIMM_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 64, "num_heads": 2}
STUDENT = dict(tokens=9, num_points=4, conv_dim=16, pg_inner_dim=16)
FAST = dict(num_workers=0, progress=False, cost_iters=1, cost_batch_size=2, probe_cs=[1.0, 100.0], roi_images=2)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core box: a second intra-op thread only waits for the busy core
    # (under load a 64-wide Linear takes 60x longer with 2 threads than with 1, and the linear
    # probe's BLAS 40x longer).
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def random_teacher(spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RandomTeacherWarning: random weights are the point here
        return create_teacher(spec)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(out, num=120, seed=0)  # 20 val, 100 train images
    return out


@pytest.fixture(scope="module")
def clip_pair():
    torch.manual_seed(0)
    teacher = random_teacher(CLIP_SPEC)
    student, _ = bootstrap_student(teacher, **STUDENT)
    return teacher, student.eval()


@pytest.fixture(scope="module")
def clip_report(clip_pair, demo, tmp_path_factory):
    teacher, student = clip_pair
    out = tmp_path_factory.mktemp("clip_report")
    report = evaluate(student, teacher, str(demo / "val"), out_dir=out, train_data=str(demo / "train"),
                      templates="demo", **FAST)
    return report, out


# ------------------------------------------------------------------ fidelity
def test_fidelity_identical_constant_and_noisy():
    torch.manual_seed(0)
    # Embeddings with a large shared component, as real teachers have.
    t = 3.0 + torch.randn(200, 16)
    same = fidelity(t.clone(), t)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert same["centred_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert same["retrieval_top1"] == 1.0

    mean = t.mean(0, keepdim=True).expand_as(t)
    const = fidelity(mean.clone(), t)
    assert const["cosine"] > 0.9  # plain cosine is fooled by a constant ...
    assert const["centred_cosine"] == pytest.approx(0.0, abs=1e-6)  # ... these are not
    assert const["retrieval_top1"] == pytest.approx(1 / 200) == const["retrieval_chance"]
    other = fidelity(torch.randn(1, 16).expand_as(t) + 3.0, t)  # any other constant
    assert abs(other["centred_cosine"]) < 0.1
    assert other["retrieval_top1"] <= 1 / 200

    noisy = fidelity(t + 0.5 * torch.randn_like(t), t)
    assert const["centred_cosine"] < noisy["centred_cosine"] < 1.0
    assert 0.5 < noisy["retrieval_top1"] < 1.0


def test_fidelity_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same shape"):
        fidelity(torch.zeros(4, 8), torch.zeros(4, 16))


# ------------------------------------------------------------------ metrics
def test_topk_and_agreement_exact():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    labels = torch.tensor([1, 5])
    assert topk_accuracy(logits, labels) == {"top1": 0.5, "top5": 1.0}
    assert agreement(logits, logits.flip(0)) == 0.0
    assert agreement(logits, 2 * logits) == 1.0
    with pytest.raises(ValueError, match="class names' order"):
        topk_accuracy(logits, torch.tensor([0, 6]))
    three = torch.cat([logits, logits[:1]])  # rows predict 0, 5, 0
    assert per_class_top1(three, torch.tensor([1, 5, 0])) == [1.0, 0.0, None, None, None, 1.0]


# ------------------------------------------------------------------ zero-shot
def test_zero_shot_perfect_student_equals_teacher(clip_pair, demo):
    teacher, student = clip_pair
    loader, names = build_eval_loader(str(demo / "val"), teacher.eval_transform(), 8, 0)
    # The teacher standing in for a student: the same embedding function.
    same = extract(loader, teacher_student_step(teacher, teacher), progress=False)
    result = zero_shot(same, teacher, resolve_classnames(None, names), "demo")
    assert result["teacher"] == result["student"]
    assert result["agreement"] == 1.0
    assert result["num_images"] == 20 and result["num_classes"] == len(DEMO_CLASSNAMES)

    real = extract(loader, teacher_student_step(teacher, student), progress=False)
    torch.testing.assert_close(real["teacher"], same["teacher"])  # same images, same order
    r = zero_shot(real, teacher, names, "demo")
    assert 0 <= r["student"]["top1"] <= 1 and 0 <= r["agreement"] <= 1
    assert r["teacher"] == result["teacher"]


def test_template_and_classname_choices():
    import open_clip

    assert len(resolve_templates("openai")) == 80 and len(resolve_templates("simple")) == 7
    assert resolve_templates("demo")[0].format("star") == "a photo of a star."
    with pytest.raises(ValueError, match="openai, simple, demo"):
        resolve_templates("imagenet")
    wnids = [f"n{i:08d}" for i in range(1000)]
    assert resolve_classnames(None, wnids) == list(open_clip.IMAGENET_CLASSNAMES)
    assert resolve_classnames(None, ["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="3 class names given"):
        resolve_classnames(["x", "y", "z"], ["a", "b"])


# ------------------------------------------------------------------ linear probe
def test_linear_probe_on_separable_features_chooses_c_on_held_out_part():
    torch.manual_seed(0)
    centres = torch.randn(5, 12)
    y = torch.arange(150) % 5
    x = centres[y] + 0.3 * torch.randn(150, 12)
    r = fit_probe(x[:100], y[:100], x[100:], y[100:], Cs=[1e-3, 1.0, 100.0])
    assert r["top1"] == 1.0 and r["top5"] == 1.0
    assert set(r["val_top1"]) == {1e-3, 1.0, 100.0} and r["C"] in r["val_top1"]
    assert r["val_top1"][r["C"]] == max(r["val_top1"].values())
    assert r["num_train"] == 100 and r["num_test"] == 50


@pytest.fixture(scope="module")
def demo_teacher():
    """The demo recipe's trained teacher: its image tower from tests/fixtures/demo_teacher (made by
    make_demo_teacher.py, float16), its text tower random (the probe does not use it)."""
    info = json.loads((DEMO_TEACHER / "demo_teacher.json").read_text())
    from data.demo import DEMO_DATA_VERSION

    assert info.get("data_version") == DEMO_DATA_VERSION, (
        f"tests/fixtures/demo_teacher learnt from demo data version {info.get('data_version', 1)}, but data.demo "
        f"now renders version {DEMO_DATA_VERSION}: run python tests/fixtures/make_demo_teacher.py")
    torch.manual_seed(0)
    teacher = random_teacher({"kind": "openclip", "model": "demo-clip", "model_cfg": info["model_cfg"],
                              "pretrained": None})
    visual = load_file(str(DEMO_TEACHER / "visual.safetensors"))
    teacher.model.visual.load_state_dict({k: v.float() for k, v in visual.items()})
    return teacher


def test_linear_probe_on_teacher_features_beats_chance_on_the_demo_classes(demo_teacher, tmp_path):
    """On demo images it never saw (another seed), a probe on the demo teacher's features tells
    the 10 shape classes apart far above chance; the (untrained) student's numbers sit beside."""
    make_demo_dataset(tmp_path, num=720, seed=11, size=64, val_fraction=1 / 6)  # 600 train, 120 test
    torch.manual_seed(0)
    student, _ = bootstrap_student(demo_teacher, tokens=17, num_points=8, conv_dim=16, pg_inner_dim=32)
    step = teacher_student_step(demo_teacher, student.eval())
    feats = {}
    for split in ("train", "val"):
        loader, names = build_eval_loader(str(tmp_path / split), demo_teacher.eval_transform(), 120, 0)
        assert names == DEMO_CLASSNAMES
        feats[split] = extract(loader, step, progress=False)
    r = linear_probe(feats["train"], feats["val"], Cs=[0.1, 1.0, 10.0, 100.0])
    assert r["teacher"]["num_train"] == 600 and r["teacher"]["num_test"] == 120
    assert r["chance_top1"] == pytest.approx(0.1)
    assert r["teacher"]["top1"] > r["chance_top1"] + 0.35, r["teacher"]
    assert 0 <= r["student"]["top1"] <= 1


# ------------------------------------------------------------------ classification
class HeadOnTeacher(nn.Module):
    """A 'student' whose pre-logits feature is the teacher's and whose head is the inherited one."""

    def __init__(self, teacher, proj):
        super().__init__()
        self.teacher, self.proj = teacher, proj

    def forward_features(self, x):
        return self.teacher.embed(x)[:, None], None

    def forward_head(self, tokens, pre_logits=False):
        return tokens[:, 0] if pre_logits else self.proj(tokens[:, 0])

    def forward_outputs(self, x):  # the student contract: (pre_logits, output) of one pass
        pre = self.forward_head(self.forward_features(x)[0], pre_logits=True)
        return pre, self.proj(pre)


def test_classification_through_the_inherited_head(demo):
    torch.manual_seed(0)
    teacher = random_teacher({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
                              "model_kwargs": {**TIMM_KWARGS, "num_classes": 10}})
    student, _ = bootstrap_student(teacher, **STUDENT)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # the student's head is the teacher's classifier
        torch.testing.assert_close(student.proj(teacher.embed(x)), teacher.model(x))
    loader, _ = build_eval_loader(str(demo / "val"), teacher.eval_transform(), 8, 0)
    shared = extract(loader, teacher_student_step(teacher, HeadOnTeacher(teacher, student.proj), logits=True),
                     progress=False)
    torch.testing.assert_close(shared["student_logits"], shared["teacher_logits"], rtol=0, atol=0)
    r = classification_eval(shared)
    assert r["teacher"] == r["student"] and r["agreement"] == 1.0

    feats = extract(loader, teacher_student_step(teacher, student.eval(), logits=True), progress=False)
    r = classification_eval(feats)
    assert set(r["teacher"]) == {"top1", "top5"} and 0 <= r["agreement"] <= 1
    assert feats["student"].shape == (20, 64)  # pre-logits, aligned to the teacher's target


# ------------------------------------------------------------------ cost
def test_flops_match_analytic_counts(clip_pair):
    lin = nn.Linear(16, 32)
    assert count_flops(lin, torch.randn(4, 16)) == 2 * 4 * 16 * 32

    teacher, _ = clip_pair
    # open_clip tower (nn.MultiheadAttention) through teacher.embed, i.e. under no_grad.
    B, D, E, P = 2, teacher.width, teacher.embed_dim, teacher.patch_size[0]
    N = teacher.num_patches
    L = N + 1
    block = 2 * B * L * D * 3 * D + 2 * 2 * B * L * L * D + 2 * B * L * D * D + 2 * 2 * B * L * D * teacher.mlp_hidden_dim
    analytic = 2 * B * N * D * 3 * P * P + teacher.depth * block + 2 * B * D * E
    assert count_flops(teacher.embed, torch.randn(B, 3, 32, 32)) == analytic

    from timm.models.vision_transformer import Block

    blk = Block(64, 2).eval()  # fused scaled_dot_product_attention
    assert count_flops(blk, torch.randn(1, 10, 64)) == 2 * 10 * 64 * (3 * 64 + 64 + 2 * 4 * 64) + 2 * 2 * 10 * 10 * 64


def test_model_cost_side_by_side(clip_pair):
    teacher, student = clip_pair
    tc = model_cost(teacher.embed, teacher.model.visual, 32, batch_size=2, iters=1, warmup=0)
    sc = model_cost(student, student, 32, batch_size=2, iters=1, warmup=0)
    assert tc["params"] == sum(p.numel() for p in teacher.model.visual.parameters())
    assert tc["trainable_params"] == 0
    assert sc["params"] == count_params(student)["total"] > sc["trainable_params"] > 0
    for c in (tc, sc):
        assert c["gflops"] > 0 and c["gmacs"] == pytest.approx(c["gflops"] / 2)
        assert c["images_per_s"] > 0 and c["batch_size"] == 2


def test_peak_memory_sees_a_large_allocation():
    def allocate(x):
        return torch.ones(8 * 2**20) + x.sum()  # 32 MiB, touched

    peak = peak_memory(allocate, torch.zeros(2))
    if peak is None:
        pytest.skip("this kernel does not allow resetting the peak resident set (/proc/self/clear_refs)")
    assert peak >= 30 * 2**20


# ------------------------------------------------------------------ RoI pictures
def test_roi_png_is_written(clip_pair, tmp_path):
    teacher, student = clip_pair
    images = torch.randn(1, 3, 32, 32)
    info = draw_rois(student, images, tmp_path / "r.png", teacher.preprocess.mean, teacher.preprocess.std)
    stages = len(student.forward_details(images).points)
    assert stages == 5  # 4 focusing repeats + 1 sampling step at the teacher's width
    with Image.open(tmp_path / "r.png") as png:
        assert png.format == "PNG"
        assert png.size == (info["width"], info["height"]) == ((stages + 1) * PANEL_PX, PANEL_PX)


# ------------------------------------------------------------------ reports
def test_clip_report_side_by_side(clip_report):
    report, out = clip_report
    assert {"zero_shot", "linear_probe", "fidelity", "cost", "rois"} <= set(report)
    assert "classification" not in report
    assert json.loads((out / "report.json").read_text()) == report
    for section in ("zero_shot", "linear_probe"):
        for model in ("teacher", "student"):
            assert 0 <= report[section][model]["top1"] <= 1
    assert report["zero_shot"]["templates"] == "demo" and report["zero_shot"]["num_templates"] == 5
    assert report["linear_probe"]["split"].startswith("train:")
    assert report["linear_probe"]["teacher"]["num_train"] == 100
    assert report["eval_set"]["num_images"] == 20
    assert report["cost"]["teacher"]["gflops"] > 0 and report["cost"]["student"]["gflops"] > 0
    md = (out / "report.md").read_text()
    assert "| | teacher | student | student / teacher |" in md
    assert "## Zero-shot" in md and "## Linear probe" in md and "## Fidelity" in md and "## Cost" in md
    assert "![RoIs](rois.png)" in md
    with Image.open(out / "rois.png") as png:
        assert png.size == (6 * PANEL_PX, 2 * PANEL_PX)


def test_sections_follow_the_teacher_family(demo, tmp_path):
    torch.manual_seed(0)
    supervised = random_teacher({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
                                 "model_kwargs": {**TIMM_KWARGS, "num_classes": 10}})
    dino = random_teacher({"kind": "timm", "model": "vit_small_patch16_224.dino", "pretrained": None,
                           "model_kwargs": {**TIMM_KWARGS, "num_classes": 0}})
    quick = dict(probe=False, cost=False, rois=False, num_workers=0, progress=False)
    for teacher, present, absent in ((supervised, "classification", "zero_shot"), (dino, "fidelity", "classification")):
        student, _ = bootstrap_student(teacher, **STUDENT)
        r = evaluate(student, teacher, str(demo / "val"), out_dir=tmp_path / teacher.family, **quick)
        assert present in r and absent not in r and "zero_shot" not in r
        assert (tmp_path / teacher.family / "report.md").is_file()
    assert r["teacher"]["family"] == "dino"


def test_cost_only_without_an_eval_set(clip_pair):
    teacher, student = clip_pair
    r = evaluate(student, teacher, None, cost_iters=1, cost_batch_size=1, progress=False)
    assert "cost" in r and "zero_shot" not in r and "fidelity" not in r
    assert any("no evaluation set" in n for n in r["notes"])


def write_run(run_dir, teacher, student, eval_options):
    run_dir.mkdir()
    weights = run_dir / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.model.state_dict().items()}, str(weights))
    (run_dir / "student_config.json").write_text(student.config.to_json())
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(run_dir / "student.safetensors"))
    spec = {**CLIP_SPEC, "pretrained": str(weights)}
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"teacher": spec, "eval": eval_options}))


def test_evaluate_run_and_cli(clip_pair, clip_report, demo, tmp_path):
    teacher, student = clip_pair
    run = tmp_path / "run"
    write_run(run, teacher, student, {"data": str(demo / "val"), "probe": False, "cost": False, "num_workers": 0,
                                      "roi_images": 1})
    report = evaluate_run(run, progress=False)
    # No templates given: the demo shards' own (DEMO_TEMPLATES, what 'demo' names).
    assert report["zero_shot"]["templates"] == "the evaluation set's"
    assert report["zero_shot"]["num_templates"] == 5
    # The rebuilt teacher and the reloaded student give the numbers of the live models.
    direct, _ = clip_report
    assert report["fidelity"] == pytest.approx(direct["fidelity"], abs=1e-6)
    assert report["zero_shot"]["teacher"] == direct["zero_shot"]["teacher"]
    assert report["zero_shot"]["student"] == direct["zero_shot"]["student"]
    assert (run / "report.md").is_file() and (run / "rois.png").is_file()

    out = tmp_path / "cli"
    assert cli_main([str(run), "--out", str(out), "--no-rois", "--max-samples", "8", "--no-progress"]) == 0
    cli_report = json.loads((out / "report.json").read_text())
    assert cli_report["eval_set"]["num_images"] == 8 and "rois" not in cli_report


def test_run_with_a_random_teacher_is_refused(clip_pair, tmp_path):
    teacher, student = clip_pair
    run = tmp_path / "run"
    write_run(run, teacher, student, {})
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["teacher"]["pretrained"] = None
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="random weights"):
        evaluate_run(run, progress=False)
    (run / "student.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="student.safetensors"):
        evaluate_run(run, progress=False)


def test_eval_config_names_unknown_keys():
    with pytest.raises(ValueError, match="Did you mean 'train_data'"):
        EvalConfig.from_dict({"train_dta": "x"})
    with pytest.raises(ValueError, match="precision"):
        EvalConfig.from_dict({"precision": "fp8"})
    assert EvalConfig.from_dict({"batch_size": 8}).replace(batch_size=None, probe=False).batch_size == 8

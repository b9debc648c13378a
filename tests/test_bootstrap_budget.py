"""The third student family, the teacher at a smaller token budget fine-tuned (students.budget): built from every
teacher kind it holds, run end to end on the tiny teacher of `test_bootstrap` (a 3-block random CLIP at 32 px, 16
patches; the budget 4 patches: 16 px), resumed, evaluated and exported like any run."""

from __future__ import annotations

import json

import pytest
import torch

from test_bootstrap import assert_same_weights, demo_data, recipe_file, run_here, weights  # noqa: F401 (fixtures)
from test_budget_baselines import SPECS, _images, _teacher

BUDGET = ["student={kind: budget, tokens: 4}"]


@pytest.mark.parametrize("name", [n for n in sorted(SPECS) if n != "openclip:pe_core" and (not n.startswith("eva:")
                                                                                            or n.endswith("plain"))])
def test_at_the_full_budget_the_student_is_the_teacher_and_below_it_the_untrained_baseline(name):
    from eval.baselines.budget import LargerPatch, LowResolution
    from students import family_named

    teacher = _teacher(name)
    family = family_named("budget")
    x = _images(teacher)
    aligned = teacher.target != "proj"  # the pre-logits feature where the teacher's target stops before its head
    full, policy = family.build(teacher, family.options(tokens=teacher.num_patches))
    with torch.no_grad():
        torch.testing.assert_close(full.eval()(x, pre_logits=aligned), teacher.embed(x), rtol=0, atol=2e-6)
        for reduce, baseline in (("resolution", LowResolution), ("patch", LargerPatch)):
            student, _ = family.build(teacher, family.options(tokens=teacher.num_patches // 4, reduce=reduce))
            want = baseline(teacher, teacher.num_patches // 4)
            assert student.config.num_patches == want.num_patches
            torch.testing.assert_close(student.eval()(x, pre_logits=aligned), want.embed(x), rtol=0, atol=2e-6)
    params = dict(full.named_parameters())
    assert all(params[n].requires_grad for n in policy.trainable) and not any(params[n].requires_grad
                                                                               for n in policy.frozen)
    assert [n for n in policy.frozen] == ([n for n in params if n.startswith("head.")] if aligned else [])


def test_rotary_teachers_are_refused_in_one_line():
    from students import family_named

    family = family_named("budget")
    with pytest.raises(ValueError) as info:
        family.build(_teacher("eva:tiny_pe_core"), family.options())
    assert "a budget ViT cannot be made of teacher timm:tiny_pe_core: it has rotary position embeddings ('cat')" in \
        str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def budget_run(recipe_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget") / "run"
    assert run_here(recipe_file, out, *BUDGET) == 0
    return out


def test_the_run_fine_tunes_the_whole_tower_at_the_budget(budget_run):
    from bootstrap.config import load_recipe
    from students import load_student
    from students.budget import BudgetViT, budget_student
    from teachers import create_teacher

    student = load_student(budget_run / "student_config.json", budget_run / "student.safetensors")
    cfg = student.config
    assert isinstance(student, BudgetViT) and cfg.family == "budget"
    assert (cfg.input_hw, cfg.image_hw, cfg.patch_size, cfg.num_patches) == ((32, 32), (16, 16), 8, 4)
    assert json.loads((budget_run / "pretrained_cfg.json").read_text())["input_size"] == [3, 32, 32]
    recipe = load_recipe(budget_run / "recipe.yaml")
    torch.manual_seed(recipe.run.seed)
    fresh, _ = budget_student(create_teacher(recipe.teacher), options=recipe.student)
    start, end = fresh.state_dict(), student.state_dict()
    assert start.keys() == end.keys()
    assert all(not torch.equal(start[k], end[k]) for k in end if k.startswith(("blocks.0.", "pos_embed", "head.")))
    summary = json.loads((budget_run / "train_summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 8 and summary["parameters"]["frozen"] == 0
    records = [json.loads(line) for line in (budget_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6, 8]


def test_resume_gives_the_same_weights(budget_run, recipe_file, tmp_path):
    out = tmp_path / "run"
    assert run_here(recipe_file, out, *BUDGET, "run.stop_after=3") == 0
    assert run_here(recipe_file, out, *BUDGET) == 0
    assert_same_weights(weights(out), weights(budget_run))


def test_budget_options_are_checked_in_one_line(recipe_file, tmp_path, capsys):
    cases = {
        "student={kind: budget, tokens: 17}": "token budget 17 is larger than the 16 patch tokens of teacher "
                                              "openclip:tiny-clip; the largest valid budget is 16",
        "student={kind: budget, image_size: 20}": "the largest valid height up to 20 is 16",
        "student={kind: budget, reduce: patch, patch_size: 12}": "the largest valid patch up to 12 is 8",
        "student={kind: budget, reduce: patch, image_size: 16}": "student.image_size does not apply to reduce: patch",
        "student={kind: budget, reduce: smaller}": "'student.reduce'",
    }
    for i, (override, message) in enumerate(cases.items()):
        assert run_here(recipe_file, tmp_path / str(i), override) == 2, override
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_budget_run_is_evaluated_and_exported_like_any_run(budget_run, demo_data, tmp_path):
    import open_clip
    import timm

    import students
    import students.transformers_model as stm
    from eval.report import evaluate_run
    from students.export import export_run

    report = evaluate_run(budget_run, demo_data / "val", out_dir=tmp_path / "report", progress=False, probe=False,
                          cost_batch_size=2, cost_iters=1, templates="demo")
    assert report["student"]["family"] == "budget" and report["student"]["tokens"] == "4 patches + cls"
    assert report["fidelity"]["cosine"] > 0.9 and report["cost"]["student"]["gflops"] < report["cost"]["teacher"][
        "gflops"] / 2
    student = students.load_student(budget_run / "student_config.json", budget_run / "student.safetensors").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # OpenCLIP: encode_image is the student (resizing inside), the text tower the teacher's.
        export = export_run(budget_run, tmp_path / "openclip", verify=True)
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export}")
        torch.testing.assert_close(model.eval().encode_image(images), student(images), rtol=1e-5, atol=1e-6)
        # timm: the generic name with the config under model_args.
        export = export_run(budget_run, tmp_path / "timm", fmt="timm", verify=True)
        assert json.loads((export / "config.json").read_text())["architecture"] == "budget"
        reloaded = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
        torch.testing.assert_close(reloaded(images), student(images), rtol=1e-5, atol=1e-6)
        assert reloaded.pretrained_cfg["input_size"] == (3, 32, 32)
        # transformers: every hidden state the student selects, 4 patches + the class token.
        pretrained_cfg = json.loads((budget_run / "pretrained_cfg.json").read_text())
        vision = stm.StudentVisionModel.from_student(student, pretrained_cfg=pretrained_cfg,
                                                     teacher={"kind": "openclip", "model": "tiny-clip"})
        out = vision(images, output_hidden_states=True)
        assert vision.config.num_image_tokens == 5 and len(out.hidden_states) == 4
        for layer in (0, -2, 3):
            assert torch.equal(out.hidden_states[layer], student.forward_tokens(images, layer=layer))
        torch.testing.assert_close(out.image_embeds, student(images), rtol=0, atol=1e-5)

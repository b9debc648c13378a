"""The run with the Sparsifiner family: two phases, resume across their boundary, its checks.

Same tiny teacher and data as `test_bootstrap` (a 3-block random CLIP at 32 px: 17 tokens, a
budget of 5 keys per query at keep rate 0.25).
"""

from __future__ import annotations

import json

import pytest
import torch

from bootstrap.checkpoint import list_checkpoints, read_state
from test_bootstrap import assert_same_weights, demo_data, recipe_file, run_here, weights  # noqa: F401 (fixtures)

SPARSIFINER = ["student={kind: sparsifiner, keep_rate: 0.25, reduce_n_factor: 2, basis_coef_topk: 4, "
               "reconstruct_steps: 4, reconstruct_warmup_steps: 1, reconstruct_lr: 0.003}",
               "optim.steps=4", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def sparsifiner_run(recipe_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sparsifiner") / "run"
    assert run_here(recipe_file, out, *SPARSIFINER) == 0
    return out


def test_both_phases_run_and_each_trains_only_its_parameters(sparsifiner_run, recipe_file):
    from bootstrap.config import load_recipe
    from students import load_student, sparsify
    from teachers import create_teacher

    records = [json.loads(line) for line in (sparsifiner_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["train/phase"] for r in train] == [0, 0, 1, 1]  # log_every 2: steps 2, 4 | 6, 8
    assert all("train/reconstruct" in r for r in train[:2]) and all("train/tokens" in r for r in train[2:])
    summary = json.loads((sparsifiner_run / "train_summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 8

    # Phase 1 trains the predictors only; phase 2 the backbone, predictors frozen where phase 1 left them.
    recipe = load_recipe(sparsifiner_run / "recipe.yaml")
    teacher = create_teacher(recipe.teacher)
    student = load_student(sparsifiner_run / "student_config.json", sparsifiner_run / "student.safetensors")
    ckpt = sparsifiner_run / "checkpoints" / "step-0000004"
    from safetensors.torch import load_file

    mid = {k.removeprefix("student."): v for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    end = student.state_dict()
    torch.manual_seed(recipe.run.seed)
    fresh, _ = sparsify(teacher, **recipe.student.construction())
    start = fresh.state_dict()
    predictor = [k for k in end if ".mask_predictor." in k]
    backbone = [k for k in end if ".mask_predictor." not in k]
    assert predictor and all(torch.equal(mid[k], end[k]) for k in predictor)  # frozen in phase 2
    assert any(not torch.equal(mid[k], start[k]) for k in predictor if "proj_c" in k)  # trained in phase 1
    assert all(torch.equal(mid[k], start[k]) for k in backbone)  # untouched in phase 1
    assert any(not torch.equal(end[k], mid[k]) for k in backbone)  # trained in phase 2
    assert read_state(ckpt)["phase"] == 0


@pytest.mark.parametrize("stop", [4, 6])
def test_resume_across_the_phase_boundary_gives_the_same_weights(sparsifiner_run, recipe_file, tmp_path, stop):
    out = tmp_path / "run"
    assert run_here(recipe_file, out, *SPARSIFINER, f"run.stop_after={stop}") == 0
    assert [s for s, _ in list_checkpoints(out / "checkpoints")][-1] == stop
    assert run_here(recipe_file, out, *SPARSIFINER) == 0
    assert_same_weights(weights(out), weights(sparsifiner_run))


def test_sparsifiner_options_are_checked(recipe_file, tmp_path, capsys):
    assert run_here(recipe_file, tmp_path / "a", "student={kind: sparsifiner, keep_rate: 1.5}") == 2
    assert "keep_rate 1.5 is outside (0, 1]" in capsys.readouterr().err
    assert run_here(recipe_file, tmp_path / "b", "student={kind: sparsifiner, keep_rate: [0.5, 0.5]}") == 2
    err = capsys.readouterr().err
    assert "keep_rate has 2 rates for 3 sparsified blocks" in err and "Traceback" not in err
    assert run_here(recipe_file, tmp_path / "c", "student={kind: sparsifinr}") == 2
    assert "Did you mean 'sparsifiner'" in capsys.readouterr().err


def test_one_teacher_pass_gives_every_target():
    import warnings

    from teachers import create_teacher
    from test_bootstrap import TINY_RECIPE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = create_teacher(TINY_RECIPE["teacher"])
    images = torch.randn(2, 3, 32, 32)
    both = teacher.targets(images, ("embedding", "tokens", "attention"))
    torch.testing.assert_close(both["embedding"], teacher.embed(images), rtol=1e-5, atol=1e-6)
    assert torch.equal(both["tokens"], teacher.final_tokens(images))
    assert all(torch.equal(a, b) for a, b in zip(both["attention"], teacher.attention_maps(images)))
    assert set(teacher.targets(images, ("embedding",))) == {"embedding"}
    with pytest.raises(ValueError, match="unknown teacher targets \\['logits'\\]"):
        teacher.targets(images, ("logits",))


def test_a_sparsifiner_run_is_evaluated_and_exported_like_any_run(sparsifiner_run, demo_data, tmp_path):
    from PIL import Image

    from eval.report import evaluate_run

    out = tmp_path / "report"
    report = evaluate_run(sparsifiner_run, demo_data / "val", out_dir=out, progress=False, probe=False,
                          cost_batch_size=2, cost_iters=1, templates="demo")
    assert {"zero_shot", "fidelity", "cost", "attention_cost", "kept_keys"} <= set(report) and "rois" not in report
    assert report["student"]["family"] == "sparsifiner" and report["student"]["tokens"] == "17"
    assert report["fidelity"]["cosine"] > 0.9
    a = report["attention_cost"]
    assert len(a["blocks"]) == 3 and all(abs(b["density"] - (16 * 5 + 17) / 17 ** 2) < 1e-6 for b in a["blocks"])  # cls row dense
    assert a["masked_gmacs"] < a["executed_gmacs"]
    md = (out / "report.md").read_text()
    assert "# Evaluation: Sparsifiner student" in md and "![What the student attends to](kept_keys.png)" in md
    with Image.open(out / "kept_keys.png") as png:
        assert png.size[0] > 200
    # The OpenCLIP export of the run: encode_image is the student, the text tower the teacher's.
    import open_clip

    import students
    from students.export import export_run

    export = export_run(sparsifiner_run, tmp_path / "export", verify=True)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    student = students.load_student(sparsifiner_run / "student_config.json", sparsifiner_run / "student.safetensors")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(images), student.eval()(images), rtol=1e-5, atol=1e-6)


def test_a_head_the_aligned_output_skips_is_frozen_and_counted_so():
    """Supervised teacher, train_head: the pre-logits target leaves the head without gradient; the policy says so."""
    from students.sparseformer.construct import BootstrapOptions
    from students import family_named
    from test_teachers import SPECS, build

    teacher = build(SPECS["timm_vit"])
    student, policy = family_named("sparseformer").build(teacher, BootstrapOptions(tokens=5, focus_width=32,
                                                                                   train_head=True))
    params = dict(student.named_parameters())
    assert not any(p.requires_grad for p in student.proj.parameters())
    assert all(not params[n].requires_grad for n in policy.frozen) and all(params[n].requires_grad
                                                                           for n in policy.trainable)
    assert policy.num_trainable == sum(params[n].numel() for n in policy.trainable)
    assert policy.num_frozen == sum(params[n].numel() for n in policy.frozen)

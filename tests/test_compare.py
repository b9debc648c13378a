"""eval.compare: a teacher, its students and ToMe in one report, on tiny runs and the demo data."""

import json

import pytest
import torch
import yaml

from eval import evaluate_run
from eval.compare import CompareError, compare, compare_runs, main
from students.sparseformer.construct import bootstrap_student
from test_eval import _one_thread  # noqa: F401  (autouse: one thread for tiny models, as in test_eval)
from test_eval import CLIP_SPEC, STUDENT, TIMM_KWARGS, random_teacher, write_run

FAST_EVAL = dict(num_workers=0, probe_cs=[1.0, 100.0], cost_iters=1, cost_batch_size=2, roi_images=1, batch_size=16)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from data.demo import make_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(out, num=60, size=32, seed=0, val_fraction=1 / 3)  # 20 val, 40 train images
    return out


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory):
    """Two students of one tiny CLIP teacher (9 and 5 latent tokens), each with its own report."""
    torch.manual_seed(0)
    teacher = random_teacher(CLIP_SPEC)
    root = tmp_path_factory.mktemp("runs")
    options = {"data": str(demo / "val"), "train_data": str(demo / "train"), "rois": False, **FAST_EVAL}
    dirs = []
    for name, tokens in (("nine", 9), ("five", 5)):
        student, _ = bootstrap_student(teacher, **{**STUDENT, "tokens": tokens})
        write_run(root / name, teacher, student.eval(), options)
        evaluate_run(root / name, progress=False)
        dirs.append(root / name)
    return dirs


def test_one_report_of_teacher_students_and_tome(runs, tmp_path):
    out = tmp_path / "cmp"
    assert main([*map(str, runs), "--tome", "1,3", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "compare.json").read_text())
    # The teacher at the students' budgets (4 and 8 latent tokens of a 4 x 4 grid: the nearest grids 2 x 2 and 3 x 3;
    # a 16-px patch gives 2 x 2, the nearest for both).
    baselines = ["teacher at 16px", "teacher patch 16", "teacher random 4", "teacher at 24px", "teacher random 8"]
    names = [str(runs[0]), str(runs[1]), "ToMe r=1", "ToMe r=3", *baselines]
    assert [r["model"] for r in report["table"]] == ["teacher", *names]
    rows = {r["model"]: r for r in report["table"]}

    # The students' numbers are those of their own reports: the same images, the same functions.
    for run in runs:
        own = json.loads((run / "report.json").read_text())
        assert report["fidelity"][str(run)] == pytest.approx(own["fidelity"], abs=1e-6)
        assert report["zero_shot"]["models"][str(run)]["top1"] == own["zero_shot"]["student"]["top1"]
        assert report["zero_shot"]["models"]["teacher"] == own["zero_shot"]["teacher"]
        assert report["linear_probe"][str(run)]["top1"] == own["linear_probe"]["student"]["top1"]
        assert report["cost"][str(run)]["gflops"] == pytest.approx(own["cost"]["student"]["gflops"])
        # ... and their own reports now point here.
        link = json.loads((run / "report.json").read_text())["compare"]
        assert (run / link).resolve() == (out / "compare.md").resolve()
        assert f"]({link})" in (run / "report.md").read_text()

    teacher = rows["teacher"]
    assert teacher["centred_cosine"] == pytest.approx(1.0) and teacher["retrieval_top1"] == 1.0
    assert teacher["agreement"] == 1.0 and teacher["flops_vs_teacher"] == 1.0 and teacher["tokens"] == "17"
    # ToMe: fewer tokens, fewer FLOPs, the more so the larger r; the output drifts from the teacher's.
    assert teacher["gflops"] > rows["ToMe r=1"]["gflops"] > rows["ToMe r=3"]["gflops"]
    assert rows["ToMe r=3"]["centred_cosine"] < 1.0
    assert report["models"]["ToMe r=3"]["token_counts"] == [14, 11, 8]
    assert rows["ToMe r=3"]["tokens"] == "17 -> 8"
    for row in rows.values():
        assert row["images_per_s"] > 0 and 0 <= row["top1"] <= 1 and 0 <= row["probe_top1"] <= 1

    for name in baselines:
        assert report["models"][name]["kind"] == "baseline" and rows[name]["gflops"] < teacher["gflops"]
    assert rows["teacher random 8"]["tokens"] == "9" and rows["teacher at 16px"]["tokens"] == "5"
    assert report["models"]["teacher patch 16"]["how"] == "2x2 patches of 16 px at 32x32"

    md = (out / "compare.md").read_text()
    assert "| ToMe r=3 | 17 -> 8 |" in md and "| teacher random 4 | 5 |" in md and "![fidelity and accuracy against cost](pareto.png)" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budgets_on_the_command_line(runs, tmp_path):
    out = tmp_path / "cmp"
    assert main([str(runs[0]), "--budget", "9", "--out", str(out), "--no-progress", "--no-probe"]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert [r["model"] for r in report["table"]] == ["teacher", str(runs[0]), "teacher at 24px", "teacher patch 16",
                                                     "teacher random 9"]
    assert main([str(runs[0]), "--budget", "none", "--out", str(out), "--overwrite", "--no-progress", "--no-probe",
                 "--no-cost"]) == 0
    assert [r["model"] for r in json.loads((out / "compare.json").read_text())["table"]] == ["teacher", str(runs[0])]
    with pytest.raises(SystemExit, match="token budget 20 is larger than the 16 patch tokens of teacher "
                                         "openclip:tiny-eval-clip; the largest valid budget is 16"):
        main([str(runs[0]), "--budget", "4,20", "--out", str(tmp_path / "bad"), "--no-progress"])
    assert not (tmp_path / "bad").exists()  # refused before any work


def test_runs_of_different_teachers_are_refused(runs, tmp_path):
    torch.manual_seed(1)
    other = random_teacher(CLIP_SPEC)  # same architecture, other weights: another teacher
    student, _ = bootstrap_student(other, **STUDENT)
    run = tmp_path / "other"
    write_run(run, other, student.eval(), {})
    with pytest.raises(CompareError, match="different teachers") as info:
        compare_runs([runs[0], run], out_dir=tmp_path / "cmp")
    for named in (runs[0], run):  # both teacher specs are named
        assert str(named / "teacher.safetensors") in str(info.value)
    with pytest.raises(SystemExit, match="different teachers"):
        main([str(runs[0]), str(run), "--out", str(tmp_path / "cmp"), "--no-progress"])
    with pytest.raises(CompareError, match="given twice"):
        compare_runs([runs[0], runs[0]])
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["teacher"]["pretrained"] = None  # a random teacher cannot be rebuilt
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit, match="random weights"):
        main([str(run), "--out", str(tmp_path / "cmp"), "--no-progress"])


def test_too_large_an_r_names_the_largest_valid_one(runs, tmp_path):
    # 16 patch tokens and 3 blocks: r = 6 would merge 18.
    with pytest.raises(SystemExit, match="largest valid r for this model is 5"):
        main([str(runs[0]), "--tome", "2,6", "--out", str(tmp_path / "cmp"), "--no-progress"])
    assert not (tmp_path / "cmp").exists()  # refused before any work


def test_a_supervised_teacher_is_compared_through_its_head(demo, tmp_path):
    torch.manual_seed(0)
    teacher = random_teacher({"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
                              "model_kwargs": {**TIMM_KWARGS, "num_classes": 10}})
    student, _ = bootstrap_student(teacher, **STUDENT)
    report = compare({"student": student.eval()}, teacher, str(demo / "val"), tome=[2], out_dir=tmp_path,
                     probe=False, progress=False, **FAST_EVAL)
    assert "zero_shot" not in report and "linear_probe" not in report
    section = report["classification"]["models"]
    assert set(section) == {"teacher", "student", "ToMe r=2"} and section["teacher"].keys() == {"top1", "top5"}
    assert 0 <= section["ToMe r=2"]["agreement"] <= 1
    assert report["fidelity"]["ToMe r=2"]["num_images"] == 20
    assert (tmp_path / "pareto.png").is_file()
    with pytest.raises(CompareError, match="cannot be named"):
        compare({"teacher": student}, teacher)


def test_without_an_eval_set_only_the_cost(tmp_path):
    teacher = random_teacher(CLIP_SPEC)
    report = compare({}, teacher, None, tome=[2], out_dir=tmp_path, progress=False, **FAST_EVAL)
    assert [r["model"] for r in report["table"]] == ["teacher", "ToMe r=2"]
    assert "fidelity" not in report and any("no evaluation set" in n for n in report["notes"])
    assert not (tmp_path / "pareto.png").exists() and (tmp_path / "compare.md").is_file()

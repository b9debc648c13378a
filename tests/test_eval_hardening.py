"""`python -m eval` against bad input: class subsets, unreadable images, files of the wrong kind.

Each test first reproduced the problem (issue 16, items 5 and 13): a probe that scored an
evaluation folder's own label indices against the run's classes, one corrupt image that aborted
the report, and clear messages printed inside tracebacks.
"""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT
from data.demo import DEMO_CLASSNAMES, make_demo_dataset, render_sample
from data.evalsets import build_eval_loader
from eval import evaluate
from eval.__main__ import main as eval_main
from eval.features import extract, teacher_student_step
from eval.linear_probe import fit_probe, train_labels_of
from eval.zeroshot import resolve_classnames
from students.sparseformer.construct import bootstrap_student
from students.export import main as export_main
from test_eval import _one_thread, clip_pair, demo, demo_teacher, write_run  # noqa: F401 (fixtures)

QUICK = dict(cost=False, rois=False, num_workers=0, progress=False, probe_cs=[1.0, 100.0])


def image_folder(root: Path, per_class: dict[str, int], seed: int = 5, size: int = 64) -> Path:
    """An ImageFolder of demo images: ``{class name: count}``, each image of its named shape."""
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        label = DEMO_CLASSNAMES.index(name) if name in DEMO_CLASSNAMES else 0
        for i in range(count):
            image, _ = render_sample(1000 * label + i, seed=seed, size=size, label=label)
            image.save(root / name / f"{i:03d}.png")
    return root


def truncate(path: Path, keep: int = 40) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


# ------------------------------------------------------------------ item 5: classes matched by name
def test_train_labels_of_matches_names_and_names_what_differs():
    train = ["circle", "square", "triangle", "star"]
    assert train_labels_of(["triangle", "square"], train).tolist() == [2, 1]  # a subset, in its own order
    assert train_labels_of(train, train).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"2 of its classes are not classes of .*'hexagon', 'oval'.*--no-probe"):
        train_labels_of(["square", "hexagon", "oval"], train)
    with pytest.raises(ValueError, match=r"train split names the classes \['a'\] more than once"):
        train_labels_of(["a"], ["a", "b", "a"])


@pytest.fixture(scope="module")
def demo_train(tmp_path_factory):
    """200 demo training images (10 classes, shards with dataset.json), another seed than the folders."""
    out = tmp_path_factory.mktemp("demo_train")
    make_demo_dataset(out, num=240, seed=3, size=64)
    return out / "train"


def test_probe_on_a_folder_of_some_classes_scores_them_by_name(demo_teacher, demo_train, tmp_path):  # noqa: F811
    """The bug: square/ and triangle/ got labels 0 and 1 (circle and square for the probe trained
    on the demo's classes): 1.25% / 0.00%. Matched by name, the demo teacher tells them apart."""
    folder = image_folder(tmp_path / "two", {"triangle": 12, "square": 12})
    torch.manual_seed(0)
    student, _ = bootstrap_student(demo_teacher, tokens=17, num_points=8, conv_dim=16, pg_inner_dim=32)
    student.eval()
    report = evaluate(student, demo_teacher, str(folder), train_data=str(demo_train), templates="demo", **QUICK)

    probe = report["linear_probe"]
    assert "matched by class name (2 of the train split's 10 classes" in probe["split"]
    assert report["eval_set"]["classnames"] == ["square", "triangle"]  # ImageFolder: sorted folder names
    # The same probe by hand, the folder's labels (square 0, triangle 1) put in the train split's terms.
    step = teacher_student_step(demo_teacher, student)
    train = extract(build_eval_loader(str(demo_train), demo_teacher.eval_transform(), 100, 0)[0], step,
                    progress=False)
    test = extract(build_eval_loader(str(folder), demo_teacher.eval_transform(), 100, 0)[0], step, progress=False)
    labels = torch.tensor([DEMO_CLASSNAMES.index("square"), DEMO_CLASSNAMES.index("triangle")])[test["labels"]]
    for model in ("teacher", "student"):
        expected = fit_probe(train[model], train["labels"], test[model], labels, Cs=[1.0, 100.0])
        assert probe[model]["top1"] == expected["top1"] and probe[model]["top5"] == expected["top5"]
    assert probe["teacher"]["top1"] >= 0.6, probe["teacher"]  # 0.92 here; the bug gave 1.25%
    assert probe["chance_top1"] == pytest.approx(0.1)  # the probe still chooses among all 10 classes
    # Zero-shot speaks the folder's own names: 2 classes, prompts for square and triangle.
    assert report["zero_shot"]["num_classes"] == 2


def test_probe_refuses_classes_the_train_split_never_saw_before_any_work(demo, clip_pair, tmp_path,  # noqa: F811
                                                                        monkeypatch, capsys):
    teacher, student = clip_pair
    folder = image_folder(tmp_path / "odd", {"square": 2, "hexagon": 2}, size=32)

    def no_features(*args, **kwargs):
        raise AssertionError("features were computed before the classes were checked")

    monkeypatch.setattr("eval.bench.extract", no_features)
    with pytest.raises(ValueError, match=r"'hexagon'.*train split"):
        evaluate(student, teacher, str(folder), train_data=str(demo / "train"), **QUICK)
    run = tmp_path / "run"
    write_run(run, teacher, student, {"train_data": str(demo / "train"), "num_workers": 0})
    assert eval_main([str(run), "--data", str(folder), "--no-progress", "--no-cost"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the linear probe cannot score") and "'hexagon'" in err and err.count("\n") == 1
    with pytest.raises(AssertionError, match="before the classes"):  # without the probe, nothing to refuse
        evaluate(student, teacher, str(folder), train_data=str(demo / "train"), **{**QUICK, "probe": False})


def test_imagenet_classnames_need_an_imagenet_label_set():
    with pytest.raises(ValueError, match="ImageNet-1k's 1000 classes, but the evaluation set has 2"):
        resolve_classnames("imagenet", ["n01440764", "n01443537"])
    assert len(resolve_classnames("imagenet", None)) == 1000


# ------------------------------------------------------------------ item 13: unreadable images
@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_folder_skips_counts_and_names_unreadable_images(tmp_path, num_workers):
    folder = image_folder(tmp_path / "f", {"circle": 3, "square": 3}, size=16)
    bad = [truncate(folder / "square" / "001.png"), folder / "circle" / "002.png"]
    bad[1].write_text("not an image")
    loader, names = build_eval_loader(str(folder), lambda im: torch.zeros(1), batch_size=2, num_workers=num_workers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = [y for _, ys in loader for y in ys.tolist()]
    assert names == ["circle", "square"] and labels == [0, 0, 1, 1]
    assert sorted(loader.skipped) == sorted(str(p) for p in bad)
    if num_workers == 0:  # (warnings of worker processes do not reach this one's record)
        assert sum("cannot read evaluation image" in str(w.message) for w in caught) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        list(loader)  # iterating again names the same images once
    assert len(loader.skipped) == 2


def test_report_goes_on_past_unreadable_images_and_names_them(clip_pair, tmp_path):  # noqa: F811
    teacher, student = clip_pair
    test = image_folder(tmp_path / "test", {"circle": 4, "square": 4}, size=32)
    train = image_folder(tmp_path / "train", {"circle": 4, "square": 4}, seed=9, size=32)
    broken = truncate(test / "square" / "002.png")
    broken_train = truncate(train / "circle" / "000.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skip warnings: asserted above
        report = evaluate(student, teacher, str(test), out_dir=tmp_path / "out", train_data=str(train),
                          templates="demo", **QUICK)
    e = report["eval_set"]
    assert e["num_images"] == 7 and e["num_skipped"] == 1 and e["skipped"][0]["name"] == str(broken)
    assert "Error" in e["skipped"][0]["error"]
    assert report["linear_probe"]["train_num_skipped"] == 1
    assert report["linear_probe"]["train_skipped"][0]["name"] == str(broken_train)
    assert report["linear_probe"]["teacher"]["num_train"] == 7
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"1 unreadable evaluation image skipped: `{broken}`" in md
    assert f"1 unreadable train image skipped: `{broken_train}`" in md


# ------------------------------------------------------------------ item 13: one-line errors
@pytest.fixture(scope="module")
def bad_inputs(clip_pair, demo, tmp_path_factory):  # noqa: F811
    teacher, student = clip_pair
    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    write_run(run, teacher, student, {"data": str(demo / "val"), "num_workers": 0})
    (root / "empty").mkdir()
    (root / "afile").write_text("a file")
    (root / "text.json").write_text("not json")
    pwned = root / "pwned"

    class Payload:  # what a tampered weights file runs when unpickled without weights_only
        def __reduce__(self):
            return (Path.touch, (pwned,))

    torch.save({"w": Payload()}, root / "evil.pth")
    (root / "cut.safetensors").write_bytes((run / "student.safetensors").read_bytes()[:100])
    evil_teacher = root / "evil_teacher"
    evil_teacher.mkdir()
    for f in ("student_config.json", "student.safetensors"):
        (evil_teacher / f).write_bytes((run / f).read_bytes())
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["teacher"]["pretrained"] = str(root / "evil.pth")
    (evil_teacher / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    bad_yaml = root / "bad_yaml"
    bad_yaml.mkdir()
    for f in ("student_config.json", "student.safetensors"):
        (bad_yaml / f).write_bytes((run / f).read_bytes())
    (bad_yaml / "recipe.yaml").write_text("teacher: [unclosed\n")
    return root


EVAL_CASES = {
    "not a run": (["{r}/empty"], "is not a finished bootstrapping run: missing student_config.json"),
    "missing run": (["{r}/nowhere"], "run folder {r}/nowhere does not exist"),
    "run is a file": (["{r}/afile"], "{r}/afile is a file, not a run folder"),
    "bad recipe YAML": (["{r}/bad_yaml"], "recipe.yaml is not valid YAML: expected ',' or ']'"),
    "missing data": (["{r}/run", "--data", "{r}/nowhere"], "evaluation data {r}/nowhere does not exist"),
    "data is a file": (["{r}/run", "--data", "{r}/text.json"], "is a file but not a .tar shard"),
    "out is a file": (["{r}/run", "--out", "{r}/afile"], "the report folder {r}/afile is a file"),
    "bad device": (["{r}/run", "--device", "gpu0"], "eval device 'gpu0' is not a torch device"),
    "zero samples": (["{r}/run", "--max-samples", "0"], "max_samples must be an integer >= 1"),
    "unsafe weights": (["--student", "{r}/run/student_config.json", "--weights", "{r}/evil.pth", "--teacher",
                        "{r}/run/recipe.yaml"], "cannot read {r}/evil.pth as a weights-only torch checkpoint "
                                                "(UnpicklingError: Unsupported global: GLOBAL getattr"),
    "unsafe teacher weights": (["{r}/evil_teacher"], "could not load open_clip 'tiny-eval-clip' weights from "
                                                     "{r}/evil.pth: Unsupported global: GLOBAL getattr"),
    "cut safetensors": (["--student", "{r}/run/student_config.json", "--weights", "{r}/cut.safetensors",
                         "--teacher", "{r}/run/recipe.yaml"], "cannot read {r}/cut.safetensors as a .safetensors"),
    "missing weights": (["--student", "{r}/run/student_config.json", "--weights", "{r}/no.pth", "--teacher",
                         "{r}/run/recipe.yaml"], "--weights {r}/no.pth does not exist"),
    "weights as student": (["--student", "{r}/run/student.safetensors", "--teacher", "{r}/run/recipe.yaml"],
                           "is not a student config JSON (as a run writes student_config.json) but a binary file"),
    "student not JSON": (["--student", "{r}/text.json", "--teacher", "{r}/run/recipe.yaml"],
                         "--student {r}/text.json is not a student config JSON"),
    "missing teacher": (["--student", "{r}/run/student_config.json", "--teacher", "{r}/no.yaml"],
                        "--teacher: the teacher spec file {r}/no.yaml does not exist"),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_cli_bad_input_is_one_line_and_exit_2(bad_inputs, capsys, case):
    argv, message = EVAL_CASES[case]
    r = str(bad_inputs)
    argv = [a.format(r=r) for a in argv]
    if "--student" in argv and "--data" not in argv:
        # Never read or written: the error comes first.
        argv += ["--data", str(bad_inputs / "run"), "--out", str(bad_inputs / "out")]
    assert eval_main(argv + ["--no-progress", "--no-cost", "--no-rois"]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    assert message.format(r=r) in out.err
    assert not (bad_inputs / "pwned").exists()


EXPORT_CASES = {
    "missing run": (["{r}/nowhere"], "run folder {r}/nowhere does not exist"),
    "run is a file": (["{r}/afile"], "{r}/afile is a file, not a run folder"),
    "not a run": (["{r}/empty"], "is not a finished bootstrapping run"),
    "bad recipe YAML": (["{r}/bad_yaml"], "recipe.yaml is not valid YAML"),
    "out is a file": (["{r}/run", "--out", "{r}/afile"], "the export folder {r}/afile is a file"),
    "unsafe teacher weights": (["{r}/evil_teacher"], "weights from {r}/evil.pth: Unsupported global"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_cli_bad_input_is_one_line_and_exit_2(bad_inputs, capsys, case):
    argv, message = EXPORT_CASES[case]
    r = str(bad_inputs)
    assert export_main([a.format(r=r) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(r=r) in err, err


def test_export_cli_reads_a_tampered_student_safely(bad_inputs, capsys):
    run = bad_inputs / "tampered"
    run.mkdir()
    for f in ("student_config.json", "recipe.yaml"):
        (run / f).write_bytes((bad_inputs / "run" / f).read_bytes())
    (run / "student.safetensors").write_bytes((bad_inputs / "cut.safetensors").read_bytes())
    assert export_main([str(run), "--out", str(bad_inputs / "never")]) == 2
    assert "student.safetensors as a .safetensors file" in capsys.readouterr().err
    assert not (bad_inputs / "never").exists()  # checked before anything is written


def test_python_m_eval_prints_the_message_alone(tmp_path):
    (tmp_path / "not_a_run").mkdir()
    proc = subprocess.run([sys.executable, "-m", "eval", str(tmp_path / "not_a_run")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'not_a_run'} is not a finished bootstrapping run: missing student_config.json, "
        "student.safetensors, recipe.yaml (a run writes student_config.json, student.safetensors and recipe.yaml "
        "at its end); or evaluate a student and teacher directly with --student/--teacher"]
